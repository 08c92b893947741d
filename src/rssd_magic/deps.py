"""What a cell depends on: the names it reads, fingerprinted by value, and the
files, environment variables and packages it declares.

A code key says "this code ran"; with dependency-aware keys it says "this code
ran *on these inputs*".  The inputs of a run are a JSON-able dict (stored in
the RSSD beside the run, so a later run can say what changed)::

    {"names":    {"df": {"digest": "3f2a…", "hint": "1000×3 DataFrame"}, …},
     "files":    {"data/x.csv": "81b0…", "data/*.json": None},   # None: no match
     "env":      {"API_URL": "<sha256 of the value>", "DEBUG": None},
     "packages": {"pandas": "2.2.1", "missing-pkg": None}}

:func:`inputs_digest` folds it into one string for ``cell_key(extra=...)``;
:func:`explain` turns two of them into the one line shown when a cell runs
again although an earlier result exists.

Which names a cell reads is decided from its code (``ast``), not by tracing
the run: cheap, side-effect free, and known *before* deciding whether to run.
Values are fingerprinted by content, so an equal value rebuilt as a new object
(after a kernel restart and replay) keeps the key.  Big buffers (numpy arrays,
DataFrame columns, bytes) are hashed in place with xxh3-128, never pickled.

Nothing here imports IPython, numpy or pandas: the last two are looked up in
``sys.modules``, since a value can only be an ndarray if numpy is loaded.
"""

from __future__ import annotations

import ast
import builtins
import dis
import functools
import glob
import hashlib
import io
import json
import math
import os
import pickle
import struct
import sys
import types
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Iterable, Mapping

import xxhash

from .names import analyse, is_shell_name

#: Folded into :func:`inputs_digest`: bump it whenever a fingerprint of the
#: same value could come out different, so old keys never alias new ones.
FINGERPRINT_VERSION = "rssd_magic.fp.v1"


# ---------------------------------------------------------------------------
# Which names a cell reads
# ---------------------------------------------------------------------------


class _Scope:
    """One scope while walking the cell.

    Module and class bodies run top to bottom, so their ``names`` grow as the
    walk goes (a read before the first binding is a read of the old value).
    Function and comprehension scopes are decided statically, as Python does:
    their ``names`` are computed before their body is walked.
    """

    __slots__ = ("kind", "names", "declared_global")

    def __init__(self, kind: str, names: Iterable[str] = (), declared_global: Iterable[str] = ()):
        self.kind = kind  # "module", "class", "function" or "comp"
        self.names = set(names)
        self.declared_global = set(declared_global)


def _every_arg(args: ast.arguments) -> list[ast.arg]:
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    return [a for a in every if a is not None]


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _outer_parts(node: ast.AST) -> list[ast.AST]:
    """The parts of a ``def``, ``lambda`` or ``class`` evaluated where it
    runs, not in its own scope, in evaluation order: decorators, bases and
    keywords, defaults, annotations, return annotation."""
    if isinstance(node, ast.ClassDef):
        return [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]
    args = node.args
    parts = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
    if isinstance(node, ast.Lambda):
        return parts
    annotations = [a.annotation for a in _every_arg(args) if a.annotation is not None]
    returns = [node.returns] if node.returns is not None else []
    return [*node.decorator_list, *parts, *annotations, *returns]


def _function_bindings(body: list[ast.AST]) -> tuple[set[str], set[str]]:
    """``(locals, declared globals)`` of a function body, as the compiler sees them.

    Any binding anywhere in the body makes a name local for the whole body;
    nested functions and classes are not entered (only the parts of them that
    run here: decorators, defaults, bases), comprehensions only for walrus
    targets (which bind in the enclosing function).
    """
    names: set[str] = set()
    declared: set[str] = set()
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Name):
            if not isinstance(node.ctx, ast.Load):
                names.add(node.id)
            continue
        if isinstance(node, _DEFS):
            if not isinstance(node, ast.Lambda):
                names.add(node.name)
            stack += _outer_parts(node)
            continue
        if isinstance(node, _COMPREHENSIONS):
            for sub in ast.walk(node):
                if isinstance(sub, ast.NamedExpr) and isinstance(sub.target, ast.Name):
                    names.add(sub.target.id)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name.split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, ast.Global):
            declared.update(node.names)
        elif isinstance(node, ast.Nonlocal):
            names.update(node.names)  # an enclosing function's: never a global
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
        stack.extend(ast.iter_child_nodes(node))
    return names - declared, declared


