"""The IPython adapter: ``%%stateful``, ``%stateful`` and their settings.

What happens to a cell is decided by the engine (runner.py and what it
uses); this module parses options, implements the small shell port the
runner talks through (run the body as a cell of its own with
``shell.run_cell_async``, so ``!cmd``, magics, ``await`` and tracebacks
behave as in any cell; show a result through the display hook), routes
cells whose body awaits to the magic's async version (an input
transformer), and turns engine errors into ``UsageError``: IPython prints
exactly ``UsageError`` without a traceback, its subclasses get one.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import atexit
import inspect
import linecache
import os
import re
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments
from traitlets import Bool, Float, Int, Unicode

from . import __version__, render, report
from .canonical import fmt_bytes, plural
from .backends import DEFAULT_RSSD, ENV_RSSD
from .capture import patched
from .claims import DEFAULT_LEASE_S
from .backends.base import StoreError
from .runner import CellOptions, CellRunner, Executed, SQLCellError, StatefulRunError, UsageProblem
from .trust import Signer
from .ttl import parse_duration

__all__ = ["StatefulMagics", "StatefulRunError", "SQLCellError", "ENV_RSSD", "load", "unload"]


@magics_class
class StatefulMagics(Magics):
    """``%%stateful``: run a cell at most once, recorded in a surveilr RSSD."""

    rssd_path = Unicode(
        None,
        allow_none=True,
        help="Where state lives for %%stateful cells without --db: an RSSD file or a postgresql:// URL. When "
        f"unset: $RSSD_MAGIC_DB, then ${ENV_RSSD}, then ./{DEFAULT_RSSD}.",
    ).tag(config=True)
    default_scope = Unicode(
        "default",
        help="Scope of the keys of cells without --scope: one for the whole RSSD, whichever client runs "
        "the notebook and whatever it is called.",
    ).tag(config=True)
    quiet = Bool(False, help="Hide the one-line replay banner (as --quiet does).").tag(config=True)
    secret = Unicode(
        None,
        allow_none=True,
        help="Team key for signing stored values (default: $RSSD_MAGIC_SECRET, else a per-user "
        "key created in the Jupyter data directory). Values signed with another key are not unpickled.",
    ).tag(config=True)
    max_output_size = Int(
        10_000_000,
        allow_none=True,
        help="Characters of a cell's output that are recorded (None: no limit). Output past it is "
        "shown live but not replayed; a note says so.",
    ).tag(config=True)
    busy_timeout_seconds = Float(
        30.0, help="How long a write waits for another process's lock on the RSSD before failing."
    ).tag(config=True)
    wait_seconds = Float(
        None,
        allow_none=True,
        help="How long a cell waits for another kernel that is running it (None: as long as that kernel lives).",
    ).tag(config=True)
    lease_seconds = Float(
        DEFAULT_LEASE_S,
        help="Heartbeat lease of a running cell: a holder whose heartbeat is not seen to move for this long "
        "(on the waiting kernel's own clock) is taken over.",
    ).tag(config=True)
    allow_network_fs = Bool(
        False,
        help="Use an RSSD on a network filesystem (NFS, SMB, sshfs …) anyway, with a rollback journal instead "
        "of WAL. Refused by default: SQLite's WAL does not work there and its locks can't be trusted.",
    ).tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.runner = CellRunner(port=self, config=self)
        self._options: dict[str, CellOptions] = {}
        self._transformed: dict[str, str] = {}
        self._signer: Signer | None = None
        self._signer_source: str | None = None
        self.clock = time.time  # what --ttl compares against; tests set their own
        atexit.register(self.close)

    # -- settings the runner reads ------------------------------------------------

    @property
    def signer(self) -> Signer:
        """The key that signs what this kernel stores and checks what it loads."""
        if self._signer is None or self._signer_source != self.secret:
            self._signer, self._signer_source = Signer.load(self.secret), self.secret
        return self._signer

    def close(self) -> None:
        """Close every store this kernel opened, marking its sessions finished."""
        self.runner.close()

    # -- the shell port (runner.ShellPort) --------------------------------------------

    @property
    def user_ns(self) -> dict:
        return self.shell.user_ns

    @property
    def live(self) -> bool:
        return hasattr(self.shell, "kernel")  # a Jupyter kernel can update a display

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
            if not _awaits(body.code):
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
        taken to be the only one before the body).
        """
        running = getattr(self.shell.displayhook, "exec_result", None)
        number = getattr(running, "execution_count", None)
        if not isinstance(number, int):
            number = self.shell.execution_count
        raw = getattr(getattr(running, "info", None), "raw_cell", None)
        lines, start = _cell_lines(raw, cell)
        dropped = 0  # empty lines the transform drops from the body's start
        for line in cell.splitlines():
            if line and not line.isspace():
                break
            dropped += 1
        return "\n" * (start + dropped) + self.transform_cell(cell), number, lines

    def publish(self, data: dict, metadata: dict, display_id: str | None = None, update: bool = False) -> None:
        transient = {"display_id": display_id} if display_id else None
        self.shell.display_pub.publish(data=data, metadata=metadata, transient=transient, update=update)

    def show_result(self, value: Any, data: dict, metadata: dict) -> None:
        """Show *data* as this cell's result, with ``_`` and ``Out[n]`` bound
        to *value*: the display hook's own steps, with the recorded
        formatting instead of formatting *value* again."""
        hook = self.shell.displayhook
        hook.start_displayhook()
        hook.write_output_prompt()
        hook.update_user_ns(value)
        hook.fill_exec_result(value)
        hook.write_format_data(data, metadata)
        hook.finish_displayhook()

    def note(self, text: str) -> None:
        """One line for the user, on stderr (not mixed into the cell's stdout),
        flushed at once so it shows where it was said, before what follows."""
        print(text, file=sys.stderr, flush=True)

    def notebook(self) -> str | None:
        ns = self.shell.user_ns
        return ns.get("__vsc_ipynb_file__") or ns.get("__session__") or os.environ.get("JPY_SESSION_NAME")

    def session_args(self) -> dict:
        import IPython

        return {
            "notebook": self.notebook(),
            "kernel": {"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv},
            "python": sys.version.split()[0],
            "ipython": IPython.__version__,
            "rssd_magic": __version__,
        }

    # -- %%stateful -----------------------------------------------------------------

    @magic_arguments()
    @argument(
        "--db",
        metavar="PATH|URL",
        help=f"RSSD file or postgresql:// URL (default: StatefulMagics.rssd_path, $RSSD_MAGIC_DB, ${ENV_RSSD}, "
        f"./{DEFAULT_RSSD}).",
    )
    @argument("--name", metavar="NAME", help="Key the cell by NAME instead of its code: it runs once per name even if edited.")
    @argument("--scope", metavar="SCOPE", help="Keep cells apart: replay only records of this scope (default: StatefulMagics.default_scope, one for the RSSD).")
    @argument("--force", action="store_true", help="Run again even if executed; history is kept.")
    @argument("--quiet", action="store_true", help="No replay banner.")
    @argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="While another kernel runs this cell, wait at most SECONDS for its result "
        "(default: StatefulMagics.wait_seconds; unset = as long as it lives).",
    )
    @argument("--ttl", metavar="DURATION", help="Run again when the recorded result is older than DURATION (45s, 30m, 12h, 7d, 2w).")
    @argument("--replay-only", action="store_true", help="Never execute: replay the recorded result, or fail if there is none.")
    @argument("--strict", action="store_true", help="Key on the raw text: any edit, even a comment, re-runs.")
    @argument("--ignore", nargs="+", metavar="NAME", help="Names the cell reads that must not be part of its key.")
    @argument("--deps-file", nargs="+", metavar="PATH", help="Files (globs allowed) whose content is part of the key.")
    @argument("--deps-env", nargs="+", metavar="VAR", help="Environment variables whose value is part of the key.")
    @argument("--deps-package", nargs="+", metavar="NAME", help="Installed packages whose version is part of the key.")
    @argument("--sql", action="store_true", help="The cell is SQL (several statements allowed), run at most once.")
    @argument(
        "--conn",
        metavar="NAME",
        help="With --sql: the connection in the notebook to run on (DuckDB, sqlite3 or psycopg); default: the state "
        "database itself.",
    )
    @argument("--out", metavar="NAME", help="With --sql: bind the result table to NAME as a pandas DataFrame.")
    @cell_magic
    def stateful(self, line: str, cell: str) -> Any:
        """Run this cell at most once; replay its outputs and names afterwards.

        The cell's state lives in a surveilr RSSD (SQLite).  The first run
        executes the cell as usual and records what it showed (stdout, stderr,
        displays, result) and the names it bound.  Every later run, in this
        kernel or a fresh one, replays that record instead of executing.  A
        cell that fails is recorded with its traceback and runs again next
        time.  The key covers the normalized code and the values it reads.
        See and manage the state with ``%stateful list|show|forget|stats``,
        the ``rssd-magic`` command, or ``sqlite3``: see the README.
        """
        opts = self._parsed(line)
        try:
            return self.runner.run(opts, cell)
        except UsageProblem as exc:
            raise UsageError(str(exc)) from None

    async def stateful_async(self, line: str, cell: str) -> Any:
        """``%%stateful`` for a body with top-level ``await``.

        A kernel runs cells on an event loop that is already running, where
        a nested ``run_cell`` can't wait for an awaiting body.  So the input
        transformer (:func:`_route_awaiting_cells`) turns such a cell into
        ``await <this>(line, body)``: IPython sees an awaiting cell and runs
        it as a coroutine on its loop, and the body is awaited with
        ``run_cell_async``.  Everything else is :meth:`stateful`'s."""
        opts = self._parsed(self.shell.var_expand(line))  # as run_cell_magic expands it
        try:
            return await self.runner.run_async(opts, cell)
        except UsageProblem as exc:
            raise UsageError(str(exc)) from None

    def _parsed(self, line: str) -> CellOptions:
        opts = self._options.get(line)
        if opts is None:  # argparse is slow; a notebook repeats few option lines
            if len(self._options) > 256:
                self._options.clear()
            args = self.stateful.parser.parse_args(_split("%%stateful", line))
            opts = self._options[line] = _cell_options(args, line.strip())
        return opts

    # -- %stateful list|show|forget|stats|gc|trust --------------------------------------

    @line_magic("stateful")
    def stateful_line(self, line: str) -> Any:
        """Inspect and manage the recorded state of %%stateful cells.

        %stateful list               the cells: key, name, scope, state, source, when, where, hits
        %stateful show KEY           source, every transition, what a replay shows
        %stateful forget KEY|--all   run again next time (EXECUTED -> FORGOTTEN)
        %stateful stats              cells, hits, time saved, storage
        %stateful gc                 delete blobs no current result refers to
        %stateful trust              sign this store's records with your key

        KEY is any unique prefix of a cell key, or a --name. Every command
        takes --db PATH|URL (default: as for %%stateful); it never creates a store.
        """
        argv = _split("%stateful", line)
        if not [a for a in argv if not a.startswith("-")]:
            raise UsageError(f"%stateful needs a command:\n{_LINE_COMMANDS}")
        args = _line_parser().parse_args(argv)
        try:
            # Never creates a store: a typo in --db is an error, not a new file.
            backend = self.runner.backend(args.db, create=False)
            backend.flush_hits()
            return _line_command(self, backend, args)
        except (StoreError, report.ReportError) as exc:
            raise UsageError(f"%stateful {args.command}: {exc}") from None


