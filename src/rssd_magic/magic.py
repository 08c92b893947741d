"""The IPython adapter: ``%%stateful`` and its configuration.

Everything that decides *what* happens lives in the engine modules; this one
parses options, finds the RSSD, and plugs the engine into the shell: running
the body through ``shell.run_cell`` (so ``!cmd``, magics and tracebacks
behave as in any cell), capturing its outputs, and turning engine errors into
``UsageError`` (IPython prints exactly ``UsageError`` without a traceback;
subclasses get one).
"""

from __future__ import annotations

import argparse
import atexit
import html
import os
import re
import shlex
import sqlite3
import sys
import time
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments, parse_argstring
from traitlets import Bool, Float, Int, Unicode

from . import __version__, render, report, sql
from .acquire import HolderFailed, WaitTimeout, acquire
from .capture import capture, patched, replay
from .claims import DEFAULT_LEASE_S
from .deps import collect_inputs, inputs_digest, names_bound, read_names, snapshot
from .keys import CellKey, cell_key
from .plan import NothingToReplay, plan
from .serialize import UNTRUSTED, dump_names, dump_value, load_names, load_value
from .store import (
    DEFAULT_RSSD,
    ENV_RSSD,
    EXECUTED,
    FAILED,
    INTERRUPTED,
    RSSDError,
    Store,
    Transition,
    resolve_rssd,
)
from .trust import Signer, sign_specs, trusted_names
from .ttl import parse_duration

RESULT_FORMAT = "rssd_magic.result.v1"
#: Key under which the cell's result value is signed beside its names.
RESULT_VALUE = "\0result"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _note(message: str) -> None:
    """One line for the user, on stderr (not mixed into the cell's stdout)."""
    print(message, file=sys.stderr)


class StatefulRunError(Exception):
    """A cell that could not be run or replayed for a reason outside the
    user's code (waited too long, the holder failed).  Shown as one line."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class SQLCellError(StatefulRunError):
    """A statement of a --sql cell failed: the database's own message."""


@dataclass
class _SQLCell:
    body: str
    conn: Any
    params: dict
    extra: str
    out: str | None


class _Status:
    """One live status line while waiting for another kernel.

    In a Jupyter kernel it is a display updated in place (display_id); in a
    terminal it is written once, since a terminal can't update a display and
    a line per poll would flood it.
    """

    def __init__(self, shell):
        self.shell = shell
        self.live = hasattr(shell, "kernel")  # a Jupyter kernel can update a display
        self.display_id: str | None = None
        self._last = -1.0

    def _show(self, text: str, update: bool) -> None:
        data = {"text/plain": f"[stateful] {text}"}
        md = {"rssd_magic": {"status": True}}
        self.shell.display_pub.publish(data=data, metadata=md, transient={"display_id": self.display_id}, update=update)

    def waiting(self, holder, waited: float) -> None:
        if waited - self._last < 1.0:
            return  # refresh once a second, not once a poll
        self._last = waited
        text = f"waiting {waited:.0f}s for {holder.describe()} to finish this cell"
        if self.display_id is None:
            self.display_id = os.urandom(8).hex()
            if self.live:
                self._show(text, update=False)
            else:
                _note(f"[stateful] {text}")
        elif self.live:
            self._show(text, update=True)

    def done(self, text: str) -> None:
        if self.display_id is not None and self.live:
            self._show(text, update=True)


def _plain(stb: list[str]) -> str:
    return _ANSI.sub("", "\n".join(stb))


