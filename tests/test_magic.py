"""Fast tier: %%stateful driven through an in-process IPython shell."""

from __future__ import annotations

import pytest

import json
import re
import socket
import sqlite3
import subprocess
import sys

import nbformat
import numpy as np

from conftest import counter
from rssd_magic.store.base import StoreError

APPEND = "open('side.log', 'a').write('ran\\n')\n"


# -- registration and help ----------------------------------------------------


def test_extension_registers_cell_magic_with_full_help(kernel):
    assert "stateful" in kernel.shell.magics_manager.magics["cell"]
    ran = kernel.ok("%%stateful?")
    for option in ("--db", "--name", "--scope", "--force", "--quiet", "at most once"):
        assert option in ran.stdout


# -- run, then replay ---------------------------------------------------------


def test_first_run_executes_and_second_replays_everything(kernel):
    cell = (
        "%%stateful\n"
        "import sys\n"
        "from IPython.display import HTML, Image, display\n"
        + APPEND
        + "print('to stdout')\n"
        "print('to stderr', file=sys.stderr)\n"
        "display(HTML('<b>bold</b>'))\n"
        "display(Image(data=b'\\x89PNG\\r\\n\\x1a\\n0000', format='png'))\n"
        "answer = 42\n"
        "answer * 2\n"
    )
    first = kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 1
    assert "to stdout" in first.stdout and "to stderr" in first.stderr
    assert [d.data.get("text/html") for d in first.shown][0] == "<b>bold</b>"
    assert not first.banner

    kernel.restart()
    second = kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 1, "the body must not run again"
    assert second.stdout.startswith("to stdout")
    assert "to stderr" in second.stderr
    assert [d.data for d in second.shown] == [d.data for d in first.shown]
    assert "image/png" in second.shown[1].data
    assert second.result.result == 84, "the cell's result is the value, not a stand-in"
    assert kernel.shell.user_ns["_"] == 84
    assert "84" in second.stdout  # the replayed result is shown as Out[n]
    assert kernel.shell.user_ns["answer"] == 42
    (banner,) = second.banner
    assert re.search(
        r"replayed [0-9a-f]{12} from resource-surveillance\.sqlite\.db: executed \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
        r"on \S+ in [^;]+$",
        banner.data["text/plain"],
    ), "names its store; no signer when it is you"
    assert f'title="{kernel.db}"' in banner.data["text/html"]


def test_the_banner_carries_a_bundle_frontends_can_read_that_does_not_churn(kernel):
    cell = "%%stateful --name fit --scope models\nweights = [1, 2]\n"
    kernel.ok(cell)
    kernel.restart()
    bundles = []
    for _ in range(2):
        (banner,) = kernel.ok(cell).banner
        bundles.append(banner.data["application/vnd.rssd-magic.replay+json"])
    assert bundles[0] == bundles[1], "nothing that changes from one replay to the next"
    bundle = bundles[0]
    (key,) = kernel.rows("SELECT json_extract(elaboration, '$.key') FROM orchestration_session_entry")[0]
    (at,) = kernel.rows("SELECT transitioned_at FROM orchestration_session_state WHERE to_state = 'EXECUTED'")[0]
    assert bundle == {
        "key": key, "store": str(kernel.db), "state": "EXECUTED", "state_id": bundle["state_id"],
        "executed_at": at.replace(" ", "T") + "Z", "host": socket.gethostname(), "duration_s": bundle["duration_s"],
        "scope": "models", "name": "fit", "signer": "you", "signed_by_you": True,
    }  # fmt: skip
    assert isinstance(bundle["duration_s"], float) and len(bundle["state_id"]) == 26


def test_recorded_outputs_are_valid_nbformat_in_order(kernel):
    kernel.ok(
        "%%stateful\nimport sys\nfrom IPython.display import display, Markdown\n"
        "print('a')\ndisplay(Markdown('*m*'))\nprint('b', file=sys.stderr)\n7\n"
    )
    (result,) = kernel.rows("SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED'")
    outputs = json.loads(result[0])["outputs"]
    assert [o["output_type"] for o in outputs] == ["stream", "display_data", "stream", "execute_result"]
    assert [o.get("name") for o in outputs if o["output_type"] == "stream"] == ["stdout", "stderr"]
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.from_dict(o) for o in outputs]
    nb.cells.append(cell)
    nbformat.validate(nb)


