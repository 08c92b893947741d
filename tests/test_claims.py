"""Claims between real processes: exactly one runs, the others wait and get
its result; dead holders are taken over; waits are bounded."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from rssd_magic.acquire import HolderFailed, WaitTimeout, acquire
from rssd_magic.claims import process_started
from rssd_magic.keys import cell_key
from rssd_magic.store import Store

KEY = cell_key("slow()", "claims-test")
#: The history of a cell whose first holder died and was taken over.
TAKEOVER = [("INITIAL", "RUNNING"), ("RUNNING", "ABANDONED"), ("ABANDONED", "RUNNING"), ("RUNNING", "EXECUTED")]

# A racer: open the RSSD, acquire the cell, "run" it (append to a file, sleep),
# record EXECUTED, print what happened.
RACER = textwrap.dedent(
    """
    import sys, time
    from rssd_magic.acquire import acquire
    from rssd_magic.keys import cell_key
    from rssd_magic.store import Store
    db, log, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    store = Store.open(db, {"racer": True})
    outcome = acquire(store, cell_key("slow()", "claims-test"), "slow()", {})
    if outcome.kind == "run":
        with open(log, "a") as fh:
            fh.write("ran\\n")
        time.sleep(hold)
        if sys.argv[4:] == ["die"]:
            import os; os._exit(9)  # like SIGKILL: no finish, no cleanup
        store.finish_run(outcome.running, "EXECUTED", {"names": {}}, "completed")
    print(outcome.kind, flush=True)
    store.close()
    """
)


def racer(db, log, hold=0.0, *extra):
    return subprocess.Popen(
        [sys.executable, "-c", RACER, str(db), str(log), str(hold), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def until(condition, timeout=20.0) -> bool:
    """Poll *condition* until it holds or *timeout* seconds pass."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


def states(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT from_state, to_state FROM orchestration_session_state ORDER BY orchestration_session_state_id"
        ).fetchall()
    finally:
        conn.close()


def test_six_processes_race_exactly_one_runs_the_others_replay(tmp_path):
    db, log = tmp_path / "r.db", tmp_path / "ran.log"
    procs = [racer(db, log, 1.0) for _ in range(6)]
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    kinds = sorted(out.strip() for out, _ in results)
    assert kinds == ["done"] * 5 + ["run"]
    assert log.read_text() == "ran\n"
    assert states(db) == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT count(*) FROM rssd_magic_claim").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM orchestration_session").fetchone() == (6,)


def test_holder_killed_mid_run_is_taken_over_at_once(tmp_path):
    db, log = tmp_path / "k.db", tmp_path / "ran.log"
    victim = racer(db, log, 30.0)
    assert until(log.exists), victim.communicate(timeout=5)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)

    store = Store.open(db, {"test": True})
    t0 = time.monotonic()
    outcome = acquire(store, KEY, "slow()", {}, wait_s=5)
    took = time.monotonic() - t0
    assert outcome.kind == "run" and outcome.abandoned is not None
    assert "is gone" in outcome.abandoned.reason
    assert took < 2.0
    store.finish_run(outcome.running, "EXECUTED", {"names": {}}, "completed")
    store.close()
    assert states(db) == TAKEOVER
    third = racer(db, log)
    assert third.communicate(timeout=30)[0].strip() == "done"


def test_unreaped_zombie_holder_counts_as_dead(tmp_path):
    db, log = tmp_path / "z.db", tmp_path / "ran.log"
    zombie = racer(db, log, 0.0, "die")  # exits without finishing; we don't reap it yet
    assert until(lambda: process_started(zombie.pid) is None), "an exited, unreaped child must read as dead"
    assert os.path.exists(f"/proc/{zombie.pid}"), "still a zombie: the test must not have reaped it"
    store = Store.open(db, {"test": True})
    outcome = acquire(store, KEY, "slow()", {}, wait_s=2)
    assert outcome.kind == "run" and outcome.abandoned is not None
    store.close()
    zombie.wait()


