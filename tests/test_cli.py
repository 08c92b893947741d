"""The ``rssd-magic`` command line, run in this process through click's
CliRunner (and, once each, as the console script and ``python -m
rssd_magic``) against RSSDs written by real notebook runs (nbclient, fresh
kernels).

One module-scoped notebook directory is built by running a small notebook
twice (first run executes, second replays, so hit counts are recorded when
the kernel shuts down).  Tests that change an RSSD work on a copy of that
directory; they re-run the notebook there when they need to see what the
next run does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from click.testing import CliRunner
from nbclient import NotebookClient

from rssd_magic.cli import main


ENV = "SURVEILR_STATEDB_FS_PATH"
DB_NAME = "resource-surveillance.sqlite.db"

SIDE = "%%stateful\nopen('side.txt', 'a').write('ran\\n')\ntotal = 1 + 2\nprint('total', total)"
CFG = "%%stateful\ncfg = {'a': [1, 2, 3]}\ncfg"
FAIL = "%%stateful\nraise ValueError('boom')"
NAMED = "%%stateful --name load_once\nloaded = 'yes'"
ARRAY = "%%stateful\nimport numpy as np\narr = np.arange(20000, dtype='float64')"
CELLS = ["%load_ext rssd_magic", SIDE, CFG, FAIL, NAMED, ARRAY]


# -- helpers ----------------------------------------------------------------------


def run_notebook(folder: Path) -> nbformat.NotebookNode:
    """Execute CELLS in a fresh kernel whose cwd (and so default RSSD) is *folder*."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    env_saved = os.environ.pop(ENV, None)  # the kernel inherits our environment
    try:
        NotebookClient(
            nb,
            kernel_name="python3",
            timeout=60,
            allow_errors=True,  # the FAIL cell
            resources={"metadata": {"path": str(folder)}},
        ).execute()
    finally:
        if env_saved is not None:
            os.environ[ENV] = env_saved
    return nb


