"""The state store in a surveilr RSSD: one SQLite file, WAL, short writes.

This module is the only code that opens an RSSD for the state or writes SQL
against it.  Design rules, each from a bug somebody shipped:

* **Validate before touching** (sqlite_schema.py): a file we must refuse is
  left byte-identical (switching to WAL rewrites the header, so even that
  waits).
* **Short write transactions, WAL and a busy timeout** (``database is
  locked`` is jupyter-cache's best-known bug).  Every write is one
  ``BEGIN IMMEDIATE … COMMIT``: a reader never sees half a run.
* **Order by rowid.**  A cell's latest transition is the one inserted last
  (rowid), never the greatest ULID: a ULID carries its writer's clock, and
  a host whose clock runs a day ahead must not win for a day.
* **Append-only history**, and rows we did not write are never touched.
* **The hot path is one indexed query**; schema checks and the session row
  happen once, when the store opens.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..canonical import dumps, utc_now
from ..ids import new_ulid
from ..keys import CellKey
from ..lifecycle import ABANDONED, INITIAL, RUNNING
from . import sqlite_reports
from .base import (
    Blob,
    CellRow,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    ExecRow,
    Fenced,
    HistoryRow,
    Holder,
    StorageStats,
    StoreError,
    Transition,
    executed_results,
    judge_claim,
)
from .sqlite_blobs import SqliteBlobs, checkpoint
from .sqlite_schema import (
    check_path,
    ensure_schema,
    network_filesystem,
    own_tables_as_temp,
    schema_problems,
)
from .sqlite_sessions import SqliteRenewer, SqliteSessions

BUSY_TIMEOUT_S = 30.0
#: SQLite reads pages through a file mapping this large (no pread per page,
#: which costs 2x joblib's load on a large value: bench/blob_read_variants.py).
#: SQLite caps it at its compile-time maximum (2 GiB in common builds); pages
#: past it are read one pread at a time.
MMAP_SIZE = 1 << 31
#: The -wal file is cut back to this size when it is reset.
JOURNAL_SIZE_LIMIT = 64 << 20
#: Replay hit counts are written at most this often (seconds).
HIT_FLUSH_S = 5.0


def _src_range(prefix: str) -> tuple[str, str]:
    """``[lo, hi)`` covering every string that starts with *prefix*: a range,
    unlike LIKE, is answered by the ingest_src index."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


