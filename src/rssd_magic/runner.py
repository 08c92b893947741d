"""One run of ``%%stateful``: from options and a cell to a replay or a
recorded run.  The engine's centre, free of IPython.

The path of a run, in order:

1. **key** — the cell's code (Python normalized, or SQL) scoped, plus the
   fingerprints of what it reads (deps) or, for SQL, its target and
   parameters;
2. **decide** on one indexed read (:func:`lifecycle.decide`): an EXECUTED
   record replays with no write at all — the hot path;
3. otherwise **acquire** the cell (acquire.py): claim it, wait for another
   kernel's run, or take over from a dead one;
4. **run** the body through the shell, recording what it shows (capture.py),
   then **record** the outcome as a compare-and-append.  Every path out of
   a claimed run ends it — EXECUTED, FAILED, INTERRUPTED, or (when even that
   can't be written) a claim that stops beating so others take over.

The shell is reached through a :class:`ShellPort` the adapter implements;
settings through a :class:`Config` (the adapter's traitlets).
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Protocol

from . import sql
from .acquire import HolderFailed, WaitTimeout, acquire
from .backends import ENV_DB, ENV_RSSD, open_backend, redact, resolve_location
from .backends.base import ClaimRequest, Fenced, StateBackend, StoreError, Transition
from .capture import OutputRecorder, capture, replay
from .claims import Heartbeat, current_holder
from .deps import collect_inputs, explain, inputs_digest, read_names
from .keys import CellKey, cell_key
from .lifecycle import EXECUTED, FAILED, INTERRUPTED, REFUSE, REPLAY, decide
from .names import names_bound, snapshot
from .record import RESULT_VALUE, RecordError, RunRecord
from .serialize import UNTRUSTED, dump_names, dump_value, load_names, load_value
from .trust import Signer, sign_specs, trusted_names
from .ttl import age_s


class UsageProblem(Exception):
    """The user's options or setup are wrong; shown as one line (the adapter
    turns it into IPython's ``UsageError``).  The cell was not run."""


class StatefulRunError(Exception):
    """A cell that could not be run or replayed for a reason outside the
    user's code (waited too long, the holder failed, an unreadable record).
    Shown as one line, without a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class SQLCellError(StatefulRunError):
    """A statement of a --sql cell failed: the database's own message."""


@dataclass(frozen=True)
class CellOptions:
    """The options of one ``%%stateful`` line (see the magic's help)."""

    db: str | None = None
    name: str | None = None
    scope: str | None = None
    force: bool = False
    quiet: bool = False
    wait_s: float | None = None
    ttl_s: float | None = None
    ttl_text: str = ""
    replay_only: bool = False
    strict: bool = False
    ignore: tuple[str, ...] = ()
    deps_file: tuple[str, ...] = ()
    deps_env: tuple[str, ...] = ()
    deps_package: tuple[str, ...] = ()
    sql: bool = False
    conn: str | None = None
    out: str | None = None


@dataclass
class Executed:
    """What running the body gave: its result, or the error and the
    traceback lines the shell formatted for it."""

    result: Any = None
    error: BaseException | None = None
    traceback: list[str] | None = None


class ShellPort(Protocol):
    """What the runner needs from the shell (the adapter implements it)."""

    shell: Any  # duck-typed by capture.py: display_pub, displayhook
    user_ns: dict
    live: bool  # True when displays can be updated in place (a Jupyter kernel)

    def transform_cell(self, cell: str) -> str: ...
    def execute(self, cell: str) -> Executed: ...
    def publish(self, data: dict, metadata: dict, display_id: str | None = None, update: bool = False) -> None: ...
    def show_result(self, value: Any, data: dict, metadata: dict) -> None: ...
    def note(self, text: str) -> None: ...
    def notebook(self) -> str | None: ...
    def session_args(self) -> dict: ...


