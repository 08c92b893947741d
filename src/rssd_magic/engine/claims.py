"""Who runs a cell now, and whether they still do — judged without trusting
another host's clock, hostname or pid.

A kernel that starts a 40-minute cell tells the others "mine, wait" with a
claim (backends record it); a kernel that dies half-way (SIGKILL, OOM, a
lost machine) must neither block the cell forever nor count as having run
it.  The rules, each from a way the previous version broke:

* **Pids compare only inside one PID namespace of one running kernel.**  A
  holder is described by its boot id, PID namespace, pid and start time in
  clock ticks since boot (:class:`~rssd_magic.store.base.Holder`).  Only
  when boot id and namespace match ours is the process asked directly: gone,
  a zombie, or a pid now used by a newer process means dead at once.
  Hostnames decide nothing (containers share them; VMs get renamed).
* **Leases are measured on the waiter's own monotonic clock.**  The holder's
  heartbeat bumps a counter; a waiter that sees it not move for
  ``lease_s`` of its own time calls the holder dead.  Clock skew between
  hosts, or a clock set a day ahead, can't fake a lapsed (or live) lease.
  A store with one clock every client shares (PostgreSQL) may also say how
  long the holder has been silent (``Claim.silent_s``).
* **A stale holder can't do harm**: taking over gives a larger fencing token,
  and a run's end is recorded only while its own claim holds (backends).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from ..store.base import Claim, Holder, Renewer

#: Seconds a claim may go without a visible heartbeat before it is taken over.
DEFAULT_LEASE_S = 60.0
#: Seconds the heartbeat thread waits for the next claim before it ends.
IDLE_S = 30.0


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def command_line(pid: int) -> str | None:
    """The command line of process *pid* for a message (shortened), or None
    when ``/proc`` can't tell."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    args = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
    if not args:
        return None
    text = " ".join(args)
    return text if len(text) <= 160 else text[:157] + "..."


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (which may hold
    spaces and parentheses, so split after the last ``)``)."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    return text.rpartition(")")[2].split()


