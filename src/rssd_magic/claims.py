"""Run claims: who is running a cell right now, and whether they still are.

"At most once" across kernels needs more than a transaction: a kernel that
starts a 40-minute cell must tell the others "mine, wait" for 40 minutes, and
a kernel that dies half-way (SIGKILL, OOM, reboot) must not block the cell
forever nor count as having run it.

A claim is the ``RUNNING`` transition (history, append-only) plus one row of
our own ``rssd_magic_claim`` table saying who holds it: host, pid, the pid's
start time and a heartbeat.  Liveness is decided like this:

* **same host**: the process is asked directly.  A pid that is gone, a
  zombie (killed but not yet reaped by its parent) or a pid reused by a newer
  process (other start time) means the holder is dead — at once, no lease.
* **other host**: a lease.  The holder's :class:`Heartbeat` thread renews
  ``heartbeat_at`` every ``lease/3`` seconds; a lease that lapsed means dead.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass

import psutil

#: Seconds a claim from another host stays valid without a heartbeat.
DEFAULT_LEASE_S = 60.0


def process_started(pid: int) -> float | None:
    """Start time of *pid* (seconds since the epoch), None if it isn't running."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0  # exists, owned by someone else: alive, start time unknown


MY_PID = os.getpid()
MY_START = process_started(MY_PID) or 0.0


@dataclass(frozen=True)
class Claim:
    """One row of ``rssd_magic_claim``: the holder of a RUNNING transition."""

    entry_id: str
    state_id: str
    session_id: str
    host: str
    pid: int
    pid_started: float
    claimed_at: float
    heartbeat_at: float
    lease_s: float

    def dead_because(self, now: float | None = None) -> str | None:
        """Why the holder is dead, or None while it is (or may be) alive."""
        if self.host == socket.gethostname():
            if self.pid == MY_PID and abs(self.pid_started - MY_START) < 1:
                # Our own claim, yet we are asking: a run of ours that never
                # finished (its record failed).  Nothing of ours runs it now.
                return f"its run in this kernel (pid {self.pid}) did not finish"
            started = process_started(self.pid)
            if started is None:
                return f"process {self.pid} on {self.host} is gone"
            if started > 0 and abs(started - self.pid_started) > 1:
                return f"process {self.pid} on {self.host} was replaced (pid reused)"
            return None
        now = time.time() if now is None else now
        silent = now - self.heartbeat_at
        if silent > self.lease_s:
            return f"lease of {self.host} (pid {self.pid}) lapsed {silent:.0f}s ago (lease {self.lease_s:.0f}s)"
        return None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.claimed_at))
        return f"host {self.host}, pid {self.pid}, since {since} UTC"


def new_claim(entry_id: str, state_id: str, session_id: str, lease_s: float) -> Claim:
    now = time.time()
    return Claim(entry_id, state_id, session_id, socket.gethostname(), MY_PID, MY_START, now, now, lease_s)


class Heartbeat:
    """Renews this process's claims while cells run.

    It uses a connection of its own: SQLite connections carry transaction
    state, and a heartbeat must never land inside (or be rolled back with)
    the main thread's transaction.
    """

    def __init__(self, path, busy_timeout_s: float):
        self._path = path
        self._timeout = busy_timeout_s
        self._held: dict[str, float] = {}  # state_id -> lease
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, state_id: str, lease_s: float) -> None:
        with self._lock:
            self._held[state_id] = lease_s
            if self._thread is None:
                self._wake = threading.Event()
                self._thread = threading.Thread(target=self._run, name="rssd-magic-heartbeat", daemon=True)
                self._thread.start()

    def release(self, state_id: str) -> None:
        with self._lock:
            self._held.pop(state_id, None)

    def stop(self) -> None:
        """Drop every claim and let the thread close its connection (so the
        last connection to close can checkpoint and remove the -wal file)."""
        with self._lock:
            self._held.clear()
            self._wake.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        try:
            while True:
                with self._lock:
                    # Checked and cleared under the lock, so hold() either
                    # sees this thread still running or starts a new one.
                    if not self._held:
                        self._thread = None
                        return
                    interval = min(self._held.values()) / 3
                self._wake.wait(interval)
                with self._lock:
                    beats = [(time.time(), sid) for sid in self._held]
                try:
                    conn.executemany("UPDATE rssd_magic_claim SET heartbeat_at = ? WHERE state_id = ?", beats)
                except sqlite3.Error:
                    pass  # busy for longer than the timeout: the next beat will do
        finally:
            conn.close()