def cli(*args: str, cwd: Path | None = None, env_db: str | None = None, script: bool = False):
    """Run the CLI: in this process through click's CliRunner (what
    ``rssd-magic`` runs), or, with *script*, the installed console script."""
    if script:
        env = {k: v for k, v in os.environ.items() if k != ENV}
        return subprocess.run([rssd_magic_script(), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)
    before = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        r = CliRunner().invoke(main, list(args), env={ENV: env_db}, catch_exceptions=False)
    finally:
        os.chdir(before)
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def rssd_magic_script() -> str:
    beside = Path(sys.executable).parent / "rssd-magic"
    found = str(beside) if beside.exists() else shutil.which("rssd-magic")
    assert found, "the rssd-magic console script is not installed"
    return found


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def as_json(db: Path, *args: str):
    return json.loads(ok(cli("--db", str(db), *args)))


def cells_by_source(db: Path) -> dict[str, dict]:
    """list --json, keyed by which of our notebook cells each entry is."""
    out = {}
    for cell in as_json(db, "list", "--json"):
        for label, src in (("side", SIDE), ("cfg", CFG), ("fail", FAIL), ("named", NAMED), ("array", ARRAY)):
            body = src.split("\n", 1)[1]
            if cell["source"].strip() == body.strip():
                out[label] = cell
    return out


def sql(db: Path, query: str, *params):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def state_rows(db: Path) -> int:
    return sql(db, "SELECT count(*) FROM orchestration_session_state WHERE session_entry_id IS NOT NULL")[0][0]


def integrity_ok(db: Path) -> None:
    assert sql(db, "PRAGMA integrity_check") == [("ok",)]
    assert sql(db, "PRAGMA foreign_key_check") == []


def clone(base, tmp_path: Path) -> SimpleNamespace:
    folder = tmp_path / "nb"
    shutil.copytree(base.dir, folder)
    return SimpleNamespace(dir=folder, db=folder / DB_NAME)


# -- the notebook-made RSSD --------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notebook")
    first = run_notebook(folder)
    second = run_notebook(folder)
    # Sanity of the material itself: one real execution, then a replay.
    assert (folder / "side.txt").read_text() == "ran\n"
    assert any("total 3" in o.get("text", "") for o in first.cells[1].outputs)
    assert any("total 3" in o.get("text", "") for o in second.cells[1].outputs)
    db = folder / DB_NAME
    assert db.exists()
    return SimpleNamespace(dir=folder, db=db, cells=cells_by_source(db))


# -- list -------------------------------------------------------------------------------


@pytest.mark.kernel
def test_list_json_describes_every_cell_in_notebook_order(base):
    cells = as_json(base.db, "list", "--json")
    assert isinstance(cells, list) and len(cells) == 5
    for c in cells:
        for field in ("key", "name", "state", "source", "executed_at", "host", "duration_s", "hits", "transitions"):
            assert field in c, field
        assert re.fullmatch(r"[0-9a-f]{64}", c["key"])
    by = base.cells
    assert set(by) == {"side", "cfg", "fail", "named", "array"}
    # Newest first: the failing cell ran (and failed) again in the second run; the others replayed.
    assert [c["key"] for c in cells] == [by[k]["key"] for k in ("fail", "array", "named", "cfg", "side")]
    for label in ("side", "cfg", "named", "array"):
        c = by[label]
        assert c["state"] == "EXECUTED"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", c["executed_at"])
        assert c["host"] == socket.gethostname()
        assert c["duration_s"] > 0
        assert c["hits"] == 1, "the second run replayed once, counted at kernel shutdown"
        assert c["transitions"] == 2  # INITIAL→RUNNING→EXECUTED
    fail = by["fail"]
    assert fail["state"] == "FAILED"
    assert fail["executed_at"] is None and fail["hits"] == 0
    assert fail["transitions"] == 4  # ran (and failed) in both runs
    assert by["named"]["name"] == "load_once" and by["named"]["kind"] == "name"
    assert by["side"]["name"] is None and by["side"]["kind"] == "code"


@pytest.mark.kernel
def test_list_text_is_aligned_and_found_by_env_and_cwd_default(base):
    out = ok(cli("--db", str(base.db), "list"))
    lines = out.splitlines()
    header = lines[0]
    for col in ("KEY", "NAME", "SCOPE", "STATE", "SOURCE", "EXECUTED AT", "HOST", "DURATION", "HITS"):
        assert col in header
    rows = lines[1:]
    assert len(rows) == 5
    state_col, source_col = header.index("STATE"), header.index("SOURCE")
    by_prefix = {c["key"][:12]: c for c in base.cells.values()}
    for row in rows:
        cell = by_prefix[row[:12]]
        assert row[12] == " "  # exactly a 12-character key prefix
        assert row[state_col:].split()[0] == cell["state"]
        # The --name, else the first line that is not an import or a comment.
        lines = [ln.strip() for ln in cell["source"].splitlines() if ln.strip()]
        telling = [ln for ln in lines if not ln.startswith(("#", "import ", "from "))]
        label = f"--name {cell['name']}" if cell["name"] is not None else (telling or lines)[0]
        assert row[source_col:].startswith(label[:20])
    named = next(r for r in rows if r.startswith(base.cells["named"]["key"][:12]))
    assert "load_once" in named
    # Same file found through $SURVEILR_STATEDB_FS_PATH and through the cwd default.
    assert ok(cli("list", env_db=str(base.db), cwd=base.dir.parent)) == out
    assert ok(cli("list", cwd=base.dir)) == out


@pytest.mark.kernel
def test_list_limit_shows_the_newest_and_ends_its_read_cleanly(base):
    # More cells than the limit: the listing stops early, and the read it
    # started must end then, not when the process tears the store down
    # (that printed "Exception ignored ... closed database" on stderr).
    everything = as_json(base.db, "list", "--json")
    shown = cli("--db", str(base.db), "list", "--limit", "2", script=True)
    rows = ok(shown).splitlines()[1:]
    assert [r[:12] for r in rows] == [c["key"][:12] for c in everything[:2]]
    assert "the 2 newest cells shown" in shown.stderr
    assert "Exception" not in shown.stderr and "Traceback" not in shown.stderr, shown.stderr
    limited = json.loads(ok(cli("--db", str(base.db), "list", "--limit", "3", "--json", script=True)))
    assert limited == everything[:3]


@pytest.mark.kernel
def test_console_script_runs_the_same_cli(base):
    via_script = cli("--db", str(base.db), "list", "--json", script=True)
    assert json.loads(ok(via_script)) == as_json(base.db, "list", "--json")
    assert "rssd-magic" in ok(cli("--version", script=True))


# -- show -------------------------------------------------------------------------------


@pytest.mark.kernel
def test_show_json_lists_transitions_and_replayable_outputs(base):
    side = as_json(base.db, "show", base.cells["side"]["key"][:8], "--json")
    assert side["key"] == base.cells["side"]["key"]
    assert side["source"].strip() == SIDE.split("\n", 1)[1]
    assert [(t["from"], t["to"]) for t in side["transitions"]] == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]
    for t in side["transitions"]:
        assert re.fullmatch(r"[0-9A-Z]{26}", t["id"]) and t["session"] and t["host"] == socket.gethostname()
    assert side["transitions"][0]["reason"] == "first run"
    assert side["outputs"] == [{"output_type": "stream", "name": "stdout", "text": "total 3\n"}]
    assert side["names"]["total"]["kind"] == "json"

    cfg = as_json(base.db, "show", base.cells["cfg"]["key"], "--json")
    results = [o for o in cfg["outputs"] if o["output_type"] == "execute_result"]
    assert results and results[0]["data"]["text/plain"] == "{'a': [1, 2, 3]}"
    assert cfg["names"]["cfg"]["kind"] == "pickle"

    fail = as_json(base.db, "show", base.cells["fail"]["key"][:10], "--json")
    assert fail["state"] == "FAILED" and fail["outputs"] is None
    assert [t["to"] for t in fail["transitions"]] == ["RUNNING", "FAILED", "RUNNING", "FAILED"]
    assert fail["transitions"][2]["reason"] == "retry after FAILED"
    assert fail["error"]["ename"] == "ValueError" and fail["error"]["evalue"] == "boom"
    assert "ValueError" in fail["error"]["traceback"]
    # Each transition starts where the previous one ended.
    chain = fail["transitions"]
    assert all(a["to"] == b["from"] for a, b in zip(chain, chain[1:]))


