"""The connection to one RSSD as a kernel uses it: opened after the file is
checked, read-only where it must be, still the file the path names before
every transaction, and write transactions that wait for a neighbour's lock
and say so.

A store is never ours alone.  A surveilr ingest may hold the write lock for
its whole run: :meth:`RssdConnection.begin` waits up to the busy timeout,
says once after a moment that it waits (naming the holder when the
kernel's lock table can), then fails in one line.  People delete the file
or a teammate's copy arrives under its name while a kernel has it open:
:meth:`RssdConnection.ready` compares the path's device and inode before
every operation and opens what is there now.  Whoever can write the file
must not be able to hang us: every statement runs under a deadline
(SQLite's progress handler).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator

from ..store.base import StoreError
from .sqlite_file import Identity, check_path, connect, identity, lock_holder
from .sqlite_schema import ensure_schema, newer_schema, own_tables_as_temp, schema_problems
from ..store.rows import stamped_session
from ..store.dialect import Tx
from ..store.pending import Pending, pending_written
from .sqlite_schema import SQL
from .sqlite_sessions import IDLE_CLOSE_S, Housekeeper

#: The -wal file is cut back to this size when it is reset.
JOURNAL_SIZE_LIMIT = 64 << 20
#: Past this many WAL bytes the housekeeper checkpoints (SQLite's own
#: default, 1000 pages): on its thread, not inside a cell's commit, whose
#: checkpoint and fsync were every 40th first run's slow tail.
CHECKPOINT_BYTES = 4 << 20
#: ... at most this often (seconds): a checkpoint leaves the -wal file its
#: size (it is rewound, not cut, while the kernel writes), so by its size
#: alone one was due after every write — a new connection and 1.2 ms of
#: fsyncs per first run on the housekeeper's thread, taking the GIL and the
#: disk from the cell that runs next.
CHECKPOINT_EVERY_S = 1.0
#: A writer waiting for another process's lock tries again this often (ms),
#: and says once that it waits after this many seconds.
LOCK_STEP_MS = 200
SAY_WAITING_AFTER_S = 1.0
#: No operation of ours may run a statement longer than this (seconds):
#: SQLite's progress handler checks every PROGRESS_OPS virtual-machine steps.
STATEMENT_DEADLINE_S = 120.0
PROGRESS_OPS = 50_000


def what(exc: sqlite3.Error) -> str:
    """A driver error as a few words (SQLite's own message)."""
    return str(exc) or type(exc).__name__


def operation(method):
    """One operation of a backend (an object with ``db``, its
    :class:`RssdConnection`): the connection stays open while it runs (see
    :meth:`RssdConnection.using`), and every driver error reaches the caller
    as StoreError naming the file — a CLI would otherwise print a traceback."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            with self.db.using():
                return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreError(f"RSSD {self.db.path}: {what(exc)}") from None

    return wrapped


class _Deadline:
    """SQLite's progress handler: aborts a statement once the operation
    that runs it (armed by :meth:`arm`) is older than the deadline."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.until = float("inf")

    def arm(self) -> None:
        self.until = time.monotonic() + self.seconds

    def __call__(self) -> int:
        return 1 if time.monotonic() > self.until else 0


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


class RssdConnection:
    """This kernel's connection to one RSSD file, and what waits to be
    written to it (:class:`~rssd_magic.store.pending.Pending`,
    written by the :class:`Housekeeper` or with the next write)."""

    def __init__(self, path: Path, busy_timeout_s: float, notify: Callable[[str], None], *,
                 readonly: bool = False, journal: str = "WAL"):  # fmt: skip
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self.notify = notify
        self.readonly_asked = readonly
        self.journal = journal
        self.conn: sqlite3.Connection | None = None
        #: None while this process may write the file; else why not (one line).
        self.read_only: str | None = None
        #: The file this connection has open (device, inode).
        self.identity: Identity | None = None
        self.pending = Pending()
        self.keeper: Housekeeper | None = None
        #: Held while an operation uses the connection: the housekeeper
        #: closes it only when nobody does and it has been idle a while.
        self.lock = threading.RLock()
        self.last_used = time.monotonic()
        #: Seconds without an operation after which the connection is closed.
        self.idle_close_s = IDLE_CLOSE_S
        self.access = None
        self._schema_version: int | None = None
        #: This process's session (id and args), written to every file it opens.
        self.session_id: str | None = None
        self.session_args: dict = {}
        self.host = ""
        self._deadline = _Deadline(STATEMENT_DEADLINE_S)
        self._checkpoint_due = 0.0  # monotonic; see CHECKPOINT_EVERY_S
        self._said: set[str] = set()

    @property
    def _own_busy_timeout(self) -> str:
        """The PRAGMA that gives the connection its own wait for a lock (set
        when it opens; put back after each stepped BEGIN IMMEDIATE)."""
        return f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}"

    def say(self, line: str) -> None:
        """Tell the user *line*, once per store."""
        if line not in self._said:
            self._said.add(line)
            self.notify(f"[stateful] {line}")

    # -- opening -------------------------------------------------------------------

    def open(self) -> None:
        """(Re)open what the path names now: checked, read-only where it
        must be, our tables made when missing (the only write at open)."""
        path = self.path
        try:
            access = check_path(path, readonly=self.readonly_asked)
        except ValueError as exc:
            raise StoreError(f"RSSD {path}: {exc}") from None
        if self.readonly_asked and not access.existed:
            raise StoreError(f"RSSD {path}: no such file")
        conn, found = self._connect(access)
        try:
            problems = schema_problems(conn)  # reads only
            if problems:
                lead = "" if problems[0].startswith("not an RSSD") else "incompatible schema: "
                raise StoreError(f"RSSD {path}: {lead}" + "; ".join(problems))
            read_only = access.read_only or newer_schema(conn)
            if read_only is not None:
                if self.readonly_asked and not _has_table(conn, "orchestration_session_state"):
                    raise StoreError(f"RSSD {path}: not an RSSD (it has no orchestration_session_state table)")
                self._stand_ins(conn)
            else:
                self._set_journal(conn)
                ensure_schema(conn, self.begin)
            (self._schema_version,) = conn.execute("PRAGMA schema_version").fetchone()
        except StoreError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"RSSD {path}: not a usable SQLite database ({what(exc)})") from None
        self.conn, self.identity, self.read_only, self.access = conn, found, read_only, access
        self.last_used = time.monotonic()
        if (not access.existed or access.empty) and read_only is None:
            # A run from the wrong folder (papermill elsewhere, a moved
            # notebook) would otherwise run its cells again unseen.
            self.notify(f"[stateful] created a new RSSD: {path}", tag="created")
        if read_only is not None and not self.readonly_asked:
            self.say(f"RSSD {path} is read-only here ({read_only}): cells replay; replay counts and this "
                     "kernel's session are not recorded, and a cell that must run is refused")  # fmt: skip
        self.keeper = Housekeeper(self)
        if self.session_id is not None and read_only is None:
            self.pending.session = stamped_session(self.session_id, self.host, self.session_args)
            self.keeper.poke()

    def _connect(self, access) -> tuple[sqlite3.Connection, Identity | None]:
        """A connection as *access* allows, with our settings, and the
        identity of the file it has open."""
        path = self.path
        for _ in range(3):  # the path may be replaced while we open it
            before = identity(path)
            try:
                conn = connect(path, access, self.busy_timeout_s)
            except sqlite3.Error as exc:
                raise StoreError(f"RSSD {path}: cannot open ({what(exc)})") from None
            after = identity(path)
            if before == after or before is None:
                break
            conn.close()
        try:
            conn.set_progress_handler(self._deadline, PROGRESS_OPS)
            self._deadline.arm()
            conn.execute(self._own_busy_timeout)
            if access.read_only is None:
                # surveilr's own settings; none needs the write lock.
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # see CHECKPOINT_BYTES
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"RSSD {path}: not a usable SQLite database ({what(exc)})") from None
        return conn, after

    @staticmethod
    def _stand_ins(conn: sqlite3.Connection) -> None:
        """A file surveilr made may not have our tables yet: empty stand-ins
        in the connection's own temp schema (the file is not written) keep
        every query the same on a store we only read."""
        for table, statement in own_tables_as_temp().items():
            if not _has_table(conn, table):  # a temp table would shadow the file's own
                conn.execute(statement)

    def _set_journal(self, conn: sqlite3.Connection) -> None:
        """WAL (or the rollback journal a network filesystem needs), switched
        only when the file is in another mode: the switch needs the lock."""
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if mode.upper() != self.journal:
            self.begin(conn)  # waits for the lock as a write would, then lets it go
            conn.execute("ROLLBACK")
            conn.execute(f"PRAGMA journal_mode = {self.journal}")

    def start_session(self, session_id: str, host: str, args: dict) -> None:
        """This process's session: its rows wait for a write (the
        housekeeper is asked at once)."""
        self.session_id, self.host, self.session_args = session_id, host, args
        if self.read_only is None:
            self.pending.session = stamped_session(session_id, host, args)
            self.keeper.poke()

    def close(self, end: Callable[[sqlite3.Connection], None]) -> None:
        """Write what waits and *end(conn)* (the session's last rows) in one
        transaction while the path still names our file, then close."""
        keeper, self.keeper = self.keeper, None
        if keeper is not None:
            keeper.stop()
        if self.identity is None:
            return  # closed already
        try:
            if self.read_only is None and identity(self.path) == self.identity:
                with self.write() as c:
                    end(c)
                self.conn.execute("PRAGMA optimize")
        except (sqlite3.Error, StoreError):
            pass  # closing must never raise at interpreter exit
        finally:
            if self.conn is not None:
                self.conn.close()
            self.conn, self.identity = None, None

    def close_if_idle(self, idle_s: float) -> bool:
        """Close the connection if no operation uses it and none did for
        *idle_s* seconds (the housekeeper asks); True when it is closed.
        The next operation reopens the same file."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.conn is not None:
                if time.monotonic() - self.last_used < idle_s:
                    return False
                self.conn.close()  # the last one out removes the -wal and -shm files
                self.conn = None
            return True
        finally:
            self.lock.release()

    # -- the file under us -------------------------------------------------------

    @contextmanager
    def using(self) -> Iterator[sqlite3.Connection]:
        """The connection for one operation, held open while it runs."""
        with self.lock:
            conn = self.ready()
            try:
                yield conn
            finally:
                self.last_used = time.monotonic()
        keeper = self.keeper
        if keeper is not None and keeper._thread is None:
            keeper.poke(work=False)  # to close the connection once idle

    def ready(self) -> sqlite3.Connection:
        """The connection (call with :attr:`lock` held): still the file the
        path names (else that is opened, said in one line), with a fresh
        deadline; reopened after an idle close."""
        if self.identity is None:
            raise StoreError(f"RSSD {self.path}: closed")
        if identity(self.path) != self.identity:
            self._reopen()
        elif self.conn is None:
            self._resume()
        self._deadline.arm()
        return self.conn

    def _resume(self) -> None:
        """Reopen the same file after an idle close: checked again only
        when its schema changed meanwhile."""
        conn, found = self._connect(self.access)
        if found != self.identity:
            conn.close()
            return self._reopen()
        (version,) = conn.execute("PRAGMA schema_version").fetchone()
        if version != self._schema_version:
            conn.close()
            keeper, self.keeper = self.keeper, None
            if keeper is not None:
                keeper.stop()
            return self.open()
        if self.read_only is not None:
            self._stand_ins(conn)
        self.conn = conn

    def _reopen(self) -> None:
        gone = identity(self.path) is None
        keeper, self.keeper = self.keeper, None
        if keeper is not None:
            keeper.stop()
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.pending.take()  # the counts and session row were the old file's
        self.pending.settled()
        self.say(
            f"RSSD {self.path} was {'deleted' if gone else 'replaced by another file'} while this kernel had it "
            f"open; {'starting a new one' if gone else 'using the file there now'}"
        )
        self.open()

    # -- transactions --------------------------------------------------------------

    def begin(self, conn: sqlite3.Connection, patience_s: float | None = None) -> None:
        """``BEGIN IMMEDIATE``, waiting up to *patience_s* (the busy timeout)
        for another process's write lock; after a moment of waiting, one
        line says so and names the holder when the kernel's lock table can."""
        start = time.monotonic()
        patience = self.busy_timeout_s if patience_s is None else patience_s
        deadline = start + patience
        said = False
        # Tried in steps (to say who holds the lock), then back to the wait
        # every other statement has: the connection's, set when it opened.
        conn.execute(f"PRAGMA busy_timeout = {LOCK_STEP_MS}")
        try:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_BUSY) & 0xFF != sqlite3.SQLITE_BUSY:
                        raise
                now = time.monotonic()
                late = now >= deadline
                if late or (not said and now - start >= SAY_WAITING_AFTER_S and patience > SAY_WAITING_AFTER_S):
                    who = lock_holder(self.path)
                    held = f", held by {who}" if who else ""
                    if late:
                        raise StoreError(
                            f"RSSD {self.path}: database is locked{held}; waited {patience:g}s "
                            "(StatefulMagics.busy_timeout_seconds)"
                        )
                    said = True
                    self.notify(
                        f"[stateful] waiting up to {self.busy_timeout_s:g}s for the write lock on RSSD {self.path}{held}"
                    )
        finally:
            conn.execute(self._own_busy_timeout)

    @contextmanager
    def write(self, patience_s: float | None = None) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE … COMMIT`` with what waited for a write (the
        session row first: rows written after may name it), waiting up to
        *patience_s* (the busy timeout) for the lock; driver errors become
        StoreError."""
        with self.using() as conn:
            if self.read_only is not None:
                raise StoreError(f"RSSD {self.path}: {self.read_only}; nothing can be recorded in it")
            try:
                self.begin(conn, patience_s)
                try:
                    with pending_written(Tx(conn, SQL), self.pending):
                        yield conn
                        conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"RSSD {self.path}: {what(exc)}") from None
        now = time.monotonic()
        if self.keeper is not None and now >= self._checkpoint_due:
            with suppress(OSError):
                if os.stat(f"{self.path}-wal").st_size > CHECKPOINT_BYTES:
                    self._checkpoint_due = now + CHECKPOINT_EVERY_S
                    self.keeper.poke(checkpoint=True)

    def sql_connection(self) -> sqlite3.Connection:
        """A new connection for one ``--sql`` cell on the RSSD itself: nothing
        a cell does (PRAGMAs, transactions) touches ours, and none is kept
        open while the kernel is idle (it goes with the cell that used it)."""
        with self.using():
            return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self.busy_timeout_s)  # fmt: skip
