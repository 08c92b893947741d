"""Fingerprints of values: a content digest of whatever a cell reads, and a
few words about it for messages.

Values are fingerprinted by content, so an equal value rebuilt as a new
object (after a kernel restart and replay) keeps the key.  Big buffers (numpy
arrays, DataFrame columns, bytes) are hashed in place with xxh3-128, never
pickled.  Notebook functions and classes count by their code and by the
globals they read; library ones by module and version.

Nothing here imports numpy or pandas: they are looked up in ``sys.modules``,
since a value can only be an ndarray if numpy is loaded.
"""

from __future__ import annotations

import dis
import functools
import io
import math
import pickle
import struct
import sys
import types
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import xxhash

from ..records.canonical import fmt_bytes
from .analysis import is_shell_name
from .versions import module_version

#: Folded into :func:`~rssd_magic.deps.explain.inputs_digest`: bump it
#: whenever a fingerprint of the same value could come out different, so old
#: keys never alias new ones.
FINGERPRINT_VERSION = "rssd_magic.fp.v1"


@dataclass(frozen=True)
class Fingerprint:
    """Content digest of a value, plus what to say about it in messages.

    ``digest`` is 32 hex digits (xxh3-128).  ``hint`` is the type and size
    (``1000×3 DataFrame``); ``value`` is a short rendering kept only for
    numbers, bools, None and module versions, where it is more telling than
    a digest (``input n changed (5 → 6)``).  Strings are never rendered:
    they may hold secrets.
    """

    digest: str
    hint: str
    value: str | None = None

    def to_json(self) -> dict:
        out = {"digest": self.digest, "hint": self.hint}
        if self.value is not None:
            out["value"] = self.value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Fingerprint":
        return cls(data["digest"], data.get("hint", ""), data.get("value"))


class Unfingerprintable(Exception):
    """Raised inside the hasher; surfaces as ``(None, reason)``."""


_PRIMITIVES = frozenset({str, int, float, bool, bytes, type(None)})
_MASK128 = (1 << 128) - 1
#: Contiguous copies of a strided array are made in slabs of about this size,
#: so hashing a view never allocates a second copy of a large array.
_SLAB_BYTES = 16 << 20
#: Lists and tuples of primitives at least this long are hashed as one
#: no-memo pickle stream (C speed) rather than item by item.
_FAST_SEQ = 32
#: Class attributes that say nothing about behaviour: layout descriptors and
#: names, which differ after cloudpickle rebuilds a class, and the cache
#: copyreg adds the first time an instance is pickled (or fingerprinted).
_CLASS_SKIP = frozenset({"__dict__", "__weakref__", "__module__", "__qualname__", "__slotnames__"})


def _n(value: int) -> bytes:
    return value.to_bytes(8, "little")


def _int_bytes(value: int) -> bytes:  # signed, as few bytes as it takes
    return value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)


def _type_name(value_or_type: Any) -> str:
    t = value_or_type if isinstance(value_or_type, type) else type(value_or_type)
    module = getattr(t, "__module__", None)
    return t.__qualname__ if module in (None, "builtins") else f"{module}.{t.__qualname__}"


@functools.lru_cache(maxsize=4096)
def _global_loads(code: types.CodeType) -> tuple[str, ...]:
    """Names *code* (and the code nested in it) loads as globals: not
    ``co_names``, which would also list attribute names (``self.data`` →
    ``data``) and tie a function to an unrelated global of that name."""
    found: set[str] = set()
    stack = [code]
    while stack:
        co = stack.pop()
        for ins in dis.get_instructions(co):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(ins.argval, str):
                found.add(ins.argval)
        stack += [c for c in co.co_consts if isinstance(c, types.CodeType)]
    return tuple(sorted(found))


def _importable(obj: Any) -> bool:
    """True for functions and classes a module defines at import time: those
    are identified by module and name; ones from the notebook, or made
    inside a function (``<locals>``, ``<lambda>``), only by content."""
    module = getattr(obj, "__module__", None)
    return module not in (None, "__main__") and "<" not in getattr(obj, "__qualname__", "<")


