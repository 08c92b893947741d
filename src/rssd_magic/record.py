"""What one run left behind: the JSON in ``transition_result``, as one type.

A :class:`RunRecord` is written by the run that made it and read by every
later replay, by ``%stateful show``, by gc and by trust — and possibly edited
or forged by another tool in between, so :meth:`RunRecord.from_json` checks
every field's type and says in one line what is wrong, instead of letting a
``KeyError`` or ``RecursionError`` escape into a notebook.

Nothing outside this module and :mod:`serialize` knows the field names:
gc asks :meth:`RunRecord.blob_digests`, trust asks
:meth:`RunRecord.payloads_to_sign`, replay reads the attributes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from .canonical import dumps
from .serialize import spec_blobs

#: ``format`` of every record this package writes.
RESULT_FORMAT = "rssd_magic.result.v1"
#: Name under which the cell's result value is signed beside its names.
RESULT_VALUE = "\0result"
#: The most nesting a record may have: deep enough for any notebook output,
#: shallow enough that no recursive walk over it can overflow the stack.
MAX_DEPTH = 64

#: The fields a record has, in the order they are written.
FIELDS = (
    "format", "host", "duration_s", "code_hash", "inputs", "sql", "outputs", "names", "changed", "deleted",
    "result_value", "error",
)  # fmt: skip


class RecordError(ValueError):
    """A ``transition_result`` that is not a usable record; the message says
    what is wrong in a few words (the caller names the record)."""


@dataclass
class RunRecord:
    """The outcome of one run of one cell.

    ``outputs`` are nbformat outputs in the order they were shown; ``names``
    maps each name the run bound to its serialized spec (serialize.py),
    and each name it read and changed in place (``df["b"] = …``): those are
    listed in ``changed`` too, since the cell's code does not bind them;
    ``deleted`` lists the names the run deleted (``del x``), which a replay
    deletes as well;
    ``result_value`` is the spec of the cell's result when it showed one;
    ``error`` is ``{ename, evalue, traceback}`` for a failed run; ``inputs``
    the fingerprints the key was made from; ``sql`` what a SQL cell did.
    Fields another version of this package wrote and this one doesn't know
    are kept in ``extra`` and written back unchanged.
    """

    host: str | None = None
    duration_s: float | None = None
    code_hash: str | None = None
    inputs: dict | None = None
    sql: dict | None = None
    outputs: list[dict] = field(default_factory=list)
    names: dict[str, dict] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    result_value: dict | None = None
    error: dict | None = None
    format: str = RESULT_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    # -- JSON ---------------------------------------------------------------

    def to_json(self) -> dict:
        """The record as a JSON object (fields that are unset are left out)."""
        out: dict[str, Any] = {"format": self.format}
        for name in FIELDS[1:]:
            value = getattr(self, name)
            if name in ("outputs", "names"):
                out[name] = value
            elif name in ("changed", "deleted"):
                if value:  # left out when empty: most runs change and delete nothing
                    out[name] = value
            elif value is not None:
                out[name] = value
        out.update(self.extra)
        return out

    def dumps(self) -> str:
        """The text stored in ``transition_result``."""
        return dumps(self.to_json())

    @classmethod
    def from_json(cls, data: str | bytes | dict | None) -> "RunRecord":
        """Parse and check a stored record; RecordError says what is wrong."""
        if data is None or data == "":
            return cls()
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except RecursionError:
                raise RecordError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
            except ValueError as exc:
                raise RecordError(f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise RecordError(f"a JSON {_kind(data)}, not an object")
        _check_depth(data)
        rec = cls(extra={k: v for k, v in data.items() if k not in FIELDS})
        rec.format = _typed(data, "format", str, RESULT_FORMAT)
        rec.host = _typed(data, "host", str, None)
        duration = data.get("duration_s")
        if duration is not None and (
            not isinstance(duration, (int, float)) or isinstance(duration, bool) or not math.isfinite(duration)
        ):
            raise RecordError(f"duration_s is a {_kind(duration)}, not a number")
        rec.duration_s = None if duration is None else float(duration)
        rec.code_hash = _typed(data, "code_hash", str, None)
        rec.inputs = _typed(data, "inputs", dict, None)
        rec.sql = _typed(data, "sql", dict, None)
        rec.outputs = _typed(data, "outputs", list, [])
        rec.names = _typed(data, "names", dict, {})
        for name, spec in rec.names.items():
            if not isinstance(spec, dict):
                raise RecordError(f"the spec of name {name!r} is a {_kind(spec)}, not an object")
        for listed in ("changed", "deleted"):
            if data.get(listed) is not None:  # absent from most records: nothing to check on a replay
                names = _typed(data, listed, list, [])
                if not all(isinstance(n, str) and n.isidentifier() for n in names):
                    raise RecordError(f"{listed} holds something that is not a name")
                setattr(rec, listed, names)
        rec.result_value = _typed(data, "result_value", dict, None)
        rec.error = _typed(data, "error", dict, None)
        return rec

    # -- what other modules ask ------------------------------------------------

    def specs(self) -> dict[str, dict]:
        """Every value spec of the record: the names, and the result value
        under :data:`RESULT_VALUE`."""
        out = dict(self.names)
        if self.result_value is not None:
            out[RESULT_VALUE] = self.result_value
        return out

    def blob_digests(self) -> set[str]:
        """Digests of every blob the record refers to (gc keeps these)."""
        return {digest for spec in self.specs().values() for digest in spec_blobs(spec)}

    def payloads_to_sign(self) -> dict[str, dict]:
        """The payloads whose signature decides whether they are loaded:
        ``{name: spec}`` for every spec (trust.py signs the kinds that run
        code or interpret bytes)."""
        return self.specs()

    def error_line(self) -> str:
        """``ename: evalue`` of a failed run, for ``transition_reason``."""
        if not self.error:
            return ""
        ename, evalue = self.error.get("ename") or "Error", self.error.get("evalue") or ""
        return f"{ename}: {evalue}" if evalue else str(ename)


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string"}


def _typed(data: dict, name: str, kind: type, default: Any) -> Any:
    """``data[name]`` when it is a *kind*, *default* when absent or null."""
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise RecordError(f"{name} is a {_kind(value)}, not {_JSON_NAMES[kind]}")
    return value


def _check_depth(data: Any) -> None:
    """Refuse JSON nested deeper than MAX_DEPTH, iteratively (a recursive
    check would itself overflow on the input it is meant to refuse)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RecordError(f"JSON nested deeper than {MAX_DEPTH} levels")
        children: Iterator[Any]
        if isinstance(node, dict):
            children = iter(node.values())
        elif isinstance(node, list):
            children = iter(node)
        else:
            continue
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
