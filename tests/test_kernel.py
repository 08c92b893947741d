"""Kernel tier: notebooks run twice, each time in a fresh Jupyter kernel
through nbclient, as a user would run them.  What the first run showed must
come back on the second (plus the banner), side effects must happen once,
names must be usable by later cells, and the RSSD must hold exactly the
transitions the README promises, readable with plain sqlite3.

Kernel start-up is the cost here, so each notebook checks several things.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import zlib
from datetime import datetime
from pathlib import Path

import nbformat
import pytest

from kernel_util import (
    TIMEOUT_S,
    banners,
    check_rssd,
    errors_of,
    execute,
    is_note,
    plain_traceback,
    query,
    strip_volatile,
    text_of,
    transitions,
)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "notebooks" / "demo.ipynb"
DEFAULT_DB = "resource-surveillance.sqlite.db"
ENV_RSSD = "SURVEILR_STATEDB_FS_PATH"

LOAD = "%load_ext rssd_magic"


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def tiny_png() -> bytes:
    """A valid 1x1 RGB PNG, made by hand (no imaging library needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x80\x00"))
        + chunk(b"IEND", b"")
    )


def sessions(db: Path) -> list[tuple[str, str | None]]:
    return query(
        db,
        "SELECT orchestration_session_id, orch_finished_at FROM orchestration_session "
        "ORDER BY orchestration_session_id",
    )


def session_ids(db: Path) -> list[str]:
    return [sid for sid, _ in sessions(db)]


def states_by_entry(db: Path) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for src, frm, to, _ in transitions(db):
        out.setdefault(src, []).append((frm, to))
    return out


# -- 1. outputs, side effects, banner, sessions, states -----------------------

OUTPUT_CELL = """%%stateful
import sys
from IPython.display import HTML, Image, display
print("to stdout", flush=True)
print("to stderr", file=sys.stderr, flush=True)
display(HTML("<b>bold</b> html"))
display(Image(data=PNG, width=8))
with open("side-effect.log", "a") as fh:
    fh.write("ran\\n")
del fh  # a closed file can't be kept, and the test wants no notes
answer = 6 * 7
{"answer": answer, "label": "result"}
"""

QUIET_CELL = """%%stateful --quiet
quiet_value = answer + 1
print("quiet", quiet_value)
"""


