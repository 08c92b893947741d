"""A SQL cell's key: its parameters bound from the notebook, and the
``extra`` that makes the key change exactly when re-running the cell could
do something different.

:func:`key_extra` folds in three things:

* the SQL, normalized by :func:`~rssd_magic.sql.lexer.normalize_sql`:
  comments and spacing do not count, string literals and quoted
  identifiers count byte for byte;
* the target's identity (:func:`~rssd_magic.sql.target.target_identity`);
* the parameters' values, fingerprinted by the code that fingerprints a
  Python cell's inputs (:mod:`rssd_magic.deps`): a DataFrame or an array
  passed as ``$df`` hashes as it would if a Python cell read ``df``, and
  :func:`params_inputs` gives them in the ``{"names": …}`` shape a run
  records, so "why it re-ran" is said the same way for both kinds of cell.

Keys of version 1 (:data:`LEGACY_SQL_KEY_VERSION`) encoded the parameters
with a JSON form of their own.  :func:`legacy_key_extra` still computes
that extra byte for byte: a SQL cell recorded under a v1 key must replay,
not run again (a re-run ``CREATE TABLE`` fails with "already exists"), so
the runner looks it up when the v2 key has no record.

Parameters are written ``$name`` or ``:name`` on both engines: SQLite reads
both natively and :func:`bind` rewrites ``:name`` to DuckDB's ``$name``.
Positional ``?`` and ``$1`` are refused: a value without a name can't be
shown in the key.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import math
import pickle
import types
import uuid
from itertools import chain
from typing import Any, Iterable, Mapping

from ..canonical import canonical
from ..deps import fingerprint_names
from ..serialize import type_name
from .lexer import SQLUsageError, Token, normalize_sql, parse_statements
from .target import target_identity

#: Bumped whenever what goes into :func:`key_extra` changes.
#: v2: parameters by their :mod:`rssd_magic.deps` fingerprints.  A change of
#: the fingerprints themselves changes their digests, hence the keys, without
#: a bump here.
SQL_KEY_VERSION = "rssd_magic.sql.v2"
#: The version :func:`legacy_key_extra` writes (parameters as v1 JSON).
LEGACY_SQL_KEY_VERSION = "rssd_magic.sql.v1"


# -- binding ----------------------------------------------------------------


def bind(sql: str, namespace: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(sql_for_engine, params)``: ``:name`` rewritten to ``$name`` (read by
    DuckDB and SQLite alike), and the values of the names *sql* uses.

    Raises :class:`SQLUsageError` for positional parameters and for names
    missing from *namespace* (all of them named).
    """
    return bind_tokens(sql, chain.from_iterable(parse_statements(sql)), namespace, 0, len(sql))


def bind_tokens(
    sql: str, toks: Iterable[Token], namespace: Mapping[str, Any], start: int, end: int, style: str = "dollar"
) -> tuple[str, dict[str, Any]]:
    """:func:`bind` for ``sql[start:end]``, whose tokens are *toks*.

    *style* ``"pyformat"`` writes parameters as psycopg reads them
    (``%(name)s``, with literal ``%`` doubled — only when there are
    parameters: without, psycopg sends the text as it is)."""
    pyformat = style == "pyformat"
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
        parts += (sql[last : tok.start], f"%({tok.text})s" if pyformat else "$" + tok.text)
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
    if pyformat:
        if not params:
            return sql[start:end], params
        # Text and parameters alternate: only the text's % are psycopg's to skip.
        return "".join(p if i % 2 else p.replace("%", "%%") for i, p in enumerate(parts)), params
    return "".join(parts), params


# -- keys -------------------------------------------------------------------


def _sha(data: Any) -> str:
    # Bare hex, not trust.stream_digest's "sha256:…": the key format is fixed.
    return hashlib.sha256(data).hexdigest()


def _refuse_code(name: str, value: Any) -> None:
    """A function, class or module is code, not a value an engine can bind;
    refused before anything runs (v1 refused the unpicklable ones as
    unkeyable; the fingerprinter hashes code, which would let them through
    to fail inside the engine)."""
    if callable(value) or isinstance(value, types.ModuleType):
        raise SQLUsageError(f"SQL parameter ${name} is {type_name(value)}, not a value SQL can bind")


