"""Kernel tier for issue 15: what a new user met in JupyterLab, papermill and
nbclient, each notebook run in fresh ipykernel kernels through nbclient.

* an awaiting ``%%stateful`` cell runs (ipykernel's loop is already running
  while a cell runs), is recorded, replays, and is recorded INTERRUPTED when
  the kernel interrupts it;
* a failing cell's traceback names the cell's own number and lines;
* values changed in place and names deleted come back after a restart;
* one key whichever client runs the notebook: JupyterLab tells the kernel
  the notebook's path (``JPY_SESSION_NAME``, set here in the kernel's
  environment exactly as Lab sets it); nbclient and papermill tell nothing;
  a renamed or moved notebook replays.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernel_util import (
    TIMEOUT_S,
    banners,
    check_rssd,
    errors_of,
    execute,
    plain_traceback,
    query,
    strip_volatile,
    text_of,
    transitions,
)

pytestmark = pytest.mark.kernel

DB = "resource-surveillance.sqlite.db"
LOAD = "%load_ext rssd_magic"


def side(name: str) -> str:
    return f"open({name!r}, 'a').write('ran\\n')\n"


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def scopes(db: Path) -> list[str]:
    return [json.loads(e)["scope"] for (e,) in query(db, "SELECT elaboration FROM orchestration_session_entry ORDER BY rowid")]


# -- await --------------------------------------------------------------------------


AWAIT_CELLS = [
    LOAD,
    "import asyncio\nasync def fetch(prompt):\n    await asyncio.sleep(0.05)\n    return {'text': prompt.upper()}\n",
    "%%stateful\n" + side("fetch.log") + "reply = await fetch('hi')\nprint('fetched', reply['text'])\nreply['text']\n",
    "print('later', reply['text'])",
    "%%stateful\nprint('before')\n\nvalue = await fetch('x')\n1 / 0\n",
]


def test_an_awaiting_cell_runs_in_a_kernel_replays_and_fails_with_its_own_traceback(tmp_path):
    runs = [execute(AWAIT_CELLS, tmp_path, allow_errors=True) for _ in range(2)]
    first, second = runs
    assert lines(tmp_path / "fetch.log") == 1
    assert text_of(first.cells[2], "stdout") == "fetched HI\n"
    assert banners(first.cells[2]) == [] and len(banners(second.cells[2])) == 1
    assert strip_volatile(first)[2] == strip_volatile(second)[2]
    assert [o["data"]["text/plain"] for o in second.cells[2].outputs if o["output_type"] == "execute_result"] == ["'HI'"]
    for nb in runs:
        assert text_of(nb.cells[3]) == "later HI\n"
        failing = nb.cells[4]
        (err,) = errors_of(failing)
        assert err["ename"] == "ZeroDivisionError"
        tb = plain_traceback(err)
        assert f"Cell In[{failing.execution_count}], line 5" in tb
        assert "----> 5 1 / 0" in tb
        assert "already running" not in json.dumps(nb.cells[2].outputs + failing.outputs)
    db = tmp_path / DB
    check_rssd(db)
    ends = [to for _, _, to, _ in transitions(db) if to != "RUNNING"]
    assert ends == ["EXECUTED", "FAILED", "FAILED"]


#: An awaiting body that waits in short steps: ipykernel turns the interrupt
#: into a cancellation when its loop next wakes, as for any awaiting cell.
SLEEPING = "%%stateful\nimport asyncio\n" + side("slow.log") + "for _ in range(600):\n    await asyncio.sleep(0.1)\n"


def _interrupt_sleeping_cell(cell) -> int:
    return 3 if "range(600)" in cell.source else TIMEOUT_S


def test_an_awaiting_cell_interrupted_by_the_kernel_is_recorded_interrupted(tmp_path):
    cells = [LOAD, SLEEPING, "print('after')"]
    nb = execute(cells, tmp_path, allow_errors=True, timeout_func=_interrupt_sleeping_cell, interrupt_on_timeout=True)
    assert [e["ename"] for e in errors_of(nb.cells[1])] == ["CancelledError"]
    assert text_of(nb.cells[2]) == "after\n", "the kernel goes on"
    db = tmp_path / DB
    assert [(frm, to) for _, frm, to, _ in transitions(db)] == [("INITIAL", "RUNNING"), ("RUNNING", "INTERRUPTED")]
    again = execute([LOAD, SLEEPING.replace("%%stateful", "%%stateful --replay-only")], tmp_path, allow_errors=True)
    assert "UsageError: %%stateful --replay-only: this cell has no executed result" in text_of(again.cells[1], "stderr")
    assert lines(tmp_path / "slow.log") == 1


# -- in place, del ------------------------------------------------------------------


INPLACE_CELLS = [
    LOAD,
    "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\nresults = []\ncounter = 0\nscratch = 'old'\n",
    "%%stateful\n" + side("train.log") + "df['b'] = df['a'] * 2\nresults.append('model-1')\ncounter += 1\ndel scratch\n",
    "print(list(df.columns), df['b'].tolist(), results, counter, 'scratch' in globals())",
]


def test_in_place_changes_and_del_come_back_after_a_restart(tmp_path):
    first, second = (execute(INPLACE_CELLS, tmp_path) for _ in range(2))
    assert lines(tmp_path / "train.log") == 1
    expected = "['a', 'b'] [2, 4, 6] ['model-1'] 1 False\n"
    assert text_of(first.cells[3]) == expected
    assert text_of(second.cells[3]) == expected
    assert "also recorded: df, results (changed in place)" in text_of(first.cells[2], "stdout")
    assert "also recorded" not in text_of(first.cells[2], "stderr"), "a note, not an error: no pink box"
    assert "also recorded" not in text_of(second.cells[2], "stdout")
    check_rssd(tmp_path / DB)


# -- one key under every client -------------------------------------------------------


CLIENT_CELLS = [
    LOAD,
    "print(globals().get('__session__'))",
    "%%stateful\n" + side("train.log") + "score = 0.93\nprint('trained')\n",
    "%%stateful --name load_once\n" + side("load.log") + "loaded = True\n",
    "print(score, loaded)",
]


def _lab(path: Path) -> dict[str, str]:
    """The kernel environment JupyterLab gives a notebook's kernel."""
    return {"JPY_SESSION_NAME": str(path)}


def test_the_same_notebook_in_lab_then_headless_then_renamed_replays(tmp_path):
    lab = execute(CLIENT_CELLS, tmp_path, env=_lab(tmp_path / "Untitled.ipynb"))
    assert text_of(lab.cells[1]) == f"{tmp_path / 'Untitled.ipynb'}\n", "the kernel knows its notebook, as in Lab"
    headless = execute(CLIENT_CELLS, tmp_path)
    assert text_of(headless.cells[1]) == "None\n"
    renamed = execute(CLIENT_CELLS, tmp_path, env=_lab(tmp_path / "work" / "analysis.ipynb"))
    for nb in (headless, renamed):
        assert len(banners(nb.cells[2])) == 1 and len(banners(nb.cells[3])) == 1
        assert text_of(nb.cells[2], "stdout") == "trained\n"
        assert text_of(nb.cells[4]) == "0.93 True\n"
    assert lines(tmp_path / "train.log") == 1 and lines(tmp_path / "load.log") == 1
    assert scopes(tmp_path / DB) == ["default", "default"]