def _line_command(magics: StatefulMagics, backend, args) -> Any:
    if args.command == "list":
        return _Rendered(render.cells_text, render.cells_html, report.list_cells(backend))
    if args.command == "show":
        key = report.resolve_key(backend, args.key, prog="%stateful")["key"]
        return _Rendered(render.cell_text, None, report.show_cell(backend, key))
    if args.command == "forget":
        if bool(args.key) == args.all:
            raise UsageError("%stateful forget: give KEY or --all")
        key = None if args.all else report.resolve_key(backend, args.key, prog="%stateful")["key"]
        done = report.forget_all(backend) if args.all else report.forget(backend, key)
        print(f"forgot {plural(len(done), 'cell')}: " + ", ".join(d["key"][:12] for d in done) if done else "nothing to forget")
        return None
    if args.command == "stats":
        return _Rendered(lambda s: render.stats_text(s, prog="%stateful"), None, report.stats(backend))
    if args.command == "gc":
        r = report.gc(backend)
        print(f"freed {plural(r['deleted'], 'blob')}, {fmt_bytes(r['bytes_freed'])}")
        return None
    r = report.trust(backend, magics.signer)
    print(f"signed {plural(r['signed'], 'record')} in {plural(r['cells'], 'cell')} of {backend.location} with your key")
    for bad in r["refused"]:
        magics.note(f"[stateful] not trusted: {bad['key'][:12]} {bad['name']}: {bad['why']}")
    return None


