"""Kernel tier: outputs as real notebooks produce them (issue #15).

One notebook, run twice in fresh kernels: a tqdm.auto bar and ipywidgets
(widget views on the live run, static snapshots of their final state on the
replay), output written at the file-descriptor level (os.write, a child
process, C's printf), and a matplotlib inline figure flushed after the
cell's Out[].
"""

from __future__ import annotations

import os

import pytest

from kernel_util import banners, execute, text_of

pytestmark = pytest.mark.kernel

_HINT = "install the test extra: pip install -e '.[test]'"
pytest.importorskip("ipywidgets", reason=f"ipywidgets is not installed; {_HINT}")
pytest.importorskip("tqdm", reason=f"tqdm is not installed; {_HINT}")
pytest.importorskip("matplotlib", reason=f"matplotlib is not installed; {_HINT}")

VIEW = "application/vnd.jupyter.widget-view+json"

CELLS = [
    "%load_ext rssd_magic",
    "%%stateful\nfrom tqdm.auto import tqdm\nfor i in tqdm(range(5)):\n    pass\n",
    "%%stateful\nimport ipywidgets as widgets\n"
    "display(widgets.IntSlider(value=7, max=10, description='n'))\n"
    "widgets.HTML('<b>final</b> <script>alert(1)</script>')\n",
    "%%stateful\nimport os, ctypes\n"
    "print('py 1')\n"
    "os.write(1, b'from fd\\n')\n"
    "os.system('echo from a child')\n"
    "libc = ctypes.CDLL(None)\n"
    "libc.printf(b'from C\\n')\n"
    "libc.fflush(None)\n"
    "del libc\n"
    "print('py 2')\n",
    "%%stateful\nimport matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\n'the last line'\n",
    # fd output with no Python output after it: moved by the process's one
    # reader thread (started cells earlier) while the cell sleeps.
    "%%stateful\nimport os, time\nos.write(1, b'a later cell, from fd\\n')\ntime.sleep(0.3)\n",
]
TQDM, WIDGETS, FDS, FIGURE, LATER_FDS = 1, 2, 3, 4, 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(first run, replay) of CELLS, each in a fresh kernel."""
    cwd = tmp_path_factory.mktemp("outputs")
    # ipykernel doesn't watch fds 1/2 when it sees PYTEST_CURRENT_TEST (which
    # kernels inherit from pytest): run them as a user's kernel would run.
    saved = os.environ.pop("PYTEST_CURRENT_TEST", None)
    try:
        first = execute(CELLS, cwd)
        second = execute(CELLS, cwd)
    finally:
        if saved is not None:
            os.environ["PYTEST_CURRENT_TEST"] = saved
    return first, second


def shown(cell) -> list[dict]:
    return [o for o in cell.outputs if o not in banners(cell)]


def test_tqdm_bar_replays_its_final_state_without_a_widget_view(runs):
    first, second = runs
    assert any(VIEW in o.get("data", {}) for o in first.cells[TQDM].outputs), "live, tqdm.auto shows a widget"
    replayed = second.cells[TQDM]
    assert len(banners(replayed)) == 1
    (bar,) = shown(replayed)
    assert VIEW not in bar["data"]
    assert "100%" in bar["data"]["text/plain"] and "5/5" in bar["data"]["text/plain"]
    assert "<progress" in bar["data"]["text/html"] and "<script" not in bar["data"]["text/html"]


def test_ipywidgets_replay_as_static_html(runs):
    first, second = runs
    assert [VIEW in o["data"] for o in first.cells[WIDGETS].outputs] == [True, True]
    slider, html = shown(second.cells[WIDGETS])
    assert (slider["output_type"], html["output_type"]) == ("display_data", "execute_result")
    assert VIEW not in slider["data"] and VIEW not in html["data"]
    assert 'type="range"' in slider["data"]["text/html"] and 'value="7"' in slider["data"]["text/html"]
    assert "final" in html["data"]["text/html"] and "<script" not in html["data"]["text/html"]


def test_fd_level_output_is_recorded_and_replayed_between_python_prints(runs):
    first, second = runs
    expected = "py 1\nfrom fd\nfrom a child\nfrom C\npy 2\n"
    assert text_of(first.cells[FDS], "stdout") == expected
    assert len(banners(second.cells[FDS])) == 1
    assert text_of(second.cells[FDS], "stdout") == expected
    assert [o["output_type"] for o in shown(second.cells[FDS])] == ["stream"]


def test_fd_output_of_a_later_cell_lands_in_that_cell_only(runs):
    for run in runs:
        assert text_of(run.cells[LATER_FDS], "stdout") == "a later cell, from fd\n"
        others = [text_of(cell, "stdout") for i, cell in enumerate(run.cells) if i != LATER_FDS]
        assert not any("a later cell" in text for text in others)
    assert len(banners(runs[1].cells[LATER_FDS])) == 1


def test_figure_flushed_after_the_cell_replays_after_out(runs):
    first, second = runs
    order = [[o["output_type"] for o in shown(run.cells[FIGURE])] for run in runs]
    assert order == [["execute_result", "display_data"]] * 2
    for run in runs:
        result, figure = shown(run.cells[FIGURE])
        assert result["data"]["text/plain"] == "'the last line'"
        assert "image/png" in figure["data"]
    assert len(banners(second.cells[FIGURE])) == 1
