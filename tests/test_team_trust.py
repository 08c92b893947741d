"""Issue 22, trust a team can rely on: a key per person, trusted signers,
revocation, the trust preview, cryptographic digests, and the security
review's holes — each attacked for real."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3

import numpy as np
import pytest
import xxhash
from click.testing import CliRunner
from conftest import counter, forge_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rssd_magic.cli import main
from rssd_magic.records.record import RunRecord
from rssd_magic.records.signers import OTHER_KEY_TYPES, SignersError, parse
from rssd_magic.records.signing import PersonalKey, PublicKey
from rssd_magic.records.trust import payload_id

APPEND = "open('side.log', 'a').write('ran\\n')\n"
BODY = APPEND + "import collections\nprint('shown')\nsecret_sauce = collections.Counter('aab')\nplain = 5\n"
CELL = "%%stateful\n" + BODY
NAMES = ("collections", "secret_sauce", "plain")


@pytest.fixture
def become(tmp_path, monkeypatch):
    """Switch person: each name gets a Jupyter data directory (keys,
    trusted signers) of its own, as another account or machine has."""

    def switch(name: str):
        folder = tmp_path / f"jupyter-{name}"
        monkeypatch.setenv("JUPYTER_DATA_DIR", str(folder))
        return folder / "rssd_magic"

    return switch


def cli(*args: str, input: str | None = None):
    """``rssd-magic`` in this process, as the current person (JUPYTER_DATA_DIR)."""
    return CliRunner().invoke(main, list(args), input=input)


def clear(ns) -> None:
    for name in NAMES:
        ns.pop(name, None)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, kernel):
    """Where the three people keep their state: one RSSD file, or one schema
    on a PostgreSQL server; cells use it without --db."""
    location = str(kernel.db) if request.param == "sqlite" else request.getfixturevalue("pg_url")
    kernel.magics.rssd_path = location
    return location


def test_three_people_on_one_store(kernel, become, store):
    """A records; C, who trusts nobody, sees text only; B trusts A's line and
    replays with names bound, then revokes A and, in the same kernel, sees
    text only at the next replay."""
    become("alice")
    kernel.ok(CELL)
    alice_line = cli("keys", "show", "--name", "alice@team").output.strip()
    assert alice_line.startswith("alice@team ssh-ed25519 AAAA")
    kernel.restart()

    become("carol")
    ran = kernel.ok(CELL)
    assert "shown" in ran.stdout and not any(n in kernel.shell.user_ns for n in NAMES)
    assert "untrusted record" in ran.stderr and "a key you don't trust" in ran.stderr
    kernel.restart()

    become("bob")
    added = cli("keys", "trust", alice_line)
    assert added.exit_code == 0 and "trusted alice@team (SHA256:" in added.output
    ran = kernel.ok(CELL)
    assert ran.stderr == "" and kernel.shell.user_ns["secret_sauce"] == {"a": 2, "b": 1}
    banner = ran.banner[0].data
    assert "signed by alice@team" in banner["text/plain"], "the banner names a signer who isn't you"
    assert f" from {os.path.basename(store) if store == str(kernel.db) else store[:60]}" in banner["text/plain"]
    bundle = banner["application/vnd.rssd-magic.replay+json"]
    assert (bundle["signer"], bundle["signed_by_you"], bundle["store"]) == ("alice@team", False, store)
    clear(kernel.shell.user_ns)
    kernel.ok(CELL)  # the good verdict, cached
    assert kernel.shell.user_ns["plain"] == 5
    listed = cli("keys", "list", "--json")
    assert [r["name"] for r in json.loads(listed.output)] == ["(you)", "alice@team"]

    revoked = cli("keys", "revoke", "alice@team")
    assert revoked.exit_code == 0 and "revoked alice@team" in revoked.output
    clear(kernel.shell.user_ns)
    ran = kernel.ok(CELL)  # same kernel, no restart: the cached verdict must not outlive the revocation
    assert "shown" in ran.stdout and not any(n in kernel.shell.user_ns for n in NAMES)
    assert "untrusted record" in ran.stderr
    assert counter(kernel.workdir / "side.log") == 1, "nobody re-ran the cell"


def test_a_signed_record_edited_afterwards_does_not_act(kernel, become):
    become("alice")
    kernel.ok(CELL)
    conn = sqlite3.connect(kernel.db)
    conn.execute(
        "UPDATE orchestration_session_state SET transition_result = json_set(transition_result, '$.names.plain.value', 6) "
        "WHERE to_state = 'EXECUTED'"
    )
    conn.commit()
    conn.close()
    kernel.restart()
    ran = kernel.ok(CELL)
    assert "is unsigned;" in ran.stderr and "plain" not in kernel.shell.user_ns


def test_a_record_signed_by_an_untrusted_key_does_not_act(kernel, become, tmp_path):
    """Mallory signs a record with her own key and puts her key in the row:
    the row checks, but nobody trusts her key."""
    become("victim")
    kernel.ok("%%stateful --name other\nwarm = 1\n")  # the store and a session exist
    mallory = PersonalKey.load(tmp_path / "mallory_key")
    marker = tmp_path / "pwned"
    record = {"format": "rssd_magic.result.v1", "outputs": [{"output_type": "stream", "name": "stdout", "text": "hi\n"}],
              "names": {"stolen": {"kind": "module", "module": "antigravity"}}}  # fmt: skip
    cell = "%%stateful --name forged\nstolen = 0\n"
    ingest = forge_record(kernel, cell, record)
    (message,) = RunRecord.from_json(record).payloads_to_sign(ingest)
    pid = payload_id(message)
    _rows(kernel.db, [(pid, mallory.key_id, mallory.sign(pid))])
    kernel.restart()
    ran = kernel.ok(cell)
    assert "stolen" not in kernel.shell.user_ns and not marker.exists() and ran.stdout == "hi\n"
    assert f"signed by {mallory.key_id}, a key you don't trust" in ran.stderr
    # The same row filed under the victim's key id: the embedded key is not theirs.
    _rows(kernel.db, [(pid, kernel.magics.signer.key_id, mallory.sign(pid))])
    kernel.restart()
    ran = kernel.ok(cell)
    assert "stolen" not in kernel.shell.user_ns and "its signature row by your key is not a signature" in ran.stderr


def _rows(db, rows) -> None:
    conn = sqlite3.connect(db)
    conn.executemany(
        "INSERT INTO rssd_magic_signature (payload_id, key_id, signature) VALUES (?, ?, ?) "
        "ON CONFLICT (payload_id, key_id) DO UPDATE SET signature = excluded.signature",
        rows,
    )
    conn.commit()
    conn.close()


# -- key files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"-----BEGIN"), "too short"),
        (lambda p: p.chmod(0o640), "mode 0640"),
        (lambda p: os.chown(p, 4242, -1), "not owned by you"),
    ],
)
def test_a_doubtful_key_file_is_refused_in_one_line_and_kept(kernel, become, damage, why):
    keys = become("someone")
    kernel.ok("%%stateful\nwarm = 1\n")
    key_file = keys / "ed25519_key"
    if why == "not owned by you" and os.getuid() != 0:
        pytest.skip("only root can give a file away")
    damage(key_file)
    before = key_file.read_bytes()
    kernel.restart()
    ran = kernel.run(CELL)
    err = ran.result.error_in_exec
    assert type(err).__name__ == "UsageError" and str(key_file) in str(err) and why in str(err) and "\n" not in str(err)
    assert counter(kernel.workdir / "side.log") == 0, "the cell is not run"
    assert key_file.read_bytes() == before, "never silently replaced"


def test_an_empty_hmac_key_file_is_refused_and_a_record_forged_with_the_empty_key_binds_nothing(kernel, become):
    """Today's hole: a kernel killed between creating and writing the
    per-user key left it empty, and the empty key signs for anyone."""
    keys = become("victim")
    kernel.ok("%%stateful --name other\nwarm = 1\n")
    legacy = keys / "secret"
    legacy.write_bytes(b"")
    legacy.chmod(0o600)
    record = {"format": "rssd_magic.result.v1", "outputs": [], "names": {"stolen": {"kind": "json", "value": "x"}}}
    cell = "%%stateful --name forged\n" + APPEND + "stolen = 0\n"
    ingest = forge_record(kernel, cell, record)
    pid = payload_id(RunRecord.from_json(record).payloads_to_sign(ingest)[0])
    empty_id = hashlib.sha256(b"rssd_magic key id\0").hexdigest()[:16]
    _rows(kernel.db, [(pid, empty_id, hmac.new(b"", pid.encode(), hashlib.sha256).hexdigest())])
    kernel.restart()
    ran = kernel.run(cell)
    err = ran.result.error_in_exec
    assert type(err).__name__ == "UsageError" and f"key file {legacy} is empty" in str(err)
    assert "stolen" not in kernel.shell.user_ns and counter(kernel.workdir / "side.log") == 0
    assert legacy.read_bytes() == b""
    legacy.unlink()  # the user deletes it, as the message says: the forged record still doesn't act
    ran = kernel.ok(cell)
    assert "stolen" not in kernel.shell.user_ns and "signed by no key you trust" in ran.stderr


def test_new_key_files_are_written_whole(tmp_path):
    """Made in a temporary file, synced and linked into place: never a
    partial file, never replacing one another kernel just made."""
    first = PersonalKey.load(tmp_path / "k")
    again = PersonalKey.load(tmp_path / "k")
    assert first.key_id == again.key_id and os.listdir(tmp_path) == ["k"]


# -- trusted signers -----------------------------------------------------------------------------


def test_a_signers_file_with_a_bad_line_is_one_error_naming_file_and_line(kernel, become, tmp_path):
    become("bob")
    good = PersonalKey.load(tmp_path / "alice").public.openssh
    signers = tmp_path / "team_signers"
    signers.write_text(f"# the team\n\nalice {good}\nbob ssh-ed25519 AAAAnot-a-key\n")
    out = cli("keys", "trust", str(signers))
    assert out.exit_code == 1 and f"{signers}, line 4: the key is not a valid ssh-ed25519 public key" in out.output
    assert out.output.count("\n") == 1 and "Traceback" not in out.output
    kernel.magics.trusted_signers = str(signers)
    ran = kernel.run(CELL)
    err = ran.result.error_in_exec
    assert type(err).__name__ == "UsageError" and f"{signers}, line 4" in str(err)
    assert counter(kernel.workdir / "side.log") == 0
    signers.write_text(f"alice {good}\n")
    signers.chmod(0o666)
    err = kernel.run(CELL).result.error_in_exec
    assert type(err).__name__ == "UsageError" and "can be changed by others (mode 0666)" in str(err)
    signers.chmod(0o644)
    kernel.ok(CELL)


_names = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="@._-+"), min_size=1, max_size=20).filter(
    lambda name: name != "ssh-ed25519" and name not in OTHER_KEY_TYPES
)
_keys = st.binary(min_size=32, max_size=32).map(lambda raw: PublicKey(b"\0\0\0\x0bssh-ed25519\0\0\0\x20" + raw))
_entry = st.one_of(
    st.tuples(st.just("ed25519"), _names, _keys, st.sampled_from(["", ' namespaces="rssd-magic,git"', ' namespaces="git"']), st.sampled_from(["", " a comment"])),
    st.tuples(st.just("other"), _names, st.sampled_from(["ssh-rsa", "ecdsa-sha2-nistp256"]), st.just(""), st.just("")),
    st.tuples(st.just("comment"), st.text(max_size=30).filter(lambda t: "\n" not in t and "\r" not in t), st.none(), st.just(""), st.just("")),
)


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(_entry, max_size=8))
def test_signers_file_parser_round_trips(entries):
    """Property: a file of valid lines gives back exactly the Ed25519 keys
    that apply here (namespaces), in order, named as written."""
    lines, expected = [], []
    for kind, name, key, options, comment in entries:
        if kind == "comment":
            lines.append("# " + name if name.strip() else "")
        elif kind == "other":
            lines.append(f"{name} {key} AAAAB3NzaC1yc2EAAAADAQABAAABAQ")
        else:
            lines.append(f"{name}{options} {key.openssh}{comment}")
            if options != ' namespaces="git"':
                expected.append((name, key.fingerprint))
    got = parse("\n".join(lines), "f")
    assert [(s.name, s.fingerprint) for s in got] == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=200))
def test_signers_file_parser_never_fails_other_than_naming_the_line(text):
    try:
        parse(text, "f")
    except SignersError as exc:
        assert str(exc).startswith("trusted signers f, line ") and "\n" not in str(exc)


# -- the trust preview --------------------------------------------------------------------------


RICH = (
    "%%stateful --name rich\nimport json\nfrom IPython.display import HTML, display\n"
    "display(HTML('<b>x</b>'))\nfrom fractions import Fraction\nhalf = Fraction(1, 2)\n"
)
PLAIN = "%%stateful --name plain\nimport collections\nc = collections.Counter('ab')\n"


def test_trust_previews_then_signs_one_cell_or_one_signers_records(kernel, become):
    become("alice")
    kernel.ok(RICH)
    kernel.restart()
    become("dave")
    kernel.ok(PLAIN)
    dave = kernel.magics.signer.key_id
    kernel.restart()
    become("bob")
    shown = kernel.ok("%stateful trust")
    preview = shown.result.result.value
    assert kernel.rows("SELECT count(*) FROM rssd_magic_signature") == [(2,)], "the preview signs nothing"
    rich = next(r for r in preview["records"] if r["name"] == "rich")
    assert "fractions.Fraction" in rich["pickled"] and rich["modules"] == ["json"] and "text/html" in rich["active"]
    assert rich["host"] and rich["signer"].startswith("SHA256:") and rich["refused"] is None
    assert "%stateful trust --yes" in repr(shown.result.result) and "<table>" in shown.result.result._repr_html_()

    signed = kernel.ok(f"%stateful trust --signer {dave} --yes")
    assert "signed 1 record" in signed.stdout
    kernel.ok(PLAIN)
    assert kernel.shell.user_ns["c"] == {"a": 1, "b": 1}
    assert "untrusted record" in kernel.ok(RICH).stderr and "half" not in kernel.shell.user_ns
    assert "signed 1 record" in kernel.ok("%stateful trust rich --yes").stdout
    kernel.restart()
    kernel.ok(RICH)
    assert kernel.shell.user_ns["half"] == 0.5
    assert "nothing to sign" in repr(kernel.ok("%stateful trust").result.result)
    err = kernel.run("%stateful trust --signer nobody").result.error_in_exec
    assert type(err).__name__ == "UsageError" and "--signer 'nobody'" in str(err)


def test_cli_trust_asks_on_a_terminal(kernel, become, monkeypatch):
    become("alice")
    kernel.ok(PLAIN)
    kernel.restart()
    become("bob")
    monkeypatch.setattr("rssd_magic.adapters.surfaces._interactive", lambda: True)
    no = cli("--db", str(kernel.db), "trust", input="n\n")
    assert no.exit_code == 1 and "collections.Counter" in no.output and "nothing signed" in no.output
    yes = cli("--db", str(kernel.db), "trust", input="y\n")
    assert yes.exit_code == 0 and "signed 1 record" in yes.output


# -- digests -------------------------------------------------------------------------------------


ARRAY = "%%stateful --name arr\nimport numpy as np\narr = np.arange(100_000, dtype='int64')\n"


def test_an_xxh3_named_buffer_is_never_loaded_even_in_a_trusted_record(kernel, become):
    """A record as the previous version wrote it — a raw buffer named by
    XXH3-128, which is not collision-resistant — signed by the user's old
    HMAC key: its other names replay, the buffer is refused, and trust
    won't re-sign it."""
    keys = become("upgrader")
    kernel.ok(ARRAY)
    ((text,),) = kernel.rows("SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED'")
    record = json.loads(text)
    data = np.arange(100_000, dtype="int64").tobytes()
    old = "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)
    (new,) = record["names"]["arr"]["buffers"]
    assert new.startswith("blake3:")
    record["names"]["arr"]["buffers"] = [old]
    ingest = kernel.rows("SELECT ingest_src FROM orchestration_session_entry")[0][0]
    pid = payload_id(RunRecord.from_json(record).payloads_to_sign(ingest)[0])
    secret = b"ab" * 32
    (keys / "secret").write_bytes(secret + b"\n")
    (keys / "secret").chmod(0o600)
    legacy_id = hashlib.sha256(b"rssd_magic key id\0" + secret).hexdigest()[:16]
    conn = sqlite3.connect(kernel.db)
    conn.execute("UPDATE orchestration_session_state SET transition_result = ? WHERE to_state = 'EXECUTED'", (json.dumps(record),))
    conn.execute("INSERT INTO rssd_magic_blob (digest, size, data) VALUES (?, ?, ?)", (old, len(data), data))
    conn.execute("DELETE FROM rssd_magic_signature")
    conn.commit()
    conn.close()
    _rows(kernel.db, [(pid, legacy_id, hmac.new(secret, pid.encode(), hashlib.sha256).hexdigest())])
    kernel.restart()
    ran = kernel.ok(ARRAY)
    assert "arr" not in kernel.shell.user_ns and kernel.shell.user_ns["np"].__name__ == "numpy"
    assert "arr names an XXH3-128 buffer" in ran.stderr and "--force" in ran.stderr
    become("someone-else")
    refused = kernel.run("%stateful trust arr --yes")
    assert "xxh3-128" in refused.stderr and "not collision-resistant" in refused.stderr and "signed 0 records" in refused.stdout