def _cell_options(args: argparse.Namespace, line: str) -> CellOptions:
    """Checked options of one ``%%stateful`` line (UsageError when wrong)."""
    if args.wait is not None and args.wait < 0:
        raise UsageError("%%stateful: --wait must be a number of seconds >= 0")
    try:
        ttl = parse_duration(args.ttl) if args.ttl else None
    except ValueError as exc:
        raise UsageError(f"%%stateful: --ttl: {exc}") from None
    return CellOptions(
        db=args.db,
        line=line,
        name=args.name,
        scope=args.scope,
        force=args.force,
        quiet=args.quiet,
        wait_s=args.wait,
        ttl_s=ttl,
        ttl_text=args.ttl or "",
        replay_only=args.replay_only,
        strict=args.strict,
        ignore=tuple(args.ignore or ()),
        deps_file=tuple(args.deps_file or ()),
        deps_env=tuple(args.deps_env or ()),
        deps_package=tuple(args.deps_package or ()),
        sql=args.sql,
        conn=args.conn,
        out=args.out,
    )


@dataclass
class _Body:
    """One run of a body: the code it compiles, and what came of it."""

    code: str
    outcome: Any = None  # the shell's ExecutionResult
    traceback: list[str] | None = None

    def executed(self) -> Executed:
        outcome = self.outcome
        return Executed(outcome.result, outcome.error_before_exec or outcome.error_in_exec, self.traceback)


