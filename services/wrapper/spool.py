"""Results of one unit on local disk while its batches come back, so that a step's memory does not grow with its input.

``ArraySpool``: rows of one dtype and row shape appended to a temporary file (in the run's spool directory, an
``emptyDir`` on Kubernetes) and read back in chunks; ``spooled_output``: a result file written to disk, hashed in blocks,
uploaded from there (``ResultStore.put``: multipart when large).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from typing import IO, Any, Iterator

import numpy as np

from services.wrapper.outputs.types import OutputFile

READ_CHUNK_ROWS = 256
HASH_BLOCK_BYTES = 1024 * 1024


class ArraySpool:
    """Rows (``np.ndarray`` [n, *row_shape]) appended to a file, plus a small Python object per row."""

    def __init__(self, directory: str, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        handle, self.path = tempfile.mkstemp(prefix="rows-", suffix=".bin", dir=directory)
        self._file: IO[bytes] = os.fdopen(handle, "w+b")
        self.row_shape: tuple[int, ...] | None = None
        self.rows = 0
        self.items: list[Any] = []  # per-row metadata, in order
        self.meta: Any = None  # what the unit's rows share (e.g. the codes file's band scale)

    def __len__(self) -> int:
        return self.rows

    def append(self, rows: np.ndarray, items: list[Any]) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if self.row_shape is None:
            self.row_shape = tuple(rows.shape[1:])
        elif tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {list(rows.shape[1:])} after rows of shape {list(self.row_shape)}")
        if len(items) != rows.shape[0]:
            raise ValueError(f"{len(items)} items for {rows.shape[0]} rows")
        self._file.seek(0, os.SEEK_END)
        self._file.write(rows.tobytes())
        self.rows += rows.shape[0]
        self.items.extend(items)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new array (the only copy of them in memory)."""
        assert self.row_shape is not None
        stop = min(stop, self.rows)
        row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        out = np.empty((max(stop - start, 0), *self.row_shape), dtype=self.dtype)
        self._file.seek(start * row_bytes)
        self._file.readinto(memoryview(out).cast("B"))
        return out

    def chunks(self, start: int = 0, stop: int | None = None, size: int = READ_CHUNK_ROWS) -> Iterator[np.ndarray]:
        end = self.rows if stop is None else min(stop, self.rows)
        for first in range(start, end, size):
            yield self.read(first, min(first + size, end))

    def close(self) -> None:
        self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@contextmanager
def spooled_output(directory: str, suffix: str, content_type: str) -> Iterator[tuple[IO[bytes], list[OutputFile]]]:
    """``with spooled_output(dir, ".features.json", "application/json") as (target, made): ...`` then ``made[0]``
    is the ``OutputFile`` (path, size, sha256) of what was written to ``target`` (a seekable file: zip writers
    seek back to their headers, so the bytes are those of an in-memory write)."""
    handle, path = tempfile.mkstemp(prefix="result-", suffix=suffix, dir=directory)
    made: list[OutputFile] = []
    try:
        with os.fdopen(handle, "w+b") as target:
            yield target, made
            target.flush()
            target.seek(0)
            digest = hashlib.sha256()
            size = 0
            while block := target.read(HASH_BLOCK_BYTES):
                digest.update(block)
                size += len(block)
        made.append(OutputFile(data=b"", content_type=content_type, suffix=suffix, path=path,
                               spooled_size=size, spooled_sha256=digest.hexdigest()))
    except BaseException:
        os.unlink(path)
        raise
