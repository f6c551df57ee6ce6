"""tar.gz archives of BigEarthNet patch folders, streamed from a real S3-protocol server."""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest

from services.wrapper.inputs import (
    InputError,
    InputItem,
    InputLimits,
    InputPatch,
    PatchRejection,
    S3Access,
    read_input,
    read_tar_stream,
)
from services.wrapper.inputs.s3_listing import S3Client
from wrapper_input_data import (
    ALL_BANDS,
    add_bytes,
    add_sample_patch,
    sample_band_array,
    sample_band_path,
    sample_georeference,
    sample_patch_names,
    sample_tar_gz,
)


def _upload(client: S3Client, access: S3Access, key: str, data: bytes) -> None:
    client.put_object(Bucket=access.bucket_name, Key=key, Body=data)


def _split(items: list[InputItem]) -> tuple[list[InputPatch], list[PatchRejection]]:
    patches = [item for item in items if isinstance(item, InputPatch)]
    rejections = [item for item in items if isinstance(item, PatchRejection)]
    assert len(patches) + len(rejections) == len(items)
    return patches, rejections


def _tar_gz(build) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        build(archive)
    return buffer.getvalue()


def test_archive_of_all_sample_patches_comes_out_whole(s3_access: S3Access, s3_client: S3Client) -> None:
    names = sample_patch_names()
    key = "step-1/inputs/component/sample.tar.gz"
    _upload(s3_client, s3_access, key, sample_tar_gz(names, top_dir="bigearthnet/"))

    patches, rejections = _split(list(read_input(s3_access, "step-1")))

    assert rejections == []
    assert [patch.patch_id for patch in patches] == [f"bigearthnet/{name}" for name in names]
    for patch, name in zip(patches, names):
        assert patch.source == key
        assert sorted(patch.bands) == sorted(ALL_BANDS)
        for band in ALL_BANDS:
            expected = sample_band_array(name, band)
            assert patch.bands[band].dtype == np.uint16
            np.testing.assert_array_equal(patch.bands[band], expected)
        georeference = sample_georeference(name)
        if georeference is None:
            assert patch.crs is None and patch.transform is None
        else:
            crs, upper_left_x, upper_left_y = georeference
            assert patch.crs == crs
            assert patch.transform is not None
            assert (patch.transform.c, patch.transform.f) == (upper_left_x, upper_left_y)
            assert (patch.transform.a, patch.transform.e) == (10.0, -10.0)
    assert sum(patch.crs is not None for patch in patches) == 2


def test_ids_and_order_are_the_same_on_every_read(s3_access: S3Access, s3_client: S3Client) -> None:
    names = sample_patch_names()[:6]
    # Two archives, named so that key order differs from upload order.
    _upload(s3_client, s3_access, "in/b.tar.gz", sample_tar_gz(names[3:]))
    _upload(s3_client, s3_access, "in/a.tgz", sample_tar_gz(names[:3]))

    first = [(item.source, item.patch_id) for item in read_input(s3_access, "in")]
    second = [(item.source, item.patch_id) for item in read_input(s3_access, "in/")]

    assert first == second
    assert first == [("in/a.tgz", name) for name in names[:3]] + [("in/b.tar.gz", name) for name in names[3:]]


