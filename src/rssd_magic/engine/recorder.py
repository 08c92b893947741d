"""Records of large values written while the notebook goes on.

Writing 200 MB durably (the WAL, then the file, each synced) takes a second
or more; the user need not wait for it.  When a run's values are large, its
blobs are snapshotted (copied into memory this package owns: the next cell
may change an array in place) and a thread writes them and the record,
through a second instance of the store (``StateBackend.writer``), while the
kernel goes on.  Durability is unchanged: the record lands exactly as a
foreground one would, moments later.

The run's claim stays held and beating until its record lands, so another
kernel waits for it as it does for a run, and a kernel killed before it
lands is a dead holder whose claim is taken over — exactly as a kill during
a foreground write.  In this kernel, whatever needs the record waits for
it: the same cell run again, ``%stateful`` commands, shutdown, restart and
``%reload_ext`` (with one progress line when that takes over a second).  A
write that fails ends the run "could not record", as in the foreground, and
is said at the next cell.

Values larger than a share of the memory available are written in the
foreground as before: a snapshot must not be what runs the machine out of
memory.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..store.journal import StateBackend
from ..records.canonical import fmt_bytes

#: Records whose blobs add up to at least this many bytes are written in
#: the background (smaller ones cost less than the hand-off).
BACKGROUND_MIN = 8 << 20
#: ... unless their snapshot would take more than this share of the memory
#: available now.
MEMORY_SHARE = 0.25
#: A wait that lasts longer than this says so, once.
SAY_AFTER_S = 1.0


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def snapshot(data: Any) -> Any:
    """A copy of *data* that nothing else can change: pickle streams are
    immutable bytes already; a buffer that views a live value (a numpy
    array's memory, handed out-of-band by pickle) is copied once."""
    if isinstance(data, bytes):
        return data
    view = memoryview(data)
    view = view if view.format == "B" and view.ndim == 1 else view.cast("B")
    from ..store.blobs import buffer as _buffer  # a zeroed mapping, no memset to pay

    out = _buffer(view.nbytes)
    memoryview(out)[:] = view
    return out


@dataclass
class _Job:
    run: Any  # runs.Run
    key: str
    nbytes: int
    done: threading.Event = field(default_factory=threading.Event)
    notes: list[str] = field(default_factory=list)


class Recorder:
    """The records this kernel writes in the background, one thread each."""

    def __init__(self, say: Callable[[str], None]):
        self._say = say
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._finished: list[_Job] = []

    def take(self, run: Any, record: Any, blobs: list, on_done: Callable[[Any], None]) -> bool:
        """Write *run*'s record in the background when its blobs are large
        enough and fit the memory budget; False to have it written now.
        Blobs not hashed yet (``pending:``) are hashed from their snapshot
        there, and the record signed.  *on_done(run)* is called, on the
        writing thread, once it ended (the caller releases the claim's
        heartbeat there)."""
        nbytes = sum(memoryview(data).nbytes for _, data in blobs)
        if nbytes < BACKGROUND_MIN or nbytes > MEMORY_SHARE * _available_memory():
            return False
        owned = [(digest, snapshot(data)) for digest, data in blobs]
        job = _Job(run, run.key.ingest_src, nbytes)
        with self._lock:
            self._jobs[job.key] = job
        thread = threading.Thread(
            target=self._write, args=(job, record, owned, on_done), name="rssd-magic-record", daemon=True
        )
        thread.start()
        return True

    def _write(self, job: _Job, record: Any, blobs: list, on_done: Callable[[Any], None]) -> None:
        run = job.run
        main = run.backend
        try:
            run.notes = job.notes  # said by the kernel at its next cell, not from this thread
            try:
                blobs, signatures = run.seal(record, blobs)
                run.backend = main.writer()
            except Exception as exc:  # noqa: BLE001 - can't hash, sign or open the store again: ends unrecorded
                run.backend = main
                run.end_unrecorded(exc)
                return
            try:
                run.end_executed(record, blobs, signatures)
            finally:
                writer, run.backend = run.backend, main
                writer.close()
        except BaseException as exc:  # noqa: BLE001 - a thread must not die silently
            job.notes.append(f"[stateful] the record of cell {run.key.digest[:12]} could not be written: {exc}")
        finally:
            run.notes = None
            try:
                on_done(run)
            finally:
                with self._lock:
                    self._jobs.pop(job.key, None)
                    self._finished.append(job)
                job.done.set()

    def finished(self) -> list[tuple[Any, list[str]]]:
        """``(run, notes)`` of the records that ended since last asked (the
        kernel says the notes and keeps what failed)."""
        with self._lock:
            done, self._finished = self._finished, []
        return [(job.run, job.notes) for job in done]

    def pending(self, key: str | None = None) -> list[_Job]:
        with self._lock:
            return [j for k, j in self._jobs.items() if key is None or k == key]

    def wait(self, key: str | None = None, why: str = "") -> None:
        """Wait for the record of cell *key* (all records when None) to be
        written; one line says so when that takes over a second."""
        jobs = self.pending(key)
        if not jobs:
            return
        started = time.monotonic()
        said = False
        for job in jobs:
            while not job.done.wait(0.05 if not said else 1.0):
                if not said and time.monotonic() - started > SAY_AFTER_S:
                    said = True
                    total = sum(j.nbytes for j in jobs)
                    try:
                        self._say(f"[stateful] waiting for {len(jobs)} record(s) ({fmt_bytes(total)}) to be written{why}")
                    except Exception:  # noqa: BLE001 - stdout gone at interpreter exit
                        pass


def background_ok(backend: StateBackend) -> bool:
    """Whether *backend* can give a writing thread an instance of its own."""
    return callable(getattr(backend, "writer", None)) and getattr(backend, "read_only", None) is None