class _Hasher:
    """Content digests of values; one instance per batch of inputs.

    Each composite value gets its own digest, memoised by identity for the
    life of the instance (a DataFrame read directly and through a function
    is hashed once); the objects are kept alive so ids are not reused.
    Cycles become back references counted from the current position, which
    makes a cyclic value hash the same wherever it is reached from.
    """

    def __init__(self) -> None:
        self.memo: dict[int, tuple[Any, bytes]] = {}
        self.stack: dict[int, int] = {}
        self.backrefs = 0

    # -- entry points ---------------------------------------------------------

    def fingerprint(self, value: Any) -> tuple[Fingerprint | None, str | None]:
        try:
            digest = self.digest(value)
        except RecursionError:
            return None, f"{_type_name(value)}: nested too deeply to fingerprint"
        except Unfingerprintable as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure is a reason, not a crash
            return None, f"{_type_name(value)}: {type(exc).__name__}: {exc}"
        try:
            hint, shown = _describe(value)
        except Exception:  # noqa: BLE001 - a hint is for messages; its failure must not cost the key
            hint, shown = _type_name(value), None
        return Fingerprint(digest[1:].hex(), hint, shown), None

    def digest(self, value: Any) -> bytes:
        """``b"@"`` + 16-byte digest, or ``b"R"`` + distance for a cycle."""
        key = id(value)
        hit = self.memo.get(key)
        if hit is not None:
            return hit[1]
        depth = self.stack.get(key)
        if depth is not None:
            self.backrefs += 1
            return b"R" + (len(self.stack) - depth).to_bytes(4, "little")
        self.stack[key] = len(self.stack)
        before = self.backrefs
        try:
            h = xxhash.xxh3_128()
            self._write(h, value)
            result = b"@" + h.digest()
        finally:
            del self.stack[key]
        # A digest that used a back reference depends on where it was reached
        # from; only self-contained ones may be reused.
        if self.backrefs == before and type(value) not in _PRIMITIVES:
            self.memo[key] = (value, result)
        return result

    def feed(self, h, value: Any) -> None:
        """Write *value* into *h*: primitives inline, the rest as a digest."""
        t = type(value)
        if t is str:
            data = value.encode("utf-8", "surrogatepass")
            h.update(b"s" + _n(len(data)))
            h.update(data)
        elif t is int:
            data = _int_bytes(value)
            h.update(b"i" + _n(len(data)) + data)
        elif t is float:
            # One NaN, whatever its payload: equal-looking inputs hash alike.
            h.update(b"f" + (b"nan" if math.isnan(value) else struct.pack("<d", value)))
        elif value is None:
            h.update(b"N")
        elif t is bool:
            h.update(b"T" if value else b"F")
        elif t is bytes:
            h.update(b"b" + _n(len(value)))
            h.update(value)
        else:
            h.update(self.digest(value))

    def feed_or_mark(self, h, value: Any) -> None:
        """Like :meth:`feed`, but a part that can't be hashed counts by type.

        Used for what a notebook function or class *refers to*: a global
        connection object should not make the function unfingerprintable.
        """
        try:
            self.feed(h, value)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - Unfingerprintable included
            h.update(b"?" + _type_name(value).encode())

    def _commutative(self, h, tag: bytes, pairs: Iterable[tuple[Any, ...]], count: int) -> None:
        # Sum of per-item digests: equal dicts/sets hash alike whatever their
        # insertion order, as ``==`` says they are equal.
        acc = 0
        for parts in pairs:
            ih = xxhash.xxh3_128()
            for part in parts:
                self.feed(ih, part)
            acc = (acc + ih.intdigest()) & _MASK128
        h.update(tag + _n(count) + acc.to_bytes(16, "little"))

    # -- dispatch -------------------------------------------------------------

    def _write(self, h, v: Any) -> None:
        t = type(v)
        if t in _PRIMITIVES:
            self.feed(h, v)
            return
        if t is list or t is tuple:
            h.update((b"L" if t is list else b"U") + _n(len(v)))
            if len(v) >= _FAST_SEQ and _PRIMITIVES.issuperset(map(type, v)):
                h.update(b"P")
                buf = io.BytesIO()
                pickler = pickle.Pickler(buf, protocol=5)
                pickler.fast = True  # no memo: equal items pickle alike, shared or not
                pickler.dump(v)
                h.update(buf.getbuffer())
            else:
                for item in v:
                    self.feed(h, item)
            return
        if t is dict:
            self._commutative(h, b"D", v.items(), len(v))
            return
        if t is set or t is frozenset:
            self._commutative(h, b"S" if t is set else b"Z", ((x,) for x in v), len(v))
            return
        np = sys.modules.get("numpy")
        if np is not None and isinstance(v, (np.ndarray, np.generic)):
            self._numpy(h, v, np)
            return
        pd = sys.modules.get("pandas")
        if pd is not None and self._pandas(h, v, pd, np):
            return
        if t is bytearray or t is memoryview:
            mv = memoryview(v)
            h.update(b"m" + mv.format.encode() + repr(mv.shape).encode() + b";")
            h.update(mv if mv.c_contiguous else mv.tobytes())
        elif t is complex:
            h.update(b"c" + struct.pack("<dd", v.real, v.imag))
        elif isinstance(v, types.ModuleType):
            h.update(b"M")
            self.feed(h, v.__name__)
            self.feed(h, module_version(v))
        elif isinstance(v, types.FunctionType):
            self._function(h, v)
        elif isinstance(v, type):
            self._class(h, v)
        elif isinstance(v, types.CodeType):
            self._code(h, v)
        elif isinstance(v, types.MethodType):
            h.update(b"m")
            self.feed(h, v.__func__)
            self.feed(h, v.__self__)
        elif isinstance(v, types.BuiltinFunctionType):
            owner = v.__self__
            if owner is None or isinstance(owner, types.ModuleType):
                module = getattr(v, "__module__", None) or getattr(owner, "__name__", None)
                self._reference(h, module, v.__qualname__)
            else:
                h.update(b"B")
                self.feed(h, v.__name__)
                self.feed(h, owner)
        elif isinstance(v, property):
            h.update(b"p")
            for part in (v.fget, v.fset, v.fdel):
                self.feed(h, part)
        elif isinstance(v, (classmethod, staticmethod)):
            h.update(b"k" if isinstance(v, classmethod) else b"t")
            self.feed(h, v.__func__)
        else:
            self._reduced(h, v)

    def _reference(self, h, module_name: str | None, qualname: str, obj: Any = None) -> None:
        """Something importable: its module, that module's version, its name.

        A wrapper (``functools.wraps``, ``lru_cache``) is also what it wraps:
        ``@lru_cache`` on a notebook function must not hide edits to its body.
        """
        h.update(b"G")
        self.feed(h, module_name)
        self.feed(h, qualname)
        module = sys.modules.get(module_name) if module_name else None
        self.feed(h, module_version(module) if module is not None else None)
        wrapped = getattr(obj, "__wrapped__", None) if obj is not None else None
        if wrapped is not None and wrapped is not obj:
            h.update(b"W")
            self.feed_or_mark(h, wrapped)

    # -- code -----------------------------------------------------------------

    def _code(self, h, co: types.CodeType) -> None:
        # What the code does, not where it was typed: no file name, line
        # numbers or qualname, so the same function in another cell is equal.
        h.update(b"C")
        for number in (co.co_argcount, co.co_posonlyargcount, co.co_kwonlyargcount, co.co_flags):
            self.feed(h, number)
        self.feed(h, co.co_code)
        self.feed(h, getattr(co, "co_exceptiontable", b""))
        for names in (co.co_names, co.co_varnames, co.co_freevars, co.co_cellvars):
            self.feed(h, names)
        self.feed(h, co.co_name)
        h.update(_n(len(co.co_consts)))
        for const in co.co_consts:
            self.feed(h, const)

    def _function(self, h, f: types.FunctionType) -> None:
        if _importable(f):
            self._reference(h, f.__module__, f.__qualname__, f)
            return
        # Defined in the notebook, or made at run time by a library (a
        # decorator's inner ``wrapper``, a lambda): what it is is its code
        # and what it closes over, not a name shared by every such function.
        h.update(b"F")
        self.feed(h, f.__code__)
        self.feed(h, f.__defaults__)
        self.feed(h, f.__kwdefaults__)
        for cell in f.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell: a name not bound yet
                h.update(b"E")
            else:
                self.feed_or_mark(h, contents)
        # A notebook function's result depends on the globals it reads, which
        # other cells may rebind: they are part of what it is.  (A library's
        # globals change with its version, already part of references.)
        namespace = f.__globals__ if f.__module__ == "__main__" else {}
        for name in _global_loads(f.__code__) if namespace else ():
            if name in namespace and not is_shell_name(name):
                self.feed(h, name)
                self.feed_or_mark(h, namespace[name])
        if f.__dict__:
            self.feed_or_mark(h, f.__dict__)

    def _class(self, h, cls: type) -> None:
        if _importable(cls):
            self._reference(h, cls.__module__, cls.__qualname__)
            return
        h.update(b"K")
        self.feed(h, cls.__qualname__)
        self.feed(h, cls.__bases__)
        attrs = vars(cls)
        for name in sorted(attrs):
            if name not in _CLASS_SKIP:
                self.feed(h, name)
                self.feed_or_mark(h, attrs[name])

    # -- numpy ----------------------------------------------------------------

    def _numpy(self, h, v, np) -> None:
        dtype = v.dtype
        h.update(b"A")
        self.feed(h, str(dtype.descr) if dtype.fields else dtype.str)
        if isinstance(v, np.generic):
            h.update(b"g")
            if dtype.hasobject:
                self.feed(h, v.item())
            else:
                h.update(v.tobytes())
            return
        if type(v) is not np.ndarray:
            self.feed(h, type(v))
            ma = sys.modules.get("numpy.ma")
            if ma is not None and isinstance(v, ma.MaskedArray):
                self.feed(h, ma.getmaskarray(v))
                self.feed(h, v.fill_value)
                v = v.data
            else:
                v = v.view(np.ndarray)
        h.update(b"s" + repr(v.shape).encode())
        if v.size == 0:
            return
        if dtype.hasobject:
            self._object_items(h, v.ravel(order="C"))
        elif v.flags.c_contiguous:
            h.update(v.reshape(-1).view(np.uint8))  # in place, no copy
        else:
            # Same bytes as a C-contiguous copy would have, a slab at a time.
            rows = max(1, _SLAB_BYTES // max(1, v[0].nbytes if v.ndim else v.nbytes))
            for start in range(0, len(v), rows):
                slab = np.ascontiguousarray(v[start : start + rows])
                h.update(slab.reshape(-1).view(np.uint8))

    def _object_items(self, h, flat) -> None:
        """Items of a 1-d object array (e.g. a string column)."""
        n = len(flat)
        h.update(b"O" + _n(n))
        try:
            # All strings (the common case): one join and one length array,
            # both at C speed.  The lengths make the join unambiguous.
            joined = "\x00".join(flat)
        except TypeError:
            for item in flat:
                self.feed(h, item)
            return
        if joined.count("\x00") == n - 1:
            h.update(b"J")  # no string holds the separator: the join is unambiguous
        else:
            np = sys.modules["numpy"]
            h.update(b"K")
            h.update(np.fromiter(map(len, flat), dtype=np.int64, count=n))
        h.update(joined.encode("utf-8", "surrogatepass"))

    # -- pandas ---------------------------------------------------------------

    def _pandas(self, h, v, pd, np) -> bool:
        if isinstance(v, pd.DataFrame):
            h.update(b"PD")
            self.feed(h, type(v))
            self.feed(h, v.columns)
            self.feed(h, v.index)
            for i in range(v.shape[1]):
                self._pandas_values(h, v.iloc[:, i], pd, np)
            return True
        if isinstance(v, pd.Series):
            h.update(b"PS")
            self.feed(h, type(v))
            self.feed_or_mark(h, v.name)
            self.feed(h, v.index)
            self._pandas_values(h, v, pd, np)
            return True
        if isinstance(v, pd.MultiIndex):
            h.update(b"PM")
            self.feed(h, list(v.names))
            for level, codes in zip(v.levels, v.codes):
                self.feed(h, level)
                self.feed(h, np.asarray(codes))
            return True
        if isinstance(v, pd.RangeIndex):
            h.update(b"PR")
            self.feed(h, (v.start, v.stop, v.step))
            self.feed_or_mark(h, v.name)
            return True
        if isinstance(v, pd.Index):
            h.update(b"PI")
            self.feed(h, type(v))
            self.feed_or_mark(h, v.name)
            self._pandas_values(h, v, pd, np)
            return True
        if isinstance(v, pd.api.extensions.ExtensionArray):
            h.update(b"PE")
            self._extension(h, v, pd, np)
            return True
        return False

    def _pandas_values(self, h, obj, pd, np) -> None:
        """The values of a column, Series or Index, with their dtype."""
        self.feed(h, str(obj.dtype))
        if isinstance(obj.dtype, np.dtype):
            self.feed(h, obj.to_numpy(copy=False))  # a view for numpy dtypes
        else:
            self._extension(h, obj.array, pd, np)

    def _extension(self, h, arr, pd, np) -> None:
        self.feed(h, str(arr.dtype))
        if isinstance(arr, pd.Categorical):
            self.feed(h, np.asarray(arr.codes))
            self.feed(h, arr.categories)
            self.feed(h, bool(arr.ordered))
            return
        if pd.api.types.is_string_dtype(arr.dtype):
            # hash_pandas_object takes ~1 s per million strings; the missing
            # mask plus the join of the rest takes a tenth of that.
            missing = np.asarray(arr.isna(), dtype=bool)
            self.feed(h, missing)
            present = arr[~missing] if missing.any() else arr
            self._object_items(h, np.asarray(present.to_numpy(dtype=object), dtype=object))
            return
        try:
            # One uint64 per row, computed in C with a fixed key (the same in
            # every process); exact for the values these dtypes can hold.
            rows = pd.util.hash_pandas_object(pd.Series(arr, copy=False), index=False)
            self.feed(h, rows.to_numpy())
        except Exception:  # noqa: BLE001 - an exotic dtype: item by item
            self._object_items(h, np.asarray(arr, dtype=object))

    # -- everything else ------------------------------------------------------

    def _reduced(self, h, v: Any) -> None:
        """Any other object, by what pickle would rebuild it from.

        ``__reduce_ex__`` names the constructor and hands over the state
        without serializing it, so large attributes (arrays) still take the
        fast paths above.  Objects tied to the process (files, sockets,
        locks, generators, connections) refuse to reduce: unfingerprintable.
        """
        try:
            reduced = v.__reduce_ex__(4)
        except Exception as exc:  # noqa: BLE001
            raise Unfingerprintable(f"{_type_name(v)}: {type(exc).__name__}: {exc}") from None
        if isinstance(reduced, str):  # a module-level singleton, by name
            module = getattr(v, "__module__", None) or type(v).__module__
            self._reference(h, module, reduced, v)
            return
        h.update(b"X" + _n(len(reduced)))
        parts = list(reduced) + [None] * (5 - len(reduced))
        func, args, state, list_items, dict_items = parts[:5]
        self.feed(h, func)
        self.feed(h, args)
        self.feed(h, state)
        if list_items is not None:
            self.feed(h, list(list_items))
        if dict_items is not None:
            items = list(dict_items)
            self._commutative(h, b"D", items, len(items))


def _describe(v: Any) -> tuple[str, str | None]:
    """``(hint, value)`` for messages: type and size, and small values."""
    t = type(v)
    if v is None or t in (bool, int, float, complex):
        text = repr(v)
        return t.__name__, text if len(text) <= 40 else None
    np = sys.modules.get("numpy")
    pd = sys.modules.get("pandas")
    if pd is not None:
        if isinstance(v, pd.DataFrame):
            return f"{v.shape[0]}×{v.shape[1]} {t.__name__}", None
        if isinstance(v, (pd.Series, pd.Index)):
            return f"{len(v)}-row {t.__name__} of {v.dtype}", None
    if np is not None:
        if isinstance(v, np.ndarray):
            shape = "×".join(map(str, v.shape)) or "0-d"
            return f"{shape} {v.dtype} array", None
        if isinstance(v, np.generic):
            item = v.item()
            shown = repr(item) if isinstance(item, (bool, int, float)) else None
            return f"numpy {v.dtype}", shown
    if t is str:
        return f"str of {len(v)} char{'' if len(v) == 1 else 's'}", None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"{t.__name__} of {fmt_bytes(memoryview(v).nbytes)}", None
    if isinstance(v, (list, tuple, dict, set, frozenset)):
        return f"{t.__name__} of {len(v)}", None
    if isinstance(v, types.ModuleType):
        return f"module {v.__name__}", module_version(v)
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)) or (
        callable(v) and hasattr(v, "__wrapped__") and hasattr(v, "__qualname__")
    ):
        return f"function {getattr(v, '__qualname__', v.__name__)}", None
    if isinstance(v, type):
        return f"class {v.__qualname__}", None
    return _type_name(v), None


