"""What one run left behind: the JSON in ``transition_result``, as one type.

A :class:`RunRecord` is written by the run that made it and read by every
later replay, by ``%stateful show``, by gc and by trust — and possibly edited
or forged by another tool in between, so :meth:`RunRecord.from_json` checks
every field's type and says in one line what is wrong, instead of letting a
``KeyError`` or ``RecursionError`` escape into a notebook.

Nothing outside this module and :mod:`serialize` knows the field names:
gc asks :meth:`RunRecord.blob_digests`, signing and checking ask
:meth:`RunRecord.payloads_to_sign` (the whole record, bound to its cell: see
trust.py), replay reads the attributes.

Numbers are where another tool's JSON hurts most quietly: ``1e400`` parses
as infinity, a 400-digit integer overflows every float it meets, ``NaN`` is
not JSON at all (and can't be signed).  So non-finite numbers are refused
anywhere in a record, and the numbers this package computes with —
durations and sizes — must be in range.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from .canonical import dumps
from .digests import BUFFER, STREAM, usable
from .outputs import Output
from .serialize import kinds_with_blobs, spec_blobs
from .trust import SAFE_MIME, signed_bytes

#: ``format`` of every record this package writes.
RESULT_FORMAT = "rssd_magic.result.v1"
#: Key of the cell's result value among :meth:`RunRecord.specs`.
RESULT_VALUE = "\0result"
#: The most nesting a record may have: deep enough for any notebook output,
#: shallow enough that no recursive walk over it can overflow the stack.
MAX_DEPTH = 64
#: The longest a run may have taken, in seconds (ten years): more is a
#: number another tool made up, and would overflow the arithmetic on it.
MAX_DURATION_S = 10 * 365 * 86400.0
#: The most bytes a stored value may say it has (SQLite's blobs stop at 2 GB;
#: this is the int64 every store and report can hold).
MAX_SIZE = 2**63 - 1

#: The fields a record has, in the order they are written.
FIELDS = (
    "format", "host", "duration_s", "code_hash", "inputs", "sql", "outputs", "names", "changed", "deleted",
    "result_value", "error", "blob_store",
)  # fmt: skip


#: Where the listings read a field of a stored record with the store's JSON
#: functions (so they never load outputs): its path in the JSON.
FIELD_PATHS = {"host": ("host",), "duration_s": ("duration_s",), "ename": ("error", "ename"), "evalue": ("error", "evalue")}


def blob_markers() -> tuple[str, ...]:
    """Text every record that names a blob holds: the JSON string of a value
    kind whose codec refers to blobs (``"pickle"``), or an escape, which
    could spell one.  gc and ``stats`` read only the records that hold one."""
    return (*(f'"{kind}"' for kind in kinds_with_blobs()), "\\u")


def digests_in(text: str | None) -> set[str]:
    """The blobs a stored record refers to, read leniently: only its value
    specs are looked at (gc and ``stats`` read every such record; a whole
    check of each cost half of ``stats`` at 100,000 cells), and a record
    this can read but :meth:`RunRecord.from_json` would refuse keeps its
    blobs — gc keeps too much rather than delete what a record names."""
    try:
        data = _DECODER.decode(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        return set()
    if not isinstance(data, dict):
        return set()
    names = data.get("names")
    specs = list(names.values()) if isinstance(names, dict) else []
    specs.append(data.get("result_value"))
    out: set[str] = set()
    for spec in specs:
        if isinstance(spec, dict):
            try:
                out.update(d for d in spec_blobs(spec) if isinstance(d, str))
            except (TypeError, ValueError, AttributeError):
                continue  # a spec no codec can read names no blob it could load
    return out


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
    the fingerprints the key was made from; ``sql`` what a SQL cell did;
    ``blob_store`` the bucket its large blobs were written to.
    Fields another version of this package wrote and this one doesn't know
    are kept in ``extra`` and written back unchanged.
    """

    host: str | None = None
    duration_s: float | None = None
    code_hash: str | None = None
    inputs: dict | None = None
    sql: dict | None = None
    outputs: list[Output] = field(default_factory=list)
    names: dict[str, dict] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    result_value: dict | None = None
    error: dict | None = None
    #: The bucket (``s3://bucket/prefix``) holding the run's large blobs
    #: (store/buckets.py); None when every blob is in the state store.
    blob_store: str | None = None
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
                data = _DECODER.decode(data) if isinstance(data, str) else json.loads(data, **_HOOKS)
            except RecursionError:
                raise RecordError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
            except RecordError:
                raise
            except ValueError as exc:
                raise RecordError(f"not valid JSON ({_short(exc)})") from None
        if not isinstance(data, dict):
            raise RecordError(f"a JSON {_kind(data)}, not an object")
        _check_depth(data)
        rec = cls(extra={k: v for k, v in data.items() if k not in FIELDS})
        rec.format = _typed(data, "format", str, RESULT_FORMAT)
        rec.host = _typed(data, "host", str, None)
        rec.duration_s = _number(data, "duration_s", MAX_DURATION_S, float)
        rec.code_hash = _typed(data, "code_hash", str, None)
        rec.inputs = _typed(data, "inputs", dict, None)
        rec.sql = _typed(data, "sql", dict, None)
        rec.blob_store = _typed(data, "blob_store", str, None)
        rec.outputs = _typed(data, "outputs", list, [])
        rec.names = _typed(data, "names", dict, {})
        for name, spec in rec.names.items():
            if not isinstance(spec, dict):
                raise RecordError(f"the spec of name {_label(name)} is {_a(spec)}, not an object")
            _check_spec(spec, f"the spec of name {_label(name)}")
        for listed in ("changed", "deleted"):
            if data.get(listed) is not None:  # absent from most records: nothing to check on a replay
                names = _typed(data, listed, list, [])
                if not all(isinstance(n, str) and n.isidentifier() for n in names):
                    raise RecordError(f"{listed} holds something that is not a name")
                setattr(rec, listed, names)
        rec.result_value = _typed(data, "result_value", dict, None)
        if rec.result_value is not None:
            _check_spec(rec.result_value, "the result value's spec")
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

    def payloads_to_sign(self, cell: str) -> list[bytes]:
        """What is signed for this record filed under *cell* (its
        ``ingest_src``): one payload, the whole record and its blobs'
        digests, bound to the cell (trust.py says why)."""
        return [signed_bytes(cell, self.to_json(), self.blob_digests())]

    def weak_digests(self) -> list[str]:
        """Digests of its blobs no loader accepts (XXH3-128 buffers of older
        records): such a record can't be trusted into acting again."""
        return sorted(d for d in self.blob_digests() if not usable(d, STREAM | BUFFER))

    def what_acts(self) -> dict:
        """What a trusted replay of this record would make happen that an
        untrusted one doesn't: ``pickled`` (the types it unpickles),
        ``modules`` (those it imports), ``active`` (the MIME types it
        publishes beyond text and raster images); ``names`` it binds."""
        pickled: list[str] = []
        modules: list[str] = []
        for spec in self.specs().values():
            kind = spec.get("kind")
            if kind == "frame" and isinstance(spec.get("value"), dict):
                spec, kind = spec["value"], spec["value"].get("kind")
            if kind == "pickle":
                pickled.append(str(spec.get("type") or "?"))
            elif kind == "module":
                modules.append(str(spec.get("module")))
        active: list[str] = []
        for out in self.outputs:
            data = out.get("data") if isinstance(out, dict) else None
            if isinstance(data, dict):
                active += [str(mime) for mime in data if mime not in SAFE_MIME]
        dedup = lambda items: list(dict.fromkeys(items))  # noqa: E731 - order kept
        return {"names": list(self.names), "pickled": dedup(pickled), "modules": dedup(modules), "active": dedup(active)}

    def error_line(self) -> str:
        """``ename: evalue`` of a failed run, for ``transition_reason``."""
        if not self.error:
            return ""
        ename, evalue = self.error.get("ename") or "Error", self.error.get("evalue") or ""
        return f"{ename}: {evalue}" if evalue else str(ename)


