"""Output written below Python: file descriptors 1 and 2.

``os.write(1, …)``, subprocesses, C extensions and the logs of native
libraries (XGBoost, LightGBM, PyTorch) never pass through ``sys.stdout``.
While a cell runs, :class:`FdTee` points fds 1 and 2 at pipes of its own; a
reader thread takes what arrives, forwards it to where the user would have
seen it, and hands the text to a recorder.

Where it is forwarded depends on the shell (see :func:`forward_for`):

* a terminal or an in-process shell: the bytes go to wherever the fd
  pointed before (the terminal, a log file, pytest's capture);
* an ipykernel kernel that watches its fds (ipykernel 6+ replaces fds 1/2
  with a pipe and a thread that writes what arrives to its ``OutStream``
  and echoes the bytes to the kernel's original fd): we do the very same
  two steps, so the frontend and the kernel's log see what they would have;
* a kernel that does not watch its fds (the frontend never shows fd
  output): the fd is left alone and nothing is recorded, as nothing is seen.

Order with Python-level output is exact: the caller calls :meth:`drain`
(under :attr:`lock`) before each Python-level write, display and result, so
every byte written to an fd before it is forwarded and recorded first.
Nothing here imports IPython.
"""

from __future__ import annotations

import codecs
import os
import select
import selectors
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

CHUNK = 65536

#: forward(text, data): show fd output the way the shell would have.
Forward = Callable[[str, bytes], None]


def _fflush_c_streams() -> None:
    """Flush C stdio buffers (``printf`` without ``fflush``) to their fds."""
    global _libc_fflush
    if _libc_fflush is None:
        try:
            import ctypes

            _libc_fflush = ctypes.CDLL(None).fflush
        except (OSError, AttributeError, ImportError):
            _libc_fflush = False
    if _libc_fflush:
        try:
            _libc_fflush(None)
        except Exception:  # noqa: BLE001 - best effort; never fail a cell for it
            pass


_libc_fflush: Any = None


def supported() -> bool:
    """Pipes, ``dup2`` and non-blocking reads as needed here: POSIX only."""
    return os.name == "posix"


def forward_for(stream: Any, fd: int) -> tuple[bool, Forward | None]:
    """How fd output should be shown, given the Python stream (``sys.stdout``
    or ``sys.stderr``) the shell shows text with.

    Returns ``(capture, forward)``: ``capture`` False means leave the fd
    alone; ``forward`` None means write the bytes to the fd's old target.
    """
    watching = getattr(stream, "_should_watch", None)
    if watching is None:  # not an ipykernel OutStream: a terminal-like shell
        return True, None
    if not watching or getattr(stream, "_original_stdstream_fd", None) != fd:
        return False, None
    echo_fd = getattr(stream, "_original_stdstream_copy", None)

    def forward(text: str, data: bytes) -> None:
        # What ipykernel's own fd watcher does with each chunk.
        if text:
            stream.write(text)
        if isinstance(echo_fd, int):
            try:
                os.write(echo_fd, data)
            except OSError:
                pass

    return True, forward


@dataclass
class _Channel:
    fd: int
    name: str
    saved: int  # where fd pointed before; restored from here
    read: int  # our pipe's read end
    forward: Forward | None
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    eof: bool = False
    restored: bool = False


