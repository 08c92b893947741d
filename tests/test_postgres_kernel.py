"""Kernel tier on PostgreSQL: real Jupyter kernels (each its own process)
share one schema of the test server (``RSSD_MAGIC_DB``, as a team would set
it).  At most once must hold across them, a SIGKILLed holder must be taken
over, a holder stopped past its lease must not record, and an export must
replay in a fresh kernel that only has the file.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

import pg_util
from kernel_util import banners, check_rssd, execute, strip_volatile, text_of
from pg_util import raw
from test_kernel_concurrency import (
    HOST,
    LOAD,
    N_KERNELS,
    SLEEPY_CELL,
    TAKEOVER,
    HeldKernel,
    check_race,
    lines,
    replay_delays,
    run_race,
    wait_for_lines,
)

pytestmark = pytest.mark.kernel



@pytest.fixture
def url(pg_server, monkeypatch, tmp_path):
    """A fresh schema, given to every kernel the test starts through
    ``RSSD_MAGIC_DB`` (kernels inherit the environment)."""
    where = pg_util.fresh_url("kernel")
    monkeypatch.setenv("RSSD_MAGIC_DB", where)
    monkeypatch.delenv("SURVEILR_STATEDB_FS_PATH", raising=False)
    yield where
    assert not (tmp_path / "resource-surveillance.sqlite.db").exists(), "no RSSD file beside the notebooks"


def pairs(url: str) -> list[tuple[str, str]]:
    return [tuple(r) for r in raw(url, """SELECT s.from_state, s.to_state FROM orchestration_session_state AS s
                                          JOIN rssd_magic_state_seq AS q ON q.state_id = s.orchestration_session_state_id
                                          WHERE s.session_entry_id IS NOT NULL ORDER BY q.seq""")]  # fmt: skip


def executed(url: str) -> list[str]:
    return [r[0] for r in raw(url, "SELECT orchestration_session_state_id FROM orchestration_session_state WHERE to_state = 'EXECUTED'")]


def test_six_kernels_race_one_runs_and_all_show_its_output(url, tmp_path):
    waiters = check_race(run_race(tmp_path), tmp_path)
    assert pairs(url) == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]
    assert raw(url, "SELECT count(*) FROM orchestration_session") == [(N_KERNELS,)]
    assert raw(url, "SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)]
    (executed_id,) = executed(url)
    delays = replay_delays(waiters, executed_id)
    print(f"\n[postgres] {N_KERNELS} kernels: waiter replay after the EXECUTED commit (clock cell): "
          f"median {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms")  # fmt: skip
    assert all(-0.05 < d < 5 for d in delays), delays


def test_a_sigkilled_holder_is_taken_over_with_one_executed(url, tmp_path):
    log = tmp_path / "takeover.log"
    (tmp_path / "sleep.txt").write_text("60")
    victim = HeldKernel(tmp_path)
    try:
        assert victim.run(LOAD)["status"] == "ok"
        victim.start(SLEEPY_CELL)
        wait_for_lines(log, 1)
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
    finally:
        victim.close(now=True)
    (tmp_path / "sleep.txt").write_text("0.1")
    second = execute([LOAD, SLEEPY_CELL, "print('ran_in', ran_in)"], tmp_path, timeout=60)
    taken_over_in = time.monotonic() - killed
    note = text_of(second.cells[1], "stdout")
    assert "took over" in note and f"process {victim.pid} on {HOST} is gone" in note, note
    second_pid = int(lines(log)[1])
    assert text_of(second.cells[2]) == f"ran_in {second_pid}\n"
    assert taken_over_in < 45, taken_over_in
    assert pairs(url) == TAKEOVER and len(executed(url)) == 1
    (reason,) = raw(url, "SELECT transition_reason FROM orchestration_session_state WHERE to_state = 'ABANDONED'")
    assert str(victim.pid) in reason[0]
    print(f"\n[postgres] SIGKILLed holder taken over; done {taken_over_in:.1f}s after the kill (incl. kernel start)")


def _iopub_text(kernel: HeldKernel, msg_id: str, timeout: float = 30) -> str:
    """What the cell *msg_id* printed (stdout and stderr), once it is idle."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kernel.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)
    raise AssertionError(f"cell {msg_id} never went idle: {''.join(out)!r}")


LEASE = "%config StatefulMagics.lease_seconds = 3"


def test_a_holder_stopped_past_its_lease_is_taken_over_and_can_not_record(url, tmp_path):
    log = tmp_path / "takeover.log"
    (tmp_path / "sleep.txt").write_text("4")
    holder = HeldKernel(tmp_path)
    try:
        assert holder.run(LOAD)["status"] == "ok" and holder.run(LEASE)["status"] == "ok"
        running = holder.start(SLEEPY_CELL)
        wait_for_lines(log, 1)
        os.kill(holder.pid, signal.SIGSTOP)  # alive, but silent: only the heartbeat can tell
        try:
            (tmp_path / "sleep.txt").write_text("0.1")
            started = time.monotonic()
            waiter = execute([LOAD, LEASE, SLEEPY_CELL, "print('ran_in', ran_in)"], tmp_path, timeout=60)
            waited = time.monotonic() - started
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        note = text_of(waiter.cells[2], "stdout")
        assert "took over" in note and "no heartbeat from" in note, note
        taker = int(lines(log)[1])
        assert text_of(waiter.cells[3]) == f"ran_in {taker}\n"
        # The stale holder wakes up, finishes its body and is refused.
        shown = _iopub_text(holder, running)
        assert holder.reply(running)["status"] == "ok"
        assert f"finished in {holder.pid}" in shown, "its output stays"
        assert "this run was taken over by" in shown and "its result was not recorded" in shown, shown
    finally:
        holder.close()
    assert pairs(url) == TAKEOVER, "the stale holder wrote nothing"
    (end,) = raw(url, "SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED'")
    assert f'"finished in {taker}' in end[0]
    print(f"\n[postgres] stopped holder (lease 3 s) taken over; the waiter's notebook took {waited:.1f}s")


def test_an_export_replays_in_a_fresh_kernel_that_only_has_the_file(url, tmp_path, monkeypatch):
    cells = [LOAD, "%%stateful --scope team\nimport numpy as np\nprint('computed once')\nweights = np.linspace(0, 1, 11)\nweights.sum()",
             "print(weights[-1])"]  # fmt: skip
    first = execute(cells, tmp_path)
    rssd = tmp_path / "export.sqlite.db"
    cli = subprocess.run([sys.executable, "-m", "rssd_magic", "--db", url, "export", "--to", str(rssd)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    check_rssd(rssd)
    monkeypatch.setenv("RSSD_MAGIC_DB", str(rssd))  # the fresh kernel knows only the file
    replayed = execute(cells, tmp_path)
    assert len(banners(replayed.cells[1])) == 1, "replayed, not run"
    assert strip_volatile(replayed) == strip_volatile(first)
    assert text_of(replayed.cells[2]) == "1.0\n"
