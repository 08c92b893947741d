"""Fast tier: a claimed run always ends, whatever goes wrong while it is
recorded, and an RSSD on a network filesystem is refused (issue 12).

Each trigger is real: a string SQLite can't store as text, another
connection holding the write lock past the busy timeout, a real SIGINT
arriving while a 320 MB value is being recorded, and the mount table the
kernel reports (pointed at a copy that puts the folder on NFS).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

from conftest import counter
from rssd_magic.store import mounts

APPEND = "open('side.log', 'a').write('ran\\n')\n"


def held_claims(kernel) -> int:
    return kernel.rows("SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL")[0][0]


def last_reason(kernel) -> str:
    return kernel.rows(
        "SELECT transition_reason FROM orchestration_session_state WHERE session_entry_id IS NOT NULL ORDER BY rowid DESC LIMIT 1"
    )[0][0]


def test_a_string_with_a_lone_surrogate_is_recorded_and_replayed(kernel):
    cell = "%%stateful\n" + APPEND + "name = b'caf\\xe9'.decode('utf-8', 'surrogateescape')\n"
    kernel.ok(cell)
    assert kernel.states()[-1] == ("RUNNING", "EXECUTED")
    kernel.restart()
    kernel.ok(cell)
    assert kernel.shell.user_ns["name"] == "caf\udce9"
    assert counter(kernel.workdir / "side.log") == 1


def test_a_lock_held_past_the_busy_timeout_ends_the_run_as_soon_as_it_can(kernel):
    kernel.ok("%config StatefulMagics.busy_timeout_seconds = 0.3")
    kernel.ok("%%stateful\nwarm = 1\n")  # the store opens with that timeout
    cell = "%%stateful\n" + APPEND + "print('shown live')\nv = 2\n"
    try:
        # The body itself takes the write lock with a connection of its own
        # (as another process would), and keeps it while the run is recorded.
        grab = (
            "import sqlite3\nlocker = sqlite3.connect('resource-surveillance.sqlite.db', isolation_level=None)\n"
            "locker.execute('BEGIN IMMEDIATE')\n"
        )
        ran = kernel.ok(cell.replace("%%stateful\n", "%%stateful\n" + grab))
        assert "shown live" in ran.stdout, "the output stays on screen"
        assert "could not be recorded" in ran.stderr and "locked" in ran.stderr
        kernel.shell.user_ns["locker"].execute("ROLLBACK")
        # The end could not be written while locked; the next cell writes it
        # first, so no other kernel waits for this run's lease to lapse.
        kernel.ok("%%stateful\nother = 3\n")
        states = kernel.rows(
            "SELECT to_state, transition_reason FROM orchestration_session_state "
            "WHERE session_entry_id IS NOT NULL AND to_state IN ('FAILED', 'EXECUTED') ORDER BY rowid"
        )
        assert states[1][0] == "FAILED" and states[1][1].startswith("could not record:") and "locked" in states[1][1]
        assert held_claims(kernel) == 0
    finally:
        kernel.magics.busy_timeout_seconds = 30.0
        locker = kernel.shell.user_ns.get("locker")
        if locker is not None:
            locker.close()


def test_ctrl_c_while_a_large_result_is_recorded_ends_the_run_interrupted(kernel, monkeypatch):
    # A real SIGINT, sent while the 200 MB value is being serialized: from
    # inside the serializer, so it lands there every time.  (A timer started
    # by the body raced the copy handed to the background writer, and once
    # landed after the cell had returned, in pytest itself.)
    from rssd_magic.engine import runs

    dump_names, armed = runs.dump_names, [True]

    def interrupted_while_dumping(*args, **kwargs):
        if armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)
        return dump_names(*args, **kwargs)

    monkeypatch.setattr(runs, "dump_names", interrupted_while_dumping)
    cell = "%%stateful\n" + APPEND + "import numpy as np\nbig = np.ones(25_000_000)\n"
    ran = kernel.run(cell)
    assert isinstance(ran.result.error_in_exec, KeyboardInterrupt)
    assert kernel.states()[-1] == ("RUNNING", "INTERRUPTED")
    assert last_reason(kernel) == "interrupted while recording"
    assert held_claims(kernel) == 0
    assert kernel.rows("SELECT count(*) FROM rssd_magic_blob WHERE size >= 200000000") == [(0,)]
    assert not armed
    kernel.ok("big = None")
    kernel.ok(cell)
    kernel.magics.runner.settle()  # its record is written while the notebook goes on
    assert kernel.states()[-2:] == [("INTERRUPTED", "RUNNING"), ("RUNNING", "EXECUTED")]
    assert counter(kernel.workdir / "side.log") == 2
    kernel.ok("big = None")


# -- network filesystems ------------------------------------------------------------------------


@pytest.fixture
def on_nfs(tmp_path, monkeypatch):
    """The kernel's mount table, with one more mount: the test's folder on NFS."""
    real = open(mounts.MOUNTINFO).read()
    table = tmp_path / "mountinfo"
    folder = str(tmp_path).replace(" ", "\\040")
    table.write_text(real + f"999 1 0:99 / {folder} rw,relatime shared:9 - nfs4 fileserver:/export rw,vers=4.2\n")
    monkeypatch.setattr(mounts, "MOUNTINFO", str(table))
    return tmp_path


def test_an_rssd_on_a_network_filesystem_is_refused_with_one_line(kernel, on_nfs):
    ran = kernel.run("%%stateful\n" + APPEND)
    err = ran.result.error_in_exec
    assert type(err).__name__ == "UsageError"
    text = str(err)
    assert "network filesystem (nfs4" in text and "postgresql://" in text and "allow_network_fs" in text
    assert str(kernel.db) in text and "not run" in text
    assert not kernel.db.exists() and counter(kernel.workdir / "side.log") == 0


def test_allow_network_fs_uses_a_rollback_journal_and_says_so_once(kernel, on_nfs):
    kernel.ok("%config StatefulMagics.allow_network_fs = True")
    try:
        first = kernel.ok("%%stateful\n" + APPEND + "a = 1\n")
        second = kernel.ok("%%stateful\n" + APPEND + "b = 2\n")
        assert first.stdout.count("rollback journal instead of WAL") == 1
        assert "rollback journal" not in second.stdout
        assert kernel.rows("PRAGMA journal_mode") == [("delete",)]
        assert not (kernel.workdir / (kernel.db.name + "-wal")).exists()
    finally:
        kernel.magics.allow_network_fs = False


def test_the_mount_table_is_read_as_the_kernel_writes_it(tmp_path, monkeypatch):
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "40 22 0:50 / /mnt/team\\040share rw - cifs //srv/team rw\n"
        "41 40 0:51 / /mnt/team\\040share/local rw - ext4 /dev/sdb1 rw\n"
    )
    monkeypatch.setattr(mounts, "MOUNTINFO", str(table))
    from pathlib import Path

    assert mounts.network_filesystem(Path("/mnt/team share/x/state.db")) == ("cifs", "/mnt/team share")
    assert mounts.network_filesystem(Path("/mnt/team share/local/state.db")) is None
    assert mounts.network_filesystem(Path("/home/me/state.db")) is None


def test_a_plain_sqlite_reader_sees_no_half_written_rows_after_any_of_it(kernel):
    kernel.ok("%%stateful\nx = 1\n")
    conn = sqlite3.connect(kernel.db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()


def test_a_claim_whose_end_cannot_be_written_stops_beating(kernel):
    # Issue 11's heartbeat bug: the claim went on being renewed after its
    # run's record failed, so other kernels waited as long as this one lived.
    # The body makes SQLite's row limit tiny on the store's own connection
    # (the heartbeat's connection keeps the default), so neither the record
    # nor the small FAILED end fits.
    kernel.ok("%config StatefulMagics.lease_seconds = 0.3")
    try:
        shrink = (
            "import sqlite3\n"
            "store = get_ipython().magics_manager.registry['StatefulMagics'].runner.backend()\n"
            "store.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100)\n"
        )
        ran = kernel.ok("%%stateful\n" + shrink + "import time\ntime.sleep(0.5)\nz = 1\n")
        assert "could not be recorded" in ran.stderr
        beat = lambda: kernel.rows("SELECT beat FROM rssd_magic_claim WHERE state_id IS NOT NULL")  # noqa: E731
        (first,) = beat()
        assert first[0] >= 1, "it did beat while the body ran"
        time.sleep(0.6)
        # A beat already under way when the run ended may still land; a
        # claim that went on beating would beat about six times here.
        assert beat()[0][0] <= first[0] + 1, "no beat after the run could not be recorded"
        kernel.shell.user_ns["store"].conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000_000)
        kernel.ok("%%stateful\nnext_cell = 1\n")  # writes the pending end first
        assert held_claims(kernel) == 0
        assert kernel.rows(
            "SELECT count(*) FROM orchestration_session_state WHERE to_state = 'FAILED' AND transition_reason LIKE 'could not record:%'"
        ) == [(1,)]
    finally:
        kernel.magics.lease_seconds = 60.0
