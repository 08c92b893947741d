"""Reaching a PostgreSQL server: opening connections, the statements of one
store (:class:`Sql`), and saying in one line why a connection could not be
opened or was lost — naming host, port and database, never the password.

Everything here works the same on a direct connection and behind a pooler
(PgBouncer in transaction or session mode), because nothing outlives a
transaction:

* **No prepared statements**: every connection is opened with
  ``prepare_threshold=None`` (PgBouncer before 1.21 can't carry a prepared
  statement from one transaction to the next, which may run on another
  server connection).
* **No session settings.**  Each transaction starts with its own ``SET
  LOCAL``: ``lock_timeout`` and ``statement_timeout`` (the busy timeout, so a
  lock or a hostile function can't hang a kernel) and ``search_path =
  pg_catalog, pg_temp``, so every name we leave unqualified (functions,
  operators, types) is the system's.  A single read sends the same
  settings ahead of its statement in one simple-protocol query (one round
  trip, no more than an unprepared extended-protocol query costs).
* **Qualified names.**  Our tables and functions are written
  ``"schema"."name"``, quoted as identifiers and rendered once per store
  (:class:`Sql`): a schema earlier on someone's ``search_path`` can't shadow
  them (the CVE-2018-1058 pattern), and a pooler handing us another server
  connection can't change which schema we use.

Connections are in autocommit mode: a transaction is always one of ours,
opened and closed by :meth:`Sql.tx` around a few statements.  Transactions
are READ COMMITTED whatever the server's default (sent with each BEGIN),
because a claim reads *after* taking its row lock and must see what the
previous holder of that lock committed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from ..store.locations import redact
from ..store.base import StoreError

#: Seconds to wait for a server that does not answer (libpq waits forever).
CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "rssd_magic"
#: Unqualified names resolve in the system catalog only (and never in a
#: temporary schema first).
SEARCH_PATH = "pg_catalog, pg_temp"
#: SQLite's CURRENT_TIMESTAMP text, from the server's clock (``{now}`` in a template).
NOW = "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')"
#: SQLSTATEs after which the same statement may well succeed on a new
#: connection: shutdown, crash, start-up, a standby after a failover, no slot.
TRANSIENT = {"57P01", "57P02", "57P03", "25006", "53300"}


class Unreachable(StoreError):
    """A connection could not be opened: the message says to what and why,
    ``why`` says it without naming the store."""

    def __init__(self, url: str, why: str):
        super().__init__(f"PostgreSQL {redact(url)}: {why}")
        self.why = why


def params_of(url: str) -> dict:
    """The connection parameters of a libpq URI (StoreError when it is not one)."""
    try:
        return conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise StoreError(f"PostgreSQL {redact(url)}: not a valid connection URL ({_first_line(exc)})") from None


def target(url: str) -> str:
    """``database D on host H port P`` for messages (a socket folder is a host)."""
    p = params_of(url)
    host = p.get("host") or p.get("hostaddr") or "the local socket"
    db = p.get("dbname") or p.get("user") or "(your user name)"
    return f"database {db} on host {host} port {p.get('port') or 5432}"


def connect(url: str, *, purpose: str = "") -> psycopg.Connection:
    """An autocommit connection without prepared statements, or
    :class:`Unreachable` naming the target and the cause."""
    given = params_of(url)
    extra: dict = {}
    if "connect_timeout" not in given:
        extra["connect_timeout"] = CONNECT_TIMEOUT_S
    if "application_name" not in given:
        extra["application_name"] = APPLICATION_NAME + (f" {purpose}" if purpose else "")
    try:
        conn = psycopg.connect(url, autocommit=True, prepare_threshold=None, **extra)
    except psycopg.Error as exc:
        raise Unreachable(url, f"cannot connect to {target(url)}: {cause(exc)}") from None
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED  # sent with each BEGIN, not a SET
    return conn


def lost(conn: psycopg.Connection | None) -> bool:
    """True when *conn* can't be used any more (closed, or the link broke)."""
    return conn is None or conn.closed or conn.broken


def close_quietly(conn: psycopg.Connection | None) -> None:
    """Close *conn*, whatever became of its link."""
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a broken link
            pass