@magics_class
class StatefulMagics(Magics):
    """``%%stateful``: run a cell at most once, recorded in a surveilr RSSD."""

    rssd_path = Unicode(
        None,
        allow_none=True,
        help="RSSD file for %%stateful cells without --db. When unset: the "
        f"environment variable {ENV_RSSD}, then ./{DEFAULT_RSSD}.",
    ).tag(config=True)
    default_scope = Unicode(
        "default",
        help="Scope of cell keys when the kernel can't tell which notebook it runs.",
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
        help="Heartbeat lease of a running claim; a claim from another host not renewed for this long is taken over.",
    ).tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self._stores: dict[Path, Store] = {}
        self._resolved: dict[tuple, Store] = {}
        self._args: dict[str, Any] = {}
        self._signer: Signer | None = None
        self._transformed: dict[str, str] = {}
        self._said: set[tuple] = set()
        self._sql_conns: dict[Path, sqlite3.Connection] = {}
        self._signer_source: str | None = None
        self.clock = time.time  # what --ttl compares against; tests set their own
        atexit.register(self.close)

    # -- configuration --------------------------------------------------------

    def store(self, db: str | None = None) -> Store:
        """The open store for this cell's RSSD (opened once per kernel and file)."""
        # Resolving a path costs more than the replay's query: remember it per
        # everything it depends on.
        where = (db, self.rssd_path, os.environ.get(ENV_RSSD), os.getcwd())
        store = self._resolved.get(where)
        if store is not None and store.conn is not None:
            return store
        path = resolve_rssd(db, self.rssd_path)
        store = self._stores.get(path)
        if store is None:
            try:
                store = Store.open(path, self._session_args(), busy_timeout_s=self.busy_timeout_seconds)
            except RSSDError as exc:
                raise UsageError(f"%%stateful: {exc}. The cell was not run.") from None
            self._stores[path] = store
        self._resolved[where] = store
        return store

    @property
    def signer(self) -> Signer:
        """The key that signs what this kernel stores and checks what it loads."""
        if self._signer is None or self._signer_source != self.secret:
            self._signer, self._signer_source = Signer.load(self.secret), self.secret
        return self._signer

    def _notebook(self) -> str | None:
        ns = self.shell.user_ns
        return ns.get("__vsc_ipynb_file__") or ns.get("__session__") or os.environ.get("JPY_SESSION_NAME")

    def scope(self, explicit: str | None, store: Store) -> str:
        """--scope, else the notebook's path (relative to the RSSD when it
        lies below it, so teammates' checkouts agree), else the default."""
        if explicit:
            return explicit
        notebook = self._notebook()
        return _notebook_scope(notebook, store.path.parent) if notebook else self.default_scope

    def _session_args(self) -> dict:
        import IPython

        return {
            "notebook": self._notebook(),
            "kernel": {"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv},
            "python": sys.version.split()[0],
            "ipython": IPython.__version__,
            "rssd_magic": __version__,
        }

    def close(self) -> None:
        """Close every RSSD this kernel opened, marking its sessions finished."""
        for conn in self._sql_conns.values():
            conn.close()
        self._sql_conns.clear()
        for store in self._stores.values():
            store.close()
        self._stores.clear()
        self._resolved.clear()

    # -- the magic ------------------------------------------------------------

    @magic_arguments()
    @argument("--db", metavar="PATH", help=f"RSSD file (default: config, ${ENV_RSSD}, ./{DEFAULT_RSSD}).")
    @argument(
        "--name",
        metavar="NAME",
        help="Key the cell by NAME instead of its code: it runs once per name even if edited.",
    )
    @argument("--scope", metavar="SCOPE", help="Key scope (default: the notebook, else StatefulMagics.default_scope).")
    @argument("--force", action="store_true", help="Run again even if executed; history is kept.")
    @argument("--quiet", action="store_true", help="No replay banner.")
    @argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="While another kernel runs this cell, wait at most SECONDS for its result "
        "(default: StatefulMagics.wait_seconds; unset = as long as it lives).",
    )
    @argument(
        "--ttl",
        metavar="DURATION",
        help="Run again when the recorded result is older than DURATION (45s, 30m, 12h, 7d, 2w).",
    )
    @argument(
        "--replay-only",
        action="store_true",
        help="Never execute: replay the recorded result, or fail if there is none.",
    )
    @argument("--strict", action="store_true", help="Key on the raw text: any edit, even a comment, re-runs.")
    @argument(
        "--ignore", nargs="+", metavar="NAME", help="Names the cell reads that must not be part of its key."
    )
    @argument(
        "--deps-file", nargs="+", metavar="PATH", help="Files (globs allowed) whose content is part of the key."
    )
    @argument("--deps-env", nargs="+", metavar="VAR", help="Environment variables whose value is part of the key.")
    @argument(
        "--deps-package", nargs="+", metavar="NAME", help="Installed packages whose version is part of the key."
    )
    @argument("--sql", action="store_true", help="The cell is SQL (several statements allowed), run at most once.")
    @argument(
        "--conn",
        metavar="NAME",
        help="With --sql: the connection in the notebook to run on (DuckDB or sqlite3); default: the RSSD itself.",
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
        args = self._args.get(line)
        if args is None:  # argparse is slow; a notebook repeats few option lines
            if len(self._args) > 256:
                self._args.clear()
            args = self._args[line] = parse_argstring(self.stateful, line)
        if args.wait is not None and args.wait < 0:
            raise UsageError("%%stateful: --wait must be a number of seconds >= 0")
        try:
            ttl = parse_duration(args.ttl) if args.ttl else None
        except ValueError as exc:
            raise UsageError(f"%%stateful: --ttl: {exc}") from None
        store = self.store(args.db)
        scope = self.scope(args.scope, store)
        if args.sql:
            sql_cell = self._sql_cell(cell, args, store)
            python, inputs = "", {}
            key = cell_key(sql.normalize_sql(cell), scope, args.name, extra=sql_cell.extra)
        else:
            if args.conn or args.out:
                raise UsageError("%%stateful: --conn and --out go with --sql")
            sql_cell = None
            python = self._python(cell)
            inputs = self._inputs(python, args, cell) if args.name is None else {}
            key = cell_key(cell, scope, args.name, inputs=inputs_digest(inputs), strict=args.strict)
        quiet = args.quiet or self.quiet
        try:
            # The hot path is this one indexed read, then a replay: no write.
            todo = plan(
                store,
                key,
                store.latest(key),
                inputs=inputs,
                force=args.force,
                ttl_s=ttl,
                ttl_text=args.ttl or "",
                replay_only=args.replay_only,
                now=self.clock(),
            )
        except NothingToReplay as exc:
            raise UsageError(f"%%stateful --replay-only: {exc}; it was not run") from None
        if todo.replay is not None:
            return self._replay(store, key, todo.replay, quiet)
        if todo.note:
            _note(f"[stateful] {todo.note}")
        status = _Status(self.shell)
        try:
            outcome = acquire(
                store,
                key,
                cell,
                {"source": cell, "code_hash": key.code_hash},
                rerun_of=todo.rerun_of,
                rerun_reason=todo.rerun_reason,
                wait_s=self.wait_seconds if args.wait is None else args.wait,
                lease_s=self.lease_seconds,
                first_reason=todo.first_reason,
                on_wait=status.waiting,
            )
        except sqlite3.Error as exc:
            raise UsageError(
                f"%%stateful: RSSD {store.path}: cannot record the run ({exc}). The cell was not run."
            ) from None
        except (WaitTimeout, HolderFailed) as exc:
            status.done(str(exc))
            raise StatefulRunError(str(exc)) from None
        except KeyboardInterrupt:
            status.done("stopped waiting (interrupted); the cell was not run here")
            raise
        if outcome.kind == "done":
            status.done("the other kernel finished; replaying its result")
            return self._replay(store, key, outcome.previous, quiet)
        if outcome.abandoned is not None:
            status.done("the other kernel died; running the cell here")
            _note(f"[stateful] took over: the previous run was abandoned ({outcome.abandoned.reason})")
        if sql_cell is not None:
            return self._run_sql(store, key, outcome.running, sql_cell)
        return self._run(store, key, outcome.running, cell, python, inputs)

    # -- SQL cells ------------------------------------------------------------

    def _sql_cell(self, body: str, args, store: Store) -> "_SQLCell":
        """Resolve the target and parameters of a --sql cell (nothing runs)."""
        try:
            import pandas  # noqa: F401 - result tables are DataFrames
            import pyarrow  # noqa: F401 - and large ones are stored as Parquet
        except ImportError as exc:
            raise UsageError(
                f"%%stateful --sql needs pandas and pyarrow ({exc}): pip install 'rssd_magic[sql]'"
            ) from None
        ns = self.shell.user_ns
        if args.conn:
            if args.conn not in ns:
                raise UsageError(f"%%stateful --conn {args.conn}: no such name in the notebook")
            conn = ns[args.conn]
        else:
            conn = self._rssd_sql(store)
        try:
            _, params = sql.bind(body, ns)
            extra = sql.key_extra(body, conn, params)
        except sql.SQLUsageError as exc:
            option = f" --conn {args.conn}" if args.conn else ""
            raise UsageError(f"%%stateful --sql{option}: {exc}. The cell was not run.") from None
        return _SQLCell(body, conn, params, extra, args.out)

    def _rssd_sql(self, store: Store) -> sqlite3.Connection:
        """A connection of its own for the user's SQL on the RSSD itself: what
        a cell does (PRAGMAs, transactions) must not touch the state's."""
        conn = self._sql_conns.get(store.path)
        if conn is None:
            conn = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False, timeout=store.busy_timeout_s)
            self._sql_conns[store.path] = conn
        return conn

    def _run_sql(self, store: Store, key: CellKey, running: Transition, cell: "_SQLCell") -> None:
        started = time.perf_counter()
        try:
            res = sql.run_sql(cell.conn, cell.body, cell.params)
        except sql.SQLExecutionError as exc:
            err = {"ename": exc.error_type or "SQLError", "evalue": str(exc), "traceback": str(exc), "sql": exc.as_dict()}
            result = {**_result_base(store, key, started), "outputs": [], "error": err}
            self._finish(store, running, FAILED, result, str(exc).splitlines()[0][:500])
            raise SQLCellError(str(exc)) from None
        except KeyboardInterrupt as exc:
            result = {**_result_base(store, key, started), "error": _error(exc, None)}
            self._finish(store, running, INTERRUPTED, result, "interrupted")
            raise
        base = {**_result_base(store, key, started), "sql": res.as_dict()}
        outputs: list[dict] = []
        specs: dict[str, dict] = {}
        blobs: list = []
        if res.frame is None:
            summary = f"{res.summary()}\n"
            print(summary, end="")
            outputs.append({"output_type": "stream", "name": "stdout", "text": summary})
        else:
            spec, blobs = sql.dump_frame(res.frame)
            data, metadata = sql.frame_bundle(res.frame)
            base["result_value"] = spec
            if cell.out:
                specs[cell.out] = spec
                self.shell.user_ns[cell.out] = res.frame
            self._show_result(res.frame, data, metadata)
            outputs.append(
                {"output_type": "execute_result", "execution_count": self.shell.execution_count, "data": data, "metadata": metadata}
            )
        self._executed(store, running, {**base, "outputs": outputs, "names": specs}, blobs)
        return None

    # -- inputs (dependency-aware keys) ----------------------------------------

    def _python(self, cell: str) -> str:
        """The cell as Python (IPython syntax transformed), memoized."""
        python = self._transformed.get(cell)
        if python is None:
            if len(self._transformed) > 512:
                self._transformed.clear()
            python = self._transformed[cell] = self.shell.transform_cell(cell)
        return python

    def _inputs(self, python: str, args, cell: str) -> dict:
        """What the cell reads, fingerprinted; declared files, env, packages."""
        ignore = set(args.ignore or ())
        read = [n for n in _read_names(python) if n not in ignore]
        inputs = collect_inputs(
            self.shell.user_ns, read, args.deps_file or (), args.deps_env or (), args.deps_package or ()
        )
        blind = {n: e.get("reason") for n, e in inputs.get("names", {}).items() if e.get("digest") is None}
        said = (cell, tuple(sorted(blind)))
        if blind and said not in self._said:
            self._said.add(said)
            _note(
                "[stateful] left out of the key (can't be fingerprinted; --ignore NAME to silence): "
                + "; ".join(f"{n} ({why})" for n, why in blind.items())
            )
        return inputs

    # -- the line magic: %stateful list|show|forget|stats|gc|trust -------------

    @line_magic("stateful")
    def stateful_line(self, line: str) -> Any:
        """Inspect and manage the recorded state of %%stateful cells.

        %stateful list               the cells: key, name, state, source, when, where, hits
        %stateful show KEY           source, every transition, what a replay shows
        %stateful forget KEY|--all   run again next time (EXECUTED -> FORGOTTEN)
        %stateful stats              cells, hits, time saved, storage
        %stateful gc                 delete blobs no current result refers to
        %stateful trust              sign this RSSD's values with your key

        KEY is any unique prefix of a cell key (or a --name). Every command
        takes --db PATH (default: as for %%stateful).
        """
        args = _line_parser().parse_args(shlex.split(line))
        store = self.store(args.db)
        try:
            store.flush_hits()
            if args.command == "list":
                return _Rendered(render.cells_text, render.cells_html, report.list_cells(store))
            if args.command == "show":
                cell = report.show_cell(store, report.resolve_key(store, args.key)["key"])
                return _Rendered(render.cell_text, None, cell)
            if args.command == "forget":
                if bool(args.key) == args.all:
                    raise UsageError("%stateful forget: give KEY or --all")
                done = (
                    report.forget_all(store)
                    if args.all
                    else report.forget(store, report.resolve_key(store, args.key)["key"])
                )
                print(f"forgot {len(done)} cell(s): " + ", ".join(d["key"][:12] for d in done) if done else "nothing to forget")
                return None
            if args.command == "stats":
                return _Rendered(render.stats_text, None, report.stats(store))
            if args.command == "gc":
                r = report.gc(store)
                print(f"freed {r['deleted']} blob(s), {render.fmt_bytes(r['bytes_freed'])}")
                return None
            r = report.trust(store, self.signer)
            print(f"signed {r['signed']} value(s) in {r['cells']} cell(s) of {store.path} with your key")
            for bad in r["refused"]:
                _note(f"[stateful] not trusted: {bad['key'][:12]} {bad['name']}: {bad['why']}")
            return None
        except report.ReportError as exc:
            raise UsageError(f"%stateful {args.command}: {exc}") from None

    # -- replay ---------------------------------------------------------------

    def _replay(self, store: Store, key: CellKey, done: Transition, quiet: bool) -> Any:
        store.note_hit(done.state_id)
        try:
            result = done.result()
            if not isinstance(result, dict):
                raise ValueError(f"a JSON {type(result).__name__}, not an object")
        except ValueError as exc:
            raise StatefulRunError(
                f"the recorded result of cell {key.digest[:12]} in {store.path} is unreadable ({exc}); "
                "nothing was replayed and the cell was not run (--force runs it and records it again)"
            ) from None
        specs = result.get("names", {})
        value_spec = result.get("result_value")
        signed = {**specs, RESULT_VALUE: value_spec} if isinstance(specs, dict) else {RESULT_VALUE: value_spec}
        trusted = trusted_names(self.signer, signed, store.signatures)
        _, missing = load_names(specs, store.get_blob, self.shell.user_ns, trusted.__contains__)
        if not quiet:
            self._banner(
                f"replayed {key.digest[:12]}: executed {done.transitioned_at} UTC "
                f"on {result.get('host', '?')} in {result.get('duration_s', 0):.3g}s"
            )
        if key.kind == "name" and result.get("code_hash") not in (None, key.code_hash):
            _note(
                f"[stateful] the code of --name {key.name} changed since it ran; "
                "replaying the recorded run (use --force to run the new code)"
            )
        if missing:
            _note(
                "[stateful] not restored: "
                + "; ".join(f"{name} {why}" for name, why in missing.items())
            )
            if UNTRUSTED in missing.values():
                _note(
                    f"[stateful] values signed by another key are never unpickled; if you trust "
                    f"{store.path}, run %stateful trust (or: rssd-magic --db {store.path} trust)"
                )
        replayed, skipped = replay(result.get("outputs", []), self.shell)
        if skipped:
            _note(f"[stateful] {skipped} recorded output(s) of {store.path} were malformed and not shown")
        if replayed is not None and value_spec is not None:
            try:
                value = load_value(value_spec, store.get_blob, self.shell.user_ns, RESULT_VALUE in trusted)
            except Exception:  # noqa: BLE001 - the stand-in still shows the recorded bundle
                return replayed
            self._show_result(value, replayed.data, replayed.metadata)
            return None
        return replayed

    def _show_result(self, value: Any, data: dict, metadata: dict) -> None:
        """Show the recorded bundle as this cell's result, with ``_`` and
        ``Out[n]`` bound to the restored value: the display hook's own steps,
        with the recorded formatting instead of formatting *value* again."""
        hook = self.shell.displayhook
        hook.start_displayhook()
        hook.write_output_prompt()
        hook.update_user_ns(value)
        hook.fill_exec_result(value)
        hook.write_format_data(data, metadata)
        hook.finish_displayhook()

    def _banner(self, text: str) -> None:
        """The replay banner: a display of its own (never merged into the
        cell's stderr), tagged in metadata so tools can tell it apart."""
        self.shell.display_pub.publish(
            data={
                "text/plain": f"[stateful] {text}",
                "text/html": f'<small style="opacity:.6">&#8635; stateful: {html.escape(text)}</small>',
            },
            metadata={"rssd_magic": {"banner": True}},
        )

    # -- run ------------------------------------------------------------------

    def _run(self, store: Store, key: CellKey, running: Transition, cell: str, python: str, inputs: dict) -> None:
        shell = self.shell
        before = snapshot(shell.user_ns)
        shown: dict[str, list[str]] = {}

        def keep_traceback(etype, evalue, stb):
            # The body's traceback is shown once, by the outer cell, when we
            # re-raise below; showing it here too would print it twice.
            shown["stb"] = stb

        started = time.perf_counter()
        try:
            with capture(shell, self.max_output_size) as rec, patched(shell, "_showtraceback", keep_traceback):
                outcome = shell.run_cell(cell, store_history=False)
        except BaseException as exc:  # interrupted outside the body itself
            result = {**_result_base(store, key, started, inputs), "error": _error(exc, None)}
            self._finish(store, running, INTERRUPTED, result, "interrupted")
            raise
        error = outcome.error_before_exec or outcome.error_in_exec
        base = _result_base(store, key, started, inputs)

        if error is not None:
            err = _error(error, shown.get("stb"))
            shown_error = {"output_type": "error", "ename": err["ename"], "evalue": err["evalue"], "traceback": shown.get("stb", [])}
            outputs = rec.finish() + [shown_error]
            to_state = INTERRUPTED if isinstance(error, KeyboardInterrupt) else FAILED
            why = f"{err['ename']}: {err['evalue']}" if err["evalue"] else err["ename"]
            self._finish(store, running, to_state, {**base, "outputs": outputs, "error": err}, why[:500])
            raise _for_display(error, shown.get("stb"))

        names = names_bound(shell.user_ns, before, python)
        specs, blobs = dump_names(shell.user_ns, names)
        outputs = rec.finish()
        if any(o["output_type"] == "execute_result" for o in outputs):
            # Kept so a replay binds _ / Out[n] to the value, not a stand-in.
            base["result_value"], value_blobs = dump_value(outcome.result)
            blobs += value_blobs
        bad = {n: s["error"] for n, s in specs.items() if s["kind"] == "unserializable"}
        if bad:
            _note(
                "[stateful] executed, but these names can't be saved and won't be restored on replay: "
                + "; ".join(f"{n} ({why})" for n, why in bad.items())
            )
        self._executed(store, running, {**base, "outputs": outputs, "names": specs}, blobs)
        return None

    def _executed(self, store: Store, running: Transition, result: dict, blobs: list) -> None:
        """Record a completed run, its blobs and the signatures of its payloads."""
        signed = {**result["names"], RESULT_VALUE: result.get("result_value")}
        self._finish(store, running, EXECUTED, result, "completed", blobs, sign_specs(self.signer, signed))

    @staticmethod
    def _finish(store, running, to_state, result, reason, blobs=(), signatures=()) -> None:
        try:
            store.finish_run(running, to_state, result, reason, blobs, signatures)
        except (sqlite3.Error, ValueError) as exc:
            # The cell ran and its output is on screen; only the record failed.
            _note(f"[stateful] RSSD {store.path}: the run could not be recorded ({exc}); it will run again next time")