class Config(Protocol):
    """Settings read on every run (the adapter's traitlets)."""

    rssd_path: str | None
    default_scope: str
    quiet: bool
    wait_seconds: float | None
    lease_seconds: float
    max_output_size: int | None
    busy_timeout_seconds: float
    allow_network_fs: bool
    clock: Callable[[], float]
    signer: Signer


@dataclass
class _SQLCell:
    body: str
    conn: Any
    params: dict
    extra: str
    out: str | None


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

    # -- stores ------------------------------------------------------------------

    def backend(self, db: str | None = None) -> StateBackend:
        """The open store for *db* (opened once per kernel and location)."""
        # Resolving a path costs more than the replay's query: remember it
        # per everything it depends on.
        where = (db, self.config.rssd_path, os.environ.get(ENV_DB), os.environ.get(ENV_RSSD), os.getcwd())
        backend = self._resolved.get(where)
        if backend is not None:
            return backend
        location = resolve_location(db, self.config.rssd_path)
        backend = self._backends.get(location)
        if backend is None:
            try:
                backend = open_backend(
                    location,
                    session_args=self.port.session_args(),
                    busy_timeout_s=self.config.busy_timeout_seconds,
                    allow_network_fs=self.config.allow_network_fs,
                )
            except StoreError as exc:
                raise UsageProblem(f"%%stateful: {exc}. The cell was not run.") from None
            self._backends[location] = backend
            if getattr(backend, "notice", None):
                self.port.note(f"[stateful] {backend.notice}")
        self._resolved[where] = backend
        return backend

    def _heartbeat(self, backend: StateBackend) -> Heartbeat:
        beat = self._beats.get(id(backend))
        if beat is None:
            beat = self._beats[id(backend)] = Heartbeat(backend.renewer)
        return beat

    def close(self) -> None:
        """Stop heartbeats and close every store (sessions marked finished)."""
        for beat in self._beats.values():
            beat.stop()
        self._beats.clear()
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()
        self._resolved.clear()

    # -- one cell -------------------------------------------------------------------

    def run(self, opts: CellOptions, cell: str) -> Any:
        """Replay the cell's record, or run and record it.  Returns what the
        cell shows as its result (None when it was shown already)."""
        backend = self.backend(opts.db)
        scope = self.scope(opts.scope, backend)
        inputs: dict = {}
        sql_cell = python = None
        if opts.sql:
            sql_cell = self._sql_cell(cell, opts, backend)
            key = cell_key(sql.normalize_sql(cell), scope, opts.name, extra=sql_cell.extra)
        else:
            if opts.conn or opts.out:
                raise UsageProblem("%%stateful: --conn and --out go with --sql")
            python = self.port.transform_cell(cell)
            if opts.name is None:
                inputs = self._inputs(python, opts, cell)
            key = cell_key(cell, scope, opts.name, inputs=inputs_digest(inputs), strict=opts.strict)
        quiet = opts.quiet or self.config.quiet
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
            return self._replay(backend, key, latest, quiet)
        first_reason = "first run"
        if latest is None and key.inputs:
            earlier = backend.latest_variant(key)
            if earlier is not None:
                why = explain(_inputs_of(earlier), inputs) or "inputs changed"
                first_reason, note = f"inputs changed: {why}", f"running again: {why}"
        if note:
            self.port.note(f"[stateful] {note}")
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
            return self._replay(backend, key, outcome.previous, quiet)
        if outcome.abandoned is not None:
            status.done("the other kernel died; running the cell here")
            self.port.note(f"[stateful] took over: the previous run was abandoned ({outcome.abandoned.reason})")
        beat = self._heartbeat(backend)
        beat.hold(outcome.running.state_id, outcome.claim.token, self.config.lease_seconds)
        run = _Run(self, backend, key, outcome.running, outcome.claim.token, inputs)
        try:
            if sql_cell is not None:
                return run.sql(sql_cell)
            return run.python(cell, python)
        finally:
            # On every path out, even when the end could not be recorded:
            # a claim that stops beating is taken over once its lease lapses.
            beat.release(outcome.running.state_id)

    def scope(self, explicit: str | None, backend: StateBackend) -> str:
        """--scope, else the notebook's path (relative to the RSSD when it
        lies below it, so teammates' checkouts agree), else the default."""
        if explicit:
            return explicit
        notebook = self.port.notebook()
        if not notebook:
            return self.config.default_scope
        path = getattr(backend, "path", None)
        return _notebook_scope(notebook, path.parent if path is not None else None)

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
        ignore = set(opts.ignore)
        read = [n for n in _read_names(python) if n not in ignore]
        inputs = collect_inputs(self.port.user_ns, read, opts.deps_file, opts.deps_env, opts.deps_package)
        blind = {n: e.get("reason") for n, e in inputs.get("names", {}).items() if e.get("digest") is None}
        said = (cell, tuple(sorted(blind)))
        if blind and said not in self._said:
            self._said.add(said)
            self.port.note(
                "[stateful] left out of the key (can't be fingerprinted; --ignore NAME to silence): "
                + "; ".join(f"{n} ({why})" for n, why in blind.items())
            )
        return inputs

    # -- SQL cells ------------------------------------------------------------------

    def _sql_cell(self, body: str, opts: CellOptions, backend: StateBackend) -> _SQLCell:
        """Resolve the target and parameters of a --sql cell (nothing runs)."""
        try:
            import pandas  # noqa: F401 - result tables are DataFrames
            import pyarrow  # noqa: F401 - and large ones are stored as Parquet
        except ImportError as exc:
            raise UsageProblem(
                f"%%stateful --sql needs pandas and pyarrow ({exc}): pip install 'rssd_magic[sql]'"
            ) from None
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
        return _SQLCell(body, conn, params, extra, opts.out)

    # -- replay ---------------------------------------------------------------------

    def _replay(self, backend: StateBackend, key: CellKey, done: Transition, quiet: bool) -> Any:
        port, ns = self.port, self.port.user_ns
        backend.note_hit(done.state_id)
        try:
            record = done.record()
        except RecordError as exc:
            raise StatefulRunError(
                f"the recorded result of cell {key.digest[:12]} in {redact(backend.location)} is unreadable "
                f"({exc}); nothing was replayed and the cell was not run (--force runs it and records it again)"
            ) from None
        trusted = trusted_names(self.config.signer, record.payloads_to_sign(), backend.signatures)
        _, missing = load_names(record.names, backend.blobs.get, ns, trusted.__contains__)
        if not quiet:
            duration = record.duration_s or 0.0
            self._banner(f"replayed {key.digest[:12]}: executed {done.transitioned_at} UTC "
                         f"on {record.host or '?'} in {duration:.3g}s")  # fmt: skip
        if key.kind == "name" and record.code_hash not in (None, key.code_hash):
            port.note(
                f"[stateful] the code of --name {key.name} changed since it ran; "
                "replaying the recorded run (use --force to run the new code)"
            )
        if missing:
            port.note("[stateful] not restored: " + "; ".join(f"{name} {why}" for name, why in missing.items()))
            if UNTRUSTED in missing.values():
                where = redact(backend.location)
                port.note(
                    f"[stateful] values signed by another key are never unpickled; if you trust "
                    f"{where}, run %stateful trust (or: rssd-magic --db {where} trust)"
                )
        replayed, skipped = replay(record.outputs, port.shell)
        if skipped:
            port.note(f"[stateful] {skipped} recorded output(s) of {redact(backend.location)} were malformed and not shown")
        if replayed is not None and record.result_value is not None:
            try:
                value = load_value(record.result_value, backend.blobs.get, ns, RESULT_VALUE in trusted)
            except Exception:  # noqa: BLE001 - the stand-in still shows the recorded bundle
                return replayed
            port.show_result(value, replayed.data, replayed.metadata)
            return None
        return replayed

    def _banner(self, text: str) -> None:
        """The replay banner: a display of its own (never merged into the
        cell's stderr), tagged in metadata so tools can tell it apart."""
        import html

        self.port.publish(
            {
                "text/plain": f"[stateful] {text}",
                "text/html": f'<small style="opacity:.6">&#8635; stateful: {html.escape(text)}</small>',
            },
            {"rssd_magic": {"banner": True}},
        )


