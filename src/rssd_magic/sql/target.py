"""Which database a SQL cell runs on: the engine of a connection, and the
target's identity that goes into the cell key.

A key must change when re-running the cell would touch a different
database, and only then.  So the identity is the database file's real path
(a relative path and a symlink name the same file), or, for an in-memory
database, a token unique to that connection object: a fresh kernel's new
``:memory:`` database is empty, so a cell run against the old one must run
again.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
import uuid
import weakref
from typing import Any

from .lexer import SQLUsageError


def engine_of(conn: Any) -> str:
    """``"sqlite"``, ``"duckdb"`` or ``"postgresql"``; a SQLUsageError for
    anything else.

    DuckDB and psycopg are looked up in ``sys.modules``: a connection can
    only be one of theirs if its driver is loaded, and a SQLite-only
    notebook need not pay for importing them.
    """
    if isinstance(conn, sqlite3.Connection):
        return "sqlite"
    duckdb = sys.modules.get("duckdb")
    if duckdb is not None and isinstance(conn, duckdb.DuckDBPyConnection):
        return "duckdb"
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(conn, psycopg.Connection):
        return "postgresql"
    t = type(conn)
    raise SQLUsageError(
        f"a SQL target must be a duckdb.DuckDBPyConnection, a sqlite3.Connection or a psycopg.Connection, "
        f"not {t.__module__}.{t.__qualname__}"
    )


_URI_SCHEME = re.compile(r"[A-Za-z][\w+.-]+:")


def _file_identity(path: str) -> str:
    # Relative paths are resolved against the current folder; URIs such as
    # MotherDuck's ``md:db`` are kept as they are.
    if _URI_SCHEME.match(path) and not os.path.isabs(path):
        return path
    return os.path.realpath(os.path.abspath(path))


# One token per in-memory DuckDB connection, by id(); the weak reference drops
# the entry when the connection is freed (its id may then be reused).
_duckdb_tokens: dict[int, tuple[Any, str]] = {}


def _duckdb_memory_token(conn: Any) -> str:
    key = id(conn)
    entry = _duckdb_tokens.get(key)
    if entry is not None and entry[0]() is conn:
        return entry[1]
    token = uuid.uuid4().hex
    _duckdb_tokens[key] = (weakref.ref(conn, lambda _r, k=key: _duckdb_tokens.pop(k, None)), token)
    return token


_SQLITE_IDENTITY_FN = "rssd_magic_connection_identity"


def _sqlite_memory_token(conn: sqlite3.Connection) -> str:
    # sqlite3 connections take no weak references and id() is reused once a
    # connection is freed; a SQL function registered on the connection lives
    # and dies with it, and changes nothing in the database.
    try:
        return conn.execute(f"SELECT {_SQLITE_IDENTITY_FN}()").fetchone()[0]
    except sqlite3.OperationalError:
        token = uuid.uuid4().hex
        conn.create_function(_SQLITE_IDENTITY_FN, 0, lambda: token, deterministic=True)
        return token


def _postgres_identity(conn: Any) -> str:
    """``postgresql:<host>:<port>/<database>``: the server and database the
    connection reached (a socket folder is its host).  The user and the
    search_path are not part of it: they change what is visible, not which
    data a cell changes."""
    if conn.closed or conn.broken:
        raise SQLUsageError("the PostgreSQL connection can't be used: it is closed")
    info = conn.info
    return f"postgresql:{info.host}:{info.port}/{info.dbname}"


def target_identity(conn: Any) -> str:
    """``"duckdb:/abs/file"``, ``"sqlite:/abs/file"``, or
    ``"<engine>:memory:<token>"`` for an in-memory (or SQLite temporary)
    database: the token is unique to that connection object.  A PostgreSQL
    connection is ``"postgresql:<host>:<port>/<database>"``.

    For DuckDB the database is the one the connection opened (the first
    attached), not the current one after ``USE``: a replayed cell does not
    re-run its ``USE``, so the current database is not stable across kernels.
    """
    engine = engine_of(conn)
    if engine == "postgresql":
        return _postgres_identity(conn)
    try:
        if engine == "sqlite":
            path = next((r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main"), "")
            if not path:
                return f"sqlite:memory:{_sqlite_memory_token(conn)}"
            return f"sqlite:{_file_identity(path)}"
        # A cursor, so a result the user has not fetched yet is left alone.
        cur = conn.cursor()
        try:
            row = cur.execute(
                "SELECT path FROM duckdb_databases() WHERE NOT internal ORDER BY database_oid LIMIT 1"
            ).fetchone()
        finally:
            cur.close()
    except sqlite3.ProgrammingError as exc:
        raise SQLUsageError(f"the SQLite connection can't be used: {exc}") from None
    except Exception as exc:  # duckdb.ConnectionException for closed connections
        if type(exc).__module__.split(".")[0] in ("duckdb", "_duckdb"):
            raise SQLUsageError(f"the DuckDB connection can't be used: {exc}") from None
        raise
    if not row or not row[0] or row[0] == ":memory:":
        return f"duckdb:memory:{_duckdb_memory_token(conn)}"
    return f"duckdb:{_file_identity(row[0])}"