def test_updated_and_cleared_displays_replay_as_they_ended(kernel):
    cell = (
        "%%stateful\n"
        "from IPython.display import display, clear_output\n"
        "display('gone')\n"
        "clear_output()\n"
        "h = display('step 1', display_id=True)\n"
        "h.update('step 2')\n"
        "display('kept')\n"
    )
    kernel.ok(cell)
    kernel.restart()
    replayed = [d.data["text/plain"] for d in kernel.ok(cell).shown]
    assert replayed == ["'step 2'", "'kept'"]


def test_quiet_hides_banner_by_option_and_by_config(kernel):
    kernel.ok("%%stateful\nv = 1\n")
    assert not kernel.ok("%%stateful --quiet\nv = 1\n").banner
    assert kernel.ok("%%stateful\nv = 1\n").banner
    kernel.ok("%config StatefulMagics.quiet = True")
    assert not kernel.ok("%%stateful\nv = 1\n").banner


def test_names_are_bound_again_in_a_fresh_kernel(kernel):
    cell = (
        "%%stateful\n"
        "import numpy as np\nimport os.path as osp\nfrom math import sqrt\n"
        "scale = 3\n"
        "big = np.arange(200_000, dtype='float64')\n"
        "def f(x):\n    return x * scale\n"
        "class Point:\n    def __init__(self, x): self.x = x\n    def norm(self): return sqrt(self.x ** 2)\n"
        "p = Point(-4)\n"
        "text = 'é' * 10_000\n"
        "data = {'a': [1, 2.5, None], 'b': (True, b'bytes')}\n"
    )
    kernel.ok(cell)
    kernel.restart()
    kernel.ok(cell)
    ns = kernel.shell.user_ns
    assert ns["np"] is np and ns["osp"].__name__ == "posixpath"
    assert ns["f"](2) == 6
    kernel.ok("scale = 10")
    assert ns["f"](2) == 20, "a restored function reads the live notebook globals"
    assert ns["p"].norm() == 4.0 and type(ns["p"]).__name__ == "Point"
    assert ns["Point"](3).x == 3
    assert ns["big"].sum() == np.arange(200_000, dtype="float64").sum()
    ns["big"][0] = 1.0  # restored arrays are writable
    assert ns["text"] == "é" * 10_000
    assert ns["data"] == {"a": [1, 2.5, None], "b": (True, b"bytes")}


def test_large_values_live_in_blobs_not_in_json(kernel):
    kernel.ok("%%stateful\nimport numpy as np\narr = np.ones(1_000_000)\n")
    (result,) = kernel.rows("SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED'")
    assert len(result[0]) < 4000
    spec = json.loads(result[0])["names"]["arr"]
    assert spec["kind"] == "pickle" and spec["buffers"]
    (size,) = kernel.rows("SELECT size FROM rssd_magic_blob WHERE digest = ?", (spec["buffers"][0],))[0]
    assert size == 8_000_000
    (js,) = kernel.rows(
        "SELECT json_extract(transition_result, '$.names.np.module') FROM orchestration_session_state "
        "WHERE to_state = 'EXECUTED'"
    )[0]
    assert js == "numpy"


# -- identity -----------------------------------------------------------------


def test_comments_blank_lines_and_spacing_keep_the_key(kernel):
    kernel.ok("%%stateful\n" + APPEND + "x = [1,2]\n")
    kernel.ok("%%stateful\n# a comment\n\n" + APPEND + "x   =   [1, 2]   # spaced\n\n")
    assert counter(kernel.workdir / "side.log") == 1
    kernel.ok("%%stateful\n" + APPEND + "x = [1, 3]\n")
    assert counter(kernel.workdir / "side.log") == 2
    kernel.ok("%%stateful\n" + APPEND + "x = [1, 2]  # '# not a comment'\ns = '#'\n")
    assert counter(kernel.workdir / "side.log") == 3


