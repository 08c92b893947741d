"""Kernel tier, concurrency: several real Jupyter kernels (each its own
process) share one RSSD.  At most once must hold across them, waiters must
replay the holder's result soon after it commits, a SIGKILLed holder must be
taken over at once, and ``--wait`` must bound a wait with a clear error.

Timings are printed (run with ``-s`` to see them) and asserted only loosely:
they describe the machine as much as the code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from ulid import ULID

from kernel_util import (
    KERNEL_NAME,
    banners,
    check_rssd,
    errors_of,
    execute,
    plain_traceback,
    query,
    text_of,
    transitions,
)

pytestmark = pytest.mark.kernel

LOAD = "%load_ext rssd_magic"
#: The history of a cell whose first holder died and was taken over.
TAKEOVER = [("INITIAL", "RUNNING"), ("RUNNING", "ABANDONED"), ("ABANDONED", "RUNNING"), ("RUNNING", "EXECUTED")]
DEFAULT_DB = "resource-surveillance.sqlite.db"
ENV_RSSD = "SURVEILR_STATEDB_FS_PATH"
HOST = socket.gethostname()


@pytest.fixture(autouse=True)
def _default_rssd(monkeypatch):
    """Every kernel uses ./resource-surveillance.sqlite.db of its cwd."""
    monkeypatch.delenv(ENV_RSSD, raising=False)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def is_status(output: dict) -> bool:
    meta = output.get("metadata") or {}
    return bool(isinstance(meta, dict) and (meta.get("rssd_magic") or {}).get("status"))


def statuses(cell) -> list[dict]:
    return [o for o in cell.get("outputs", []) if is_status(o)]


def cell_seconds(cell) -> float:
    """Kernel-side duration of a cell: execute_input to execute_reply."""
    ex = cell.metadata["execution"]
    start = _ts(ex["iopub.execute_input"])
    end = _ts(ex["shell.execute_reply"])
    return end - start


def _ts(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def pairs(db: Path) -> list[tuple[str, str]]:
    return [(f, t) for _, f, t, _ in transitions(db)]


def executed_ids(db: Path) -> list[str]:
    return [
        sid
        for (sid,) in query(
            db,
            "SELECT orchestration_session_state_id FROM orchestration_session_state "
            "WHERE to_state = 'EXECUTED' ORDER BY rowid",
        )
    ]


def assert_never_locked(nb) -> None:
    dumped = json.dumps(nb)
    assert "database is locked" not in dumped.lower()
    assert "database table is locked" not in dumped.lower()


class HeldKernel:
    """A kernel started with jupyter_client's KernelManager, so the test knows
    its pid and can run a cell without waiting for it, interrupt or kill it."""

    def __init__(self, cwd: Path):
        self.closed = False
        self.km = KernelManager(kernel_name=KERNEL_NAME)
        self.km.start_kernel(cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.pid = self.km.provisioner.pid
        assert self.pid == self.km.provisioner.process.pid

    def run(self, code: str, timeout: float = 30) -> dict:
        """Run *code* to the end; the execute_reply content."""
        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=lambda msg: None)
        return reply["content"]

    def start(self, code: str) -> str:
        """Send *code* and return at once (the msg_id, for reply())."""
        return self.kc.execute(code)

    def reply(self, msg_id: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]

    def close(self, now: bool = False) -> None:
        """Shut down (cleanly unless *now*) and reap the process; idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.kc.stop_channels()
        finally:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=now)


