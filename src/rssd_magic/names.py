"""Which names a cell binds at top level.

Two sources are combined, because each misses something the other sees:

* the code (``ast``): ``x = 1`` binds ``x`` even when ``x`` already held an
  equal small int (same object, so a namespace diff sees no change);
* the namespace before/after (object identity): bindings no code analysis
  sees, such as ``files = !ls`` after IPython's transforms, ``%run`` or
  ``globals()[...] = ...``.

Names the shell keeps for itself (``_``, ``_i3``, ``Out`` …) never count.
"""

from __future__ import annotations

import ast
import re

_SHELL_NAME = re.compile(r"^(_+|_i+|_i\d+|_\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython|__\w+__)$")


def is_shell_name(name: str) -> bool:
    """True for names IPython manages (history, output cache, dunders)."""
    return bool(_SHELL_NAME.match(name))


class _Binder(ast.NodeVisitor):
    """Collects module-level bindings; does not descend into scopes."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def _target(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                self.names.add(sub.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        for t in node.targets:
            self._target(t)
        self.visit(node.value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._target(node.target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._target(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self._target(node.target)
        self.visit(node.value)

    def visit_For(self, node: ast.For) -> None:
        self._target(node.target)
        self.generic_visit(node)

    visit_AsyncFor = visit_For

    def visit_withitem(self, node: ast.withitem) -> None:
        if node.optional_vars is not None:
            self._target(node.optional_vars)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        # ``except E as e`` unbinds e at the end of the block: not a binding.
        for stmt in node.body:
            self.visit(stmt)

    def _scope(self, node) -> None:
        self.names.add(node.name)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.names.add(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self.names.add(alias.asname or alias.name)

    # Comprehensions and lambdas have scopes of their own (walrus aside).
    def visit_Lambda(self, node: ast.Lambda) -> None:
        return

    def _comprehension(self, node) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.NamedExpr):
                self._target(sub.target)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension


def analyse(python_code: str, visitor: ast.NodeVisitor) -> bool:
    """Run *visitor* over the module *python_code*; False when the code can't
    be analysed: it doesn't parse, or it nests deeper than the recursive AST
    walk can go (``a + a + …`` with hundreds of terms).  Such a cell still
    runs; it just gets no answers from its code."""
    try:
        visitor.visit(ast.parse(python_code))
    except (SyntaxError, ValueError, RecursionError):
        return False
    return True


def bound_names(python_code: str) -> set[str]:
    """Names *python_code* binds at module level (empty if it can't be analysed)."""
    binder = _Binder()
    return binder.names if analyse(python_code, binder) else set()


def snapshot(namespace: dict) -> dict[str, int]:
    """Identity of every value, to diff against after a run."""
    return {k: id(v) for k, v in namespace.items()}


def names_bound(namespace: dict, before: dict[str, int], python_code: str) -> list[str]:
    """Names the run bound, in namespace order (definition order, mostly)."""
    from_code = bound_names(python_code)
    return [
        k
        for k, v in namespace.items()
        if not is_shell_name(k) and (k in from_code or before.get(k) != id(v))
    ]
