"""Blobs on a PostgreSQL server: content-addressed bytes in chunks.

A value is one ``rssd_magic_blob`` row (digest, size, chunk count) and its
bytes in ``rssd_magic_blob_chunk`` rows of :data:`CHUNK` bytes: a 200 MB
array is never one parameter, one ``bytea`` or one result.  Chunks are sent
as binary parameters and read back as a binary stream (single-row mode), each
copied once into the output buffer and hashed on the way, so a changed or
missing chunk is an IntegrityError, never a wrong value.

Large blobs are also kept in a cache on this machine (:class:`LocalCache`):
a server reassembles a value from 2 KB TOAST pieces and sends it through a
socket, several times slower than reading a local file (bench_postgres.py,
figure p3), and a digest names its bytes forever, so a copy can't go stale.
The server still says whether the blob exists; the copy is checked against
the digest on every read and dropped when it does not match.

Blobs and :meth:`gc` exclude each other through a transaction-level advisory
lock (shared for writers, exclusive for gc): a run that found a blob already
stored, and so did not upload it, can't have it deleted under its record.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import psycopg

from ..digests import KNOWN
from ..trust import IntegrityError, Verifier
from .base import Blob, StoreError
from .postgres_conn import cause
from .sqlite_blobs import _buffer

#: Bytes per chunk row: large enough that per-row costs vanish, small
#: enough to keep the server's and the driver's buffers small.
CHUNK = 4 << 20
#: Blobs from this size up are kept in the local cache.
CACHE_MIN = 1 << 20
#: ``$RSSD_MAGIC_BLOB_CACHE``: the cache's folder, or ``off``; and its size cap.
ENV_CACHE = "RSSD_MAGIC_BLOB_CACHE"
ENV_CACHE_BYTES = "RSSD_MAGIC_BLOB_CACHE_BYTES"
CACHE_BYTES = 4 << 30
_HEX = frozenset("0123456789abcdef")


class LocalCache:
    """Verified copies of large blobs in a folder of this machine, by digest,
    least recently read evicted past a size cap."""

    def __init__(self, root: Path, limit: int = CACHE_BYTES):
        self.root = root
        self.limit = limit

    @classmethod
    def from_env(cls) -> "LocalCache | None":
        where = os.environ.get(ENV_CACHE)
        if where is not None and where.strip().lower() in ("", "0", "off", "no", "none"):
            return None
        if where:
            root = Path(where).expanduser()
        else:
            root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rssd_magic" / "blobs"
        try:
            limit = int(os.environ.get(ENV_CACHE_BYTES, CACHE_BYTES))
        except ValueError:
            limit = CACHE_BYTES
        return cls(root, limit)

    def path(self, digest: str) -> Path | None:
        """Where *digest* is kept; None for a digest that is not a plain
        algorithm and hex (it names a file: nothing else may get in)."""
        algo, _, hexd = digest.partition(":")
        if algo not in KNOWN or len(hexd) < 16 or not set(hexd) <= _HEX:
            return None
        return self.root / algo / hexd[:2] / hexd

    def read(self, digest: str, size: int) -> Any:
        """The blob, checked, or None (not here, or not what it should be:
        then the copy is deleted)."""
        path = self.path(digest)
        if path is None:
            return None
        try:
            fh = open(path, "rb")
        except OSError:
            return None
        with fh:
            try:
                if os.fstat(fh.fileno()).st_size != size:
                    raise IntegrityError("size")
                out = _buffer(size)
                view = memoryview(out)
                verifier = Verifier(digest)
                try:
                    for offset in range(0, size, CHUNK):
                        part = view[offset : offset + CHUNK]
                        if fh.readinto(part) != len(part):
                            raise IntegrityError("short read")
                        verifier.update(part)
                finally:
                    view.release()
                verifier.check()
            except (IntegrityError, OSError):
                _unlink(path)
                return None
        try:
            os.utime(path)  # most recently read: evicted last
        except OSError:
            pass
        return out

    def write(self, digest: str, data: Any) -> None:
        """Keep a copy (atomically: a reader sees all of it or nothing);
        best effort, since the server has the blob anyway."""
        path = self.path(digest)
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(tmp, "wb") as fh:
                fh.write(memoryview(data))
            os.replace(tmp, path)
            self._evict()
        except OSError:
            _unlink(tmp)

    def _evict(self) -> None:
        files = []
        for p in self.root.glob("*/*/*"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.limit:
                break
            _unlink(p)
            total -= size


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


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
        self.cache = LocalCache.from_env()

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
        cached = size >= CACHE_MIN and self.cache is not None
        if cached:
            out = self.cache.read(digest, size)
            if out is not None:
                return out
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
        if cached:
            self.cache.write(digest, out)
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