def wait_for_lines(path: Path, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(lines(path)) < n:
        assert time.monotonic() < deadline, f"{path.name} never got {n} line(s): {lines(path)}"
        time.sleep(0.02)


# -- 1. six kernels race for one cell -----------------------------------------

N_KERNELS = 6

# All kernels reach the %%stateful cell together: each marks itself ready and
# waits for the others (kernel start-up on a small machine is spread over
# seconds, longer than the cell itself).
BARRIER = f"""import os, time
open(f"ready-{{os.getpid()}}", "w").close()
_deadline = time.time() + 45
while sum(f.startswith("ready-") for f in os.listdir(".")) < {N_KERNELS} and time.time() < _deadline:
    time.sleep(0.01)
print("ready", sum(f.startswith("ready-") for f in os.listdir(".")))
"""

RACE_CELL = """%%stateful
import os, time
with open("race.log", "a") as fh:
    fh.write(f"ran in {os.getpid()}\\n")
del fh
race_winner = os.getpid()
print("stateful body ran in", race_winner, flush=True)
time.sleep(2)
"""

CLOCK = "import time\nprint(repr(time.time()))"
USE_NAME = "print('winner was', race_winner)"


def run_race(tmp_path: Path) -> list:
    """N_KERNELS kernels run the race cells at once; their notebooks."""
    cells = [LOAD, BARRIER, RACE_CELL, CLOCK, USE_NAME]
    with ThreadPoolExecutor(max_workers=N_KERNELS) as pool:
        return list(pool.map(lambda _: execute(cells, tmp_path, allow_errors=True), range(N_KERNELS)))


def check_race(nbs: list, tmp_path: Path) -> list:
    """What every backend must show after :func:`run_race`: the body ran
    once, in one kernel; every kernel shows its output and binds its name;
    the others each replayed with one banner and one live status line, last
    saying it replays.  Returns the waiters' notebooks."""
    for nb in nbs:
        assert [errors_of(c) for c in nb.cells] == [[]] * len(nb.cells), [
            plain_traceback(e) for c in nb.cells for e in errors_of(c)
        ]
        assert text_of(nb.cells[1]) == f"ready {N_KERNELS}\n", "the barrier let every kernel through together"
    (ran,) = lines(tmp_path / "race.log")
    winner = int(ran.split()[-1])
    for nb in nbs:
        assert text_of(nb.cells[2], "stdout") == f"stateful body ran in {winner}\n"
        assert text_of(nb.cells[4]) == f"winner was {winner}\n"
    holders = [nb for nb in nbs if not banners(nb.cells[2])]
    waiters = [nb for nb in nbs if banners(nb.cells[2])]
    assert len(holders) == 1 and len(waiters) == N_KERNELS - 1
    assert all(len(banners(nb.cells[2])) == 1 for nb in waiters)
    assert statuses(holders[0].cells[2]) == []
    for nb in waiters:
        (status,) = statuses(nb.cells[2])
        assert status["data"]["text/plain"] == "[stateful] the other kernel finished; replaying its result"
    return waiters


def replay_delays(waiters: list, executed_id: str) -> list[float]:
    """Seconds from the EXECUTED row's ULID time (taken just before the
    commit) to each waiter's clock cell right after its replay (an upper
    bound: it includes the replay, the reply and nbclient's next request)."""
    committed = ULID.from_str(executed_id).milliseconds / 1000
    return sorted(float(text_of(nb.cells[3])) - committed for nb in waiters)


def test_six_kernels_race_one_runs_five_replay(tmp_path):
    started = time.monotonic()
    nbs = run_race(tmp_path)
    wall = time.monotonic() - started
    db = tmp_path / DEFAULT_DB
    for nb in nbs:
        assert_never_locked(nb)
    waiters = check_race(nbs, tmp_path)

    # The RSSD: sound, one run recorded, six kernel sessions, no claim left.
    check_rssd(db)
    assert pairs(db) == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]
    assert query(db, "SELECT count(*) FROM orchestration_session") == [(N_KERNELS,)]
    assert query(db, "SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)]

    # Replay delay per waiter, to the clock cell and (a tighter bound) to the
    # replayed cell's own execute_reply.
    (executed_id,) = executed_ids(db)
    committed = ULID.from_str(executed_id).milliseconds / 1000
    via_clock = replay_delays(waiters, executed_id)
    via_reply = sorted(_ts(nb.cells[2].metadata["execution"]["shell.execute_reply"]) - committed for nb in waiters)
    print(
        f"\n[concurrency] {N_KERNELS} kernels, wall {wall:.1f}s; waiter replay delay after the EXECUTED commit:\n"
        f"[concurrency]   clock cell  : median {statistics.median(via_clock) * 1000:.0f} ms, "
        f"max {max(via_clock) * 1000:.0f} ms  {[round(d * 1000) for d in via_clock]}\n"
        f"[concurrency]   execute_reply: median {statistics.median(via_reply) * 1000:.0f} ms, "
        f"max {max(via_reply) * 1000:.0f} ms  {[round(d * 1000) for d in via_reply]}"
    )
    assert all(-0.05 < d < 5 for d in via_clock), via_clock


# -- 2. a SIGKILLed holder is taken over --------------------------------------

# The same code, hence the same key, in every kernel; how long it sleeps is
# read from a file, so the run after the kill can be short.
SLEEPY_CELL = """%%stateful
import os, time
with open("takeover.log", "a") as fh:
    fh.write(f"{os.getpid()}\\n")
del fh
time.sleep(float(open("sleep.txt").read()))
ran_in = os.getpid()
print("finished in", ran_in)
"""


def test_sigkilled_holder_is_taken_over_at_once(tmp_path):
    log, db = tmp_path / "takeover.log", tmp_path / DEFAULT_DB
    (tmp_path / "sleep.txt").write_text("60")
    victim = HeldKernel(tmp_path)
    try:
        assert victim.run(LOAD)["status"] == "ok"
        victim.start(SLEEPY_CELL)
        wait_for_lines(log, 1)
        assert lines(log) == [str(victim.pid)], "the provisioner's pid is the kernel's"
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.close(now=True)  # reaps the killed process, frees ports and files
    assert not victim.km.has_kernel

    (tmp_path / "sleep.txt").write_text("0.1")
    cells = [LOAD, SLEEPY_CELL, "print('ran_in', ran_in)"]
    started = time.monotonic()
    second = execute(cells, tmp_path, timeout=30)
    wall = time.monotonic() - started
    takeover_s = cell_seconds(second.cells[1])
    print(f"\n[concurrency] takeover after SIGKILL: cell {takeover_s * 1000:.0f} ms "
          f"(of which 100 ms is the body's sleep); whole notebook incl. kernel start {wall:.1f}s")

    cell = second.cells[1]
    assert banners(cell) == [] and statuses(cell) == [], "it ran, it did not wait"
    note = text_of(cell, "stdout")
    assert "took over" in note and f"process {victim.pid} on {HOST} is gone" in note, note
    assert text_of(cell, "stderr") == "", "a takeover is news, not an error"
    second_pid = int(lines(log)[1])
    assert note.endswith(f"\nfinished in {second_pid}\n")
    assert text_of(second.cells[2]) == f"ran_in {second_pid}\n"
    assert takeover_s < 5, takeover_s
    assert len(lines(log)) == 2
    assert_never_locked(second)

    check_rssd(db)
    assert pairs(db) == TAKEOVER
    assert len(executed_ids(db)) == 1
    (reason,) = query(db, "SELECT transition_reason FROM orchestration_session_state WHERE to_state = 'ABANDONED'")
    assert str(victim.pid) in reason[0]
    assert query(db, "SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)]

    # A third kernel replays the takeover's result.
    third = execute(cells, tmp_path)
    assert len(banners(third.cells[1])) == 1
    assert text_of(third.cells[1], "stdout") == f"finished in {second_pid}\n"
    assert text_of(third.cells[2]) == f"ran_in {second_pid}\n"
    assert len(lines(log)) == 2
    assert len(pairs(db)) == 4


# -- 3. --wait bounds the wait ------------------------------------------------

HELD_BODY = """import time
with open("held.log", "a") as fh:
    fh.write("ran\\n")
del fh
time.sleep(30)
"""


def test_wait_option_gives_up_with_the_holders_host_and_pid(tmp_path):
    log, db = tmp_path / "held.log", tmp_path / DEFAULT_DB
    holder = HeldKernel(tmp_path)
    try:
        assert holder.run(LOAD)["status"] == "ok"
        running = holder.start("%%stateful\n" + HELD_BODY)
        wait_for_lines(log, 1)

        waiter = execute([LOAD, "%%stateful --wait 1\n" + HELD_BODY, "print('after')"], tmp_path, allow_errors=True)
        cell = waiter.cells[1]
        (err,) = errors_of(cell)
        assert err["ename"] == "StatefulRunError"
        assert err["evalue"].startswith("gave up after waiting 1.")
        assert f"the cell is still being run by host {HOST}, pid {holder.pid}, since " in err["evalue"]
        assert err["evalue"].endswith(" UTC")
        assert "Traceback" not in plain_traceback(err), "one line, no traceback"
        (status,) = statuses(cell)
        assert status["data"]["text/plain"] == f"[stateful] {err['evalue']}"
        assert 1.0 <= cell_seconds(cell) < 5
        assert text_of(waiter.cells[2]) == "after\n"
        assert lines(log) == ["ran"], "the waiter did not run the body"
        assert_never_locked(waiter)

        # Stop the holder cleanly: interrupt its cell, then shut it down.
        holder.km.interrupt_kernel()
        reply = holder.reply(running)
        assert (reply["status"], reply.get("ename")) == ("error", "KeyboardInterrupt")
    finally:
        holder.close()

    check_rssd(db)
    assert pairs(db) == [("INITIAL", "RUNNING"), ("RUNNING", "INTERRUPTED")]
    assert query(db, "SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)]
    finished = query(db, "SELECT orch_finished_at FROM orchestration_session")
    assert len(finished) == 2 and all(f is not None for (f,) in finished), finished


# -- 4. the holder dies while kernels wait for it -----------------------------


@pytest.fixture(scope="module")
def killed_while_waiting(tmp_path_factory):
    """A holder is SIGKILLed while two other kernels wait for its cell: one
    of them must take over, the other must wait for that run and replay it.
    Module-scoped: two tests look at the same (costly) run."""
    tmp = tmp_path_factory.mktemp("killed-while-waiting")
    db = tmp / DEFAULT_DB
    (tmp / "sleep.txt").write_text("60")
    cells = [LOAD, SLEEPY_CELL, "print('ran_in', ran_in)"]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ENV_RSSD, raising=False)
        victim = HeldKernel(tmp)
        try:
            assert victim.run(LOAD)["status"] == "ok"
            victim.start(SLEEPY_CELL)
            wait_for_lines(tmp / "takeover.log", 1)
            (tmp / "sleep.txt").write_text("0.5")
            with ThreadPoolExecutor(max_workers=2) as pool:
                futures = [pool.submit(execute, cells, tmp, allow_errors=True) for _ in range(2)]
                # Both waiters have opened the RSSD (one session row each) and
                # are then in their poll loop.
                deadline = time.monotonic() + 30
                while query(db, "SELECT count(*) FROM orchestration_session") != [(3,)]:
                    assert time.monotonic() < deadline, "the waiters never opened the RSSD"
                    time.sleep(0.02)
                time.sleep(1.5)  # the scenario, not a synchronization: the holder dies while they wait
                killed = time.monotonic()
                os.kill(victim.pid, signal.SIGKILL)
                victim.close(now=True)
                nbs = [f.result() for f in futures]
                after_kill = time.monotonic() - killed
        finally:
            victim.close(now=True)
    return {"tmp": tmp, "db": db, "nbs": nbs, "victim_pid": victim.pid, "after_kill": after_kill}


def test_holder_killed_while_two_kernels_wait_one_takes_over(killed_while_waiting):
    run = killed_while_waiting
    tmp, db, nbs = run["tmp"], run["db"], run["nbs"]
    print(f"\n[concurrency] holder killed under 2 waiters: both done {run['after_kill']:.2f}s after the kill "
          f"(the takeover's body sleeps 0.5s)")
    for nb in nbs:
        assert_never_locked(nb)
        assert [errors_of(c) for c in nb.cells] == [[], [], []]
    log = lines(tmp / "takeover.log")
    assert len(log) == 2 and log[0] == str(run["victim_pid"])
    taker_pid = int(log[1])
    takers = [nb for nb in nbs if "took over" in text_of(nb.cells[1], "stdout")]
    replayers = [nb for nb in nbs if banners(nb.cells[1])]
    assert len(takers) == 1 and len(replayers) == 1 and takers[0] is not replayers[0]
    assert banners(takers[0].cells[1]) == []
    assert f"process {run['victim_pid']} on {HOST} is gone" in text_of(takers[0].cells[1], "stdout")
    assert text_of(replayers[0].cells[1], "stderr") == ""
    (status,) = statuses(replayers[0].cells[1])
    assert status["data"]["text/plain"] == "[stateful] the other kernel finished; replaying its result"
    for nb in nbs:
        assert text_of(nb.cells[1], "stdout").endswith(f"finished in {taker_pid}\n")
        assert text_of(nb.cells[2]) == f"ran_in {taker_pid}\n"
    assert run["after_kill"] < 10
    check_rssd(db)
    assert pairs(db) == TAKEOVER
    assert query(db, "SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)]


def test_taker_status_line_does_not_still_say_waiting(killed_while_waiting):
    (taker,) = [nb for nb in killed_while_waiting["nbs"] if "took over" in text_of(nb.cells[1], "stdout")]
    shown = [s["data"]["text/plain"] for s in statuses(taker.cells[1])]
    assert shown, "the taker did wait, so it showed a status line"
    assert not any("waiting" in text and "to finish this cell" in text for text in shown), shown
