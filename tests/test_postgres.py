"""The PostgreSQL backend on a real server (pg_util.py): what the shared
contract (test_backend_contract.py) does not cover — the schema it makes and
refuses, one-line connection errors, the server's clock, LISTEN/NOTIFY,
chunked blobs, a connection lost mid-run, and export/import with RSSD files.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from dataclasses import replace

import psycopg
import pytest

import pg_util
from pg_util import raw, schema_of
from rssd_magic.backends import open_backend
from rssd_magic.backends.base import ClaimRequest, ExecRow, StoreError
from rssd_magic.backends.postgres_schema import EXPECTED_COLUMNS, SCHEMA_VERSION
from rssd_magic.backends.sqlite import SqliteBackend
from rssd_magic.backends.sqlite_schema import EXPECTED_COLUMNS as SQLITE_COLUMNS
from rssd_magic.claims import current_holder
from rssd_magic.keys import cell_key
from rssd_magic.lifecycle import EXECUTED, FAILED, RUNNING
from rssd_magic.report import digests_of
from rssd_magic.trust import IntegrityError, stream_digest

KEY = cell_key("pg()", "nb/one.ipynb")
SURVEILR = ["device", "orchestration_nature", "orchestration_session", "orchestration_session_entry",
            "orchestration_session_state", "orchestration_session_exec"]  # fmt: skip


def ask(backend, key=KEY, lease=60.0, **kw) -> ClaimRequest:
    return ClaimRequest(key, "pg()", {"source": "pg()"}, current_holder(backend.session_id or ""), lease, **kw)


@pytest.fixture
def opened(pg_url):
    backends = []

    def open_(url=pg_url, **kw):
        kw.setdefault("session_args", {"test": True})
        b = open_backend(url, **kw)
        backends.append(b)
        return b

    yield open_
    for b in backends:
        b.close()


# -- the schema ---------------------------------------------------------------------


def test_tables_are_made_in_the_search_path_schema_with_surveilrs_columns(opened, pg_url):
    elsewhere = "SELECT count(*) FROM information_schema.tables WHERE table_schema <> ?"
    before = raw(pg_url, elsewhere, (schema_of(pg_url),))
    opened()
    schema = schema_of(pg_url)
    tables = {t for (t,) in raw(pg_url, "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", (schema,))}
    assert set(SURVEILR) <= tables and "rssd_magic_state_seq" in tables
    assert raw(pg_url, elsewhere, (schema,)) == before, "nothing made outside the search_path's schema"
    for table in SURVEILR:  # same names, same order as surveilr's SQLite DDL
        assert [c for c, _ in EXPECTED_COLUMNS[table]] == [c for c, _ in SQLITE_COLUMNS[table]], table
    # JSON and timestamps are TEXT, so rows round-trip byte-identical.
    types = dict(raw(pg_url, """SELECT column_name, data_type FROM information_schema.columns
                                 WHERE table_schema = ? AND table_name = 'orchestration_session_state'""", (schema,)))
    assert types["transition_result"] == types["transitioned_at"] == types["elaboration"] == "text"
    assert raw(pg_url, "SELECT value FROM rssd_magic_meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]


def test_an_existing_table_of_another_shape_is_refused_and_nothing_is_written(pg_url):
    raw(pg_url, "CREATE TABLE orchestration_session_state (id TEXT PRIMARY KEY, note TEXT)")
    raw(pg_url, "INSERT INTO orchestration_session_state VALUES ('x', 'kept')")
    with pytest.raises(StoreError) as err:
        open_backend(pg_url, session_args={})
    text = str(err.value)
    assert "\n" not in text and "incompatible schema" in text
    assert "orchestration_session_state has columns (id text, note text); expected (orchestration_session_state_id" in text
    schema = schema_of(pg_url)
    assert raw(pg_url, "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", (schema,)) == [
        ("orchestration_session_state",)
    ], "nothing else was created"
    assert raw(pg_url, "SELECT note FROM orchestration_session_state") == [("kept",)]


def test_existing_tables_and_rows_are_left_alone_and_get_a_store_order(opened, pg_url):
    b = opened()
    sid = b.session_id
    b.close()
    # Rows written by another tool while our trigger was missing.
    raw(pg_url, "DROP TRIGGER rssd_magic_state_seq ON orchestration_session_state")
    raw(pg_url, """INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, from_state, to_state)
                   VALUES ('01OTHERTOOL0000000000000000', ?, 'A', 'B')""", (sid,))
    before = raw(pg_url, "SELECT * FROM orchestration_session_state ORDER BY orchestration_session_state_id")
    opened()
    assert raw(pg_url, "SELECT * FROM orchestration_session_state WHERE session_id = ? ORDER BY orchestration_session_state_id", (sid,)) == [
        r for r in before if r[1] == sid
    ]
    assert raw(pg_url, "SELECT count(*) FROM rssd_magic_state_seq WHERE state_id = '01OTHERTOOL0000000000000000'") == [(1,)]


def test_a_newer_schema_version_and_a_missing_schema_are_refused(opened, pg_url):
    opened()
    raw(pg_url, "UPDATE rssd_magic_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99, made by a newer rssd_magic"):
        open_backend(pg_url)
    nowhere = pg_util.with_options(pg_util.server_url(), options="-c search_path=no_such_schema")
    with pytest.raises(StoreError, match=r"search_path \(no_such_schema\) names no existing schema"):
        open_backend(nowhere)


# -- connecting --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_errors_are_one_line_naming_host_port_and_database_never_the_password(pg_server):
    port = _free_port()
    cases = {
        f"postgresql://alice:hunter2@127.0.0.1:{port}/team": (f"host 127.0.0.1 port {port}", "Connection refused"),
        pg_util.with_options(pg_server, user="nobody", password="hunter2"): ("database postgres", 'role "nobody" does not exist'),
        pg_server.replace("/postgres?", "/missing_db?"): ("database missing_db", 'database "missing_db" does not exist'),
    }  # fmt: skip
    for url, (where, why) in cases.items():
        with pytest.raises(StoreError) as err:
            open_backend(url, session_args={})
        text = str(err.value)
        assert where in text and why in text, text
        assert "\n" not in text and "hunter2" not in text, text


# -- claims, the server's clock, wake-ups --------------------------------------------------


def test_silence_is_measured_by_the_servers_clock_and_reset_by_a_beat(opened):
    b = opened()
    mine = b.claim(ask(b))
    time.sleep(0.3)
    held = b.claim_of(mine.running)
    assert held.silent_s >= 0.3, held
    b.renewer().renew({mine.running.state_id: mine.claim.token})
    again = b.claim_of(mine.running)
    assert again.beat == 1 and again.silent_s < held.silent_s


def test_a_waiter_is_woken_by_the_holders_commit(opened):
    holder, waiter = opened(), opened()
    mine = holder.claim(ask(holder))
    assert waiter.claim(ask(waiter)).kind == "held"
    waiter.wait_for_change(5)  # starts listening and returns at once (the caller reads again)
    done_at = []

    def finish():
        time.sleep(0.3)
        holder.finish(mine.running, mine.claim.token, EXECUTED, "{}", "completed")
        done_at.append(time.monotonic())

    t = threading.Thread(target=finish)
    started = time.monotonic()
    t.start()
    waiter.wait_for_change(20)
    woke = time.monotonic()
    t.join()
    assert woke - started < 5, "woken by NOTIFY, not by the 20 s timeout"
    assert woke >= done_at[0] - 0.05
    assert waiter.latest(KEY).to_state == EXECUTED


def test_a_lost_connection_is_reopened_and_the_run_recorded(opened, pg_url):
    b = opened()
    mine = b.claim(ask(b))
    renewer = b.renewer()
    renewer.renew({mine.running.state_id: mine.claim.token})
    pids = [b.conn.info.backend_pid, renewer.conn.info.backend_pid]
    raw(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(?)", (pids,))
    with pytest.raises(psycopg.OperationalError):
        renewer.renew({mine.running.state_id: mine.claim.token})  # the heartbeat thread retries next beat
    assert renewer.renew({mine.running.state_id: mine.claim.token}) == set()
    done = b.finish(mine.running, mine.claim.token, EXECUTED, "{}", "completed")
    assert b.conn.info.backend_pid not in pids
    assert b.latest(KEY) == done and b.claim_of(mine.running) is None


def test_text_with_nul_is_stored_not_failed(opened, pg_url):
    b = opened()
    mine = b.claim(ask(b))
    row = ExecRow("python-cell", "print('\\x00')", 0, KEY.digest, "", "a\x00b\n")
    b.finish(mine.running, mine.claim.token, EXECUTED, '{"outputs":[{"text":"a\\u0000b"}]}', "completed", exec_row=row)
    assert raw(pg_url, "SELECT output_text FROM orchestration_session_exec") == [("a\ufffdb\n",)]
    assert b.latest(KEY).result_json == '{"outputs":[{"text":"a\\u0000b"}]}', "JSON text is kept byte for byte"


# -- blobs ---------------------------------------------------------------------------


def test_blobs_are_stored_in_chunks_and_checked_when_read(opened, pg_url):
    b = opened()
    b.blobs.chunk = 1000
    data = bytes(range(256)) * 41  # 10,496 bytes: 11 chunks
    digest = stream_digest(data)
    b.blobs.put_many([(digest, data), (stream_digest(b""), b"")])
    assert raw(pg_url, "SELECT count(*), max(octet_length(data)) FROM rssd_magic_blob_chunk WHERE digest = ?", (digest,)) == [(11, 1000)]
    assert bytes(b.blobs.get(digest)) == data and bytes(b.blobs.get(stream_digest(b""))) == b""
    raw(pg_url, "UPDATE rssd_magic_blob_chunk SET data = decode('00', 'hex') || substr(data, 2) WHERE digest = ? AND n = 5", (digest,))
    with pytest.raises(IntegrityError, match="does not match"):
        b.blobs.get(digest)
    raw(pg_url, "DELETE FROM rssd_magic_blob_chunk WHERE digest = ? AND n = 10", (digest,))
    with pytest.raises(IntegrityError, match="incomplete"):
        b.blobs.get(digest)


# -- export and import -----------------------------------------------------------------


RECORD = '{"host":"h","duration_s":1.5,"names":{"v":{"kind":"pickle","pickler":"pickle","blob":"%s","buffers":[],"size":%d}},"outputs":[]}'


def _populate(b, scope="nb/one.ipynb"):
    """Two cells of *scope* (one EXECUTED with a blob, one FAILED) and one of
    another scope; returns the EXECUTED transition and the blob's digest."""
    data = b"\x80\x05" + bytes(range(256)) * 20
    digest = stream_digest(data)
    key = cell_key("pg()", scope)
    mine = b.claim(ask(b, key))
    done = b.finish(mine.running, mine.claim.token, EXECUTED, RECORD % (digest, len(data)), "completed",
                    [(digest, data)], [("payload-1", "key-1", "sig-1")],
                    ExecRow("python-cell", "pg()", 0, key.digest, "", "out\n"))  # fmt: skip
    b.note_hit(done.state_id)
    b.flush_hits()
    failing = b.claim(ask(b, cell_key("fail()", scope)))
    b.finish(failing.running, failing.claim.token, FAILED, '{"error":{"ename":"E","evalue":"x"}}', "E: x")
    other = b.claim(ask(b, cell_key("other()", "nb/two.ipynb")))
    b.finish(other.running, other.claim.token, EXECUTED, '{"names":{},"outputs":[]}', "completed")
    return done, digest


