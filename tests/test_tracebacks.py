"""Fast tier: a failing ``%%stateful`` cell's traceback names the cell and
the lines the user sees (issue 15): ``Cell In[n]`` with the cell's own
number, line numbers counted from the ``%%stateful`` line."""

from __future__ import annotations

import re

import pytest

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def traceback_of(ran) -> str:
    return ANSI.sub("", ran.stdout)


def test_the_cell_number_and_line_are_the_notebook_cells(kernel):
    kernel.ok("x = 1")
    ran = kernel.run("%%stateful\nprint('a')\n\ny = 1 / 0\n")
    text = traceback_of(ran)
    n = ran.result.execution_count
    assert f"Cell In[{n}], line 4" in text
    assert "----> 4 y = 1 / 0" in text
    assert text.count("Traceback (most recent call last)") == 1


def test_empty_lines_at_the_start_of_the_body_count(kernel):
    ran = kernel.run("%%stateful --quiet\n\n  \nz = undefined_name\n")
    text = traceback_of(ran)
    assert f"Cell In[{ran.result.execution_count}], line 4" in text
    assert "----> 4 z = undefined_name" in text


def test_a_function_defined_in_a_stateful_cell_points_into_that_cell(kernel):
    first = kernel.ok("%%stateful\nimport math\ndef f(v):\n    return math.log(v)\n")
    ran = kernel.run("f(-1)")
    text = traceback_of(ran)
    assert f"Cell In[{first.result.execution_count}], line 4, in f(v)" in text
    assert "----> 4     return math.log(v)" in text


def test_a_syntax_error_in_the_body_is_on_its_notebook_line_and_nothing_is_recorded(kernel):
    ran = kernel.run("%%stateful\nok = 1\nnot valid python(\n")
    text = traceback_of(ran)
    assert "line 3" in text
    assert "SyntaxError" in text and text.count("SyntaxError") == 1
    assert not ran.result.success and "ok" not in kernel.shell.user_ns
    assert not kernel.db.exists(), "no store is created for a cell that can't be run"


@pytest.fixture
def counting_first(kernel):
    """The shell counts the cell before running it, as IPython 9.8 and later
    do (so during a cell its count is already n+1), emulated on the
    installed IPython with its own events for the notebook's cells (the
    body's nested run has store_history off and is not counted)."""
    shell = kernel.shell

    def before(info):
        if info.store_history:
            shell.execution_count += 1

    def after(result):
        if result is not None and result.info.store_history:
            shell.execution_count -= 1

    shell.events.register("pre_run_cell", before)
    shell.events.register("post_run_cell", after)
    yield kernel
    shell.events.unregister("pre_run_cell", before)
    shell.events.unregister("post_run_cell", after)


def test_the_number_is_the_cells_when_the_shell_counts_first(counting_first):
    kernel = counting_first
    ran = kernel.run("%%stateful\nprint('a')\n1 / 0\n")
    n = ran.result.execution_count
    assert kernel.shell.execution_count == n + 1
    text = traceback_of(ran)
    assert f"Cell In[{n}], line 3" in text, text
    assert f"In[{n + 1}]" not in text


def test_a_body_run_from_code_is_numbered_from_its_own_first_line(kernel):
    # run_cell_magic called from code: no notebook cell holds this body, so
    # its lines are its own (never a blank line 1 for a %%stateful line
    # nobody sees), in the traceback shown and in surveilr's exec row.
    ran = kernel.run("get_ipython().run_cell_magic('stateful', '--quiet', 'a = 1\\nb = a / 0\\n')")
    text = traceback_of(ran)
    assert "----> 2 b = a / 0" in text and "      1 a = 1" in text
    (stored,) = kernel.rows("SELECT exec_error_text FROM orchestration_session_exec")[0]
    assert "----> 2 b = a / 0" in stored and "      1 a = 1" in stored