class FdTee:
    """Redirect fds to pipes; forward and record what is written to them.

    Use :meth:`redirect` for each fd, :meth:`start`, then :meth:`stop` on
    every path out (it restores the fds).  ``record(name, text)`` is called
    with the lock held, in the order the bytes were written.  After
    :meth:`stop`, a process that inherited a pipe (a background
    ``subprocess.Popen``) can still write: its output is forwarded, not
    recorded, until it closes the pipe, so it never blocks or gets EPIPE.
    """

    def __init__(self, record: Callable[[str, str], None], lock: threading.RLock | None = None) -> None:
        self.record = record
        self.lock = lock or threading.RLock()
        self.recording = True
        self._channels: list[_Channel] = []
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        # drain() runs before every Python-level write: one poll(0) tells
        # whether there is anything to move (no read, no exception).
        self._pending = select.poll() if hasattr(select, "poll") else None
        self._pid = os.getpid()  # a forked child must not read the parent's pipes

    # -- setting up -----------------------------------------------------------

    def redirect(self, fd: int, name: str, forward: Forward | None = None) -> bool:
        """Point *fd* at a new pipe.  False (and nothing changed) if *fd* is
        not open or the pipe can't be made."""
        try:
            saved = os.dup(fd)
        except OSError:
            return False
        try:
            r, w = os.pipe()
        except OSError:
            os.close(saved)
            return False
        try:
            os.set_blocking(r, False)
            os.dup2(w, fd)
        except OSError:
            for f in (saved, r, w):
                os.close(f)
            return False
        os.close(w)  # fd itself is now the write end (and what children inherit)
        self._channels.append(_Channel(fd, name, saved, r, forward))
        if self._pending is not None:
            self._pending.register(r, select.POLLIN)
        return True

    @property
    def active(self) -> bool:
        """Whether any fd is redirected."""
        return bool(self._channels)

    def original(self, fd: int) -> int | None:
        """A descriptor for where *fd* pointed before the redirect."""
        for ch in self._channels:
            if ch.fd == fd:
                return ch.saved
        return None

    def start(self) -> None:
        if not self._channels:
            return
        self._wake_r, self._wake_w = os.pipe()
        sel = selectors.DefaultSelector()  # registered here, while every fd is open
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        for ch in self._channels:
            sel.register(ch.read, selectors.EVENT_READ, ch)
        self._thread = threading.Thread(target=self._run, args=(sel,), name="rssd_magic-fdtee", daemon=True)
        self._thread.start()

    # -- moving bytes -----------------------------------------------------------

    def _deliver(self, ch: _Channel, data: bytes, final: bool = False) -> None:
        text = ch.decoder.decode(data, final)
        if ch.forward is None:
            if data and ch.saved >= 0:
                _write_all(ch.saved, data)
        elif text or data:
            try:
                ch.forward(text, data)
            except Exception:  # noqa: BLE001 - a broken frontend must not stop the reader
                pass
        if text and self.recording:
            self.record(ch.name, text)

    @staticmethod
    def _close_saved(ch: _Channel) -> None:
        if ch.saved >= 0:
            os.close(ch.saved)
            ch.saved = -1

    def _read(self, ch: _Channel) -> None:
        """Move everything that is in *ch*'s pipe right now (lock held)."""
        while not ch.eof:
            try:
                data = os.read(ch.read, CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # every write end is closed: nothing more can come
                ch.eof = True
                self._deliver(ch, b"", final=True)
                if self._pending is not None:
                    self._pending.unregister(ch.read)
                os.close(ch.read)
                if ch.restored:
                    self._close_saved(ch)
                return
            self._deliver(ch, data)

    def drain(self) -> None:
        """Forward and record everything written to the fds so far.

        Under the lock even when nothing is pending: the reader thread may
        be delivering a chunk it has read, which must be recorded first."""
        if not self._channels or os.getpid() != self._pid:
            return
        with self.lock:
            if self._pending is not None and not self._pending.poll(0):
                return
            for ch in self._channels:
                self._read(ch)

    def _run(self, sel: selectors.BaseSelector) -> None:
        try:
            stopping = False
            while True:
                with self.lock:
                    for ch in self._channels:
                        if ch.eof and ch.read in sel.get_map():
                            sel.unregister(ch.read)
                    if stopping and all(c.eof for c in self._channels):
                        return
                ready = sel.select()
                if any(key.data is None for key, _ in ready):
                    stopping = True  # stop(): keep going only while pipes are open
                    sel.unregister(self._wake_r)
                if any(key.data is not None for key, _ in ready):
                    # Every channel, stdout first: when both pipes hold data,
                    # the order between them is unknowable; this is the
                    # order drain() uses too.
                    with self.lock:
                        for ch in self._channels:
                            self._read(ch)
        finally:
            sel.close()
            os.close(self._wake_r)

    # -- ending ---------------------------------------------------------------

    def stop(self) -> None:
        """Restore the fds (always), record what was written until now, and
        stop recording.  Call it once, on every path out."""
        if not self._channels or os.getpid() != self._pid:
            return
        _fflush_c_streams()  # a C library's printf of this cell, still in its buffer
        with self.lock:
            try:
                for ch in self._channels:
                    self._read(ch)
            finally:
                for ch in self._channels:
                    try:
                        os.dup2(ch.saved, ch.fd)
                    except OSError:
                        pass
                    ch.restored = True
            for ch in self._channels:  # written between the read and the restore
                self._read(ch)
                if ch.eof or ch.forward is not None:
                    self._close_saved(ch)  # not needed to forward any more
            self.recording = False
        if self._thread is None:
            for ch in self._channels:
                if not ch.eof:
                    ch.eof = True
                    os.close(ch.read)
                self._close_saved(ch)
            return
        os.write(self._wake_w, b"x")
        os.close(self._wake_w)
        if all(ch.eof for ch in self._channels):
            self._thread.join(timeout=5)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return  # the old target is gone (closed terminal): drop, as it would
        view = view[n:]


class FdWriter:
    """A minimal text stream writing straight to a descriptor: where a
    terminal's ``sys.stdout`` text goes while fd 1 is redirected, so Python
    writes reach the terminal without passing through the pipe (they are
    recorded once, as Python-level text)."""

    def __init__(self, fd: int, encoding: str | None, errors: str | None) -> None:
        self.fd = fd
        self.encoding = encoding or "utf-8"
        self.errors = errors or "strict"

    def write(self, text: str) -> int:
        _write_all(self.fd, text.encode(self.encoding, self.errors))
        return len(text)

    def flush(self) -> None:
        pass


def python_stream_fd(stream: Any) -> int | None:
    """The fd a Python text stream writes to, if it writes to one directly."""
    if getattr(stream, "_should_watch", None) is not None:
        return None  # ipykernel's OutStream: fileno() is only a copy for children
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None


def flush_python_streams(*streams: Any) -> None:
    """Flush the buffers of Python streams that write to fds 1/2."""
    for stream in (*streams, sys.__stdout__, sys.__stderr__):
        if stream is None:
            continue
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream has nothing to flush
            pass
