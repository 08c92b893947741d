"""The IPython adapter: ``%%stateful`` and its settings.

What happens to a cell is decided by the engine (runner.py and what it
uses); this module parses options, implements the small shell port the
runner talks through (running a body as a cell of its own is body.py's;
showing a result through the display hook, notes, the notebook's name are
here), and turns engine errors into ``UsageError``: IPython prints exactly
``UsageError`` without a traceback, its subclasses get one.  ``%stateful``
commands are commands.py's, the shell hooks hooks.py's.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Float, Int, Unicode, observe

from .. import __version__
from ..store.locations import DEFAULT_RSSD, ENV_RSSD, redact_text
from ..store.buckets import DEFAULT_MIN_BYTES
from . import transform
from .body import BodyRunner, route_awaiting_cells, unroute
from ..engine.claims import DEFAULT_LEASE_S
from .commands import CommandError, parse, run_line, split
from .hooks import close_on_sigterm, report_records_before_each_cell, watch_for_duckdb
from ..engine.runner import CellOptions, CellRunner, Executed, SQLCellError, StatefulRunError, UsageProblem
from ..records.keyfiles import KeyProblem
from ..records.keyring import Keyring
from ..records.signers import ENV_SIGNERS
from ..records.trust import ENV_SECRET
from ..engine.ttl import parse_duration

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
        help="A team's shared secret (default: $RSSD_MAGIC_SECRET): records signed with it act too, and new "
        "records are signed with it besides your own key. Without it, records act only when your key or a "
        "trusted signer's signed them.",
    ).tag(config=True)
    trusted_signers = Unicode(
        None,
        allow_none=True,
        help="File of trusted signers, one 'NAME ssh-ed25519 KEY' line each (OpenSSH allowed-signers form): "
        f"their records act here. Default: ${ENV_SIGNERS}, else allowed_signers in the Jupyter data directory.",
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

    blob_store = Unicode(
        None,
        allow_none=True,
        help="Where large values go: s3://bucket/prefix (default: $RSSD_MAGIC_BLOBS). Blobs of at least "
        "blob_min_bytes are written there under their content digest; the RSSD or PostgreSQL store keeps the "
        "records, which name the bucket. Endpoint, region and credentials: the standard AWS settings.",
    ).tag(config=True)
    blob_min_bytes = Int(
        DEFAULT_MIN_BYTES, help="Blobs at least this large go to blob_store (when it is set)."
    ).tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.runner = CellRunner(port=self, config=self)
        self._bodies = BodyRunner(self.shell)
        self._options: dict[str, CellOptions] = {}
        self._signer: Keyring | None = None
        self._signer_source: tuple | None = None
        self.clock = time.time  # what --ttl compares against; tests set their own
        atexit.register(self.close)

    # -- settings the runner reads ------------------------------------------------

    @property
    def signer(self) -> Keyring:
        """The keys that sign what this kernel stores and judge what it
        replays (keyring.py): loaded again when a setting or variable that
        chooses them changes; KeyProblem when one can't be used."""
        # The settings are watched (_keys_changed); the environment is read
        # on every call: a kernel's os.environ can change under it.
        env = os.environ
        source = (env.get(ENV_SECRET), env.get(ENV_SIGNERS), env.get("JUPYTER_DATA_DIR"))
        if self._signer is None or self._signer_source != source:
            self._signer = None
            self._signer = Keyring.load(self.secret, self.trusted_signers)
            self._signer_source = source
        return self._signer

    @observe("secret", "trusted_signers")
    def _keys_changed(self, change) -> None:
        self._signer = None  # loaded again, with the new setting, on next use

    def close(self) -> None:
        """Close every store this kernel opened, marking its sessions finished
        (and forget the keys: they are read again on next use)."""
        self.runner.close()
        self._signer = None

    # -- the shell port (runner.ShellPort) --------------------------------------------

    @property
    def user_ns(self) -> dict:
        return self.shell.user_ns

    @property
    def live(self) -> bool:
        return hasattr(self.shell, "kernel")  # a Jupyter kernel can update a display

    def transform_cell(self, cell: str) -> str:
        """The cell as Python (IPython syntax transformed), memoized (body.py)."""
        return self._bodies.transform_cell(cell)

    def execute(self, cell: str) -> Executed:
        """Run the body as a cell of its own, numbered as the notebook cell
        the user ran (body.py)."""
        return self._bodies.execute(cell)

    async def execute_async(self, cell: str) -> Executed:
        """:meth:`execute` for a body with top-level ``await`` (body.py)."""
        return await self._bodies.execute_async(cell)

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

    def say(self, text: str, tag: str | None = None) -> None:
        """One line that informs (why a cell runs again, what else was
        recorded, a store replaced): on stdout, which notebooks show as plain
        text; flushed at once, so it shows where it was said.  A *tag*ged
        line (a store created) is a display of its own, marked
        ``{"rssd_magic": {"note": tag}}`` in its metadata, so tools can tell
        it from the cell's own output."""
        if tag is None:
            print(text, flush=True)
        else:
            sys.stdout.flush()
            self.publish({"text/plain": text}, {"rssd_magic": {"note": tag}})

    def note(self, text: str) -> None:
        """One line the user may have to act on (a value not restored, a run
        not recorded, an untrusted record): on stderr, flushed at once."""
        print(text, file=sys.stderr, flush=True)

    def notebook(self) -> str | None:
        ns = self.shell.user_ns
        return ns.get("__vsc_ipynb_file__") or ns.get("__session__") or os.environ.get("JPY_SESSION_NAME")

    def session_args(self) -> dict:
        import IPython

        return {
            "notebook": self.notebook(),
            "kernel": {"pid": os.getpid(), "cwd": os.getcwd(), "argv": [redact_text(a) for a in sys.argv]},
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
    @no_var_expand  # expanded here, only when the line asks for it (transform.expanded)
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
        opts = self._parsed(transform.expanded(self.shell, line))
        try:
            self.signer  # a key that can't be used: one line, before the cell runs
            return self.runner.run(opts, cell)
        except (UsageProblem, KeyProblem) as exc:
            raise UsageError(str(exc)) from None

    async def stateful_async(self, line: str, cell: str) -> Any:
        """``%%stateful`` for a body with top-level ``await``.

        A kernel runs cells on an event loop that is already running, where
        a nested ``run_cell`` can't wait for an awaiting body.  So the input
        transformer (:func:`body.route_awaiting_cells`) turns such a cell into
        ``await <this>(line, body)``: IPython sees an awaiting cell and runs
        it as a coroutine on its loop, and the body is awaited with
        ``run_cell_async``.  Everything else is :meth:`stateful`'s."""
        opts = self._parsed(transform.expanded(self.shell, line))
        try:
            self.signer
            return await self.runner.run_async(opts, cell)
        except (UsageProblem, KeyProblem) as exc:
            raise UsageError(str(exc)) from None

    def _parsed(self, line: str) -> CellOptions:
        opts = self._options.get(line)
        if opts is None:  # argparse is slow; a notebook repeats few option lines
            if len(self._options) > 256:
                self._options.clear()
            try:
                args = parse(self.stateful.parser, "%%stateful", split("%%stateful", line))
            except CommandError as exc:
                raise UsageError(exc.format_message()) from None
            opts = self._options[line] = _cell_options(args, line.strip())
        return opts

    # -- %stateful list|show|forget|stats|gc|trust --------------------------------------

    @line_magic("stateful")
    def stateful_line(self, line: str) -> Any:
        """Inspect and manage the recorded state of %%stateful cells: the
        commands of ``rssd-magic`` (commands.py), with the same options.

        %stateful list [--limit N|--all]   the newest cells: key, name, scope, state, source, when, where, hits
        %stateful show KEY           source, every transition, what a replay shows
        %stateful forget KEY|--all   run again next time (EXECUTED -> FORGOTTEN)
        %stateful stats              cells, hits, time saved, storage
        %stateful gc [--dry-run] [--grace D]  delete blobs no current result refers to
        %stateful verify [--repair]  check the bytes of every blob current records name
        %stateful trust [KEY] [--signer NAME|FINGERPRINT] [--yes]
                                     show what records would do, then sign them with your key
        %stateful keys|export|import ...   as rssd-magic's; --json where it has it

        KEY is any unique prefix of a cell key, or a --name. Every command
        takes --db PATH|URL (default: as for %%stateful); it never creates a store.
        """
        try:
            return run_line(self, line)
        except CommandError as exc:
            raise UsageError(exc.format_message()) from None


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


def load(ipython) -> None:
    ipython.register_magics(StatefulMagics)
    unroute(ipython)  # loaded again: one transformer, not two
    ipython.input_transformers_cleanup.append(route_awaiting_cells(ipython))
    transform.install(ipython)
    watch_for_duckdb(ipython)
    close_on_sigterm(ipython.magics_manager.registry["StatefulMagics"])
    report_records_before_each_cell(ipython)


def unload(ipython) -> None:
    unroute(ipython)
    transform.uninstall(ipython)
    magics = ipython.magics_manager.registry.get("StatefulMagics")
    if magics is not None:
        magics.close()
        atexit.unregister(magics.close)  # a reload registers its new instance
