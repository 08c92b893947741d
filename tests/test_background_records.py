"""Large values recorded while the notebook goes on (issue 24, unblocking
issue 17): the cell returns once its values are snapshotted; the record
lands, durable, moments later from a thread of its own; whatever needs it
waits for it; a kernel killed before it lands is a dead holder whose claim
is taken over; a write that fails ends the run "could not record".

The writing thread's store is gated in some tests (``writer`` waits for an
event) so that "not landed yet" is a state the test holds, not a race.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import counter
from shell_process import ShellProcess

APPEND = "open('side.log', 'a').write('ran\\n')\n"
N = 4_000_000  # 32 MB of float64: written in the background
BIG = "%%stateful\nimport numpy as np\n" + APPEND + f"arr = np.arange({N}, dtype='float64')\n"


@pytest.fixture
def gated(kernel, monkeypatch):
    """The background writer of the kernel's store waits for ``gate`` before
    it writes anything."""
    gate = threading.Event()
    backend = kernel.magics.runner.backend()
    real = type(backend).writer

    def writer(self):
        gate.wait(30)
        return real(self)

    monkeypatch.setattr(type(backend), "writer", writer)
    yield gate
    gate.set()
    kernel.magics.runner.settle()


def states(kernel) -> list[tuple[str, str]]:
    return kernel.states()


def test_the_cell_returns_before_its_record_lands_and_the_record_holds_what_it_bound(kernel, gated):
    kernel.ok(BIG)
    assert states(kernel)[-1] == ("INITIAL", "RUNNING"), "not landed yet: the claim still holds the cell"
    assert kernel.rows("SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(1,)]
    kernel.ok("arr[:] = -1")  # the next cell changes the array in place at once
    gated.set()
    kernel.magics.runner.settle()
    assert states(kernel)[-1] == ("RUNNING", "EXECUTED")
    kernel.restart()
    kernel.ok(BIG)
    assert counter(kernel.workdir / "side.log") == 1
    assert np.array_equal(kernel.shell.user_ns["arr"], np.arange(N, dtype="float64")), "the value the cell bound"


def test_the_same_cell_again_waits_for_its_record_and_replays_it(kernel, gated):
    kernel.ok(BIG)
    threading.Timer(1.5, gated.set).start()
    again = kernel.ok(BIG)
    assert "waiting for 1 record(s)" in again.stdout and again.banner, "it waited, then replayed"
    assert counter(kernel.workdir / "side.log") == 1


def test_commands_and_shutdown_wait_for_records_being_written(kernel, gated):
    kernel.ok(BIG)
    threading.Timer(1.5, gated.set).start()
    listed = kernel.ok("%stateful list")
    assert "EXECUTED" in listed.stdout or "EXECUTED" in str(listed.result.result)
    kernel.ok("%%stateful\n" + APPEND + f"arr2 = np.arange({N}, dtype='float64') + 1\n")
    kernel.magics.close()  # what kernel shutdown, restart and %reload_ext do
    assert [s for s in states(kernel) if s[1] == "EXECUTED"] == [("RUNNING", "EXECUTED")] * 2


def test_a_failed_background_write_ends_the_run_and_is_said_at_the_next_cell(kernel, monkeypatch):
    from rssd_magic.store.base import StoreError

    backend = kernel.magics.runner.backend()
    real = type(backend).writer

    def broken(self):
        raise StoreError(f"RSSD {self.path}: database or disk is full")

    monkeypatch.setattr(type(backend), "writer", broken)
    kernel.ok(BIG)
    kernel.magics.runner.recorder.wait()
    said = kernel.ok("x = 1")
    assert "could not be recorded (RSSD" in said.stderr and "disk is full" in said.stderr
    assert states(kernel)[-1] == ("RUNNING", "FAILED")
    (reason,) = kernel.rows("SELECT transition_reason FROM orchestration_session_state ORDER BY rowid DESC LIMIT 1")[0]
    assert reason.startswith("could not record:")
    assert kernel.rows("SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)]
    monkeypatch.setattr(type(backend), "writer", real)
    kernel.ok(BIG)  # it runs again next time
    assert counter(kernel.workdir / "side.log") == 2


GATE = (
    "import threading\n"
    "from rssd_magic.backends.sqlite import SqliteBackend\n"
    "_real_writer = SqliteBackend.writer\n"
    "def _never(self):\n"
    "    threading.Event().wait()\n"
    "SqliteBackend.writer = _never\n"
)


@pytest.mark.kernel
def test_a_kernel_killed_while_its_record_is_written_is_taken_over(tmp_path):
    victim = ShellProcess(tmp_path)
    victim.ok(GATE)
    victim.ok(BIG)  # the cell returned; its record will never land
    os.kill(victim.pid, signal.SIGKILL)
    victim.kill()
    survivor = ShellProcess(tmp_path)
    try:
        started = time.monotonic()
        ran = survivor.ok(BIG)
        assert "took over" in ran["stdout"] and time.monotonic() - started < 30
        assert survivor.value("float(arr[-1])") == N - 1
    finally:
        survivor.close()
    assert counter(tmp_path / "side.log") == 2, "the killed kernel's run recorded nothing: it ran again"
    import sqlite3

    conn = sqlite3.connect(tmp_path / "resource-surveillance.sqlite.db")
    chain = [r for r in conn.execute(
        "SELECT from_state, to_state FROM orchestration_session_state WHERE session_entry_id IS NOT NULL ORDER BY rowid"
    )]  # fmt: skip
    conn.close()
    assert chain == [("INITIAL", "RUNNING"), ("RUNNING", "ABANDONED"), ("ABANDONED", "RUNNING"), ("RUNNING", "EXECUTED")]


def test_a_cells_commit_never_checkpoints_the_housekeeper_does(kernel, monkeypatch):
    """The WAL is copied into the file on the housekeeper's thread once it
    passes CHECKPOINT_BYTES, never inside a cell's commit (where its fsync
    was every 40th first run's slow tail), and the WAL stays bounded."""
    from rssd_magic.backends import sqlite_conn

    monkeypatch.setattr(sqlite_conn, "CHECKPOINT_BYTES", 64 << 10)
    db = kernel.magics.runner.backend().db
    monkeypatch.setattr(db, "idle_close_s", 3600.0)  # no idle close: only the due checkpoint copies pages
    assert db.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    before = os.path.getsize(kernel.db)
    for i in range(40):
        kernel.ok(f"%%stateful\nv{i} = 'x' * 2000\n")
    deadline = time.monotonic() + 10
    while os.path.getsize(kernel.db) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.getsize(kernel.db) > before, "the housekeeper copied the WAL into the file"
    # Back to back, the 40 cells run within one checkpoint interval, so the
    # WAL holds all they wrote: two transactions of about a dozen pages each
    # (~100 KiB) per first run.  More means runs write pages they needn't.
    assert os.path.getsize(f"{kernel.db}-wal") < 40 * (128 << 10)


def test_a_large_wal_is_checkpointed_once_a_second_not_after_every_write(kernel, monkeypatch):
    """A checkpoint leaves the -wal file its size, so by its size alone one
    was asked for after every write once it had passed CHECKPOINT_BYTES: a
    new connection and fsyncs on the housekeeper's thread per cell."""
    from rssd_magic.backends import sqlite_conn

    monkeypatch.setattr(sqlite_conn, "CHECKPOINT_BYTES", 16 << 10)
    db = kernel.magics.runner.backend().db
    asked = []
    poke = db.keeper.poke
    monkeypatch.setattr(db.keeper, "poke", lambda *a, **k: (asked.append(k.get("checkpoint")), poke(*a, **k))[1])
    started = time.monotonic()
    for i in range(30):
        kernel.ok(f"%%stateful\nw{i} = 'x' * 4000\n")
    took = time.monotonic() - started
    assert os.path.getsize(f"{kernel.db}-wal") > 16 << 10, "the WAL is past the threshold"
    checkpoints = asked.count(True)
    assert sqlite_conn.CHECKPOINT_EVERY_S == 1.0
    assert 1 <= checkpoints <= took + 1, f"{checkpoints} checkpoints asked for in {took:.2f}s of 30 cells"