class _Rendered:
    """A report value that shows as text in a terminal and HTML in a notebook."""

    def __init__(self, text, html_, value):
        self.value, self._text, self._html = value, text, html_

    def __repr__(self) -> str:
        return self._text(self.value)

    def _repr_html_(self) -> str | None:
        return self._html(self.value) if self._html else None


_LINE_COMMANDS = "\n".join(
    line.strip() for line in StatefulMagics.stateful_line.__doc__.splitlines() if line.strip().startswith("%stateful ")
)


def _split(prog: str, line: str) -> list[str]:
    """The option line split as a shell would (``--db "my dir/x.db"``)."""
    try:
        return shlex.split(line)
    except ValueError as exc:  # an unclosed quote
        raise UsageError(f"{prog}: {exc} in the option line: {line.strip()}") from None


def _usage_help() -> None:
    """``%%stateful?``: the usage line as users type it (two ``%``), under a
    plain "Usage:" instead of reST's ``::``."""
    parser = StatefulMagics.stateful.parser
    parser.prog = "%stateful"  # the formatter adds one more %
    head, _, rest = parser.format_help().replace("::\n\n  %", "", 1).partition("\n\n")
    lines = head.splitlines()
    # Continuation lines aligned under the first option, as argparse would.
    indent = " " * len("  %%stateful ")
    usage = "\n".join(["  %" + lines[0], *(indent + line.strip() for line in lines[1:])])
    StatefulMagics.stateful.__doc__ = f"Usage:\n\n{usage}\n\n{rest}"


_usage_help()


@lru_cache(maxsize=1)
def _line_parser() -> MagicArgumentParser:
    parser = MagicArgumentParser(prog="%stateful", add_help=False)
    parser.add_argument("--db", metavar="PATH")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=MagicArgumentParser)
    for name in ("list", "stats", "gc", "trust"):
        sub.add_parser(name).add_argument("--db", metavar="PATH", default=argparse.SUPPRESS)
    show = sub.add_parser("show")
    show.add_argument("key")
    forget = sub.add_parser("forget")
    forget.add_argument("key", nargs="?")
    forget.add_argument("--all", action="store_true")
    for p in (show, forget):
        p.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS)
    return parser


