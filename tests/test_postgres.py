"""The PostgreSQL backend on a real server (pg_util.py): what the shared
contract (test_backend_contract.py) does not cover — the schema it makes and
refuses, one-line connection errors, the server's clock, LISTEN/NOTIFY,
chunked blobs, a connection lost mid-run, and export/import with RSSD files;
and what a neighbour may do to a shared server (issue 21/22): wrong bytes
planted under a digest, rows and files that lie about their size, schema
names that try to break out of quoting, an earlier schema that shadows ours,
views and triggers under our names, locks and hostile functions.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import replace

import psycopg
import psycopg.sql
import pytest

import pg_util
from pg_util import raw, schema_of
from rssd_magic.backends import open_backend
from rssd_magic.store.base import ClaimRequest, ExecRow, StoreError
from rssd_magic.backends.postgres_schema import EXPECTED_COLUMNS, SCHEMA_VERSION
from rssd_magic.backends.sqlite import SqliteBackend
from rssd_magic.backends.sqlite_schema import EXPECTED_COLUMNS as SQLITE_COLUMNS
from rssd_magic.engine.claims import current_holder
from rssd_magic.engine.keys import cell_key
from rssd_magic.engine.lifecycle import EXECUTED, FAILED, RUNNING
from rssd_magic.manage.report import digests_of
from rssd_magic.store.tables import cells as _cells, gc as gc_blobs
from rssd_magic.store.transfer import transfer
from rssd_magic.records.trust import IntegrityError, stream_digest


def listed(store) -> list:
    """Every cell of *store*, as the reports list them."""
    return list(_cells(store))


def export_rssd(store, path, scope=None) -> dict:
    """``rssd-magic --db STORE export --to PATH``: the cells into an RSSD file."""
    target = open_backend(str(path))
    try:
        return transfer(store, target, scope)
    finally:
        target.close()


def import_rssd(store, path) -> dict:
    """``rssd-magic --db STORE import PATH``: an RSSD file's cells into the store."""
    source = open_backend(str(path), create=False, readonly=True)
    try:
        return transfer(source, store)
    finally:
        source.close()


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


def test_a_missing_schema_is_refused(opened, pg_url):
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
    assert renewer.renew({mine.running.state_id: mine.claim.token}) == set(), "the beat reconnected at once"
    assert renewer.conn.info.backend_pid not in pids
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
    r = export_rssd(b, path)
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
        assert [c.latest_hits for c in listed(file) if c.latest.state_id == done.state_id] == [1]
    finally:
        file.close()
    # Again: nothing new, nothing in conflict.
    again = export_rssd(b, path)
    assert again["rows_inserted"] == 0 and again["conflicts"] == [] and again["blobs"]["present"] == 1


def test_export_of_one_scope_takes_only_its_cells(opened, tmp_path):
    b = opened()
    _populate(b)
    path = tmp_path / "two.sqlite.db"
    r = export_rssd(b, path, scope="nb/two.ipynb")
    assert r["cells"] == 1 and r["blobs"]["copied"] == 0
    srcs = sqlite3.connect(path).execute("SELECT ingest_src FROM orchestration_session_entry").fetchall()
    assert srcs == [(cell_key("other()", "nb/two.ipynb").ingest_src,)]


def test_import_is_idempotent_and_reports_conflicts_without_overwriting(opened, pg_url, tmp_path):
    source = opened()
    done, digest = _populate(source)
    path = tmp_path / "in.sqlite.db"
    export_rssd(source, path)
    target_url = pg_util.fresh_url("import")
    target = opened(target_url)
    first = import_rssd(target, path)
    assert first["conflicts"] == [] and first["inserted"]["orchestration_session_state"] == 7
    assert first["blobs"]["copied"] == 1 and first["devices_merged"] == 1, "this host's device is the target's own"
    assert target.latest(KEY).state_id == done.state_id and target.latest(KEY).result_json == done.result_json
    assert bytes(target.blobs.get(digest)) == bytes(source.blobs.get(digest))
    again = import_rssd(target, path)
    assert again["rows_inserted"] == 0 and again["conflicts"] == [] and again["blobs"]["present"] == 1

    # The file is changed behind our back: the differing rows are reported and left.
    lite = sqlite3.connect(path)
    with lite:
        lite.execute("UPDATE orchestration_session_state SET transition_reason = 'edited' WHERE orchestration_session_state_id = ?", (done.state_id,))
        lite.execute("UPDATE rssd_magic_blob SET data = zeroblob(size), digest = ? ", (stream_digest(b"other"),))
    lite.close()
    third = import_rssd(target, path)
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
    import_rssd(target, path)
    assert target.latest(KEY).state_id == last.state_id


