"""A what-if for figure c: the blob reader this folder's measurements argue
for, installed at run time over ``Store.get_blob`` (nothing in src/ changes).

Three changes against the current ``Store.get_blob``:

1. the destination is a private anonymous ``mmap`` with ``MADV_HUGEPAGE``
   for blobs of 4 MiB and more, not ``bytearray(size)``: the kernel hands out
   zeroed pages (no memset pass) and faults them in 2 MiB at a time instead of
   4 KiB (numpy's allocator does the same madvise: it's what joblib gets);
   still writable, so numpy arrays built on it stay writable;
2. ``Blob.read`` in 256 KiB slices, not 8 MiB: an 8 MiB temporary ``bytes``
   is a fresh mmap'd allocation each time (page faults again) and does not
   stay in cache; 256 KiB comes from the heap and stays in L2;
3. ``PRAGMA mmap_size`` on the connection, so SQLite copies pages straight
   out of the file mapping instead of one ``pread`` per 4 KiB page.

Used by ``bench_replay.py --proposed``; see blob_read_variants.py for each
change timed on its own.
"""

from __future__ import annotations

import mmap
import sqlite3

HUGE_MIN = 4 << 20
CHUNK = 256 << 10
MMAP_SIZE = 1 << 30


def buffer(size: int):
    """A writable, zero-initialised buffer of *size* bytes."""
    if size >= HUGE_MIN and hasattr(mmap, "MAP_PRIVATE"):
        out = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            out.madvise(mmap.MADV_HUGEPAGE)
        return out
    return bytearray(size)


def get_blob(self, digest: str):
    """Drop-in for ``Store.get_blob`` (same query, same integrity check)."""
    row = self.conn.execute("SELECT rowid, size FROM rssd_magic_blob WHERE digest = ?", (digest,)).fetchone()
    if row is None:
        raise KeyError(digest)
    rowid, size = row
    out = buffer(size)
    view = memoryview(out)
    with self.conn.blobopen("rssd_magic_blob", "data", rowid, readonly=True) as blob:
        for offset in range(0, size, CHUNK):
            view[offset : offset + CHUNK] = blob.read(CHUNK)
    view.release()
    try:
        from rssd_magic.trust import verify
    except ImportError:
        verify = None
    if verify is not None:
        verify(digest, out)
    return out


def set_mmap(conn: sqlite3.Connection, on: bool) -> None:
    conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE if on else 0}")