@pytest.mark.kernel
def test_show_text(base):
    array = base.cells["array"]
    out = ok(cli("--db", str(base.db), "show", array["key"][:12]))
    assert array["key"] in out
    assert "arr = np.arange(20000, dtype='float64')" in out
    assert re.search(r"INITIAL\s+RUNNING", out) and re.search(r"RUNNING\s+EXECUTED", out)
    assert re.search(r"arr\s+pickle\s+numpy\.ndarray\s+160\.\d kB", out)
    assert "replayed 1 time" in out
    fail = ok(cli("--db", str(base.db), "show", base.cells["fail"]["key"][:12]))
    assert "FAILED" in fail and "ValueError: boom" in fail
    assert "outputs replayed" not in fail


@pytest.mark.kernel
def test_key_prefixes_resolve_and_ambiguity_lists_candidates(base, tmp_path):
    work = clone(base, tmp_path)
    cfg = base.cells["cfg"]
    key = cfg["key"]
    # Full key, short prefix, upper case, and the --name all resolve.
    for given in (key, key[:6], key[:6].upper()):
        assert as_json(work.db, "show", given, "--json")["key"] == key
    assert as_json(work.db, "show", "load_once", "--json")["key"] == base.cells["named"]["key"]
    # A second cell sharing the first 10 hex digits makes key[:10] ambiguous.
    twin = key[:10] + ("0" if key[10] != "0" else "1") + "f" * 53
    conn = sqlite3.connect(work.db)
    with conn:
        session = conn.execute("SELECT orchestration_session_id FROM orchestration_session LIMIT 1").fetchone()[0]
        conn.execute(
            "INSERT INTO orchestration_session_entry VALUES (?, ?, ?, NULL, ?)",
            ("01ZZZZZZZZZZZZZZZZZZZZZZZZ", session, f"rssd-magic:default#{twin}",
             json.dumps({"key": twin, "scope": "default", "kind": "code", "name": None, "source": "x = 'twin'\n"})),
        )
    conn.close()
    amb = cli("--db", str(work.db), "show", key[:10])
    assert amb.returncode == 1
    assert "ambiguous" in amb.stderr and key[:12] in amb.stderr and twin[:12] in amb.stderr
    assert len(amb.stderr.strip().splitlines()) == 1
    assert as_json(work.db, "show", key[:11], "--json")["key"] == key
    assert as_json(work.db, "show", twin[:11], "--json")["state"] is None  # entry without transitions
    # forget refuses an ambiguous prefix too, and writes nothing.
    before = state_rows(work.db)
    assert cli("--db", str(work.db), "forget", key[:10]).returncode == 1
    assert state_rows(work.db) == before
    none = cli("--db", str(work.db), "show", "deadbeefdeadbeef")
    assert none.returncode == 1 and "deadbeefdeadbeef" in none.stderr