class SqliteBackend(SqliteSessions):
    """An opened RSSD.  Use :meth:`open`; one instance per kernel and file."""

    scheme = "file"

    def __init__(self, path: Path, conn: sqlite3.Connection, busy_timeout_s: float, notice: str | None = None):
        self.path = path
        self.location = str(path)
        self.conn = conn
        self.busy_timeout_s = busy_timeout_s
        #: One line to say once (e.g. a rollback journal on a network filesystem).
        self.notice = notice
        self.host = socket.gethostname()
        self.session_id: str | None = None
        self.blobs = SqliteBlobs(lambda: self.conn, self._write)
        self._pending_hits: dict[str, int] = {}
        self._hits_flushed = time.monotonic()
        self._user_sql: sqlite3.Connection | None = None

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        location: str | os.PathLike,
        *,
        session_args: dict | None = None,
        create: bool = True,
        readonly: bool = False,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        allow_network_fs: bool = False,
    ) -> "SqliteBackend":
        """Open the RSSD at *location*, or raise StoreError naming the cause.

        With *session_args*, an ``orchestration_session`` row is opened for
        this process (a kernel); without, writes open one on first need.
        ``create=False`` refuses a missing file (the CLI never creates one);
        ``readonly=True`` also refuses a file without our tables and never
        writes.  A file on a network filesystem is refused unless
        *allow_network_fs*, which uses a rollback journal instead of WAL.
        """
        path = Path(location).expanduser().absolute()
        if not create and not path.exists():
            raise StoreError(f"RSSD {path}: no such file")
        journal, notice = "WAL", None
        remote = network_filesystem(path)
        if remote is not None:
            fstype, mount = remote
            if not allow_network_fs:
                raise StoreError(
                    f"RSSD {path}: on a network filesystem ({fstype} at {mount}), where SQLite's WAL does not "
                    "work and file locks can't be trusted; share state between hosts through a PostgreSQL server "
                    "(--db postgresql://…), or set StatefulMagics.allow_network_fs = True to use the file with a "
                    "rollback journal (one host at a time)"
                )
            journal = "DELETE"
            notice = f"RSSD {path} is on a network filesystem ({fstype}): using a rollback journal instead of WAL"
        try:
            existed = check_path(path, readonly=readonly)
        except ValueError as exc:
            raise StoreError(f"RSSD {path}: {exc}") from None
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
            raise StoreError(f"RSSD {path}: cannot open ({exc})") from None
        try:
            problems = schema_problems(conn)  # reads only
            if problems:
                raise StoreError(f"RSSD {path}: incompatible schema: " + "; ".join(problems))
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
            if readonly:
                if not _has_table(conn, "orchestration_session_state"):
                    raise StoreError(f"RSSD {path}: not an RSSD (it has no orchestration_session_state table)")
                # An RSSD surveilr made may not have our tables yet: empty
                # stand-ins in the connection's own temp schema (the file
                # is not written) keep every report query the same.
                for table, statement in own_tables_as_temp().items():
                    if not _has_table(conn, table):  # a temp table would shadow the file's own
                        conn.execute(statement)
                return cls(path, conn, busy_timeout_s)
            # surveilr's own settings, plus a busy timeout so a second
            # writer waits instead of failing.
            conn.execute(f"PRAGMA journal_mode = {journal}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            ensure_schema(conn)
            backend = cls(path, conn, busy_timeout_s, notice)
            if session_args is not None:
                backend.start_session(session_args)
            return backend
        except StoreError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"RSSD {path}: not a usable SQLite database ({exc})") from None

    def close(self, *, failed: bool = False) -> None:
        if self.conn is None:
            return
        try:
            if self._user_sql is not None:
                self._user_sql.close()
            if self.session_id is not None:
                with self._write() as c:
                    self._flush_hits(c)
                    why = "a cell failed in this kernel" if failed else "kernel shut down"
                    self._end_session(c, self.session_id, failed, why)
                self.conn.execute("PRAGMA optimize")
        except (sqlite3.Error, StoreError):
            pass  # closing must never raise at interpreter exit
        finally:
            self.conn.close()
            self.conn = None

    def wait_for_change(self, timeout: float) -> None:
        time.sleep(timeout)  # SQLite can't tell another process's commit: poll

    # -- transactions --------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE … COMMIT``; driver errors become StoreError."""
        conn = self.conn
        if conn is None:
            raise StoreError(f"RSSD {self.path}: closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"RSSD {self.path}: {_what(exc)}") from None

    # -- the hot path ----------------------------------------------------------------

    # The columns of a Transition, in its field order.
    _STATE = """
        SELECT s.orchestration_session_state_id, s.session_entry_id, s.session_id,
               s.from_state, s.to_state, s.transition_result, s.transition_reason,
               s.transitioned_at, s.rowid
        FROM orchestration_session_state AS s"""
    _LATEST = (
        _STATE
        + """
        WHERE s.session_entry_id IN (
            SELECT orchestration_session_entry_id FROM orchestration_session_entry WHERE ingest_src = ?)
        ORDER BY s.rowid DESC LIMIT 1"""
    )

    def latest(self, key: CellKey) -> Transition | None:
        try:
            row = self.conn.execute(self._LATEST, (key.ingest_src,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"RSSD {self.path}: {_what(exc)}") from None
        return Transition(*row) if row else None

    def latest_variant(self, key: CellKey) -> Transition | None:
        lo, hi = _src_range(key.base_src)
        row = self.conn.execute(
            self._STATE
            + """
               WHERE s.session_entry_id IN (
                   SELECT orchestration_session_entry_id FROM orchestration_session_entry
                   WHERE ingest_src >= ? AND ingest_src < ? AND ingest_src != ?)
                 AND s.to_state = 'EXECUTED'
               ORDER BY s.rowid DESC LIMIT 1""",
            (lo, hi, key.ingest_src),
        ).fetchone()
        return Transition(*row) if row else None

    def note_hit(self, state_id: str) -> None:
        # Counted in memory and written with the next transaction, at close,
        # or when HIT_FLUSH_S have passed: a replay pays for no write.
        self._pending_hits[state_id] = self._pending_hits.get(state_id, 0) + 1
        now = time.monotonic()
        if now - self._hits_flushed > HIT_FLUSH_S:
            self._hits_flushed = now
            try:
                self.flush_hits()
            except StoreError:
                pass  # busy or read-only: keep counting, try again later

    def flush_hits(self) -> None:
        if self._pending_hits:
            with self._write() as c:
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

    # -- claims ----------------------------------------------------------------------

    _CLAIM = """SELECT entry_id, state_id, token, session_id, host, machine, boot, pidns, pid, started,
                       beat, lease_s, claimed_at FROM rssd_magic_claim"""

    def claim(self, request: ClaimRequest) -> ClaimOutcome:
        self._session()
        key = request.key
        with self._write() as c:
            self._flush_hits(c)
            row = c.execute(self._LATEST, (key.ingest_src,)).fetchone()
            previous = Transition(*row) if row else None
            verdict = judge_claim(request, previous, lambda: self._claim_of(c, previous))
            if verdict.kind != "run":
                return ClaimOutcome(verdict.kind, previous, claim=verdict.held)
            abandoned = None
            if verdict.abandon is not None:
                abandoned = previous = self._append(
                    c, previous.entry_id, RUNNING, ABANDONED, None, verdict.abandon, None
                )
            entry_id = previous.entry_id if previous else self._entry_id(c, key, request.source)
            running = self._append(
                c, entry_id, previous.to_state if previous else INITIAL, RUNNING, None, verdict.reason, request.elaboration
            )
            (token,) = c.execute(
                """SELECT coalesce(max(token), 0) + 1 FROM rssd_magic_claim WHERE entry_id IN (
                       SELECT orchestration_session_entry_id FROM orchestration_session_entry WHERE ingest_src = ?)""",
                (key.ingest_src,),
            ).fetchone()
            h = request.holder
            claimed_at = utc_now()
            c.execute(
                """INSERT INTO rssd_magic_claim VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)
                   ON CONFLICT (entry_id) DO UPDATE SET state_id = excluded.state_id, token = excluded.token,
                   session_id = excluded.session_id, host = excluded.host, machine = excluded.machine,
                   boot = excluded.boot, pidns = excluded.pidns, pid = excluded.pid, started = excluded.started,
                   beat = 0, lease_s = excluded.lease_s, claimed_at = excluded.claimed_at""",
                (entry_id, running.state_id, token, self.session_id, h.host, h.machine, h.boot, h.pidns, h.pid,
                 h.started, request.lease_s, claimed_at),
            )  # fmt: skip
        mine = Claim(entry_id, running.state_id, token, h, 0, request.lease_s, claimed_at)
        return ClaimOutcome("run", previous, running=running, claim=mine, abandoned=abandoned)

    def claim_of(self, running: Transition) -> Claim | None:
        return self._claim_of(self.conn, running)

    def _claim_of(self, c: sqlite3.Connection, running: Transition) -> Claim | None:
        row = c.execute(self._CLAIM + " WHERE entry_id = ? AND state_id = ?", (running.entry_id, running.state_id)).fetchone()
        if row is None:
            return None
        entry_id, state_id, token, session_id, host, machine, boot, pidns, pid, started, beat, lease_s, at = row
        holder = Holder(host, machine, boot, pidns, pid, started, session_id)
        return Claim(entry_id, state_id, token, holder, beat, lease_s, at)

    def renewer(self) -> "SqliteRenewer":
        return SqliteRenewer(self.path, self.busy_timeout_s)

    def finish(
        self,
        running: Transition,
        token: int,
        to_state: str,
        result_json: str | None,
        reason: str,
        blobs: Iterable[Blob] = (),
        signatures: Iterable[tuple[str, str, str]] = (),
        exec_row: ExecRow | None = None,
    ) -> Transition:
        blobs = list(blobs)
        try:
            large = self.blobs.large(blobs)
            if large:
                # Written first, a chunk per transaction (bounded WAL, short
                # write locks); a run already taken over writes none.
                self._fence(self.conn, running, token)
                self.blobs.stage(large)
        except sqlite3.Error as exc:
            raise StoreError(f"RSSD {self.path}: {_what(exc)}") from None
        with self._write() as c:
            self._fence(c, running, token)
            self._add_signatures(c, signatures)
            # Checks every blob again: a gc may have freed a staged one.
            self.blobs.put_many(blobs, c)
            done = self._append(c, running.entry_id, RUNNING, to_state, result_json, reason, None)
            c.execute("UPDATE rssd_magic_claim SET state_id = NULL WHERE entry_id = ? AND token = ?", (running.entry_id, token))
            if exec_row is not None:
                self._exec(c, running.entry_id, exec_row)
        if large:
            # Replays then read the value from the file through its mapping,
            # and the next writer starts the WAL over.
            try:
                checkpoint(self.conn)
            except sqlite3.Error:
                pass  # busy: a later checkpoint does it
        return done

    def _fence(self, c: sqlite3.Connection, running: Transition, token: int) -> None:
        """Raise Fenced unless *running* is still its cell's latest transition
        and *token* still holds its claim."""
        latest = self._latest_of_entry(c, running.entry_id)
        held = self._claim_of(c, running)
        if latest is None or latest.state_id != running.state_id or held is None or held.token != token:
            raise Fenced(self._who_took_over(c, running, token, latest))

    def _exec(self, c: sqlite3.Connection, entry_id: str, row: ExecRow) -> None:
        c.execute(
            """INSERT INTO orchestration_session_exec
               (orchestration_session_exec_id, exec_nature, session_id, session_entry_id, namespace,
                exec_identity, exec_code, exec_status, input_text, exec_error_text, output_text, elaboration)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (new_ulid(), row.nature, self.session_id, entry_id, row.namespace, row.identity, row.code, row.status,
             row.input_text, row.error_text, row.output_text,
             dumps(row.elaboration) if row.elaboration is not None else None),
        )  # fmt: skip

    def _who_took_over(self, c: sqlite3.Connection, running: Transition, token: int, latest: Transition | None) -> str:
        """Who holds, or last held, the cell since *running* lost it: the
        claim row keeps its last holder after release."""
        row = c.execute(self._CLAIM + " WHERE entry_id = ?", (running.entry_id,)).fetchone()
        if row is not None and row[2] != token:
            return Holder(row[4], row[5], row[6], row[7], row[8], row[9], row[3]).describe()
        state = latest.to_state if latest is not None else "nothing"
        return f"another kernel (the cell's latest state is {state})"

    def append_if_latest(
        self, entry_id: str, from_state: str, to_state: str, result_json: str | None, reason: str, if_latest: str
    ) -> Transition | None:
        self._session()
        with self._write() as c:
            latest = self._latest_of_entry(c, entry_id)
            if latest is None or latest.state_id != if_latest:
                return None
            return self._append(c, entry_id, from_state, to_state, result_json, reason, None)

    def _latest_of_entry(self, c: sqlite3.Connection, entry_id: str) -> Transition | None:
        """The latest transition of the cell *entry_id* belongs to (all its
        entries: merged RSSDs may hold several for one key)."""
        row = c.execute(
            self._STATE
            + """
            WHERE s.session_entry_id IN (
                SELECT e.orchestration_session_entry_id FROM orchestration_session_entry AS e
                WHERE e.ingest_src = (SELECT ingest_src FROM orchestration_session_entry
                                      WHERE orchestration_session_entry_id = ?))
            ORDER BY s.rowid DESC LIMIT 1""",
            (entry_id,),
        ).fetchone()
        return Transition(*row) if row else None

    def _entry_id(self, c: sqlite3.Connection, key: CellKey, source: str) -> str:
        row = c.execute(
            """SELECT orchestration_session_entry_id FROM orchestration_session_entry
               WHERE ingest_src = ? ORDER BY rowid LIMIT 1""",
            (key.ingest_src,),
        ).fetchone()
        if row:
            return row[0]
        entry_id = new_ulid()
        elaboration = {
            "key": key.digest,
            "code_key": key.base,
            "inputs": key.inputs or None,
            "scope": key.scope,
            "kind": key.kind,
            "name": key.name,
            "source": source,
        }
        c.execute(
            """INSERT INTO orchestration_session_entry
               (orchestration_session_entry_id, session_id, ingest_src, elaboration) VALUES (?, ?, ?, ?)""",
            (entry_id, self.session_id, key.ingest_src, dumps(elaboration)),
        )
        return entry_id

    def _append(self, c, entry_id, from_state, to_state, result_json, reason, elaboration) -> Transition:
        state_id = new_ulid()
        at = utc_now()  # written explicitly, so the caller knows it without a re-read
        cur = c.execute(
            """INSERT INTO orchestration_session_state
               (orchestration_session_state_id, session_id, session_entry_id, from_state,
                to_state, transition_result, transition_reason, transitioned_at, elaboration)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (state_id, self.session_id, entry_id, from_state, to_state, result_json, reason, at,
             dumps(elaboration) if elaboration is not None else None),
        )  # fmt: skip
        return Transition(state_id, entry_id, self.session_id, from_state, to_state, result_json, reason, at, cur.lastrowid)

    # -- signatures ----------------------------------------------------------------------

    def signatures(self, payload_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        ids = list(dict.fromkeys(payload_ids))
        out: dict[str, dict[str, str]] = {}
        for at in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            part = ids[at : at + 500]
            rows = self.conn.execute(
                "SELECT payload_id, key_id, signature FROM rssd_magic_signature "
                f"WHERE payload_id IN ({','.join('?' * len(part))})",
                part,
            )
            for pid, key_id, sig in rows.fetchall():
                if isinstance(key_id, str) and isinstance(sig, str):
                    out.setdefault(pid, {})[key_id] = sig
        return out

    def add_signatures(self, rows: Iterable[tuple[str, str, str]]) -> None:
        with self._write() as c:
            self._add_signatures(c, rows)

    @staticmethod
    def _add_signatures(c: sqlite3.Connection, rows: Iterable[tuple[str, str, str]]) -> None:
        c.executemany(
            """INSERT INTO rssd_magic_signature (payload_id, key_id, signature) VALUES (?, ?, ?)
               ON CONFLICT (payload_id, key_id) DO UPDATE SET signature = excluded.signature""",
            list(rows),
        )

    # -- the user's SQL on the RSSD itself ----------------------------------------------

    def sql_connection(self) -> sqlite3.Connection:
        if self._user_sql is None:
            self._user_sql = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout_s
            )
        return self._user_sql

    # -- reports -----------------------------------------------------------------------------

    def cells(self) -> list[CellRow]:
        return sqlite_reports.cells(self.conn)

    def history(self, cell: CellRow) -> list[HistoryRow]:
        return sqlite_reports.history(self.conn, cell)

    def result_of(self, state_id: str) -> str | None:
        row = self.conn.execute(
            "SELECT transition_result FROM orchestration_session_state WHERE orchestration_session_state_id = ?",
            (state_id,),
        ).fetchone()
        return row[0] if row else None

    def current_results(self) -> Iterator[tuple[CellRow, str]]:
        return executed_results(self.cells())

    def storage(self) -> StorageStats:
        return sqlite_reports.storage(self.conn, self.path)

    def gc(self, digests_of: Callable[[str], set[str]], dry_run: bool = False) -> tuple[list[tuple[str, int]], int, int]:
        return sqlite_reports.gc(self.conn, self._write, digests_of, dry_run)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _what(exc: sqlite3.Error) -> str:
    """A driver error as a few words (SQLite's own message)."""
    return str(exc) or type(exc).__name__

