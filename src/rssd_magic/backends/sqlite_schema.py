"""An RSSD file before we touch it: is it one we may use, and the tables we
need in it.

The ``orchestration_*`` and ``device`` DDL is surveilr's, verbatim
(``orchestration.sql`` beside this module is the project's
shared/rssd/orchestration.sql): those tables are only created when missing,
never altered.  Everything else is ours, prefixed ``rssd_magic_``, and
versioned in ``rssd_magic_meta`` so a later layout can migrate it.

A file is refused — with one line naming it and the cause, before a byte of
it changes — when it is not SQLite, is truncated, read-only, in a missing
folder, holds one of our tables with other columns, or lies on a network
filesystem (where WAL does not work and locks can't be trusted).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from importlib import resources
from pathlib import Path

#: surveilr's DDL, loaded from the packaged copy so there is one text of it.
SURVEILR_DDL = (resources.files(__package__) / "orchestration.sql").read_text("utf-8")

#: Version of our own objects (``rssd_magic_*``).  1: the first release
#: (claims judged by wall-clock leases).  2: claims carry a fencing token and
#: a heartbeat counter and describe their holder by boot id and PID namespace.
#: 3: values larger than a chunk are kept as several rows of ``blob_chunk``
#: (SQLite refuses a row over 1 GB); single-row blobs read as before.
SCHEMA_VERSION = 3

# Our own objects:
#   meta       our schema version (and later settings);
#   blob       large values as raw bytes, keyed by digest (stored once,
#              checked when read back); a value larger than a chunk has an
#              empty ``data`` here and its bytes in
#   blob_chunk, one row per chunk keyed by (digest, byte offset): each row
#              well under SQLite's length limit, reassembled on read;
#   claim      who runs a cell now: one row per entry, kept after release so
#              the fencing token keeps growing; mutable (heartbeats), hence
#              apart from the append-only history;
#   signature  HMACs of payloads, one row per payload and key (trust.py);
#   hit        replay counts per EXECUTED transition (a mutable counter).
# The indexes make the per-cell lookup a B-tree probe however many cells
# (ours or surveilr's) the file holds; an index on session_entry_id alone
# ends in the rowid, so "latest by store order" is a backwards index scan.
OWN_DDL = """
CREATE INDEX IF NOT EXISTS "rssd_magic_entry_src_idx"
    ON "orchestration_session_entry"("ingest_src");
CREATE INDEX IF NOT EXISTS "rssd_magic_state_entry_seq_idx"
    ON "orchestration_session_state"("session_entry_id");