def _no_constant(name: str) -> Any:
    # json.loads accepts NaN and Infinity, which are not JSON: refused here,
    # as SQLite's json_valid and our canonical form refuse them.
    raise RecordError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RecordError(f"the number {text[:20]}{'…' if len(text) > 20 else ''} is out of range")
    return value


_HOOKS = {"parse_constant": _no_constant, "parse_float": _finite_float}
# One decoder for every record: json.loads with hooks would build one a call.
_DECODER = json.JSONDecoder(**_HOOKS)


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 120 else text[:119] + "…"


def _label(name: str) -> str:
    text = repr(name)
    return text if len(text) <= 60 else text[:59] + "…"


def _number(data: dict, name: str, limit: float, kind: type) -> Any:
    """``data[name]`` as a number from 0 to *limit* (None when absent)."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{name} is {_a(value)}, not a number")
    if kind is int and not isinstance(value, int):
        raise RecordError(f"{name} is not a whole number")
    # Compared as the number it is: float() of a 400-digit int would overflow.
    if value < 0:
        raise RecordError(f"{name} is negative")
    if value > limit:
        raise RecordError(f"{name} is too large ({len(str(value))} digits)" if isinstance(value, int) else f"{name} is too large")
    return kind(value)


def _check_spec(spec: dict, what: str) -> None:
    """The fields of a value spec that are read as numbers or switch on
    text: ``kind`` a string, ``size`` a byte count in range."""
    if not isinstance(spec.get("kind"), str):
        raise RecordError(f"{what} has no kind (a string)")
    try:
        _number(spec, "size", MAX_SIZE, int)
    except RecordError as exc:
        raise RecordError(f"{what}: {exc}") from None


def _a(value: Any) -> str:
    """``an object``, ``a string``: the kind of a JSON value, with its article."""
    kind = _kind(value)
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


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
        raise RecordError(f"{name} is {_a(value)}, not {_JSON_NAMES[kind]}")
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
