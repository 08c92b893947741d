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

from rssd_magic.engine.acquire import HolderFailed, WaitTimeout, acquire
from rssd_magic.store.base import ClaimRequest, Fenced
from rssd_magic.backends.sqlite import SqliteBackend
from rssd_magic.engine.claims import current_holder, process_start
from rssd_magic.engine.keys import cell_key

KEY = cell_key("slow()", "claims-test")


def request(backend, lease=60.0, **kw):
    """What a kernel asks when it wants to run the test cell."""
    return ClaimRequest(KEY, "slow()", {}, current_holder(backend.session_id or ""), lease, **kw)


def finish(backend, outcome, to_state="EXECUTED", result='{"names":{}}', reason="completed"):
    return backend.finish(outcome.running, outcome.claim.token, to_state, result, reason)
#: The history of a cell whose first holder died and was taken over.
TAKEOVER = [("INITIAL", "RUNNING"), ("RUNNING", "ABANDONED"), ("ABANDONED", "RUNNING"), ("RUNNING", "EXECUTED")]

# A racer: open the RSSD, acquire the cell, "run" it (append to a file, sleep),
# record EXECUTED, print what happened.
RACER = textwrap.dedent(
    """
    import sys, time
    from rssd_magic.engine.acquire import acquire
    from rssd_magic.backends import open_backend
    from rssd_magic.store.base import ClaimRequest
    from rssd_magic.engine.claims import current_holder
    from rssd_magic.engine.keys import cell_key
    db, log, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    store = open_backend(db, session_args={"racer": True})
    ask = ClaimRequest(cell_key("slow()", "claims-test"), "slow()", {}, current_holder(store.session_id), 60.0)
    outcome = acquire(store, ask)
    if outcome.kind == "run":
        with open(log, "a") as fh:
            fh.write("ran\\n")
        time.sleep(hold)
        if sys.argv[4:] == ["die"]:
            import os; os._exit(9)  # like SIGKILL: no finish, no cleanup
        store.finish(outcome.running, outcome.claim.token, "EXECUTED", '{"names":{}}', "completed")
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
        return conn.execute("SELECT from_state, to_state FROM orchestration_session_state WHERE session_entry_id IS NOT NULL ORDER BY rowid").fetchall()
    finally:
        conn.close()


def active_claims(db) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL").fetchone()[0]
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
    assert active_claims(db) == 0
    assert conn.execute("SELECT count(*) FROM orchestration_session").fetchone() == (6,)


def test_holder_killed_mid_run_is_taken_over_at_once(tmp_path):
    db, log = tmp_path / "k.db", tmp_path / "ran.log"
    victim = racer(db, log, 30.0)
    assert until(log.exists), victim.communicate(timeout=5)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)

    store = SqliteBackend.open(db, session_args={"test": True})
    t0 = time.monotonic()
    outcome = acquire(store, request(store), wait_s=5)
    took = time.monotonic() - t0
    assert outcome.kind == "run" and outcome.abandoned is not None
    assert "is gone" in outcome.abandoned.reason
    assert took < 2.0
    finish(store, outcome)
    store.close()
    assert states(db) == TAKEOVER
    third = racer(db, log)
    assert third.communicate(timeout=30)[0].strip() == "done"


def test_unreaped_zombie_holder_counts_as_dead(tmp_path):
    db, log = tmp_path / "z.db", tmp_path / "ran.log"
    zombie = racer(db, log, 0.0, "die")  # exits without finishing; we don't reap it yet
    assert until(lambda: process_start(zombie.pid) is None), "an exited, unreaped child must read as dead"
    assert os.path.exists(f"/proc/{zombie.pid}"), "still a zombie: the test must not have reaped it"
    store = SqliteBackend.open(db, session_args={"test": True})
    outcome = acquire(store, request(store), wait_s=2)
    assert outcome.kind == "run" and outcome.abandoned is not None
    store.close()
    zombie.wait()


def _fake_claim(db, host, boot="another-kernel", pid=4242, started=1, lease=60.0, claimed_at="2020-01-01 00:00:00"):
    """Record a RUNNING claim as a kernel on another machine would have:
    its own boot id, so its pid means nothing here, and its own clock."""
    store = SqliteBackend.open(db, session_args={"fake": True})
    outcome = store.claim(request(store, lease))
    store.conn.execute(
        "UPDATE rssd_magic_claim SET host = ?, boot = ?, pid = ?, started = ?, claimed_at = ?",
        (host, boot, pid, started, claimed_at),
    )
    store.conn.close()  # vanish without finishing, like a lost machine
    store.conn = None
    return outcome


def test_silent_holder_of_another_machine_is_taken_over_after_its_lease(tmp_path):
    db = tmp_path / "h.db"
    _fake_claim(db, "far-away-host", lease=0.5)
    store = SqliteBackend.open(db, session_args={"test": True})
    t0 = time.monotonic()
    outcome = acquire(store, request(store), wait_s=10)
    assert outcome.kind == "run"
    # Judged on this process's clock: silence is watched for a whole lease.
    assert 0.5 <= time.monotonic() - t0 < 3
    assert "no heartbeat from host far-away-host, pid 4242" in outcome.abandoned.reason
    store.close()


def test_an_old_timestamp_from_a_skewed_clock_is_not_a_lapsed_lease(tmp_path):
    # The holder's clock says it claimed the cell years ago; its lease is 10
    # minutes.  Only a heartbeat seen not to move for 10 minutes on *our*
    # clock would make it dead: waiting 1 s must end in WaitTimeout.
    db = tmp_path / "w.db"
    _fake_claim(db, "far-away-host", lease=600, claimed_at="2001-01-01 00:00:00")
    store = SqliteBackend.open(db, session_args={"test": True})
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match="still being run by host far-away-host, pid 4242"):
        acquire(store, request(store), wait_s=1)
    assert 0.9 < time.monotonic() - t0 < 3
    store.close()


def test_same_hostname_in_another_pid_namespace_is_not_judged_by_pid(tmp_path):
    # A container sharing the volume: same boot id (same kernel), same
    # hostname, but its pid 1 is not our pid 1.
    db = tmp_path / "ns.db"
    store = SqliteBackend.open(db, session_args={"fake": True})
    me = current_holder()
    store.claim(request(store, 600))
    store.conn.execute("UPDATE rssd_magic_claim SET pidns = 'pid:[1]', pid = 1, started = 5, boot = ?", (me.boot,))
    with pytest.raises(WaitTimeout):
        acquire(store, request(store), wait_s=0.5)
    store.close()


def test_a_stale_holder_cannot_record_after_a_takeover(tmp_path):
    db = tmp_path / "f.db"
    stale = SqliteBackend.open(db, session_args={"stale": True})
    first = stale.claim(request(stale, 600))
    other = SqliteBackend.open(db, session_args={"other": True})
    held = other.claim(request(other))
    assert held.kind == "held" and held.claim.token == first.claim.token
    # The other kernel judged the holder dead (as a lapsed lease would):
    second = other.claim(request(other, takeover=held.claim, dead_because="test says so"))
    assert second.kind == "run" and second.claim.token > first.claim.token
    with pytest.raises(Fenced, match=r"pid \d+"):
        finish(stale, first)
    finish(other, second)
    with pytest.raises(Fenced):
        finish(stale, first, "FAILED", None, "late")
    assert states(db) == TAKEOVER
    stale.close()
    other.close()


def test_a_takeover_of_a_claim_that_moved_on_is_refused(tmp_path):
    db = tmp_path / "m.db"
    holder = SqliteBackend.open(db, session_args={"holder": True})
    holder.claim(request(holder, 600))
    waiter = SqliteBackend.open(db, session_args={"waiter": True})
    seen = waiter.claim(request(waiter)).claim
    holder.renewer().renew({seen.state_id: seen.token})  # a heartbeat lands meanwhile
    again = waiter.claim(request(waiter, takeover=seen, dead_because="stale view"))
    assert again.kind == "held" and again.claim.beat == seen.beat + 1
    assert states(db) == [("INITIAL", "RUNNING")]
    holder.close()
    waiter.close()


@pytest.fixture
def sleeper():
    """A live process on this host to stand for another kernel."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_waiter_reports_the_holders_failure_and_does_not_run(tmp_path, sleeper):
    db = tmp_path / "hf.db"
    other = SqliteBackend.open(db, session_args={"holder": True})
    mine = other.claim(request(other))
    other.conn.execute("UPDATE rssd_magic_claim SET pid = ?, started = ?", (sleeper.pid, process_start(sleeper.pid)))
    store = SqliteBackend.open(db, session_args={"test": True})

    def fail_soon(holder, waited):
        assert holder.holder.pid == sleeper.pid
        if waited > 0.2 and other.conn is not None:
            finish(other, mine, "FAILED", '{"error":{}}', "ValueError: boom")
            other.close()

    with pytest.raises(HolderFailed, match="ended FAILED: ValueError: boom"):
        acquire(store, request(store), on_wait=fail_soon)
    assert states(db)[-1] == ("RUNNING", "FAILED")
    store.close()


def test_heartbeat_beats_while_held_and_stops_when_released(tmp_path):
    from rssd_magic.engine.claims import Heartbeat

    db = tmp_path / "b.db"
    store = SqliteBackend.open(db, session_args={"test": True})
    mine = store.claim(request(store, 0.3))
    beat = Heartbeat(store.renewer)
    beat.hold(mine.running.state_id, mine.claim.token, 0.3)
    read = lambda: sqlite3.connect(db).execute("SELECT beat FROM rssd_magic_claim").fetchone()[0]  # noqa: E731
    assert until(lambda: read() >= 2, timeout=5), "the beat counter grows while the run is held"
    beat.release(mine.running.state_id)
    time.sleep(0.3)
    stopped = read()
    time.sleep(0.5)
    assert read() == stopped, "a released claim no longer beats (others take it over after the lease)"
    beat.stop()
    store.close()


def test_magic_wait_option_gives_a_clear_error(kernel, sleeper):
    store = SqliteBackend.open(kernel.db, session_args={"fake": True})
    key = cell_key("held = 1\n", "default")
    store.claim(ClaimRequest(key, "held = 1\n", {}, current_holder(store.session_id), 60.0))
    store.conn.execute("UPDATE rssd_magic_claim SET pid = ?, started = ?", (sleeper.pid, process_start(sleeper.pid)))
    t0 = time.monotonic()
    ran = kernel.run("%%stateful --wait 1\nheld = 1\n")
    assert 0.9 < time.monotonic() - t0 < 3
    err = ran.result.error_in_exec
    assert type(err).__name__ == "StatefulRunError"
    assert f"pid {sleeper.pid}" in str(err) and socket.gethostname() in str(err)
    assert "Traceback" not in ran.stdout
    assert "held" not in kernel.shell.user_ns
    store.close()