def test_named_cell_runs_once_even_after_edit_and_says_so(kernel):
    kernel.ok("%%stateful --name v001_once_init\n" + APPEND + "version = 1\n")
    edited = kernel.ok("%%stateful --name v001_once_init\n" + APPEND + "version = 2\n")
    assert counter(kernel.workdir / "side.log") == 1
    assert kernel.shell.user_ns["version"] == 1
    assert "code of --name v001_once_init changed" in edited.stderr
    same = kernel.ok("%%stateful --name v001_once_init\n" + APPEND + "version = 1\n")
    assert "changed" not in same.stderr


# -- failure, interrupts, force -----------------------------------------------


def test_failed_cell_shows_traceback_once_is_recorded_and_runs_again(kernel):
    cell = "%%stateful\n" + APPEND + "print('before')\n1 / 0\n"
    first = kernel.run(cell)
    assert isinstance(first.result.error_in_exec, ZeroDivisionError)
    assert first.stdout.count("ZeroDivisionError") == 2  # header line + final line, printed once
    assert first.stdout.count("Traceback (most recent call last)") == 1
    second = kernel.run(cell)
    assert isinstance(second.result.error_in_exec, ZeroDivisionError)
    assert counter(kernel.workdir / "side.log") == 2
    assert kernel.states() == [("INITIAL", "RUNNING"), ("RUNNING", "FAILED"), ("FAILED", "RUNNING"), ("RUNNING", "FAILED")]
    (row,) = kernel.rows("SELECT transition_result, transition_reason FROM orchestration_session_state WHERE to_state='FAILED' LIMIT 1")
    error = json.loads(row[0])["error"]
    assert error["ename"] == "ZeroDivisionError" and error["evalue"] == "division by zero"
    assert "1 / 0" in error["traceback"] and "\x1b[" not in error["traceback"]
    assert row[1] == "ZeroDivisionError: division by zero"
    assert json.loads(row[0])["outputs"][0] == {"output_type": "stream", "name": "stdout", "text": "before\n"}


def test_syntax_error_in_body_fails_and_nothing_is_recorded(kernel):
    kernel.ok("%%stateful\nw = 1\n")  # a store that exists: still nothing is written for the error
    ran = kernel.run("%%stateful\nx = (\n")
    assert not ran.result.success
    assert "SyntaxError" in ran.stdout
    assert kernel.states() == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]


def test_keyboard_interrupt_is_recorded_and_not_executed(kernel):
    ran = kernel.run("%%stateful\n" + APPEND + "raise KeyboardInterrupt\n")
    assert isinstance(ran.result.error_in_exec, KeyboardInterrupt)
    assert kernel.states()[-1] == ("RUNNING", "INTERRUPTED")
    assert kernel.rows("SELECT count(*) FROM rssd_magic_claim WHERE state_id IS NOT NULL") == [(0,)], "the claim is released"
    kernel.run("%%stateful\n" + APPEND + "raise KeyboardInterrupt\n")
    assert counter(kernel.workdir / "side.log") == 2


def test_force_runs_again_and_keeps_history(kernel):
    kernel.ok("%%stateful\n" + APPEND + "n = 1\n")
    kernel.ok("%%stateful --force\n" + APPEND + "n = 1\n")
    assert counter(kernel.workdir / "side.log") == 2
    assert kernel.states() == [
        ("INITIAL", "RUNNING"),
        ("RUNNING", "EXECUTED"),
        ("EXECUTED", "RUNNING"),
        ("RUNNING", "EXECUTED"),
    ]
    reasons = [r for (r,) in kernel.rows("SELECT transition_reason FROM orchestration_session_state WHERE to_state='RUNNING' ORDER BY 1")]
    assert reasons == ["first run", "forced (--force) after EXECUTED"]


def test_shell_syntax_and_line_magics_work_inside(kernel):
    ran = kernel.ok("%%stateful\nfiles = !echo hello-shell\n%time w = 5\n")
    assert kernel.shell.user_ns["w"] == 5
    kernel.restart()
    kernel.ok("%%stateful\nfiles = !echo hello-shell\n%time w = 5\n")
    assert list(kernel.shell.user_ns["files"]) == ["hello-shell"]
    assert kernel.shell.user_ns["w"] == 5
    assert ran.result.success