def _watch_for_duckdb(shell) -> None:
    """Once the notebook imports duckdb, show its lock conflicts as one line
    naming the process that holds the file (DuckDB allows one writer per
    file; its raw error is an IO Error dump).  Installed on first sight of
    the module, so loading the extension does not import duckdb, and only
    when the user has no custom exception handler of their own."""
    from . import sql

    def check(*_args) -> None:
        duckdb = sys.modules.get("duckdb")
        if duckdb is None:
            return
        shell.events.unregister("pre_run_cell", check)
        if shell.custom_exceptions:
            return

        def on_io_error(shell, etype, value, tb, tb_offset=None):
            message = sql.describe_lock_error(value)
            if message is None:
                return shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
            shell._showtraceback(etype, value, [f"{etype.__name__}: {message}"])
            return None

        shell.set_custom_exc((duckdb.IOException,), on_io_error)

    shell.events.register("pre_run_cell", check)
    check()


def _close_on_sigterm(magics: StatefulMagics) -> None:
    """Write buffered hit counts and finish sessions when the kernel is
    stopped with SIGTERM (the default action would skip atexit), then let
    the signal do what it did before."""
    if threading.current_thread() is not threading.main_thread():
        return
    before = signal.getsignal(signal.SIGTERM)
    if before is signal.SIG_IGN:
        return

    def on_sigterm(signum, frame):
        magics.close()
        if callable(before):
            before(signum, frame)
        else:  # the default: end the process, as if we had not been here
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def _cell_lines(raw: Any, body: str) -> tuple[list[str] | None, int]:
    """The lines of the notebook cell *raw* whose ``%%stateful`` body is
    *body* (each ending in a newline), and the index of the body's first
    line; ``(None, 1)`` when *raw* is not that cell."""
    if not isinstance(raw, str) or body not in raw:
        return None, 1
    lines = [line if line.endswith("\n") else line + "\n" for line in raw.splitlines()]
    for i, line in enumerate(lines):
        if _STATEFUL_LINE.match(line):
            if "".join(lines[i + 1 :]).rstrip("\n") == body.rstrip("\n"):
                return lines, i + 1
            break
    return None, 1


_STATEFUL_LINE = re.compile(r"%%stateful(?:[ \t]|$)")


def _awaits(code: str) -> bool:
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


def _route_awaiting_cells(shell) -> Callable[[list[str]], list[str]]:
    """The input transformer behind :meth:`StatefulMagics.stateful_async`:
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
            awaits = _awaits(shell.transform_cell(body))
        except Exception:  # noqa: BLE001 - the magic reports a body that doesn't transform
            return lines
        if not awaits:
            return lines
        line = lines[0][len("%%stateful") :].strip()
        return [f"await get_ipython().magics_manager.registry[{'StatefulMagics'!r}].stateful_async({line!r}, {body!r})\n"]

    # Not while the terminal asks whether the input is complete: a cell magic
    # is complete only at a blank line, and one line of Python always is.
    route_awaiting_stateful_cell.has_side_effects = True  # type: ignore[attr-defined]
    return route_awaiting_stateful_cell


def _unroute(ipython) -> None:
    cleanup = ipython.input_transformers_cleanup
    cleanup[:] = [t for t in cleanup if getattr(t, "__name__", "") != "route_awaiting_stateful_cell"]


def load(ipython) -> None:
    ipython.register_magics(StatefulMagics)
    _unroute(ipython)  # loaded again: one transformer, not two
    ipython.input_transformers_cleanup.append(_route_awaiting_cells(ipython))
    _watch_for_duckdb(ipython)
    _close_on_sigterm(ipython.magics_manager.registry["StatefulMagics"])


def unload(ipython) -> None:
    _unroute(ipython)
    magics = ipython.magics_manager.registry.get("StatefulMagics")
    if magics is not None:
        magics.close()
