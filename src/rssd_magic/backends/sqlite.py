"""The state store in a surveilr RSSD: one SQLite file, WAL, short writes.

This module is the only code that opens an RSSD for the state or writes SQL
against it.  Design rules, each from a bug somebody shipped:

* **Validate before touching** (sqlite_file.py, sqlite_schema.py): a file
  we must refuse — not SQLite, an application's own database, a view where
  a table of ours should be — is left byte-identical.
* **A store is never ours alone.**  Opening it and replaying write nothing
  (a surveilr ingest may hold the write lock for minutes): the session row
  and replay counts wait until a write is possible (sqlite_sessions.py).
  A file we can't write (a read-only mount, a published report) or whose
  schema is newer than ours is opened read-only: it replays, and only a
  cell that must run is refused (:attr:`SqliteBackend.read_only`).
* **Short write transactions, WAL and a busy timeout** (``database is
  locked`` is jupyter-cache's best-known bug).  Every write is one
  ``BEGIN IMMEDIATE … COMMIT``; a writer that has to wait for another
  process says so once, naming it when the kernel's lock table can.
* **The path is checked before every transaction** (one ``stat``): a file
  deleted or replaced under a running kernel is never written through the
  old connection; what the path names now is opened instead, and the WAL
  is kept checkpointed while the kernel is idle, so its frames can't be
  applied to a newcomer.
* **Order by rowid.**  A cell's latest transition is the one inserted last
  (rowid), never the greatest ULID: a ULID carries its writer's clock, and
  a host whose clock runs a day ahead must not win for a day.
* **Append-only history**, and rows we did not write are never touched.
* **The hot path is one indexed query** (plus the ``stat``); schema checks
  happen once, when the store opens.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
import time
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
from .sqlite_conn import RssdConnection, operation, what
from .sqlite_file import network_filesystem
from .sqlite_sessions import HIT_FLUSH_S, SqliteRenewer, end_session, open_sessions

BUSY_TIMEOUT_S = 30.0


def _src_range(prefix: str) -> tuple[str, str]:
    """``[lo, hi)`` covering every string that starts with *prefix*: a range,
    unlike LIKE, is answered by the ingest_src index."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