def process_start(pid: int) -> int | None:
    """Start time of *pid* in clock ticks since boot, None if it isn't
    running (gone, or a zombie that is dead but not yet reaped).  Ticks since
    boot, unlike wall-clock start times, don't move when a clock is set."""
    fields = _stat_fields(pid)
    if fields is not None:
        if fields[0] in ("Z", "X"):
            return None
        return int(fields[19])
    if os.path.exists("/proc/self/stat"):
        return None  # Linux, and the pid has no entry: gone
    import psutil  # other systems: wall-clock start, to the second

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(proc.create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1  # exists, owned by someone else: alive, start unknown


def _boot_id() -> str:
    boot = _read("/proc/sys/kernel/random/boot_id")
    if boot:
        return boot
    import psutil

    return f"boot-{psutil.boot_time():.0f}"


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "pidns-unknown"


_IDENTITY: dict[int, Holder] = {}


def current_holder(session_id: str = "") -> Holder:
    """This process, as a claim records it.  Read once per process (by pid:
    a forked child reads its own): asking /proc and /etc on every claim cost
    more than the claim's transaction."""
    pid = os.getpid()
    me = _IDENTITY.get(pid)
    if me is None:
        me = Holder(
            host=socket.gethostname(),
            machine=_read("/etc/machine-id") or _read("/var/lib/dbus/machine-id") or "",
            boot=_boot_id(),
            pidns=_pid_namespace(),
            pid=pid,
            started=process_start(pid) or 0,
            session_id="",
        )
        _IDENTITY.clear()
        _IDENTITY[pid] = me
    return replace(me, session_id=session_id) if session_id else me


ME = current_holder()


def process_verdict(holder: Holder, me: Holder = ME) -> str | None:
    """Why *holder* is certainly dead, judged by asking the process itself —
    or None when it may be alive, or when its process can't be seen from
    here (another kernel or PID namespace: then only the heartbeat tells)."""
    if holder.boot != me.boot or holder.pidns != me.pidns:
        return None
    if holder.pid == me.pid and holder.started == me.started:
        # Our own claim, yet we are asking: a run of ours that never ended
        # (its record failed and the claim was dropped in memory).
        return f"its run in this kernel (pid {holder.pid}) did not finish"
    started = process_start(holder.pid)
    if started is None:
        return f"process {holder.pid} on {holder.host} is gone"
    if started >= 0 and started != holder.started:
        return f"process {holder.pid} on {holder.host} was replaced (pid reused)"
    return None


def session_verdict(holder: Holder, me: Holder = ME) -> str | None:
    """Why the process that opened a session is certainly gone, or None.
    Unlike a claim's, a session of this very process is alive (another
    store, or another connection, of this kernel)."""
    if (holder.boot, holder.pidns, holder.pid, holder.started) == (me.boot, me.pidns, me.pid, me.started):
        return None
    return process_verdict(holder, me)


class Watch:
    """A waiter's view of one holder: when its heartbeat was last seen to
    move, on this process's monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._seen: tuple[str, int, int] | None = None
        self._since = 0.0

    def verdict(self, claim: Claim) -> str | None:
        """Why the holder of *claim* is dead, or None while it may be alive."""
        dead = process_verdict(claim.holder)
        if dead is not None:
            return dead
        if claim.silent_s is not None and claim.silent_s > claim.lease_s:
            return (
                f"no heartbeat from {claim.holder.describe()} for {claim.silent_s:.0f}s "
                f"(lease {claim.lease_s:.0f}s, by the store's clock)"
            )
        now = self._clock()
        seen = (claim.state_id, claim.token, claim.beat)
        if seen != self._seen:
            self._seen, self._since = seen, now
            return None
        silent = now - self._since
        if silent > claim.lease_s:
            return f"no heartbeat from {claim.holder.describe()} for {silent:.0f}s (lease {claim.lease_s:.0f}s)"
        return None


class Heartbeat:
    """Renews this process's claims while their cells run.

    A daemon thread beats every third of the shortest lease through the
    backend's :class:`~rssd_magic.store.base.Renewer` (a connection of
    its own).  :meth:`release` must be called on every path out of a run —
    after its end is recorded, and also when recording it failed: then the
    claim stays in the store but stops beating, and other kernels take it
    over once the lease lapses, instead of waiting as long as this kernel
    lives.
    """

    def __init__(self, open_renewer: Callable[[], Renewer]):
        self._open = open_renewer
        self._held: dict[str, tuple[int, float]] = {}  # state_id -> (token, lease)
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._wakes_at = 0.0  # when the thread's current wait ends (monotonic)

    def hold(self, state_id: str, token: int, lease_s: float) -> None:
        with self._lock:
            idle = not self._held
            self._held[state_id] = (token, lease_s)
            self._lost.discard(state_id)
            if self._thread is None:
                self._stopped = False
                self._wake = threading.Event()
                self._thread = threading.Thread(target=self._run, name="rssd-magic-heartbeat", daemon=True)
                self._thread.start()
            elif idle and time.monotonic() + lease_s / 3 < self._wakes_at:
                # Idling on a wait that ends too late for this claim's lease.
                # (Otherwise the thread is not woken: each wake-up costs the
                # cell a GIL hand-off; its first beat then comes within two
                # thirds of the lease, before any waiter can call it dead.)
                self._wake.set()

    def release(self, state_id: str) -> None:
        with self._lock:
            self._held.pop(state_id, None)

    def holds(self, state_id: str) -> bool:
        with self._lock:
            return state_id in self._held

    def lost(self, state_id: str) -> bool:
        """True once a beat found the claim taken over by another kernel."""
        with self._lock:
            return state_id in self._lost

    def stop(self) -> None:
        """Drop every claim and let the thread close its connection."""
        with self._lock:
            self._held.clear()
            self._stopped = True
            self._wake.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        renewer = None
        try:
            while True:
                with self._lock:
                    if self._stopped:
                        self._thread = None
                        return
                    idle = not self._held
                    interval = IDLE_S if idle else min(lease for _, lease in self._held.values()) / 3
                    self._wake.clear()
                    self._wakes_at = time.monotonic() + interval
                woke = self._wake.wait(interval)
                if idle or woke:
                    with self._lock:
                        # Checked under the lock, so hold() either sees this
                        # thread running or starts a new one.  An idle thread
                        # lingers (a notebook runs cells one after another:
                        # a thread per cell cost more than the cell's claim).
                        if not self._held and not woke:
                            self._thread = None
                            return
                    continue
                with self._lock:
                    held = {sid: token for sid, (token, _) in self._held.items()}
                if not held:
                    continue
                try:
                    if renewer is None:
                        renewer = self._open()
                    gone = renewer.renew(held)
                except Exception:  # noqa: BLE001 - busy or unreachable: the next beat will try again
                    continue
                if gone:
                    with self._lock:
                        for sid in gone & set(self._held):
                            self._lost.add(sid)
                            self._held.pop(sid, None)
        finally:
            if renewer is not None:
                try:
                    renewer.close()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass


def close_orphaned_sessions(backend: Any) -> list[str]:
    """Finish, as failed, the sessions that kernels killed on this machine
    left open (their process is certainly gone), through *backend*'s
    ``open_sessions`` and ``end_session``; returns their ids.  Sessions of
    other machines are left: only their own machine can tell.  (An RSSD's
    housekeeper does the same on its own connection: sqlite_sessions.py.)"""
    closed = []
    # Only this boot's sessions can be judged here (process_verdict): the
    # store picks them, so the sessions other machines' killed kernels left
    # open, which pile up where they are never closed, cost no start here.
    for session_id, holder in backend.open_sessions(ME.boot):
        if session_id == backend.session_id:
            continue
        try:
            dead = session_verdict(Holder(**holder))
        except TypeError:
            continue  # written by another version: not ours to judge
        if dead and backend.end_session(session_id, failed=True, reason=f"kernel gone: {dead}"):
            closed.append(session_id)
    return closed
