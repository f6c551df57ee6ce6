"""tar.gz archives of BigEarthNet patch folders, read as a stream from the S3 body, never written to disk.

Safety: members with absolute paths or ``..``, links, devices, fifos and sparse files are refused (nothing is ever
extracted, but a refused member must not be silently taken for data either); band files over a size limit are not
read; the decompressed volume, the member count and the extended-header bytes of an archive are bounded.
A refused member rejects its patch (or, if it belongs to none, is reported under its own name); an archive that is
not gzip, is truncated or corrupt, or breaks a limit ends the input with an ``InputError``.
"""

from __future__ import annotations

import gzip
import logging
import tarfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO, Iterator, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from services.wrapper.inputs.band_files import assemble_patch, band_file_size_fault, parse_band_file_path
from services.wrapper.inputs.s3_listing import S3Client, TarArchiveSource, s3_failure
from services.wrapper.inputs.settings import InputLimits
from services.wrapper.inputs.types import BIGEARTHNET_BANDS, InputError, InputItem, PatchRejection

log = logging.getLogger(__name__)

_DRAIN_CHUNK = 64 * 1024


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _ArchiveLimitError(Exception):
    pass


class _CorruptArchiveError(Exception):
    pass


class _BoundedReader:
    """The decompressed tar stream, counted: in total, and since the last member tarfile handed out.

    tarfile reads a member's pax records or GNU long name into memory whole before it returns the member, so the
    bytes consumed between two members (the previous member's data plus the next headers) are bounded too.
    """

    def __init__(self, stream: _Readable, limits: InputLimits) -> None:
        self._stream = stream
        self._total_limit = limits.max_archive_uncompressed_bytes
        self._header_allowance = limits.max_tar_header_bytes
        self.total_bytes = 0
        self._since_member = 0
        self._member_budget = self._header_allowance

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = _DRAIN_CHUNK  # never one unbounded read
        data = self._stream.read(size)
        self.total_bytes += len(data)
        self._since_member += len(data)
        if self.total_bytes > self._total_limit:
            raise _ArchiveLimitError(
                f"archive decompresses to more than {self._total_limit} bytes (limit max_archive_uncompressed_bytes)"
            )
        if self._since_member > self._member_budget:
            raise _ArchiveLimitError(
                f"tar extended headers exceed {self._header_allowance} bytes (limit max_tar_header_bytes)"
            )
        return data

    def member_started(self, declared_size: int) -> None:
        padded = -(-max(declared_size, 0) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        self._since_member = 0
        self._member_budget = padded + self._header_allowance


@dataclass(slots=True)
class _PendingPatch:
    band_files: dict[str, bytes] = field(default_factory=dict)
    member_bytes: int = 0


class _PatchGrouper:
    """Groups band members into patches as they stream, emitting patches in the order they first appear.

    A patch leaves when it has every BigEarthNet band or, if the archive interleaves patches (tar does not, but
    an archive is untrusted), when too many patches or bytes are pending: the oldest then leaves with what it has.
    """

    def __init__(self, source: str, limits: InputLimits) -> None:
        self._source = source
        self._max_pending_patches = limits.max_pending_patches
        self._max_pending_bytes = limits.max_pending_bytes
        self._pending: OrderedDict[str, _PendingPatch] = OrderedDict()
        self._pending_bytes = 0
        # Ids only (tens of bytes each), so that a late member or a second refusal is recognised.
        self._emitted: set[str] = set()
        self._rejected: set[str] = set()
        self._warned_interleaving = False
        self.patches = 0
        self.rejections = 0

    def add_band(self, patch_id: str, band: str, data: bytes, member_name: str) -> Iterator[InputItem]:
        if patch_id in self._rejected:
            return
        if patch_id in self._emitted:
            self.rejections += 1
            yield PatchRejection(
                patch_id,
                self._source,
                f"member {member_name!r} came after the patch was emitted (its members are further apart than "
                f"max_pending_patches={self._max_pending_patches} allows); band {band} dropped",
            )
            return
        pending = self._pending.setdefault(patch_id, _PendingPatch())
        replaced = pending.band_files.get(band)
        if replaced is not None:
            # tar keeps every copy of a name; extraction would leave the last one, and so does this.
            pending.member_bytes -= len(replaced)
            self._pending_bytes -= len(replaced)
        pending.band_files[band] = data
        pending.member_bytes += len(data)
        self._pending_bytes += len(data)
        yield from self._emit_ready()

    def reject(self, patch_id: str, reason: str) -> Iterator[InputItem]:
        if patch_id in self._rejected:
            return
        dropped = self._pending.pop(patch_id, None)
        if dropped is not None:
            self._pending_bytes -= dropped.member_bytes
        self._rejected.add(patch_id)
        self.rejections += 1
        yield PatchRejection(patch_id, self._source, reason)
        yield from self._emit_ready()

    def flush(self) -> Iterator[InputItem]:
        while self._pending:
            yield self._emit_oldest()

    def _emit_ready(self) -> Iterator[InputItem]:
        while self._pending:
            oldest_id, oldest = next(iter(self._pending.items()))
            crowded = len(self._pending) > self._max_pending_patches or self._pending_bytes > self._max_pending_bytes
            if BIGEARTHNET_BANDS.issubset(oldest.band_files):
                yield self._emit_oldest()
            elif crowded:
                if not self._warned_interleaving:
                    self._warned_interleaving = True
                    log.warning(
                        "archive interleaves patches; emitting incomplete patches to bound memory",
                        extra={"source": self._source, "patch_id": oldest_id, "pending": len(self._pending)},
                    )
                yield self._emit_oldest()
            else:
                return

    def _emit_oldest(self) -> InputItem:
        patch_id, pending = self._pending.popitem(last=False)
        self._pending_bytes -= pending.member_bytes
        self._emitted.add(patch_id)
        item = assemble_patch(patch_id, self._source, pending.band_files)
        if isinstance(item, PatchRejection):
            self.rejections += 1
        else:
            self.patches += 1
        return item


def _path_fault(name: str) -> str | None:
    if not name or name.startswith("/"):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "has '..' in its path"
    return None


def _type_fault(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return "is a symbolic link"
    if member.islnk():
        return "is a hard link"
    if member.ischr() or member.isblk():
        return "is a device file"
    if member.isfifo():
        return "is a fifo"
    if member.issparse():
        return "is a sparse file"
    if not member.isreg():
        return f"has unsupported tar type {member.type!r}"
    return None


def read_tar_stream(compressed: BinaryIO | _Readable, source: str, limits: InputLimits) -> Iterator[InputItem]:
    """Patches and rejections from a tar.gz read sequentially from ``compressed``; ``source`` names it in results.

    Raises ``InputError`` for an archive-level fault. Patches already yielded when it is raised were complete.
    """
    # Decompressing here rather than with tarfile's "r|gz" lets the decompressed volume, headers included, be
    # bounded before tarfile ever buffers it.
    reader = _BoundedReader(gzip.GzipFile(fileobj=compressed, mode="rb"), limits)  # type: ignore[arg-type]
    grouper = _PatchGrouper(source, limits)
    members = ignored = 0
    try:
        archive = tarfile.open(fileobj=reader, mode="r|")  # type: ignore[call-overload]
        while (member := archive.next()) is not None:
            members += 1
            if members > limits.max_archive_members:
                raise _ArchiveLimitError(f"archive has more than {limits.max_archive_members} members "
                                         "(limit max_archive_members)")
            reader.member_started(member.size)
            # tarfile keeps every TarInfo for random access we never do; dropping them keeps memory flat.
            archive.members.clear()
            if member.isdir():
                continue
            name = member.name
            fault = _path_fault(name)
            band_file = None if fault else parse_band_file_path(str(PurePosixPath(name)))
            fault = fault or _type_fault(member)
            if fault is None and band_file is not None:
                fault = band_file_size_fault(band_file.band, member.size, limits.max_band_file_bytes)
            if fault is not None:
                patch_id = band_file.patch_dir if band_file is not None else name
                yield from grouper.reject(patch_id, f"member {name!r} {fault}")
                continue
            if band_file is None:
                ignored += 1  # labels_metadata.json, readmes: not input
                continue
            extracted = archive.extractfile(member)
            if extracted is None:  # only for types already refused above
                raise tarfile.ReadError(f"member {name!r} has no data")
            data = extracted.read()
            if len(data) != member.size:
                raise EOFError(f"member {name!r} ends after {len(data)} of {member.size} bytes")
            yield from grouper.add_band(band_file.patch_dir, band_file.band, data, name)
        _drain_after_end(reader)
    except _ArchiveLimitError as error:
        raise InputError(f"archive refused: {error}", source) from None
    except _CorruptArchiveError as error:
        raise InputError(f"archive is corrupt ({error})", source) from None
    except gzip.BadGzipFile as error:
        raise InputError(f"archive is not a valid gzip stream ({error})", source) from None
    except EOFError as error:
        raise InputError(f"archive is truncated ({error})", source) from None
    except zlib.error as error:
        raise InputError(f"archive has corrupt compressed data ({error})", source) from None
    except tarfile.TarError as error:
        raise InputError(_tar_error_reason(error), source) from None
    yield from grouper.flush()
    log.info(
        "archive read",
        extra={
            "source": source,
            "members": members,
            "ignored_members": ignored,
            "patches": grouper.patches,
            "rejections": grouper.rejections,
            "uncompressed_bytes": reader.total_bytes,
        },
    )


def _tar_error_reason(error: tarfile.TarError) -> str:
    message = str(error)
    if "zlib" in message:
        return f"archive has corrupt compressed data ({message})"
    if "unexpected end" in message:
        return f"archive is truncated ({message})"
    if "empty file" in message:
        return "archive is empty (no tar header)"
    return f"archive is not a valid tar stream ({message})"


def _drain_after_end(reader: _BoundedReader) -> None:
    """Read to the end of the gzip stream: gzip then checks its CRC and length, so truncation is caught.

    tarfile also takes an unreadable header in mid-archive for the end of the archive; anything but zero padding
    after the end is therefore a corrupt archive, not a short one.
    """
    while chunk := reader.read(_DRAIN_CHUNK):
        if chunk.count(0) != len(chunk):
            raise _CorruptArchiveError("data follows the end-of-archive marker: a member header is unreadable")


def read_tar_archive(
    client: S3Client, bucket: str, archive: TarArchiveSource, limits: InputLimits
) -> Iterator[InputItem]:
    """Stream one tar.gz object from S3 through ``read_tar_stream``."""
    key = archive.archive.key
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as error:
        raise s3_failure(error, f"opening {key}", client, key) from None
    body = response["Body"]
    try:
        yield from read_tar_stream(body, key, limits)
    except (BotoCoreError, ClientError) as error:
        raise s3_failure(error, f"reading {key}", client, key) from None
    finally:
        body.close()
