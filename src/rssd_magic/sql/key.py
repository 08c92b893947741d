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

Parameters are written ``$name`` or ``:name`` on both engines: SQLite reads
both natively and :func:`bind` rewrites ``:name`` to DuckDB's ``$name``.
Positional ``?`` and ``$1`` are refused: a value without a name can't be
shown in the key.
"""

from __future__ import annotations

import hashlib
import types
from itertools import chain
from typing import Any, Iterable, Mapping

from ..records.canonical import canonical
from ..deps import fingerprint_names
from ..records.serialize import type_name
from .lexer import SQLUsageError, Token, normalize_sql, parse_statements
from .target import target_identity

#: Bumped whenever what goes into :func:`key_extra` changes.
#: v2: parameters by their :mod:`rssd_magic.deps` fingerprints.  A change of
#: the fingerprints themselves changes their digests, hence the keys, without
#: a bump here.
SQL_KEY_VERSION = "rssd_magic.sql.v2"


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
    """The ``extra`` to pass to :func:`rssd_magic.engine.keys.cell_key` for a SQL cell.

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