def _rows(query_pg, query_lite, url, path):
    lite = sqlite3.connect(path)
    try:
        return raw(url, query_pg), lite.execute(query_lite).fetchall()
    finally:
        lite.close()


def test_export_writes_an_rssd_that_replays_byte_identical(opened, pg_url, tmp_path):
    b = opened()
    done, digest = _populate(b)
    path = tmp_path / "team.sqlite.db"
    r = b.export_rssd(str(path), digests_of=digests_of)
    assert r["conflicts"] == [] and r["cells"] == 3 and r["blobs"]["copied"] == 1
    states = """SELECT s.orchestration_session_state_id, s.session_id, s.session_entry_id, s.from_state, s.to_state,
                       s.transition_result, s.transition_reason, s.transitioned_at, s.elaboration
                FROM orchestration_session_state AS s {} """
    pg, lite = _rows(states.format("JOIN rssd_magic_state_seq AS q ON q.state_id = s.orchestration_session_state_id ORDER BY q.seq"),
                     states.format("ORDER BY s.rowid"), pg_url, path)  # fmt: skip
    assert lite == pg, "every transition, byte for byte, in store order"
    for table in ("orchestration_session_entry", "orchestration_session", "device", "orchestration_session_exec"):
        cols = ", ".join(c for c, _ in EXPECTED_COLUMNS[table])
        pg, lite = _rows(f"SELECT {cols} FROM {table} ORDER BY 1", f"SELECT {cols} FROM {table} ORDER BY 1", pg_url, path)
        assert lite == pg, table
    # surveilr's DDL, and a store the SQLite backend replays from.
    ddl = sqlite3.connect(path).execute("SELECT sql FROM sqlite_master WHERE name = 'orchestration_session_state'").fetchone()[0]
    assert 'CHECK(json_valid(transition_result) OR transition_result IS NULL)' in ddl
    file = SqliteBackend.open(path)
    try:
        latest = file.latest(KEY)
        assert latest == replace(done, seq=latest.seq), "the same transition; seq is the file's own rowid"
        assert bytes(file.blobs.get(digest)) == bytes(b.blobs.get(digest))
        assert file.signatures(["payload-1"]) == {"payload-1": {"key-1": "sig-1"}}
        assert [c.latest_hits for c in file.cells() if c.latest.state_id == done.state_id] == [1]
    finally:
        file.close()
    # Again: nothing new, nothing in conflict.
    again = b.export_rssd(str(path), digests_of=digests_of)
    assert again["rows_inserted"] == 0 and again["conflicts"] == [] and again["blobs"]["present"] == 1