def transient(exc: psycopg.Error, conn: psycopg.Connection | None) -> bool:
    """True when *exc* says the server went away or can't serve us yet (a
    restart, a failover), not that the statement is wrong: worth a new
    connection and another try."""
    state = getattr(exc, "sqlstate", None) or ""
    return lost(conn) or state.startswith("08") or state in TRANSIENT


def cause(exc: BaseException) -> str:
    """A driver error as a few words: libpq's reason without its framing
    (``connection to server at "h", port 5432 failed: FATAL:  …``)."""
    text = _first_line(exc)
    # libpq repeats the target before its reason; the message names it already.
    for marker in (" failed: ",):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    for prefix in ("connection failed: ", "connection is bad: ", "FATAL:  ", "ERROR:  "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text.strip() or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def quote(name: str) -> str:
    """*name* as an SQL identifier, ready for a statement that takes
    parameters (a ``%`` in it doubled)."""
    return sql.Identifier(name).as_string(None).replace("%", "%%")


def settings(timeout_s: float, *, lock: bool = True) -> str:
    """The ``SET LOCAL`` statements a transaction (or a read) starts with,
    sent as one query.  No parallel workers: reading another tool's JSON
    (``rssd_magic_json``) catches a failed cast, which a parallel worker
    can't (a report over every cell would otherwise fail on a large store)."""
    ms = max(1, int(timeout_s * 1000))
    out = (f"SET LOCAL statement_timeout = {ms}; SET LOCAL search_path = {SEARCH_PATH}; "
           "SET LOCAL max_parallel_workers_per_gather = 0")  # fmt: skip
    return (f"SET LOCAL lock_timeout = {ms}; " if lock else "") + out


class Sql:
    """The statements of one store.

    A template names our objects as ``{table_name}`` (and the schema as
    ``{schema}``); it is rendered once, the first time it is used, with each
    name schema-qualified and quoted — or, for a table a read-only store
    lacks, replaced by an empty stand-in (*stand_ins*: name -> subquery).
    Every rendered statement is executed with a parameter tuple (``()``
    when it has none), so that a ``%`` in a schema name is read as itself.
    """

    def __init__(self, schema: str, objects: Iterable[str], timeout_s: float, stand_ins: dict | None = None):
        self.schema = schema
        self.timeout_s = timeout_s
        q = quote(schema)
        self.names = {"schema": q, "now": NOW, **{name: f"{q}.{quote(name)}" for name in objects}, **(stand_ins or {})}
        self.setup = settings(timeout_s)
        self._prefix = settings(timeout_s, lock=False) + "; "
        self._rendered: dict[str, str] = {}
        self._reads: dict[tuple[str, bool], tuple[str, int]] = {}

    def __call__(self, template: str) -> str:
        try:
            return self._rendered[template]
        except KeyError:
            text = self._rendered[template] = template.format_map(self.names)
            return text

    def read(self, conn: psycopg.Connection, template: str, params: tuple | list | dict = (), *,
             pinned: bool = False, rendered: bool = False) -> list[tuple]:  # fmt: skip
        """The rows of one statement, run with the read settings in the same
        query (one round trip, its own implicit transaction).  *pinned*: the
        statement only calls a function of ours that pins its own
        search_path, so only the deadline is set (a statement less to run).
        *rendered*: *template* is final SQL already (a dialect's)."""
        found = self._reads.get((template, pinned))
        if found is None:
            prefix = f"SET LOCAL statement_timeout = {max(1, int(self.timeout_s * 1000))}; " if pinned else self._prefix
            found = self._reads[(template, pinned)] = (prefix + (template if rendered else self(template)),
                                                       prefix.count("SET LOCAL"))  # fmt: skip
        text, sets = found
        cur = psycopg.ClientCursor(conn)
        cur.execute(text, params)
        for _ in range(sets):
            cur.nextset()  # past the SETs, to the statement's rows
        return cur.fetchall()

    @contextmanager
    def tx(self, conn: psycopg.Connection, timeout_s: float | None = None) -> Iterator[psycopg.Connection]:
        """One transaction on *conn*, with this store's settings (or
        timeouts of *timeout_s*)."""
        with conn.transaction():
            conn.execute(self.setup if timeout_s is None else settings(timeout_s))
            yield conn
