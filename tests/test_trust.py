"""Trust and hostile input: signed payloads, and a clear message for every
bad input, with nothing lost and nothing unpickled that we didn't sign."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import stat
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import counter
from rssd_magic.trust import stream_digest

APPEND = "open('side.log', 'a').write('ran\\n')\n"
CELL = "%%stateful\n" + APPEND + "import collections\nprint('shown')\nsecret_sauce = collections.Counter('aab')\nplain = 5\n"


class Boom:
    """Unpickling this writes a marker file: proof that a payload was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_spec(kernel):
    (text,) = kernel.rows("SELECT transition_result FROM orchestration_session_state WHERE to_state='EXECUTED'")[0]
    return json.loads(text)["names"]["secret_sauce"]


def test_user_key_is_created_private_on_first_use(kernel, user_secret_dir):
    kernel.ok(CELL)
    key_file = user_secret_dir / "rssd_magic" / "secret"
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_text().strip()) == 64


def test_values_from_another_key_are_not_unpickled_until_trusted(kernel):
    kernel.ok("%config StatefulMagics.secret = 'alice-team-key'")
    kernel.ok(CELL)
    kernel.restart()
    kernel.ok("%config StatefulMagics.secret = 'bob-own-key'")
    ran = kernel.ok(CELL)
    assert counter(kernel.workdir / "side.log") == 1, "the cell is not re-run silently"
    assert "shown" in ran.stdout, "plain outputs are still shown"
    assert kernel.shell.user_ns["plain"] == 5, "JSON values need no trust"
    assert "secret_sauce" not in kernel.shell.user_ns
    assert "not restored: secret_sauce is not signed by your key" in ran.stderr
    assert "%stateful trust" in ran.stderr and str(kernel.db) in ran.stderr

    trusted = kernel.ok("%stateful trust")
    assert "signed 1 value" in trusted.stdout
    kernel.restart()
    kernel.ok("%config StatefulMagics.secret = 'bob-own-key'")
    kernel.ok(CELL)
    assert kernel.shell.user_ns["secret_sauce"] == {"a": 2, "b": 1}
    keys = kernel.rows("SELECT count(DISTINCT key_id) FROM rssd_magic_signature")
    assert keys == [(2,)], "alice's signature row is kept, bob's added"