def _fake_claim(db, host, pid, pid_started, heartbeat_age, lease=60.0):
    """Record a RUNNING claim as another kernel would have."""
    store = Store.open(db, {"fake": True})
    outcome = store.claim(KEY, "slow()", {})
    store.conn.execute(
        "UPDATE rssd_magic_claim SET host = ?, pid = ?, pid_started = ?, heartbeat_at = ?, lease_s = ?",
        (host, pid, pid_started, time.time() - heartbeat_age, lease),
    )
    store._beat.stop()
    store.conn.close()  # vanish without finishing, like a lost machine
    store.conn = None
    return outcome.running


def test_lapsed_lease_of_another_host_is_taken_over(tmp_path):
    db = tmp_path / "h.db"
    _fake_claim(db, "far-away-host", 4242, 1.0, heartbeat_age=120, lease=60)
    store = Store.open(db, {"test": True})
    outcome = acquire(store, KEY, "slow()", {}, wait_s=1)
    assert outcome.kind == "run"
    assert "lease of far-away-host (pid 4242) lapsed" in outcome.abandoned.reason
    store.close()


def test_live_lease_of_another_host_is_waited_for_then_bounded(tmp_path):
    db = tmp_path / "w.db"
    _fake_claim(db, "far-away-host", 4242, 1.0, heartbeat_age=0, lease=600)
    store = Store.open(db, {"test": True})
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match="still being run by host far-away-host, pid 4242"):
        acquire(store, KEY, "slow()", {}, wait_s=1)
    assert 0.9 < time.monotonic() - t0 < 3
    store.close()


def test_waiter_replays_right_after_the_holder_commits(tmp_path):
    db, log = tmp_path / "c.db", tmp_path / "ran.log"
    holder = racer(db, log, 1.5)
    assert until(log.exists)
    store = Store.open(db, {"test": True})
    seen = []
    outcome = acquire(store, KEY, "slow()", {}, on_wait=lambda h, waited: seen.append((h.pid, waited)))
    assert outcome.kind == "done"
    assert seen and seen[0][0] == holder.pid
    holder.wait(timeout=30)
    store.close()


@pytest.fixture
def sleeper():
    """A live process on this host to stand for another kernel."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_waiter_reports_the_holders_failure_and_does_not_run(tmp_path, sleeper):
    db = tmp_path / "f.db"
    other = Store.open(db, {"holder": True})
    running = other.claim(KEY, "slow()", {}).running
    other.conn.execute(
        "UPDATE rssd_magic_claim SET pid = ?, pid_started = ?", (sleeper.pid, process_started(sleeper.pid))
    )
    store = Store.open(db, {"test": True})

    def fail_soon(holder, waited):
        assert holder.pid == sleeper.pid
        if waited > 0.2 and other.conn is not None:
            other.finish_run(running, "FAILED", {"error": {}}, "ValueError: boom")
            other.close()

    with pytest.raises(HolderFailed, match="ended FAILED: ValueError: boom"):
        acquire(store, KEY, "slow()", {}, on_wait=fail_soon)
    assert states(db)[-1] == ("RUNNING", "FAILED")
    store.close()


def test_heartbeat_renews_the_lease(tmp_path):
    db = tmp_path / "b.db"
    store = Store.open(db, {"test": True})
    store.claim(KEY, "slow()", {}, lease_s=0.3)
    read = lambda: sqlite3.connect(db).execute("SELECT heartbeat_at FROM rssd_magic_claim").fetchone()[0]  # noqa: E731
    first = read()
    time.sleep(0.5)
    assert read() > first
    store.close()


def test_magic_wait_option_gives_a_clear_error(kernel, sleeper):
    store = Store.open(kernel.db, {"fake": True})
    store.claim(cell_key("held = 1\n", "default"), "held = 1\n", {})
    store.conn.execute(
        "UPDATE rssd_magic_claim SET pid = ?, pid_started = ?", (sleeper.pid, process_started(sleeper.pid))
    )
    store._beat.stop()
    t0 = time.monotonic()
    ran = kernel.run("%%stateful --wait 1\nheld = 1\n")
    assert 0.9 < time.monotonic() - t0 < 3
    err = ran.result.error_in_exec
    assert type(err).__name__ == "StatefulRunError"
    assert f"pid {sleeper.pid}" in str(err) and socket.gethostname() in str(err)
    assert "Traceback" not in ran.stdout
    assert "held" not in kernel.shell.user_ns
    store.close()
