"""The RSSD store: one SQLite connection per kernel and file, and every row we
read or write.

Design rules, each from a bug somebody else shipped:

* **Validate before touching.**  A path that is not SQLite, is read-only, sits
  in a missing folder or holds our tables with other columns is refused with
  an :class:`RSSDError` naming the file, before any byte of it changes
  (switching a file to WAL rewrites its header, so even that waits).
* **Short write transactions, WAL and a busy timeout** (``database is
  locked`` is jupyter-cache's best-known bug).  Every transition is one
  ``BEGIN IMMEDIATE … COMMIT``: a reader never sees half a run.
* **Append-only history.**  A cell's state is its latest transition; nothing
  we record is updated or deleted, and rows we did not write are never
  touched.
* **The hot path is one indexed query.**  Schema checks and session rows
  happen once, when the store opens.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import sqlite3
import stat
import sys
import time
from dataclasses import astuple, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from . import __version__
from .claims import DEFAULT_LEASE_S, Claim, Heartbeat, new_claim
from .ids import new_ulid
from .keys import CellKey
from .schema import EXPECTED_COLUMNS, OWN_DDL, SURVEILR_DDL, schema_problems
from .trust import Verifier

NATURE_ID = "rssd-magic-stateful-cell"
NATURE_LABEL = "Jupyter %%stateful cell (rssd_magic)"

INITIAL = "INITIAL"
RUNNING = "RUNNING"
EXECUTED = "EXECUTED"
FAILED = "FAILED"
INTERRUPTED = "INTERRUPTED"
ABANDONED = "ABANDONED"

#: surveilr's default RSSD file name, and the variable that overrides it.
DEFAULT_RSSD = "resource-surveillance.sqlite.db"
ENV_RSSD = "SURVEILR_STATEDB_FS_PATH"

SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 30_000
#: Blobs are read back in slices of this size, into one preallocated buffer:
#: large enough to amortise the call, small enough to stay in L2.
READ_CHUNK = 256 << 10
#: Blobs from this size up are read into huge-page mappings (see get_blob).
HUGE_BUFFER = 4 << 20
#: SQLite reads pages through a file mapping this large (no pread per page);
#: the -wal file is cut back to this size when it is reset.
MMAP_SIZE = 1 << 30
JOURNAL_SIZE_LIMIT = 64 << 20
#: Replay hit counts are written at most this often (seconds).
HIT_FLUSH_S = 5.0


class RSSDError(Exception):
    """The RSSD can't be used; the message names the file and the cause."""


