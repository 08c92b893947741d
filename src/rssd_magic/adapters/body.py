"""Running a ``%%stateful`` body as a cell of the shell (IPython adapter).

The runner asks the port to execute a body; this module does it the way
the notebook cell would have run: through ``shell.run_cell_async``, so
``!cmd``, magics, the display hook and top-level ``await`` behave as in any
cell; numbered as the notebook cell the user ran, with its lines, so a
traceback says ``Cell In[7], line 5`` where the user sees line 5 of cell 7;
and followed by what ``run_cell`` does after the body (``post_execute``,
where the inline backend shows figures).

A kernel runs cells on an event loop that is already running, where a
nested ``run_cell`` can't wait for an awaiting body.  So an input
transformer (:func:`route_awaiting_cells`) turns a ``%%stateful`` cell whose
body awaits into ``await <magics>.stateful_async(line, body)``: IPython then
runs the whole cell as a coroutine on its loop, and the body is awaited.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import linecache
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..output.capture import patched
from ..engine.runner import Executed, StatefulRunError


class BodyRunner:
    """Executes bodies for one shell (the port's ``execute`` methods)."""

    def __init__(self, shell: Any):
        self.shell = shell
        self._transformed: dict[str, str] = {}

    def transform_cell(self, cell: str) -> str:
        """The cell as Python (IPython syntax transformed), memoized."""
        python = self._transformed.get(cell)
        if python is None:
            if len(self._transformed) > 512:
                self._transformed.clear()
            python = self._transformed[cell] = self.shell.transform_cell(cell)
        return python

    def execute(self, cell: str) -> Executed:
        """Run the body as a cell of its own (``!cmd``, magics and the display
        hook work as in any cell), numbered as the notebook cell the user ran."""
        with self._body(cell) as body:
            if not awaits(body.code):
                body.outcome = _run_now(self.shell.run_cell_async(cell, store_history=False, transformed_cell=body.code))
            elif not _loop_running():
                # Not routed to stateful_async (run_cell_magic called from
                # code, say), but no loop runs: the shell's runner can await it.
                body.outcome = self.shell.loop_runner(
                    self.shell.run_cell_async(cell, store_history=False, transformed_cell=body.code)
                )
            else:
                return Executed(error=StatefulRunError(
                    "this %%stateful body awaits, but was not run as a cell of its own "
                    "(%%stateful on its first line), so it can't be awaited on the running event loop"
                ))  # fmt: skip
        return body.executed()

    async def execute_async(self, cell: str) -> Executed:
        """:meth:`execute` for a body with top-level ``await``: awaited on
        the loop the outer cell runs on (a kernel's own), not a nested one."""
        with self._body(cell) as body:
            body.outcome = await self.shell.run_cell_async(cell, store_history=False, transformed_cell=body.code)
        return body.executed()

    @contextmanager
    def _body(self, cell: str) -> Iterator[_Body]:
        """Around one run of the body: what it must compile (:meth:`_numbered`);
        its traceback kept, not shown (the outer cell shows it once, when the
        runner re-raises; showing it here too would print it twice); its code
        cached under the number and with the lines of the notebook cell; and
        after it, what ``run_cell`` does after ``run_cell_async``."""
        code, number, lines = self._numbered(cell)
        body = _Body(code)

        def keep_traceback(etype, evalue, stb):
            body.traceback = stb

        compiler = self.shell.compile
        cache = compiler.cache

        def cache_as_cell(transformed_code, number_=0, raw_code=None):
            name = cache(transformed_code, number, raw_code)
            if lines is not None:
                linecache.cache[name] = (sum(map(len, lines)), None, lines, name)
            return name

        hook = self.shell.displayhook
        running = getattr(hook, "exec_result", None)
        try:
            with patched(self.shell, "_showtraceback", keep_traceback), patched(compiler, "cache", cache_as_cell):
                yield body
        finally:
            # The inline backend shows the body's figures on post_execute:
            # they are recorded with it.
            self.shell.events.trigger("post_execute")
            self.shell.events.trigger("post_run_cell", body.outcome)
            # The body's run ends by unhooking its result: the notebook
            # cell's goes back, with the value the body showed as its own.
            hook.exec_result = running
            value = getattr(body.outcome, "result", None)
            if running is not None and value is not None:
                running.result = value

    def _numbered(self, cell: str) -> tuple[str, int, list[str] | None]:
        """``(code, number, lines)`` to run the body *cell* as the notebook
        cell shows it.

        *code* is the transformed body after as many empty lines as come
        before it in the notebook cell (the ``%%stateful`` line, and empty
        lines the transform drops), so a traceback's line numbers are the
        ones the user sees.  *number* is the ``In[n]`` of the cell the user
        ran: the shell's count during a cell is n (IPython 8) or already n+1
        (IPython 9.8 and later count before running), so it is taken from
        the running cell's own result when there is one.  *lines* are the
        notebook cell's lines, for tracebacks to show (None when the running
        cell is not the one whose body this is: then the magic's line is
        taken to be the only one before the body).  Without that cell (the
        magic called from code), the body is numbered from its own first
        line, and its own lines are shown: a traceback never shows a line it
        can't print.
        """
        running = getattr(self.shell.displayhook, "exec_result", None)
        number = getattr(running, "execution_count", None)
        if not isinstance(number, int):
            number = self.shell.execution_count
        raw = getattr(getattr(running, "info", None), "raw_cell", None)
        lines, start = _cell_lines(raw, cell)
        if lines is None:
            lines, start = [line if line.endswith("\n") else line + "\n" for line in cell.splitlines()], 0
        dropped = 0  # empty lines the transform drops from the body's start
        for line in cell.splitlines():
            if line and not line.isspace():
                break
            dropped += 1
        return "\n" * (start + dropped) + self.transform_cell(cell), number, lines

@dataclass
class _Body:
    """One run of a body: the code it compiles, and what came of it."""

    code: str
    outcome: Any = None  # the shell's ExecutionResult
    traceback: list[str] | None = None

    def executed(self) -> Executed:
        outcome = self.outcome
        return Executed(outcome.result, outcome.error_before_exec or outcome.error_in_exec, self.traceback)



def _cell_lines(raw: Any, body: str) -> tuple[list[str] | None, int]:
    """The lines of the notebook cell *raw* whose ``%%stateful`` body is
    *body* (each ending in a newline), and the index of the body's first
    line; ``(None, 0)`` when *raw* is not that cell."""
    if not isinstance(raw, str):
        return None, 0
    lines = [line if line.endswith("\n") else line + "\n" for line in raw.splitlines()]
    for i, line in enumerate(lines):
        if _STATEFUL_LINE.match(line):
            if _lines_of("".join(lines[i + 1 :])) == _lines_of(body):
                return lines, i + 1
            break
    return None, 0


def _lines_of(text: str) -> list[str]:
    # Without trailing whitespace: IPython 9.19 and later pass a cell magic
    # its body with each line's trailing blanks removed; earlier, as typed.
    return [line.rstrip() for line in text.rstrip("\n").splitlines()]


_STATEFUL_LINE = re.compile(r"%%stateful(?:[ \t]|$)")


def awaits(code: str) -> bool:
    """True when *code* has top-level ``await``, ``async for`` or ``async
    with`` (as IPython decides: it compiles to a coroutine)."""
    if "await" not in code and "async" not in code:
        return False  # most cells: no compile
    try:
        compiled = compile(code, "<cell>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
        return False  # not ours to report: the run shows the error
    return bool(compiled.co_flags & inspect.CO_COROUTINE)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_now(coro: Any) -> Any:
    """Run a coroutine that never waits (``run_cell_async`` on a body that
    does not await) to its end, here and now."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("%%stateful: the body awaited although it has no top-level await")


def route_awaiting_cells(shell) -> Callable[[list[str]], list[str]]:
    """The input transformer behind ``StatefulMagics.stateful_async``:
    a ``%%stateful`` cell whose body awaits becomes one line of Python,
    ``await <the magics>.stateful_async(line, body)``; other cells pass
    unchanged.  It runs before IPython's own cell-magic transform."""

    def route_awaiting_stateful_cell(lines: list[str]) -> list[str]:
        if not lines or not lines[0].startswith("%%stateful") or not _STATEFUL_LINE.match(lines[0]):
            return lines
        body = "".join(lines[1:])
        if not shell.autoawait or ("await" not in body and "async" not in body):
            return lines
        try:
            awaiting = awaits(shell.transform_cell(body))
        except Exception:  # noqa: BLE001 - the magic reports a body that doesn't transform
            return lines
        if not awaiting:
            return lines
        line = lines[0][len("%%stateful") :].strip()
        return [f"await get_ipython().magics_manager.registry[{'StatefulMagics'!r}].stateful_async({line!r}, {body!r})\n"]

    # Not while the terminal asks whether the input is complete: a cell magic
    # is complete only at a blank line, and one line of Python always is.
    route_awaiting_stateful_cell.has_side_effects = True  # type: ignore[attr-defined]
    return route_awaiting_stateful_cell


def unroute(ipython) -> None:
    cleanup = ipython.input_transformers_cleanup
    cleanup[:] = [t for t in cleanup if getattr(t, "__name__", "") != "route_awaiting_stateful_cell"]