@pytest.mark.kernel
def test_entries_sharing_an_ingest_src_are_one_cell(base, tmp_path):
    """Two RSSDs merged can hold two entries for one cell; its state is the
    latest transition over both, as the magic itself reads it."""
    work = clone(base, tmp_path)
    cfg = base.cells["cfg"]
    conn = sqlite3.connect(work.db)
    with conn:
        session = conn.execute("SELECT orchestration_session_id FROM orchestration_session LIMIT 1").fetchone()[0]
        conn.execute(
            "INSERT INTO orchestration_session_entry VALUES ('01ZZZZZZZZZZZZZZZZZZZZZZZZ', ?, ?, NULL, NULL)",
            (session, cfg["ingest_src"]),
        )
        conn.execute(
            "INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, session_entry_id,"
            " from_state, to_state, transition_reason) VALUES"
            " ('01ZZZZZZZZZZZZZZZZZZZZZZZZ', ?, '01ZZZZZZZZZZZZZZZZZZZZZZZZ', 'EXECUTED', 'FORGOTTEN', 'merged')",
            (session,),
        )
    conn.close()
    cells = as_json(work.db, "list", "--json")
    assert len(cells) == 5
    merged = next(c for c in cells if c["key"] == cfg["key"])
    assert (merged["state"], merged["transitions"], merged["hits_total"]) == ("FORGOTTEN", 3, 1)
    assert merged["source"] == cfg["source"]  # from the first entry
    shown = as_json(work.db, "show", cfg["key"][:12], "--json")
    assert [t["to"] for t in shown["transitions"]] == ["RUNNING", "EXECUTED", "FORGOTTEN"]


# -- stats ------------------------------------------------------------------------------


@pytest.mark.kernel
def test_stats_json_and_text(base):
    s = as_json(base.db, "stats", "--json")
    cells = list(base.cells.values())
    assert s["cells"] == 5 and s["executed"] == 4
    assert s["by_state"] == {"EXECUTED": 4, "FAILED": 1}
    assert s["transitions"] == sum(c["transitions"] for c in cells) == 12
    assert s["hits"] == 4
    expected_saved = sum(c["hits"] * (c["duration_s"] or 0) for c in cells)
    assert s["time_saved_s"] == pytest.approx(expected_saved, rel=1e-3, abs=1e-6) and s["time_saved_s"] > 0
    st = s["storage"]
    (blobs, blob_bytes), = sql(base.db, "SELECT count(*), sum(size) FROM rssd_magic_blob")
    assert (st["blobs"], st["blob_bytes"]) == (blobs, blob_bytes)
    assert blob_bytes > 160_000  # the numpy array's out-of-band buffer
    assert st["file_bytes"] == base.db.stat().st_size
    assert 0 < st["result_json_bytes"] < st["file_bytes"]
    assert st["unreferenced_blobs"] == 0
    text = ok(cli("--db", str(base.db), "stats"))
    assert re.search(r"^cells\s+5 \(4 executed, 1 failed\)", text, re.M)
    assert re.search(r"^hits\s+4$", text, re.M)
    assert re.search(r"^time saved\s+\S+", text, re.M)
    assert str(base.db) in text


