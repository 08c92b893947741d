"""What an RSSD kernel writes besides its runs, and when: its session, its
replay counts, the sessions killed kernels left open, and a checkpointed
WAL — none of it ever in the way of a replay.

A store is shared: a surveilr ingest may hold the write lock for its whole
run.  So opening a store and replaying write nothing.  This kernel's
``orchestration_session`` row (with surveilr's ``INITIAL →
surveilr_orchestration_init``) and its hit counts wait (store/pending.py)
until a write is possible: they go first into any write transaction the
kernel makes (a claim, an end), or are written by the :class:`Housekeeper`,
a thread with a connection of its own that never waits for a lock (a
foreign writer only delays it), or at close.  Rows that name the session
are only written after it, in the same transaction or a later one.

The housekeeper also finishes, as failed, the sessions that kernels killed
on this machine left open (the engine's judgement: claims.py), and keeps
the WAL checkpointed whenever the kernel is idle: a WAL's frames carry no
file identity, so frames left behind would be applied to whatever file
arrives under the RSSD's name next (a teammate's copy, a fresh RSSD).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..store import rows
from ..store.dialect import Tx
from ..store.pending import HIT_FLUSH_S, pending_written
from .sqlite_file import Identity, identity, pragmas, uri
from .sqlite_schema import SQL

#: Seconds between two tries of the housekeeper while the write lock is
#: held by another process, and how long a kernel must leave the store
#: alone before its connection is closed (a loop of replays keeps it).
RETRY_S = 1.0
IDLE_CLOSE_S = 1.0


def checkpoint_idle(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database file and, when nobody reads from the
    WAL, cut it to nothing — never waiting for anyone (a busy file is tried
    again later).  A fully copied WAL is never applied to another file."""
    (busy, frames, copied) = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    if busy == 0 and frames > 0 and frames == copied:
        with pragmas(conn, busy_timeout=0):  # TRUNCATE waits for readers otherwise
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


class Housekeeper:
    """A daemon thread per open RSSD that writes what waits, closes orphaned
    sessions once, and — once the kernel has not used the store for
    :data:`IDLE_CLOSE_S` — closes the kernel's connection.

    Why close: while any connection has the file open, its ``-shm`` (the
    WAL index) stays, and it describes *this* file (its size, its frames).
    A teammate's RSSD renamed over the path would be read through it by
    every other process — "database disk image is malformed" — until this
    kernel let go.  An idle kernel holds nothing, and reopens on its next
    operation (same file: no schema check again).

    Its own writes use a connection it opens per round and never waits for
    the write lock with (a neighbour holding it only delays them).
    """

    def __init__(self, db: Any):
        self.db = db  # the RssdConnection it keeps
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._orphans_done = db.read_only is not None
        self._checkpoint = False

    def poke(self, work: bool = True, checkpoint: bool = False) -> None:
        """Rows wait, or the WAL is due a *checkpoint* (*work*), or the store
        was just used: make sure the thread runs (woken at once for work)."""
        with self._lock:
            if self._stopped:
                return
            self._checkpoint |= checkpoint
            if work or checkpoint:
                self._wake.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rssd-magic-housekeeper", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def _run(self) -> None:
        db = self.db
        while True:
            with self._lock:
                if self._stopped:
                    self._thread = None
                    return
                self._wake.clear()
            done = True
            if db.read_only is None and (db.pending or not self._orphans_done or self._checkpoint):
                done = self._once()
            idle_in = db.last_used + db.idle_close_s - time.monotonic()
            # Counts that came in since wait a little, to be written together.
            wait = RETRY_S if not done else min(idle_in, HIT_FLUSH_S) if db.pending else idle_in
            if self._wake.wait(min(max(0.01, wait), 3600.0)):
                continue
            closed = db.close_if_idle(db.idle_close_s)
            with self._lock:
                if self._stopped or (closed and done and not db.pending and not self._wake.is_set()):
                    self._thread = None
                    return

    def _once(self) -> bool:
        """Write what waits (and close orphans once) in one transaction, on
        a connection of this round; True when nothing is left to do."""
        db = self.db
        expected = db.identity
        if expected is None or identity(db.path) != expected:
            return True  # replaced or closed: the backend reopens, and starts anew
        try:
            conn = sqlite3.connect(uri(db.path, "rw"), uri=True, isolation_level=None, timeout=0)
        except sqlite3.Error:
            return False
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA foreign_keys = ON")
            if db.pending or not self._orphans_done:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    with pending_written(Tx(conn, SQL), db.pending):
                        if not self._orphans_done:
                            rows.close_orphans(Tx(conn, SQL), db.session_id)
                        conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                self._orphans_done = True
            if self._checkpoint:  # while the kernel works: copied, not cut (TRUNCATE stops its writes)
                self._checkpoint = False
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            else:
                checkpoint_idle(conn)
            return not db.pending
        except sqlite3.Error:
            return False  # busy (someone holds the lock) or gone: try again later
        finally:
            conn.close()


class SqliteRenewer:
    """Heartbeats through a connection of their own, on the file the claims
    were made in: once the path names another file (deleted, replaced),
    every claim counts as lost — nothing is written to the newcomer."""

    def __init__(self, path: Path, busy_timeout_s: float, expected: Identity | None):
        self.path, self.expected = path, expected
        self.conn = sqlite3.connect(uri(path, "rw"), uri=True, timeout=busy_timeout_s, isolation_level=None,
                                    check_same_thread=False)  # fmt: skip

    def renew(self, held: dict[str, int]) -> set[str]:
        if self.expected is None or identity(self.path) != self.expected:
            return set(held)
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            lost = rows.beat(Tx(self.conn, SQL), held)
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        try:
            checkpoint_idle(self.conn)  # a beat leaves no frame behind
        except sqlite3.Error:
            pass
        return lost

    def close(self) -> None:
        self.conn.close()
