"""Which names a replay may bind: the ones the cell's own code binds, never
Python's or the shell's.

A signature says who wrote a record, not that what it binds is harmless: a
teammate's RSSD you trusted, or a record you signed without reading it, can
name anything.  Binding a name acts on the notebook — ``__builtins__ = 1``
makes the next ordinary cell fail, ``print = None`` breaks every later cell,
``get_ipython = 0`` every later ``%%stateful`` cell.  So a replay binds a
recorded name only when

* the code being replayed binds or deletes it at top level (its AST:
  ``x = …``, ``import x``, ``def x``, ``for x in``, ``with … as x``,
  ``del x`` …, and the code that ``%time``, ``%%time`` and ``%%capture``
  run in the notebook's namespace).  The answer comes from the cell, never
  from the record, and the same code gives the same answer in every kernel;
  and
* it is not one of the names that are never a cell's to restore: dunders,
  builtins (``dir(builtins)``) and the names IPython keeps (``In``, ``Out``,
  ``_``, ``_i3``, ``get_ipython`` …).

Names a cell binds in ways its code doesn't show (``%run``, ``exec``,
``globals()[…] = …``, ``from m import *``) are recorded but not restored;
the replay says which, and why.
"""

from __future__ import annotations

import ast
import builtins
import re
from functools import lru_cache

from ..deps import analyse_cell

#: Names IPython keeps in the user namespace: history, output cache, itself.
SHELL_NAMES = frozenset(
    {"In", "Out", "_", "__", "___", "_i", "_ii", "_iii", "_ih", "_oh", "_dh", "get_ipython", "exit", "quit"}
)
#: ``_i3`` (the input of cell 3) and ``_3`` (its output).
_SHELL_HISTORY = re.compile(r"_i?[0-9]+")
#: Names IPython adds to ``builtins`` itself.  Not Python's builtins: whether
#: they are there depends on when this module was imported, and a cell that
#: binds ``display`` (``from IPython.display import display``) must get it
#: back in every kernel alike.  ``get_ipython`` stays refused as the shell's.
IPYTHON_BUILTINS = frozenset({"display", "get_ipython", "__IPYTHON__", "__IPYTHON__active", "dreload"})
_BUILTINS = frozenset(dir(builtins)) - IPYTHON_BUILTINS


def never_bound(name: object) -> str | None:
    """Why *name* is never a cell's to restore, or None when it may be."""
    if not isinstance(name, str) or not name.isidentifier():
        return "not a Python name"
    if name in SHELL_NAMES or _SHELL_HISTORY.fullmatch(name):
        return "IPython's own"
    if len(name) >= 4 and name.startswith("__") and name.endswith("__"):
        return "a dunder name"
    if name in _BUILTINS:
        return "shadows a builtin"
    return None


#: Magics that run their code in the notebook's namespace, so what that code
#: binds the cell binds: ``%time x = f()``, ``%%time``, ``%%capture out``.
#: IPython's transforms leave them as calls the AST can read.
LINE_MAGICS = frozenset({"time"})
CELL_MAGICS = frozenset({"time", "capture"})


class _Magics(ast.NodeVisitor):
    """The code (and ``%%capture``'s output name) of the magics above, as
    ``get_ipython().run_line_magic('time', 'x = 1')`` and
    ``get_ipython().run_cell_magic('capture', 'out', '…')`` calls outside
    function and class scopes."""

    def __init__(self) -> None:
        self.code: list[str] = []
        self.names: set[str] = set()

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        args = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else None for a in node.args]
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Call)
            and isinstance(func.value.func, ast.Name)
            and func.value.func.id == "get_ipython"
            and args
        ):
            if func.attr == "run_line_magic" and len(args) == 2 and args[0] in LINE_MAGICS and args[1] is not None:
                self.code.append(args[1])
            elif func.attr == "run_cell_magic" and len(args) == 3 and args[0] in CELL_MAGICS and args[2] is not None:
                self.code.append(args[2])
                if args[0] == "capture" and args[1] is not None:
                    # %%capture's options are flags: its one positional word is the output name.
                    self.names.update([word for word in args[1].split() if not word.startswith("-")][:1])
        self.generic_visit(node)

    def _scope(self, node: ast.AST) -> None:
        return

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scope


def _visit(python: str, visitor: ast.NodeVisitor) -> bool:
    """Run *visitor* over *python*; False when it can't be parsed or nests
    deeper than a recursive walk can go (the cell still runs)."""
    try:
        visitor.visit(ast.parse(python))
    except (SyntaxError, ValueError, RecursionError):
        return False
    return True


#: How deep magics inside magics are followed (``%time`` of ``%%time`` …).
_MAGIC_DEPTH = 3


def code_names(python: str, depth: int = 0) -> set[str]:
    """Names *python* binds or deletes at top level, its magics' code
    included (none when it can't be analysed)."""
    analysis = analyse_cell(python)
    names = set(analysis.binds) | set(analysis.deletes)
    magics = _Magics()
    if depth < _MAGIC_DEPTH and "get_ipython" in python and _visit(python, magics):
        names |= magics.names
        for code in magics.code:
            names |= code_names(code, depth + 1)
    return names


@lru_cache(maxsize=512)
def bindable(python: str | None = None, out: str | None = None, changed: frozenset[str] = frozenset()) -> frozenset[str]:
    """The names a replay of this cell may bind — the one place that says so.

    *python* is the cell's code, IPython syntax transformed (the names its
    AST binds or deletes); *out* a SQL cell's ``--out`` name; *changed* the
    names a signed record says the run changed in place (``df["b"] = …``),
    allowed only where the cell's code reads them.  Memoized: a notebook
    replays the same few cells.
    """
    names = code_names(python) if python is not None else set()
    if out is not None:
        names.add(out)
    if changed and python is not None:
        names |= changed & set(analyse_cell(python).reads)
    return frozenset(name for name in names if never_bound(name) is None)


def why_not(name: str) -> str:
    """Why a replay did not bind *name*, one not in :func:`bindable`'s set,
    in a few words."""
    return never_bound(name) or "not bound by the cell's code"
