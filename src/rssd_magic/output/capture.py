"""Recording what a cell shows while it runs, and showing it again.

Outputs are kept as a list in nbformat's output shape (``stream``,
``display_data``, ``execute_result``, ``error``), in the order they happened,
so a replay is the same sequence with the same MIME types, and any tool that
reads notebooks can read ``transition_result``.

Recording is a tee: the cell's output still goes live to the frontend while
a copy is kept.  Three channels are watched, all through objects the shell
already has (duck-typed, so this module needs no IPython import):

* ``sys.stdout`` / ``sys.stderr`` — wrapped by :class:`Tee`;
* file descriptors 1 and 2 — redirected by :class:`~.fdcapture.FdTee`
  (``os.write``, subprocesses, C libraries);
* ``shell.display_pub.publish`` / ``clear_output`` — rich displays;
* ``shell.displayhook.write_format_data`` — the cell's result.

Before each Python-level write, display and result, what was written to the
fds is moved first, so the record has the order the user saw.

While the display publisher or the display hook runs, Python-level stream
recording is paused: a terminal shell *prints* displays and ``Out[n]``, and
those prints must not be recorded a second time as stdout.

Widgets are recorded as their final state (:mod:`.widgets`): a widget view
refers to a live model that a replay's kernel doesn't have.
"""

from __future__ import annotations

import base64
import os
import sys
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

from . import fdcapture, widgets
from ..records import outputs as nb
from ..records.outputs import Output


def _jsonable(value: Any) -> Any:
    """Make a MIME bundle JSON-safe the way Jupyter does (bytes → base64)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _size(data: dict) -> int:
    return sum(len(v) if isinstance(v, str) else 64 for v in data.values())


def _utf8(text: str) -> str:
    """Text that encodes as UTF-8: lone surrogates (undecodable bytes that
    reached a text stream) become U+FFFD instead of failing the record."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # bytes smuggled in by surrogateescape: decode them for real
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class OutputRecorder:
    """Collects outputs in nbformat shape, merging consecutive stream text.

    At most *limit* characters of output are kept (a cell printing a
    gigabyte must not put a gigabyte into the RSSD); past it, recording
    stops and :meth:`finish` appends a note saying so.  What the user sees
    live is never cut.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.outputs: list[Output] = []
        self.paused = 0
        self.limit = limit
        self.size = 0
        self.truncated = False
        # fd output arrives on a reader thread: every change to the record
        # happens under this lock (shared with the FdTee).
        self.lock = threading.RLock()
        # A child forked while recording (multiprocessing) has a copy of the
        # recorder that nobody reads, and maybe of a lock held at the fork:
        # it records nothing.  (Its fd output reaches the parent's pipes.)
        self.pid = os.getpid()
        self._clear_pending = False
        # display_id -> outputs shown with it; kept aside because nbformat's
        # display_data has no place for transient data.
        self._displays: dict[str, list[Output]] = {}

    def _room(self, n: int) -> int:
        """How much of *n* more characters may be kept."""
        if self.truncated:
            return 0
        if self.limit is not None and self.size + n > self.limit:
            self.truncated = True
            return max(0, self.limit - self.size)
        self.size += n
        return n

    def _add(self, output: dict) -> None:
        if self._clear_pending:
            self.outputs.clear()
            self._clear_pending = False
        self.outputs.append(output)

    def stream(self, name: str, text: str, fd: bool = False) -> None:
        """Text written to stdout/stderr (*fd*: at the file-descriptor level,
        which a display's own printing never is, so it is never paused)."""
        if (self.paused and not fd) or not text or os.getpid() != self.pid:
            return
        with self.lock:
            room = self._room(len(text))
            if room < len(text):
                text = text[:room]
                if not text:
                    return
            last = self.outputs[-1] if self.outputs and not self._clear_pending else None
            if last and nb.kind(last) == nb.STREAM and last["name"] == name:
                last["text"].append(text)  # joined in finish(): no quadratic +=
            else:
                self._add(nb.stream(name, [text]))

    def finish(self) -> list[Output]:
        """The outputs, JSON- and UTF-8-safe, with a note if any were cut.

        Widgets are read now, at the end of the cell: their final state is
        what the user saw last, and what a replay shows."""
        with self.lock:
            self.outputs = widgets.snapshot_outputs(self.outputs)
            return self._finish()

    def _finish(self) -> list[Output]:
        for out in self.outputs:
            if nb.kind(out) == nb.STREAM and isinstance(out["text"], list):
                out["text"] = _utf8("".join(out["text"]))
        if self.truncated:
            self.outputs.append(nb.stream(
                "stderr",
                f"[stateful] output recorded up to {self.limit} characters; the rest was shown "
                "live but not recorded (StatefulMagics.max_output_size)\n",
            ))  # fmt: skip
        return self.outputs

    def display(self, data: dict, metadata: dict | None, transient: dict | None, update: bool) -> None:
        if os.getpid() != self.pid:
            return
        with self.lock:
            self._display(data, metadata, transient, update)

    def _display(self, data: dict, metadata: dict | None, transient: dict | None, update: bool) -> None:
        display_id = (transient or {}).get("display_id")
        if update:
            # An update replaces the earlier outputs with the same display_id,
            # as nbclient does when it writes a notebook.
            for out in self._displays.get(display_id, ()):
                out["data"] = _jsonable(data)
                out["metadata"] = _jsonable(metadata or {})
            return
        out = nb.display(_jsonable(data), _jsonable(metadata or {}))
        if not self._room(_size(out["data"])):
            return
        if display_id is not None:
            self._displays.setdefault(display_id, []).append(out)
        self._add(out)

    def result(self, data: dict, metadata: dict | None, execution_count: int | None) -> None:
        if os.getpid() != self.pid:
            return
        with self.lock:
            self._result(data, metadata, execution_count)

    def _result(self, data: dict, metadata: dict | None, execution_count: int | None) -> None:
        if not self._room(_size(data)):
            return
        self._add(nb.result(_jsonable(data), _jsonable(metadata or {}), execution_count))

    def clear(self, wait: bool = False) -> None:
        if os.getpid() != self.pid:
            return
        with self.lock:
            if wait:
                self._clear_pending = True
            else:
                self.outputs.clear()


class Tee:
    """A text stream that forwards to *target* and records into *recorder*.

    *sink*, when given, receives the text instead of *target* (everything
    else is still *target*'s): a terminal's ``sys.stdout`` writes to fd 1,
    which is redirected while recording, so its text goes straight to where
    fd 1 pointed.  *sync* is called before each write (the fd tee's drain).
    """

    def __init__(
        self,
        target: Any,
        name: str,
        recorder: OutputRecorder,
        sink: Any = None,
        sync: Callable[[], None] | None = None,
    ) -> None:
        self._target = target
        self._name = name
        self._recorder = recorder
        self._sink = sink if sink is not None else target
        self._sync = sync

    def write(self, text: str) -> int:
        if self._sync is not None:
            self._sync()  # fd output written before this text comes first
        n = self._sink.write(text)
        self._recorder.stream(self._name, text)
        return n

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, attr: str) -> Any:
        # flush, isatty, fileno, encoding, ipykernel's extras: all the target's.
        return getattr(self._target, attr)


