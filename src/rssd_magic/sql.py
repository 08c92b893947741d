"""SQL cells: reading, keying and running ``%%stateful --sql`` bodies, and
keeping their result tables.

A SQL cell runs on a *target*: a DuckDB connection, a ``sqlite3`` connection,
or the RSSD itself.  Its key must change exactly when re-running it could
do something different, so :func:`key_extra` folds in three things:

* the SQL, normalized by :func:`normalize_sql`: comments (``--`` and
  ``/* */``) and spacing do not count, string literals and quoted
  identifiers count byte for byte;
* the target's identity (:func:`target_identity`): the database file's real
  path, or for an in-memory database a token unique to that connection
  object (a fresh kernel's new ``:memory:`` database is empty, so a cell run
  against the old one must run again);
* the parameters' values, as canonical JSON (hashes for large or non-JSON
  values).

Parameters are written ``$name`` or ``:name`` on both engines: SQLite reads
both natively and :func:`bind` rewrites ``:name`` to DuckDB's ``$name``.  A
``:name`` only counts as a parameter where an operand can start (after a
space, an operator, ``(`` or ``,``): ``x::INT``, ``arr[1:n]``,
``{'k':v}``, ``f(a := 1)`` and ``lambda x: x`` are DuckDB syntax, not
parameters.  Positional ``?`` and ``$1`` are refused: a value without a name
can't be shown in the key.

:func:`run_sql` runs the statements one by one (to know which one returned
the rows to show) inside one transaction, rolled back if any statement
fails (DDL included: both engines roll back ``CREATE``/``DROP``/``ALTER``,
and DuckDB an ``ATTACH``).  Two kinds of cells can't be one transaction:

* a cell with its own ``BEGIN``/``COMMIT``/``ROLLBACK``/``SAVEPOINT``: run
  as written; after a failure whatever transaction it left open is rolled
  back, and a cell that ends inside a transaction it opened is an error
  (rolled back), because a cell recorded as run must have its effects
  committed;
* statements that can't run inside a transaction — SQLite ``VACUUM`` and
  ``PRAGMA journal_mode/synchronous/foreign_keys = …`` (the last is
  silently ignored inside one), DuckDB ``CHECKPOINT`` / ``FORCE
  CHECKPOINT`` — run on their own, in autocommit; the statements between
  them are grouped into transactions, so a failure undoes only its group.

Whatever the engine keeps outside transactions is never undone: settings
(DuckDB ``SET``/``USE``/``PRAGMA x=…``, SQLite ``PRAGMA cache_size`` …),
SQLite ``ATTACH``/``DETACH`` and DuckDB ``DETACH``, sequence values
(DuckDB ``nextval``), files written by ``COPY … TO`` or ``EXPORT
DATABASE``, installed/loaded extensions.  A target that already has an
open transaction is refused before anything runs: the cell's effects would
be committed (or not) by someone else.

Result frames are kept by :func:`dump_frame`: small ones as JSON inside the
spec (readable with ``json_extract``), larger ones as one Parquet blob
(readable by DuckDB's ``read_parquet``), Arrow IPC when Parquet would change
a column type, a pickle when Arrow can't hold the frame at all (loaded only
from a trusted payload).  Dtypes survive every route.

Nothing here imports IPython; pandas and pyarrow are imported when a frame
is first built.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import json
import math
import os
import pickle
import re
import sqlite3
import sys
import uuid
import weakref
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

from .serialize import Blob, Codec, dump_value, load_names, register, spec_blobs, type_name
from .trust import stream_digest

#: Bumped whenever what goes into :func:`key_extra` changes.
SQL_KEY_VERSION = "rssd_magic.sql.v1"
#: Frames with at most this many cells (rows × columns) may be kept as JSON…
JSON_MAX_CELLS = 10_000
#: …if their encoded data also stays under this many bytes.
JSON_MAX_BYTES = 256 * 1024
#: Blob compression for Parquet and Arrow IPC.
COMPRESSION = "zstd"
#: Rows shown by the HTML/text table (the frame itself keeps all rows).
DISPLAY_MAX_ROWS = 60


class SQLUsageError(ValueError):
    """The cell can't be run as written (missing parameter, bad target, …).

    Raised before anything is executed.
    """


class SQLExecutionError(Exception):
    """A statement failed; carries the engine's own message.

    ``index`` is 0-based; ``rolled_back`` says whether the failing
    statement's transaction was rolled back; ``committed`` lists the
    (0-based) statements whose effects stay (committed before the failure).
    """

    def __init__(
        self,
        message: str,
        *,
        engine: str,
        index: int,
        statement: str,
        total: int,
        rolled_back: bool,
        committed: tuple[int, ...] = (),
        engine_message: str | None = None,
        error_type: str | None = None,
        headline: str | None = None,
    ):
        self.message = message
        self.headline = headline
        self.engine = engine
        self.index = index
        self.statement = statement
        self.total = total
        self.rolled_back = rolled_back
        self.committed = tuple(committed)
        self.engine_message = engine_message if engine_message is not None else message
        self.error_type = error_type
        super().__init__(self.describe())

    def outcome(self) -> str:
        """What the failure left behind, in words."""
        if not self.committed:
            return "rolled back: the cell changed nothing" if self.rolled_back else "nothing was committed"
        plural = "s" if len(self.committed) > 1 else ""
        kept = f"statement{plural} {_ranges(self.committed)} had already been committed"
        return f"rolled back; {kept}" if self.rolled_back else f"not rolled back: {kept}"

    def describe(self) -> str:
        if self.headline:
            return f"{self.headline} ({self.outcome()})"
        where = f"statement {self.index + 1} of {self.total}" if self.total > 1 else "the statement"
        return f"{where} failed ({self.outcome()}):\n{self.message}"

    def as_dict(self) -> dict:
        """JSON-able form, for the RSSD's ``transition_result``."""
        return {
            "engine": self.engine,
            "index": self.index,
            "statement": self.statement,
            "message": self.message,
            "error_type": self.error_type,
            "rolled_back": self.rolled_back,
            "committed": list(self.committed),
            "summary": self.describe(),
        }


