"""One run of ``%%stateful``: from options and a cell to a replay or a
recorded run.  The engine's centre, free of IPython.

The path of a run, in order:

1. **key** — the cell's code (Python normalized, or SQL) scoped, plus the
   fingerprints of what it reads (deps) or, for SQL, its target and
   parameters;
2. **decide** on one indexed read (:func:`lifecycle.decide`): an EXECUTED
   record replays with no write at all — the hot path (replaying.py);
3. otherwise **acquire** the cell (acquire.py): claim it, wait for another
   kernel's run, or take over from a dead one;
4. **run** the body through the shell, recording what it shows (capture.py),
   then **record** the outcome as a compare-and-append.  Every path out of
   a claimed run ends it — EXECUTED, FAILED, INTERRUPTED, or (when even that
   can't be written) a claim that stops beating so others take over.

The path is one generator (:meth:`CellRunner._steps`) that yields the body
when it must run: :meth:`CellRunner.run` executes it, :meth:`CellRunner.run_async`
awaits it (a body with top-level ``await``, on the loop a kernel runs).
The shell is reached through a :class:`ShellPort` the adapter implements;
settings through a :class:`Config` (the adapter's traitlets).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Callable, Generator

from .. import sql
from .acquire import HolderFailed, WaitTimeout, acquire
from ..store.locations import ENV_DB, ENV_RSSD, redact, resolve_location
from ..backends import open_backend
from ..store.base import ClaimRequest, StoreError, Transition
from ..store import buckets
from ..store.journal import StateBackend
from .bindable import bindable
from .claims import Heartbeat, current_holder
from ..deps import collect_inputs, explain, inputs_digest, read_names
from ..deps.analysis import UNANALYSABLE, analyse_cell
from .keys import cell_key
from .lifecycle import EXECUTED, REFUSE, REPLAY, decide
from ..records.record import RecordError
from .recorder import Recorder, background_ok
from .replaying import Replayer
from .ports import CellOptions, Config, Executed, ShellPort
from .runs import Run, SQLCell, SQLCellError, StatefulRunError, for_display
from .ttl import age_s


class UsageProblem(Exception):
    """The user's options or setup are wrong; shown as one line (the adapter
    turns it into IPython's ``UsageError``).  The cell was not run."""


