"""Kernel tier for issue #14: an edited record, replayed in a real Jupyter
kernel through nbclient, publishes no active content and binds nothing;
after ``%stateful trust`` it replays fully."""

from __future__ import annotations

import json
import sqlite3

import pytest
from kernel_util import execute, text_of

pytestmark = pytest.mark.kernel

LOAD = "%load_ext rssd_magic"
CELL = (
    "%%stateful\n"
    "open('side.log', 'a').write('ran\\n')\n"
    "from IPython.display import HTML, Javascript, Image, display\n"
    "import base64\n"
    "print('plain text')\n"
    "display(HTML('<b id=\"rich\">bold</b>'))\n"
    "display(Javascript('window.replayed = 1'))\n"
    "display(Image(data=base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC')))\n"
    "value = 41 + 1\n"
)
PROBE = "print(repr(globals().get('value')))"
ACTIVE = {"text/html", "application/javascript"}


def mimes(cell) -> set[str]:
    return {m for o in cell.get("outputs", []) for m in (o.get("data") or {})}


def test_edited_record_publishes_nothing_active_and_binds_nothing_until_trusted(tmp_path):
    nb = [LOAD, CELL, PROBE]
    first = execute(nb, tmp_path)
    assert ACTIVE <= mimes(first.cells[1]) and text_of(first.cells[2]) == "42\n"

    db = tmp_path / "resource-surveillance.sqlite.db"
    conn = sqlite3.connect(db)
    (state_id, text), = conn.execute(
        "SELECT orchestration_session_state_id, transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED'"
    ).fetchall()
    record = json.loads(text)
    record["names"]["value"] = {"kind": "json", "value": 43}
    conn.execute(
        "UPDATE orchestration_session_state SET transition_result = ? WHERE orchestration_session_state_id = ?",
        (json.dumps(record), state_id),
    )
    conn.commit()
    conn.close()

    edited = execute(nb, tmp_path)
    cell = edited.cells[1]
    assert not (ACTIVE & mimes(cell)), "no HTML or JavaScript from an edited record (not even the banner)"
    assert "image/png" in mimes(cell) and text_of(cell, "stdout") == "plain text\n"
    displays = [o for o in cell.outputs if o.output_type == "display_data"]
    assert displays and all(o.metadata == {"rssd_magic": {"untrusted": True}} for o in displays)
    assert "untrusted record" in text_of(cell, "stderr") and "%stateful trust" in text_of(cell, "stderr")
    first_out = cell.outputs[0]
    assert first_out.get("name") == "stderr" and "untrusted record" in first_out["text"], "said before what it shows"
    assert text_of(edited.cells[2]) == "None\n", "nothing bound"
    assert (tmp_path / "side.log").read_text() == "ran\n", "not re-run"

    trusted = execute([LOAD, "%stateful trust --yes"], tmp_path)
    assert "signed 1 record in 1 cell" in text_of(trusted.cells[1])

    again = execute(nb, tmp_path)
    assert ACTIVE <= mimes(again.cells[1]) and "untrusted" not in text_of(again.cells[1])
    assert text_of(again.cells[2]) == "43\n", "the record the user trusted replays fully"
    assert (tmp_path / "side.log").read_text() == "ran\n"
