"""Blobs on a PostgreSQL server: content-addressed bytes in chunks.

A value is one ``rssd_magic_blob`` row (digest, size, chunk count) and its
bytes in ``rssd_magic_blob_chunk`` rows of :data:`CHUNK` bytes: a 200 MB
array is never one parameter, one ``bytea`` or one result.  Chunks are sent
as binary parameters and read back as a binary stream (single-row mode), each
copied once into the output buffer and hashed on the way, so a changed or
missing chunk is an IntegrityError, never a wrong value.

Blobs and :meth:`gc` exclude each other through a transaction-level advisory
lock (shared for writers, exclusive for gc): a run that found a blob already
stored, and so did not upload it, can't have it deleted under its record.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Iterator

import psycopg

from ..trust import IntegrityError, Verifier
from .base import Blob, StoreError
from .postgres_conn import cause
from .sqlite_blobs import _buffer

#: Bytes per chunk row: large enough that per-row costs vanish, small
#: enough to keep the server's and the driver's buffers small.
CHUNK = 4 << 20


def lock_key(schema: str) -> int:
    """The advisory lock (a signed 64-bit key) that blob writers and gc of
    one schema share."""
    return int.from_bytes(hashlib.sha256(f"rssd_magic.blobs:{schema}".encode()).digest()[:8], "big", signed=True)


class PgBlobs:
    """``rssd_magic_blob``: content-addressed bytes on the server."""

    def __init__(self, conn: Callable[[], psycopg.Connection], tx: Callable, schema: str, where: str, chunk: int = CHUNK):
        self._conn = conn  # the backend's live connection (reconnected when lost)
        self._tx = tx  # the backend's transaction runner (see PostgresBackend._tx)
        self.lock = lock_key(schema)
        self.where = where
        self.chunk = chunk

    def get(self, digest: str) -> Any:
        """Read a blob into one writable buffer, checking its digest on the way."""
        try:
            return self._get(digest)
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL {self.where}: {cause(exc)}") from None

    def _get(self, digest: str) -> Any:
        conn = self._conn()
        row = conn.execute("SELECT size, chunks FROM rssd_magic_blob WHERE digest = %s", (digest,)).fetchone()
        if row is None:
            raise KeyError(digest)
        size, chunks = int(row[0]), int(row[1])
        out = _buffer(size)
        view = memoryview(out)
        verifier = Verifier(digest)
        offset = n = 0
        try:
            for chunk in self.chunks(conn, digest):
                end = offset + len(chunk)
                if end > size:
                    raise IntegrityError(f"blob {digest[:24]}… has more bytes than its recorded size {size}")
                verifier.update(chunk)
                view[offset:end] = chunk
                offset, n = end, n + 1
        finally:
            view.release()
        if offset != size or n != chunks:
            raise IntegrityError(f"blob {digest[:24]}… is incomplete ({offset} of {size} bytes stored)")
        verifier.check()
        return out

    @staticmethod
    def chunks(conn: psycopg.Connection, digest: str) -> Iterator[bytes]:
        """The stored chunks of a blob, in order, as a binary stream (one row
        in the driver's memory at a time).  Not checked: callers verify."""
        with conn.cursor(binary=True) as cur:
            for (chunk,) in cur.stream("SELECT data FROM rssd_magic_blob_chunk WHERE digest = %s ORDER BY n", (digest,)):
                yield chunk

    def put_many(self, blobs: Iterable[Blob], conn: psycopg.Connection | None = None) -> None:
        """Store blobs (a digest already stored is skipped).  Inside the
        caller's transaction when *conn* is given, else one transaction each."""
        if conn is not None:
            for digest, data in blobs:
                self.put(conn, digest, data)
            return
        for digest, data in blobs:
            self._tx(lambda c, _retry, d=digest, b=data: self.put(c, d, b))

    def put(self, c: psycopg.Connection, digest: str, data: Any) -> bool:
        """One blob, in the transaction open on *c*; False when it was stored."""
        view = memoryview(data)
        if not view.c_contiguous:
            view = memoryview(bytes(view))
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        step = self.chunk
        return self.put_stream(c, digest, view.nbytes, (view[i : i + step] for i in range(0, view.nbytes, step)))

    def put_stream(self, c: psycopg.Connection, digest: str, size: int, chunks: Iterable[Any]) -> bool:
        """One blob from *chunks* (each :attr:`chunk` bytes, the last one
        shorter), in the transaction open on *c*; False when it was stored
        already.  Whatever *chunks* raises (a digest check) rolls it back
        with the caller's transaction."""
        c.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self.lock,))
        if c.execute("SELECT 1 FROM rssd_magic_blob WHERE digest = %s", (digest,)).fetchone():
            return False
        count = max(1, -(-size // self.chunk))
        # Waits for a concurrent writer of the same digest; when that one
        # commits there is nothing left to do.
        if not c.execute(
            """INSERT INTO rssd_magic_blob (digest, size, chunks) VALUES (%s, %s, %s)
               ON CONFLICT (digest) DO NOTHING RETURNING 1""",
            (digest, size, count),
        ).fetchone():
            return False
        written = n = 0
        with c.cursor() as cur:
            for n, chunk in enumerate(chunks):
                cur.execute("INSERT INTO rssd_magic_blob_chunk (digest, n, data) VALUES (%s, %s, %b)", (digest, n, chunk))
                written += memoryview(chunk).nbytes
            if size == 0:
                cur.execute("INSERT INTO rssd_magic_blob_chunk (digest, n, data) VALUES (%s, 0, %b)", (digest, b""))
        if written != size:
            raise ValueError(f"blob {digest[:24]}…: {written} bytes given for a size of {size}")
        return True

    def sizes(self) -> dict[str, int]:
        try:
            rows = self._conn().execute("SELECT digest, size FROM rssd_magic_blob").fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL {self.where}: {cause(exc)}") from None
        return {d: int(s) for d, s in rows}

    def delete(self, digests: Iterable[str]) -> int:
        wanted = list(digests)

        def tx(c: psycopg.Connection, _retry: bool) -> int:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock,))
            return c.execute("DELETE FROM rssd_magic_blob WHERE digest = ANY(%s)", (wanted,)).rowcount

        return self._tx(tx)