def test_truncated_archive_is_an_input_error_after_the_complete_patches(
    s3_access: S3Access, s3_client: S3Client
) -> None:
    whole = sample_tar_gz(sample_patch_names()[:8])
    _upload(s3_client, s3_access, "in/cut.tar.gz", whole[: len(whole) // 2])

    yielded: list[InputItem] = []
    with pytest.raises(InputError, match="truncated") as raised:
        for item in read_input(s3_access, "in"):
            yielded.append(item)

    assert raised.value.source == "in/cut.tar.gz"
    patches, rejections = _split(yielded)
    assert rejections == []
    assert 0 < len(patches) < 8
    assert all(len(patch.bands) == len(ALL_BANDS) for patch in patches)


def test_archive_cut_inside_the_gzip_trailer_is_still_truncated(s3_access: S3Access, s3_client: S3Client) -> None:
    whole = sample_tar_gz(sample_patch_names()[:2])
    # Without its CRC/length trailer every tar byte is still there: only gzip's own check can tell.
    _upload(s3_client, s3_access, "in/no-trailer.tar.gz", whole[:-4])

    with pytest.raises(InputError, match="truncated"):
        list(read_input(s3_access, "in"))


def test_object_that_is_not_gzip_is_an_input_error(s3_access: S3Access, s3_client: S3Client) -> None:
    _upload(s3_client, s3_access, "in/fake.tar.gz", b"this is plain text, not a gzip stream\n" * 50)

    with pytest.raises(InputError, match="not a valid gzip") as raised:
        list(read_input(s3_access, "in"))
    assert raised.value.source == "in/fake.tar.gz"


def test_gzip_that_is_not_tar_is_an_input_error(s3_access: S3Access, s3_client: S3Client) -> None:
    _upload(s3_client, s3_access, "in/text.tar.gz", gzip.compress(b"a gzipped text, no tar headers\n" * 200))

    with pytest.raises(InputError, match="not a valid tar"):
        list(read_input(s3_access, "in"))


def test_corrupt_member_header_in_mid_archive_is_an_input_error(s3_access: S3Access, s3_client: S3Client) -> None:
    names = sample_patch_names()[:3]
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as archive:
        for name in names:
            add_sample_patch(archive, name)
    raw = bytearray(plain.getvalue())
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as archive:
        victim = archive.getmembers()[15]  # a header of the second patch
    raw[victim.offset:victim.offset + 100] = b"\xff" * 100  # name field garbled: checksum no longer matches
    _upload(s3_client, s3_access, "in/garbled.tar.gz", gzip.compress(bytes(raw)))

    with pytest.raises(InputError, match="corrupt"):
        list(read_input(s3_access, "in"))


def test_refused_members_are_rejected_and_the_other_patches_come_out(s3_access: S3Access, s3_client: S3Client) -> None:
    good_first, with_symlink, with_oversize, good_last = sample_patch_names()[:4]

    def build(archive: tarfile.TarFile) -> None:
        add_sample_patch(archive, good_first)
        add_bytes(archive, "../escape.txt", b"outside the archive root")
        add_bytes(archive, "/etc/absolute.tif", b"absolute path")
        add_sample_patch(archive, with_symlink, skip_bands=["B03"])
        link = tarfile.TarInfo(f"{with_symlink}/{with_symlink}_B03.tif")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        add_sample_patch(archive, with_oversize, skip_bands=["B02"])
        add_bytes(archive, f"{with_oversize}/{with_oversize}_B02.tif", b"\x00" * 300_000)
        device = tarfile.TarInfo("dev/null")
        device.type = tarfile.CHRTYPE
        archive.addfile(device)
        fifo = tarfile.TarInfo("pipe")
        fifo.type = tarfile.FIFOTYPE
        archive.addfile(fifo)
        add_sample_patch(archive, good_last)

    _upload(s3_client, s3_access, "in/mixed.tar.gz", _tar_gz(build))
    limits = InputLimits(max_band_file_bytes=100_000)  # sample band files are at most ~30 KB

    patches, rejections = _split(list(read_input(s3_access, "in", limits=limits)))

    assert [patch.patch_id for patch in patches] == [good_first, good_last]
    assert all(sorted(patch.bands) == sorted(ALL_BANDS) for patch in patches)
    reasons = {rejection.patch_id: rejection.reason for rejection in rejections}
    assert set(reasons) == {"../escape.txt", "/etc/absolute.tif", with_symlink, with_oversize, "dev/null", "pipe"}
    assert "'..'" in reasons["../escape.txt"]
    assert "absolute path" in reasons["/etc/absolute.tif"]
    assert "symbolic link" in reasons[with_symlink]
    assert "300000 bytes" in reasons[with_oversize] and "limit" in reasons[with_oversize]
    assert "device" in reasons["dev/null"]
    assert "fifo" in reasons["pipe"]


def test_patch_missing_a_band_is_yielded_with_what_it_has(s3_access: S3Access, s3_client: S3Client) -> None:
    complete, incomplete = sample_patch_names()[:2]

    def build(archive: tarfile.TarFile) -> None:
        add_sample_patch(archive, complete)
        add_sample_patch(archive, incomplete, skip_bands=["B08"])

    _upload(s3_client, s3_access, "in/partial.tar.gz", _tar_gz(build))

    patches, rejections = _split(list(read_input(s3_access, "in")))

    assert rejections == []
    assert [patch.patch_id for patch in patches] == [complete, incomplete]
    assert sorted(patches[1].bands) == sorted(set(ALL_BANDS) - {"B08"})


def test_undecodable_band_file_rejects_its_patch(s3_access: S3Access, s3_client: S3Client) -> None:
    broken, fine = sample_patch_names()[:2]

    def build(archive: tarfile.TarFile) -> None:
        add_sample_patch(archive, broken, skip_bands=["B04"])
        add_bytes(archive, f"{broken}/{broken}_B04.tif", b"II*\x00 not really a tiff")
        add_sample_patch(archive, fine)

    _upload(s3_client, s3_access, "in/broken.tar.gz", _tar_gz(build))

    patches, rejections = _split(list(read_input(s3_access, "in")))

    assert [patch.patch_id for patch in patches] == [fine]
    assert [(r.patch_id, r.source) for r in rejections] == [(broken, "in/broken.tar.gz")]
    assert "B04" in rejections[0].reason and "not a readable raster" in rejections[0].reason


def _interleaved_archive(names: list[str]) -> bytes:
    def build(archive: tarfile.TarFile) -> None:
        # Band-major order: every patch is open until the last band, which tar itself never does.
        for band in ALL_BANDS:
            for name in names:
                archive.add(sample_band_path(name, band), arcname=f"{name}/{name}_{band}.tif")

    return _tar_gz(build)


def test_interleaved_patches_are_regrouped_within_the_pending_window() -> None:
    names = sample_patch_names()[:3]

    patches, rejections = _split(
        list(read_tar_stream(io.BytesIO(_interleaved_archive(names)), "interleaved.tar.gz", InputLimits()))
    )

    assert rejections == []
    assert [patch.patch_id for patch in patches] == names
    assert all(sorted(patch.bands) == sorted(ALL_BANDS) for patch in patches)


def test_interleaving_beyond_the_pending_window_bounds_memory_and_reports_late_bands() -> None:
    names = sample_patch_names()[:3]
    limits = InputLimits(max_pending_patches=1)

    patches, rejections = _split(
        list(read_tar_stream(io.BytesIO(_interleaved_archive(names)), "interleaved.tar.gz", limits))
    )

    # The oldest patch is pushed out as soon as a second one opens; every later band of it is reported, not held.
    # The last patch never has a younger one behind it, so it stays pending and gathers all its bands.
    assert [patch.patch_id for patch in patches] == names
    assert [sorted(patch.bands) for patch in patches] == [["B01"], ["B01"], sorted(ALL_BANDS)]
    assert len(rejections) == 2 * (len(ALL_BANDS) - 1)
    assert all("after the patch was emitted" in rejection.reason for rejection in rejections)
    assert {rejection.patch_id for rejection in rejections} == set(names[:2])


def test_member_count_limit_is_an_input_error() -> None:
    archive = sample_tar_gz(sample_patch_names()[:2])

    with pytest.raises(InputError, match="max_archive_members"):
        list(read_tar_stream(io.BytesIO(archive), "many.tar.gz", InputLimits(max_archive_members=20)))


def test_uncompressed_size_limit_is_an_input_error() -> None:
    # A gzip bomb in miniature: 50 MB of zeros compress to ~50 KB.
    archive = _tar_gz(lambda tar: add_bytes(tar, "P/P_B02.tif", b"\x00" * 50_000_000))

    with pytest.raises(InputError, match="max_archive_uncompressed_bytes"):
        list(read_tar_stream(io.BytesIO(archive), "bomb.tar.gz", InputLimits(max_archive_uncompressed_bytes=1_000_000)))


def test_oversized_extended_header_is_an_input_error() -> None:
    def build(archive: tarfile.TarFile) -> None:
        member = tarfile.TarInfo("P/P_B02.tif")
        member.pax_headers = {"comment": "x" * 200_000}
        archive.addfile(member, io.BytesIO(b""))

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        build(archive)

    with pytest.raises(InputError, match="max_tar_header_bytes"):
        list(read_tar_stream(io.BytesIO(buffer.getvalue()), "pax.tar.gz", InputLimits(max_tar_header_bytes=16_384)))


def test_dot_slash_member_names_give_plain_patch_ids() -> None:
    name = sample_patch_names()[0]

    def build(archive: tarfile.TarFile) -> None:
        archive.add(sample_band_path(name, "B02").parent, arcname=".", recursive=False)
        add_sample_patch(archive, name, top_dir="./")

    patches, rejections = _split(list(read_tar_stream(io.BytesIO(_tar_gz(build)), "dot.tar.gz", InputLimits())))

    assert rejections == []
    assert [(patch.patch_id, len(patch.bands)) for patch in patches] == [(name, len(ALL_BANDS))]