def test_import_refuses_what_is_not_an_rssd(opened, tmp_path):
    b = opened()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="not a (usable )?SQLite database"):
        import_rssd(b, text)
    with pytest.raises(StoreError, match="not an RSSD"):
        import_rssd(b, plain)
    with pytest.raises(StoreError, match="no such file"):
        import_rssd(b, tmp_path / "missing.db")
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
    r = import_rssd(b, path)
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


# -- blobs: nothing stored is trusted for being there -----------------------------------------

_PLANTS = {
    "one byte changed": lambda d: [(n, c) for n, c in enumerate(_chunks(d))][:5] + [(5, b"\0" + _chunks(d)[5][1:])]
    + [(n, c) for n, c in enumerate(_chunks(d))][6:],
    "a chunk missing": lambda d: [(n, c) for n, c in enumerate(_chunks(d)) if n != 10],
    "an extra chunk": lambda d: [(n, c) for n, c in enumerate(_chunks(d))] + [(11, b"more")],
    "no chunk at all": lambda d: [],
    "other bytes of the same size": lambda d: [(n, c) for n, c in enumerate(_chunks(bytes(len(d))))],
}


def _chunks(data: bytes, step: int = 1000) -> list[bytes]:
    return [data[i : i + step] for i in range(0, len(data), step)]


def _plant(url: str, digest: str, size: int, chunks: list[tuple[int, bytes]]) -> None:
    raw(url, "DELETE FROM rssd_magic_blob WHERE digest = ?", (digest,))
    raw(url, "INSERT INTO rssd_magic_blob (digest, size, chunks) VALUES (?, ?, 11)", (digest, size))
    for n, chunk in chunks:
        raw(url, "INSERT INTO rssd_magic_blob_chunk (digest, n, data) VALUES (?, ?, ?)", (digest, n, chunk))


def _stored(url: str, digest: str) -> bytes:
    (found,) = raw(url, "SELECT string_agg(data, ''::bytea ORDER BY n) FROM rssd_magic_blob_chunk WHERE digest = ?", (digest,))
    return bytes(found[0] or b"")


@pytest.mark.parametrize("plant", list(_PLANTS))
def test_wrong_bytes_under_a_digest_are_rewritten_before_a_record_names_them(opened, pg_url, plant):
    b = opened()
    b.blobs.chunk = 1000
    data = bytes(range(256)) * 41  # 10,496 bytes: 11 chunks
    digest = stream_digest(data)
    _plant(pg_url, digest, len(data), _PLANTS[plant](data))
    mine = b.claim(ask(b))
    b.finish(mine.running, mine.claim.token, EXECUTED, RECORD % (digest, len(data)), "completed", [(digest, data)])
    assert _stored(pg_url, digest) == data
    assert raw(pg_url, "SELECT size, chunks FROM rssd_magic_blob WHERE digest = ?", (digest,)) == [(len(data), 11)]
    assert bytes(b.blobs.get(digest)) == data


def test_a_stored_blob_proven_right_is_left_as_it_is(opened, pg_url):
    b = opened()
    data = b"right" * 1000
    digest = stream_digest(data)
    b.blobs.put_many([(digest, data)])
    before = raw(pg_url, "SELECT xmin::text FROM rssd_magic_blob_chunk WHERE digest = ?", (digest,))
    mine = b.claim(ask(b))
    b.finish(mine.running, mine.claim.token, EXECUTED, RECORD % (digest, len(data)), "completed", [(digest, data)])
    assert raw(pg_url, "SELECT xmin::text FROM rssd_magic_blob_chunk WHERE digest = ?", (digest,)) == before, "not rewritten"


def test_a_blob_row_claiming_a_terabyte_allocates_nothing(opened, pg_url):
    b = opened()
    digest = stream_digest(b"tiny")
    raw(pg_url, "INSERT INTO rssd_magic_blob (digest, size, chunks) VALUES (?, ?, 1)", (digest, 1 << 40))
    raw(pg_url, "INSERT INTO rssd_magic_blob_chunk (digest, n, data) VALUES (?, 0, ?)", (digest, b"tiny"))
    with pytest.raises(IntegrityError, match=r"4 bytes in 1 chunks stored for a recorded 1099511627776 bytes"):
        b.blobs.get(digest)