def test_a_stream_named_by_an_unknown_digest_is_refused_whoever_signed_it(kernel):
    kernel.ok(PLAIN)
    ((text,),) = kernel.rows("SELECT transition_result FROM orchestration_session_state WHERE to_state = 'EXECUTED'")
    record = json.loads(text)
    record["names"]["c"]["blob"] = "md5:" + "0" * 32
    ingest = kernel.rows("SELECT ingest_src FROM orchestration_session_entry")[0][0]
    conn = sqlite3.connect(kernel.db)
    conn.execute("UPDATE orchestration_session_state SET transition_result = ? WHERE to_state = 'EXECUTED'", (json.dumps(record),))
    conn.commit()
    conn.close()
    assert "not collision-resistant (md5" in kernel.run("%stateful trust --yes").stderr, "trust won't sign it"
    # Signed anyway (a trusted key signs whatever it is given): still never loaded.
    _rows(kernel.db, [kernel.magics.signer.sign_own(RunRecord.from_json(record).payloads_to_sign(ingest)[0])])
    kernel.restart()
    ran = kernel.ok(PLAIN)
    assert "c names a stream by 'md5' digest" in ran.stderr and "c" not in kernel.shell.user_ns
    assert kernel.shell.user_ns["collections"].__name__ == "collections"