def test_outputs_replay_identically_side_effect_once_and_rssd_records_it(tmp_path):
    png = tiny_png()
    cells = [
        LOAD,
        f"PNG = {png!r}",
        OUTPUT_CELL,
        QUIET_CELL,
        'print(answer, quiet_value, open("side-effect.log").read().count("ran"))',
    ]
    first = execute(cells, tmp_path)
    second = execute(cells, tmp_path)
    db = tmp_path / DEFAULT_DB

    # The body ran once: its side effect happened once over two kernels.
    assert lines(tmp_path / "side-effect.log") == 1

    # Run 1 shows what the cell did, with no banner; the store it made is
    # said once, in a display of its own, before the cell's outputs.
    (created, *out1) = first.cells[2].outputs
    assert created["output_type"] == "display_data" and created["metadata"] == {"rssd_magic": {"note": "created"}}
    assert created["data"] == {"text/plain": f"[stateful] created a new RSSD: {tmp_path / DEFAULT_DB}"}
    assert not any(is_note(o) for c in first.cells[3:] + second.cells for o in c.outputs)
    assert banners(first.cells[2]) == [] and banners(first.cells[3]) == []
    kinds = [o["output_type"] for o in out1]
    assert kinds == ["stream", "stream", "display_data", "display_data", "execute_result"], kinds
    assert text_of(first.cells[2], "stdout") == "to stdout\n"
    assert text_of(first.cells[2], "stderr") == "to stderr\n"
    assert out1[2]["data"]["text/html"] == "<b>bold</b> html"
    assert base64.b64decode(out1[3]["data"]["image/png"]) == png
    assert out1[3]["metadata"] == {"image/png": {"width": 8}}
    assert out1[4]["data"]["text/plain"] == "{'answer': 42, 'label': 'result'}"

    # Run 2 replays the same outputs, after exactly one banner (first output).
    assert strip_volatile(second) == strip_volatile(first)
    replayed = second.cells[2]
    assert len(banners(replayed)) == 1 and replayed.outputs[0] is banners(replayed)[0]
    assert "replayed" in replayed.outputs[0]["data"]["text/plain"]
    assert banners(second.cells[3]) == [], "--quiet hides the banner"
    assert text_of(second.cells[3]) == "quiet 43\n"
    # Names were restored for the later plain cell; the file still has one line.
    assert text_of(second.cells[4]) == text_of(first.cells[4]) == "42 43 1\n"

    # The RSSD: sound, one chain per cell, all written by the first kernel.
    check_rssd(db)
    ids = session_ids(db)
    assert len(ids) == 2, "one orchestration_session per kernel"
    chains = states_by_entry(db)
    assert len(chains) == 2
    assert all(src.startswith("rssd-magic:") for src in chains)
    assert list(chains.values()) == [[("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]] * 2
    assert {sid for *_, sid in transitions(db)} == {ids[0]}
    assert query(db, "SELECT count(*) FROM orchestration_session_entry") == [(2,)]
    assert query(db, "SELECT name, state, boundary FROM device")[0][1:] == ('"SINGLETON"', "UNKNOWN")
    assert query(db, "SELECT count(*) FROM device") == [(1,)]

    # Every kernel session was marked finished at clean shutdown.
    for sid, finished in sessions(db):
        assert finished is not None, f"session {sid} has no orch_finished_at"
        datetime.strptime(finished, "%Y-%m-%d %H:%M:%S")

    # The EXECUTED row holds the outputs in nbformat shape, plus the rest.
    [(result,)] = query(
        db,
        """SELECT s.transition_result FROM orchestration_session_state s
           JOIN orchestration_session_entry e ON e.orchestration_session_entry_id = s.session_entry_id
           WHERE s.to_state = 'EXECUTED' AND json_extract(e.elaboration, '$.source') LIKE '%side-effect.log%'""",
    )
    record = json.loads(result)
    assert [o["output_type"] for o in record["outputs"]] == kinds
    assert base64.b64decode(record["outputs"][3]["data"]["image/png"]) == png
    assert record["names"]["answer"] == {"kind": "json", "value": 42}
    assert {"host", "duration_s", "code_hash"} <= set(record)


# -- 2. names in a fresh kernel -----------------------------------------------

NAMES_CELL = """%%stateful
import json as js
import numpy as np
import pandas as pd
scale = 3
arr = np.arange(5, dtype=float)
df = pd.DataFrame({"a": np.arange(20_000), "b": ["x"] * 20_000})
big = np.ones(100_000)          # large enough for an out-of-band blob
def times_scale(v):
    return v * scale            # reads a global: must see the live one
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm1(self):
        return abs(self.x) + abs(self.y)
p = Point(1, -2)
"""

USE_NAMES = """arr[0] = 10.0
big[0] = 5.0
scale = 4
print(times_scale(2), arr.sum(), big.sum(), arr.flags.writeable, big.flags.writeable)
print(Point(3, 4).norm1(), p.norm1(), isinstance(p, Point), type(p).__name__)
print(js.dumps({"a": [1]}), np.__name__, js.__name__)
df.iloc[0, 0] = 7
print(df.shape, int(df["a"].sum()), df["b"].iloc[-1])
"""


@pytest.fixture(scope="module")
def two_kernels(tmp_path_factory):
    """One notebook run in two fresh kernels (the second replays): names,
    results, classes and instances restored across kernels, each checked by
    a test of its own on the same two runs (a kernel start is the costly
    part)."""
    folder = tmp_path_factory.mktemp("two-kernels")
    cells = [LOAD, NAMES_CELL, USE_NAMES, RESULT_CELL, "print(_ + 1, type(_).__name__)",
             METHOD_CELL, "factor = 10\nprint(Scaler().apply(2))",
             PLAIN_CLASS, INSTANCE_CELL, "print(isinstance(obj, Plain), type(obj) is Plain)"]  # fmt: skip
    return folder, execute(cells, folder), execute(cells, folder)


def test_names_are_restored_for_later_cells_in_a_fresh_kernel(two_kernels):
    folder, first, second = two_kernels
    expected = (
        "8 20.0 100004.0 True True\n7 3 True Point\n{\"a\": [1]} numpy json\n"
        f"(20000, 2) {sum(range(20_000)) + 7} x\n"
    )
    assert text_of(first.cells[2]) == expected
    assert len(banners(second.cells[1])) == 1, "run 2 must replay"
    assert text_of(second.cells[1], "stderr") == "", "every name restored, no notes"
    assert text_of(second.cells[2]) == expected
    check_rssd(folder / DEFAULT_DB)
    # The large array went to the blob table, not into the JSON.
    assert query(folder / DEFAULT_DB, "SELECT count(*) FROM rssd_magic_blob WHERE size >= 800000") == [(1,)]


# -- 3. a failing cell is not cached ------------------------------------------

FAILING_CELL = """%%stateful
with open("fail-side-effect.log", "a") as fh:
    fh.write("tried\\n")
print("before the error")
raise ValueError("boom")
"""


SLOW_CELL = """%%stateful
import time
with open("slow-side-effect.log", "a") as fh:
    fh.write("started\\n")
del fh
time.sleep(60)
"""


def _interrupt_slow_cell(cell) -> int:
    """nbclient timeout per cell: interrupt SLOW_CELL after 2 s."""
    return 2 if "time.sleep(60)" in cell.source else TIMEOUT_S


def test_failed_and_interrupted_cells_are_not_cached(tmp_path):
    cells = [LOAD, FAILING_CELL, SLOW_CELL, "print('after')"]
    runs = [
        execute(cells, tmp_path, allow_errors=True, timeout_func=_interrupt_slow_cell, interrupt_on_timeout=True)
        for _ in range(2)
    ]
    db = tmp_path / DEFAULT_DB

    for nb in runs:
        cell = nb.cells[1]
        assert banners(cell) == [], "a failed cell is never replayed"
        assert text_of(cell, "stdout") == "before the error\n"
        (err,) = errors_of(cell)  # the traceback shown exactly once
        assert (err["ename"], err["evalue"]) == ("ValueError", "boom")
        tb = plain_traceback(err)
        assert 'raise ValueError("boom")' in tb, "the body's own traceback"
        assert "Traceback" not in text_of(cell, "stderr") and "boom" not in text_of(cell, "stderr")
        assert banners(nb.cells[2]) == []
        assert [e["ename"] for e in errors_of(nb.cells[2])] == ["KeyboardInterrupt"]
        assert text_of(nb.cells[3]) == "after\n"

    # Both ran both times.
    assert lines(tmp_path / "fail-side-effect.log") == 2
    assert lines(tmp_path / "slow-side-effect.log") == 2
    check_rssd(db)
    failing, slow = states_by_entry(db).values()
    assert failing == [("INITIAL", "RUNNING"), ("RUNNING", "FAILED"), ("FAILED", "RUNNING"), ("RUNNING", "FAILED")]
    assert slow == [
        ("INITIAL", "RUNNING"),
        ("RUNNING", "INTERRUPTED"),
        ("INTERRUPTED", "RUNNING"),
        ("RUNNING", "INTERRUPTED"),
    ]
    errors = query(
        db,
        "SELECT to_state, json_extract(transition_result, '$.error.ename'), "
        "json_extract(transition_result, '$.error.traceback') IS NOT NULL "
        "FROM orchestration_session_state WHERE to_state IN ('FAILED', 'INTERRUPTED', 'EXECUTED') "
        "ORDER BY rowid",
    )
    assert errors == [("FAILED", "ValueError", 1), ("INTERRUPTED", "KeyboardInterrupt", 1)] * 2


def test_failing_cell_stops_a_notebook_run_without_allow_errors(tmp_path):
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="boom"):
        execute([LOAD, FAILING_CELL, "print('after')"], tmp_path)
    assert lines(tmp_path / "fail-side-effect.log") == 1


# -- 4. --name cells, normalized code, --force --------------------------------


def named(body: str) -> str:
    return "%%stateful --name setup\n" + body


NAMED_V1 = named('with open("named.log", "a") as fh:\n    fh.write("v1\\n")\ndel fh\nversion = 1\nprint("setup v1")\n')
NAMED_V2 = named('with open("named.log", "a") as fh:\n    fh.write("v2\\n")\ndel fh\nversion = 2\nprint("setup v2")\n')
CODE_V1 = "%%stateful\ntotal=1+2\nprint('total', total)\n"
CODE_V1_RESTYLED = "%%stateful\n# the same code, restyled\n\ntotal = 1 + 2   # spacing\n\nprint( 'total' , total )\n"
FORCED = '%%stateful --force\nwith open("forced.log", "a") as fh:\n    fh.write("x\\n")\ndel fh\n'


def test_named_cell_runs_once_despite_edits_and_code_keys_ignore_style(tmp_path):
    first = execute([LOAD, NAMED_V1, CODE_V1, FORCED, "print(version, total)"], tmp_path)
    second = execute([LOAD, NAMED_V2, CODE_V1_RESTYLED, FORCED, "print(version, total)"], tmp_path)
    db = tmp_path / DEFAULT_DB

    assert text_of(first.cells[1], "stdout") == "setup v1\n"
    # The edited named cell replays the recorded run, and says so in one line.
    assert len(banners(second.cells[1])) == 1
    assert text_of(second.cells[1], "stdout") == "setup v1\n"
    notes = [ln for ln in text_of(second.cells[1], "stderr").splitlines() if "changed" in ln]
    assert len(notes) == 1 and "--name setup" in notes[0]
    assert (tmp_path / "named.log").read_text() == "v1\n"
    # A restyled cell (comments, blank lines, spacing) is the same cell.
    assert len(banners(second.cells[2])) == 1
    assert text_of(second.cells[2], "stdout") == "total 3\n"
    assert text_of(second.cells[4]) == text_of(first.cells[4]) == "1 3\n"
    # --force runs again (no banner) and history is kept.
    assert banners(second.cells[3]) == []
    assert lines(tmp_path / "forced.log") == 2

    check_rssd(db)
    chains = states_by_entry(db)
    assert len(chains) == 3
    named_src = [s for s in chains if query(
        db, "SELECT json_extract(elaboration, '$.name') FROM orchestration_session_entry WHERE ingest_src = ?", (s,)
    ) == [("setup",)]]
    assert len(named_src) == 1
    assert chains[named_src[0]] == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")]
    assert sorted(chains.values(), key=len)[-1] == [
        ("INITIAL", "RUNNING"),
        ("RUNNING", "EXECUTED"),
        ("EXECUTED", "RUNNING"),
        ("RUNNING", "EXECUTED"),
    ]


# -- 5. which RSSD file -------------------------------------------------------


def test_env_var_selects_the_rssd_and_db_option_and_config_override_it(tmp_path, monkeypatch):
    env_db = tmp_path / "elsewhere" / "env.sqlite.db"
    env_db.parent.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    cells = [
        LOAD,
        "%%stateful\nfrom_env = 'env'\nprint(from_env)",
        "%%stateful --db explicit.sqlite.db\nfrom_db = 'db'\nprint(from_db)",
        "%config StatefulMagics.rssd_path = 'configured.sqlite.db'",
        "%%stateful\nfrom_config = 'config'\nprint(from_config)",
        "print(from_env, from_db, from_config)",
    ]
    monkeypatch.setenv(ENV_RSSD, str(env_db))  # the kernel inherits it
    first = execute(cells, work)
    second = execute(cells, work)
    monkeypatch.delenv(ENV_RSSD)

    assert not (work / DEFAULT_DB).exists(), "the default file must not be used"
    for db in (env_db, work / "explicit.sqlite.db", work / "configured.sqlite.db"):
        check_rssd(db)
        assert [(f, t) for _, f, t, _ in transitions(db)] == [("INITIAL", "RUNNING"), ("RUNNING", "EXECUTED")], db
    (source,) = query(env_db, "SELECT json_extract(elaboration, '$.source') FROM orchestration_session_entry")
    assert source[0].strip() == "from_env = 'env'\nprint(from_env)"
    for i in (1, 2, 4):
        assert banners(first.cells[i]) == [] and len(banners(second.cells[i])) == 1
    assert text_of(second.cells[5]) == text_of(first.cells[5]) == "env db config\n"


# -- 6. the demo notebook -----------------------------------------------------


def _seconds(cell) -> float:
    ex = cell.metadata["execution"]
    start = datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00"))
    return (end - start).total_seconds()


def test_demo_notebook_executes_then_replays(tmp_path):
    demo = nbformat.read(DEMO, as_version=4)
    nbformat.validate(demo)
    assert all(not c.get("outputs") for c in demo.cells if c.cell_type == "code"), "saved without outputs"
    shutil.copy(DEMO, tmp_path / "demo.ipynb")
    nb = nbformat.read(tmp_path / "demo.ipynb", as_version=4)

    first = execute(nb, tmp_path)
    second = execute(nb, tmp_path)

    code = [i for i, c in enumerate(first.cells) if c.cell_type == "code"]
    stateful = [i for i in code if first.cells[i].source.startswith("%%stateful")]
    assert stateful, "the demo has a %%stateful cell"
    expensive = stateful[0]
    assert banners(first.cells[expensive]) == []
    assert len(banners(second.cells[expensive])) == 1
    assert _seconds(first.cells[expensive]) >= 1.5 > _seconds(second.cells[expensive])
    # The recorded outputs came back; everything else prints the same.
    assert strip_volatile(second)[: code.index(expensive) + 1] == strip_volatile(first)[: code.index(expensive) + 1]
    assert lines(tmp_path / "demo-side-effect.log") == 1
    check_rssd(tmp_path / DEFAULT_DB)
    # The last cell prints the transitions: after run 2, EXECUTED once per cell.
    report = text_of(second.cells[code[-1]])
    assert "INITIAL" in report and report.count("EXECUTED") == len(stateful)
    assert [(f, t) for _, f, t, _ in transitions(tmp_path / DEFAULT_DB)] == [
        ("INITIAL", "RUNNING"),
        ("RUNNING", "EXECUTED"),
    ] * len(stateful)


# -- results, methods and classes across kernels ------------------------------

RESULT_CELL = "%%stateful\n20 + 22\n"


METHOD_CELL = """%%stateful
factor = 3
class Scaler:
    def apply(self, v):
        return v * factor       # a method reading a notebook global
"""


PLAIN_CLASS = "class Plain:\n    kind = 'plain'\n"
INSTANCE_CELL = "%%stateful\nobj = Plain()\n"


def test_result_history_holds_the_value_after_replay(two_kernels):
    _, first, second = two_kernels
    assert text_of(first.cells[4]) == "43 int\n"
    assert text_of(second.cells[4]) == "43 int\n"


def test_restored_class_methods_see_live_globals(two_kernels):
    _, first, second = two_kernels
    assert text_of(first.cells[6]) == "20\n"
    assert text_of(second.cells[6]) == "20\n"


def test_instance_of_plain_cell_class_is_still_an_instance_after_replay(two_kernels):
    _, first, second = two_kernels
    assert text_of(first.cells[9]) == "True True\n"
    assert len(banners(second.cells[8])) == 1
    assert text_of(second.cells[9]) == "True True\n"


# -- dependency-aware keys, the line magic, loading by config -----------------

INPUTS = "import pandas as pd\ndf = pd.DataFrame({{'x': [1, 2, 3]}})\nscale = {scale}\ndef weight(v):\n    return v * scale\n"
READS = "%%stateful\nopen('reads.log', 'a').write('ran\\n')\nresult = weight(float(df['x'].sum()))\nprint(result)\n"


def test_keys_with_inputs_are_stable_across_kernels_and_changes_rerun_with_a_reason(tmp_path):
    cells = [LOAD, INPUTS.format(scale=2), READS, "%stateful list"]
    first = execute(cells, tmp_path)
    second = execute(cells, tmp_path)  # fresh kernel, equal inputs rebuilt as new objects
    assert text_of(first.cells[2]) == text_of(second.cells[2]) == "12.0\n"
    assert len(banners(second.cells[2])) == 1, "same inputs -> same key in a fresh kernel"
    changed = execute([LOAD, INPUTS.format(scale=3), READS], tmp_path)
    assert "18.0" in text_of(changed.cells[2])
    # The cell reads weight(), whose fingerprint covers the global it reads.
    assert "running again: input weight changed" in text_of(changed.cells[2], "stdout")
    assert (tmp_path / "reads.log").read_text().count("ran") == 2
    reasons = [r for (r,) in query(tmp_path / DEFAULT_DB, "SELECT transition_reason FROM orchestration_session_state WHERE to_state = 'RUNNING' ORDER BY 1")]
    assert reasons[0] == "first run" and reasons[1].startswith("input weight changed")

    listed = [o for o in second.cells[3].outputs if o["output_type"] == "execute_result"][0]["data"]
    assert "<table>" in listed["text/html"] and "EXECUTED" in listed["text/plain"]
    assert "open('reads.log'" in listed["text/plain"]


def test_extension_loads_from_kernel_config(tmp_path):
    nb = execute(
        ["%%stateful\nprint('loaded by config')\n"],
        tmp_path,
        extra_arguments=["--InteractiveShellApp.extensions=['rssd_magic']"],
    )
    assert text_of(nb.cells[0]) == "loaded by config\n"
    assert query(tmp_path / DEFAULT_DB, "SELECT count(*) FROM orchestration_session_state WHERE to_state = 'EXECUTED'") == [(1,)]