@dataclass
class _Run:
    """One claimed run: executes the body and records how it ended."""

    runner: CellRunner
    backend: StateBackend
    key: CellKey
    running: Transition
    token: int
    inputs: dict
    started: float = field(default_factory=time.perf_counter)

    def record(self, **fields: Any) -> RunRecord:
        """A record with what every run has (and ``inputs`` when the key
        depends on them)."""
        return RunRecord(
            host=self.backend.host,
            duration_s=round(time.perf_counter() - self.started, 6),
            code_hash=self.key.code_hash,
            inputs=self.inputs or None,
            **fields,
        )

    def python(self, cell: str, python: str) -> None:
        port = self.runner.port
        ns = port.user_ns
        before = snapshot(ns)
        try:
            with capture(port.shell, self.runner.config.max_output_size) as rec:
                executed = port.execute(cell)
        except BaseException as exc:  # interrupted outside the body itself
            self.end(INTERRUPTED, self.record(error=_error(exc, None)), "interrupted")
            raise
        if executed.error is not None:
            err = _error(executed.error, executed.traceback)
            shown = {"output_type": "error", "ename": err["ename"], "evalue": err["evalue"],
                     "traceback": executed.traceback or []}  # fmt: skip
            record = self.record(outputs=rec.finish() + [shown], error=err)
            to_state = INTERRUPTED if isinstance(executed.error, KeyboardInterrupt) else FAILED
            self.end(to_state, record, record.error_line()[:500])
            raise _for_display(executed.error, executed.traceback)
        self.executed(rec, lambda: self._python_payload(ns, before, python, rec, executed))
        return None

    def _python_payload(self, ns: dict, before: dict, python: str, rec: OutputRecorder, executed: Executed):
        names = names_bound(ns, before, python)
        specs, blobs = dump_names(ns, names)
        record = self.record(outputs=rec.finish(), names=specs)
        if any(o["output_type"] == "execute_result" for o in record.outputs):
            # Kept so a replay binds _ / Out[n] to the value, not a stand-in.
            record.result_value, value_blobs = dump_value(executed.result)
            blobs += value_blobs
        bad = {n: s["error"] for n, s in specs.items() if s["kind"] == "unserializable"}
        if bad:
            self.runner.port.note(
                "[stateful] executed, but these names can't be saved and won't be restored on replay: "
                + "; ".join(f"{n} ({why})" for n, why in bad.items())
            )
        return record, blobs

    def sql(self, cell: _SQLCell) -> None:
        port = self.runner.port
        try:
            res = sql.run_sql(cell.conn, cell.body, cell.params)
        except sql.SQLExecutionError as exc:
            err = {"ename": exc.error_type or "SQLError", "evalue": str(exc), "traceback": str(exc), "sql": exc.as_dict()}
            self.end(FAILED, self.record(error=err), str(exc).splitlines()[0][:500])
            raise SQLCellError(str(exc)) from None
        except KeyboardInterrupt as exc:
            self.end(INTERRUPTED, self.record(error=_error(exc, None)), "interrupted")
            raise

        def payload():
            record = self.record(sql=res.as_dict())
            blobs: list = []
            if res.frame is None:
                summary = f"{res.summary()}\n"
                print(summary, end="")
                record.outputs.append({"output_type": "stream", "name": "stdout", "text": summary})
            else:
                spec, blobs = sql.dump_frame(res.frame)
                data, metadata = sql.frame_bundle(res.frame)
                record.result_value = spec
                if cell.out:
                    record.names[cell.out] = spec
                    port.user_ns[cell.out] = res.frame
                port.show_result(res.frame, data, metadata)
                count = getattr(port.shell, "execution_count", None)
                record.outputs.append(
                    {"output_type": "execute_result", "execution_count": count, "data": data, "metadata": metadata}
                )
            return record, blobs

        self.executed(None, payload)
        return None

    def executed(self, rec: OutputRecorder | None, payload: Callable[[], tuple[RunRecord, list]]) -> None:
        """Serialize what a successful run left and record it EXECUTED.  A
        failure while serializing ends the run too (FAILED, or INTERRUPTED on
        Ctrl-C): the cell ran, so its output stays, and it runs again next
        time rather than leaving a claim behind."""
        try:
            record, blobs = payload()
            signatures = sign_specs(self.runner.config.signer, record.payloads_to_sign())
        except KeyboardInterrupt as exc:
            self.end(INTERRUPTED, self.record(error=_error(exc, None)), "interrupted while recording")
            raise
        except Exception as exc:  # noqa: BLE001 - anything a value's pickling may raise
            self.end_unrecorded(exc)
            return
        self.end(EXECUTED, record, "completed", blobs, signatures)

    def end(self, to_state: str, record: RunRecord, reason: str, blobs=(), signatures=()) -> bool:
        """Record how the run ended: a compare-and-append.  False when it was
        not recorded (taken over, or the store refused it)."""
        try:
            self.backend.finish(self.running, self.token, to_state, record.dumps(), reason, blobs, signatures)
            return True
        except Fenced as exc:
            self.runner.port.note(f"[stateful] this run was taken over by {exc.by}; its result was not recorded")
            return False
        except BaseException as exc:  # noqa: BLE001 - the record failed, whatever the cause
            self.end_unrecorded(exc)
            return False

    def end_unrecorded(self, exc: BaseException) -> None:
        """The run's record could not be written (a value SQLite can't hold,
        a full disk, a lock held too long, Ctrl-C while writing): end it with
        a small record saying so, so no kernel waits for this one.  If even
        that fails, the claim simply stops beating (the caller releases it)."""
        interrupted = isinstance(exc, KeyboardInterrupt)
        why = "interrupted while recording" if interrupted else f"could not record: {_one_line(exc)}"
        small = self.record(error={"ename": type(exc).__name__, "evalue": _one_line(exc), "traceback": ""})
        again: BaseException | None = None
        try:
            self.backend.finish(self.running, self.token, INTERRUPTED if interrupted else FAILED, small.dumps(), why[:500])
        except Fenced:
            pass
        except BaseException as second:  # noqa: BLE001 - nothing more can be written
            again = second if isinstance(second, KeyboardInterrupt) else None
        self.runner.port.note(
            f"[stateful] {redact(self.backend.location)}: the run could not be recorded ({_one_line(exc)}); "
            "it will run again next time"
        )
        if interrupted:
            raise exc
        if again is not None:
            raise again


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
                self.port.note(f"[stateful] {text}")
        elif self.port.live:
            self._show(text, update=True)

    def done(self, text: str) -> None:
        if self.display_id is not None and self.port.live:
            self._show(text, update=True)


@lru_cache(maxsize=64)
def _notebook_scope(notebook: str, rssd_dir: Path | None) -> str:
    # Memoized: path arithmetic costs a few percent of a replay.
    nb = Path(notebook)
    if nb.is_absolute() and rssd_dir is not None:
        try:
            return nb.relative_to(rssd_dir).as_posix()
        except ValueError:
            pass
    return nb.as_posix()


@lru_cache(maxsize=512)
def _read_names(python: str) -> tuple[str, ...]:
    return tuple(read_names(python))


def _inputs_of(transition: Transition) -> dict | None:
    try:
        return transition.record().inputs
    except RecordError:
        return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def _error(exc: BaseException, stb: list[str] | None) -> dict:
    import re

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", "\n".join(stb)) if stb else "".join(traceback.format_exception(exc))
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