class CellRunner:
    """Runs ``%%stateful`` cells for one shell; owns its open stores and
    their heartbeats."""

    def __init__(self, port: ShellPort, config: Config):
        self.port = port
        self.config = config
        self._backends: dict[str, StateBackend] = {}
        self._resolved: dict[tuple, StateBackend] = {}
        self._beats: dict[int, Heartbeat] = {}
        self._said: set[tuple] = set()
        #: Stores in which a cell of this kernel failed: their session ends
        #: as failed (surveilr's success-rate pages count it).
        self._failed: set[int] = set()
        #: Runs whose end could not be written yet (runs.Run.end_unrecorded).
        self._unended: list[Run] = []
        self.replayer = Replayer(port, config)
        self.recorder = Recorder(port.say)

    # -- stores ------------------------------------------------------------------

    def backend(self, db: str | None = None, *, create: bool = True) -> StateBackend:
        """The open store for *db* (opened once per kernel and location);
        with *create* False a store that doesn't exist yet is an error."""
        # Resolving a path costs more than the replay's query: remember it
        # per everything it depends on.
        where = (db, self.config.rssd_path, os.environ.get(ENV_DB), os.environ.get(ENV_RSSD), os.getcwd())
        backend = self._resolved.get(where)
        if backend is not None:
            return backend
        location = resolve_location(db, self.config.rssd_path)
        backend = self._backends.get(location)
        if backend is None:
            backend = open_backend(  # StoreError: each caller says what was not done
                location,
                create=create,
                session_args=self.port.session_args(),
                busy_timeout_s=self.config.busy_timeout_seconds,
                allow_network_fs=self.config.allow_network_fs,
                notify=self.port.say,
            )
            self._backends[location] = backend
        self._resolved[where] = backend
        return backend

    def _heartbeat(self, backend: StateBackend) -> Heartbeat:
        beat = self._beats.get(id(backend))
        if beat is None:
            beat = self._beats[id(backend)] = Heartbeat(backend.renewer)
        return beat

    def _retry_ends(self) -> None:
        """Write the ends that could not be written before (a lock held too
        long, a disk that was full): a run must end, so others need not wait
        for its lease to lapse."""
        still = []
        for run in self._unended:
            try:
                run.retry_end()
            except Exception:  # noqa: BLE001 - still unwritable: try again later
                still.append(run)
        self._unended = still

    def settle(self, why: str = "") -> None:
        """Wait for the records being written in the background, and take
        in how they ended (notes said, failures kept, ends to retry)."""
        self.recorder.wait(why=why)
        self.report_finished_records()

    def report_finished_records(self) -> None:
        """Say how the records written in the background since last asked
        ended, keep the failures (the session ends failed) and the ends still
        to write (retried before the next cell)."""
        for run, notes in self.recorder.finished():
            for line in notes:
                self.port.note(line)
            if run.ended != EXECUTED:
                self._failed.add(id(run.backend))
            if run.pending is not None:
                self._unended.append(run)

    def close(self) -> None:
        """Stop heartbeats and close every store (sessions marked finished),
        once the records being written in the background have landed."""
        self.settle(" before this kernel closes its stores")
        self._retry_ends()
        for beat in self._beats.values():
            beat.stop()
        self._beats.clear()
        for backend in self._backends.values():
            backend.close(failed=id(backend) in self._failed)
        self._backends.clear()
        self._failed.clear()
        self._resolved.clear()
        self.replayer.clear()

    # -- one cell -------------------------------------------------------------------

    def run(self, opts: CellOptions, cell: str) -> Any:
        """Replay the cell's record, or run and record it.  Returns what the
        cell shows as its result (None when it was shown already)."""
        try:
            return _drive(self._steps(opts, cell), self.port.execute)
        except StoreError as exc:  # a read or a replay the store could not serve
            raise UsageProblem(f"%%stateful: {exc}. The cell was not run.") from None

    async def run_async(self, opts: CellOptions, cell: str) -> Any:
        """:meth:`run` for a body with top-level ``await``: the same steps,
        but the body runs through the port's ``execute_async``, awaited on
        the loop the shell already runs (a kernel's), never a nested one."""
        steps = self._steps(opts, cell)
        try:
            body = next(steps)
            while True:
                try:
                    executed = await self.port.execute_async(body)
                except BaseException as exc:  # noqa: BLE001 - cancelled, Ctrl-C: the run ends INTERRUPTED
                    body = steps.throw(exc)
                else:
                    body = steps.send(executed)
        except StopIteration as done:
            return done.value
        except StoreError as exc:
            raise UsageProblem(f"%%stateful: {exc}. The cell was not run.") from None

    def _steps(self, opts: CellOptions, cell: str) -> Generator[str, Executed, Any]:
        """The engine's path for one cell, as a generator: it yields the body
        when (and only when) the body must run, and is sent what running it
        gave; its return value is what the cell shows as its result.  One
        engine, two drivers: :meth:`run` executes the body synchronously,
        :meth:`run_async` awaits it.  A replay yields nothing."""
        self.report_finished_records()  # how records written in the background ended, said here
        if self._unended:
            self._retry_ends()
        python = None
        if not opts.sql:
            python = self.port.transform_cell(cell)
            if not _parses(python):
                # Shown as IPython shows any syntax error: no store is opened
                # or created, nothing recorded, no key computed.
                executed = yield cell
                if executed.error is not None:
                    raise for_display(executed.error, executed.traceback)
                return executed.result
        try:
            backend = self.backend(opts.db)
        except StoreError as exc:
            raise UsageProblem(f"%%stateful: {exc}. The cell was not run.") from None
        scope = self.scope(opts.scope)
        inputs: dict = {}
        sql_cell = None
        if opts.sql:
            sql_cell = self._sql_cell(cell, opts, backend)
            key = cell_key(sql.normalize_sql(cell), scope, opts.name, extra=sql_cell.extra)
        else:
            if opts.conn or opts.out:
                raise UsageProblem("%%stateful: --conn and --out go with --sql")
            if opts.name is None:
                inputs = self._inputs(python, opts, cell)
            key = cell_key(cell, scope, opts.name, inputs=inputs_digest(inputs), strict=opts.strict)
        quiet = opts.quiet or self.config.quiet
        # This cell's record from its last run in this kernel may still be
        # being written: what it is decides what happens now.
        self.recorder.wait(key.ingest_src, " (this cell's, from its run a moment ago)")
        # The hot path is this one indexed read, then a replay: no write.
        latest = backend.latest(key)
        state = latest.to_state if latest is not None else None
        rerun, note = self._rerun(latest, opts)
        decision = decide(state, rerun=rerun, replay_only=opts.replay_only)
        if decision.action == REFUSE:
            raise UsageProblem(
                f"%%stateful --replay-only: this cell has no executed result in {redact(backend.location)} "
                f"(state: {state or 'never run'}, key {key.digest[:12]}); it was not run"
            )
        if decision.action == REPLAY:
            return self.replayer.replay(backend, key, latest, quiet, _may_bind(opts, python))
        first_reason = "first run"
        if latest is None and key.inputs:
            earlier = backend.latest_variant(key)
            if earlier is not None:
                why = explain(_inputs_of(earlier), inputs) or "inputs changed"
                first_reason, note = why, f"running again: {why}"
        try:
            # Where its large values go, checked before the body runs.
            objects = buckets.configured(self.config.blob_store)
        except StoreError as exc:
            raise UsageProblem(f"%%stateful: StatefulMagics.blob_store: {exc}. The cell was not run.") from None
        if note:
            self.port.say(f"[stateful] {note}")
        status = _Status(self.port)
        request = ClaimRequest(
            key,
            cell,
            {"source": cell, "code_hash": key.code_hash},
            current_holder(backend.session_id or ""),
            self.config.lease_seconds,
            rerun_of=latest.state_id if rerun else None,
            rerun_reason=rerun or "",
            first_reason=first_reason,
        )
        try:
            outcome = acquire(
                backend,
                request,
                wait_s=self.config.wait_seconds if opts.wait_s is None else opts.wait_s,
                on_wait=status.waiting,
                wait_for_change=backend.wait_for_change,
            )
        except StoreError as exc:
            raise UsageProblem(f"%%stateful: {exc} (cannot record the run). The cell was not run.") from None
        except (WaitTimeout, HolderFailed) as exc:
            status.done(str(exc))
            raise StatefulRunError(str(exc)) from None
        except KeyboardInterrupt:
            status.done("stopped waiting (interrupted); the cell was not run here")
            raise
        if outcome.kind == "done":
            status.done("the other kernel finished; replaying its result")
            return self.replayer.replay(backend, key, outcome.previous, quiet, _may_bind(opts, python))
        if outcome.abandoned is not None:
            status.done("the other kernel died; running the cell here")
            self.port.say(f"[stateful] took over: the previous run was abandoned ({outcome.abandoned.reason})")
        beat = self._heartbeat(backend)
        beat.hold(outcome.running.state_id, outcome.claim.token, self.config.lease_seconds)
        run = Run(
            self.port, self.config, backend, key, outcome.running, outcome.claim.token, inputs,
            source=cell, options=opts.line, nature="sql-cell" if sql_cell is not None else "python-cell",
            objects=objects, objects_min=self.config.blob_min_bytes,
        )  # fmt: skip
        if background_ok(backend):
            # A large record is written while the notebook goes on; its claim
            # beats until it lands (released by the writing thread).
            run.later = lambda r, record, blobs: self.recorder.take(
                r, record, blobs, on_done=lambda done: beat.release(done.running.state_id)
            )
        try:
            if sql_cell is not None:
                return run.sql(sql_cell)
            return (yield from run.python(cell, python))
        finally:
            # On every path out, even when the end could not be recorded:
            # a claim that stops beating is taken over once its lease lapses.
            if not run.deferred:
                beat.release(outcome.running.state_id)
                if run.ended != EXECUTED:
                    self._failed.add(id(backend))
                if run.pending is not None:
                    self._unended.append(run)

    def scope(self, explicit: str | None) -> str:
        """--scope, else the default scope (``StatefulMagics.default_scope``):
        one scope for the whole RSSD, so a cell is keyed by its code and
        inputs alone and replays whichever client runs it (JupyterLab and
        VS Code tell the kernel the notebook's path, nbclient, papermill and
        a terminal don't) and after the notebook is renamed or moved."""
        return explicit or self.config.default_scope

    def _rerun(self, latest: Transition | None, opts: CellOptions) -> tuple[str | None, str | None]:
        """Why an EXECUTED result must run again (``--force``, a lapsed
        ``--ttl``), and the line to tell the user; (None, None) to replay."""
        if latest is None or latest.to_state != EXECUTED or opts.replay_only:
            return None, None
        if opts.force:
            return "forced (--force)", None
        if opts.ttl_s is not None:
            try:
                age = age_s(latest.transitioned_at, self.config.clock())
            except (TypeError, ValueError):
                why = f"stale: its time {latest.transitioned_at!r} can't be read, --ttl {opts.ttl_text}"
                return why, f"running again: result is {why}"
            if age > opts.ttl_s:
                why = f"stale: executed {latest.transitioned_at} UTC, {age:.0f}s ago, older than --ttl {opts.ttl_text}"
                return why, f"running again: result is {why}"
        return None, None

    # -- inputs ---------------------------------------------------------------------

    def _inputs(self, python: str, opts: CellOptions, cell: str) -> dict:
        """What the cell reads, fingerprinted; declared files, env, packages."""
        read = _read_names(python)
        if opts.ignore:
            read = tuple(n for n in read if n not in set(opts.ignore))
        if not (read or opts.deps_file or opts.deps_env or opts.deps_package):
            return {}  # reads nothing, declares nothing: the key is the code's
        inputs = collect_inputs(self.port.user_ns, list(read), opts.deps_file, opts.deps_env, opts.deps_package)
        blind = {n: e.get("reason") for n, e in inputs.get("names", {}).items() if e.get("digest") is None}
        self._say_once(
            (cell, "blind", tuple(sorted(blind))),
            "[stateful] left out of the key (can't be fingerprinted; --ignore NAME to silence): "
            + "; ".join(f"{n} ({why})" for n, why in blind.items()),
        )
        files = inputs.get("files", {})
        missing = [p for p, digest in files.items() if digest is None]
        unreadable = [p for p, digest in files.items() if isinstance(digest, str) and digest.startswith("error:")]
        self._say_once(
            (cell, "missing", tuple(missing)),
            "[stateful] --deps-file matches no file: " + ", ".join(missing)
            + f" (from {os.getcwd()}; its appearing will count as a change)",
        )  # fmt: skip
        self._say_once(
            (cell, "unreadable", tuple(unreadable)),
            "[stateful] --deps-file can't be read: "
            + ", ".join(f"{p} ({files[p][len('error:'):]})" for p in unreadable),
        )
        return inputs

    def _say_once(self, what: tuple, line: str) -> None:
        """Say *line* the first time *what* (a cell and a non-empty finding) is seen."""
        if what[-1] and what not in self._said:
            self._said.add(what)
            self.port.note(line)

    # -- SQL cells ------------------------------------------------------------------

    def _sql_cell(self, body: str, opts: CellOptions, backend: StateBackend) -> SQLCell:
        """Resolve the target and parameters of a --sql cell (nothing runs)."""
        try:
            import pandas  # noqa: F401 - result tables are DataFrames (a dependency; checked for broken installs)
        except ImportError as exc:
            raise UsageProblem(f"%%stateful --sql needs pandas ({exc}): pip install pandas") from None
        ns = self.port.user_ns
        if opts.conn:
            if opts.conn not in ns:
                raise UsageProblem(f"%%stateful --conn {opts.conn}: no such name in the notebook")
            conn = ns[opts.conn]
        else:
            conn = backend.sql_connection()
        try:
            _, params = sql.bind(body, ns)
            extra = sql.key_extra(body, conn, params)
        except sql.SQLUsageError as exc:
            option = f" --conn {opts.conn}" if opts.conn else ""
            raise UsageProblem(f"%%stateful --sql{option}: {exc}. The cell was not run.") from None
        return SQLCell(body, conn, params, extra, opts.out)