def params_inputs(params: Mapping[str, Any] | None) -> dict[str, dict]:
    """The parameters as a run's inputs: ``{"names": {name: fingerprint}}``
    (``{}`` without parameters), the shape :func:`rssd_magic.deps.explain`
    compares, so the runner can record it and say which parameter changed.

    Raises :class:`SQLUsageError` naming a parameter that can't be
    fingerprinted or is not a value: unlike a Python cell's input, it can't
    just be left out of the key, since the SQL reads exactly that value.
    """
    if not params:
        return {}
    for name, value in params.items():
        _refuse_code(name, value)
    names = fingerprint_names(params, list(params))
    for name, entry in names.items():
        if entry.get("digest") is None:
            raise SQLUsageError(
                f"SQL parameter ${name} of type {entry.get('hint')} can't be fingerprinted "
                f"for the cell key ({entry.get('reason')})"
            )
    return {"names": names}


def key_extra(
    sql: str,
    conn: Any,
    params: Mapping[str, Any] | None = None,
    *,
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The ``extra`` to pass to :func:`rssd_magic.keys.cell_key` for a SQL cell.

    It holds the normalized SQL's hash too, so the key follows
    :func:`normalize_sql` even though ``cell_key`` normalizes its *code*
    argument as Python: pass ``normalize_sql(body)`` as the code.  Pass
    *inputs* (from :func:`params_inputs`) when the caller has them already,
    so large parameters are not fingerprinted twice.
    """
    target = target_identity(conn)
    if inputs is None:
        inputs = params_inputs(params)
    # Only the digests decide: hints and shown values are for messages.
    digests = {name: entry["digest"] for name, entry in (inputs.get("names") or {}).items()}
    return canonical(
        {
            "v": SQL_KEY_VERSION,
            "sql": _sha(normalize_sql(sql).encode("utf-8")),
            "target": target,
            "params": digests,
        }
    )


# -- v1 keys (legacy lookup) ---------------------------------------------------


def legacy_key_extra(sql: str, conn: Any, params: Mapping[str, Any] | None = None) -> str:
    """The v1 :func:`key_extra`, byte for byte: the key a SQL cell was
    recorded under before parameters were fingerprinted.  Only for looking
    up such a record; new records are keyed by :func:`key_extra`.

    Raises :class:`SQLUsageError` where v1 did: for a value v1 could not
    encode, no v1 record can exist.
    """
    return canonical(
        {
            "v": LEGACY_SQL_KEY_VERSION,
            "sql": _sha(normalize_sql(sql).encode("utf-8")),
            "target": target_identity(conn),
            "params": _canonical_params(params or {}),
        }
    )


def _canonical(value: Any, path: str = "") -> Any:
    """v1's JSON form of a parameter value: equal for equal values, and
    stable across kernels (no ids, no set or hash order).  Frozen: any
    change here changes the keys of cells recorded by v1."""
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
        return {"$dict": sorted(items, key=canonical)}
    if isinstance(value, (set, frozenset)):
        return {"$set": sorted((_canonical(v, path) for v in value), key=canonical)}
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
            return {"$pandas": _sha(hashed.to_numpy().tobytes() + canonical(shape).encode()), **shape}
    try:
        data = pickle.dumps(value, protocol=5)
    except Exception as exc:  # noqa: BLE001 - reported as a usage error
        raise SQLUsageError(
            f"SQL parameter {path or 'value'} of type {type_name(value)} can't be encoded "
            f"for the cell key ({type(exc).__name__}: {exc})"
        ) from None
    return {"$pickle_sha256": _sha(data), "type": type_name(value)}


def _canonical_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): _canonical(v, f"${k}") for k, v in params.items()}


def canonical_params(params: Mapping[str, Any]) -> str:
    """v1's canonical JSON of the parameter values (key order does not matter)."""
    return canonical(_canonical_params(params))
