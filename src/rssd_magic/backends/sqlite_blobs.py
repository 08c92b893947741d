"""Blobs in an RSSD: content-addressed bytes in our ``rssd_magic_blob``
table, checked against their digest while they are read back."""

from __future__ import annotations

import mmap
import sqlite3
from contextlib import AbstractContextManager
from typing import Callable, Iterable

from ..trust import Verifier
from .base import Blob

#: Blobs are read back in slices of this size, into one preallocated buffer:
#: large enough to amortise the call, small enough to stay in L2.
READ_CHUNK = 256 << 10
#: Blobs from this size up are read into huge-page mappings (see get).
HUGE_BUFFER = 4 << 20


class SqliteBlobs:
    """``rssd_magic_blob``: content-addressed bytes in the RSSD."""

    def __init__(
        self,
        conn: Callable[[], sqlite3.Connection],
        write: Callable[[], AbstractContextManager[sqlite3.Connection]],
    ):
        self._conn = conn  # the backend's connection (None once closed)
        self._write = write  # its BEGIN IMMEDIATE … COMMIT

    def get(self, digest: str) -> bytearray | mmap.mmap:
        """Read a blob into one writable buffer, checking its digest on the way.

        Measured on a 200 MB array (bench/profile_replay.py): zero-filling a
        ``bytearray`` cost more than joblib's whole load, so large blobs go
        into a private anonymous mapping with huge pages (zeroed by the
        kernel, faulted in 2 MiB at a time, what numpy's allocator does), and
        are read in slices small enough to stay in cache.  numpy arrays built
        on either buffer are writable.
        """
        conn = self._conn()
        row = conn.execute("SELECT rowid, size FROM rssd_magic_blob WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            raise KeyError(digest)
        rowid, size = row
        out = _buffer(size)
        view = memoryview(out)
        verifier = Verifier(digest)
        try:
            with conn.blobopen("rssd_magic_blob", "data", rowid, readonly=True) as blob:
                for offset in range(0, size, READ_CHUNK):
                    chunk = blob.read(READ_CHUNK)
                    verifier.update(chunk)
                    view[offset : offset + len(chunk)] = chunk
        finally:
            view.release()
        verifier.check()
        return out

    def put_many(self, blobs: Iterable[Blob], conn: sqlite3.Connection | None = None) -> None:
        def put(c: sqlite3.Connection) -> None:
            for digest, data in blobs:
                c.execute(
                    """INSERT INTO rssd_magic_blob (digest, size, data) VALUES (?, ?, ?)
                       ON CONFLICT (digest) DO NOTHING""",
                    (digest, memoryview(data).nbytes, data),
                )

        if conn is not None:
            put(conn)
        else:
            with self._write() as c:
                put(c)

    def sizes(self) -> dict[str, int]:
        return dict(self._conn().execute("SELECT digest, size FROM rssd_magic_blob").fetchall())

    def delete(self, digests: Iterable[str]) -> int:
        with self._write() as c:
            before = c.total_changes
            c.executemany("DELETE FROM rssd_magic_blob WHERE digest = ?", [(d,) for d in digests])
            return c.total_changes - before


def _buffer(size: int) -> bytearray | mmap.mmap:
    """A writable, zero-initialised buffer of *size* bytes."""
    if size >= HUGE_BUFFER and hasattr(mmap, "MAP_PRIVATE"):
        out = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            out.madvise(mmap.MADV_HUGEPAGE)
        return out
    return bytearray(size)