class _Status:
    """One live status line while waiting for another kernel.

    In a Jupyter kernel it is a display updated in place (display_id); in a
    terminal it is written once, since a terminal can't update a display and
    a line per poll would flood it.
    """

    def __init__(self, port: ShellPort):
        self.port = port
        self.display_id: str | None = None
        self._last = -1.0

    def _show(self, text: str, update: bool) -> None:
        self.port.publish({"text/plain": f"[stateful] {text}"}, {"rssd_magic": {"status": True}}, self.display_id, update)

    def waiting(self, holder, waited: float) -> None:
        if waited - self._last < 1.0:
            return  # refresh once a second, not once a poll
        self._last = waited
        text = f"waiting {waited:.0f}s for {holder.describe()} to finish this cell"
        if self.display_id is None:
            self.display_id = os.urandom(8).hex()
            if self.port.live:
                self._show(text, update=False)
            else:
                self.port.say(f"[stateful] {text}")
        elif self.port.live:
            self._show(text, update=True)

    def done(self, text: str) -> None:
        if self.display_id is not None and self.port.live:
            self._show(text, update=True)


def _drive(steps: Generator[str, Executed, Any], execute: Callable[[str], Executed]) -> Any:
    """Run :meth:`CellRunner._steps` synchronously: the body with *execute*."""
    try:
        body = next(steps)
        while True:
            try:
                executed = execute(body)
            except BaseException as exc:  # noqa: BLE001 - Ctrl-C outside the body: the run ends INTERRUPTED
                body = steps.throw(exc)
            else:
                body = steps.send(executed)
    except StopIteration as done:
        return done.value


def _may_bind(opts: CellOptions, python: str | None) -> Callable[[frozenset[str]], frozenset[str]]:
    """The names a replay of this cell may bind, given the names its record
    says it changed in place (bindable.py)."""
    if opts.sql:
        return lambda changed: bindable(out=opts.out)
    return lambda changed: bindable(python, changed=changed)


@lru_cache(maxsize=512)
def _read_names(python: str) -> tuple[str, ...]:
    return tuple(read_names(python))


def _parses(python: str) -> bool:
    """True when *python* is valid Python (top-level ``await`` allowed):
    the parse the cell's analysis makes anyway (memoized there), not one of
    its own — for a 45-line cell a parse is 0.4 ms of its first run."""
    return analyse_cell(python) is not UNANALYSABLE


def _inputs_of(transition: Transition) -> dict | None:
    try:
        return transition.record().inputs
    except RecordError:
        return None


__all__ = [
    "CellOptions",
    "CellRunner",
    "Config",
    "Executed",
    "SQLCellError",
    "ShellPort",
    "StatefulRunError",
    "UsageProblem",
]