def test_export_of_one_scope_takes_only_its_cells(opened, tmp_path):
    b = opened()
    _populate(b)
    path = tmp_path / "two.sqlite.db"
    r = b.export_rssd(str(path), scope="nb/two.ipynb", digests_of=digests_of)
    assert r["cells"] == 1 and r["blobs"]["copied"] == 0
    srcs = sqlite3.connect(path).execute("SELECT ingest_src FROM orchestration_session_entry").fetchall()
    assert srcs == [(cell_key("other()", "nb/two.ipynb").ingest_src,)]


def test_import_is_idempotent_and_reports_conflicts_without_overwriting(opened, pg_url, tmp_path):
    source = opened()
    done, digest = _populate(source)
    path = tmp_path / "in.sqlite.db"
    source.export_rssd(str(path), digests_of=digests_of)
    target_url = pg_util.fresh_url("import")
    target = opened(target_url)
    first = target.import_rssd(str(path))
    assert first["conflicts"] == [] and first["inserted"]["orchestration_session_state"] == 7
    assert first["blobs"]["copied"] == 1 and first["devices_merged"] == 1, "this host's device is the target's own"
    assert target.latest(KEY).state_id == done.state_id and target.latest(KEY).result_json == done.result_json
    assert bytes(target.blobs.get(digest)) == bytes(source.blobs.get(digest))
    again = target.import_rssd(str(path))
    assert again["rows_inserted"] == 0 and again["conflicts"] == [] and again["blobs"]["present"] == 1

    # The file is changed behind our back: the differing rows are reported and left.
    lite = sqlite3.connect(path)
    with lite:
        lite.execute("UPDATE orchestration_session_state SET transition_reason = 'edited' WHERE orchestration_session_state_id = ?", (done.state_id,))
        lite.execute("UPDATE rssd_magic_blob SET data = zeroblob(size), digest = ? ", (stream_digest(b"other"),))
    lite.close()
    third = target.import_rssd(str(path))
    assert [(c["table"], c["id"], c["columns"]) for c in third["conflicts"]] == [
        ("orchestration_session_state", done.state_id, ["transition_reason"])
    ]
    assert [bad["digest"] for bad in third["blobs"]["bad"]] == [stream_digest(b"other")]
    assert raw(target_url, "SELECT transition_reason FROM orchestration_session_state WHERE orchestration_session_state_id = ?",
               (done.state_id,)) == [("completed",)]  # fmt: skip