class _Rendered:
    """A report value that shows as text in a terminal and HTML in a notebook."""

    def __init__(self, text, html_, value):
        self.value, self._text, self._html = value, text, html_

    def __repr__(self) -> str:
        return self._text(self.value)

    def _repr_html_(self) -> str | None:
        return self._html(self.value) if self._html else None


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


@lru_cache(maxsize=64)
def _notebook_scope(notebook: str, rssd_dir: Path) -> str:
    # Memoized: path arithmetic costs a few percent of a replay.
    nb = Path(notebook)
    if nb.is_absolute():
        try:
            return nb.relative_to(rssd_dir).as_posix()
        except ValueError:
            pass
    return nb.as_posix()


@lru_cache(maxsize=512)
def _read_names(python: str) -> tuple[str, ...]:
    return tuple(read_names(python))


def _result_base(store: Store, key: CellKey, started: float, inputs: dict | None = None) -> dict:
    """The fields every recorded ``transition_result`` has (and ``inputs``
    when the key depends on them)."""
    base = {
        "format": RESULT_FORMAT,
        "host": store.host,
        "duration_s": round(time.perf_counter() - started, 6),
        "code_hash": key.code_hash,
    }
    if inputs:
        base["inputs"] = inputs
    return base


def _error(exc: BaseException, stb: list[str] | None) -> dict:
    text = _plain(stb) if stb else "".join(traceback.format_exception(exc))
    return {"ename": type(exc).__name__, "evalue": str(exc), "traceback": text}