# -- forget -----------------------------------------------------------------------------


@pytest.mark.kernel
def test_forget_appends_forgotten_and_the_cell_runs_again(base, tmp_path):
    work = clone(base, tmp_path)
    side = base.cells["side"]
    rows = state_rows(work.db)
    out = ok(cli("--db", str(work.db), "forget", side["key"][:9]))
    assert out.startswith(f"forgot {side['key'][:12]}") and "EXECUTED → FORGOTTEN" in out
    assert state_rows(work.db) == rows + 1  # appended, nothing deleted
    shown = as_json(work.db, "show", side["key"], "--json")
    last = shown["transitions"][-1]
    assert (last["from"], last["to"]) == ("EXECUTED", "FORGOTTEN")
    assert re.fullmatch(r"forgotten by \S+@\S+", last["reason"])
    assert shown["outputs"] is None
    after = cells_by_source(work.db)
    assert after["side"]["state"] == "FORGOTTEN"
    assert {after[k]["state"] for k in ("cfg", "named", "array")} == {"EXECUTED"}
    # Forgetting a cell that is not EXECUTED is a no-op.
    nothing = cli("--db", str(work.db), "forget", base.cells["fail"]["key"][:12])
    assert nothing.returncode == 0 and "nothing to forget" in nothing.stderr
    assert state_rows(work.db) == rows + 1
    integrity_ok(work.db)

    run_notebook(work.dir)
    assert (work.dir / "side.txt").read_text() == "ran\nran\n"  # executed again
    again = cells_by_source(work.db)
    assert again["side"]["state"] == "EXECUTED" and again["side"]["hits"] == 0
    assert [t["reason"] for t in as_json(work.db, "show", side["key"], "--json")["transitions"]][-2:] == [
        "retry after FORGOTTEN",
        "completed",
    ]
    # The others replayed: same record, one more hit.
    for k in ("cfg", "named", "array"):
        assert again[k]["state_id"] == base.cells[k]["state_id"]
        assert again[k]["hits"] == 2
    integrity_ok(work.db)


@pytest.mark.kernel
def test_forget_all(base, tmp_path):
    work = clone(base, tmp_path)
    rows = state_rows(work.db)
    done = json.loads(ok(cli("--db", str(work.db), "forget", "--all", "--json")))
    executed = {base.cells[k]["key"] for k in ("side", "cfg", "named", "array")}
    assert {d["key"] for d in done} == executed
    assert all(d["from_state"] == "EXECUTED" and d["to_state"] == "FORGOTTEN" for d in done)
    assert state_rows(work.db) == rows + 4
    states = {c["key"]: c["state"] for c in as_json(work.db, "list", "--json")}
    assert states == {**{k: "FORGOTTEN" for k in executed}, base.cells["fail"]["key"]: "FAILED"}
    # Nothing left to forget; text output says so.
    assert "nothing to forget" in ok(cli("--db", str(work.db), "forget", "--all"))
    assert state_rows(work.db) == rows + 4
    # Exactly one of KEY / --all.
    assert cli("--db", str(work.db), "forget").returncode == 2
    assert cli("--db", str(work.db), "forget", "abc", "--all").returncode == 2
    integrity_ok(work.db)
    run_notebook(work.dir)
    assert (work.dir / "side.txt").read_text() == "ran\nran\n"
    assert as_json(work.db, "stats", "--json")["executed"] == 4


