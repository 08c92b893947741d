"""Trust and hostile input: signed records, and a clear message for every
bad input, with nothing lost and nothing acting that we didn't sign."""

from __future__ import annotations

import json
import pickle
import re
import sqlite3
import stat
import subprocess
import sys

import pytest
from conftest import counter, forge_record
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from rssd_magic.engine.bindable import bindable, why_not
from rssd_magic.records.record import RecordError, RunRecord
from rssd_magic.records.keyring import HmacKey, Keyring
from rssd_magic.records.signers import SignersFile
from rssd_magic.records.signing import PersonalKey, parse_row
from rssd_magic.records.trust import inert_outputs, stream_digest

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


@pytest.fixture
def become(tmp_path, monkeypatch):
    """Switch person: each name gets a Jupyter data directory (keys,
    trusted signers) of its own, as on another account or machine."""

    def switch(name: str):
        folder = tmp_path / f"jupyter-{name}"
        monkeypatch.setenv("JUPYTER_DATA_DIR", str(folder))
        return folder / "rssd_magic"

    return switch


def test_user_key_is_created_private_on_first_use(kernel, become):
    keys = become("fresh")
    kernel.ok(CELL)
    key_file = keys / "ed25519_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert not (keys / "secret").exists(), "no HMAC key is made any more"
    assert [p.name for p in keys.iterdir()] == ["ed25519_key"], "no temporary file left behind"
    (key_id, signature), = kernel.rows("SELECT key_id, signature FROM rssd_magic_signature")
    assert key_id == kernel.magics.signer.key_id and key_id.startswith("SHA256:") and len(key_id) == 50
    assert signature.startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5") and len(signature.split()) == 3


def test_record_of_another_person_does_not_act_until_trusted(kernel, become):
    become("alice")
    kernel.ok(CELL)
    alice = kernel.magics.signer.key_id
    kernel.restart()
    become("bob")
    ran = kernel.ok(CELL)
    assert counter(kernel.workdir / "side.log") == 1, "the cell is not re-run silently"
    assert "shown" in ran.stdout, "its text is still shown"
    for name in ("plain", "secret_sauce", "collections"):
        assert name not in kernel.shell.user_ns, f"{name}: nothing of an unsigned record is bound, not even JSON"
    (line,) = ran.stderr.splitlines()
    assert line.startswith("[stateful] untrusted record: cell ") and f"signed by {alice}, a key you don't trust" in line
    assert "not bound: collections, secret_sauce, plain" in line
    key12 = kernel.rows("SELECT substr(json_extract(elaboration, '$.key'), 1, 12) FROM orchestration_session_entry")[0][0]
    assert f"%stateful trust {key12} (or --signer {alice} for all of theirs)" in line and "--force" in line
    assert str(kernel.db) in line

    preview = kernel.ok(f"%stateful trust {key12}")
    assert kernel.rows("SELECT count(*) FROM rssd_magic_signature") == [(1,)], "a preview signs nothing"
    text = repr(preview.result.result)
    assert alice in text and "collections.Counter" in text and f"%stateful trust {key12} --yes" in text
    trusted = kernel.ok(f"%stateful trust {key12} --yes")
    assert "signed 1 record in 1 cell" in trusted.stdout
    kernel.restart()
    again = kernel.ok(CELL)
    assert again.stderr == ""
    assert kernel.shell.user_ns["secret_sauce"] == {"a": 2, "b": 1} and kernel.shell.user_ns["plain"] == 5
    keys = kernel.rows("SELECT count(DISTINCT key_id) FROM rssd_magic_signature")
    assert keys == [(2,)], "alice's signature row is kept, bob's added"