def _for_display(exc: BaseException, stb: list[str] | None) -> BaseException:
    """The exception to re-raise so the outer cell fails (nbclient and
    papermill stop, as for any failing cell) and shows the body's traceback
    exactly once, through IPython's ``_render_traceback_`` hook."""
    if stb is None:
        return exc
    if not isinstance(exc, SyntaxError):
        try:
            exc._render_traceback_ = lambda: stb  # type: ignore[attr-defined]
            return exc
        except AttributeError:
            pass  # exceptions with __slots__
    # SyntaxErrors are formatted by the shell without the hook; stand in with
    # an exception of the same name that uses it.
    stand_in = type(type(exc).__name__, (Exception,), {"_render_traceback_": lambda self: stb})
    return stand_in(str(exc))


def _watch_for_duckdb(shell) -> None:
    """Once the notebook imports duckdb, show its lock conflicts as one line
    naming the process that holds the file (DuckDB allows one writer per
    file; its raw error is an IO Error dump).  Installed on first sight of
    the module, so loading the extension does not import duckdb, and only
    when the user has no custom exception handler of their own."""

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


def load(ipython) -> None:
    ipython.register_magics(StatefulMagics)
    _watch_for_duckdb(ipython)


def unload(ipython) -> None:
    magics = ipython.magics_manager.registry.get("StatefulMagics")
    if magics is not None:
        magics.close()
