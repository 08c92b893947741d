"""Reaching a PostgreSQL server: opening connections, and saying in one line
why one could not be opened or was lost — naming host, port and database,
never the password.

Every connection is in autocommit mode: a transaction is always one of ours,
opened and closed by ``with conn.transaction()`` around a few statements,
so nothing stays open between two of them (PgBouncer in transaction mode,
``idle_in_transaction_session_timeout`` and pools all rely on that).
Transactions are READ COMMITTED whatever the server's default, because a
claim reads *after* taking its row lock and must see what the previous
holder of that lock committed.
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import redact
from .base import StoreError

#: Seconds to wait for a server that does not answer (libpq waits forever).
CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "rssd_magic"


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


def connect(url: str, *, lock_timeout_s: float | None = None, purpose: str = "") -> psycopg.Connection:
    """An autocommit connection, or StoreError naming the target and cause."""
    given = params_of(url)
    extra: dict = {}
    if "connect_timeout" not in given:
        extra["connect_timeout"] = CONNECT_TIMEOUT_S
    if "application_name" not in given:
        extra["application_name"] = APPLICATION_NAME + (f" {purpose}" if purpose else "")
    try:
        conn = psycopg.connect(url, autocommit=True, **extra)
    except psycopg.Error as exc:
        raise StoreError(f"PostgreSQL {redact(url)}: cannot connect to {target(url)}: {cause(exc)}") from None
    try:
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        if lock_timeout_s is not None:
            # Session-level, once: a write waiting for another's row lock
            # fails after the busy timeout instead of hanging.
            conn.execute(f"SET lock_timeout = {int(lock_timeout_s * 1000)}")
    except psycopg.Error as exc:
        conn.close()
        raise StoreError(f"PostgreSQL {redact(url)}: {cause(exc)}") from None
    return conn


def lost(conn: psycopg.Connection | None) -> bool:
    """True when *conn* can't be used any more (closed, or the link broke)."""
    return conn is None or conn.closed or conn.broken


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
