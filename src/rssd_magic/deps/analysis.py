"""What a cell's code does with module-level names: which it reads, which it
binds, which it deletes, from one parse and one walk of the code.

Decided from the code (``ast``), not by tracing the run: cheap, free of side
effects, and known *before* deciding whether to run.  The answer is memoized
by code text (:func:`analyse_cell`), since every replay of a cell asks again.

Reads and binds are two different questions, asked in the same walk:

* ``reads`` follows Python's scoping rules in evaluation order: a name read
  before the cell binds it is an input (it is the old value that is used).
* ``binds`` is the narrower, statement-level answer names_bound has always
  combined with a namespace diff: targets of assignments, ``for`` and
  ``with``, imports, ``def``/``class`` names and ``:=``.  It is not the set of
  names the walk sees stored at module level: a ``:=`` in an annotation, an
  augmented value, a ``with`` expression, an ``except`` type or a decorator
  binds at module level but never counted here (the namespace diff finds
  those), and every name stored in an assignment target counts, even one of
  a comprehension inside it.  The walk keeps both answers exactly as they were
  when three walkers gave them (tests/test_deps_analysis.py checks this
  against the old code).

The namespace helpers (:func:`snapshot`, :func:`names_bound`) live here too:
they combine ``binds`` with what the namespace says after a run.

Nothing here imports IPython.
"""

from __future__ import annotations

import ast
import builtins
import functools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

_SHELL_NAME = re.compile(r"^(_+|_i+|_i\d+|_\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython|__\w+__)$")


def is_shell_name(name: str) -> bool:
    """True for names IPython manages (history, output cache, dunders)."""
    return bool(_SHELL_NAME.match(name))


# ---------------------------------------------------------------------------
# Scopes
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

    This look-ahead is not a second module-level binder: it answers a question
    the evaluation-order walk cannot, because Python decides a function's
    locals for its whole body before it runs.  ``def f(): print(x); x = 1``
    reads a *local* x (UnboundLocalError), so when the walk meets ``print(x)``
    it must already know that the body assigns x further down.

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


# ---------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------

# Where the walk is, as far as ``binds`` is concerned.  Only _TOP changes to
# another mode; the other three hold for everything below the node that
# started them.
_TOP = 0  # statements at the cell's top level: their targets bind
_TARGET = 1  # inside an assignment, ``for`` or ``with`` target: every stored name binds
_WALRUS = 2  # inside a top-level comprehension: only ``:=`` targets bind
_NONE = 3  # nothing binds: def/class/lambda, annotations, augmented values, …


#: Calls through which code binds module names its text doesn't show:
#: ``exec``, ``globals()[…] =``, ``setattr(module, …)``, and IPython's
#: magics after its transforms (``%run``, ``%store -r``, ``%%capture out``).
_DYNAMIC_CALLS = frozenset(
    {"exec", "eval", "globals", "vars", "locals", "setattr", "delattr", "__import__",
     "run_line_magic", "run_cell_magic", "magic"}
)  # fmt: skip