@contextmanager
def patched(obj: Any, attr: str, replacement: Any) -> Iterator[None]:
    """Shadow a bound method on one instance, then remove the shadow."""
    had_own = attr in vars(obj)
    saved = vars(obj).get(attr)
    setattr(obj, attr, replacement)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, attr, saved)
        else:
            delattr(obj, attr)


@contextmanager
def capture(shell: Any, limit: int | None = None, *, fds: bool = True) -> Iterator[OutputRecorder]:
    """Tee everything *shell* shows while the block runs into a recorder
    (which keeps at most *limit* characters).

    With *fds* (and on POSIX), output written to file descriptors 1 and 2
    is recorded too, in order with Python-level output; the descriptors are
    restored on every path out.  Call ``rec.finish()`` after the block for
    the outputs (widgets are snapshotted then)."""
    rec = OutputRecorder(limit)
    pub, hook = shell.display_pub, shell.displayhook
    orig_publish, orig_clear = pub.publish, pub.clear_output
    orig_write_format, orig_start, orig_finish = (
        hook.write_format_data,
        hook.start_displayhook,
        hook.finish_displayhook,
    )
    out, err = sys.stdout, sys.stderr
    tee = fdcapture.FdTee(lambda name, text: rec.stream(name, text, fd=True), rec.lock)
    drain = tee.drain

    def publish(data, metadata=None, *args, transient=None, update=False, **kwargs):
        drain()
        rec.display(data, metadata, transient, update)
        rec.paused += 1
        try:
            return orig_publish(data, metadata, *args, transient=transient, update=update, **kwargs)
        finally:
            rec.paused -= 1

    def clear_output(wait=False):
        drain()
        rec.clear(wait)
        return orig_clear(wait=wait)

    def write_format_data(format_dict, md_dict=None):
        drain()
        rec.result(format_dict, md_dict, getattr(shell, "execution_count", None))
        return orig_write_format(format_dict, md_dict)

    def start_displayhook():
        rec.paused += 1
        return orig_start()

    def finish_displayhook():
        try:
            return orig_finish()
        finally:
            rec.paused -= 1

    if fds and fdcapture.supported():
        # What was written before the cell belongs to the cell before.
        fdcapture.flush_python_streams(out, err)
        for fd, name, stream in ((1, "stdout", out), (2, "stderr", err)):
            wanted, forward = fdcapture.forward_for(stream, fd)
            if wanted:
                tee.redirect(fd, name, forward)
        tee.start()
    tees = []
    for stream, name in ((out, "stdout"), (err, "stderr")):
        fd = fdcapture.python_stream_fd(stream)
        original = tee.original(fd) if fd is not None else None
        sink = None
        if original is not None:
            sink = fdcapture.FdWriter(original, getattr(stream, "encoding", None), getattr(stream, "errors", None))
        tees.append(Tee(stream, name, rec, sink=sink, sync=drain if tee.active else None))
    sys.stdout, sys.stderr = tees
    try:
        with ExitStack() as stack:
            # Each replacement is named after the method it shadows.
            for obj, replacement in (
                (pub, publish),
                (pub, clear_output),
                (hook, write_format_data),
                (hook, start_displayhook),
                (hook, finish_displayhook),
            ):
                stack.enter_context(patched(obj, replacement.__name__, replacement))
            yield rec
    finally:
        try:
            # Buffered Python text bound for fds 1/2 (sys.__stdout__, a
            # terminal's .buffer) reaches the pipes before they are closed.
            fdcapture.flush_python_streams(out, err)
        finally:
            try:
                tee.stop()
            finally:
                # Restore only what we installed: a cell may have replaced the
                # streams itself (contextlib.redirect_stdout that it left in place).
                if isinstance(sys.stdout, Tee):
                    sys.stdout = out
                if isinstance(sys.stderr, Tee):
                    sys.stderr = err