def test_import_keeps_the_files_store_order_whatever_the_ids(opened, tmp_path):
    path = tmp_path / "order.sqlite.db"
    lite = SqliteBackend.open(path, session_args={})
    try:
        mine = lite.claim(ask(lite))
        lite.finish(mine.running, mine.claim.token, EXECUTED, "{}", "completed")
        # A host with a clock far ahead wrote a FORGOTTEN with an id from the future, then this one ran again.
        lite.conn.execute(
            """INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, session_entry_id,
               from_state, to_state, transition_reason) VALUES ('7ZZZZZZZZZZZZZZZZZZZZZZZZZ', ?, ?, 'EXECUTED', 'FORGOTTEN', 'ahead')""",
            (lite.session_id, mine.running.entry_id),
        )
        again = lite.claim(ask(lite))
        last = lite.finish(again.running, again.claim.token, EXECUTED, '{"n":2}', "completed")
    finally:
        lite.close()
    target = opened()
    target.import_rssd(str(path))
    assert target.latest(KEY).state_id == last.state_id


def test_import_refuses_what_is_not_an_rssd(opened, tmp_path):
    b = opened()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        b.import_rssd(str(text))
    with pytest.raises(StoreError, match="not an RSSD"):
        b.import_rssd(str(plain))
    with pytest.raises(StoreError, match="no such file"):
        b.import_rssd(str(tmp_path / "missing.db"))
    assert not (tmp_path / "missing.db").exists()