class _CellWalker(ast.NodeVisitor):
    """Walks a cell in evaluation order, resolving each load to its scope.

    A load that resolves to the module scope is an *input* when it happens
    while the cell's top level runs (module body, class bodies,
    comprehensions) and the name is not bound earlier in the cell.  Loads in
    function and lambda bodies run whenever the function is called, usually
    after the whole cell ran: they are inputs unless the cell binds the name
    somewhere at top level (``def f(): return k`` then ``k = 2`` reads no k).

    The same walk collects ``binds`` (see the module docstring and the modes
    above) and ``deletes``.  Recursion depth per AST level is kept to the two
    frames of ``NodeVisitor``, so what nests too deeply to analyse is what it
    always was.
    """

    def __init__(self) -> None:
        self.module = _Scope("module")
        self.scopes: list[_Scope] = [self.module]
        self.ever_bound: set[str] = set()
        # name → read while the top level runs (else only in a function
        # body); in order of first appearance, for a stable result.
        self.reads: dict[str, bool] = {}
        self.binds: set[str] = set()
        self.deletes: dict[str, None] = {}  # ordered set
        self.stores: dict[str, None] = {}  # every module-level name stored, in order
        self.dynamic = False  # binds names its code can't show (exec, %run, import *)
        self.mode = _TOP

    # -- modes ----------------------------------------------------------------

    def _enter(self, mode: int) -> int:
        """Switch to *mode* if at top level; returns the mode to restore."""
        outer = self.mode
        if outer == _TOP:
            self.mode = mode
        return outer

    def _visit_in(self, mode: int, *nodes: ast.AST | None) -> None:
        # Only for the parts of statements (targets, annotations), which do
        # not nest into each other: the extra frame never accumulates.
        outer = self._enter(mode)
        for node in nodes:
            if node is not None:
                self.visit(node)
        self.mode = outer

    def _bind(self, name: str) -> None:
        if self.mode == _TOP:
            self.binds.add(name)

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
                self.stores[name] = None

    def _delete(self, name: str) -> None:
        # ``del x`` needs x to exist but does not use its value: no read.
        scope = self.scopes[-1]
        if scope.kind in ("module", "class"):
            scope.names.discard(name)
            if scope is self.module:
                self.deletes[name] = None
                self.stores[name] = None

    def _store_walrus(self, name: str) -> None:
        # ``:=`` in a comprehension binds in the enclosing non-comprehension scope.
        for scope in reversed(self.scopes):
            if scope.kind != "comp":
                if scope.kind == "module":
                    scope.names.add(name)
                    self.ever_bound.add(name)
                    self.stores[name] = None
                return

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name in _DYNAMIC_CALLS:
            self.dynamic = True
        self.generic_visit(node)

    def result(self) -> list[str]:
        return [n for n, now in self.reads.items() if now or n not in self.ever_bound]

    # -- nodes whose evaluation order differs from their field order --------

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._load(node.id)
        elif isinstance(node.ctx, ast.Store):
            self._store(node.id)
            if self.mode == _TARGET:
                self.binds.add(node.id)
        else:
            self._delete(node.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        self._visit_in(_TARGET, *node.targets)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._load(node.target.id)  # ``x += 1`` reads x first
            self._visit_in(_NONE, node.value)
            self._store(node.target.id)
            self._bind(node.target.id)
        else:
            self._visit_in(_TARGET, node.target)  # ``a[i] += 1``: the loads of a and i
            self._visit_in(_NONE, node.value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._visit_in(_NONE, node.value, node.annotation)
        if node.value is not None:
            self._visit_in(_TARGET, node.target)
        elif not isinstance(node.target, ast.Name):
            self._visit_in(_NONE, node.target)  # a bare ``x: int`` binds nothing

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self._store_walrus(node.target.id)
        if self.mode != _NONE:
            self.binds.add(node.target.id)

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self._visit_in(_TARGET, node.target)
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    visit_AsyncFor = visit_For

    def visit_withitem(self, node: ast.withitem) -> None:
        self._visit_in(_NONE, node.context_expr)
        self._visit_in(_TARGET, node.optional_vars)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self._visit_in(_NONE, node.type)
        if node.name:
            self._store(node.name)  # not a bind: it does not outlive the handler
        for stmt in node.body:
            self.visit(stmt)
        if node.name:
            self._delete(node.name)  # Python unbinds ``e`` when the handler ends

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._store(alias.asname or alias.name.split(".")[0])
            self._bind(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "*":
                self.dynamic = True
            else:
                self._store(alias.asname or alias.name)
                self._bind(alias.asname or alias.name)

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
    # Modes are switched inline here, not through _visit_in: lambdas and
    # comprehensions nest, and an extra frame per level would make cells
    # that analysed before too deep to analyse.

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        outer = self._enter(_NONE)
        for part in _outer_parts(node):
            self.visit(part)
        if isinstance(node, ast.Lambda):
            body = [node.body]
        else:
            body = node.body
            self._store(node.name)  # before the body: a recursive call is no input
            if outer == _TOP:
                self.binds.add(node.name)
        local, declared = _function_bindings(body)
        params = {a.arg for a in _every_arg(node.args)}
        self.scopes.append(_Scope("function", (local | params) - declared, declared))
        for stmt in body:
            self.visit(stmt)
        self.scopes.pop()
        self.mode = outer

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        outer = self._enter(_NONE)
        for part in _outer_parts(node):
            self.visit(part)
        self.scopes.append(_Scope("class"))
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()
        self.mode = outer
        self._store(node.name)
        self._bind(node.name)

    def _comprehension(self, node) -> None:
        outer = self._enter(_WALRUS)
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
        self.mode = outer

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension


# ---------------------------------------------------------------------------
# The answer
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CellAnalysis:
    """What a cell's code does with module-level names.

    ``reads``: names read before the cell binds them, in order of first
    appearance; the shell's own names (``_``, ``Out``, ``get_ipython`` …)
    left out, builtins kept (whether a builtin is an input depends on the
    namespace: see :meth:`inputs`).  ``binds``: names bound by top-level
    statements (module docstring).  ``deletes``: names a top-level ``del``
    removes, or an ``except … as`` name Python removes when its handler ends,
    in order of first appearance; a cell may bind such a name again after
    deleting it, and a ``del`` under an ``if`` may not run, so what the
    namespace holds after a run has the last word.  ``analysed`` is False
    when the code does not parse or nests too deeply for the walk (``a + a +
    …`` with hundreds of terms): such a cell still runs, with empty answers.
    """

    reads: tuple[str, ...]
    binds: frozenset[str]
    deletes: tuple[str, ...]
    analysed: bool = True
    #: Every module-level name the code stores or deletes, in order (a
    #: superset of binds and deletes); and whether the code may bind names
    #: its text doesn't show (``exec``, ``%run``, ``import *``): then only
    #: the whole namespace, before and after, can tell what it bound.
    stores: tuple[str, ...] = ()
    dynamic: bool = True

    def inputs(self, namespace: Mapping[str, Any] | None = None) -> list[str]:
        """:attr:`reads` without the builtins *namespace* does not shadow
        (a notebook's own ``input = ...`` is an input)."""
        shadowed = namespace if namespace is not None else {}
        # Looked up now, not at import: IPython adds ``display`` & co. to builtins.
        builtin = vars(builtins)
        return [n for n in self.reads if n not in builtin or n in shadowed]


UNANALYSABLE = CellAnalysis((), frozenset(), (), analysed=False)


@functools.lru_cache(maxsize=1024)
def analyse_cell(python_code: str) -> CellAnalysis:
    """One parse and one walk of *python_code* (plain Python, IPython syntax
    already transformed); memoized, as every replay of a cell asks again.

    Code nested deeper than the recursive walk can go (``a + a + …`` with
    hundreds of terms) is parsed all the same, and its top-level bindings
    found by an iterative pass (:func:`_shallow`): what it reads stays
    unknown (``analysed`` is False), what it binds does not, so a replay
    still restores them.  The answer never depends on how deep the stack
    was when it was first asked."""
    try:
        tree = ast.parse(python_code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return UNANALYSABLE
    try:
        walker = _CellWalker()
        walker.visit(tree)
    except RecursionError:
        return _shallow(tree)
    return CellAnalysis(
        reads=tuple(n for n in walker.result() if not is_shell_name(n)),
        binds=frozenset(walker.binds),
        deletes=tuple(walker.deletes),
        stores=tuple(dict.fromkeys([*walker.stores, *sorted(walker.binds)])),
        dynamic=walker.dynamic,
    )


def _shallow(tree: ast.Module) -> CellAnalysis:
    """Module-level binds and deletes of a cell too deep to walk, found
    without recursion: binding targets and the names of ``def``, ``class``
    and ``import`` statements are shallow, whatever their values are
    (``ast.walk`` is iterative).  Reads are unknown; so are names bound by
    ``:=`` inside a too-deep expression (the namespace diff still sees them
    when they name a new object)."""
    binds: set[str] = set()
    deletes: list[str] = []

    def stored(node: ast.AST, ctx: type) -> list[str]:
        return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)]

    # Module-level statements, including those inside if/for/while/with/try
    # blocks (they bind module names too), but not function or class bodies.
    pending = list(reversed(tree.body))
    while pending:
        stmt = pending.pop()
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            binds.add(stmt.name)
            continue
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            binds.update(a.asname or a.name.split(".")[0] for a in stmt.names if a.name != "*")
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                binds.update(stored(target, ast.Store))
        elif isinstance(stmt, ast.AugAssign) or (isinstance(stmt, ast.AnnAssign) and stmt.value is not None):
            binds.update(stored(stmt.target, ast.Store))
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            binds.update(stored(stmt.target, ast.Store))
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                if item.optional_vars is not None:
                    binds.update(stored(item.optional_vars, ast.Store))
        elif isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                deletes.extend(stored(target, ast.Del))
        elif isinstance(stmt, ast.ExceptHandler) and stmt.name:
            binds.add(stmt.name)
        nested = [
            *getattr(stmt, "body", ()), *getattr(stmt, "handlers", ()),
            *getattr(stmt, "orelse", ()), *getattr(stmt, "finalbody", ()),
            *getattr(stmt, "cases", ()),
        ]
        pending.extend(reversed(nested))
    return CellAnalysis((), frozenset(binds), tuple(dict.fromkeys(deletes)), analysed=False)


def read_names(python_code: str, namespace: Mapping[str, Any] | None = None) -> list[str]:
    """Module-level names *python_code* reads without binding them first.

    In order of first appearance.  Builtins are left out unless *namespace*
    shadows them; so are the names the shell manages, which change on every
    run.  Code that can't be analysed reads nothing we can know: [].
    """
    return analyse_cell(python_code).inputs(namespace)


def bound_names(python_code: str) -> set[str]:
    """Names *python_code* binds at module level (empty if it can't be analysed)."""
    return set(analyse_cell(python_code).binds)


# ---------------------------------------------------------------------------
# Bindings seen in the namespace
# ---------------------------------------------------------------------------
# Two sources are combined, because each misses something the other sees:
# the code says ``x = 1`` binds x even when x already held an equal small int
# (same object, so a namespace diff sees no change); the namespace before and
# after (object identity) sees bindings no code analysis does, such as
# ``files = !ls`` after IPython's transforms, ``%run`` or ``globals()[...]``.


def snapshot(namespace: dict, python_code: str | None = None) -> dict[str, int]:
    """Identity of the values *python_code* may bind, to diff against after a
    run: the names it stores or deletes — or every name, for code that may
    bind names its text doesn't show (or without code).  A notebook with
    40,000 globals pays for the names of the cell, not for its globals."""
    analysis = analyse_cell(python_code) if python_code is not None else None
    if analysis is None or analysis.dynamic:
        return {k: id(v) for k, v in namespace.items()}
    return {k: id(namespace[k]) for k in analysis.stores if k in namespace}


def names_bound(namespace: dict, before: dict[str, int], python_code: str) -> list[str]:
    """Names the run bound, never the shell's own (``_``, ``_i3``, ``Out``
    …): those its code binds, and those whose value is another object now —
    among the names it stores, or every name for code that may bind names
    its text doesn't show (then in namespace order)."""
    analysis = analyse_cell(python_code)
    from_code = analysis.binds
    if analysis.dynamic:
        candidates: Iterable[str] = list(namespace)
    else:
        candidates = analysis.stores
    return [
        k
        for k in candidates
        if k in namespace and not is_shell_name(k) and (k in from_code or before.get(k) != id(namespace[k]))
    ]