def test_cli_trust_asks_and_signs_with_your_key(kernel, become):
    become("alice")
    kernel.ok(CELL)
    kernel.restart()
    bob = become("bob")
    cli = [sys.executable, "-m", "rssd_magic", "--db", str(kernel.db), "trust"]
    refused = subprocess.run(cli, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "no terminal to ask" in refused.stderr and "--yes" in refused.stderr
    shown = subprocess.run(cli + ["--dry-run"], capture_output=True, text=True)
    assert shown.returncode == 0 and "1 record would act" in shown.stdout and "collections.Counter" in shown.stdout
    assert kernel.rows("SELECT count(*) FROM rssd_magic_signature") == [(1,)]
    out = subprocess.run(cli + ["--yes"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "signed 1 record in 1 cell" in out.stdout and (bob / "ed25519_key").exists()
    kernel.ok(CELL)
    assert kernel.shell.user_ns["secret_sauce"]["a"] == 2


def test_team_secret_signs_beside_your_key_and_its_id_reveals_nothing(kernel, become):
    become("alice")
    kernel.ok("%config StatefulMagics.secret = 'team-key'")
    kernel.ok(CELL)
    ids = [k for (k,) in kernel.rows("SELECT key_id FROM rssd_magic_signature ORDER BY key_id")]
    assert len(ids) == 2 and ids[0].startswith("SHA256:") and ids[1].startswith("team:")
    import hashlib

    for guess in (b"team-key", b"rssd_magic key id\0team-key"):
        assert hashlib.sha256(guess).hexdigest()[:16] not in ids[1], "the id is no fast hash of the secret"
    kernel.restart()
    become("bob")
    kernel.ok("%config StatefulMagics.secret = 'team-key'")
    ran = kernel.ok(CELL)
    assert ran.stderr == "" and kernel.shell.user_ns["plain"] == 5, "teammates sharing the secret trust each other"
    assert "signed by the team key" in ran.banner[0].data["text/plain"]
    kernel.restart()
    kernel.ok("%config StatefulMagics.secret = 'other-team'")
    assert "untrusted record" in kernel.ok(CELL).stderr and "plain" not in kernel.shell.user_ns


def test_cli_refuses_a_secret_on_the_command_line(kernel, tmp_path):
    kernel.ok(CELL)
    out = subprocess.run(
        [sys.executable, "-m", "rssd_magic", "--db", str(kernel.db), "trust", "--secret", "hunter2", "--yes"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "visible to every user" in out.stderr and "RSSD_MAGIC_SECRET" in out.stderr and "--secret-file" in out.stderr
    assert "hunter2" not in out.stderr
    loose = tmp_path / "team.secret"
    loose.write_text("hunter2\n")
    loose.chmod(0o644)
    out = subprocess.run(
        [sys.executable, "-m", "rssd_magic", "--db", str(kernel.db), "trust", "--secret-file", str(loose), "--dry-run"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and str(loose) in out.stderr and "mode 0644" in out.stderr
    loose.chmod(0o600)
    out = subprocess.run(
        [sys.executable, "-m", "rssd_magic", "--db", str(kernel.db), "trust", "--secret-file", str(loose), "--dry-run"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0 and "nothing to sign" in out.stdout


def test_tampered_blob_is_refused_and_trust_refuses_to_sign_it(kernel, become):
    become("alice")
    kernel.ok(CELL)
    digest = _pickle_spec(kernel)["blob"]
    assert digest.startswith("blake3:")
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
    become("bob")
    assert "not trusted" in kernel.run("%stateful trust --yes").stderr
    assert kernel.rows("SELECT count(*) FROM rssd_magic_signature") == [(1,)]


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
    assert "untrusted record" in ran.stderr and "secret_sauce" not in kernel.shell.user_ns


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
    unsigned = kernel.ok(CELL)
    assert unsigned.stdout == "ok\n"
    assert "withheld: a malformed output, a malformed display" in unsigned.stderr
    kernel.ok("%stateful trust --yes")
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


# -- issue #14: nothing from an unsigned or edited record acts ------------------------------------

SAFE = {"text/plain", "image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"}
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"
)
#: A cell that shows every kind of output and binds every kind of value.
RICH = (
    "%%stateful\n" + APPEND + "import collections\n"
    "from IPython.display import HTML, Javascript, Image, display\n"
    "print('printed')\n"
    "display(HTML('<b>bold</b>'))\n"
    "display(Javascript('window.ran = 1'))\n"
    f"display(Image(data=__import__('base64').b64decode('{PNG_B64}')))\n"
    "secret_model = 'real'\n"
    "counts = collections.Counter('aab')\n"
    "HTML('<i>result</i>')\n"
)
RICH_NAMES = ("collections", "HTML", "Javascript", "Image", "display", "secret_model", "counts")


def _latest(conn) -> tuple[str, str]:
    return conn.execute(
        "SELECT orchestration_session_state_id, transition_result FROM orchestration_session_state "
        "WHERE to_state = 'EXECUTED' ORDER BY rowid DESC LIMIT 1"
    ).fetchone()


def edit_record(db, change) -> None:
    """Rewrite the latest EXECUTED record as another tool would: *change*
    gets the parsed JSON and returns the new JSON (or text) to store."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    state_id, text = _latest(conn)
    new = change(json.loads(text))
    new = new if isinstance(new, str) else json.dumps(new)
    conn.execute("UPDATE orchestration_session_state SET transition_result = ? WHERE orchestration_session_state_id = ?", (new, state_id))
    conn.commit()
    conn.close()


def set_signatures(db, value) -> None:
    conn = sqlite3.connect(db)
    conn.execute("UPDATE rssd_magic_signature SET signature = ?", (value,))
    conn.commit()
    conn.close()


def no_traceback(ran) -> None:
    """The replay either worked or failed with one line: nothing else escapes."""
    err = ran.result.error_before_exec or ran.result.error_in_exec
    assert err is None or type(err).__name__ == "StatefulRunError", repr(err)
    assert "Traceback" not in ran.stdout + ran.stderr
    for line in ran.stderr.splitlines():
        assert line.startswith("[stateful] ") or not line.strip(), f"a stray line on stderr: {line!r}"


def active(displays) -> list[dict]:
    return [d.data for d in displays if set(d.data) - SAFE]


def test_edited_plain_value_is_not_bound(kernel):
    """Issue #14.1: a JSON value is part of the signed record like any other."""
    kernel.ok(CELL)
    edit_record(kernel.db, lambda r: {**r, "names": {**r["names"], "plain": {"kind": "json", "value": "attacker value"}}})
    kernel.restart()
    ran = kernel.ok(CELL)
    assert "plain" not in kernel.shell.user_ns
    assert "is unsigned;" in ran.stderr and "not bound: collections, secret_sauce, plain" in ran.stderr
    assert counter(kernel.workdir / "side.log") == 1


def test_module_spec_of_an_unsigned_record_is_never_imported(kernel):
    """Issue #14.2: an unsigned record can't make the replay import a file."""
    (kernel.workdir / "evil_helper.py").write_text("open('imported.marker', 'w').write('ran')\n")
    kernel.ok(CELL)
    edit_record(kernel.db, lambda r: {**r, "names": {**r["names"], "helper": {"kind": "module", "module": "evil_helper"}}})
    kernel.restart()
    ran = kernel.ok(CELL)
    assert not (kernel.workdir / "imported.marker").exists() and "evil_helper" not in sys.modules
    assert "helper" not in kernel.shell.user_ns and "untrusted record" in ran.stderr


def test_signed_module_spec_is_imported_by_name_only(kernel):
    """A signed record re-imports modules through the normal import system,
    and only by a dotted name: no path, no relative import."""
    cell = "%%stateful\nimport json as codec\nimport os.path\n"
    kernel.ok(cell)
    bad = {"kind": "module", "module": "../evil_helper"}
    edit_record(kernel.db, lambda r: {**r, "names": {**r["names"], "codec": bad}})
    kernel.ok("%stateful trust --yes")  # the user trusts the file: names still have to be names
    kernel.restart()
    ran = kernel.ok(cell)
    assert "codec names no importable module ('../evil_helper')" in ran.stderr
    assert "codec" not in kernel.shell.user_ns and kernel.shell.user_ns["os"].path.join("a", "b") == "a/b"


def test_forged_row_publishes_only_text_and_raster_images(kernel):
    """Issue #14.3: a row another tool wrote replays no HTML or JavaScript."""
    kernel.ok("%%stateful\nwarm = 1\n")  # the RSSD and a session exist
    active_data = {
        "text/html": "<script>window.pwned = 1</script>",
        "application/javascript": "window.pwned = 1",
        "text/markdown": "<img src=x onerror=alert(1)>",
        "image/svg+xml": "<svg onload='alert(1)'/>",
        "text/latex": "$x$",
        "application/vnd.jupyter.widget-view+json": {"model_id": "x"},
    }
    record = {
        "format": "rssd_magic.result.v1",
        "outputs": [
            {"output_type": "stream", "name": "stdout", "text": "forged text\n"},
            {"output_type": "display_data", "data": {"text/plain": "<plain>", **active_data}, "metadata": {"isolated": False}},
            {"output_type": "display_data", "data": {"image/png": PNG_B64, "image/jpeg": "not base64 <script>"}},
            {"output_type": "display_data", "data": {"text/html": "<b>only html</b>"}},
            {"output_type": "execute_result", "execution_count": 1, "data": {"text/plain": "'r'", "text/html": "<i>r</i>"}, "metadata": {}},
        ],
        "names": {"stolen": {"kind": "json", "value": 1}},
    }
    cell = "%%stateful --name forged\nstolen = 0\n"
    forge_record(kernel, cell, record, signature="f" * 64)
    kernel.restart()
    ran = kernel.run(cell)
    no_traceback(ran)
    assert ran.result.result is None, "a result becomes a display: nothing is bound to _"
    assert "stolen" not in kernel.shell.user_ns
    assert ran.stdout == "forged text\n"
    assert [d.data for d in ran.displays] == [{"text/plain": "<plain>"}, {"image/png": PNG_B64}, {"text/plain": "'r'"}]
    assert all(d.metadata == {"rssd_magic": {"untrusted": True}} for d in ran.displays)
    (line,) = ran.stderr.splitlines()
    for mime in ("text/html", "application/javascript", "text/markdown", "image/svg+xml", "text/latex", "image/jpeg"):
        assert mime in line
    assert counter(kernel.workdir / "side.log") == 0 and kernel.states()[-1] == ("RUNNING", "EXECUTED"), "not run"


def test_signed_record_binds_only_what_the_cells_code_binds(kernel):
    """Issue #14.4: even a signed record never binds builtins, dunders or the
    shell's names, nor names its cell's code doesn't bind."""
    cell = "%%stateful\nfrom collections import Counter\nkept = Counter('ab')\nplain = 5\n"
    kernel.ok(cell)
    hostile = {
        "__builtins__": {"kind": "json", "value": 1},
        "print": {"kind": "json", "value": None},
        "get_ipython": {"kind": "json", "value": 0},
        "Out": {"kind": "json", "value": 0},
        "_": {"kind": "json", "value": 0},
        "stranger": {"kind": "json", "value": "x"},
        "plain": {"kind": "json", "value": 6},
    }
    edit_record(kernel.db, lambda r: {**r, "names": {**r["names"], **hostile}})
    kernel.ok("%stateful trust --yes")  # signed: the name policy still holds
    kernel.restart()
    ran = kernel.ok(cell)
    ns = kernel.shell.user_ns
    assert ns["plain"] == 6 and ns["kept"] == {"a": 1, "b": 1}, "the cell's own names come back"
    assert "stranger" not in ns and "print" not in ns and ns["__builtins__"] is not 1  # noqa: F632
    (line,) = ran.stderr.splitlines()
    assert line == (
        "[stateful] not restored: __builtins__ (a dunder name); print (shadows a builtin); get_ipython (IPython's own); "
        "Out (IPython's own); _ (IPython's own); stranger (not bound by the cell's code)"
    )
    assert kernel.ok("print('later cells work')").stdout == "later cells work\n"
    assert kernel.ok("%%stateful\nafter = 1\n").result.success


def test_changed_in_place_binds_only_names_the_cells_code_reads(kernel):
    """Issue #15's in-place names meet #14's policy: a signed record may bind
    a name its cell's code only reads (df["b"] = …) when the record says the
    run changed it in place, and no other name that way."""
    kernel.ok("rows = [1]")
    cell = "%%stateful\nrows.append(2)\n"
    kernel.ok(cell)
    hostile = {"stranger": {"kind": "json", "value": "x"}}
    edit_record(kernel.db, lambda r: {**r, "names": {**r["names"], **hostile}, "changed": [*r["changed"], "stranger"]})
    kernel.ok("%stateful trust --yes")
    kernel.restart()
    kernel.ok("rows = [1]")
    ran = kernel.ok(cell)
    assert kernel.shell.user_ns["rows"] == [1, 2], "the in-place change comes back"
    assert "stranger" not in kernel.shell.user_ns
    assert "stranger (not bound by the cell's code)" in ran.stderr


def test_a_signed_record_copied_under_another_cells_key_does_not_replay_there(kernel):
    """The signature binds a record to its cell."""
    kernel.ok("%%stateful --name victim\nthreshold = 0.5\n")
    kernel.ok("%%stateful --name donor\nthreshold = 99\nprint('donor ran')\n")
    conn = sqlite3.connect(kernel.db)
    donor = conn.execute(
        "SELECT s.transition_result FROM orchestration_session_state s JOIN orchestration_session_entry e "
        "ON e.orchestration_session_entry_id = s.session_entry_id WHERE s.to_state = 'EXECUTED' ORDER BY s.rowid DESC LIMIT 1"
    ).fetchone()[0]
    conn.close()
    kernel.restart()
    edit_record_of = sqlite3.connect(kernel.db)
    edit_record_of.execute(
        "UPDATE orchestration_session_state SET transition_result = ? WHERE rowid = (SELECT s.rowid FROM "
        "orchestration_session_state s JOIN orchestration_session_entry e ON e.orchestration_session_entry_id = "
        "s.session_entry_id WHERE s.to_state = 'EXECUTED' AND e.ingest_src = (SELECT ingest_src FROM "
        "orchestration_session_entry ORDER BY rowid LIMIT 1))",
        (donor,),
    )
    edit_record_of.commit()
    edit_record_of.close()
    ran = kernel.ok("%%stateful --name victim\nthreshold = 0.5\n")
    assert "threshold" not in kernel.shell.user_ns and "untrusted record" in ran.stderr
    assert "donor ran" in ran.stdout, "its text is shown, marked untrusted"


ODD_RECORDS = {
    "duration as a string": (lambda r: {**r, "duration_s": "3s"}, "duration_s is a string, not a number"),
    "huge duration": (lambda r: json.dumps(r)[:-1] + ',"duration_s":1' + "0" * 400 + "}", "duration_s is too large (401 digits)"),
    "negative duration": (lambda r: {**r, "duration_s": -1}, "duration_s is negative"),
    "infinite number": (lambda r: json.dumps(r)[:-1] + ',"extra":[1e400]}', "the number 1e400 is out of range"),
    "NaN": (lambda r: json.dumps(r)[:-1] + ',"extra":NaN}', "NaN is not a JSON number"),
    "nested 990 deep": (lambda r: json.dumps(r)[:-1] + ',"extra":' + "[" * 990 + "]" * 990 + "}", "JSON nested deeper than 64 levels"),
    "huge size": (lambda r: {**r, "names": {**r["names"], "secret_sauce": {**r["names"]["secret_sauce"], "size": 2**64}}}, "the spec of name 'secret_sauce': size is too large"),
    "size as text": (lambda r: {**r, "names": {**r["names"], "secret_sauce": {**r["names"]["secret_sauce"], "size": "1 GB"}}}, "size is a string, not a number"),
    "spec without kind": (lambda r: {**r, "names": {**r["names"], "plain": {"value": 5}}}, "the spec of name 'plain' has no kind"),
    "outputs as an object": (lambda r: {**r, "outputs": {}}, "outputs is an object, not an array"),
    "not an object": (lambda r: [r], "a JSON array, not an object"),
}


@pytest.mark.parametrize("case", sorted(ODD_RECORDS))
def test_odd_json_from_another_tool_is_one_line(kernel, case):
    """Issue #14.5: each odd record gets one line naming it and what is wrong;
    the kernel and later cells are unaffected."""
    change, message = ODD_RECORDS[case]
    kernel.ok(CELL)
    edit_record(kernel.db, change)
    kernel.restart()
    ran = kernel.run(CELL)
    no_traceback(ran)
    err = ran.result.error_in_exec
    assert type(err).__name__ == "StatefulRunError" and "\n" not in str(err)
    assert message in str(err) and str(kernel.db) in str(err) and "unreadable" in str(err)
    assert counter(kernel.workdir / "side.log") == 1 and "plain" not in kernel.shell.user_ns
    if kernel.rows("SELECT json_valid(transition_result) FROM orchestration_session_state WHERE to_state = 'EXECUTED'") == [(1,)]:
        # (Text SQLite itself can't read as JSON breaks the listings' SQL: not this module's to read.)
        trusted = kernel.ok("%stateful trust --yes")
        assert "signed 0 records" in trusted.stdout and message in trusted.stderr, "trust refuses it, in one line"
    assert kernel.ok("x = 1\nprint(x)").stdout == "1\n"


def _flip_signature(row: str) -> str:
    """A well-formed row whose signature is another one (one bit flipped)."""
    import base64

    kind, key, sig = row.split(" ")
    raw = bytearray(base64.b64decode(sig))
    raw[0] ^= 1
    return f"{kind} {key} {base64.b64encode(bytes(raw)).decode()}"


@pytest.mark.parametrize(
    "signature, why",
    [
        ("é" * 64, "its signature row by your key is not a signature"),
        ("F" * 64, "its signature row by your key is not a signature"),
        ("0" * 64, "its signature row by your key is not a signature"),
        ("ssh-ed25519  x y", "its signature row by your key is not a signature"),
        (_flip_signature, "its signature by your key does not match"),
        (b"\x00\xff" * 32, "unsigned"),
        (12345, "its signature row by your key is not a signature"),
        (None, "unsigned"),
    ],
)
def test_odd_signature_rows_mean_untrusted_in_one_line(kernel, signature, why):
    """A non-ASCII, BLOB, upper-case, numeric, null or misshapen signature
    is simply not a signature; a well-formed wrong one does not match."""
    kernel.ok(CELL)
    if callable(signature):
        ((row,),) = kernel.rows("SELECT signature FROM rssd_magic_signature")
        signature = signature(row)
    conn = sqlite3.connect(kernel.db)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    if signature is None:
        conn.execute("DELETE FROM rssd_magic_signature")
    else:
        conn.execute("UPDATE rssd_magic_signature SET signature = ?", (signature,))
    conn.commit()
    conn.close()
    kernel.restart()
    ran = kernel.run(CELL)
    no_traceback(ran)
    assert ran.result.success and "plain" not in kernel.shell.user_ns and "shown" in ran.stdout
    (line,) = ran.stderr.splitlines()
    assert why in line and "%stateful trust" in line


@pytest.mark.parametrize(
    "spec, why",
    [
        ({"kind": "json"}, "plain has no value in its record"),
        ({"kind": "pickle", "blob": 7}, "plain has a malformed pickle spec (no blob digest)"),
        ({"kind": "module", "module": 3}, "plain names no importable module ('3')"),
        ({"kind": "teleport"}, "plain unknown kind 'teleport'"),
    ],
)
def test_odd_specs_in_a_signed_record_are_one_line_each(kernel, spec, why):
    kernel.ok(CELL)
    edit_record(kernel.db, lambda r: {**r, "names": {**r["names"], "plain": spec}})
    kernel.ok("%stateful trust --yes")
    kernel.restart()
    ran = kernel.run(CELL)
    no_traceback(ran)
    assert ran.result.success and "plain" not in kernel.shell.user_ns
    assert kernel.shell.user_ns["secret_sauce"] == {"a": 2, "b": 1}, "the other names still come back"
    (line,) = ran.stderr.splitlines()
    assert line.startswith("[stateful] not restored: ") and why in line


def test_reports_survive_numbers_out_of_range(kernel):
    """``%stateful list/show`` read durations with SQL: infinity is shown as unknown."""
    kernel.ok(CELL)
    conn = sqlite3.connect(kernel.db)
    conn.execute(
        "UPDATE orchestration_session_state SET transition_result = json_set(transition_result, '$.duration_s', json('1e400'))"
        " WHERE to_state = 'EXECUTED'"
    )
    conn.commit()
    conn.close()
    listed = kernel.ok("%stateful list")
    assert "Traceback" not in listed.stdout and "EXECUTED" in listed.stdout
    from rssd_magic.manage import report

    store = kernel.magics.runner.backend()
    info = report.show_cell(store, report.list_cells(store)[0]["key"])
    assert info["duration_s"] is None and json.dumps(info, allow_nan=False)
    assert report.stats(store)["time_saved_s"] == 0.0


# -- the property: random records and signatures never act -------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**30, max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["<script>alert(1)</script>", "evil_helper", "sha256:00", "text/html", "__builtins__"]),
)
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_INJECT = [
    ("names", "helper", {"kind": "module", "module": "evil_helper"}),
    ("names", "secret_model", {"kind": "json", "value": "attacker value"}),
    ("names", "print", {"kind": "json", "value": None}),
    ("names", "__builtins__", {"kind": "json", "value": 1}),
    ("outputs", None, {"output_type": "display_data", "data": {"text/html": "<script>x</script>", "application/javascript": "x"}, "metadata": {}}),
    ("outputs", None, {"output_type": "execute_result", "data": {"text/html": "<b>forged</b>"}, "metadata": {}}),
]


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def _mutate(record: dict, data) -> str:
    """One random change to *record*, as JSON text (or not JSON at all)."""
    how = data.draw(st.sampled_from(["replace", "delete", "inject", "text", "deep"]))
    if how == "text":
        return data.draw(st.text(max_size=40))
    if how == "deep":
        n = data.draw(st.integers(min_value=60, max_value=1200))
        return json.dumps(record)[:-1] + ',"x":' + "[" * n + "]" * n + "}"
    if how == "inject":
        field, name, value = data.draw(st.sampled_from(_INJECT))
        if name is None:
            record[field] = [*record.get(field, []), value]
        else:
            record[field] = {**record.get(field, {}), name: value}
        return json.dumps(record)
    paths = [p for p in _paths(record) if p]
    path = data.draw(st.sampled_from(paths))
    parent = record
    for step in path[:-1]:
        parent = parent[step]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(_json)
    return json.dumps(record)


def _restore_values(ns, names):
    return {n: ns[n] for n in names if n in ns}


_examples = iter(range(10**9))


def test_trust_shows_what_a_forged_record_names_escaped_on_one_line(kernel):
    # Found by the random-record test below: a buffer "digest" holding a
    # record separator (or a terminal escape) was printed as it was, and
    # broke the refusal across lines.
    db = kernel.workdir / "forged.db"
    kernel.ok(RICH.replace("%%stateful\n", f"%%stateful --db {db}\n", 1))
    kernel.restart()

    def forge(record):
        record["names"]["display"]["buffers"] = ["\x1e\x1b[31mred"]
        record["names"]["secret_model\nline"] = record["names"].pop("secret_model")
        return record

    edit_record(db, forge)
    ran = kernel.run(f"%stateful trust --yes --db {db}")
    no_traceback(ran)
    assert "can't be trusted" in ran.stderr or "not trusted" in ran.stderr
    assert not any(c in ran.stdout + ran.stderr for c in "\x1e\x1b"), ran.stderr


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), target=st.sampled_from(["record", "signature", "signed record"]))
def test_random_records_and_signatures_never_act(kernel, data, target):
    """Mutate a record or its signature at random: no traceback escapes, the
    cell is not re-run, and nothing the signer didn't sign is bound, imported
    or published as active content.  A mutated record the user then signs
    (``signed record``) still binds no name its cell's code doesn't bind."""
    (kernel.workdir / "evil_helper.py").write_text("open('imported.marker', 'w').write('ran')\n")
    db = kernel.workdir / f"ex{next(_examples)}.db"
    cell = RICH.replace("%%stateful\n", f"%%stateful --db {db}\n", 1)
    first = kernel.ok(cell)
    runs = counter(kernel.workdir / "side.log")
    original = _restore_values(kernel.shell.user_ns, RICH_NAMES)
    original_active = active(first.displays)
    kernel.restart()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    if target != "signature":
        state_id, text = _latest(conn)
        new = _mutate(json.loads(text), data)
        conn.execute("UPDATE orchestration_session_state SET transition_result = ? WHERE orchestration_session_state_id = ?", (new, state_id))
    else:
        value = data.draw(st.one_of(st.none(), st.text(max_size=70), st.binary(max_size=40), st.integers(-(2**63), 2**63 - 1), st.floats(), st.just("f" * 64)))
        column = data.draw(st.sampled_from(["signature", "key_id", "payload_id"]))
        if value is None:
            conn.execute("DELETE FROM rssd_magic_signature")
        else:
            try:
                conn.execute(f"UPDATE rssd_magic_signature SET {column} = ?", (value,))
            except sqlite3.IntegrityError:
                # NaN reads as NULL in SQLite: the table refuses it from any
                # tool, so this example mutates nothing.
                conn.close()
                assume(False)
    conn.commit()
    conn.close()
    if target == "signed record":
        if kernel.rows("SELECT json_valid(transition_result) FROM orchestration_session_state WHERE to_state = 'EXECUTED'", db=db) == [(1,)]:
            no_traceback(kernel.run(f"%stateful trust --yes --db {db}"))
        else:
            # Text SQLite can't read as JSON breaks the listings' json_extract
            # (backends/sqlite_reports.py, not this issue's): left unsigned.
            target = "record"

    ran = kernel.run(cell)
    no_traceback(ran)
    outcome = "unreadable" if ran.result.error_in_exec else "untrusted" if "untrusted record" in ran.stderr else "replayed"
    event(f"{target}: {outcome}")
    assert counter(kernel.workdir / "side.log") == runs, "the cell is not re-run silently"
    assert not (kernel.workdir / "imported.marker").exists() and "evil_helper" not in sys.modules
    ns = kernel.shell.user_ns
    assert "print" not in ns and "helper" not in ns and ns.get("__builtins__") is not 1  # noqa: F632
    bound = _restore_values(ns, RICH_NAMES)
    if target != "signed record":
        # What is bound or actively shown is exactly what the signer signed.
        assert all(name in original and type(value) is type(original[name]) and value == original[name] for name, value in bound.items())
        assert all(d in original_active for d in active(ran.shown))
    if target == "signature":
        assert not bound and not active(ran.displays), "an unsigned record acts in no way"
    assert kernel.ok("print('later')").stdout == "later\n"
    kernel.restart()


# -- the parts on their own ----------------------------------------------------------------------


def test_hmac_key_accepts_only_its_own_lowercase_hex_signature():
    signer = HmacKey(b"k", "team:x", "the team key")
    good = signer.sign("pid")
    assert signer.check("pid", good)
    for odd in (None, 7, b"\x00" * 64, good.upper(), good[:-1], good + "0", "é" * 64, good[:-1] + "\n", "z" * 64):
        assert not signer.check("pid", odd), odd
    assert not HmacKey(b"other", "team:y", "").check("pid", good)


def test_signature_rows_are_accepted_in_one_shape_only(tmp_path):
    me, other = PersonalKey.load(tmp_path / "me"), PersonalKey.load(tmp_path / "other")
    row = me.sign("a" * 64)
    kind, key, sig = row.split(" ")
    assert parse_row(me.key_id, row) is not None
    for odd in (
        row + " ", row.replace(" ", "  ", 1), f"ssh-rsa {key} {sig}", f"{kind} {key} {sig.rstrip('=')}",
        f"{kind} {key}= {sig}", f"{kind} {key} {sig}AAAA", other.sign("a" * 64), row.encode(), None, 7,
    ):  # fmt: skip
        assert parse_row(me.key_id, odd) is None, odd
    assert parse_row(other.key_id, row) is None, "the key id must be the fingerprint of the key the row embeds"
    ring = Keyring(me, SignersFile(tmp_path / "no-such-file"))
    assert ring.judge("a" * 64, {me.key_id: row}).trusted
    assert ring.judge("b" * 64, {me.key_id: row}).why == "its signature by your key does not match (changed after it was signed)"
    assert not Keyring(other, SignersFile(tmp_path / "no-such-file")).judge("a" * 64, {me.key_id: row}).trusted


def test_the_signed_message_covers_the_whole_record_and_binds_its_cell():
    record = RunRecord.from_json(
        {"outputs": [{"output_type": "stream", "name": "stdout", "text": "hi\n"}], "names": {"x": {"kind": "json", "value": 1}}}
    )
    message = record.payloads_to_sign("rssd-magic:nb#aaaa")[0]
    assert message == RunRecord.from_json(record.dumps()).payloads_to_sign("rssd-magic:nb#aaaa")[0], "stable across a round trip"
    assert message != record.payloads_to_sign("rssd-magic:nb#bbbb")[0], "another cell, another message"
    for change in (
        lambda r: r.names.update(x={"kind": "json", "value": 2}),
        lambda r: r.outputs.append({"output_type": "stream", "name": "stdout", "text": "more"}),
        lambda r: r.extra.update(unknown_field=1),
        lambda r: setattr(r, "host", "elsewhere"),
    ):
        edited = RunRecord.from_json(record.dumps())
        change(edited)
        assert edited.payloads_to_sign("rssd-magic:nb#aaaa")[0] != message
    pickled = RunRecord(names={"p": {"kind": "pickle", "blob": "sha256:" + "1" * 64, "buffers": ["xxh3-128:" + "2" * 32]}})
    assert b"sha256:" + b"1" * 64 in pickled.payloads_to_sign("c")[0] and b'"blobs":["sha256:' in pickled.payloads_to_sign("c")[0]


def test_record_numbers_are_finite_and_in_range():
    assert RunRecord.from_json('{"duration_s": 1.5}').duration_s == 1.5
    assert RunRecord.from_json('{"names": {"p": {"kind": "pickle", "size": 12}}}').names["p"]["size"] == 12
    for text, message in [
        ('{"duration_s": 1e400}', "the number 1e400 is out of range"),
        ('{"duration_s": -Infinity}', "-Infinity is not a JSON number"),
        ('{"outputs": [NaN]}', "NaN is not a JSON number"),
        ('{"duration_s": 1' + "0" * 400 + "}", "duration_s is too large (401 digits)"),
        ('{"duration_s": true}', "duration_s is a boolean, not a number"),
        ('{"names": {"p": {"kind": "pickle", "size": 1.5}}}', "size is not a whole number"),
        ('{"names": {"p": {"kind": "pickle", "size": -1}}}', "size is negative"),
        ('{"result_value": {"kind": 3}}', "the result value's spec has no kind"),
        ('{"duration_s": 1' + "0" * 5000 + "}", "not valid JSON"),
    ]:
        with pytest.raises(RecordError, match=re.escape(message)):
            RunRecord.from_json(text)


def test_inert_outputs_keep_text_and_raster_images_only():
    shown, withheld = inert_outputs(
        [
            {"output_type": "stream", "name": "stdout", "text": ["a", "b"]},
            {"output_type": "stream", "name": "stdin", "text": "x"},
            {"output_type": "display_data", "data": {"text/plain": "p", "text/html": "<b>", "image/gif": "R0lG"}, "metadata": {"x": 1}},
            {"output_type": "execute_result", "data": {"image/webp": "not base64!", "application/pdf": "JVBE"}},
            {"output_type": "error", "ename": "E", "evalue": "", "traceback": []},
            {"output_type": "update_display_data", "data": {}},
            "junk",
        ]
    )
    assert shown == [
        {"output_type": "stream", "name": "stdout", "text": "ab"},
        {"output_type": "display_data", "data": {"text/plain": "p", "image/gif": "R0lG"}, "metadata": {"rssd_magic": {"untrusted": True}}},
    ]
    assert withheld == ["a malformed stream", "text/html", "image/webp", "application/pdf", "a malformed output", "a malformed output"]
    assert inert_outputs({"not": "a list"}) == ([], ["outputs (not a list)"])


def test_bindable_names_come_from_the_code_less_builtins_dunders_and_the_shells():
    code = (
        "import os.path\nx = 1\ndel gone, (also_gone)\ndef f():\n    del inner\n    local = 1\n"
        "print = 3\n__builtins__ = 1\nget_ipython = 0\n_ = 1\n_i3 = 1\n_7 = 1\n__all__ = []\nquit = 1\n"
        "get_ipython().run_line_magic('time', 'timed = 5')\n"
        "get_ipython().run_cell_magic('capture', '--no-stderr captured', 'inside = 1\\n')\n"
        "get_ipython().run_line_magic('run', 'script.py')\n"
    )
    assert bindable(code) == {"os", "x", "gone", "also_gone", "f", "timed", "captured", "inside"}
    assert bindable(out="frame") == {"frame"} and bindable(out="print") == frozenset()
    assert bindable("from IPython.display import display") == {"display"}, "IPython's additions to builtins are not Python's"
    assert bindable("this is ( not python") == frozenset()
    assert [why_not(n) for n in ("print", "__builtins__", "Out", "_i3", "anything", "a b")] == [
        "shadows a builtin", "a dunder name", "IPython's own", "IPython's own", "not bound by the cell's code", "not a Python name",
    ]  # fmt: skip