def test_the_local_cache_reads_only_regular_files_of_this_user(pg_url, tmp_path, monkeypatch):
    monkeypatch.setenv("RSSD_MAGIC_BLOB_CACHE", str(tmp_path / "cache"))
    b = open_backend(pg_url, session_args={})
    try:
        big = bytes(range(256)) * 8192  # 2 MB: cached
        digest = stream_digest(big)
        b.blobs.put_many([(digest, big)])
        assert bytes(b.blobs.get(digest)) == big
        copy = b.blobs.cache.path(digest)
        assert copy.is_file()

        # A FIFO can't block a read (opened without waiting for a writer).
        copy.unlink()
        os.mkfifo(copy)
        got = []
        reader = threading.Thread(target=lambda: got.append(bytes(b.blobs.get(digest))), daemon=True)
        reader.start()
        reader.join(20)
        assert not reader.is_alive(), "a FIFO in the cache blocked the read"
        assert got == [big] and copy.is_file() and not copy.is_symlink(), "read from the server, copy made again"

        # Nothing is read through a symlink or from another user's file:
        # with the server's chunks gone, such a "copy" is not taken.
        elsewhere = tmp_path / "planted"
        elsewhere.write_bytes(big)
        copy.unlink()
        copy.symlink_to(elsewhere)
        raw(pg_url, "DELETE FROM rssd_magic_blob_chunk WHERE digest = ?", (digest,))
        with pytest.raises(IntegrityError, match="incomplete"):
            b.blobs.get(digest)
        assert not copy.exists() and elsewhere.read_bytes() == big, "the link is dropped, its target left alone"
        if os.geteuid() == 0:
            copy.write_bytes(big)
            os.chown(copy, 65534, 65534)
            with pytest.raises(IntegrityError, match="incomplete"):
                b.blobs.get(digest)
    finally:
        b.close()


# -- what is in the schema, and what a schema is called --------------------------------------