def dumps(obj: Any) -> str:
    """Compact JSON as we store it (UTF-8 text, no NaN)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class Transition:
    """One row of ``orchestration_session_state`` for a cell."""

    state_id: str
    entry_id: str
    session_id: str
    from_state: str
    to_state: str
    result_json: str | None
    reason: str | None
    transitioned_at: str

    def result(self) -> dict:
        """The parsed ``transition_result`` (empty when there is none)."""
        return json.loads(self.result_json) if self.result_json else {}


@dataclass(frozen=True)
class ClaimOutcome:
    """What :meth:`Store.claim` decided: ``run``, ``done`` or ``held``."""

    kind: str
    previous: Transition | None
    running: Transition | None = None
    holder: Claim | None = None
    abandoned: Transition | None = None


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
        is not None
    )


def resolve_rssd(db: str | os.PathLike | None = None, configured: str | None = None) -> Path:
    """Which RSSD file: *db* (``--db``), then *configured* (the magic's
    ``rssd_path``), then ``$SURVEILR_STATEDB_FS_PATH``, then surveilr's default
    ``./resource-surveillance.sqlite.db``."""
    raw = db or configured or os.environ.get(ENV_RSSD) or DEFAULT_RSSD
    return Path(raw).expanduser().absolute()


def _read_header(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(100)


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
    return len(header) < 100 or _header_pages(header) * _header_page_size(header) > size


def _header_page_size(header: bytes) -> int:
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size


def _header_pages(header: bytes) -> int:
    """Pages the header says the file has (0 when that field isn't valid)."""
    change_counter, valid_for = header[24:28], header[92:96]
    return int.from_bytes(header[28:32], "big") if change_counter == valid_for else 0


def check_path(path: Path, readonly: bool = False) -> bool:
    """Refuse unusable paths before SQLite sees them; True when the file exists.

    Root passes ``os.access`` on a file with no write bits, so those bits are
    read too: a file its owner marked read-only is treated as read-only.
    """
    if not path.parent.is_dir():
        raise RSSDError(f"RSSD {path}: folder {path.parent} does not exist")
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise RSSDError(f"RSSD {path}: folder {path.parent} is read-only; cannot create the file")
        return False
    if not path.is_file():
        raise RSSDError(f"RSSD {path}: not a regular file")
    st = path.stat()
    if st.st_size:
        try:
            header = _read_header(path)
        except OSError as exc:
            raise RSSDError(f"RSSD {path}: cannot be read ({exc.strerror})") from None
        if not header.startswith(SQLITE_HEADER):
            raise RSSDError(f"RSSD {path}: not a SQLite database (wrong file header)")
        # A checkpoint by another connection can make a healthy file look
        # short for an instant: only a file that still looks short a moment
        # later is called truncated.
        if _looks_truncated(path) and (time.sleep(0.05) or _looks_truncated(path)):
            raise RSSDError(f"RSSD {path}: truncated (the file is shorter than its SQLite header says)")
    if readonly:
        return True
    if not os.access(path, os.W_OK) or not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise RSSDError(f"RSSD {path}: file is read-only")
    if not os.access(path.parent, os.W_OK):
        # WAL needs its -wal and -shm files beside the database.
        raise RSSDError(f"RSSD {path}: folder {path.parent} is read-only (SQLite needs it for WAL files)")
    return True


class Store:
    """An opened RSSD.  Use :meth:`open`; one instance per kernel and file."""

    def __init__(self, path: Path, conn: sqlite3.Connection, busy_timeout_s: float = BUSY_TIMEOUT_MS / 1000):
        self.path = path
        self.conn = conn
        self.busy_timeout_s = busy_timeout_s
        self.host = socket.gethostname()
        self.session_id: str | None = None
        self._pending_hits: dict[str, int] = {}
        self._hits_flushed = time.monotonic()
        self._beat: Heartbeat | None = None

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        session_args: dict | None = None,
        *,
        create: bool = True,
        readonly: bool = False,
        busy_timeout_s: float = BUSY_TIMEOUT_MS / 1000,
    ) -> "Store":
        """Open the RSSD at *path*, or raise RSSDError naming the cause.

        With *session_args*, an ``orchestration_session`` row is opened for
        this process (a kernel); without, writes open one on first need.
        ``create=False`` refuses a missing file (the CLI never creates one);
        ``readonly=True`` also refuses a file without our tables and never
        writes.
        """
        path = Path(path).expanduser().absolute()
        if not create and not path.exists():
            raise RSSDError(f"RSSD {path}: no such file")
        existed = check_path(path, readonly=readonly)
        try:
            conn = sqlite3.connect(
                f"file:{path}?mode={'ro' if readonly else 'rw' if existed else 'rwc'}",
                uri=True,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
                timeout=busy_timeout_s,
                cached_statements=64,
            )
        except sqlite3.Error as exc:
            raise RSSDError(f"RSSD {path}: cannot open ({exc})") from None
        try:
            problems = schema_problems(conn)  # reads only
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise RSSDError(f"RSSD {path}: not a usable SQLite database ({exc})") from None
        if problems:
            conn.close()
            raise RSSDError(f"RSSD {path}: incompatible schema: " + "; ".join(problems))
        if readonly:
            if not has_table(conn, "orchestration_session_state"):
                conn.close()
                raise RSSDError(f"RSSD {path}: not an RSSD (it has no orchestration_session_state table)")
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
            return cls(path, conn, busy_timeout_s)
        try:
            cls._configure(conn, busy_timeout_s)
            cls._ensure_schema(conn)
            store = cls(path, conn, busy_timeout_s)
            if session_args is not None:
                store.start_session(session_args)
            return store
        except sqlite3.Error as exc:
            conn.close()
            raise RSSDError(f"RSSD {path}: cannot be prepared ({exc})") from None

    @staticmethod
    def _configure(conn: sqlite3.Connection, busy_timeout_s: float) -> None:
        # surveilr's own settings, plus a busy timeout so a second writer
        # waits instead of failing.
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")

    @staticmethod
    def _ensure_schema(conn: sqlite3.Connection) -> None:
        have = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        wanted = set(EXPECTED_COLUMNS) | {"rssd_magic_entry_src_idx", "rssd_magic_state_entry_idx"}
        if wanted <= have:
            return  # the common case: no write lock taken just to open
        # executescript() commits any open transaction first; the explicit
        # BEGIN IMMEDIATE makes the whole DDL one atomic step.
        conn.executescript("BEGIN IMMEDIATE;\n" + SURVEILR_DDL + OWN_DDL + "\nCOMMIT;")

    def start_session(self, session_args: dict) -> str:
        """Open this process's ``orchestration_session`` (once) and return its id."""
        if self.session_id is not None:
            return self.session_id
        session_id = new_ulid()
        with self.transaction() as c:
            # surveilr's device upsert, without rewriting a row it wrote.
            c.execute(
                """INSERT INTO device (device_id, name, state, boundary)
                   VALUES (?, ?, '"SINGLETON"', 'UNKNOWN')
                   ON CONFLICT (name, state, boundary) DO NOTHING""",
                (new_ulid(), self.host),
            )
            (device_id,) = c.execute(
                """SELECT device_id FROM device
                   WHERE name = ? AND state = '"SINGLETON"' AND boundary = 'UNKNOWN'""",
                (self.host,),
            ).fetchone()
            c.execute(
                """INSERT INTO orchestration_nature (orchestration_nature_id, nature)
                   VALUES (?, ?) ON CONFLICT DO NOTHING""",
                (NATURE_ID, NATURE_LABEL),
            )
            c.execute(
                """INSERT INTO orchestration_session
                   (orchestration_session_id, device_id, orchestration_nature_id, version, args_json)
                   VALUES (?, ?, ?, ?, ?)""",
                (session_id, device_id, NATURE_ID, __version__, dumps(session_args)),
            )
        self.session_id = session_id
        return session_id

    def _session(self) -> str:
        return self.session_id or self.start_session({"process": {"pid": os.getpid(), "argv": sys.argv}})

    def close(self) -> None:
        """Mark this kernel's session finished and close the connection."""
        if self.conn is None:
            return
        if self._beat is not None:
            self._beat.stop()
        try:
            if self.session_id is not None:
                with self.transaction() as c:
                    self._flush_hits(c)
                    c.execute(
                        """UPDATE orchestration_session SET orch_finished_at = CURRENT_TIMESTAMP
                           WHERE orchestration_session_id = ?""",
                        (self.session_id,),
                    )
                self.conn.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass  # closing must never raise at interpreter exit
        finally:
            self.conn.close()
            self.conn = None

    # -- transactions ---------------------------------------------------------

    def transaction(self) -> "_Transaction":
        """``with store.transaction() as conn:`` — BEGIN IMMEDIATE … COMMIT."""
        return _Transaction(self.conn)

    # -- hits -----------------------------------------------------------------

    def note_hit(self, state_id: str) -> None:
        """Count a replay of *state_id*.  Counts are kept in memory and
        written with the next transaction, at close, or when HIT_FLUSH_S have
        passed: a replay does not pay for a synchronous write."""
        self._pending_hits[state_id] = self._pending_hits.get(state_id, 0) + 1
        now = time.monotonic()
        if now - self._hits_flushed > HIT_FLUSH_S:
            self._hits_flushed = now
            try:
                with self.transaction() as c:
                    self._flush_hits(c)
            except sqlite3.OperationalError:
                pass  # busy or read-only: keep counting, try again later

    def flush_hits(self) -> None:
        """Write the pending hit counts now (before reporting them)."""
        if self._pending_hits:
            with self.transaction() as c:
                self._flush_hits(c)

    def _flush_hits(self, c: sqlite3.Connection) -> None:
        if not self._pending_hits:
            return
        c.executemany(
            """INSERT INTO rssd_magic_hit (state_id, hits, last_hit_at) VALUES (?, ?, ?)
               ON CONFLICT (state_id) DO UPDATE
               SET hits = hits + excluded.hits, last_hit_at = excluded.last_hit_at""",
            [(sid, n, utc_now()) for sid, n in self._pending_hits.items()],
        )
        self._pending_hits.clear()

    # -- cell state -----------------------------------------------------------

    # The columns of a Transition, in its field order.
    _STATE = """
        SELECT s.orchestration_session_state_id, s.session_entry_id, s.session_id,
               s.from_state, s.to_state, s.transition_result, s.transition_reason,
               s.transitioned_at
        FROM orchestration_session_state AS s"""

    _LATEST_SQL = (
        _STATE
        + """
        WHERE s.session_entry_id IN (
            SELECT orchestration_session_entry_id FROM orchestration_session_entry
            WHERE ingest_src = ?)
        ORDER BY s.orchestration_session_state_id DESC
        LIMIT 1"""
    )

    def latest(self, key: CellKey, conn: sqlite3.Connection | None = None) -> Transition | None:
        """The cell's latest transition, or None if it never ran."""
        row = (conn or self.conn).execute(self._LATEST_SQL, (key.ingest_src,)).fetchone()
        return Transition(*row) if row else None

    def latest_variant(self, key: CellKey) -> Transition | None:
        """The latest EXECUTED run of the same code on other inputs (an index
        range over ``ingest_src``), to say why this one runs."""
        row = self.conn.execute(
            self._STATE
            + """
               WHERE s.session_entry_id IN (
                   SELECT orchestration_session_entry_id FROM orchestration_session_entry
                   WHERE ingest_src >= ? AND ingest_src < ? AND ingest_src != ?)
                 AND s.to_state = 'EXECUTED'
               ORDER BY s.orchestration_session_state_id DESC
               LIMIT 1""",
            (key.base_src, key.base_src + "\x7f", key.ingest_src),
        ).fetchone()
        return Transition(*row) if row else None

    def _entry_id(self, c: sqlite3.Connection, key: CellKey, source: str) -> str:
        row = c.execute(
            """SELECT orchestration_session_entry_id FROM orchestration_session_entry
               WHERE ingest_src = ? ORDER BY orchestration_session_entry_id LIMIT 1""",
            (key.ingest_src,),
        ).fetchone()
        if row:
            return row[0]
        entry_id = new_ulid()
        c.execute(
            """INSERT INTO orchestration_session_entry
               (orchestration_session_entry_id, session_id, ingest_src, elaboration)
               VALUES (?, ?, ?, ?)""",
            (
                entry_id,
                self.session_id,
                key.ingest_src,
                dumps(
                    {
                        "key": key.digest,
                        "code_key": key.base,
                        "inputs": key.inputs or None,
                        "scope": key.scope,
                        "kind": key.kind,
                        "name": key.name,
                        "source": source,
                    }
                ),
            ),
        )
        return entry_id

    def claim(
        self,
        key: CellKey,
        source: str,
        elaboration: dict,
        *,
        rerun_of: str | None = None,
        rerun_reason: str = "",
        lease_s: float = DEFAULT_LEASE_S,
        first_reason: str = "first run",
    ) -> ClaimOutcome:
        """Atomically decide, and record, who runs the cell now.

        In one ``BEGIN IMMEDIATE`` transaction (so exactly one kernel wins):

        * the latest transition is EXECUTED → ``done`` (replay it), unless it
          is *rerun_of*, the result the caller chose to run again (--force,
          a TTL) → ``run``;
        * it is RUNNING and its holder is alive → ``held`` (wait);
        * it is RUNNING and its holder is dead → record ``RUNNING →
          ABANDONED`` first, then run;
        * otherwise (never ran, FAILED, INTERRUPTED, …) → ``run``: a RUNNING
          transition and a claim row are written.
        """
        self._session()
        with self.transaction() as c:
            self._flush_hits(c)
            previous = self.latest(key, c)
            abandoned = None
            if previous is None:
                reason = first_reason
            elif previous.to_state == EXECUTED:
                if previous.state_id != rerun_of:
                    return ClaimOutcome("done", previous)
                reason = rerun_reason
            elif previous.to_state == RUNNING:
                holder = self.claim_of(previous, c)
                dead = holder.dead_because() if holder else "no holder is recorded for it"
                if dead is None:
                    return ClaimOutcome("held", previous, holder=holder)
                abandoned = previous = self._append(
                    c, previous.entry_id, RUNNING, ABANDONED, None, f"holder dead: {dead}", None
                )
                c.execute("DELETE FROM rssd_magic_claim WHERE entry_id = ?", (previous.entry_id,))
                reason = "takeover after ABANDONED"
            else:
                reason = f"retry after {previous.to_state}"
            entry_id = previous.entry_id if previous else self._entry_id(c, key, source)
            running = self._append(
                c, entry_id, previous.to_state if previous else INITIAL, RUNNING, None, reason, elaboration
            )
            claim = new_claim(entry_id, running.state_id, self.session_id, lease_s)
            c.execute(
                """INSERT INTO rssd_magic_claim VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (entry_id) DO UPDATE SET state_id = excluded.state_id,
                   session_id = excluded.session_id, host = excluded.host, pid = excluded.pid,
                   pid_started = excluded.pid_started, claimed_at = excluded.claimed_at,
                   heartbeat_at = excluded.heartbeat_at, lease_s = excluded.lease_s""",
                astuple(claim),
            )
        self._heartbeat().hold(running.state_id, lease_s)
        return ClaimOutcome("run", previous, running=running, abandoned=abandoned)

    def claim_of(self, running: Transition, conn: sqlite3.Connection | None = None) -> Claim | None:
        """Who holds a RUNNING transition (None if no claim row names it)."""
        row = (conn or self.conn).execute(
            "SELECT * FROM rssd_magic_claim WHERE entry_id = ? AND state_id = ?",
            (running.entry_id, running.state_id),
        ).fetchone()
        return Claim(*row) if row else None

    def _heartbeat(self) -> Heartbeat:
        if self._beat is None:
            self._beat = Heartbeat(self.path, self.busy_timeout_s)
        return self._beat

    def finish_run(
        self,
        running: Transition,
        to_state: str,
        result: dict | None,
        reason: str,
        blobs: Iterable[tuple[str, Any]] = (),
        signatures: Iterable[tuple[str, str, str]] = (),
    ) -> Transition:
        """Record how a run ended, with its blobs and their signatures, and
        release its claim: one transaction, so waiters see all of it at once."""
        result_json = dumps(result) if result is not None else None
        with self.transaction() as c:
            c.execute("DELETE FROM rssd_magic_claim WHERE state_id = ?", (running.state_id,))
            self.add_signatures(signatures, c)
            for digest, data in blobs:
                c.execute(
                    """INSERT INTO rssd_magic_blob (digest, size, data) VALUES (?, ?, ?)
                       ON CONFLICT (digest) DO NOTHING""",
                    (digest, memoryview(data).nbytes, data),
                )
            done = self._append(c, running.entry_id, RUNNING, to_state, result_json, reason, None)
        if self._beat is not None:
            self._beat.release(running.state_id)
        return done

    def append(
        self,
        entry_id: str,
        from_state: str,
        to_state: str,
        result: dict | None = None,
        reason: str | None = None,
        *,
        if_latest: str | None = None,
    ) -> Transition | None:
        """Append one transition to an entry (e.g. ``EXECUTED → FORGOTTEN``).

        With *if_latest*, only if that state id is still the entry's latest
        (checked inside the write transaction; None is returned otherwise), so
        a decision made on a read can't append after a newer run.
        """
        self._session()
        with self.transaction() as c:
            if if_latest is not None:
                row = c.execute(
                    """SELECT max(orchestration_session_state_id) FROM orchestration_session_state
                       WHERE session_entry_id = ?""",
                    (entry_id,),
                ).fetchone()
                if row[0] != if_latest:
                    return None
            return self._append(
                c, entry_id, from_state, to_state, dumps(result) if result is not None else None, reason, None
            )

    def _append(self, c, entry_id, from_state, to_state, result_json, reason, elaboration) -> Transition:
        state_id = new_ulid()
        at = utc_now()  # written explicitly, so the caller knows it without a re-read
        c.execute(
            """INSERT INTO orchestration_session_state
               (orchestration_session_state_id, session_id, session_entry_id, from_state,
                to_state, transition_result, transition_reason, transitioned_at, elaboration)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                state_id,
                self.session_id,
                entry_id,
                from_state,
                to_state,
                result_json,
                reason,
                at,
                dumps(elaboration) if elaboration is not None else None,
            ),
        )
        return Transition(state_id, entry_id, self.session_id, from_state, to_state, result_json, reason, at)

    # -- blobs ----------------------------------------------------------------

    def get_blob(self, digest: str) -> bytearray | mmap.mmap:
        """Read a blob into one writable buffer, checking its digest on the way.

        Measured on a 200 MB array (bench/profile_replay.py): zero-filling a
        ``bytearray`` cost more than joblib's whole load, so large blobs go
        into a private anonymous mapping with huge pages (zeroed by the
        kernel, faulted in 2 MiB at a time, what numpy's allocator does), and
        are read in slices small enough to stay in cache.  numpy arrays built
        on either buffer are writable.
        """
        row = self.conn.execute(
            "SELECT rowid, size FROM rssd_magic_blob WHERE digest = ?", (digest,)
        ).fetchone()
        if row is None:
            raise KeyError(digest)
        rowid, size = row
        out = _buffer(size)
        view = memoryview(out)
        verifier = Verifier(digest)
        try:
            with self.conn.blobopen("rssd_magic_blob", "data", rowid, readonly=True) as blob:
                for offset in range(0, size, READ_CHUNK):
                    chunk = blob.read(READ_CHUNK)
                    verifier.update(chunk)
                    view[offset : offset + len(chunk)] = chunk
        finally:
            view.release()
        verifier.check()
        return out

    # -- signatures -----------------------------------------------------------

    def signatures(self, key_id: str, payload_ids: Iterable[str]) -> dict[str, str]:
        """The signatures *key_id* made over *payload_ids* (missing ones absent)."""
        ids = list(payload_ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(
            f"SELECT payload_id, signature FROM rssd_magic_signature WHERE key_id = ? AND payload_id IN ({marks})",
            (key_id, *ids),
        )
        return dict(rows.fetchall())

    def add_signatures(self, rows: Iterable[tuple[str, str, str]], conn: sqlite3.Connection | None = None) -> None:
        """Record ``(payload_id, key_id, signature)`` rows (idempotent)."""
        (conn or self.conn).executemany(
            """INSERT INTO rssd_magic_signature (payload_id, key_id, signature) VALUES (?, ?, ?)
               ON CONFLICT (payload_id, key_id) DO UPDATE SET signature = excluded.signature""",
            list(rows),
        )


def _buffer(size: int) -> bytearray | mmap.mmap:
    """A writable, zero-initialised buffer of *size* bytes."""
    if size >= HUGE_BUFFER and hasattr(mmap, "MAP_PRIVATE"):
        out = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            out.madvise(mmap.MADV_HUGEPAGE)
        return out
    return bytearray(size)


def utc_now() -> str:
    """Now, in the text form of SQLite's CURRENT_TIMESTAMP (UTC, seconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


class _Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, etype, exc, tb) -> None:
        if etype is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