# -- gc ---------------------------------------------------------------------------------


def _blob_digests(db: Path, state_id: str) -> set[str]:
    (text,), = sql(db, "SELECT transition_result FROM orchestration_session_state WHERE orchestration_session_state_id = ?", state_id)
    out = set()
    for spec in json.loads(text)["names"].values():
        if spec["kind"] == "pickle":
            out |= {spec["blob"], *spec["buffers"]}
    return out


@pytest.mark.kernel
def test_gc_frees_only_unreferenced_blobs(base, tmp_path):
    work = clone(base, tmp_path)
    array_blobs = _blob_digests(work.db, base.cells["array"]["state_id"])
    cfg_blobs = _blob_digests(work.db, base.cells["cfg"]["state_id"])
    assert len(array_blobs) == 2 and len(cfg_blobs) == 1  # pickle + out-of-band buffer; in-band pickle
    all_blobs = {d for (d,) in sql(work.db, "SELECT digest FROM rssd_magic_blob")}
    assert array_blobs | cfg_blobs == all_blobs
    array_bytes = sql(
        work.db, f"SELECT sum(size) FROM rssd_magic_blob WHERE digest IN ({','.join('?' * len(array_blobs))})", *array_blobs
    )[0][0]

    # Everything is referenced: nothing to free.
    assert json.loads(ok(cli("--db", str(work.db), "gc", "--json")))["deleted"] == 0
    ok(cli("--db", str(work.db), "forget", base.cells["array"]["key"][:12]))
    st = as_json(work.db, "stats", "--json")["storage"]
    assert (st["unreferenced_blobs"], st["unreferenced_blob_bytes"]) == (2, array_bytes)
    dry = json.loads(ok(cli("--db", str(work.db), "gc", "--dry-run", "--json")))
    assert (dry["deleted"], dry["bytes_freed"]) == (2, array_bytes)
    assert {d for (d,) in sql(work.db, "SELECT digest FROM rssd_magic_blob")} == all_blobs  # dry run kept them

    rows = state_rows(work.db)
    out = ok(cli("--db", str(work.db), "gc"))
    assert out.startswith("freed 2 blobs")
    assert {d for (d,) in sql(work.db, "SELECT digest FROM rssd_magic_blob")} == cfg_blobs
    assert state_rows(work.db) == rows  # history untouched
    again = json.loads(ok(cli("--db", str(work.db), "gc", "--json")))
    assert (again["deleted"], again["bytes_freed"], again["kept"]) == (0, 0, 1)
    integrity_ok(work.db)


# -- bad --db (no kernel) -----------------------------------------------------------------

COMMANDS = [["list"], ["list", "--json"], ["show", "abc"], ["forget", "--all"], ["stats"], ["gc"]]