# -- secrets kept out of stored text and terminals ------------------------------------------------


def test_a_password_in_the_db_url_is_stored_nowhere(kernel, pg_url):
    import pg_util

    url = pg_url.replace("postgresql://postgres@", "postgresql://postgres:Hunter2Secret@").replace(
        "postgresql://postgres:@", "postgresql://postgres:Hunter2Secret@"
    )
    assert "Hunter2Secret" in url, url
    kernel.ok(f"%%stateful --db {url}\nprint('x')\nvalue = 1\n")
    kernel.restart()
    tables = pg_util.raw(pg_url, "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
    assert len(tables) > 5
    for (table,) in tables:
        for (row,) in pg_util.raw(pg_url, f'SELECT t::text FROM "{table}" AS t'):
            assert "Hunter2Secret" not in row, table
    (line,) = pg_util.raw(pg_url, "SELECT input_text FROM orchestration_session_exec")[0:1]
    assert "postgres:***@" in line[0]


def test_the_cli_prints_no_terminal_escapes_from_a_store(kernel):
    kernel.ok("%%stateful\nprint('hello')\n")
    conn = sqlite3.connect(kernel.db)
    evil = "\x1b]0;pwned\x07\x1b[2J\x9b31mred\x1b[0m"
    conn.execute(
        "UPDATE orchestration_session_state SET transition_result = json_set(transition_result, '$.outputs[0].text', ?) "
        "WHERE to_state = 'EXECUTED'",
        (evil + "\n",),
    )
    for table in ("orchestration_session_entry", "orchestration_session_state"):
        conn.execute(f"UPDATE {table} SET elaboration = json_set(elaboration, '$.source', ?) WHERE elaboration IS NOT NULL", (evil,))
    conn.commit()
    conn.close()
    key = kernel.rows("SELECT json_extract(elaboration, '$.key') FROM orchestration_session_entry")[0][0]
    for args in (["list"], ["show", key[:12]]):
        out = cli("--db", str(kernel.db), *args)
        assert out.exit_code == 0 and "red" in out.output
        assert not any(c in out.output for c in "\x1b\x07\x9b"), args