def test_a_schema_name_with_quotes_dollar_quotes_and_percent_is_used_safely(pg_server):
    name = "t$fn$\";SELECT/**/1;--%s?'"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(name)))
    quoted = '"' + name.replace('"', '""') + '"'
    url = pg_util.with_options(pg_server, options=f"-c search_path={quoted}")
    b = open_backend(url, session_args={})
    try:
        assert b.schema == name
        mine = b.claim(ask(b))
        done = b.finish(mine.running, mine.claim.token, EXECUTED, "{}", "completed")
        assert b.latest(KEY) == done and [c.latest.state_id for c in listed(b)] == [done.state_id]
    finally:
        b.close()
    tables = raw(pg_server, "SELECT count(*) FROM information_schema.tables WHERE table_schema = ?", (name,))
    assert tables[0][0] >= 13
    # The trigger, whose body names the schema, orders another tool's row.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, from_state, to_state)
                        VALUES ('01OTHER', %s, 'A', 'B')""", (done.session_id,))  # fmt: skip
        assert conn.execute("SELECT count(*) FROM rssd_magic_state_seq WHERE state_id = '01OTHER'").fetchone() == (1,)


def test_a_schema_earlier_on_the_search_path_cannot_shadow_our_tables_functions_or_operators(pg_server):
    ours, shadow = pg_util.fresh_schema("ours"), f"shadow_{uuid.uuid4().hex[:8]}"
    url = pg_util.with_options(pg_server, options=f"-c search_path={shadow},{ours}")
    direct = pg_util.with_options(pg_server, options=f"-c search_path={ours}")
    b = open_backend(url, session_args={})
    try:
        assert b.schema == ours, "the first schema that exists when the store is opened"
        mine = b.claim(ask(b))
        # Then someone makes the earlier schema, with our names in it, and
        # plants in ours (a team schema others may create in) an operator
        # that says every two varchars are equal.
        raw(pg_server, f'CREATE SCHEMA "{shadow}"')
        for table in list(EXPECTED_COLUMNS):
            raw(pg_server, f'CREATE TABLE "{shadow}"."{table}" (LIKE "{ours}"."{table}")')
        raw(pg_server, f"""CREATE FUNCTION "{shadow}".rssd_magic_json(t text) RETURNS json LANGUAGE sql AS 'SELECT ''{{}}''::json'""")
        raw(pg_server, f"""CREATE FUNCTION "{ours}".always(a varchar, b varchar) RETURNS bool LANGUAGE sql AS 'SELECT true'""")
        raw(pg_server, f'CREATE OPERATOR "{ours}".= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = "{ours}".always)')
        raw(pg_server, "SELECT pg_terminate_backend(?)", (b.conn.info.backend_pid,))
        other = b.claim(ask(b, cell_key("other()", "nb")))  # reconnected: the new session's path has the shadow first
        done = b.finish(mine.running, mine.claim.token, EXECUTED, RECORD % ("sha256:" + "0" * 64, 1), "completed")
        assert b.latest(KEY) == done and b.claim_of(other.running).state_id == other.running.state_id
        assert sorted((c.latest.to_state, c.latest_host) for c in listed(b)) == [(EXECUTED, "h"), (RUNNING, None)], (
            "rssd_magic_json is ours"
        )
    finally:
        b.close()
    for table in EXPECTED_COLUMNS:
        assert raw(pg_server, f'SELECT count(*) FROM "{shadow}"."{table}"') == [(0,)], table
    assert raw(direct, "SELECT count(*) FROM orchestration_session_state WHERE to_state = 'EXECUTED'") == [(1,)]


@pytest.mark.parametrize(
    "plant, why",
    [
        ("CREATE VIEW rssd_magic_claim AS SELECT 1 AS x", ".rssd_magic_claim is a view, not a table"),
        ("CREATE SEQUENCE device", ".device is a sequence, not a table"),
        ("CREATE MATERIALIZED VIEW orchestration_session_state AS SELECT 1 AS x",
         ".orchestration_session_state is a materialized view, not a table"),
    ],
)  # fmt: skip
def test_our_names_taken_by_what_is_not_a_table_refuse_the_store_and_nothing_is_written(pg_url, plant, why):
    raw(pg_url, plant)
    with pytest.raises(StoreError) as err:
        open_backend(pg_url, session_args={})
    assert why in str(err.value) and "\n" not in str(err.value)
    assert raw(pg_url, "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_type = 'BASE TABLE'",
               (schema_of(pg_url),)) == [(0,)], "nothing was created"  # fmt: skip


def test_a_trigger_or_rule_of_someone_else_on_our_tables_refuses_the_store(opened, pg_url):
    opened().close()
    sessions = raw(pg_url, "SELECT count(*) FROM orchestration_session")
    raw(pg_url, "CREATE FUNCTION spy() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'")
    raw(pg_url, "CREATE TRIGGER spy BEFORE UPDATE ON rssd_magic_claim FOR EACH ROW EXECUTE FUNCTION spy()")
    with pytest.raises(StoreError, match=r"rssd_magic_claim has a trigger \(spy\) that is not ours"):
        open_backend(pg_url, session_args={})
    raw(pg_url, "DROP TRIGGER spy ON rssd_magic_claim")
    raw(pg_url, "CREATE RULE keep AS ON DELETE TO rssd_magic_blob DO INSTEAD NOTHING")
    with pytest.raises(StoreError, match=r"rssd_magic_blob has a rule \(keep\) that is not ours"):
        open_backend(pg_url, session_args={})
    assert raw(pg_url, "SELECT count(*) FROM orchestration_session") == sessions, "no session was written"


def test_reads_have_a_deadline_a_lock_or_a_hostile_function_cannot_hang_them(opened, pg_url):
    b = opened(busy_timeout_s=1.0)
    mine = b.claim(ask(b))
    b.finish(mine.running, mine.claim.token, EXECUTED, RECORD % ("sha256:" + "0" * 64, 1), "completed")
    with psycopg.connect(pg_url) as locker:  # a transaction left open, holding a lock
        locker.execute("LOCK TABLE rssd_magic_state_seq IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreError, match="canceling statement due to statement timeout"):
            b.latest(KEY)
        locker.rollback()
    assert b.latest(KEY).to_state == EXECUTED
    raw(pg_url, """CREATE OR REPLACE FUNCTION rssd_magic_json(t TEXT) RETURNS json LANGUAGE plpgsql
                   AS 'BEGIN PERFORM pg_sleep(600); RETURN NULL; END'""")
    with pytest.raises(StoreError, match="statement timeout"):
        listed(b)


def test_no_setting_or_prepared_statement_outlives_a_transaction(opened, pg_url):
    b = opened()
    defaults = b.conn.execute("SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), "
                              "current_setting('search_path')").fetchone()  # fmt: skip
    for _ in range(8):  # beyond psycopg's default prepare threshold (5)
        b.latest(KEY)
        b.signatures(["p"])
    mine = b.claim(ask(b))
    b.renewer().renew({mine.running.state_id: mine.claim.token})
    b.finish(mine.running, mine.claim.token, EXECUTED, "{}", "completed")
    listed(b)
    after = b.conn.execute("SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), "
                           "current_setting('search_path')").fetchone()  # fmt: skip
    assert after == defaults and defaults[:2] == ("0", "0")
    assert b.conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)


def test_opened_read_only_nothing_is_written(opened, pg_url):
    opened().close()
    before = raw(pg_url, "SELECT count(*) FROM orchestration_session_state")
    b = opened(readonly=True)
    assert b.read_only == "opened read-only" and b.session_id is None
    for write in (lambda: b.claim(ask(b)), lambda: b.add_signatures([("p", "k", "s")]),
                  lambda: b.blobs.put_many([(stream_digest(b"x"), b"x")]), lambda: gc_blobs(b, digests_of),
                  lambda: b.start_session({})):  # fmt: skip
        with pytest.raises(StoreError, match="opened read-only"):
            write()
    assert gc_blobs(b, digests_of, dry_run=True) == ([], 0, 0)
    b.close()
    assert raw(pg_url, "SELECT count(*) FROM orchestration_session_state") == before


def test_read_only_a_schema_without_our_tables_reads_them_as_empty(opened, pg_url):
    b = opened()
    mine = b.claim(ask(b))
    done = b.finish(mine.running, mine.claim.token, EXECUTED, "{}", "completed")
    b.close()
    raw(pg_url, "DROP TABLE rssd_magic_hit, rssd_magic_claim, rssd_magic_signature")
    r = opened(readonly=True)
    assert r.latest(KEY) == done and r.claim_of(done) is None and r.signatures(["p"]) == {}
    assert [(c.latest.state_id, c.hits_total) for c in listed(r)] == [(done.state_id, 0)]
    made = raw(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = ? OR schemaname LIKE 'pg_temp%'",
               (schema_of(pg_url),))  # fmt: skip
    assert not {"rssd_magic_hit", "rssd_magic_claim"} & {t for (t,) in made}, "nothing made, not even a temporary table"


def test_export_and_import_replace_a_damaged_copy_on_the_other_side(opened, pg_url, tmp_path):
    b = opened()
    done, digest = _populate(b)
    path = tmp_path / "team.sqlite.db"
    assert export_rssd(b, path)["blobs"]["copied"] == 1
    lite = sqlite3.connect(path)
    with lite:
        lite.execute("UPDATE rssd_magic_blob SET data = zeroblob(size) WHERE digest = ?", (digest,))
    lite.close()
    again = export_rssd(b, path)["blobs"]
    assert (again["copied"], again["present"]) == (1, 0), "the file's damaged copy was replaced"
    raw(pg_url, "UPDATE rssd_magic_blob_chunk SET data = overlay(data placing '\\xff'::bytea from 3) WHERE digest = ?", (digest,))
    back = import_rssd(b, path)["blobs"]
    assert (back["copied"], back["present"], back["bad"]) == (1, 0, []), "the server's damaged copy was rewritten"
    assert bytes(b.blobs.get(digest))[:2] == b"\x80\x05" and import_rssd(b, path)["blobs"]["present"] == 1


def test_a_store_made_before_the_latest_function_is_read_without_it_and_given_it_when_writable(opened, pg_url):
    b = opened()
    mine = b.claim(ask(b))
    done = b.finish(mine.running, mine.claim.token, EXECUTED, "{}", "completed")
    b.close()
    raw(pg_url, "DROP FUNCTION rssd_magic_latest(text)")
    assert opened(readonly=True).latest(KEY) == done, "read with the plain query"
    assert raw(pg_url, "SELECT count(*) FROM pg_proc WHERE proname = 'rssd_magic_latest' AND pronamespace = ?::regnamespace",
               (schema_of(pg_url),)) == [(0,)]  # fmt: skip
    assert opened().latest(KEY) == done
    (found,) = raw(pg_url, "SELECT * FROM rssd_magic_latest(?)", (KEY.ingest_src,))
    assert found[0] == done.state_id and found[-1] == done.seq