def test_cli_trust_uses_the_team_key_from_the_environment(kernel, tmp_path):
    kernel.ok("%config StatefulMagics.secret = 'someone-else'")
    kernel.ok(CELL)
    kernel.restart()
    env = {**os.environ, "RSSD_MAGIC_SECRET": "team-key"}
    out = subprocess.run(
        [sys.executable, "-m", "rssd_magic", "--db", str(kernel.db), "trust"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "signed 1 value in 1 cell" in out.stdout
    kernel.ok("%config StatefulMagics.secret = 'team-key'")
    kernel.ok(CELL)
    assert kernel.shell.user_ns["secret_sauce"]["a"] == 2


def test_tampered_blob_is_refused_and_trust_refuses_to_sign_it(kernel):
    kernel.ok(CELL)
    digest = _pickle_spec(kernel)["blob"]
    conn = sqlite3.connect(kernel.db)
    data = bytearray(conn.execute("SELECT data FROM rssd_magic_blob WHERE digest = ?", (digest,)).fetchone()[0])
    data[len(data) // 2] ^= 0xFF
    conn.execute("UPDATE rssd_magic_blob SET data = ? WHERE digest = ?", (bytes(data), digest))
    conn.commit()
    conn.close()
    kernel.restart()
    ran = kernel.ok(CELL)
    assert "secret_sauce" not in kernel.shell.user_ns
    assert "does not match its digest" in ran.stderr
    assert "not trusted" in kernel.run("%stateful trust").stderr


def test_forged_consistent_payload_is_never_unpickled(kernel, tmp_path):
    """An attacker who rewrites blob, digest and spec (but has no key) gets nothing loaded."""
    kernel.ok(CELL)
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Boom(str(marker)))
    digest = stream_digest(evil)
    conn = sqlite3.connect(kernel.db)
    conn.execute("INSERT INTO rssd_magic_blob (digest, size, data) VALUES (?, ?, ?)", (digest, len(evil), evil))
    conn.execute(
        """UPDATE orchestration_session_state SET transition_result =
           json_set(transition_result, '$.names.secret_sauce.blob', ?) WHERE to_state = 'EXECUTED'""",
        (digest,),
    )
    conn.commit()
    conn.close()
    kernel.restart()
    ran = kernel.ok(CELL)
    assert not marker.exists()
    assert "secret_sauce is not signed by your key" in ran.stderr


def test_missing_blob_is_reported_by_name(kernel):
    kernel.ok("%%stateful\nimport numpy as np\narr = np.zeros(100_000)\n")
    kernel.rows("SELECT 1")  # the file exists
    conn = sqlite3.connect(kernel.db)
    conn.execute("DELETE FROM rssd_magic_blob WHERE size = 800000")
    conn.commit()
    conn.close()
    kernel.restart()
    ran = kernel.ok("%%stateful\nimport numpy as np\narr = np.zeros(100_000)\n")
    assert "arr blob" in ran.stderr and "missing from the RSSD" in ran.stderr
    assert "arr" not in kernel.shell.user_ns and kernel.shell.user_ns["np"].__name__ == "numpy"


def test_unreadable_transition_result_from_another_tool_is_a_clear_error(kernel):
    kernel.ok(CELL)
    conn = sqlite3.connect(kernel.db)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute("UPDATE orchestration_session_state SET transition_result = '{not json' WHERE to_state = 'EXECUTED'")
    conn.commit()
    conn.close()
    kernel.restart()
    ran = kernel.run(CELL)
    err = ran.result.error_in_exec
    assert type(err).__name__ == "StatefulRunError"
    assert "unreadable" in str(err) and str(kernel.db) in str(err) and "--force" in str(err)
    assert counter(kernel.workdir / "side.log") == 1


def test_malformed_outputs_are_skipped_with_a_note(kernel):
    kernel.ok(CELL)
    conn = sqlite3.connect(kernel.db)
    conn.execute(
        """UPDATE orchestration_session_state SET transition_result =
           json_set(transition_result, '$.outputs', json('[{"output_type": "stream", "name": "stdout", "text": "ok\\n"}, 7, {"output_type": "display_data", "data": 3}]'))
           WHERE to_state = 'EXECUTED'"""
    )
    conn.commit()
    conn.close()
    kernel.restart()
    ran = kernel.ok(CELL)
    assert ran.stdout.startswith("ok")
    assert "2 recorded output(s)" in ran.stderr


def test_truncated_sqlite_file_is_refused_untouched(kernel):
    kernel.ok(CELL)
    kernel.restart()
    bad = kernel.workdir / "truncated.db"
    data = kernel.db.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 100])
    before = bad.read_bytes()
    ran = kernel.run(f"%%stateful --db {bad}\n" + APPEND)
    err = ran.result.error_in_exec
    assert type(err).__name__ == "UsageError" and str(bad) in str(err)
    assert bad.read_bytes() == before
    assert counter(kernel.workdir / "side.log") == 1


