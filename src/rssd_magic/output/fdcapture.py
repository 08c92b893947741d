"""Output written below Python: file descriptors 1 and 2.

``os.write(1, …)``, subprocesses, C extensions and the logs of native
libraries (XGBoost, LightGBM, PyTorch) never pass through ``sys.stdout``.
While a cell runs, :class:`FdTee` points fds 1 and 2 at pipes of its own; a
reader thread takes what arrives, forwards it to where the user would have
seen it, and hands the text to a recorder.  The thread is one per process
(:class:`_Pump`), started once and parked in ``select``: a cell registers
its pipes with it and the thread wakes only when bytes arrive.  A thread of
its own per cell cost more than everything else a short cell's capture does
(its start and end are hand-offs of the GIL: ~0.4 ms).

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

import _thread
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
    #: The tee and channel whose pipe *saved* is, when a tee is started
    #: inside another (a %%stateful cell run by one): bytes are handed to it
    #: directly, as the one reader thread can't wait on a pipe it reads.
    parent: tuple[FdTee, _Channel] | None = None
    #: Our pipe's identity in :data:`_pipes`.
    pipe: tuple[int, int] = (-1, -1)


class _Pump:
    """The reader thread every :class:`FdTee` of this process shares.

    It waits in ``select`` on the registered pipes; when one is readable it
    moves what is there under its tee's lock (:meth:`FdTee._read`).  With
    epoll a registration made while the thread waits is seen at once; other
    selectors are woken by a byte on a pipe of the pump's own.
    Lock order: a tee's lock, then the pump's (never the other way round).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._needs_wake = not isinstance(self.sel, getattr(selectors, "EpollSelector", ()))
        # A bare thread: threading.Thread.start() waits until it runs.  A
        # daemon in effect (a _thread thread never blocks interpreter exit).
        _thread.start_new_thread(self._run, ())

    def add(self, tee: FdTee, ch: _Channel) -> None:
        with self.lock:
            self.sel.register(ch.read, selectors.EVENT_READ, (tee, ch))
        if self._needs_wake:
            os.write(self._wake_w, b"x")

    def remove(self, ch: _Channel) -> None:
        """Before *ch*'s read end is closed (its fd number may be reused)."""
        with self.lock:
            key = self.sel.get_map().get(ch.read)
            if key is not None and key.data is not None and key.data[1] is ch:
                self.sel.unregister(ch.read)

    def _run(self) -> None:
        while True:
            try:
                ready = self.sel.select()
            except (OSError, ValueError, KeyError):
                continue  # an fd closed under a non-epoll selector: look again
            for key, _ in ready:
                if key.data is None:
                    try:
                        os.read(self._wake_r, CHUNK)
                    except OSError:
                        pass
                    continue
                tee = key.data[0]
                try:
                    # Every channel of the tee, stdout first: when both pipes
                    # hold data the order between them is unknowable, and
                    # this is the order drain() uses too.  A stale key finds
                    # its channels closed (eof) and reads nothing.
                    with tee.lock:
                        for ch in tee._channels:
                            tee._read(ch)
                except Exception:  # noqa: BLE001 - the thread serves every later cell too
                    pass


_pump: _Pump | None = None
_pump_made = threading.Lock()


def _the_pump() -> _Pump:
    """This process's pump (a forked child gets its own: threads don't fork)."""
    global _pump
    with _pump_made:
        if _pump is None or _pump.pid != os.getpid():
            _pump = _Pump()
        return _pump


#: Our live pipes by identity (pipefs device and inode), to find the tee a
#: nested tee's saved fd writes into.
_pipes: dict[tuple[int, int], tuple[FdTee, _Channel]] = {}


def _pipe_id(fd: int) -> tuple[int, int]:
    try:
        st = os.fstat(fd)
    except OSError:
        return (-1, fd)
    return (st.st_dev, st.st_ino)


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
        self._pump: _Pump | None = None
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
        # (No live pipe of ours, no parent to look for: most cells.)
        ch = _Channel(fd, name, saved, r, forward, parent=_pipes.get(_pipe_id(saved)) if _pipes else None,
                      pipe=_pipe_id(r))  # fmt: skip
        _pipes[ch.pipe] = (self, ch)
        self._channels.append(ch)
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
        """Hand the pipes to the reader thread."""
        if not self._channels:
            return
        self._pump = _the_pump()
        for ch in self._channels:
            self._pump.add(self, ch)

    # -- moving bytes -----------------------------------------------------------

    def _deliver(self, ch: _Channel, data: bytes, final: bool = False) -> None:
        text = ch.decoder.decode(data, final)
        if ch.forward is None and ch.parent is not None and not ch.parent[1].eof:
            if data:
                tee, outer = ch.parent
                with tee.lock:
                    tee._read(outer)  # what the outer cell wrote before comes first
                    tee._deliver(outer, data)
        elif ch.forward is None:
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
                self._close_read(ch)
                if ch.restored:
                    self._close_saved(ch)
                return
            self._deliver(ch, data)

    def _close_read(self, ch: _Channel) -> None:
        _pipes.pop(ch.pipe, None)
        if self._pending is not None:
            self._pending.unregister(ch.read)
        if self._pump is not None:
            self._pump.remove(ch)
        os.close(ch.read)

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

    # -- ending ---------------------------------------------------------------

    def stop(self) -> None:
        """Restore the fds (always), record what was written until now, and
        stop recording.  Call it once, on every path out."""
        if not self._channels or os.getpid() != self._pid:
            return
        _fflush_c_streams()  # a C library's printf of this cell, still in its buffer
        with self.lock:
            # The reader thread lets go of the pipes first: restoring the fds
            # makes them readable (end of file), and waking that thread for
            # it would hand the GIL and this lock back and forth while this
            # thread reads the same pipes (most of a short cell's capture).
            pump = self._pump
            if pump is not None:
                for ch in self._channels:
                    pump.remove(ch)
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
                if not ch.eof and pump is not None:
                    pump.add(self, ch)  # a background process still writes: forwarded until it closes
            self.recording = False
            if self._pump is None:  # never started: nothing will read on
                for ch in self._channels:
                    if not ch.eof:
                        ch.eof = True
                        self._close_read(ch)
                    self._close_saved(ch)
            # Else a pipe still open (a background process holds its write
            # end) stays with the reader thread, forwarded until it closes.


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