class ReplayedResult:
    """Stands for a cell's recorded result: the shell's display hook shows it
    through ``_repr_mimebundle_`` with exactly the recorded MIME bundle."""

    def __init__(self, data: dict, metadata: dict) -> None:
        self.data = data
        self.metadata = metadata

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", ""))


def _bundle(out: dict) -> tuple[dict, dict] | None:
    data, metadata = out["data"], out.get("metadata", {})
    if not isinstance(data, dict) or not isinstance(metadata, dict):
        raise TypeError("data and metadata must be objects")
    if widgets.VIEW in data:
        # Recorded before widgets were snapshotted: a view of a model that
        # doesn't exist here would only show an error.  Keep its text.
        data = widgets.without_views(data)
        if not data:
            return None
    return data, metadata


def replay(
    outputs: Any,
    shell: Any,
    show_result: Callable[[dict, dict], None] | None = None,
) -> tuple[ReplayedResult | None, int]:
    """Show recorded *outputs* again through *shell*, in the recorded order.

    Streams are written to the current ``sys.stdout``/``sys.stderr`` and
    displays go through the shell's publisher.  The cell's result is shown
    where it was recorded: ``show_result(data, metadata)`` is called at the
    ``execute_result``'s position (the caller shows it as this cell's
    result, ``Out[n]``), and ``None`` is returned in its place.  Without
    *show_result*, the result is returned instead, for the caller to return
    so the shell shows it (after everything else, as before).
    Returns ``(result, how many outputs were malformed and skipped)``: the
    JSON may have been written by another tool.  Widget views are never
    replayed (their models don't exist here): only the rest of their bundle.
    """
    if not isinstance(outputs, list):
        return None, 1
    result, skipped = None, 0
    for out in outputs:
        try:
            kind = out.get("output_type")
            if kind == nb.STREAM:
                text = nb.joined(out["text"])
                stream = sys.stderr if out.get("name") == "stderr" else sys.stdout
                stream.write(text)
                stream.flush()  # keep stdout/stderr interleaving as recorded
            elif kind == nb.DISPLAY:
                bundle = _bundle(out)
                if bundle is not None:
                    shell.display_pub.publish(data=bundle[0], metadata=bundle[1])
            elif kind == nb.RESULT:
                bundle = _bundle(out)
                if bundle is None:
                    continue
                data, metadata = bundle
                if show_result is None:
                    result = ReplayedResult(data, metadata)
                else:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    show_result(data, metadata)
            elif kind != nb.ERROR:
                raise TypeError(f"unknown output_type {kind!r}")
        except (AttributeError, KeyError, TypeError, ValueError):
            skipped += 1
    return result, skipped