def _ranges(indexes: tuple[int, ...]) -> str:
    """``(0, 1, 2, 4)`` → ``"1-3, 5"`` (1-based, as users count statements)."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive indexes
    for i in sorted(indexes):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a + 1}" if a == b else f"{a + 1}-{b + 1}" for a, b in runs)


# -- tokens -----------------------------------------------------------------


class Token(NamedTuple):
    kind: str  # word, number, string, qident, param, positional, op, punct
    text: str  # for params: the name only
    start: int
    end: int
    gap: bool  # whitespace or a comment came before it


_IDENT_START = re.compile(r"[^\W\d]", re.UNICODE)
_IDENT = re.compile(r"[^\W\d][\w$]*", re.UNICODE)
_PARAM_NAME = re.compile(r"[^\W\d]\w*", re.UNICODE)
_NUMBER = re.compile(
    r"(?:0[xX][0-9a-fA-F_]+|\d[\d_]*(?:\.[\d_]*)?(?:[eE][+-]?\d+)?|\.\d[\d_]*(?:[eE][+-]?\d+)?)\w*"
)
_DOLLAR_TAG = re.compile(r"\$(?:[^\W\d]\w*)?\$", re.UNICODE)
_DOLLAR_POSITIONAL = re.compile(r"\$\d+")
_QMARK_POSITIONAL = re.compile(r"\?\d*")
_PUNCT = set(",;()[]{}")
# A ``:`` right after one of these closes an operand (``a:b``, ``1:n``,
# ``'k':v``, ``x)::t``) rather than starting a ``:name`` parameter.
_NOT_BEFORE_PARAM = set("'\"`)]}:$.")


def _quoted_end(text: str, i: int, backslash: bool) -> int:
    """End of the string or quoted identifier opening at ``text[i]``: a
    doubled quote is an escaped one, and with *backslash* so is ``\\x``."""
    quote, n = text[i], len(text)
    i += 1
    while i < n:
        c = text[i]
        if backslash and c == "\\":
            i += 2
        elif c != quote:
            i += 1
        elif i + 1 < n and text[i + 1] == quote:
            i += 2
        else:
            return i + 1
    return n


_DIGITS = frozenset("0123456789")


def _tokens(text: str) -> Iterator[Token]:
    """Yield the tokens of *text*; comments and whitespace only set ``gap``.

    Unterminated strings and comments run to the end of the text (the engine
    reports the error; we just must not split inside them).  ``/* */`` does
    not nest (SQLite's rule).
    """
    i, n = 0, len(text)
    gap = False
    prev: Token | None = None
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            gap = True
            continue
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            gap = True
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            gap = True
            continue
        start = i
        if ch in "'\"`":
            # E'…' (DuckDB/PostgreSQL escape strings) take backslash escapes.
            backslash = (
                ch == "'" and prev is not None and not gap and prev.end == start
                and prev.kind == "word" and prev.text in ("E", "e")
            )
            i = _quoted_end(text, i, backslash)
            tok = Token("string" if ch == "'" else "qident", text[start:i], start, i, gap)
        elif ch == "$":
            m = _DOLLAR_TAG.match(text, i)
            if m:  # $$…$$ or $tag$…$tag$: a DuckDB dollar-quoted string
                j = text.find(m.group(), m.end())
                i = n if j < 0 else j + len(m.group())
                tok = Token("string", text[start:i], start, i, gap)
            else:
                m = _PARAM_NAME.match(text, i + 1)
                if m:
                    i = m.end()
                    tok = Token("param", m.group(), start, i, gap)
                elif m := _DOLLAR_POSITIONAL.match(text, i):
                    i = m.end()
                    tok = Token("positional", m.group(), start, i, gap)
                else:
                    i += 1
                    tok = Token("op", ch, start, i, gap)
        elif ch == ":":
            m = _PARAM_NAME.match(text, i + 1)
            before = text[i - 1] if i else " "
            if m and not (before in _NOT_BEFORE_PARAM or before == "_" or before.isalnum()):
                i = m.end()
                tok = Token("param", m.group(), start, i, gap)
            else:
                i += 1
                tok = Token("op", ch, start, i, gap)
        elif ch == "?":
            m = _QMARK_POSITIONAL.match(text, i)
            i = m.end()
            tok = Token("positional", m.group(), start, i, gap)
        # ASCII digits only: str.isdigit() is also true for "²", which the
        # number pattern doesn't match.
        elif ch in _DIGITS or (ch == "." and i + 1 < n and text[i + 1] in _DIGITS):
            m = _NUMBER.match(text, i)
            i = m.end()
            tok = Token("number", m.group(), start, i, gap)
        elif _IDENT_START.match(ch):
            m = _IDENT.match(text, i)
            i = m.end()
            tok = Token("word", m.group(), start, i, gap)
        else:
            i += 1
            tok = Token("punct" if ch in _PUNCT else "op", ch, start, i, gap)
        yield tok
        prev = tok
        gap = False


_Statement = tuple[Token, ...]


@lru_cache(maxsize=32)
def _statements(text: str) -> tuple[_Statement, ...]:
    """Token lists of the statements in *text* (empty statements dropped).

    ``;`` ends a statement except inside a SQLite trigger body
    (``CREATE TRIGGER … BEGIN …; …; END``), where ``CASE … END`` nests too.
    Memoized: a cell's body is normalized, bound, keyed and run, and each of
    these starts from its tokens.
    """
    out: list[_Statement] = []
    cur: list[Token] = []
    depth = 0  # BEGIN/CASE … END nesting inside a trigger
    trigger = False
    for tok in _tokens(text):
        if tok.kind == "punct" and tok.text == ";" and depth == 0:
            if cur:
                out.append(tuple(cur))
            cur, trigger = [], False
            continue
        cur.append(tok)
        if tok.kind != "word":
            continue
        word = tok.text.upper()
        if len(cur) <= 6 and word == "TRIGGER" and cur[0].text.upper() == "CREATE":
            trigger = True
        elif trigger and word in ("BEGIN", "CASE"):
            depth += 1
        elif trigger and word == "END" and depth:
            depth -= 1
    if cur:
        out.append(tuple(cur))
    return tuple(out)


def _source(text: str, toks: _Statement) -> str:
    """The statement *toks* of *text* as written."""
    return text[toks[0].start : toks[-1].end]


def split_statements(text: str) -> list[str]:
    """The statements of *text*, each as written (interior comments kept,
    surrounding ones and the ``;`` dropped)."""
    return [_source(text, toks) for toks in _statements(text)]


def _first_word(toks: _Statement) -> str:
    """The statement's leading keyword, upper-cased ("" if it starts otherwise)."""
    return toks[0].text.upper() if toks[0].kind == "word" else ""


_WORDISH = {"word", "number", "string", "qident", "param", "positional"}


def _side(tok: Token) -> str:
    if tok.kind in _WORDISH:
        return "w"
    return "o" if tok.kind == "op" else "p"


def _normalize_tokens(toks: _Statement) -> str:
    parts: list[str] = []
    prev: Token | None = None
    for tok in toks:
        # One space survives where dropping it would join two tokens into
        # something else (``a b``/``ab``, ``'a' 'b'``/``'a''b'``, ``- -``/
        # ``--``); elsewhere ``a = 1`` and ``a=1`` are the same SQL.
        if prev is not None and tok.gap and _side(prev) == _side(tok) != "p":
            parts.append(" ")
        parts.append("$" + tok.text if tok.kind == "param" else tok.text)
        prev = tok
    return "".join(parts)


def normalize_sql(text: str) -> str:
    """*text* with comments, spacing and empty statements folded away.

    String literals, quoted identifiers and letter case are kept exactly;
    ``:name`` parameters are written ``$name`` (they mean the same).
    """
    return ";\n".join(_normalize_tokens(toks) for toks in _statements(text))


def placeholders(sql: str) -> list[str]:
    """Names of the ``$name``/``:name`` parameters *sql* uses, in order."""
    seen: dict[str, None] = {}
    for tok in chain.from_iterable(_statements(sql)):
        if tok.kind == "param":
            seen.setdefault(tok.text, None)
    return list(seen)


def bind(sql: str, namespace: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(sql_for_engine, params)``: ``:name`` rewritten to ``$name`` (read by
    DuckDB and SQLite alike), and the values of the names *sql* uses.

    Raises :class:`SQLUsageError` for positional parameters and for names
    missing from *namespace* (all of them named).
    """
    return _bind(sql, chain.from_iterable(_statements(sql)), namespace, 0, len(sql))


def _bind(
    sql: str, toks: Iterable[Token], namespace: Mapping[str, Any], start: int, end: int
) -> tuple[str, dict[str, Any]]:
    """:func:`bind` for ``sql[start:end]``, whose tokens are *toks*."""
    parts: list[str] = []
    last = start
    params: dict[str, Any] = {}
    missing: list[str] = []
    for tok in toks:
        if tok.kind == "positional":
            raise SQLUsageError(
                f"positional SQL parameter {tok.text} is not supported: "
                "use $name or :name, so the value is bound from a variable and counted in the cell key"
            )
        if tok.kind != "param":
            continue
        parts += (sql[last : tok.start], "$" + tok.text)
        last = tok.end
        if tok.text in params or tok.text in missing:
            continue
        if tok.text in namespace:
            params[tok.text] = namespace[tok.text]
        else:
            missing.append(tok.text)
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise SQLUsageError(
            f"SQL parameter{plural} {', '.join(f'${m}' for m in missing)} {'are' if plural else 'is'} not defined: "
            f"no variable{plural} {', '.join(repr(m) for m in missing)} in the namespace"
        )
    parts.append(sql[last:end])
    return "".join(parts), params


# -- targets ----------------------------------------------------------------


def _engine(conn: Any) -> str:
    if isinstance(conn, sqlite3.Connection):
        return "sqlite"
    duckdb = sys.modules.get("duckdb")
    if duckdb is not None and isinstance(conn, duckdb.DuckDBPyConnection):
        return "duckdb"
    t = type(conn)
    raise SQLUsageError(
        f"a SQL target must be a duckdb.DuckDBPyConnection or a sqlite3.Connection, "
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


def target_identity(conn: Any) -> str:
    """``"duckdb:/abs/file"``, ``"sqlite:/abs/file"``, or
    ``"<engine>:memory:<token>"`` for an in-memory (or SQLite temporary)
    database: the token is unique to that connection object.

    For DuckDB the database is the one the connection opened (the first
    attached), not the current one after ``USE``: a replayed cell does not
    re-run its ``USE``, so the current database is not stable across kernels.
    """
    engine = _engine(conn)
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


# -- keys -------------------------------------------------------------------


def _sha(data: Any) -> str:
    # Bare hex, not trust.stream_digest's "sha256:…": the key format is fixed.
    return hashlib.sha256(data).hexdigest()


def _canonical(value: Any, path: str = "") -> Any:
    """A JSON value that is equal for equal parameter values, and stable
    across kernels (no ids, no set or hash order)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if type(value) is int:
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) <= 64:
            return {"$bytes": base64.b64encode(data).decode("ascii")}
        return {"$bytes_sha256": _sha(data), "len": len(data)}
    if isinstance(value, _dt.datetime):
        return {"$datetime": value.isoformat(), "type": type(value).__name__}
    if isinstance(value, _dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, _dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, _dt.timedelta):
        return {"$timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, int):  # int subclasses (IntEnum …)
        return {"$int": int(value), "type": type_name(value)}
    if isinstance(value, float):
        return {"$float": repr(float(value)), "type": type_name(value)}
    if type(value) is list:
        return [_canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if type(value) is tuple:
        return {"$tuple": [_canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if type(value) is dict:
        items = [[_canonical(k, path), _canonical(v, f"{path}[{k!r}]")] for k, v in value.items()]
        return {"$dict": sorted(items, key=_dumps)}
    if isinstance(value, (set, frozenset)):
        return {"$set": sorted((_canonical(v, path) for v in value), key=_dumps)}
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        import numpy as np

        if isinstance(value, np.generic):
            return {"$numpy": value.dtype.str, "value": _canonical(value.item(), path)}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                return {"$ndarray": "object", "shape": list(value.shape), "value": _canonical(value.tolist(), path)}
            data = np.ascontiguousarray(value).tobytes()
            return {"$ndarray": value.dtype.str, "shape": list(value.shape), "sha256": _sha(data)}
    if module == "pandas":
        import pandas as pd

        if isinstance(value, (pd.DataFrame, pd.Series, pd.Index)):
            frame = value.to_frame() if not isinstance(value, pd.DataFrame) else value
            shape = {
                "type": type_name(value),
                "dtypes": [str(d) for d in frame.dtypes],
                "columns": [str(c) for c in frame.columns],
                "index": None if isinstance(value, pd.Index) else str(value.index.dtype),
            }
            hashed = pd.util.hash_pandas_object(value, index=not isinstance(value, pd.Index))
            return {"$pandas": _sha(hashed.to_numpy().tobytes() + _dumps(shape).encode()), **shape}
    try:
        data = pickle.dumps(value, protocol=5)
    except Exception as exc:  # noqa: BLE001 - reported as a usage error
        raise SQLUsageError(
            f"SQL parameter {path or 'value'} of type {type_name(value)} can't be encoded "
            f"for the cell key ({type(exc).__name__}: {exc})"
        ) from None
    return {"$pickle_sha256": _sha(data), "type": type_name(value)}


def _dumps(obj: Any) -> str:
    """Canonical JSON for keys: store.dumps's form with sorted keys (store.dumps keeps dict order)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): _canonical(v, f"${k}") for k, v in params.items()}


def canonical_params(params: Mapping[str, Any]) -> str:
    """Canonical JSON of the parameter values (key order does not matter)."""
    return _dumps(_canonical_params(params))


def key_extra(sql: str, conn: Any, params: Mapping[str, Any] | None = None) -> str:
    """The ``extra`` to pass to :func:`rssd_magic.keys.cell_key` for a SQL cell.

    It holds the normalized SQL's hash too, so the key follows
    :func:`normalize_sql` even though ``cell_key`` normalizes its *code*
    argument as Python: pass ``normalize_sql(body)`` as the code.
    """
    return _dumps(
        {
            "v": SQL_KEY_VERSION,
            "sql": _sha(normalize_sql(sql).encode("utf-8")),
            "target": target_identity(conn),
            "params": _canonical_params(params or {}),
        }
    )


# -- running ----------------------------------------------------------------

_TXN_CONTROL = {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"}
# Settings that SQLite refuses (or, for foreign_keys, silently ignores) inside
# a transaction.
_SQLITE_OUTSIDE_PRAGMAS = {"JOURNAL_MODE", "SYNCHRONOUS", "FOREIGN_KEYS"}
_READ_FIRST = {"SELECT", "VALUES", "EXPLAIN"}
_WRITE_WORDS = {"INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER"}


def _outside_transaction(engine: str, toks: _Statement) -> bool:
    """Must this statement run on its own, outside any transaction?"""
    words = [t.text.upper() for t in toks[:3] if t.kind == "word"]
    if engine == "duckdb":
        return words[:1] == ["CHECKPOINT"] or words[:2] == ["FORCE", "CHECKPOINT"]
    if words[:1] == ["VACUUM"]:
        return True
    if words[:1] != ["PRAGMA"]:
        return False
    # PRAGMA [schema.]name = value | (value)
    rest = toks[1:]
    if len(rest) > 2 and rest[1].text == ".":
        rest = rest[2:]
    if len(rest) < 2 or rest[0].kind != "word":
        return False
    return rest[0].text.upper() in _SQLITE_OUTSIDE_PRAGMAS and rest[1].text in ("=", "(")


def _is_read(toks: _Statement) -> bool:
    word = _first_word(toks)
    if word == "WITH":
        return not any(t.kind == "word" and t.text.upper() in _WRITE_WORDS for t in toks)
    return word in _READ_FIRST


@dataclass(frozen=True)
class StatementOutcome:
    """How one statement went: ``kind`` is ``rows`` (it returned a table),
    ``changes`` (``rowcount`` rows inserted/updated/deleted) or ``status``."""

    index: int
    sql: str
    kind: str
    rowcount: int | None = None


@dataclass
class SQLResult:
    """What :func:`run_sql` did; ``frame`` is the last table returned."""

    frame: Any  # pandas.DataFrame | None
    frame_index: int | None
    statements: list[StatementOutcome]
    mode: str  # "transaction", "split" or "as-written"
    engine: str

    @property
    def rows_changed(self) -> int:
        return sum(s.rowcount or 0 for s in self.statements if s.kind == "changes")

    def summary(self) -> str:
        """One line: ``3 statements, 2 rows changed; result: 5 rows × 2 columns``."""
        n = len(self.statements)
        parts = [f"{n} statement{'s' if n != 1 else ''}"]
        if any(s.kind == "changes" for s in self.statements):
            parts.append(f"{self.rows_changed} row{'s' if self.rows_changed != 1 else ''} changed")
        text = ", ".join(parts)
        if self.frame is not None:
            r, c = self.frame.shape
            text += f"; result: {r} row{'s' if r != 1 else ''} × {c} column{'s' if c != 1 else ''}"
        return text

    def as_dict(self) -> dict:
        """JSON-able form (without the frame), for ``transition_result``."""
        return {
            "engine": self.engine,
            "mode": self.mode,
            "frame_index": self.frame_index,
            "rows_changed": self.rows_changed,
            "statements": [
                {"index": s.index, "kind": s.kind, "rowcount": s.rowcount} for s in self.statements
            ],
        }


def _is_engine_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return True
    duckdb = sys.modules.get("duckdb")
    return duckdb is not None and isinstance(exc, duckdb.Error)


class _Runner:
    """Engine-specific steps; the control flow lives in :func:`run_sql`."""

    engine = ""

    def __init__(self, conn: Any):
        self.conn = conn

    def execute(self, sql: str, params: dict) -> tuple[str, Any, int | None]:
        raise NotImplementedError

    def in_transaction(self) -> bool:
        raise NotImplementedError

    def begin(self, read_only: bool) -> None:
        self.conn.execute("BEGIN TRANSACTION")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> bool:
        """Roll back whatever transaction is open; True if one was."""
        try:
            self.conn.execute("ROLLBACK")
            return True
        except Exception as exc:  # noqa: BLE001 - "no transaction is active"
            if _is_engine_error(exc):
                return False
            raise

    def close(self) -> None:
        pass


class _SQLiteRunner(_Runner):
    engine = "sqlite"

    def __init__(self, conn: sqlite3.Connection):
        super().__init__(conn)
        if getattr(conn, "autocommit", None) is False:
            # Python 3.12+ PEP 249 mode: a transaction is always open, so the
            # cell's effects could not be committed apart from the user's.
            raise SQLUsageError(
                "the sqlite3 connection has autocommit=False (a transaction is always open); "
                "use autocommit=True or the default isolation_level for SQL cells"
            )
        if conn.in_transaction:
            raise SQLUsageError(
                "the SQLite connection has an open transaction: commit or roll it back first "
                "(a cell recorded as run must have its effects committed)"
            )
        # Python's sqlite3 would open and commit transactions behind our back
        # (implicit BEGIN before DML); with None it leaves them to us.
        self._saved = conn.isolation_level
        conn.isolation_level = None

    def close(self) -> None:
        self.conn.isolation_level = self._saved

    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def begin(self, read_only: bool) -> None:
        # IMMEDIATE takes the write lock up front, where the busy timeout
        # applies; a deferred transaction that reads then writes can fail
        # with "database is locked" without waiting.
        self.conn.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")

    def rollback(self) -> bool:
        if not self.conn.in_transaction:
            return False
        self.conn.execute("ROLLBACK")
        return True

    def execute(self, sql: str, params: dict) -> tuple[str, Any, int | None]:
        cur = self.conn.execute(sql, params) if params else self.conn.execute(sql)
        try:
            if cur.description is None:
                if cur.rowcount >= 0:
                    return "changes", None, cur.rowcount
                return "status", None, None
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
            return "rows", _sqlite_frame(names, rows), len(rows)
        finally:
            cur.close()


class _DuckDBRunner(_Runner):
    engine = "duckdb"

    def __init__(self, conn: Any):
        super().__init__(conn)
        if self.in_transaction():
            raise SQLUsageError(
                "the DuckDB connection has an open transaction: commit or roll it back first "
                "(a cell recorded as run must have its effects committed)"
            )

    def in_transaction(self) -> bool:
        # DuckDB has no "in transaction" flag; BEGIN tells, and is undone.
        try:
            self.conn.execute("BEGIN TRANSACTION")
        except Exception as exc:  # noqa: BLE001
            if _is_engine_error(exc) and "within a transaction" in str(exc):
                return True
            raise
        self.conn.execute("ROLLBACK")
        return False

    def execute(self, sql: str, params: dict) -> tuple[str, Any, int | None]:
        import duckdb

        conn = self.conn
        conn.execute(sql, params or None)
        desc = conn.description or []
        names = [d[0] for d in desc]
        st = duckdb.extract_statements(sql)
        expected = {t.name for t in st[0].expected_result_type} if st else {"QUERY_RESULT"}
        stype = st[0].type.name if st else ""
        if not desc or expected == {"NOTHING"}:
            conn.fetchall()
            return "status", None, None
        if "CHANGED_ROWS" in expected and names == ["Count"]:
            rows = conn.fetchall()
            return ("changes", None, int(rows[0][0])) if rows else ("status", None, None)
        if stype == "CALL" and names == ["Success"]:  # CHECKPOINT and friends
            conn.fetchall()
            return "status", None, None
        frame = conn.df()
        return "rows", frame, len(frame)


def _sqlite_frame(names: list[str], rows: list[tuple]) -> Any:
    """A DataFrame from SQLite rows: integer columns with NULLs become
    nullable ``Int64`` (pandas would make them float and lose big values)."""
    import pandas as pd

    columns = list(zip(*rows)) if rows else [() for _ in names]
    data: dict[int, Any] = {}
    for i, values in enumerate(columns):
        kinds = {type(v) for v in values if v is not None}
        if kinds == {int} and None in values:
            data[i] = pd.array(values, dtype="Int64")
        elif not values:
            data[i] = pd.Series([], dtype=object)
        else:
            data[i] = pd.Series(values)
    frame = pd.DataFrame(data, index=pd.RangeIndex(len(rows)))
    frame.columns = pd.Index(names)
    return frame


_RUNNERS: dict[str, type[_Runner]] = {"sqlite": _SQLiteRunner, "duckdb": _DuckDBRunner}


def run_sql(conn: Any, sql: str, params: Mapping[str, Any] | None = None) -> SQLResult:
    """Run every statement of *sql* on *conn*; see the module docstring for
    how they are grouped into transactions.

    *params* maps names to values (the second item of :func:`bind`, or any
    namespace: each statement takes only the names it uses).  Parameters
    and the target are checked before anything runs (:class:`SQLUsageError`);
    a failing statement raises :class:`SQLExecutionError` after the rollback.
    """
    statements = _statements(sql)
    if not statements:
        raise SQLUsageError("the cell has no SQL statements")
    engine = _engine(conn)
    texts = [_source(sql, toks) for toks in statements]
    bound = [_bind(sql, toks, params or {}, toks[0].start, toks[-1].end) for toks in statements]
    if engine == "duckdb":
        for _, p in bound:
            _check_duckdb_names(p)
    mode, groups = _plan(engine, statements)
    as_written = mode == "as-written"

    runner = _RUNNERS[engine](conn)
    outcomes: list[StatementOutcome] = []
    frame, frame_index = None, None
    committed: list[int] = []
    pending: list[int] = []  # done, in a transaction not yet committed
    current = -1
    is_open = False  # as-written cells: inside a transaction they opened
    try:
        for transactional, indexes in groups:
            if transactional:
                runner.begin(read_only=all(_is_read(statements[i]) for i in indexes))
            for i in indexes:
                current = i
                kind, result, rowcount = runner.execute(*bound[i])
                outcomes.append(StatementOutcome(i, texts[i], kind, rowcount))
                if kind == "rows":
                    frame, frame_index = result, i
                pending.append(i)
                if not transactional:
                    is_open = _open_after(runner, statements[i], is_open)
                    if not is_open:
                        committed.extend(pending)
                        pending.clear()
            if transactional:
                current = indexes[-1]
                runner.commit()
                committed.extend(pending)
                pending.clear()
        current = len(statements) - 1
        if as_written and runner.in_transaction():
            rolled_back = runner.rollback()
            message = "the cell ended inside a transaction it opened (BEGIN without COMMIT)"
            raise SQLExecutionError(
                message,
                headline=message,
                engine=engine,
                index=current,
                statement=texts[current],
                total=len(statements),
                rolled_back=rolled_back,
                committed=tuple(committed),
            )
    except (SQLExecutionError, SQLUsageError):
        raise
    except BaseException as exc:
        try:
            rolled_back = runner.rollback()
        except Exception:  # noqa: BLE001 - the original error matters more
            rolled_back = False
        if not _is_engine_error(exc):
            raise
        raw = str(exc)
        raise SQLExecutionError(
            describe_lock_error(exc) or raw,
            engine=engine,
            index=current,
            statement=texts[current] if current >= 0 else "",
            total=len(statements),
            rolled_back=rolled_back,
            committed=tuple(committed),
            engine_message=raw,
            error_type=f"{type(exc).__module__.lstrip('_')}.{type(exc).__name__}",
        ) from None
    finally:
        runner.close()
    return SQLResult(frame, frame_index, outcomes, mode, engine)


def _check_duckdb_names(params: Mapping[str, Any]) -> None:
    """Refuse names DuckDB would take for one parameter (it ignores case)."""
    lowered: dict[str, str] = {}
    for name in params:
        other = lowered.setdefault(name.lower(), name)
        if other != name:
            raise SQLUsageError(
                f"DuckDB parameter names ignore case: ${other} and ${name} would be the same parameter"
            )


def _plan(engine: str, statements: tuple[_Statement, ...]) -> tuple[str, list[tuple[bool, list[int]]]]:
    """``(mode, groups)``: how :func:`run_sql` runs the statements.

    Each group is ``(transactional, statement indexes)``: one transaction,
    or statements run one by one without one of ours (as written, or alone
    because they can't run inside a transaction).
    """
    as_written = any(_first_word(toks) in _TXN_CONTROL for toks in statements)
    alone = [as_written or _outside_transaction(engine, toks) for toks in statements]
    groups: list[tuple[bool, list[int]]] = []
    for i, by_itself in enumerate(alone):
        if by_itself:
            groups.append((False, [i]))
        elif groups and groups[-1][0]:
            groups[-1][1].append(i)
        else:
            groups.append((True, [i]))
    mode = "as-written" if as_written else ("split" if any(alone) else "transaction")
    return mode, groups


def _open_after(runner: _Runner, toks: _Statement, was_open: bool) -> bool:
    """After an as-written statement: is a transaction open now?"""
    if runner.engine == "sqlite":
        return runner.in_transaction()
    # DuckDB has no flag and probing costs a BEGIN per statement; the
    # keywords tell (DuckDB has no savepoints).
    word = _first_word(toks)
    if word in ("BEGIN", "START"):
        return True
    if word in ("COMMIT", "END", "ROLLBACK", "ABORT"):
        return False
    return was_open


# -- DuckDB lock conflicts --------------------------------------------------

_LOCK_RE = re.compile(
    r'Could not set lock on file "(?P<path>[^"]*)":\s*Conflicting lock is held in\s+'
    r"(?P<program>.*?)\s*\(PID (?P<pid>\d+)\)(?:\s+by user (?P<user>[^.\s]+))?"
)
# The same error when DuckDB's wording of the holder is not the one above.
_LOCK_PATH_RE = re.compile(r'lock on file "([^"]*)"')


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    args = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
    if not args:
        return None
    text = " ".join(args)
    return text if len(text) <= 160 else text[:157] + "..."


def describe_lock_error(exc: BaseException | str) -> str | None:
    """One line naming the process that holds a DuckDB file's lock, or None
    when *exc* is not a lock conflict."""
    text = str(exc)
    m = _LOCK_RE.search(text)
    if not m:
        if "Could not set lock on file" not in text:
            return None
        path = _LOCK_PATH_RE.search(text)
        where = path.group(1) if path else "the database file"
        return f"DuckDB database {where} is locked by another process (DuckDB allows one writing process per file)"
    pid = int(m.group("pid"))
    who = _cmdline(pid) or m.group("program")
    if pid == os.getpid():
        holder = f"this process (PID {pid}), through another connection opened with a different configuration"
    else:
        holder = f"another process: PID {pid} ({who})"
        if m.group("user"):
            holder += f", user {m.group('user')}"
    return (
        f"DuckDB database {m.group('path')} is locked by {holder}. "
        "DuckDB allows one writing process per file: close the database there and run the cell again"
    )


# -- frames -----------------------------------------------------------------

# pandas' nullable integer dtypes (booleans are matched by type).
_MASKED_INTS = {f"{p}Int{b}" for p in ("", "U") for b in (8, 16, 32, 64)}
# What a SQLite value can be: an object column holding a mix of these (SQLite
# types values, not columns) is kept cell by cell as tagged JSON.
_SCALARS = {type(None), bool, int, float, str, bytes, bytearray}


class _NotScalar(Exception):
    pass


def _cell(v: Any) -> Any:
    """JSON form of one object-column value (bool, int and float stay
    distinct: JSON writes ``true``, ``1`` and ``1.0``)."""
    t = type(v)
    if v is None or t in (bool, int, str):
        return v
    if t is float:
        return v if math.isfinite(v) else {"$float": repr(v)}
    if t is bytes:
        return {"$bytes": base64.b64encode(v).decode("ascii")}
    if t is bytearray:
        return {"$bytearray": base64.b64encode(v).decode("ascii")}
    raise _NotScalar


def _uncell(v: Any) -> Any:
    if isinstance(v, dict):
        if "$float" in v:
            return float(v["$float"])
        if "$bytes" in v:
            return base64.b64decode(v["$bytes"])
        if "$bytearray" in v:
            return bytearray(base64.b64decode(v["$bytearray"]))
    return v


def _objects(values: list) -> Any:
    import numpy as np

    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def _i8(values: Any) -> list:
    import numpy as np

    nat = np.iinfo("i8").min
    return [None if v == nat else v for v in values.view("i8").tolist()]


def _from_i8(values: list, dtype: str) -> Any:
    import numpy as np

    nat = np.iinfo("i8").min
    return np.array([nat if v is None else v for v in values], dtype="i8").view(dtype)


def _json_column(series: Any) -> tuple[dict, list] | None:
    """``(dtype description, values)`` for a column JSON keeps exactly, else None."""
    import numpy as np
    import pandas as pd

    dtype = series.dtype
    if isinstance(dtype, np.dtype):
        values = series.to_numpy()
        if dtype.kind in "biu":
            return {"dtype": dtype.str}, values.tolist()
        if dtype.kind == "f":
            return {"dtype": dtype.str}, [
                v if math.isfinite(v) else repr(v) for v in values.tolist()
            ]
        if dtype.kind in "mM":
            return {"dtype": dtype.str}, _i8(values)
        if dtype.kind == "O":
            try:
                return {"dtype": "object"}, [_cell(v) for v in values.tolist()]
            except _NotScalar:
                return None
        return None
    if isinstance(dtype, pd.DatetimeTZDtype):
        utc = series.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()
        return {"dtype": "datetimetz", "unit": dtype.unit, "tz": str(dtype.tz)}, _i8(utc)
    if isinstance(dtype, pd.StringDtype):
        na = "NA" if dtype.na_value is pd.NA else "nan"
        return {"dtype": "string", "storage": dtype.storage, "na": na}, [
            None if pd.isna(v) else v for v in series.tolist()
        ]
    if isinstance(dtype, pd.BooleanDtype) or (
        isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.name in _MASKED_INTS
    ):
        return {"dtype": "masked", "name": dtype.name}, [
            None if v is pd.NA else v for v in series.tolist()
        ]
    return None


def _json_restore(desc: dict, values: list) -> Any:
    import numpy as np
    import pandas as pd

    kind = desc["dtype"]
    if kind == "object":
        return _objects([_uncell(v) for v in values])
    if kind == "string":
        na = pd.NA if desc["na"] == "NA" else np.nan
        return pd.array(values, dtype=pd.StringDtype(desc["storage"], na_value=na))
    if kind == "masked":
        return pd.array(values, dtype=desc["name"])
    if kind == "datetimetz":
        raw = _from_i8(values, f"M8[{desc['unit']}]")
        return pd.Series(raw).dt.tz_localize("UTC").dt.tz_convert(desc["tz"]).array
    dtype = np.dtype(kind)
    if dtype.kind in "mM":
        return _from_i8(values, dtype.str)
    if dtype.kind == "f":
        return np.array([float(v) for v in values], dtype=dtype)
    return np.array(values, dtype=dtype)


def _columns_desc(df: Any) -> tuple[list, str] | None:
    names = list(df.columns)
    if not all(n is None or type(n) in (str, int, float, bool) for n in names):
        return None  # MultiIndex tuples and such: only the pickle route keeps them
    return names, str(df.columns.dtype)


def _restore_columns(names: list, dtype: str) -> Any:
    import pandas as pd

    try:
        return pd.Index(names, dtype=dtype)
    except (TypeError, ValueError):
        return pd.Index(names)


def _dump_json(df: Any, cols: tuple[list, str]) -> dict | None:
    import pandas as pd

    if df.shape[0] * max(df.shape[1], 1) > JSON_MAX_CELLS:
        return None
    idx = df.index
    if type(idx) is not pd.RangeIndex or idx.name is not None:
        return None
    dtypes, data = [], []
    for i in range(df.shape[1]):
        encoded = _json_column(df.iloc[:, i])
        if encoded is None:
            return None
        dtypes.append(encoded[0])
        data.append(encoded[1])
    try:
        if len(_dumps(data)) > JSON_MAX_BYTES:
            return None
    except (TypeError, ValueError):
        return None
    return {
        "kind": "frame",
        "format": "json",
        "rows": int(df.shape[0]),
        "columns": cols[0],
        "columns_dtype": cols[1],
        "index": [idx.start, idx.stop, idx.step],
        "dtypes": dtypes,
        "data": data,
    }


def _arrow_names(names: list) -> list[str]:
    # Parquet needs unique string names; readable names are kept when they
    # qualify (SQL users see them in read_parquet), else positional ones.
    if all(type(n) is str for n in names) and len(set(names)) == len(names) and not any(
        n.startswith("__") for n in names
    ):
        return list(names)
    return [f"c{i}" for i in range(len(names))]


def _arrow_to_frame(table: Any, spec: dict) -> Any:
    df = table.to_pandas()
    tagged = set(spec.get("json_columns", ()))
    for i, dtype in enumerate(spec["dtypes"]):
        if dtype != "object":
            continue
        column = table.column(spec["arrow_names"][i])
        if i in tagged:
            df.isetitem(i, _objects([None if v is None else _uncell(json.loads(v)) for v in column.to_pylist()]))
        elif str(df.dtypes.iloc[i]) != "object":
            # pandas 3 reads Arrow strings as its ``str`` dtype; a column that
            # was plain ``object`` goes back to object, None staying None.
            df.isetitem(i, column.to_numpy(zero_copy_only=False).astype(object))
    df.columns = _restore_columns(spec["columns"], spec["columns_dtype"])
    return df


def _same_dtype(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b and getattr(a, "storage", None) == getattr(b, "storage", None)


def _dump_arrow(df: Any, cols: tuple[list, str]) -> tuple[dict, list[Blob]] | None:
    import pandas as pd
    import pyarrow as pa

    arrow_names = _arrow_names(cols[0])
    frame = df.copy(deep=False)
    frame.columns = arrow_names
    json_columns = []
    for i in range(df.shape[1]):
        if df.dtypes.iloc[i] != object:
            continue
        values = df.iloc[:, i].tolist()
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) == 1 and kinds <= {str, bytes, bytearray}:
            continue  # an Arrow string or binary column
        if kinds and kinds <= _SCALARS:  # a SQLite-style mix: tagged JSON per cell
            encoded = [None if v is None else _dumps(_cell(v)) for v in values]
            frame.isetitem(i, pd.Series(encoded, dtype=object, index=df.index))
            json_columns.append(i)
    try:
        table = pa.Table.from_pandas(frame, preserve_index=None)
    except (pa.ArrowException, TypeError, ValueError):
        return None
    spec: dict = {
        "kind": "frame",
        "rows": int(df.shape[0]),
        "columns": cols[0],
        "columns_dtype": cols[1],
        "arrow_names": arrow_names,
        "dtypes": [str(d) for d in df.dtypes],
    }
    if json_columns:
        spec["json_columns"] = json_columns
    # What reading back gives, predicted from the table's first zero rows:
    # a frame Arrow can't give back exactly takes the pickle route instead.
    try:
        probe = _arrow_to_frame(table.slice(0, 0), spec)
    except Exception:  # noqa: BLE001
        return None
    if not all(_same_dtype(a, b) for a, b in zip(probe.dtypes, df.dtypes)) or not (
        type(probe.index) is type(df.index) and _same_dtype(probe.index.dtype, df.index.dtype)
    ):
        return None
    spec["format"], data = _table_blob(table)
    # SHA-256 (not the fast raw-buffer hash): these bytes get parsed.
    digest = stream_digest(data)
    spec["blob"] = digest
    spec["size"] = data.size
    return spec, [(digest, data)]


def _table_blob(table: Any) -> tuple[str, Any]:
    """``(format, bytes)`` of *table*: Parquet, or Arrow IPC when Parquet
    would change a column type (it has no second-resolution timestamps, and
    lacks a few other Arrow types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=COMPRESSION)
    data = sink.getvalue()
    if pq.read_schema(pa.BufferReader(data)).remove_metadata().equals(table.schema.remove_metadata()):
        return "parquet", data
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=COMPRESSION)
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return "arrow", sink.getvalue()


def dump_frame(df: Any) -> tuple[dict, list[Blob]]:
    """``(spec, blobs)`` for a result frame: JSON when small, else Parquet
    (Arrow IPC, or a pickle, when Parquet can't keep a dtype).  The spec says
    ``format``, ``rows``, ``columns`` and ``dtypes`` whatever the route."""
    cols = _columns_desc(df)
    if cols is not None:
        spec = _dump_json(df, cols)
        if spec is not None:
            return spec, []
        dumped = _dump_arrow(df, cols)
        if dumped is not None:
            return dumped
    inner, blobs = dump_value(df)
    return {
        "kind": "frame",
        "format": "pickle",
        "rows": int(df.shape[0]),
        "columns": [str(c) for c in df.columns],
        "dtypes": [str(d) for d in df.dtypes],
        "value": inner,
    }, blobs


def load_frame(spec: dict, get_blob: Callable[[str], Any], trusted: bool = False) -> Any:
    """The frame :func:`dump_frame` described.

    JSON, Parquet and Arrow are data and load regardless; the pickle route
    runs code, so it loads only when the payload is *trusted* (its
    signature checked).  A missing Parquet/Arrow blob is a KeyError; a
    pickle that can't be loaded (untrusted, blob missing, …) a ValueError
    saying why.
    """
    import pandas as pd

    fmt = spec.get("format")
    if fmt == "json":
        start, stop, step = spec["index"]
        columns = [_json_restore(d, v) for d, v in zip(spec["dtypes"], spec["data"])]
        df = pd.DataFrame(dict(enumerate(columns)), index=pd.RangeIndex(start, stop, step))
        df.columns = _restore_columns(spec["columns"], spec["columns_dtype"])
        return df
    if fmt in ("parquet", "arrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = pa.BufferReader(pa.py_buffer(get_blob(spec["blob"])))
        table = pq.read_table(source) if fmt == "parquet" else pa.ipc.open_file(source).read_all()
        return _arrow_to_frame(table, spec)
    if fmt == "pickle":
        values, missing = load_names({"frame": spec["value"]}, get_blob, {}, trusted=lambda _name: trusted)
        if "frame" in missing:
            raise ValueError(f"the result table {missing['frame']}")
        return values["frame"]
    raise ValueError(f"unknown result table format {fmt!r}")


def frame_bundle(df: Any) -> tuple[dict, dict]:
    """``(data, metadata)``: *df* as an HTML table and as text, the way
    pandas shows it (long frames cut to :data:`DISPLAY_MAX_ROWS` rows)."""
    import pandas as pd

    with pd.option_context("display.max_rows", DISPLAY_MAX_ROWS, "display.min_rows", 20):
        html = df._repr_html_()
        if html is None:  # display.notebook_repr_html is off
            html = df.to_html(max_rows=DISPLAY_MAX_ROWS)
        text = repr(df)
    return {"text/plain": text, "text/html": html}, {}


def _frame_blobs(spec: dict) -> list[str]:
    """Blobs of a result table: its Parquet/Arrow blob, or its inner pickle's."""
    inner = spec.get("value")
    return [spec.get("blob"), *(spec_blobs(inner) if isinstance(inner, dict) else [])]


# Result tables are one more kind of stored value, loaded like the others.
register(Codec("frame", lambda spec, get_blob, namespace: load_frame(spec, get_blob, trusted=True), _frame_blobs, signed=True))