class SqliteBackend:
    """An opened RSSD.  Use :meth:`open`; one instance per kernel and file."""

    scheme = "file"

    def __init__(self, db: RssdConnection):
        self.db = db
        self.path = db.path
        self.location = str(db.path)
        self.busy_timeout_s = db.busy_timeout_s
        self.host = socket.gethostname()
        self.session_id: str | None = None
        self.blobs = SqliteBlobs(db.using, self._write)
        self._hits_poked = 0.0

    @property
    def conn(self) -> sqlite3.Connection | None:
        """The connection to the file (None once closed)."""
        return self.db.conn

    @conn.setter
    def conn(self, value: sqlite3.Connection | None) -> None:
        self.db.conn = value

    @property
    def read_only(self) -> str | None:
        """None while this process may write the file; else why not."""
        return self.db.read_only

    def _write(self):
        return self.db.write()

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
        notify: Callable[[str], None] | None = None,
    ) -> "SqliteBackend":
        """Open the RSSD at *location*, or raise StoreError naming the cause.

        Nothing is written to open a prepared RSSD.  With *session_args*, an
        ``orchestration_session`` row for this process (a kernel) is written
        when a write is possible; without, at the first write.
        ``create=False`` refuses a missing file (the CLI never creates one);
        ``readonly=True`` also refuses a file without our tables and never
        writes.  A file on a network filesystem is refused unless
        *allow_network_fs*, which uses a rollback journal instead of WAL.
        *notify* is told, in one line each, what the user should know: a
        rollback journal, a read-only store, a file replaced under us.
        """
        path = Path(location).expanduser().absolute()
        if not create and not path.exists():
            raise StoreError(f"RSSD {path}: no such file")
        db = RssdConnection(path, busy_timeout_s, notify or (lambda line, tag=None: None), readonly=readonly)
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
            db.journal = "DELETE"
            db.say(f"RSSD {path} is on a network filesystem ({fstype}): using a rollback journal instead of WAL")
        db.open()
        backend = cls(db)
        if session_args is not None:
            backend.start_session(session_args)
        return backend

    def close(self, *, failed: bool = False) -> None:
        why = "a cell failed in this kernel" if failed else "kernel shut down"
        ends = self.session_id if self.db.session_id is not None else None  # a writer's session is not its own
        self.db.close(lambda c: ends is not None and end_session(c, ends, failed, why))

    def writer(self) -> "SqliteBackend":
        other = SqliteBackend.open(
            self.path, busy_timeout_s=self.busy_timeout_s, allow_network_fs=self.db.journal != "WAL"
        )
        other.session_id = self.session_id  # its rows name ours, written before it exists
        return other

    def wait_for_change(self, timeout: float) -> None:
        time.sleep(timeout)  # SQLite can't tell another process's commit: poll

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

    @operation
    def latest(self, key: CellKey) -> Transition | None:
        row = self.db.conn.execute(self._LATEST, (key.ingest_src,)).fetchone()
        return Transition(*row) if row else None

    @operation
    def latest_variant(self, key: CellKey) -> Transition | None:
        lo, hi = _src_range(key.base_src)
        row = self.db.conn.execute(
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
        # Counted in memory; the housekeeper writes the counts when the
        # lock is free, at most every HIT_FLUSH_S: a replay writes nothing.
        db = self.db
        if db.keeper is None:
            return  # read-only: nothing is recorded (said once at open)
        db.pending.hit(state_id)
        now = time.monotonic()
        if now - self._hits_poked > HIT_FLUSH_S:
            self._hits_poked = now
            db.keeper.poke()

    def flush_hits(self, patience_s: float | None = None) -> None:
        """Write what waits (hit counts, the session's rows) now, waiting up
        to *patience_s* (the busy timeout) for the lock."""
        if self.read_only is None and self.db.pending.waiting():
            with self.db.write(patience_s):
                pass  # a write writes what waits

    # -- sessions -------------------------------------------------------------------

    def start_session(self, args: dict) -> str:
        """This process's session: its id now, its rows when a write is
        possible (sqlite_sessions.py)."""
        if self.session_id is None:
            self.session_id = new_ulid()
            self.db.start_session(self.session_id, self.host, args)
        return self.session_id

    def _session(self) -> str:
        return self.session_id or self.start_session({"process": {"pid": os.getpid(), "argv": sys.argv}})

    @operation
    def open_sessions(self) -> list[tuple[str, dict]]:
        return open_sessions(self.db.conn)

    def end_session(self, session_id: str, *, failed: bool, reason: str) -> bool:
        with self._write() as c:
            return end_session(c, session_id, failed, reason)

    # -- claims ----------------------------------------------------------------------

    _CLAIM = """SELECT entry_id, state_id, token, session_id, host, machine, boot, pidns, pid, started,
                       beat, lease_s, claimed_at FROM rssd_magic_claim"""

    @operation
    def claim(self, request: ClaimRequest) -> ClaimOutcome:
        self._session()
        key = request.key
        with self._write() as c:
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

    @operation
    def claim_of(self, running: Transition) -> Claim | None:
        return self._claim_of(self.db.conn, running)

    def _claim_of(self, c: sqlite3.Connection, running: Transition) -> Claim | None:
        row = c.execute(self._CLAIM + " WHERE entry_id = ? AND state_id = ?", (running.entry_id, running.state_id)).fetchone()
        if row is None:
            return None
        entry_id, state_id, token, session_id, host, machine, boot, pidns, pid, started, beat, lease_s, at = row
        holder = Holder(host, machine, boot, pidns, pid, started, session_id)
        return Claim(entry_id, state_id, token, holder, beat, lease_s, at)

    def renewer(self) -> "SqliteRenewer":
        return SqliteRenewer(self.path, self.busy_timeout_s, self.db.identity)

    @operation
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
        checked: set[str] = set()
        try:
            large = self.blobs.large(blobs)
            if large:
                # Written (or checked) first, a chunk per transaction (bounded
                # WAL, short write locks); a run already taken over writes none.
                self._fence(self.db.conn, running, token)
                checked = self.blobs.stage(large) or set()
        except sqlite3.Error as exc:
            raise StoreError(f"RSSD {self.path}: {what(exc)}") from None
        with self._write() as c:
            self._fence(c, running, token)
            self._add_signatures(c, signatures)
            # Every blob again: a gc may have freed a staged one, and one
            # found stored must hold the right bytes.
            self.blobs.put_many(blobs, c, checked)
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

    @operation
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

    @operation
    def signatures(self, payload_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        ids = list(dict.fromkeys(payload_ids))
        out: dict[str, dict[str, str]] = {}
        for at in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            part = ids[at : at + 500]
            rows = self.db.conn.execute(
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
        return self.db.sql_connection()

    # -- reports -----------------------------------------------------------------------------

    @operation
    def cells(self) -> list[CellRow]:
        return sqlite_reports.cells(self.db.conn)

    @operation
    def history(self, cell: CellRow) -> list[HistoryRow]:
        return sqlite_reports.history(self.db.conn, cell)

    @operation
    def result_of(self, state_id: str) -> str | None:
        row = self.db.conn.execute(
            "SELECT transition_result FROM orchestration_session_state WHERE orchestration_session_state_id = ?",
            (state_id,),
        ).fetchone()
        return row[0] if row else None

    def current_results(self) -> Iterator[tuple[CellRow, str]]:
        return executed_results(self.cells())

    @operation
    def storage(self) -> StorageStats:
        return sqlite_reports.storage(self.db.conn, self.path)

    @operation
    def gc(self, digests_of: Callable[[str], set[str]], dry_run: bool = False) -> tuple[list[tuple[str, int]], int, int]:
        return sqlite_reports.gc(self.db.conn, self._write, digests_of, dry_run)