# -- values that can't be saved -----------------------------------------------


def test_unserializable_name_warns_once_counts_as_executed_and_replay_says_so(kernel):
    cell = "%%stateful\n" + APPEND + "import threading\nlock = threading.Lock()\nok = 1\n"
    first = kernel.ok(cell)
    assert first.stderr.count("\n") == 1 and "can't be saved" in first.stderr and "lock (" in first.stderr
    assert "TypeError" in first.stderr
    kernel.restart()
    second = kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 1
    assert "not restored: lock" in second.stderr
    assert kernel.shell.user_ns["ok"] == 1 and "lock" not in kernel.shell.user_ns


# -- where the state lives ----------------------------------------------------


def test_rssd_path_resolution_order(kernel, monkeypatch, tmp_path):
    (tmp_path / "d").mkdir()
    kernel.ok("%%stateful\na = 1\n")
    assert kernel.db.exists()
    monkeypatch.setenv("SURVEILR_STATEDB_FS_PATH", str(tmp_path / "d" / "env.db"))
    kernel.ok("%%stateful\na = 2\n")
    assert (tmp_path / "d" / "env.db").exists()
    kernel.ok(f"%config StatefulMagics.rssd_path = '{tmp_path / 'd' / 'config.db'}'")
    kernel.ok("%%stateful\na = 3\n")
    assert (tmp_path / "d" / "config.db").exists()
    kernel.ok(f"%%stateful --db {tmp_path / 'd' / 'option.db'}\na = 4\n")
    for name, value in [("resource-surveillance.sqlite.db", 1), ("d/env.db", 2), ("d/config.db", 3), ("d/option.db", 4)]:
        (res,) = kernel.rows(
            "SELECT json_extract(transition_result, '$.names.a.value') FROM orchestration_session_state "
            "WHERE to_state = 'EXECUTED'",
            db=tmp_path / name,
        )
        assert res == (value,), name


def test_rows_follow_surveilr_conventions(kernel):
    kernel.ok("%%stateful\nq = 1\n")
    kernel.ok("%%stateful\nq = 2\n")
    kernel.ok("%%stateful\nq = 1\n")  # replay
    kernel.magics.close()
    assert kernel.rows("SELECT name, state, boundary FROM device") == [
        (__import__("socket").gethostname(), '"SINGLETON"', "UNKNOWN")
    ]
    assert kernel.rows("SELECT orchestration_nature_id FROM orchestration_nature") == [("rssd-magic-stateful-cell",)]
    sessions = kernel.rows("SELECT orch_finished_at, version, json_valid(args_json) FROM orchestration_session")
    assert len(sessions) == 1 and sessions[0][0] is not None and sessions[0][2] == 1
    entries = kernel.rows("SELECT ingest_src FROM orchestration_session_entry")
    assert len(entries) == 2 and all(re.fullmatch(r"rssd-magic:default#[0-9a-f]{64}", e) for (e,) in entries)
    ids = kernel.rows("SELECT orchestration_session_state_id FROM orchestration_session_state")
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for (i,) in ids)
    assert kernel.rows("SELECT count(*) FROM orchestration_session_state WHERE from_state = 'INITIAL' AND session_entry_id IS NOT NULL") == [(2,)]
    assert kernel.rows("SELECT hits FROM rssd_magic_hit") == [(1,)]
    plan = " ".join(
        str(r)
        for r in kernel.rows(
            "EXPLAIN QUERY PLAN SELECT 1 FROM orchestration_session_entry WHERE ingest_src = 'x'"
        )
    )
    assert "rssd_magic_entry_src_idx" in plan
    assert kernel.rows("PRAGMA integrity_check") == [("ok",)]
    assert kernel.rows("PRAGMA foreign_key_check") == []


# -- bad input ----------------------------------------------------------------