CREATE TABLE IF NOT EXISTS "rssd_magic_meta" (
    "key" TEXT PRIMARY KEY NOT NULL,
    "value" TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS "rssd_magic_blob" (
    "digest" TEXT PRIMARY KEY NOT NULL,
    "size" INTEGER NOT NULL,
    "data" BLOB NOT NULL,
    "created_at" TIMESTAMPTZ DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS "rssd_magic_blob_chunk" (
    "digest" TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    "data" BLOB NOT NULL,
    PRIMARY KEY ("digest", "offset")
);
CREATE TABLE IF NOT EXISTS "rssd_magic_claim" (
    "entry_id" VARCHAR PRIMARY KEY NOT NULL,
    "state_id" VARCHAR,
    "token" INTEGER NOT NULL,
    "session_id" VARCHAR NOT NULL,
    "host" TEXT NOT NULL,
    "machine" TEXT NOT NULL,
    "boot" TEXT NOT NULL,
    "pidns" TEXT NOT NULL,
    "pid" INTEGER NOT NULL,
    "started" INTEGER NOT NULL,
    "beat" INTEGER NOT NULL,
    "lease_s" REAL NOT NULL,
    "claimed_at" TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS "rssd_magic_signature" (
    "payload_id" TEXT NOT NULL,
    "key_id" TEXT NOT NULL,
    "signature" TEXT NOT NULL,
    "created_at" TIMESTAMPTZ DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY ("payload_id", "key_id")
);
CREATE TABLE IF NOT EXISTS "rssd_magic_hit" (
    "state_id" VARCHAR PRIMARY KEY NOT NULL,
    "hits" INTEGER NOT NULL,
    "last_hit_at" TIMESTAMPTZ
);
"""

_V1_CLAIM = ["entry_id", "state_id", "session_id", "host", "pid", "pid_started", "claimed_at", "heartbeat_at", "lease_s"]
#: What version 1 had that version 2 replaces.
_V1_OBJECTS = ('DROP INDEX IF EXISTS "rssd_magic_state_entry_idx"', 'DROP TABLE IF EXISTS "rssd_magic_claim"')
#: Every object we create, to tell at open whether the DDL must run at all.
OWN_OBJECTS = {
    "rssd_magic_entry_src_idx",
    "rssd_magic_state_entry_seq_idx",
    "rssd_magic_meta",
    "rssd_magic_blob",
    "rssd_magic_blob_chunk",
    "rssd_magic_claim",
    "rssd_magic_signature",
    "rssd_magic_hit",
}


def statements(script: str) -> list[str]:
    """A DDL script as single statements (``Connection.execute`` runs one;
    ``executescript`` would commit the transaction they must run in)."""
    out, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    return [s for s in out if s.strip(" ;\n")]


_DDL = statements(SURVEILR_DDL + OWN_DDL)


def own_tables_as_temp() -> dict[str, str]:
    """``{table: CREATE TEMP TABLE …}`` for our tables (not indexes), for a
    read-only connection to a file that lacks them."""
    out = {}
    for statement in statements(OWN_DDL):
        if statement.startswith("CREATE TABLE"):
            table = statement.split('"')[1]
            out[table] = statement.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE", 1)
    return out


def _expected_columns() -> dict[str, list[tuple[str, str]]]:
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(SURVEILR_DDL + OWN_DDL)
        tables = [t for (t,) in mem.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: [(r[1], r[2]) for r in mem.execute(f'PRAGMA table_info("{t}")')] for t in tables}
    finally:
        mem.close()


#: The columns we read or write, per table, in declared order.  An existing
#: table must have exactly these (name and declared type) or we refuse it.
EXPECTED_COLUMNS = _expected_columns()


def schema_problems(conn: sqlite3.Connection) -> list[str]:
    """Describe every table of ours that exists in *conn* with another shape
    (missing tables get created; older shapes of our own get migrated)."""
    problems = []
    for table, expected in EXPECTED_COLUMNS.items():
        actual = [(row[1], row[2]) for row in conn.execute(f'PRAGMA table_info("{table}")')]
        if not actual or actual == expected:
            continue
        if table == "rssd_magic_claim" and [n for n, _ in actual] == _V1_CLAIM:
            continue  # version 1 of our own table: migrated on open
        want = ", ".join(f"{n} {t}" for n, t in expected)
        got = ", ".join(f"{n} {t}" for n, t in actual)
        problems.append(f"table {table} has columns ({got}); expected ({want})")
    return problems


def needs_ddl(conn: sqlite3.Connection) -> bool:
    """True when a table or index is missing or ours is of an older version
    (the common case, a prepared file, takes no write lock to open)."""
    have = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    if not (set(EXPECTED_COLUMNS) | OWN_OBJECTS) <= have:
        return True
    row = conn.execute("SELECT value FROM rssd_magic_meta WHERE key = 'schema_version'").fetchone()
    return row is None or row[0] != str(SCHEMA_VERSION)


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create what is missing and migrate our own objects: one transaction,
    decided inside the write lock (another kernel may be doing the same)."""
    if not needs_ddl(conn):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if needs_ddl(conn):
            claim = [row[1] for row in conn.execute('PRAGMA table_info("rssd_magic_claim")')]
            if claim == _V1_CLAIM:
                for statement in _V1_OBJECTS:
                    conn.execute(statement)
            for statement in _DDL:
                conn.execute(statement)
            conn.execute(
                """INSERT INTO rssd_magic_meta (key, value) VALUES ('schema_version', ?)
                   ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
                (str(SCHEMA_VERSION),),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# -- the file itself ---------------------------------------------------------------

SQLITE_HEADER = b"SQLite format 3\x00"


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


def check_path(path: Path, readonly: bool = False) -> bool:
    """Refuse unusable paths before SQLite sees them (ValueError naming the
    cause); True when the file exists.

    Root passes ``os.access`` on a file with no write bits, so those bits are
    read too: a file its owner marked read-only is treated as read-only.
    """
    if not path.parent.is_dir():
        raise ValueError(f"folder {path.parent} does not exist")
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise ValueError(f"folder {path.parent} is read-only; cannot create the file")
        return False
    if not path.is_file():
        raise ValueError("not a regular file")
    st = path.stat()
    if st.st_size:
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
    if readonly:
        return True
    if not os.access(path, os.W_OK) or not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError("file is read-only")
    if not os.access(path.parent, os.W_OK):
        # WAL needs its -wal and -shm files beside the database.
        raise ValueError(f"folder {path.parent} is read-only (SQLite needs it for WAL files)")
    return True


# -- network filesystems ---------------------------------------------------------------

#: Filesystem types whose locking SQLite can't rely on, and where WAL's
#: shared memory does not work (SQLite's own documentation).
NETWORK_FS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs",
        "beegfs", "ocfs2", "gfs2", "davfs", "fuse.sshfs", "sshfs", "fuse.glusterfs", "fuse.rclone",
        "fuse.s3fs", "fuse.gcsfuse", "fuse.davfs2", "fuse.cephfs", "fuse.juicefs", "fuse.goofys",
    }
)  # fmt: skip
#: Where the mount table is read from (the tests point it at a fixture).
MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_of(path: Path) -> tuple[str, str] | None:
    """``(fstype, mount point)`` of the filesystem holding *path*, from the
    mount table; None where there is no Linux mount table to read."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)  # symlinks resolved as far as they exist
    best: tuple[str, str] | None = None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount = _unescape(fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        # Later lines win for the same mount point (mounted over).
        if inside and (best is None or len(mount) >= len(best[1])):
            best = (right.split()[0], mount)
    return best


def network_filesystem(path: Path) -> tuple[str, str] | None:
    """``(fstype, mount point)`` when *path* lies on a network filesystem."""
    found = filesystem_of(path)
    if found is not None and found[0].lower() in NETWORK_FS:
        return found
    return None
