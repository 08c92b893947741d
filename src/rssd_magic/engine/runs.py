"""One claimed run of a cell: execute the body, serialize what it left, and
record how it ended — on every path out.

The claim was won (acquire.py); from here on the run must end with exactly
one of EXECUTED, FAILED or INTERRUPTED, written as a compare-and-append
(``StateBackend.finish``).  What can go wrong after the body ran is treated
as carefully as the body itself:

* a value that can't be serialized is named and left out (the run counts);
* a record the store can't take (SQLite's 1 GB blob limit, a full disk, a
  lock held past the busy timeout, Ctrl-C while writing) ends the run with a
  small FAILED or INTERRUPTED record saying ``could not record: …``;
* a run that was taken over meanwhile (its holder stalled past the lease)
  records nothing and says so in one line; its output stays on screen.

The caller releases the heartbeat in a ``finally``: if even the small record
can't be written, the claim stops beating and other kernels take it over
once the lease lapses, instead of waiting as long as this kernel lives.
"""

from __future__ import annotations

import asyncio
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

from ..records import outputs
from .. import sql
from ..store.locations import redact, redact_text
from ..store import buckets
from ..store.base import ExecRow, Fenced, Transition
from ..store.journal import StateBackend
from ..output.capture import OutputRecorder, capture
from .keys import CellKey
from .lifecycle import EXECUTED, FAILED, INTERRUPTED
from ..deps import analyse_cell, changes, is_shell_name, names_bound, snapshot
from ..records.outputs import Output
from .ports import Config, Executed, ShellPort
from ..records.record import RunRecord
from ..records.serialize import dump_names, dump_value, resolve_pending

@dataclass
class SQLCell:
    """A --sql cell ready to run: its target connection and bound parameters."""

    body: str
    conn: Any
    params: dict
    extra: str
    out: str | None


class StatefulRunError(Exception):
    """A cell that could not be run or replayed for a reason outside the
    user's code (waited too long, the holder failed, an unreadable record).
    Shown as one line, without a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class SQLCellError(StatefulRunError):
    """A statement of a --sql cell failed: the database's own message."""


