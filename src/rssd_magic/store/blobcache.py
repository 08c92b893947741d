"""Verified copies of large blobs on this machine, for stores whose bytes
live elsewhere (a PostgreSQL server, an object store).

A server reassembles a value from 2 KB TOAST pieces and sends it through a
socket, several times slower than reading a local file (bench_postgres.py,
figure p3), and a digest names its bytes forever, so a copy can't go stale.
The store still says whether the blob exists; the copy is checked against
the digest on every read and dropped when it does not match.  The cache
opens regular files of this user only (never through a symlink, never a
FIFO that would block), and checks the file's size before allocating.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path
from typing import Any

from ..records.digests import KNOWN
from ..records.trust import IntegrityError, Verifier
from .blobs import buffer

#: ``$RSSD_MAGIC_BLOB_CACHE``: the cache's folder, or ``off``; and its size cap.
ENV_CACHE = "RSSD_MAGIC_BLOB_CACHE"
ENV_CACHE_BYTES = "RSSD_MAGIC_BLOB_CACHE_BYTES"
CACHE_BYTES = 4 << 30
#: Bytes read (and hashed) at a time.
CHUNK = 4 << 20
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
        then the copy is deleted).  Only a regular file of this user is
        read, and only when it has *size* bytes."""
        path = self.path(digest)
        if path is None:
            return None
        try:
            # O_NONBLOCK: a FIFO planted here opens at once (and is refused below).
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: never followed
                _unlink(path)
            return None
        with os.fdopen(fd, "rb", buffering=0) as fh:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                    raise IntegrityError("not a regular file of this user")
                if st.st_size != size:
                    raise IntegrityError("size")
                out = buffer(size)
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
            os.utime(path, follow_symlinks=False)  # most recently read: evicted last
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
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
            with os.fdopen(os.open(tmp, flags, 0o600), "wb") as fh:
                fh.write(memoryview(data))
            os.replace(tmp, path)
            self._evict()
        except OSError:
            _unlink(tmp)

    def _evict(self) -> None:
        files = []
        for p in self.root.glob("*/*/*"):
            try:
                st = p.lstat()
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