class _ReadFinder(ast.NodeVisitor):
    """Walks a cell in evaluation order, resolving each load to its scope.

    A load that resolves to the module scope is an *input* when it happens
    while the cell's top level runs (module body, class bodies,
    comprehensions) and the name is not bound earlier in the cell.  Loads in
    function and lambda bodies run whenever the function is called, usually
    after the whole cell ran: they are inputs unless the cell binds the name
    somewhere at top level (``def f(): return k`` then ``k = 2`` reads no k).
    """

    def __init__(self) -> None:
        self.module = _Scope("module")
        self.scopes: list[_Scope] = [self.module]
        self.ever_bound: set[str] = set()
        # name → read while the top level runs (else only in a function
        # body); in order of first appearance, for a stable result.
        self.reads: dict[str, bool] = {}

    # -- resolution ---------------------------------------------------------

    def _load(self, name: str) -> None:
        innermost = len(self.scopes) - 1
        for i in range(innermost, 0, -1):
            scope = self.scopes[i]
            if name in scope.declared_global:
                break
            # A class body's names are visible in that body only, not in the
            # functions and comprehensions nested in it.
            if scope.kind == "class" and i != innermost:
                continue
            if name in scope.names:
                return
        if any(s.kind == "function" for s in self.scopes):
            self.reads.setdefault(name, False)
        elif name not in self.module.names:
            self.reads[name] = True

    def _store(self, name: str) -> None:
        scope = self.scopes[-1]
        if scope.kind in ("module", "class"):  # function/comp locals are static
            scope.names.add(name)
            if scope is self.module:
                self.ever_bound.add(name)

    def _delete(self, name: str) -> None:
        # ``del x`` needs x to exist but does not use its value: no read.
        if self.scopes[-1].kind in ("module", "class"):
            self.scopes[-1].names.discard(name)

    def _store_walrus(self, name: str) -> None:
        # ``:=`` in a comprehension binds in the enclosing non-comprehension scope.
        for scope in reversed(self.scopes):
            if scope.kind != "comp":
                if scope.kind == "module":
                    scope.names.add(name)
                    self.ever_bound.add(name)
                return

    def result(self) -> list[str]:
        return [n for n, now in self.reads.items() if now or n not in self.ever_bound]

    # -- nodes whose evaluation order differs from their field order --------

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._load(node.id)
        elif isinstance(node.ctx, ast.Store):
            self._store(node.id)
        else:
            self._delete(node.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._load(node.target.id)  # ``x += 1`` reads x first
            self.visit(node.value)
            self._store(node.target.id)
        else:
            self.visit(node.target)  # ``a[i] += 1``: the loads of a and i
            self.visit(node.value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.annotation)
        if node.value is not None or not isinstance(node.target, ast.Name):
            self.visit(node.target)  # a bare ``x: int`` binds nothing

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self._store_walrus(node.target.id)

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    visit_AsyncFor = visit_For

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._store(node.name)
        for stmt in node.body:
            self.visit(stmt)
        if node.name:
            self._delete(node.name)  # Python unbinds ``e`` when the handler ends

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._store(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._store(alias.asname or alias.name)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.pattern is not None:
            self.visit(node.pattern)
        if node.name:
            self._store(node.name)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self._store(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        for part in node.keys + node.patterns:
            self.visit(part)
        if node.rest:
            self._store(node.rest)

    # -- scopes ---------------------------------------------------------------

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for part in _outer_parts(node):
            self.visit(part)
        if isinstance(node, ast.Lambda):
            body = [node.body]
        else:
            body = node.body
            self._store(node.name)  # before the body: a recursive call is no input
        local, declared = _function_bindings(body)
        params = {a.arg for a in _every_arg(node.args)}
        self.scopes.append(_Scope("function", (local | params) - declared, declared))
        for stmt in body:
            self.visit(stmt)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for part in _outer_parts(node):
            self.visit(part)
        self.scopes.append(_Scope("class"))
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()
        self._store(node.name)

    def _comprehension(self, node) -> None:
        gens = node.generators
        self.visit(gens[0].iter)  # the first iterable is evaluated outside
        targets = {
            sub.id
            for gen in gens
            for sub in ast.walk(gen.target)
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store)
        }
        self.scopes.append(_Scope("comp", targets))
        for i, gen in enumerate(gens):
            if i:
                self.visit(gen.iter)
            self.visit(gen.target)
            for cond in gen.ifs:
                self.visit(cond)
        if isinstance(node, ast.DictComp):
            self.visit(node.key)
            self.visit(node.value)
        else:
            self.visit(node.elt)
        self.scopes.pop()

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension


def read_names(python_code: str, namespace: Mapping[str, Any] | None = None) -> list[str]:
    """Module-level names *python_code* reads without binding them first.

    In order of first appearance.  Builtins are left out unless *namespace*
    shadows them (a notebook's own ``input = ...`` is an input); so are the
    names the shell manages (``_``, ``Out``, ``get_ipython`` …), which change
    on every run.  Code that can't be analysed (names.analyse) reads
    nothing we can know: [].
    """
    finder = _ReadFinder()
    if not analyse(python_code, finder):
        return []
    shadowed = namespace if namespace is not None else {}
    # Looked up now, not at import: IPython adds ``display`` & co. to builtins.
    builtin = vars(builtins)
    return [
        n for n in finder.result() if not is_shell_name(n) and (n not in builtin or n in shadowed)
    ]


# ---------------------------------------------------------------------------
# Fingerprints of values
# ---------------------------------------------------------------------------


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


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)


def _type_name(value_or_type: Any) -> str:
    t = value_or_type if isinstance(value_or_type, type) else type(value_or_type)
    module = getattr(t, "__module__", None)
    return t.__qualname__ if module in (None, "builtins") else f"{module}.{t.__qualname__}"


@functools.lru_cache(maxsize=None)
def _distributions() -> Mapping[str, list[str]]:
    try:
        return metadata.packages_distributions()
    except Exception:  # noqa: BLE001 - broken metadata must not break fingerprints
        return {}


@functools.lru_cache(maxsize=4096)
def _dist_version(top: str) -> str | None:
    for dist in _distributions().get(top, ()):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _module_version(module: types.ModuleType) -> str:
    """What identifies the code of *module*.

    An installed package: its version (``__version__`` as loaded, else its
    distribution's).  The standard library: Python's major.minor.  A module
    of the project itself (``helpers.py`` beside the notebook, no
    distribution): the content of its file, so editing it is a change.
    """
    name = getattr(module, "__name__", "") or ""
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return "python-%d.%d" % sys.version_info[:2]
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    version = _dist_version(top)
    if version is not None:
        return version
    path = getattr(module, "__file__", None)
    if isinstance(path, str) and os.path.isfile(path):
        return "file:" + _file_digest(path)
    return "unknown"


@functools.lru_cache(maxsize=4096)
def _global_loads(code: types.CodeType) -> tuple[str, ...]:
    """Names *code* (and the code nested in it) loads as globals.

    ``co_names`` would also list attribute names (``self.data`` → ``data``),
    which would tie a function to an unrelated global of that name.
    """
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
    """True for functions and classes a module defines at import time.

    Those are identified by module and name; ones from the notebook, or
    made inside a function (``<locals>``, ``<lambda>``), only by content.
    """
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
            self.feed(h, _module_version(v))
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
        self.feed(h, _module_version(module) if module is not None else None)
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


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""  # pragma: no cover


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
        return f"{t.__name__} of {_size(memoryview(v).nbytes)}", None
    if isinstance(v, (list, tuple, dict, set, frozenset)):
        return f"{t.__name__} of {len(v)}", None
    if isinstance(v, types.ModuleType):
        return f"module {v.__name__}", _module_version(v)
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


# ---------------------------------------------------------------------------
# Declared dependencies
# ---------------------------------------------------------------------------

_FILE_CHUNK = 8 << 20
#: absolute path → ((size, mtime, ctime, inode, device), digest): re-running
#: a cell does not re-read an unchanged multi-GB input.  The stamp names the
#: file itself, so a symlink pointed elsewhere is a change without resolving
#: the path (``realpath`` costs several times the ``stat``) on every run.
_file_cache: dict[str, tuple[tuple[int, ...], str]] = {}


def _file_digest(path: str) -> str:
    st = os.stat(path)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    where = os.path.abspath(path)
    cached = _file_cache.get(where)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with open(path, "rb") as f:
        if st.st_size < _FILE_CHUNK:  # most files: one read, no buffer to zero
            digest = xxhash.xxh3_128_hexdigest(f.read())
        else:
            h = xxhash.xxh3_128()
            buf = bytearray(_FILE_CHUNK)  # reused: far faster than a new chunk per read
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
            digest = h.hexdigest()
    _file_cache[where] = (stamp, digest)
    return digest


def _expand(pattern: str) -> list[str]:
    path = os.path.expanduser(pattern)
    matches = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
    files: list[str] = []
    for match in matches:
        if os.path.isdir(match):
            for root, dirs, names in os.walk(match):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names)]
        elif os.path.exists(match):
            files.append(match)
    return files