def _assert_refused(result, path: Path, cause: str):
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and cause in lines[0]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
def test_missing_file_is_refused_and_not_created(tmp_path, args):
    db = tmp_path / "nope.db"
    _assert_refused(cli("--db", str(db), *args), db, "no such file")
    missing_dir = tmp_path / "nodir" / "x.db"
    _assert_refused(cli("--db", str(missing_dir), *args), missing_dir, "no such file")
    # The default path (cwd) and the environment variable are refused alike.
    _assert_refused(cli(*args, cwd=tmp_path), tmp_path / DB_NAME, "no such file")
    _assert_refused(cli(*args, env_db=str(db), cwd=tmp_path), db, "no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
def test_text_file_is_refused(tmp_path, args):
    db = tmp_path / "notes.txt"
    db.write_text("not a database\n")
    _assert_refused(cli("--db", str(db), *args), db, "not a SQLite database")
    assert db.read_text() == "not a database\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
def test_sqlite_file_without_rssd_tables_is_refused_and_left_alone(tmp_path, args):
    db = tmp_path / "other.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    _assert_refused(cli("--db", str(db), *args), db, "not an RSSD")
    assert db.read_bytes() == before  # no tables added, not switched to WAL
    assert sql(db, "SELECT name FROM sqlite_master") == [("notes",)]


def test_empty_file_is_refused(tmp_path):
    db = tmp_path / "empty.db"
    db.touch()
    _assert_refused(cli("--db", str(db), "forget", "--all"), db, "not an RSSD")
    assert db.stat().st_size == 0


def test_rssd_without_cells(tmp_path):
    from rssd_magic.backends.sqlite import SqliteBackend

    db = tmp_path / DB_NAME
    SqliteBackend.open(db).close()  # a fresh RSSD: tables, no cells
    assert as_json(db, "list", "--json") == []
    empty = cli("--db", str(db), "list")
    assert empty.returncode == 0 and empty.stdout == "" and "no %%stateful cells" in empty.stderr
    s = as_json(db, "stats", "--json")
    assert (s["cells"], s["hits"], s["storage"]["blobs"]) == (0, 0, 0)
    assert json.loads(ok(cli("--db", str(db), "forget", "--all", "--json"))) == []
    assert json.loads(ok(cli("--db", str(db), "gc", "--json")))["deleted"] == 0
    missing = cli("--db", str(db), "show", "abc")
    assert missing.returncode == 1 and "abc" in missing.stderr
    integrity_ok(db)


def test_cli_does_not_import_ipython():
    code = "import sys, rssd_magic.cli, rssd_magic.manage.report; print(sorted(m for m in sys.modules if m.split('.')[0] == 'IPython'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_db_option_is_accepted_after_the_command_too(tmp_path):
    import subprocess as sp
    import sys as _sys

    missing = tmp_path / "nope.db"
    out = sp.run([_sys.executable, "-m", "rssd_magic", "list", "--db", str(missing)], capture_output=True, text=True)
    assert out.returncode != 0 and str(missing) in out.stderr and not missing.exists()
    out = sp.run([_sys.executable, "-m", "rssd_magic", "trust", "--db", str(missing)], capture_output=True, text=True)
    assert out.returncode != 0 and "no such file" in out.stderr


def test_a_record_written_past_the_json_check_lists_shows_and_counts(tmp_path):
    # Another tool can switch CHECK constraints off and leave text SQLite
    # itself can't parse; the reports read it as empty, not as a traceback.
    db = tmp_path / DB_NAME
    code = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "sh = InteractiveShell.instance(); sh.run_line_magic('load_ext', 'rssd_magic')\n"
        f"sh.run_cell('%%stateful --db {db}\\nx = 1\\n')\n"
        "sh.magics_manager.registry['StatefulMagics'].close()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute("UPDATE orchestration_session_state SET transition_result = '{not json' WHERE to_state = 'EXECUTED'")
    conn.commit()
    conn.close()
    (cell,) = as_json(db, "list", "--json")
    assert cell["state"] == "EXECUTED" and cell["host"] is None and cell["duration_s"] is None
    shown = as_json(db, "show", cell["key"][:10], "--json")
    assert shown["outputs"] == [] and shown["names"] == {}
    assert as_json(db, "stats", "--json")["cells"] == 1


@pytest.mark.kernel
def test_read_only_commands_and_an_import_source_leave_no_files_behind(base, tmp_path, pg_url):
    c = clone(base, tmp_path)
    beside = lambda: sorted(p.name for p in c.dir.iterdir() if p.name.startswith(DB_NAME))  # noqa: E731
    assert beside() == [DB_NAME]
    key = base.cells["side"]["key"]
    for args in (["list"], ["list", "--json"], ["stats"], ["gc", "--dry-run"], ["verify"], ["show", key[:12]]):
        ok(cli("--db", str(c.db), *args))
        assert beside() == [DB_NAME], args
    ok(cli("--db", pg_url, "import", str(c.db)))
    assert beside() == [DB_NAME], "import's source"
