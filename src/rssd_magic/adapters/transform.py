"""``%%stateful`` cells transformed without the passes that can't change
them (IPython adapter).

IPython turns a cell magic into one line of Python,
``get_ipython().run_cell_magic(name, line, body)``, and then treats that line
as it treats any input: it tokenizes it looking for ``%``, ``!`` and ``?``
escapes and hands it to the prefilter (autocall, automagic).  Neither can
change that line: the body is one string literal, and the line is a call of
``get_ipython()``.  Those two passes cost 35–50 µs a cell, more than a
replay's own work (about 45 µs), so they were most of what ``%%stateful``
added to a cell that replays.

:func:`install` wraps the shell's ``transform_cell``.  A ``%%stateful`` cell
still goes through the cleanup and line transforms (the user's, ours, and
IPython's ``cell_magic``) and the post transforms, so the result is the
text IPython would have produced (tested against IPython's own method over
generated cells).  The token and prefilter passes are skipped only while
they are IPython's own: a token transformer, prefilter checker or
prefilter transformer someone else registered, or another wrapper of
``transform_cell`` installed before ours, sends the cell the whole way, as
before.  Every other cell is left to IPython.

The options line (``%%stateful --name {run}``) is expanded as IPython
expands a magic's line — ``$name`` and ``{expression}`` from the notebook's
namespace — but only when it holds one (:func:`expanded`; the magic opts
out of IPython's own expansion, which copies the whole namespace first:
0.26 ms a cell among 40,000 globals).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from IPython.core import inputtransformer2 as it2
from IPython.core import prefilter
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.text import DollarFormatter

#: The cell magics whose cells take the shortcut: ours (a benchmark adds its
#: no-op magic, to weigh ``%%stateful`` against a magic transformed alike).
MAGICS = {"stateful"}
#: IPython's own token transformers, in their order.
TOKEN_TRANSFORMERS = [it2.MagicAssign, it2.SystemAssign, it2.EscapedCommand, it2.HelpEnd]
#: IPython's own prefilter checkers.
CHECKERS = frozenset({
    prefilter.EmacsChecker, prefilter.MacroChecker, prefilter.IPyAutocallChecker, prefilter.AssignmentChecker,
    prefilter.AutoMagicChecker, prefilter.PythonOpsChecker, prefilter.AutocallChecker,
})  # fmt: skip
_CELL_MAGIC = re.compile(r"\s*%%(\w+)(?:[ \t\r\n]|$)")


def install(shell: Any) -> None:
    """Wrap *shell*'s ``transform_cell`` (once, however often the extension
    is loaded)."""
    uninstall(shell)
    previous = shell.transform_cell
    # Only IPython's own method is skipped past: another wrapper, or a shell
    # class with a transform_cell of its own, sees every cell.
    own = getattr(previous, "__func__", None) is InteractiveShell.transform_cell

    def transform_cell(raw_cell: str) -> str:
        if own:
            fast = _transformed(shell, raw_cell)
            if fast is not None:
                return fast
        return previous(raw_cell)

    transform_cell.rssd_magic_previous = previous  # type: ignore[attr-defined]
    shell.transform_cell = transform_cell


def uninstall(shell: Any) -> None:
    """Put back what :func:`install` wrapped, if ours is still on top."""
    current = vars(shell).get("transform_cell")
    previous = getattr(current, "rssd_magic_previous", None)
    if previous is None:
        return
    if getattr(previous, "__func__", None) is getattr(type(shell), "transform_cell", None):
        del shell.transform_cell  # IPython's method again, not a copy of it
    else:
        shell.transform_cell = previous


def _transformed(shell: Any, raw_cell: str) -> str | None:
    """The transformed ``%%stateful`` cell, or None to take IPython's way."""
    magic = _CELL_MAGIC.match(raw_cell)
    if magic is None or magic[1] not in MAGICS or not _passes_are_ipythons(shell):
        return None
    if "await" in raw_cell or "async" in raw_cell:
        # Maybe a body that awaits: our cleanup transform routes it, compiling
        # the body to tell.  IPython's way from the start, so that runs once.
        return None
    manager = shell.input_transformer_manager
    # As TransformerManager.transform_cell, up to its token pass.
    lines = (raw_cell if raw_cell.endswith("\n") else raw_cell + "\n").splitlines(keepends=True)
    for transform in manager.cleanup_transforms + manager.line_transforms:
        lines = transform(lines)
    # What IPython's ``cell_magic`` makes of the cell: one call.
    if len(lines) != 1 or not lines[0].startswith(f"get_ipython().run_cell_magic({magic[1]!r}, "):
        return None  # not the one call
    shell._last_input_line = lines[0].rstrip("\n")  # what the prefilter notes for a crash report
    post: Callable[[list[str]], list[str]]
    for post in shell.input_transformers_post:
        lines = post(lines)
    return "".join(lines)


def _passes_are_ipythons(shell: Any) -> bool:
    try:
        manager = shell.prefilter_manager
        return (
            shell.input_transformer_manager.token_transformers == TOKEN_TRANSFORMERS
            and not manager.transformers
            and all(type(checker) in CHECKERS for checker in manager.checkers)
        )
    except AttributeError:  # a shell (or IPython) whose passes look otherwise: the whole way
        return False


_FORMATTER = DollarFormatter()


def expanded(shell: Any, line: str) -> str:
    """*line* with ``$name`` and ``{expression}`` filled in from the
    notebook's namespace, as IPython's ``var_expand`` does for a magic —
    a line that doesn't format is taken as it is — copying the namespace only
    when there is something to fill in.  (IPython also lets locals of its own
    ``run_code`` frame shadow the user's names: ``{result}`` gave its
    ExecutionResult.  Here the notebook's names are the only ones.)"""
    if "$" not in line and "{" not in line:
        return line
    try:
        return _FORMATTER.vformat(line, args=[], kwargs=dict(shell.user_ns))
    except Exception:  # noqa: BLE001 - as IPython: not a template, then
        return line