def file_deps(patterns: Iterable[str]) -> dict[str, str | None]:
    """``{path: content digest}`` for the files *patterns* match.

    Globs (``**`` too) are expanded, directories stand for every file below
    them.  A pattern that matches no file is recorded as ``{pattern: None}``,
    so "the file appeared" is a change too; an unreadable file as
    ``"error:<exception type>"``.
    """
    out: dict[str, str | None] = {}
    for pattern in patterns:
        files = _expand(pattern)
        if not files:
            out[pattern] = None
        for path in files:
            try:
                out[path] = _file_digest(path)
            except OSError as exc:
                out[path] = f"error:{type(exc).__name__}"
    return out


def env_deps(names: Iterable[str]) -> dict[str, str | None]:
    """``{VAR: digest of its value or None if unset}``.

    Values are stored only as SHA-256 digests: environment variables hold
    tokens and passwords, and the inputs dict is written to a shared file.
    """
    out: dict[str, str | None] = {}
    for name in names:
        value = os.environ.get(name)
        if value is None:
            out[name] = None
        else:
            out[name] = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
    return out


def package_deps(names: Iterable[str]) -> dict[str, str | None]:
    """``{name: installed version or None}``; import names (``sklearn``) work too."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = _dist_version(name)
    return out


def collect_inputs(
    namespace: Mapping[str, Any],
    names: Iterable[str],
    files: Iterable[str] = (),
    env: Iterable[str] = (),
    packages: Iterable[str] = (),
) -> dict[str, dict]:
    """The inputs dict of a run (see the module docstring); empty sections omitted."""
    sections = {
        "names": fingerprint_names(namespace, names),
        "files": file_deps(files),
        "env": env_deps(env),
        "packages": package_deps(packages),
    }
    return {k: v for k, v in sections.items() if v}


# ---------------------------------------------------------------------------
# Keys and messages
# ---------------------------------------------------------------------------


def _identity(entry: Any) -> Any:
    """What of an entry decides the key: a name by its digest, else by its
    type (``"?"`` + hint); a file, env var or package by its recorded value."""
    if isinstance(entry, Mapping):
        return entry.get("digest") or "?" + str(entry.get("hint", ""))
    return entry


def inputs_digest(inputs: Mapping[str, Mapping[str, Any]] | None) -> str:
    """Canonical digest of an inputs dict, for ``cell_key(extra=...)``.

    Hints and rendered values are left out (only content decides), and no
    inputs at all give ``""``, so a cell that reads nothing keeps the key it
    had before dependency tracking existed.
    """
    if not inputs or not any(inputs.values()):
        return ""
    canonical = {
        section: {k: _identity(v) for k, v in entries.items()}
        for section, entries in inputs.items()
        if entries
    }
    text = json.dumps([FINGERPRINT_VERSION, canonical], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _name_change(name: str, old: Mapping | None, new: Mapping | None) -> str | None:
    # old / new: the name's entry in each run, None when that run did not read it.
    if old is None and new is None:
        return None
    if new is None:
        return f"input {name} removed"
    if new.get("digest") is None:
        if old is not None and old.get("digest") is None and old.get("hint") == new.get("hint"):
            return None
        return f"input {name} can't be fingerprinted ({new.get('reason') or new.get('hint')})"
    short = str(new["digest"])[:6]
    if old is None:
        return f"new input {name} ({short}, {new.get('hint', '')})"
    if old.get("digest") == new["digest"]:
        return None
    if old.get("digest") is None:
        return f"input {name} changed (unfingerprintable → {short}, {new.get('hint', '')})"
    if old.get("value") is not None and new.get("value") is not None:
        return f"input {name} changed ({old['value']} → {new['value']})"
    old_hint, new_hint = old.get("hint", ""), new.get("hint", "")
    hint = new_hint if old_hint == new_hint else f"{old_hint} → {new_hint}"
    return f"input {name} changed ({str(old['digest'])[:6]} → {short}, {hint})"


#: Stands for a file pattern one of the runs did not declare.
_ABSENT = object()


def _file_change(path: str, old: Any, new: Any) -> str | None:
    # Unlike the other sections, a recorded None (no match) is not the same
    # as not declared: a new pattern that matches nothing is worth saying.
    if old == new:
        return None
    if new is _ABSENT:
        return None if old is None else f"file {path} removed"
    if new is None:
        return f"no file matches {path}" if glob.has_magic(path) else f"file {path} missing"
    if isinstance(new, str) and new.startswith("error:"):
        return f"file {path} unreadable ({new[6:]})"
    if old is None or old is _ABSENT:
        return f"new file {path}"
    return f"file {path} changed"


def _declared_change(wording: tuple[str, str, str], key: str, old: Any, new: Any) -> str | None:
    """An env var or a package: *wording* for None (unset, not installed) to
    a value, for a value to None, and for one value to another."""
    if old == new:
        return None
    added, removed, changed = wording
    template = added if old is None else removed if new is None else changed
    return template.format(key=key, old=old, new=new)


_ENV_WORDING = ("env {key} set", "env {key} unset", "env {key} changed")
_PACKAGE_WORDING = (
    "package {key} {new} installed",
    "package {key} {old} uninstalled",
    "package {key} {old} → {new}",
)

#: What explain() reports, in order: the section, how to word a change of one
#: of its keys, and what stands for a key one run did not record.
_CHANGES = (
    ("names", _name_change, None),
    ("files", _file_change, _ABSENT),
    ("env", functools.partial(_declared_change, _ENV_WORDING), None),
    ("packages", functools.partial(_declared_change, _PACKAGE_WORDING), None),
)

#: explain() names at most this many changes, then says how many more.
MAX_EXPLAINED = 5


def explain(old: Mapping[str, Mapping] | None, new: Mapping[str, Mapping] | None) -> str:
    """One line saying how *new* inputs differ from *old* ("" if they don't).

    e.g. ``input df changed (3f2a9c → 81b0e4, 1000×3 DataFrame); env TOKEN set``.
    """
    old, new = old or {}, new or {}
    changes: list[str] = []
    for section, change, absent in _CHANGES:
        o, n = old.get(section) or {}, new.get(section) or {}
        for k in [*n, *(k for k in o if k not in n)]:
            if said := change(k, o.get(k, absent), n.get(k, absent)):
                changes.append(said)
    if len(changes) > MAX_EXPLAINED:
        more = len(changes) - MAX_EXPLAINED
        changes = changes[:MAX_EXPLAINED] + [f"and {more} more"]
    return "; ".join(changes)