def test_locked_file_is_a_clear_error_and_the_cell_does_not_run(kernel):
    holder = sqlite3.connect(kernel.db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        kernel.ok("%config StatefulMagics.busy_timeout_seconds = 0.3")
        ran = kernel.run("%%stateful\n" + APPEND)
        err = ran.result.error_in_exec
        assert type(err).__name__ == "UsageError"
        assert "locked" in str(err) and str(kernel.db) in str(err) and "not run" in str(err)
        assert counter(kernel.workdir / "side.log") == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        kernel.magics.busy_timeout_seconds = 30.0


def test_disk_full_while_recording_keeps_output_and_writes_no_half_row(kernel):
    kernel.ok("%%stateful\nwarm = 1\n")  # open the store
    store = kernel.magics.runner.backend()
    (pages,) = store.conn.execute("PRAGMA page_count").fetchone()
    store.conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    ran = kernel.ok("%%stateful\nimport numpy as np\nprint('visible')\nbig = np.ones(1_000_000)\n")
    assert "visible" in ran.stdout
    assert "could not be recorded" in ran.stderr and "full" in ran.stderr
    store.conn.execute("PRAGMA max_page_count = 1073741823")
    # The run still ends (a small FAILED record fits where the 8 MB one did
    # not) and its claim is released: nobody waits for it.
    assert kernel.states()[-1] == ("RUNNING", "FAILED"), "no EXECUTED row, no half row"
    (reason,) = kernel.rows("SELECT transition_reason FROM orchestration_session_state WHERE session_entry_id IS NOT NULL ORDER BY rowid DESC LIMIT 1")[0]
    assert reason.startswith("could not record:") and "full" in reason
    assert kernel.rows("SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)]
    assert kernel.rows("SELECT count(*) FROM rssd_magic_blob WHERE size = 8000000") == [(0,)]
    again = kernel.ok("%%stateful\nimport numpy as np\nprint('visible')\nbig = np.ones(1_000_000)\n")
    assert "visible" in again.stdout and kernel.states()[-2:] == [("FAILED", "RUNNING"), ("RUNNING", "EXECUTED")]


def test_huge_output_is_capped_with_a_note(kernel):
    kernel.ok("%config StatefulMagics.max_output_size = 1000")
    try:
        first = kernel.ok("%%stateful\nprint('x' * 5000)\n")
        assert first.stdout.count("x") == 5000, "live output is not cut"
        kernel.restart()
        second = kernel.ok("%%stateful\nprint('x' * 5000)\n")
        assert second.stdout.count("x") == 1000
        assert "output recorded up to 1000 characters" in second.stderr
    finally:
        kernel.magics.max_output_size = 10_000_000


def test_undecodable_bytes_on_stdout_are_recorded_as_replacement_chars(kernel):
    kernel.ok("%%stateful\nimport sys\nsys.stdout.write(b'caf\\xe9 ok\\n'.decode('utf-8', 'surrogateescape'))\n")
    kernel.restart()
    ran = kernel.ok("%%stateful\nimport sys\nsys.stdout.write(b'caf\\xe9 ok\\n'.decode('utf-8', 'surrogateescape'))\n")
    assert ran.stdout.startswith("caf\ufffd ok")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.binary(min_size=0, max_size=200), where=st.sampled_from(["blob", "result"]))
def test_random_bytes_never_crash_the_replay_or_get_unpickled(kernel, noise, where):
    cell = "%%stateful\n" + APPEND + "import collections\nvalue = collections.OrderedDict(a=1)\nprint('hello')\n"
    kernel.ok(cell)
    runs = counter(kernel.workdir / "side.log")
    conn = sqlite3.connect(kernel.db)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    if where == "blob":
        conn.execute("UPDATE rssd_magic_blob SET data = ?", (noise,))
    else:
        conn.execute(
            "UPDATE orchestration_session_state SET transition_result = ? WHERE to_state = 'EXECUTED'",
            (noise.decode("latin-1"),),
        )
    conn.commit()
    conn.close()
    kernel.restart()
    ran = kernel.run(cell)
    err = ran.result.error_in_exec
    assert err is None or type(err).__name__ == "StatefulRunError", err
    assert "value" not in kernel.shell.user_ns, "corrupted bytes are never unpickled"
    assert counter(kernel.workdir / "side.log") == runs, "the cell is not re-run silently"
    if where == "blob":
        assert "hello" in ran.stdout, "plain outputs still replay"
    kernel.restart()
    conn = sqlite3.connect(kernel.db)
    conn.execute("DELETE FROM rssd_magic_blob")
    conn.execute("DELETE FROM rssd_magic_signature")
    conn.execute("DELETE FROM orchestration_session_state")
    conn.execute("DELETE FROM orchestration_session_entry")
    conn.commit()
    conn.close()
