"""The state store on a PostgreSQL server, for teams: the same rows as an
RSSD (surveilr's ``orchestration_*`` tables, postgres_schema.py), shared by
every kernel that can reach the server.

Design rules, on top of those every backend keeps (store/base.py):

* **Short transactions only.**  Connections are in autocommit mode; each
  claim, heartbeat and end of run is one ``BEGIN … COMMIT`` of a few
  statements.  Nothing — no transaction, no session-level advisory lock —
  is held while a cell runs.
* **Pool-safe.**  Nothing outlives a transaction (postgres_conn.py): no
  prepared statements, no session ``SET``; every transaction and read sets
  its own timeouts and search_path, and names our objects schema-qualified,
  rendered once per store.  So PgBouncer works in transaction and session
  pooling, as do pools that reset connections.
* **A claim is a row lock, for a moment.**  ``INSERT … ON CONFLICT DO
  NOTHING`` makes the cell's claim row exist, ``SELECT … FOR UPDATE`` takes
  it; everything after that in the transaction (the latest state, the new
  RUNNING, the new token) is decided with no other claimer of the cell in
  between.  Ends take the same lock, so they are compare-and-append.
* **One clock: the server's.**  Transition times, claim times and
  heartbeats are ``clock_timestamp()``; a waiter reads how long a holder has
  been silent from the server (``Claim.silent_s``), not from another host.
* **Order by the store.**  ``Transition.seq`` is an identity column
  (``rssd_magic_state_seq``), never an id or a time.
* **Woken, or polling.**  An end is NOTIFYed on the cell's channel inside
  its transaction (delivered at COMMIT); a waiter LISTENs on its own
  connection and returns at the first notification.  Behind a pooler a
  LISTEN would be left on a server connection others get, and the
  notification would never reach us: so a pooler is *detected* when the
  store is opened — the process id the server reports (``pg_backend_pid()``)
  differs from the one the connection was handed at start-up, which a
  pooler makes up — and then nobody LISTENs: waiters read again every 50 ms
  (acquire.POLL_S).  No URL parameter is needed (libpq would refuse one it
  does not know).
* **Riding out an outage.**  A restart, a failover or a killed connection
  shorter than the busy timeout changes nothing: every read, claim, end
  and report reconnects and tries again (a write that may have committed is
  recognized, not written twice), waiting at most the busy timeout counted
  from the first failure of the outage, so calls that follow one another
  share it.  Longer, it is one line naming the server and the cause.
* **Another version.**  A store made by a newer rssd_magic is opened
  :attr:`~PostgresBackend.read_only`: its records replay, and every write
  raises StoreError with the reason; ``open(readonly=True)`` does the same.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, TypeVar

import psycopg

from ..records.canonical import dumps
from ..engine.claims import close_orphaned_sessions
from ..records.ids import new_ulid
from ..engine.keys import CellKey
from ..store.locations import redact
from ..store import rows, tally
from ..store.base import ClaimOutcome, Holder, StoreError, Transition
from ..store.dialect import Tx
from ..store.journal import BUSY_TIMEOUT_S, Journal
from ..store.pending import Pending, pending_written
from .postgres_blobs import PgBlobs
from .postgres_conn import Sql, Unreachable, cause, close_quietly, connect, lost, target, transient
from .postgres_live import Listener, PgRenewer, channel
from .postgres_schema import PgDialect, ensure_schema

#: First pause before reconnecting a lost connection (doubled up to 2 s).
RECONNECT_PAUSE_S = 0.1
MAX_PAUSE_S = 2.0
#: Failures further apart than this are two outages, each with its own
#: busy timeout; closer, one (calls that follow one another share it).
NEW_OUTAGE_S = 2 * MAX_PAUSE_S
T = TypeVar("T")

#: A cell's latest transition through our function, whose plan the server
#: keeps (the replay's one read; postgres_schema.FUNCTIONS).
LATEST_CALL = "SELECT * FROM {rssd_magic_latest}(%s)"
#: Append one transition and its store order in one statement (the trigger
#: finds the seq row there and leaves it).
APPEND = """WITH q AS (INSERT INTO {rssd_magic_state_seq} (state_id, entry_id) VALUES (?, ?) RETURNING seq),
                 s AS (INSERT INTO {orchestration_session_state}
                       (orchestration_session_state_id, session_id, session_entry_id, from_state, to_state,
                        transition_result, transition_reason, transitioned_at, elaboration)
                       VALUES (?, ?, ?, ?, ?, ?, ?, {now}, ?) RETURNING transitioned_at)
            SELECT s.transitioned_at, q.seq FROM s, q"""


class PostgresBackend(Journal):
    """A schema on a PostgreSQL server.  Use :meth:`open`; one per kernel and URL."""

    scheme = "postgresql"
    kind = "PostgreSQL"

    def __init__(self, url: str, conn: psycopg.Connection, q: Sql, busy_timeout_s: float,
                 read_only: str | None, pooled: bool, latest_call: bool = False):  # fmt: skip
        super().__init__()
        self.url = url
        self.location = redact(url)
        self.q = q
        self.dialect = PgDialect(q)
        self.schema = q.schema
        self.conn = conn
        self.busy_timeout_s = busy_timeout_s
        #: Why nothing may be written (a newer version's store, or opened
        #: read-only); None when writable.
        self.read_only = read_only
        #: Behind a pooler (detected at open): nobody LISTENs, waiters poll.
        self.pooled = pooled
        # The replay's read: through our function when the store has it.
        self._latest = q(LATEST_CALL) if latest_call else self.dialect(rows.LATEST)
        self._latest_pinned = latest_call
        self.blobs = PgBlobs(self)
        self.pending = Pending()  # replay counts (a session is written when it starts)
        self._hits_due_at = time.monotonic()
        self._user_sql: psycopg.Connection | None = None
        self._listener = None if pooled else Listener(url)
        self._awaited: str | None = None
        self._closed = False
        self._down_since: float | None = None  # the current outage: first and last failure
        self._down_last = 0.0
        self._owns_session = True  # False for a writer(): its session is another instance's

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        location: str,
        *,
        session_args: dict | None = None,
        create: bool = True,
        readonly: bool = False,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        allow_network_fs: bool = False,
        notify: Callable[[str], None] | None = None,
    ) -> "PostgresBackend":
        """Connect to the server at *location* (a libpq URL) and make its
        current schema ready, or raise StoreError naming the target and the
        cause.  Databases are never created (*create* only matters for
        files); *readonly* refuses a schema without surveilr's tables and
        writes nothing (nor does a store of a newer version: see
        :attr:`read_only`)."""
        url = str(location)
        conn = connect(url)
        try:
            layout, q = ensure_schema(conn, readonly=readonly, timeout_s=busy_timeout_s)
            (server_pid,) = conn.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()
            read_only = layout.read_only or ("opened read-only" if readonly else None)
            # Our function when this version made it (a newer one may have changed it).
            ours = "rssd_magic_latest" in layout.functions and "rssd_magic_state_seq" in layout.columns
            backend = cls(url, conn, q, busy_timeout_s, read_only, server_pid != conn.info.backend_pid,
                          ours and not layout.newer)  # fmt: skip
            if layout.read_only and notify is not None:
                notify(f"[stateful] PostgreSQL {redact(url)}: {layout.read_only}")
            if session_args is not None and read_only is None:
                backend.start_session(session_args)
                close_orphaned_sessions(backend)
            return backend
        except ValueError as exc:
            conn.close()
            raise StoreError(f"PostgreSQL {redact(url)}: {exc}") from None
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"PostgreSQL {redact(url)}: {cause(exc)}") from None
        except BaseException:
            conn.close()
            raise

    # -- connections and transactions -----------------------------------------------

    def _live(self) -> psycopg.Connection:
        """The main connection, reconnected if the link was lost."""
        if self._closed:
            raise StoreError(f"PostgreSQL {self.location}: closed")
        if lost(self.conn):
            self.conn = connect(self.url)
        return self.conn

    def _attempts(self, fn: Callable[[psycopg.Connection], T], *, patient: bool = True) -> T:
        """``fn(conn)`` on the live connection, tried again on a new one
        while the server is away (a restart, a failover, a killed link), for
        up to the busy timeout counted from the outage's first failure
        (*patient* False: one try).  Other driver errors, and an outage past
        the busy timeout, become StoreError; anything else passes through."""
        pause = RECONNECT_PAUSE_S
        while True:
            try:
                out = fn(self._live())
                self._down_since = None
                return out
            except psycopg.Error as exc:
                if not transient(exc, self.conn):
                    raise StoreError(f"PostgreSQL {self.location}: {cause(exc)}") from None
                if not lost(self.conn):
                    self.conn.close()  # a standby, a shutting-down server: next try on a new connection
                why = f"lost the connection to {target(self.url)}: {cause(exc)}"
            except Unreachable as exc:
                why = exc.why
            now = time.monotonic()
            if self._down_since is None or now - self._down_last > NEW_OUTAGE_S:
                self._down_since = now
            self._down_last = now
            down = now - self._down_since
            if not patient or down + pause > self.busy_timeout_s:
                longer = f" (for {down:.0f}s, longer than the busy timeout of {self.busy_timeout_s:g}s)" if patient else ""
                raise StoreError(f"PostgreSQL {self.location}: {why}{longer}") from None
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_S)

    def _tx(self, fn: Callable[[psycopg.Connection, bool], Any], *, patient: bool = True) -> Any:
        """``fn(conn, retrying)`` in one transaction (:meth:`_attempts`:
        ``retrying`` is True once a try failed — whatever *fn* wrote then
        may have committed).  Fenced and the like pass through, rolled back."""
        tries = [False]

        def attempt(conn: psycopg.Connection) -> Any:
            retrying, tries[0] = tries[0], True
            with self.q.tx(conn):
                return fn(conn, retrying)

        return self._attempts(attempt, patient=patient)

    def _fetch(self, template: str, params: tuple | list = (), *, pinned: bool = False, rendered: bool = False) -> list[tuple]:
        """Rows of one statement (a template of :class:`Sql`), in one round
        trip with its deadline; riding out an outage like :meth:`_tx`."""
        return self._attempts(lambda conn: self.q.read(conn, template, params, pinned=pinned, rendered=rendered))

    # journal.py's hooks

    def read(self, fn: Callable[[Tx], Any]) -> Any:
        return self._tx(lambda c, _retrying: fn(Tx(c, self.dialect)))

    def write(self, fn: Callable[[Tx, bool], Any]) -> Any:
        self._writable()

        def run(c: psycopg.Connection, retrying: bool) -> Any:
            t = Tx(c, self.dialect, deferred=True)
            out = fn(t, retrying)
            tally.settle(t)  # last: see there
            return out

        return self._tx(run)

    def query(self, template: str, params: Any = ()) -> list[tuple]:
        return self._fetch(self.dialect(template), params, rendered=True)

    def each(self, template: str, params: Any = ()) -> Iterator[tuple]:
        # Streamed in one transaction; not tried again (what was read is gone).
        try:
            conn = self._live()
            with self.q.tx(conn):
                yield from Tx(conn, self.dialect).stream(template, params)
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL {self.location}: {cause(exc)}") from None

    def footprint(self) -> tuple[int, int, dict]:
        # What the tables of this schema take on the server's disk (with
        # their indexes and TOAST): the nearest thing to an RSSD's file size.
        (on_disk,) = self._fetch(
            """SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class AS c
               JOIN pg_namespace AS n ON n.oid = c.relnamespace
               WHERE n.nspname = %s AND c.relkind IN ('r', 'p')
                 AND (c.relname LIKE 'rssd\\_magic\\_%%' OR c.relname LIKE 'orchestration\\_%%' OR c.relname = 'device')""",
            (self.schema,), rendered=True,
        )[0]
        return int(on_disk), 0, {"schema": self.schema}

    # -- sessions ------------------------------------------------------------------

    def start_session(self, args: dict) -> str:
        if self.session_id is not None:
            return self.session_id
        session = rows.new_session(new_ulid(), self.host, args)  # stamped by the server's clock
        self.write(lambda t, retrying: rows.start_session(t, session, retrying))
        self.session_id = session["id"]
        return self.session_id

    def writer(self) -> "PostgresBackend":
        other = PostgresBackend.open(self.url, busy_timeout_s=self.busy_timeout_s)
        other.session_id = self.session_id
        other._owns_session = False  # its session is this instance's: closing it ends none
        return other

    def close(self, *, failed: bool = False) -> None:
        if self._closed:
            return
        try:
            # At exit a lost link is not reopened: the next kernel closes the session.
            if self.session_id is not None and self._owns_session and self.read_only is None and not lost(self.conn):

                def tx(c: psycopg.Connection, _retrying: bool) -> None:
                    self._flush_hits(Tx(c, self.dialect))
                    rows.end_session(Tx(c, self.dialect), self.session_id, failed)

                self._tx(tx, patient=False)  # at exit: no waiting for a server that is gone
        except (StoreError, psycopg.Error):
            pass  # closing must never raise at interpreter exit
        finally:
            self._closed = True
            if self._listener is not None:
                self._listener.close()
            close_quietly(self.conn)
            close_quietly(self._user_sql)

    # -- waiting for other kernels ------------------------------------------------------

    def wait_for_change(self, timeout: float) -> None:
        """Sleep until the awaited cell's channel is notified, or *timeout*.
        The channel is the one of the cell :meth:`claim` last found held;
        behind a pooler (no LISTEN) this only sleeps: the caller polls."""
        if self._awaited is None or self._listener is None:
            time.sleep(timeout)
        else:
            self._listener.wait(self._awaited, timeout)

    # -- the hot path --------------------------------------------------------------------

    def latest(self, key: CellKey) -> Transition | None:
        found = self._fetch(self._latest, (key.ingest_src,), pinned=self._latest_pinned, rendered=True)
        return Transition(*found[0]) if found else None

    def _hits_due(self) -> None:
        # Also written with the next claim, and at close.
        try:
            self._tx(lambda c, _r: self._flush_hits(Tx(c, self.dialect)), patient=False)  # a replay never waits for this
        except StoreError:
            pass  # unreachable now: keep counting, try again later

    def flush_hits(self, patience_s: float | None = None) -> None:
        if self.pending and self.read_only is None:
            self._tx(lambda c, _r: self._flush_hits(Tx(c, self.dialect)))

    def _flush_hits(self, t: Tx) -> None:
        with pending_written(t, self.pending):
            pass  # in the caller's transaction

    # -- claims (journal.py's hooks) ------------------------------------------------------

    def _before_claim(self, t: Tx) -> None:
        self._flush_hits(t)

    def _lock(self, t: Tx, ingest_src: str, create: bool = True) -> None:
        # The cell's claim row (made when missing), held until the transaction ends.
        if create:
            t.run("INSERT INTO {rssd_magic_claim} (ingest_src) VALUES (?) ON CONFLICT DO NOTHING", (ingest_src,))
        t.one(rows.CLAIM + " WHERE ingest_src = ? FOR UPDATE", (ingest_src,))

    def _take(self, t: Tx, ingest_src: str, entry_id: str, state_id: str, h: Holder, lease_s: float):
        text = t.d.text
        token, claimed_at = t.one(
            """UPDATE {rssd_magic_claim} SET token = token + 1, entry_id = ?, state_id = ?, session_id = ?,
                   host = ?, machine = ?, boot = ?, pidns = ?, pid = ?, started = ?, beat = 0,
                   lease_s = ?, claimed_at = {now}, heartbeat_at = clock_timestamp()
               WHERE ingest_src = ? RETURNING token, claimed_at""",
            (entry_id, state_id, self.session_id, text(h.host), text(h.machine), text(h.boot), text(h.pidns), h.pid,
             h.started, lease_s, ingest_src),
        )  # fmt: skip
        return int(token), claimed_at, 0.0

    def _release(self, t: Tx, ingest_src: str, entry_id: str, token: int, done: Transition) -> None:
        # Released, and the cell's waiters told (delivered at COMMIT).
        t.run("UPDATE {rssd_magic_claim} SET state_id = NULL WHERE ingest_src = ? AND token = ? RETURNING pg_notify(?, ?)",
              (ingest_src, token, channel(self.schema, ingest_src), done.state_id))  # fmt: skip

    def _last_claim(self, t: Tx, ingest_src: str, entry_id: str) -> tuple | None:
        return t.one(rows.CLAIM + " WHERE ingest_src = ?", (ingest_src,))

    def _insert(self, t, entry_id, from_state, to_state, result_json, reason, elaboration, state_id=None) -> Transition:
        state_id = state_id or new_ulid()
        reason = t.d.text(reason)
        at, seq = t.one(
            APPEND,
            (state_id, entry_id, state_id, self.session_id, entry_id, from_state, to_state, result_json, reason,
             dumps(elaboration) if elaboration is not None else None),
        )  # fmt: skip
        return Transition(state_id, entry_id, self.session_id, from_state, to_state, result_json, reason, at, int(seq))

    def _claimed(self, outcome: ClaimOutcome, key: CellKey) -> None:
        if outcome.kind == "held":
            self._awaited = channel(self.schema, key.ingest_src)

    def renewer(self) -> PgRenewer:
        return PgRenewer(self.url, self.location, self.q, self.dialect)

    # -- the user's SQL on the server itself ---------------------------------------------

    def sql_connection(self) -> psycopg.Connection:
        """A connection of its own (autocommit, no prepared statements;
        run_sql opens and closes the cell's transactions), in the same
        schema as the state (the one its search_path starts with)."""
        if lost(self._user_sql):
            self._user_sql = connect(self.url, purpose="sql")
        return self._user_sql