def try_fingerprint(value: Any) -> tuple[Fingerprint | None, str | None]:
    """``(fingerprint, None)``, or ``(None, reason)`` when *value* can't be hashed."""
    return _Hasher().fingerprint(value)


def fingerprint(value: Any) -> Fingerprint | None:
    """Content fingerprint of *value*; None if it can't be fingerprinted
    (use :func:`try_fingerprint` for the reason)."""
    return try_fingerprint(value)[0]


def fingerprint_names(namespace: Mapping[str, Any], names: Iterable[str]) -> dict[str, dict]:
    """The ``"names"`` section of the inputs: one JSON entry per name present.

    Names absent from *namespace* are left out (the cell will fail or use a
    builtin).  A value that can't be fingerprinted is kept as
    ``{"digest": None, "hint": <type>, "reason": ...}``: it counts by its
    type only, and says why in messages.  Values are hashed by one hasher,
    so a value reached twice is hashed once.
    """
    hasher = _Hasher()
    out: dict[str, dict] = {}
    for name in names:
        if name not in namespace:
            continue
        value = namespace[name]
        fp, reason = hasher.fingerprint(value)
        if fp is not None:
            out[name] = fp.to_json()
        else:
            out[name] = {"digest": None, "hint": _type_name(value), "reason": reason}
    return out