@dataclass
class Run:
    """One claimed run: executes the body and records how it ended."""

    port: ShellPort
    config: Config
    backend: StateBackend
    key: CellKey
    running: Transition
    token: int
    inputs: dict
    source: str = ""
    options: str = ""
    nature: str = "python-cell"
    #: The bucket its large blobs go to (store/buckets.py), and from what size.
    objects: str | None = None
    objects_min: int = buckets.DEFAULT_MIN_BYTES
    started: float = field(default_factory=time.perf_counter)
    #: The state the run ended in (None while running or when unrecorded).
    ended: str | None = None
    #: A small end that could not be written yet: (state, record, reason, exec row).
    pending: tuple | None = None
    #: Hands a finished run's record to the background (recorder.py): called
    #: with (run, record, blobs, signatures); True when it took it.
    later: Callable[..., bool] | None = None
    #: True once the record is being written in the background.
    deferred: bool = False
    #: Where notes go while another thread ends the run (said later by the
    #: kernel); None: said at once.
    notes: list | None = None

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

    def python(self, cell: str, python: str) -> Generator[str, Executed, None]:
        """Run the body: yields *cell* to the driver (runner.py), which
        executes it, synchronously or awaited, and sends back what that gave."""
        port = self.port
        ns = port.user_ns
        before = snapshot(ns, python)
        try:
            # What the cell reads, as it was: the key's fingerprints, plus those
            # the key left out (--ignore, --name); compared after the run.
            taken = changes.before(ns, analyse_cell(python).inputs(ns), (self.inputs or {}).get("names"))
            with capture(port.shell, self.config.max_output_size) as rec:
                executed = yield cell
        except BaseException as exc:  # interrupted outside the body itself
            self.end(INTERRUPTED, self.record(error=_error(exc, None)), "interrupted")
            raise
        if executed.error is not None:
            err = _error(executed.error, executed.traceback)
            shown = outputs.error(err["ename"], err["evalue"], executed.traceback or [])
            record = self.record(outputs=rec.finish() + [shown], error=err)
            # An awaiting body stopped by the kernel's interrupt is cancelled.
            stopped = isinstance(executed.error, (KeyboardInterrupt, asyncio.CancelledError))
            self.end(INTERRUPTED if stopped else FAILED, record, record.error_line()[:500])
            raise for_display(executed.error, executed.traceback)
        self.executed(rec, lambda: self._python_payload(ns, before, taken, python, rec, executed))
        return None

    def _python_payload(
        self, ns: dict, before: dict, taken: dict, python: str, rec: OutputRecorder, executed: Executed
    ) -> tuple[RunRecord, list]:
        names = names_bound(ns, before, python)
        changed, unknown = changes.changes(ns, taken, python, names)
        # Deleted: gone now, there before.  The code's deletes include
        # ``except … as e`` names and a ``del`` that may not have run.
        deleted = [n for n in analyse_cell(python).deletes if n in before and n not in ns and not is_shell_name(n)]
        # Large buffers are hashed later, from their snapshot, when the
        # record may be written in the background (recorder.py).
        defer = DEFER_HASH_MIN if self.later is not None else None
        specs, blobs = dump_names(ns, names + changed, defer)
        record = self.record(outputs=rec.finish(), names=specs, changed=changed, deleted=deleted)
        if changed:
            self.port.say(f"[stateful] also recorded: {', '.join(changed)} (changed in place)")
        if unknown:
            self.port.note(
                "[stateful] may have changed in place, but can't be fingerprinted, so a replay won't restore it: "
                + "; ".join(f"{n} ({why})" for n, why in unknown.items())
            )
        if any(outputs.kind(o) == outputs.RESULT for o in record.outputs):
            # Kept so a replay binds _ / Out[n] to the value, not a stand-in.
            record.result_value, value_blobs = dump_value(executed.result, defer)
            blobs += value_blobs
        bad = {n: s["error"] for n, s in specs.items() if s["kind"] == "unserializable"}
        if bad:
            self.port.note(
                "[stateful] executed, but these names can't be saved and won't be restored on replay: "
                + "; ".join(f"{n} ({why})" for n, why in bad.items())
            )
        return record, blobs

    def sql(self, cell: SQLCell) -> None:
        port = self.port
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
                record.outputs.append(outputs.stream("stdout", summary))
            else:
                spec, blobs = sql.dump_frame(res.frame)
                data, metadata = sql.frame_bundle(res.frame)
                record.result_value = spec
                if cell.out:
                    record.names[cell.out] = spec
                    port.user_ns[cell.out] = res.frame
                port.show_result(res.frame, data, metadata)
                count = getattr(port.shell, "execution_count", None)
                record.outputs.append(outputs.result(data, metadata, count))
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
            if self.later is not None and self.later(self, record, blobs):
                self.deferred = True  # written while the notebook goes on
                return
            blobs, signatures = self.seal(record, blobs)
        except KeyboardInterrupt as exc:
            self.end(INTERRUPTED, self.record(error=_error(exc, None)), "interrupted while recording")
            raise
        except Exception as exc:  # noqa: BLE001 - anything a value's pickling may raise
            self.end_unrecorded(exc)
            return
        self.end_executed(record, blobs, signatures)

    def seal(self, record: RunRecord, blobs: list) -> tuple[list, list]:
        """The digests of blobs not hashed yet, and the record's signature
        rows: one signature over the whole record, bound to this cell's key,
        what a replay checks before anything of it acts (trust.py)."""
        blobs = resolve_pending(list(record.specs().values()), blobs)
        if self.objects is not None and buckets.split(blobs, self.objects_min)[0]:
            record.blob_store = self.objects  # signed with the rest: where its bytes are
        signatures = [row for p in record.payloads_to_sign(self.key.ingest_src) for row in self.config.signer.sign(p)]
        return blobs, signatures

    def end_executed(self, record: RunRecord, blobs: list, signatures: list) -> bool:
        """Record the run EXECUTED (see :meth:`end`)."""
        return self.end(EXECUTED, record, "completed", blobs, signatures)

    def _note(self, text: str) -> None:
        if self.notes is not None:
            self.notes.append(text)
        else:
            self.port.note(text)

    def exec_row(self, to_state: str, record: RunRecord) -> ExecRow:
        """surveilr's view of this run (``orchestration_session_exec``)."""
        error = None
        if record.error:
            error = record.error.get("traceback") or record.error_line()
        return ExecRow(
            nature=self.nature,
            code=self.source,
            status=0 if to_state == EXECUTED else 1,
            identity=self.key.digest,
            input_text=redact_text(self.options),  # a --db URL's password is never stored
            output_text=output_text(record.outputs),
            error_text=str(error)[:EXEC_TEXT_MAX] if error else None,
            namespace=self.key.scope,
            elaboration={"state": to_state, "duration_s": record.duration_s, "key": self.key.digest},
        )

    def end(self, to_state: str, record: RunRecord, reason: str, blobs=(), signatures=()) -> bool:
        """Record how the run ended: a compare-and-append.  False when it was
        not recorded (taken over, or the store refused it)."""
        try:
            if record.blob_store is not None and blobs:
                # Its large blobs are durable in the bucket before the record
                # that names them is written.
                far, blobs = buckets.split(blobs, self.objects_min)
                buckets.put(record.blob_store, far)
            self.backend.finish(
                self.running, self.token, to_state, record.dumps(), reason, blobs, signatures, self.exec_row(to_state, record)
            )
            self.ended = to_state
            return True
        except Fenced as exc:
            self._note(f"[stateful] this run was taken over by {exc.by}; its result was not recorded")
            return False
        except BaseException as exc:  # noqa: BLE001 - the record failed, whatever the cause
            self.end_unrecorded(exc)
            return False

    def end_unrecorded(self, exc: BaseException) -> None:
        """The run's record could not be written (a value SQLite can't hold,
        a full disk, a lock held too long, Ctrl-C while writing): end it with
        a small record saying so, so no kernel waits for this one.  If even
        that can't be written now, it is kept in :attr:`pending` and retried
        (:meth:`retry_end`) before this kernel's next cell and at shutdown;
        meanwhile the claim stops beating (the caller releases it), so other
        kernels take the cell over once its lease lapses."""
        interrupted = isinstance(exc, KeyboardInterrupt)
        why = "interrupted while recording" if interrupted else f"could not record: {_one_line(exc)}"
        small = self.record(error={"ename": type(exc).__name__, "evalue": _one_line(exc), "traceback": ""})
        state = INTERRUPTED if interrupted else FAILED
        self.pending = (state, small.dumps(), why[:500], self.exec_row(state, small))
        again: BaseException | None = None
        try:
            self.retry_end()
        except BaseException as second:  # noqa: BLE001 - kept pending; only Ctrl-C goes on
            again = second if isinstance(second, KeyboardInterrupt) else None
        self._note(
            f"[stateful] {redact(self.backend.location)}: the run of cell {self.key.digest[:12]} could not be "
            f"recorded ({_one_line(exc)}); it will run again next time"
        )
        if interrupted:
            raise exc
        if again is not None:
            raise again

    def retry_end(self) -> bool:
        """Write the pending small end (see :meth:`end_unrecorded`); True once
        nothing is pending any more (written, or fenced: another kernel took
        the cell over).  Raises what the store raised while it can't."""
        if self.pending is None:
            return True
        state, result_json, reason, exec_row = self.pending
        try:
            self.backend.finish(self.running, self.token, state, result_json, reason, exec_row=exec_row)
            self.ended = state
        except Fenced:
            pass
        self.pending = None
        return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "…"


#: Buffers this large are hashed from their snapshot when the record may be
#: written in the background, not on the user's time.
DEFER_HASH_MIN = 1 << 20

#: How much of a run's text output and error surveilr's exec row keeps.
EXEC_TEXT_MAX = 4096


def output_text(recorded: list[Output], limit: int = EXEC_TEXT_MAX) -> str:
    """The first *limit* characters of what a run printed or showed as text
    (streams, and the text/plain of displays and results), in order."""
    parts: list[str] = []
    size = 0
    for out in recorded:
        kind = outputs.kind(out)
        if kind == outputs.STREAM:
            text = outputs.text_of(out)
        elif kind in (outputs.DISPLAY, outputs.RESULT):
            text = outputs.plain_of(out) or ""
            text = text + "\n" if text else ""
        else:
            continue
        parts.append(text[: limit - size])
        size += len(parts[-1])
        if size >= limit:
            break
    return "".join(parts)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _error(exc: BaseException, stb: list[str] | None) -> dict:
    text = _ANSI.sub("", "\n".join(stb)) if stb else "".join(traceback.format_exception(exc))
    return {"ename": type(exc).__name__, "evalue": str(exc), "traceback": text}


def for_display(exc: BaseException, stb: list[str] | None) -> BaseException:
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