def test_unknown_option_is_a_usage_error_naming_it(kernel):
    from IPython.core.error import UsageError

    ran = kernel.run("%%stateful --zqxj\n" + APPEND)
    assert type(ran.result.error_in_exec) is UsageError
    assert "--zqxj" in str(ran.result.error_in_exec) and "did you mean" not in str(ran.result.error_in_exec)
    assert counter(kernel.workdir / "side.log") == 0


@pytest.mark.parametrize(
    "line, meant",
    [
        ("%%stateful --nmae foo\n" + APPEND, "--name"),
        ("%%stateful --deps-pakage numpy\n" + APPEND, "--deps-package"),
        ("%stateful lst", "list"),
        ("%stateful gc --dryrun", "--dry-run"),
    ],
)
def test_a_mistyped_option_or_command_gets_a_suggestion(kernel, line, meant):
    from IPython.core.error import UsageError

    err = kernel.run(line).result.error_in_exec
    assert type(err) is UsageError and str(err).startswith("%") and str(err).endswith(f"did you mean {meant}?")
    assert counter(kernel.workdir / "side.log") == 0


def _bad_db_refused(kernel, path, cause):
    from IPython.core.error import UsageError

    before = path.read_bytes() if path.is_file() else None
    ran = kernel.run(f"%%stateful --db {path}\n" + APPEND)
    err = ran.result.error_in_exec
    assert type(err) is UsageError, err
    assert str(path) in str(err) and cause in str(err) and "not run" in str(err)
    assert "Traceback" not in ran.stdout + ran.stderr
    assert counter(kernel.workdir / "side.log") == 0
    if before is not None:
        assert path.read_bytes() == before
    return err


def test_db_that_is_not_sqlite_is_refused_untouched(kernel):
    path = kernel.workdir / "notes.txt"
    path.write_text("just some text, definitely longer than a SQLite header\n" * 3)
    _bad_db_refused(kernel, path, "not a SQLite database")


def test_a_cell_that_must_run_on_a_read_only_rssd_is_refused_untouched(kernel):
    import sqlite3

    from rssd_magic.backends.sqlite_schema import SURVEILR_DDL

    path = kernel.workdir / "ro.db"
    conn = sqlite3.connect(path)
    conn.executescript(SURVEILR_DDL)
    conn.close()
    path.chmod(0o444)
    try:
        _bad_db_refused(kernel, path, "read-only")
    finally:
        path.chmod(0o644)


def test_db_in_missing_folder_is_refused(kernel):
    path = kernel.workdir / "missing" / "x.db"
    _bad_db_refused(kernel, path, "does not exist")
    assert not path.parent.exists()


def test_db_with_other_state_columns_is_refused_untouched(kernel):
    import sqlite3

    path = kernel.workdir / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE orchestration_session_state (id TEXT PRIMARY KEY, state TEXT)")
    conn.execute("INSERT INTO orchestration_session_state VALUES ('1', 'x')")
    conn.commit()
    conn.close()
    err = _bad_db_refused(kernel, path, "orchestration_session_state")
    assert "incompatible schema" in str(err)


