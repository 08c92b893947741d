"""An RSSD as a file on disk: may it be used, how it is opened, whether the
path still names the file a kernel has open, and who holds its write lock.

A file is refused — with one line naming it and the cause, before a byte of
it changes — when it is not SQLite, is truncated, sits in a missing folder,
or lies on a network filesystem (where WAL does not work and locks can't be
trusted).  A file this process may read but not write (a read-only mount, a
folder or file without write permission: a published report) is opened
read-only instead of refused: it replays, and only a cell that must run is
refused.

**Identity.**  A running kernel keeps its connection while people delete
the file, or a teammate's RSSD arrives under the same name (``git pull``,
rsync: a new file renamed over the old).  The kernel's connection still
points at the old inode, so everything it wrote would go nowhere, and its
WAL, whose frames carry no file identity, could be applied to the newcomer.
:class:`Identity` (device and inode, one ``stat``) is compared before every
transaction; the backend reopens what the path names now.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from ..engine.claims import command_line

SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True)
class Identity:
    """Which file a path named when it was opened."""

    dev: int
    ino: int


def identity(path: Path) -> Identity | None:
    """The identity of the file at *path* now (None when there is none)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Identity(st.st_dev, st.st_ino)


@dataclass(frozen=True)
class Access:
    """How a path will be opened: ``existed`` (a file is there),
    ``read_only`` — None to read and write, else why we won't write — and
    ``writable``: whether this process could (a store opened read-only where
    it could write is still opened read-write, so SQLite removes its -wal
    and -shm files at close: a look leaves nothing behind)."""

    existed: bool
    read_only: str | None = None
    writable: bool = True
    #: An empty file: it becomes a new RSSD, as a missing one does.
    empty: bool = False


def _looks_truncated(path: Path) -> bool:
    """True when the file is shorter than the page count in its header.

    With a live -wal file the header may run ahead of the file (a checkpoint
    writes page 1 first) and SQLite sizes the database from the WAL, so only
    a file without one is judged.  The WAL is looked at first and the size
    last, so a checkpoint finishing in between can't fake a short file.
    """
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return False
    with open(path, "rb") as fh:
        header = fh.read(100)
        size = os.fstat(fh.fileno()).st_size
    if len(header) < 100:
        return True
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    change_counter, valid_for = header[24:28], header[92:96]
    pages = int.from_bytes(header[28:32], "big") if change_counter == valid_for else 0
    return pages * page_size > size


def _writable(path: Path) -> bool:
    """True when this process may write *path*.  ``os.access`` answers for
    read-only mounts (EROFS) even as root; root passes it on a file with no
    write bits, so those bits are read too: a file its owner marked
    read-only is treated as read-only."""
    if not os.access(path, os.W_OK):
        return False
    return path.is_dir() or bool(path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def check_path(path: Path, readonly: bool = False) -> Access:
    """Refuse unusable paths before SQLite sees them (ValueError naming the
    cause); else how the path can be opened."""
    if not path.parent.is_dir():
        raise ValueError(f"folder {path.parent} does not exist")
    if not path.exists():
        if not readonly and not _writable(path.parent):
            raise ValueError(f"folder {path.parent} is read-only; cannot create the file")
        return Access(existed=False)
    if not path.is_file():
        raise ValueError("not a regular file")
    if path.stat().st_size:
        try:
            with open(path, "rb") as fh:
                header = fh.read(100)
        except OSError as exc:
            raise ValueError(f"cannot be read ({exc.strerror})") from None
        if not header.startswith(SQLITE_HEADER):
            raise ValueError("not a SQLite database (wrong file header)")
        # A checkpoint by another connection can make a healthy file look
        # short for an instant: only a file that still looks short a moment
        # later is called truncated.
        if _looks_truncated(path) and (time.sleep(0.05) or _looks_truncated(path)):
            raise ValueError("truncated (the file is shorter than its SQLite header says)")
    empty = path.stat().st_size == 0
    if not _writable(path):
        return Access(existed=True, read_only="the file is read-only", writable=False, empty=empty)
    if not _writable(path.parent):
        # WAL needs its -wal and -shm files beside the database.
        return Access(existed=True, read_only=f"its folder {path.parent} is read-only", writable=False, empty=empty)
    return Access(existed=True, read_only="opened read-only" if readonly else None, empty=empty)


@contextmanager
def pragmas(conn: sqlite3.Connection, **settings: int) -> Iterator[None]:
    """Per-connection PRAGMAs for the length of a ``with`` block, put back after."""
    before = {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in settings}
    for name, value in settings.items():
        conn.execute(f"PRAGMA {name} = {int(value)}")
    try:
        yield
    finally:
        for name, value in before.items():
            conn.execute(f"PRAGMA {name} = {int(value)}")


def uri(path: Path, mode: str, immutable: bool = False) -> str:
    """A ``file:`` URI for *path* (``?``, ``#`` and ``%`` in a name escaped)."""
    return f"file:{quote(str(path), safe='/')}?mode={mode}" + ("&immutable=1" if immutable else "")


def connect(path: Path, access: Access, timeout: float) -> sqlite3.Connection:
    """A connection to *path* as *access* allows (sqlite3.Error when SQLite
    can't open it).

    A WAL database can only be read where its ``-shm`` file exists or can be
    made.  In a folder nobody may write (a read-only mount, a published
    report) there is none, and nobody can be writing the file either (a
    writer would need that folder): then it is opened as immutable, which
    reads the file as it is without any lock or side file.
    """

    def open_(mode: str, immutable: bool = False) -> sqlite3.Connection:
        return sqlite3.connect(
            uri(path, mode, immutable),
            uri=True,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,
            timeout=timeout,
            cached_statements=64,
        )

    if access.writable:
        return open_("rw" if access.existed else "rwc")
    conn = open_("ro")
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        side = [path.with_name(path.name + s) for s in ("-wal", "-shm")]
        if _writable(path.parent) or any(p.exists() for p in side):
            raise
    return open_("ro", immutable=True)


# -- who holds the write lock ---------------------------------------------------------

#: Where SQLite's unix VFS takes a writer's lock: in WAL mode, byte 120 of
#: the -shm file (WAL_WRITE_LOCK); in rollback mode, the RESERVED byte of
#: the database file (PENDING_BYTE + 1).
_WAL_WRITE_BYTE = 120
_RESERVED_BYTE = 0x40000001
LOCKS = "/proc/locks"


def lock_holder(path: Path) -> str | None:
    """``pid N (command line)`` of another process holding *path*'s write
    lock, read from the kernel's lock table; None where it can't be told."""
    wanted = []
    for file, byte in ((path.with_name(path.name + "-shm"), _WAL_WRITE_BYTE), (path, _RESERVED_BYTE)):
        try:
            st = os.stat(file)
        except OSError:
            continue
        wanted.append((f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}", byte))
    try:
        with open(LOCKS, encoding="ascii", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        try:
            kind, pid, where, start, end = fields[3], int(fields[4]), fields[5], fields[6], fields[7]
        except (IndexError, ValueError):
            continue
        if kind != "WRITE" or pid in (0, os.getpid()):
            continue
        for file_id, byte in wanted:
            if where == file_id and int(start) <= byte <= (int(end) if end != "EOF" else byte):
                return f"pid {pid}" + (f" ({command_line(pid)})" if command_line(pid) else "")
    return None
