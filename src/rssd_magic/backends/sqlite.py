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
* **The hot path is one indexed query** (plus the ``stat``), and not even
  that while the file has not changed since (``PRAGMA data_version``); schema
  checks happen once, when the store opens.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator

from ..records.canonical import dumps, utc_now
from ..records.ids import new_ulid
from ..engine.keys import CellKey
from ..store import rows
from ..store.base import Blob, Holder, StoreError, Transition
from ..store.dialect import Tx
from ..store.journal import BUSY_TIMEOUT_S, Journal
from .sqlite_blobs import SqliteBlobs, checkpoint
from .sqlite_conn import RssdConnection, operation, what
from ..store.mounts import network_filesystem
from .sqlite_schema import SQL
from .sqlite_sessions import SqliteRenewer

#: Cells whose latest transition a kernel keeps between changes of the file
#: (the replay's read), and the largest record kept: 16 MiB at most.
SEEN_MAX = 1024
SEEN_RECORD_MAX = 16 << 10
_UNSEEN = object()


class SqliteBackend(Journal):
    """An opened RSSD.  Use :meth:`open`; one instance per kernel and file."""

    scheme = "file"
    kind = "RSSD"  # SQLite can't tell another process's commit: waiters poll
    dialect = SQL

    def __init__(self, db: RssdConnection):
        super().__init__()
        self.db = db
        self.path = db.path
        self.location = str(db.path)
        self.busy_timeout_s = db.busy_timeout_s
        self.blobs = SqliteBlobs(self)
        self.pending = db.pending
        self._seen: dict[str, Transition | None] = {}  # see latest()
        self._seen_conn: sqlite3.Connection | None = None
        self._seen_stamp: tuple = ()

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
        ends = self.session_id if self.db.session_id is not None else None  # a writer's session is not its own
        self.db.close(lambda c: ends is not None and rows.end_session(Tx(c, SQL), ends, failed))

    def writer(self) -> "SqliteBackend":
        other = SqliteBackend.open(
            self.path, busy_timeout_s=self.busy_timeout_s, allow_network_fs=self.db.journal != "WAL"
        )
        other.session_id = self.session_id  # its rows name ours, written before it exists
        return other

    # -- transactions (journal.py's hooks) ---------------------------------------------

    def read(self, fn: Callable[[Tx], Any]) -> Any:
        try:
            with self.db.using() as conn:
                conn.execute("BEGIN")  # one snapshot for every statement, no write lock
                try:
                    return fn(Tx(conn, SQL))
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StoreError(f"RSSD {self.path}: {what(exc)}") from None

    def write(self, fn: Callable[[Tx, bool], Any]) -> Any:
        with self.db.write() as c:  # waits for the lock; writes what waited first
            return fn(Tx(c, SQL), False)

    @operation
    def query(self, template: str, params: Any = ()) -> list[tuple]:
        return self.db.conn.execute(SQL(template), params).fetchall()

    def each(self, template: str, params: Any = ()) -> Iterator[tuple]:
        try:
            with self.db.using() as conn:
                rows = conn.execute(SQL(template), params)
                try:
                    for row in rows:
                        yield row
                finally:
                    # A reader that stops early ends the read now: an open
                    # statement keeps a snapshot that holds back every
                    # checkpoint.  After the store closed there is nothing
                    # left to end (and nobody to tell).
                    with contextlib.suppress(sqlite3.Error):
                        rows.close()
        except sqlite3.Error as exc:
            raise StoreError(f"RSSD {self.path}: {what(exc)}") from None

    def footprint(self) -> tuple[int, int, dict]:
        wal = self.path.with_name(self.path.name + "-wal")
        return (self.path.stat().st_size if self.path.exists() else 0), (wal.stat().st_size if wal.exists() else 0), {}

    # -- the hot path ----------------------------------------------------------------

    _LATEST = SQL(rows.LATEST)

    @operation
    def latest(self, key: CellKey) -> Transition | None:
        # What the query found last is kept while the file can't have
        # changed: no other connection committed (SQLite's data_version, a
        # page read) and this one wrote nothing (total_changes, no I/O).
        conn = self.db.conn
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        stamp = (version, conn.total_changes)
        if conn is not self._seen_conn or stamp != self._seen_stamp:
            self._seen.clear()
            self._seen_conn, self._seen_stamp = conn, stamp
        found = self._seen.get(key.ingest_src, _UNSEEN)
        if found is _UNSEEN:
            row = conn.execute(self._LATEST, (key.ingest_src,)).fetchone()
            found = Transition(*row) if row else None
            if len(self._seen) < SEEN_MAX and (found is None or len(found.result_json or "") <= SEEN_RECORD_MAX):
                self._seen[key.ingest_src] = found
        return found

    def _hits_due(self) -> None:
        if self.db.keeper is not None:
            self.db.keeper.poke()  # it writes the counts when the lock is free

    def flush_hits(self, patience_s: float | None = None) -> None:
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

    # -- claims (journal.py's hooks) ---------------------------------------------------

    def _insert(self, t, entry_id, from_state, to_state, result_json, reason, elaboration, state_id=None) -> Transition:
        state_id = state_id or new_ulid()
        at = utc_now()  # written explicitly, so the caller knows it without a re-read
        cur = t.run(
            """INSERT INTO {orchestration_session_state}
               (orchestration_session_state_id, session_id, session_entry_id, from_state,
                to_state, transition_result, transition_reason, transitioned_at, elaboration)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (state_id, self.session_id, entry_id, from_state, to_state, result_json, reason, at,
             dumps(elaboration) if elaboration is not None else None),
        )  # fmt: skip
        return Transition(state_id, entry_id, self.session_id, from_state, to_state, result_json, reason, at, cur.lastrowid)

    def _take(self, t: Tx, ingest_src: str, entry_id: str, state_id: str, h: Holder, lease_s: float):
        # The token grows over every entry of the cell (merged RSSDs).
        (token,) = t.one(f"SELECT coalesce(max(token), 0) + 1 FROM {{rssd_magic_claim}} WHERE entry_id IN ({rows.ENTRIES})",
                         (ingest_src,))  # fmt: skip
        claimed_at = utc_now()
        t.run(
            """INSERT INTO {rssd_magic_claim} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)
               ON CONFLICT (entry_id) DO UPDATE SET state_id = excluded.state_id, token = excluded.token,
               session_id = excluded.session_id, host = excluded.host, machine = excluded.machine,
               boot = excluded.boot, pidns = excluded.pidns, pid = excluded.pid, started = excluded.started,
               beat = 0, lease_s = excluded.lease_s, claimed_at = excluded.claimed_at""",
            (entry_id, state_id, token, self.session_id, h.host, h.machine, h.boot, h.pidns, h.pid,
             h.started, lease_s, claimed_at),
        )  # fmt: skip
        return token, claimed_at, None

    def _release(self, t: Tx, ingest_src: str, entry_id: str, token: int, done: Transition) -> None:
        t.run("UPDATE {rssd_magic_claim} SET state_id = NULL WHERE entry_id = ? AND token = ?", (entry_id, token))

    def _last_claim(self, t: Tx, ingest_src: str, entry_id: str) -> tuple | None:
        return t.one(rows.CLAIM + " WHERE entry_id = ?", (entry_id,))

    def renewer(self) -> "SqliteRenewer":
        return SqliteRenewer(self.path, self.busy_timeout_s, self.db.identity)

    def _stage(self, running: Transition, token: int, blobs: list[Blob]) -> set[str] | None:
        try:
            large = self.blobs.large(blobs)
            if not large:
                return None
            # Written (or checked) first, a chunk per transaction (bounded
            # WAL, short write locks); a run already taken over writes none.
            with self.db.using() as conn:
                self._fence(Tx(conn, SQL), running, token)
            return self.blobs.stage(large) or set()
        except sqlite3.Error as exc:
            raise StoreError(f"RSSD {self.path}: {what(exc)}") from None

    def _finished(self, staged: set[str] | None) -> None:
        if staged is not None:
            # Replays then read the value from the file through its mapping,
            # and the next writer starts the WAL over.
            try:
                checkpoint(self.conn)
            except sqlite3.Error:
                pass  # busy: a later checkpoint does it

    # -- the user's SQL on the RSSD itself ----------------------------------------------

    def sql_connection(self) -> sqlite3.Connection:
        return self.db.sql_connection()