def test_surveilr_rssd_with_other_tables_is_used_and_left_intact(kernel):
    import sqlite3

    path = kernel.db
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE uniform_resource (uniform_resource_id VARCHAR PRIMARY KEY, uri TEXT, content BLOB);
        INSERT INTO uniform_resource VALUES ('01HZX', 'file:///a.csv', x'00ff');
        CREATE TABLE code_notebook_state (code_notebook_state_id VARCHAR PRIMARY KEY, to_state TEXT);
        INSERT INTO code_notebook_state VALUES ('01HZY', 'EXECUTED');
        """
    )
    from rssd_magic.backends.sqlite_schema import SURVEILR_DDL

    conn.executescript(SURVEILR_DDL)
    conn.execute(
        """INSERT INTO device (device_id, name, state, boundary) VALUES ('01DEV', 'other-host', '"SINGLETON"', 'UNKNOWN')"""
    )
    conn.execute("INSERT INTO orchestration_nature VALUES ('surveilr-transform-csv', 'Transform CSV', NULL, '2024-01-01', 'x', NULL, NULL, NULL, NULL, NULL)")
    conn.commit()
    conn.close()

    def theirs():
        c = sqlite3.connect(path)
        try:
            return (
                c.execute("SELECT * FROM uniform_resource").fetchall(),
                c.execute("SELECT * FROM code_notebook_state").fetchall(),
                c.execute("SELECT * FROM device WHERE device_id = '01DEV'").fetchall(),
                c.execute("SELECT * FROM orchestration_nature WHERE orchestration_nature_id = 'surveilr-transform-csv'").fetchall(),
                c.execute("SELECT name, sql FROM sqlite_master WHERE name IN ('uniform_resource', 'code_notebook_state', 'device')").fetchall(),
            )
        finally:
            c.close()

    before = theirs()
    kernel.ok("%%stateful\n" + APPEND + "r = 1\n")
    kernel.restart()
    kernel.ok("%%stateful\n" + APPEND + "r = 1\n")
    assert counter(kernel.workdir / "side.log") == 1
    assert theirs() == before
    assert kernel.rows("PRAGMA integrity_check") == [("ok",)]


def test_code_nested_too_deeply_to_analyse_still_runs_and_replays(kernel):
    # ast walks recurse: 600 chained additions exceed the recursion limit.
    cell = "%%stateful\n" + APPEND + "a = 1\ntotal = " + " + ".join(["a"] * 600) + "\n"
    kernel.ok(cell)
    assert kernel.shell.user_ns["total"] == 600
    kernel.restart()
    kernel.ok(cell)
    assert kernel.shell.user_ns["total"] == 600 and counter(kernel.workdir / "side.log") == 1


def test_surveilr_counts_runs_not_replays_and_a_failed_cell_fails_the_session(kernel):
    # surveilr's web UI counts executions (orchestration_session_exec,
    # exec_status 0 = success) and sessions that reached a terminal state.
    conn = sqlite3.connect(kernel.db)
    conn.executescript(
        "CREATE TABLE code_notebook_cell (code_notebook_cell_id VARCHAR PRIMARY KEY, notebook_name TEXT, cell_name TEXT);"
    )
    conn.close()
    kernel.ok("%%stateful --quiet\nprint('made it')\nx = 1\n")
    kernel.ok("%%stateful --quiet\nprint('made it')\nx = 1\n")  # a replay: no exec row
    failed = kernel.run("%%stateful\nraise ValueError('bad input')\n")
    assert isinstance(failed.result.error_in_exec, ValueError)
    rows = kernel.rows(
        "SELECT exec_nature, exec_status, input_text, output_text, exec_error_text, exec_code FROM orchestration_session_exec ORDER BY rowid"
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [("python-cell", 0, "--quiet"), ("python-cell", 1, "")]
    assert rows[0][3] == "made it\n" and rows[0][4] is None and rows[0][5] == "print('made it')\nx = 1\n"
    assert "ValueError: bad input" in rows[1][4]
    (session,) = kernel.rows("SELECT orchestration_session_id FROM orchestration_session")[0]
    kernel.restart()  # closes the store: the session ends, failed (a cell failed in it)
    states = kernel.rows(
        "SELECT from_state, to_state FROM orchestration_session_state WHERE session_id = ? AND session_entry_id IS NULL ORDER BY rowid",
        (session,),
    )
    assert states == [("INITIAL", "surveilr_orchestration_init"), ("surveilr_orchestration_init", "surveilr_orch_failed")]
    assert kernel.rows("PRAGMA foreign_key_check") == []
    assert kernel.rows("SELECT count(*) FROM orchestration_session_exec WHERE NOT json_valid(elaboration)") == [(0,)]
    assert kernel.rows("SELECT count(*) FROM code_notebook_cell") == [(0,)], "never surveilr's notebook tables"


# -- the layout: the path of one cell -------------------------------------------------------


def _module_path_counts(kernel, cell: str) -> dict[str, int]:
    """Along every call stack while *cell* runs, how many times each of our
    modules appears (a stretch of calls inside one module counts once)."""
    import collections
    import sys

    worst: collections.Counter = collections.Counter()
    stack: list = []

    def prof(frame, event, arg):
        if event == "call":
            name = frame.f_globals.get("__name__", "")
            stack.append(name if name.startswith("rssd_magic") else None)
            path: list[str] = []
            for m in stack:
                if m is not None and (not path or path[-1] != m):
                    path.append(m)
            for m, n in collections.Counter(path).items():
                worst[m] = max(worst[m], n)
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(prof)
    try:
        kernel.ok(cell)
    finally:
        sys.setprofile(None)
    return dict(worst)


def test_the_path_of_one_cell_enters_each_module_at_most_twice(kernel):
    kernel.ok("factor = 2")
    cell = "%%stateful\nvalues = [factor * i for i in range(10)]\nprint('hi')\nsum(values)\n"
    for run in ("first run", "replay"):
        counts = _module_path_counts(kernel, cell)
        assert counts and max(counts.values()) <= 2, (run, {m: n for m, n in counts.items() if n > 2})


def test_a_replay_reads_the_small_values_it_restores_in_one_statement(kernel, monkeypatch):
    cell = "%%stateful\n" + "\n".join(f"t{i} = ({i}, 'v{i}', [{i}])" for i in range(6))  # six pickles
    kernel.ok(cell)
    kernel.restart()
    backend = kernel.magics.runner.backend()
    # The traced connection must be the one the replay uses: not closed as
    # idle (after 1 s) on a slow machine between here and the replay.
    monkeypatch.setattr(backend.db, "idle_close_s", 3600.0)
    seen: list[str] = []
    with backend.db.using() as conn:
        conn.set_trace_callback(seen.append)
    try:
        kernel.ok(cell)
    finally:
        with backend.db.using() as conn:
            conn.set_trace_callback(None)
    assert [kernel.shell.user_ns[f"t{i}"] for i in range(6)] == [(i, f"v{i}", [i]) for i in range(6)]
    reads = [s for s in seen if "rssd_magic_blob" in s]
    assert len(reads) == 1, reads  # not one (or two) per value


def test_a_replay_sees_what_another_process_wrote_a_moment_ago(kernel):
    # The kernel keeps each cell's latest transition between replays; a
    # commit by anyone else (here: a forget, written by another process as
    # another tool would) must be seen by the very next run.
    cell = "%%stateful\n" + APPEND + "y = 7\n"
    kernel.ok(cell)
    kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 1
    (state_id, entry_id, session_id) = kernel.rows(
        "SELECT orchestration_session_state_id, session_entry_id, session_id FROM orchestration_session_state "
        "WHERE to_state = 'EXECUTED' ORDER BY rowid DESC LIMIT 1"
    )[0]
    forget = (
        "import sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1])\n"
        "conn.execute('INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, "
        "session_entry_id, from_state, to_state, transition_reason, transitioned_at) VALUES "
        "(\\'ZZZZZZZZZZZZZZZZZZZZZZZZZ9\\', ?, ?, \\'EXECUTED\\', \\'FORGOTTEN\\', \\'by another tool\\', "
        "\\'2026-01-01 00:00:00\\')', sys.argv[2:])\n"
        "conn.commit()\n"
    )
    subprocess.run([sys.executable, "-c", forget, str(kernel.db), session_id, entry_id], check=True, timeout=60)
    kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 2, "forgotten elsewhere: it runs again"
    kernel.ok(cell)
    assert counter(kernel.workdir / "side.log") == 2, "and its new record replays"


def test_a_replay_whose_batched_read_fails_reads_its_values_one_by_one(kernel, monkeypatch):
    cell = "%%stateful\n" + "\n".join(f"p{i} = ({i}, 'w{i}')" for i in range(4))
    kernel.ok(cell)
    kernel.restart()
    backend = kernel.magics.runner.backend()

    def unreachable(digests):
        raise StoreError("the server went away for a moment")

    monkeypatch.setattr(backend.blobs, "_small_rows", unreachable)
    kernel.ok(cell)
    assert [kernel.shell.user_ns[f"p{i}"] for i in range(4)] == [(i, f"w{i}") for i in range(4)]
