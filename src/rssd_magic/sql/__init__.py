"""SQL cells: reading, keying and running ``%%stateful --sql`` bodies, and
keeping their result tables.

A SQL cell runs on a *target*: a DuckDB connection, a ``sqlite3``
connection, or the RSSD itself.  One module per idea:

``lexer``
    tokens and statements of the SQL text, :func:`normalize_sql`,
    :func:`placeholders`, :func:`split_statements`;
``target``
    which engine a connection is, and :func:`target_identity`, the database
    it names in the key;
``key``
    :func:`bind` (``$name``/``:name`` parameters from the notebook),
    :func:`key_extra` (SQL, target and the parameters' fingerprints),
    and :func:`params_inputs`;
``run``
    :func:`run_sql`: statements, transactions and rollback, giving a
    :class:`SQLResult` or raising :class:`SQLExecutionError`;
``locks``
    :func:`describe_lock_error`: which process holds a DuckDB file's lock;
``frames``
    result tables kept as JSON, Parquet, Arrow or pickle
    (:func:`dump_frame`, :func:`load_frame`, :func:`frame_bundle`),
    registered as serialize's ``frame`` codec.

The names below are the package's interface (``from rssd_magic import sql;
sql.run_sql(...)``).  Nothing here imports IPython; pandas and pyarrow are
imported when a frame is first built.
"""

from __future__ import annotations

from .frames import COMPRESSION, DISPLAY_MAX_ROWS, JSON_MAX_BYTES, JSON_MAX_CELLS, dump_frame, frame_bundle, load_frame
from .key import SQL_KEY_VERSION, bind, key_extra, params_inputs
from .lexer import SQLUsageError, normalize_sql, placeholders, split_statements
from .locks import describe_lock_error
from .run import SQLExecutionError, SQLResult, StatementOutcome, run_sql
from .target import target_identity

__all__ = [
    "COMPRESSION",
    "DISPLAY_MAX_ROWS",
    "JSON_MAX_BYTES",
    "JSON_MAX_CELLS",
    "SQL_KEY_VERSION",
    "SQLExecutionError",
    "SQLResult",
    "SQLUsageError",
    "StatementOutcome",
    "bind",
    "describe_lock_error",
    "dump_frame",
    "frame_bundle",
    "key_extra",
    "load_frame",
    "normalize_sql",
    "params_inputs",
    "placeholders",
    "run_sql",
    "split_statements",
    "target_identity",
]
