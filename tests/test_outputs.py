"""Fast tier: outputs recorded the way notebooks produce them (issue #15).

Widgets become static snapshots of their final state, output written at the
file-descriptor level is recorded in order with Python-level output (and the
fds are restored on every path out), and a replay shows the cell's result at
its recorded position.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import traitlets
from IPython.core.displaypub import CapturingDisplayPublisher

from rssd_magic.output import widgets
from rssd_magic.output.capture import ReplayedResult, capture, replay

ipywidgets = pytest.importorskip("ipywidgets", reason="ipywidgets is not installed; install the test extra: pip install -e '.[test]'")

VIEW = widgets.VIEW


def view(widget) -> dict:
    return {"output_type": "display_data", "data": {"text/plain": repr(widget), VIEW: widget._repr_mimebundle_()[VIEW]}, "metadata": {}}


def open_fds() -> set[str]:
    """The process's open fds, once the process-wide fd reader (made on
    first use, kept for the process's life) exists: whichever test runs
    first, it is not counted as a leak of the one that made it."""
    from rssd_magic.output import fdcapture

    if fdcapture.supported():
        fdcapture._the_pump()
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def leaked(before: set[str]) -> set[str]:
    """Fds open now that were not before (fds other threads of the process
    close meanwhile, e.g. a store's housekeeper, are not a leak of ours)."""
    return open_fds() - before


def fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@contextmanager
def fds_into(path):
    """Point fds 1 and 2 at *path* for the block (where a terminal would be)."""
    saved = [os.dup(1), os.dup(2)]
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


class StubShell:
    """The parts of a shell capture() and replay() use, logging what is shown."""

    def __init__(self, log: list):
        self.log = log
        self.execution_count = 1
        self.display_pub = SimpleNamespace(
            publish=lambda data, metadata=None, **kw: log.append(("display", data)),
            clear_output=lambda wait=False: None,
        )
        self.displayhook = SimpleNamespace(
            write_format_data=lambda data, md=None: log.append(("result", data)),
            start_displayhook=lambda: None,
            finish_displayhook=lambda: None,
        )


# -- widgets ---------------------------------------------------------------------


def tqdm_like(done: int, total: int):
    """tqdm.notebook's bar: HBox(HTML left, IntProgress, HTML right)."""
    bar = ipywidgets.IntProgress(min=0, max=total, value=0)
    left, right = ipywidgets.HTML(), ipywidgets.HTML()
    box = ipywidgets.HBox([left, bar, right])
    shown = view(box)  # displayed at 0%
    bar.value, bar.bar_style = done, "success"
    left.value, right.value = "100%", f"\u2007{done}/{total}\u2007[00:01&lt;00:00]"
    return box, shown


def test_widget_view_becomes_a_static_snapshot_of_its_final_state():
    box, shown = tqdm_like(5, 5)
    (out,) = widgets.snapshot_outputs([{"output_type": "stream", "name": "stdout", "text": "x"}, shown])[1:]
    assert VIEW not in out["data"]
    assert out["data"]["text/plain"] == "100%|" + "\u2588" * 10 + "| 5/5 [00:01<00:00]"
    page = out["data"]["text/html"]
    assert '<progress value="1.0000" max="1" style="accent-color:#5cb85c">' in page
    assert "5/5" in page and "&lt;00:00" in page
    assert out["metadata"]["rssd_magic"]["widget"] == "HBoxModel"


def test_widget_html_is_static_and_every_value_escaped():
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    items = [
        ipywidgets.HTML(f"<b>bold</b> {evil}"),
        ipywidgets.Label(evil),
        ipywidgets.Text(value='"><script>x</script>', description=evil),
        ipywidgets.IntSlider(value=7, min=0, max=10, description="n"),
        ipywidgets.Checkbox(value=True, description="on"),
        ipywidgets.Dropdown(options=["a", "<b>"], value="<b>"),
        ipywidgets.Password(value="secret"),
    ]
    box = ipywidgets.VBox(items)
    (out,) = widgets.snapshot_outputs([view(box)])
    page = out["data"]["text/html"]
    assert "<script" not in page and "<img" not in page and "onerror=" not in page.replace("onerror=alert(2)&gt;", "")
    assert "<span><b>bold</b> " in page  # an HTML widget keeps bare formatting tags only
    assert "&lt;script&gt;" in page  # a Label's value is text, escaped
    assert '<input type="range" min="0" max="10" step="1" value="7" disabled> <output>7</output>' in page
    assert '<input type="checkbox" disabled checked> on' in page
    assert "<span>&lt;b&gt;</span>" in page
    assert "secret" not in page and "secret" not in out["data"]["text/plain"]


def test_html_widget_markup_keeps_bare_formatting_only():
    assert widgets.safe_html('<b onclick="x()">a</b> <a href="javascript:x">link</a> <i>open') == "<b>a</b> link <i>open</i>"
    assert widgets.safe_html("<span>x</div></span><style>p{}</style>1 &lt; 2") == "<span>x</span>1 &lt; 2"


def test_output_widget_shows_its_outputs():
    out_widget = ipywidgets.Output()
    out_widget.outputs = (
        {"output_type": "stream", "name": "stdout", "text": "hello <you>\n"},
        {"output_type": "display_data", "data": {"text/plain": "'shown'"}, "metadata": {}},
    )
    (out,) = widgets.snapshot_outputs([view(out_widget)])
    assert out["data"]["text/plain"] == "hello <you>\n'shown'\n"
    assert "<pre" in out["data"]["text/html"] and "hello &lt;you&gt;" in out["data"]["text/html"]


def test_closed_widget_is_dropped_unknown_widget_is_text_only_and_without_ipywidgets_text_stays(monkeypatch):
    closed = ipywidgets.IntSlider()
    gone = view(closed)
    closed.close()

    class Fancy(ipywidgets.DOMWidget):
        _model_name = traitlets.Unicode("FancyModel").tag(sync=True)
        _view_name = traitlets.Unicode("FancyView").tag(sync=True)

    fancy = Fancy()
    outs = widgets.snapshot_outputs([gone, view(fancy)])
    assert len(outs) == 1 and outs[0]["data"] == {"text/plain": repr(fancy)}

    slider = ipywidgets.IntSlider(value=3)
    recorded = view(slider)
    monkeypatch.setitem(sys.modules, "ipywidgets.widgets.widget", None)
    assert widgets.snapshot_outputs([recorded])[0]["data"] == {"text/plain": "IntSlider(value=3)"}


def test_tqdm_notebook_bar_is_recorded_at_100_percent(kernel):
    pytest.importorskip("tqdm", reason="tqdm is not installed; install the test extra: pip install -e '.[test]'")
    cell = "%%stateful\nfrom tqdm.notebook import tqdm\nfor i in tqdm(range(5)):\n    pass\n"
    kernel.ok(cell)
    (row,) = kernel.rows("SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED'")
    (out,) = [o for o in json.loads(row[0])["outputs"] if o["output_type"] == "display_data"]
    assert VIEW not in out["data"]
    assert "100%" in out["data"]["text/plain"] and "5/5" in out["data"]["text/plain"]
    kernel.restart()
    (shown,) = kernel.ok(cell).shown
    assert VIEW not in shown.data and "5/5" in shown.data["text/plain"] and "<progress" in shown.data["text/html"]


def test_widget_updated_after_display_replays_its_last_value(kernel):
    cell = (
        "%%stateful\nimport ipywidgets\n"
        "display(ipywidgets.IntSlider(value=3, description='n'))\n"
        "ipywidgets.widgets.widget._instances[list(ipywidgets.widgets.widget._instances)[-1]].value = 9\n"
    )
    first = kernel.ok(cell)
    assert VIEW in first.shown[0].data  # live, it is a widget
    kernel.restart()
    (shown,) = kernel.ok(cell).shown
    assert VIEW not in shown.data
    assert 'value="9"' in shown.data["text/html"] and shown.data["text/plain"] == "IntSlider(value=9, description='n')"


# -- output at the file-descriptor level ------------------------------------------------


def test_fd_output_is_recorded_in_order_with_python_output(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    log: list = []
    shell = StubShell(log)
    before, identity = open_fds(), (fd_identity(1), fd_identity(2))
    with fds_into(tmp_path / "terminal"):
        with capture(shell) as rec:
            print("py 1")
            os.write(1, b"from fd\n")
            subprocess.run(["sh", "-c", "echo from a child; echo child err >&2"], check=True)
            print("py 2")
            shell.display_pub.publish({"text/plain": "shown"})
            os.write(2, "caf\u00e9 ".encode()[:4])  # a character split across writes
            os.write(2, "caf\u00e9 ".encode()[4:] + b"\n")
        outputs = rec.finish()
    assert (tmp_path / "terminal").read_bytes() == b"from fd\nfrom a child\nchild err\ncaf\xc3\xa9 \n"
    assert [(o["output_type"], o.get("name"), o.get("text")) for o in outputs] == [
        ("stream", "stdout", "py 1\nfrom fd\nfrom a child\n"),
        ("stream", "stderr", "child err\n"),
        ("stream", "stdout", "py 2\n"),
        ("display_data", None, None),
        ("stream", "stderr", "caf\u00e9 \n"),
    ]
    assert (fd_identity(1), fd_identity(2)) == identity
    assert leaked(before) == set()


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_fds_are_restored_when_the_block_raises(exc, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    before, identity = open_fds(), (fd_identity(1), fd_identity(2))
    with fds_into(tmp_path / "terminal"):
        with pytest.raises(exc):
            with capture(StubShell([])):
                os.write(1, b"written before the error\n")
                raise exc("stop")
    assert (tmp_path / "terminal").read_bytes() == b"written before the error\n"
    assert (fd_identity(1), fd_identity(2)) == identity
    assert leaked(before) == set()


def test_background_child_keeps_writing_after_the_recording(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with fds_into(tmp_path / "terminal"):
        with capture(StubShell([])) as rec:
            child = subprocess.Popen(["sh", "-c", "echo early; sleep 0.5; echo late"])
            deadline = time.time() + 5
            while not any("early" in "".join(o.get("text", "")) for o in rec.outputs) and time.time() < deadline:
                time.sleep(0.01)  # recorded while the cell runs
        outputs = rec.finish()
        assert child.wait(timeout=10) == 0, "the child must not get SIGPIPE"
        deadline = time.time() + 5
        while b"late" not in (tmp_path / "terminal").read_bytes() and time.time() < deadline:
            time.sleep(0.05)
    assert (tmp_path / "terminal").read_bytes() == b"early\nlate\n"
    assert [o["text"] for o in outputs] == ["early\n"]


def _forked_child():
    print("child python")  # the child's copy of the recorder: not recorded, no deadlock
    os.write(1, b"child fd\n")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_forked_child_neither_hangs_nor_steals_the_parents_fd_output(monkeypatch, tmp_path):
    import multiprocessing

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with fds_into(tmp_path / "terminal"):
        with capture(StubShell([])) as rec:
            print("parent")
            child = multiprocessing.get_context("fork").Process(target=_forked_child)
            child.start()
            child.join(30)
            print("parent again")
        outputs = rec.finish()
    assert child.exitcode == 0
    assert [o["text"] for o in outputs] == ["parent\nchild fd\nparent again\n"]


def test_failing_cell_with_fd_output_restores_fds_and_replays_it(kernel):
    kernel.ok("%%stateful\nwarm = 1\n")  # the RSSD's own files are open from here on
    before, identity = open_fds(), (fd_identity(1), fd_identity(2))
    ran = kernel.run("%%stateful\nimport os\nos.write(1, b'partial\\n')\n1 / 0\n")
    assert not ran.result.success
    assert (fd_identity(1), fd_identity(2)) == identity
    assert leaked(before) == set()
    (row,) = kernel.rows("SELECT transition_result FROM orchestration_session_state WHERE to_state = 'FAILED'")
    assert json.loads(row[0])["outputs"][0] == {"output_type": "stream", "name": "stdout", "text": "partial\n"}


def test_stateful_cell_replays_fd_output_between_prints(kernel):
    cell = "%%stateful\nimport os\nprint('a')\nos.write(1, b'fd\\n')\nprint('b')\n"
    kernel.ok(cell)
    kernel.restart()
    assert kernel.ok(cell).stdout == "a\nfd\nb\n"


# -- the result at its recorded position ---------------------------------------------


def test_replay_calls_show_result_at_the_results_position():
    log: list = []
    outputs = [
        {"output_type": "execute_result", "execution_count": 3, "data": {"text/plain": "42"}, "metadata": {}},
        {"output_type": "display_data", "data": {"text/plain": "<Figure>", "image/png": "AAAA"}, "metadata": {}},
        {"output_type": "display_data", "data": {VIEW: {"model_id": "gone"}}, "metadata": {}},  # an old record
        {"output_type": "display_data", "data": {"text/plain": "0%", VIEW: {"model_id": "gone"}}, "metadata": {}},
    ]
    result, skipped = replay(outputs, StubShell(log), lambda data, md: log.append(("show_result", data)))
    assert (result, skipped) == (None, 0)
    assert log == [
        ("show_result", {"text/plain": "42"}),
        ("display", {"text/plain": "<Figure>", "image/png": "AAAA"}),
        ("display", {"text/plain": "0%"}),
    ]
    log.clear()
    result, _ = replay(outputs[:2], StubShell(log))  # without a callback: returned, as before
    assert isinstance(result, ReplayedResult) and result.data == {"text/plain": "42"}
    assert log == [("display", {"text/plain": "<Figure>", "image/png": "AAAA"})]


def test_result_replays_before_a_display_flushed_after_the_cell(kernel, monkeypatch):
    """What matplotlib's inline backend does: flush figures on post_execute,
    after the cell's Out[] is shown."""
    shell = kernel.shell
    kernel.ok("%%stateful --quiet\nstore_made = True\n")  # its note of a new RSSD is not what is logged here
    log: list = []

    def flush_figures():
        if shell.user_ns.pop("figure_pending", False):
            from IPython.display import display

            display({"image/png": "AAAA", "text/plain": "<Figure>"}, raw=True)

    def logged(cls, name, kind):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            log.append(kind)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    # The test kernel shows displays through IPython's capturing publisher.
    logged(CapturingDisplayPublisher, "publish", "display")
    logged(type(shell.displayhook), "write_format_data", "result")
    shell.events.register("post_execute", flush_figures)
    try:
        cell = "%%stateful --quiet\nfigure_pending = True\n6 * 7\n"
        kernel.ok(cell)
        assert log == ["result", "display"]
        row = kernel.rows("SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED'")[-1]
        assert [o["output_type"] for o in json.loads(row[0])["outputs"]] == ["execute_result", "display_data"]
        kernel.restart()
        log.clear()
        ran = kernel.ok(cell)
        assert log == ["result", "display"]
        assert ran.result.result == 42 and shell.user_ns["_"] == 42
    finally:
        shell.events.unregister("post_execute", flush_figures)


def test_terminal_shell_records_python_and_fd_output_once_in_order(tmp_path):
    """A terminal's sys.stdout writes to fd 1 itself: its text must reach the
    terminal directly, not come back through the fd pipe a second time."""
    script = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_line_magic('load_ext', 'rssd_magic')\n"
        "cell = '%%stateful --quiet\\nimport os, sys\\nprint(\"py 1\")\\nos.write(1, b\"from fd\\\\n\")\\n"
        "sys.stdout.buffer.write(b\"via buffer\\\\n\")\\nprint(\"py 2\")\\n'\n"
        "shell.run_cell(cell)\n"
        "print('--')\n"
        "shell.run_cell(cell)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first, replayed = out.stdout.split("--\n")
    created, first = first.split("\n", 1)
    assert created == f"[stateful] created a new RSSD: {tmp_path / 'resource-surveillance.sqlite.db'}", created
    assert first == replayed, "the replay shows what the terminal showed"
    assert sorted(first.splitlines()) == ["from fd", "py 1", "py 2", "via buffer"]  # each once
    assert first.startswith("py 1\nfrom fd\n") and first.index("via buffer") > first.index("from fd")