def test_rows_the_server_cant_hold_are_reported_not_imported(opened, tmp_path):
    path = tmp_path / "odd.sqlite.db"
    lite = SqliteBackend.open(path, session_args={})
    try:
        mine = lite.claim(ask(lite))
        lite.finish(mine.running, mine.claim.token, FAILED, None, "bad\x00reason")
    finally:
        lite.close()
    b = opened()
    r = b.import_rssd(str(path))
    assert [c["why"] for c in r["conflicts"]] == ["transition_reason holds a NUL character, which PostgreSQL text can't"]
    assert b.latest(KEY).to_state == RUNNING, "everything else came in"


def test_large_blobs_are_kept_on_this_machine_and_checked_there_too(pg_url, tmp_path, monkeypatch):
    monkeypatch.setenv("RSSD_MAGIC_BLOB_CACHE", str(tmp_path / "cache"))
    b = open_backend(pg_url, session_args={})
    try:
        big, small = bytes(range(256)) * 8192, b"small"  # 2 MB: cached; 5 B: not
        digest = stream_digest(big)
        b.blobs.put_many([(digest, big), (stream_digest(small), small)])
        assert bytes(b.blobs.get(digest)) == big and bytes(b.blobs.get(stream_digest(small))) == small
        copy = b.blobs.cache.path(digest)
        assert copy.read_bytes() == big and len(list((tmp_path / "cache").rglob("*"))) == 3, "one file, two folders"
        copy.write_bytes(b"\0" + big[1:])  # a changed copy is dropped: the server's bytes are read again
        assert bytes(b.blobs.get(digest)) == big and copy.read_bytes() == big
        raw(pg_url, "DELETE FROM rssd_magic_blob_chunk WHERE digest = ?", (digest,))
        assert bytes(b.blobs.get(digest)) == big, "read from this machine's copy"
        raw(pg_url, "DELETE FROM rssd_magic_blob WHERE digest = ?", (digest,))
        with pytest.raises(KeyError):
            b.blobs.get(digest)  # the server says whether a blob exists
        assert b.blobs.cache.path("sha256:../../etc") is None
    finally:
        b.close()
    monkeypatch.setenv("RSSD_MAGIC_BLOB_CACHE", "off")
    off = open_backend(pg_url, readonly=True)
    assert off.blobs.cache is None
    off.close()
