"""The rough edges a newcomer hit (issue 16), each as they would type it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import counter

APPEND = "open('side.log', 'a').write('ran\\n')\n"


# -- option lines are parsed like shell lines --------------------------------------------------


def test_quoted_option_values_lose_their_quotes(kernel):
    (kernel.workdir / "my dir").mkdir()
    (kernel.workdir / "my data.csv").write_text("a\n1\n")
    cell = '%%stateful --db "my dir/state.db" --name "train model" --deps-file "my data.csv"\n' + APPEND + "m = 1\n"
    kernel.ok(cell)
    assert (kernel.workdir / "my dir" / "state.db").exists()
    (name,) = kernel.rows("SELECT json_extract(elaboration, '$.name') FROM orchestration_session_entry", db=kernel.workdir / "my dir" / "state.db")[0]
    assert name == "train model"
    shown = kernel.ok('%stateful show "train model" --db "my dir/state.db"')
    assert "--name train model" in repr(shown.result.result)
    # --name keys on the name alone: a changed declared file is not an input
    # of a named cell, so use a code-keyed cell to see the file count.
    keyed = '%%stateful --db "my dir/state.db" --deps-file "my data.csv"\n' + APPEND + "k = 1\n"
    kernel.ok(keyed)
    (kernel.workdir / "my data.csv").write_text("a\n2\n")
    rerun = kernel.ok(keyed)
    assert "file my data.csv changed" in rerun.stdout
    assert counter(kernel.workdir / "side.log") == 3


def test_an_unclosed_quote_is_one_clear_line(kernel):
    ran = kernel.run('%%stateful --name "oops\nx = 1\n')
    err = ran.result.error_in_exec
    assert type(err).__name__ == "UsageError" and "closing quotation" in str(err)
    assert "x" not in kernel.shell.user_ns


# -- the line magic never creates a store ------------------------------------------------------------


@pytest.mark.parametrize("command", ["list", "stats", "gc", "show abc", "forget --all"])
def test_a_db_typo_in_a_line_command_is_an_error_and_creates_nothing(kernel, command):
    ran = kernel.run(f"%stateful {command} --db typo.db")
    err = ran.result.error_in_exec
    assert type(err).__name__ == "UsageError"
    assert f"%stateful {command.split()[0]}:" in str(err) and "typo.db: no such file" in str(err)
    assert not (kernel.workdir / "typo.db").exists()


def test_bare_stateful_lists_the_commands(kernel):
    err = kernel.run("%stateful").result.error_in_exec
    assert type(err).__name__ == "UsageError"
    for command in ("list", "show KEY", "forget KEY|--all", "stats", "gc", "trust"):
        assert f"%stateful {command}" in str(err)


def test_cell_magic_help_shows_the_cell_magic_usage(kernel):
    doc = kernel.magics.stateful.__doc__
    assert doc.startswith("Usage:\n\n  %%stateful [--db PATH|URL]")
    assert "::" not in doc.split("\n\n")[1]
    assert "%stateful list" in doc


# -- what is said, and how ------------------------------------------------------------------------------


def test_a_missing_deps_file_is_named_on_the_first_run(kernel):
    cell = "%%stateful --deps-file data/missing.csv\n" + APPEND + "d = 1\n"
    first = kernel.ok(cell)
    assert "--deps-file matches no file: data/missing.csv" in first.stderr
    second = kernel.ok(cell)
    assert "matches no file" not in second.stderr, "said once"


def test_notebook_messages_name_the_notebook_commands(kernel):
    kernel.ok("%%stateful\nx = 1\n")
    err = kernel.run("%stateful show zzz").result.error_in_exec
    assert "`%stateful list`" in str(err) and "rssd-magic" not in str(err)
    stats = repr(kernel.ok("%stateful stats").result.result)
    assert "`%stateful gc` frees them" in stats


def test_durations_and_counts_read_the_same_everywhere(kernel):
    kernel.ok("%%stateful\nimport time\ntime.sleep(0.02)\nslept = 1\n")
    replay = kernel.ok("%%stateful\nimport time\ntime.sleep(0.02)\nslept = 1\n")
    (banner,) = replay.banner
    text = banner.data["text/plain"]
    assert " ms" in text and "s)" not in text and "0.0" not in text.split(" in ")[-1][:3]
    kernel.magics.runner.backend().flush_hits()
    key = kernel.rows("SELECT json_extract(elaboration, '$.key') FROM orchestration_session_entry")[0][0]
    shown = repr(kernel.ok(f"%stateful show {key[:10]}").result.result)
    assert "replayed 1 time)" in shown and "time(s)" not in shown
    listed = repr(kernel.ok("%stateful list").result.result)
    assert " ms" in listed


def test_list_says_what_a_cell_is_and_where_it_belongs(kernel):
    kernel.ok("%%stateful --scope team-a\nimport os\n# set up\nmodel_score = 0.93\n")
    kernel.ok("%%stateful --name nightly-load\nimport os\nloaded = 1\n")
    listing = kernel.ok("%stateful list").result.result
    text = repr(listing)
    header = text.splitlines()[0].split()
    assert header[:5] == ["KEY", "NAME", "SCOPE", "STATE", "SOURCE"]
    assert "model_score = 0.93" in text and "team-a" in text and "--name nightly-load" in text
    html = listing._repr_html_()
    assert '<td style="text-align:left">model_score = 0.93</td>' in html
    assert '<td style="text-align:right">0</td>' in html


# -- SQL cells on a plain install ----------------------------------------------------------------------

NO_PYARROW = textwrap.dedent(
    """
    import sys
    sys.modules["pyarrow"] = None  # as if it were not installed
    import duckdb
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "rssd_magic")
    shell.user_ns["con"] = duckdb.connect("t.duckdb")
    cell = (
        "%%stateful --sql --conn con --out big\\n"
        "CREATE TABLE IF NOT EXISTS n AS SELECT range AS i, 'row ' || range AS s FROM range(20000);\\n"
        "SELECT * FROM n ORDER BY i;\\n"
    )
    result = shell.run_cell(cell)
    big = shell.user_ns.get("big")
    print(result.success, type(big).__name__, None if big is None else len(big), flush=True)
    shell.magics_manager.registry["StatefulMagics"].close()
    """
)


def test_sql_cells_work_without_pyarrow(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    first = subprocess.run([sys.executable, "-c", NO_PYARROW], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert first.stdout.strip().splitlines()[-1].split() == ["True", "DataFrame", "20000"], first.stderr
    conn = sqlite3.connect(tmp_path / "resource-surveillance.sqlite.db")
    (fmt,) = conn.execute(
        "SELECT json_extract(transition_result, '$.result_value.format') FROM orchestration_session_state WHERE to_state = 'EXECUTED'"
    ).fetchone()
    conn.close()
    assert fmt == "pickle", "a large table is kept without Parquet"
    again = subprocess.run([sys.executable, "-c", NO_PYARROW], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.stdout.strip().splitlines()[-1].split() == ["True", "DataFrame", "20000"], again.stderr
    conn = sqlite3.connect(tmp_path / "resource-surveillance.sqlite.db")
    assert conn.execute("SELECT count(*) FROM orchestration_session_state WHERE to_state = 'EXECUTED'").fetchone() == (1,)
    conn.close()


# -- hits survive a kernel stopped with SIGTERM ------------------------------------------------------------


@pytest.mark.kernel
def test_hits_are_written_when_the_kernel_gets_sigterm(tmp_path):
    from jupyter_client.manager import start_new_kernel

    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path), env=env)
    try:
        for code in ["%load_ext rssd_magic", "%%stateful\nx = 41 + 1\n", "%%stateful\nx = 41 + 1\n"]:
            reply = kc.execute_interactive(code, timeout=60)
            assert reply["content"]["status"] == "ok", reply
        pid = km.provisioner.pid if km.provisioner else km.kernel.pid
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while km.is_alive():
            assert time.monotonic() < deadline, "the kernel did not stop on SIGTERM"
            time.sleep(0.1)
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)
    conn = sqlite3.connect(tmp_path / "resource-surveillance.sqlite.db")
    try:
        assert conn.execute("SELECT hits FROM rssd_magic_hit").fetchall() == [(1,)]
        finished = conn.execute("SELECT orch_finished_at IS NOT NULL FROM orchestration_session").fetchall()
        assert finished == [(1,)], "the session was finished too"
    finally:
        conn.close()
