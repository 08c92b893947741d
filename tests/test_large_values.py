"""Values larger than SQLite lets one row hold (issue 17), at small sizes.

SQLite refuses any row over ``SQLITE_LIMIT_LENGTH`` (1 GB by default).
Python's ``Connection.setlimit`` lowers that limit on a real connection, so
a value of a few hundred KB meets the same refusal a 1.5 GB array meets, and
has to go the same way: split into chunk rows, written before the record,
reassembled and checked on read.  Everything here runs on real SQLite files
and real connections; the 1.5 GB case itself is in bench/bench_large.py.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rssd_magic.store import tables
from rssd_magic.store.base import ClaimRequest
from rssd_magic.backends.sqlite import SqliteBackend
from rssd_magic.backends.sqlite_blobs import chunk_size
from rssd_magic.backends.sqlite_schema import SCHEMA_VERSION
from rssd_magic.engine.claims import current_holder
from rssd_magic.engine.keys import cell_key
from rssd_magic.engine.lifecycle import EXECUTED
from rssd_magic.records.trust import IntegrityError, buffer_digest

#: SQLite's row limit in these tests: small enough that the values below
#: need several rows, large enough for an ordinary record.
LIMIT = 64_000
RESULT = '{"format":"rssd_magic.result.v1","names":{},"outputs":[]}'


def small_limit(backend: SqliteBackend, limit: int = LIMIT) -> None:
    backend.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit)


def open_store(path, limit: int | None = LIMIT) -> SqliteBackend:
    backend = SqliteBackend.open(path, session_args={"test": "large"})
    if limit is not None:
        small_limit(backend, limit)
    return backend


def record(backend: SqliteBackend, blobs, src: str = "big()") -> None:
    """Claim a cell and end it EXECUTED with *blobs*, as a run does."""
    mine = backend.claim(ClaimRequest(cell_key(src, "large"), src, {}, current_holder(backend.session_id), 60.0))
    assert mine.kind == "run"
    backend.finish(mine.running, mine.claim.token, EXECUTED, RESULT, "completed", blobs)


def rows(path, sql: str, params=()) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        with conn:
            return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def test_sqlite_itself_refuses_a_row_over_the_limit(tmp_path):
    # The premise of every other test here: the limit is SQLite's own.
    b = open_store(tmp_path / "r.db")
    with pytest.raises(sqlite3.DataError):
        b.conn.execute("SELECT zeroblob(?)", (LIMIT + 1,)).fetchone()
    b.close()


def test_a_blob_over_the_row_limit_is_stored_in_chunks_and_reads_back_whole(tmp_path):
    db = tmp_path / "r.db"
    b = open_store(db)
    data = payload(5 * LIMIT + 123)
    digest = buffer_digest(data)
    record(b, [(digest, data)])
    chunks = rows(db, "SELECT offset, length(data) FROM rssd_magic_blob_chunk WHERE digest = ? ORDER BY offset", (digest,))
    assert len(chunks) == 6 and all(n < LIMIT for _, n in chunks)  # 5 x 64,000 in rows of 62,976
    assert [off for off, _ in chunks] == [sum(n for _, n in chunks[:i]) for i in range(len(chunks))]
    assert rows(db, "SELECT size, length(data) FROM rssd_magic_blob WHERE digest = ?", (digest,)) == [(len(data), 0)]
    assert b.blobs.sizes() == {digest: len(data)}
    out = b.blobs.get(digest)
    assert bytes(out) == data
    memoryview(out)[0] = 0  # one writable buffer, as numpy needs
    b.close()


def test_a_large_array_records_and_replays_through_the_magic(kernel):
    kernel.ok("%%stateful\nimport numpy as np\narr = np.arange(40_000, dtype='float64') * 3")  # 320 KB
    small_limit(kernel.magics.runner.backend(), LIMIT)
    kernel.ok("%%stateful\nbig = np.arange(60_000, dtype='float64') + 0.5")  # 480 KB, over the limit
    (spec,) = kernel.rows(
        "SELECT json_extract(transition_result, '$.names.big') FROM orchestration_session_state WHERE to_state = 'EXECUTED'"
        " ORDER BY rowid DESC LIMIT 1"
    )[0]
    (digest,) = json.loads(spec)["buffers"]
    assert kernel.rows("SELECT count(*) FROM rssd_magic_blob_chunk WHERE digest = ?", (digest,))[0][0] == 8
    kernel.restart()
    kernel.ok("import numpy as np")
    small_limit(kernel.magics.runner.backend(), LIMIT)  # the replaying kernel has the same small limit
    ran = kernel.ok("%%stateful\nbig = np.arange(60_000, dtype='float64') + 0.5")
    assert ran.banner, "replayed, not run again"
    big = kernel.shell.user_ns["big"]
    assert np.array_equal(big, np.arange(60_000, dtype="float64") + 0.5)
    big[0] = -1.0  # writable
    assert [s for _, s in kernel.states()].count(EXECUTED) == 2


def test_a_corrupted_chunk_is_refused_by_the_digest_check(tmp_path):
    db = tmp_path / "r.db"
    b = open_store(db)
    data = payload(3 * LIMIT)
    digest = buffer_digest(data)
    record(b, [(digest, data)])
    # Flip one byte in the middle chunk, keeping its length: only the digest can tell.
    (rowid, chunk), = rows(db, "SELECT rowid, data FROM rssd_magic_blob_chunk WHERE digest = ? ORDER BY offset LIMIT 1 OFFSET 1", (digest,))
    bad = bytearray(chunk)
    bad[len(bad) // 2] ^= 0xFF
    rows(db, "UPDATE rssd_magic_blob_chunk SET data = ? WHERE rowid = ?", (bytes(bad), rowid))
    with pytest.raises(IntegrityError):
        b.blobs.get(digest)
    b.close()


def test_a_missing_chunk_is_refused_not_read_short(tmp_path):
    db = tmp_path / "r.db"
    b = open_store(db)
    data = payload(3 * LIMIT)
    digest = buffer_digest(data)
    record(b, [(digest, data)])
    rows(db, "DELETE FROM rssd_magic_blob_chunk WHERE digest = ? AND offset = 0", (digest,))
    with pytest.raises(IntegrityError, match="chunks"):
        b.blobs.get(digest)
    b.close()


def test_a_blob_gc_frees_between_staging_and_the_record_is_written_again(tmp_path):
    """The race finish() guards against, on two real connections: staged
    blobs are unreferenced until the record commits, and a gc by another
    process in that window deletes them."""
    db = tmp_path / "r.db"
    writer = open_store(db)
    collector = open_store(db, limit=None)
    data = payload(4 * LIMIT, seed=1)
    digest = buffer_digest(data)
    staged = writer.blobs.stage

    def stage_then_collect(big):
        staged(big)
        assert writer.blobs.sizes() == {digest: len(data)}, "staged before the record"
        doomed, _, _ = tables.gc(collector, lambda text: set())  # the other connection's gc, in the window
        assert doomed == [(digest, len(data))]
        assert rows(db, "SELECT count(*) FROM rssd_magic_blob_chunk") == [(0,)]

    writer.blobs.stage = stage_then_collect
    record(writer, [(digest, data)])
    assert bytes(writer.blobs.get(digest)) == data, "the record's transaction wrote it again"
    assert bytes(collector.blobs.get(digest)) == data
    assert tables.gc(collector, lambda text: {digest})[0] == [], "nothing left over"
    writer.close()
    collector.close()


def test_gc_frees_a_chunked_blob_and_the_chunks_a_crash_left(tmp_path):
    db = tmp_path / "r.db"
    # A kernel dies while writing a large value: some chunks, no blob row.
    crash = textwrap.dedent(
        f"""
        import os, sqlite3, sys
        from rssd_magic.backends import sqlite_blobs
        from rssd_magic.backends.sqlite import SqliteBackend
        from rssd_magic.records.trust import buffer_digest
        b = SqliteBackend.open(sys.argv[1], session_args={{"test": "crash"}})
        b.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, {LIMIT})
        data = os.urandom({6 * LIMIT})
        written = []
        put = sqlite_blobs._put_chunk
        def put_then_die(c, digest, offset, piece):
            put(c, digest, offset, piece)
            written.append(offset)
            if len(written) == 3:
                c.execute("COMMIT")
                os._exit(0)
        sqlite_blobs._put_chunk = put_then_die
        b.blobs.stage(b.blobs.large([(buffer_digest(data), data)]))
        """
    )
    subprocess.run([sys.executable, "-c", crash, str(db)], check=True, timeout=60)
    (n, partial), = rows(db, "SELECT count(*), sum(length(data)) FROM rssd_magic_blob_chunk")
    assert n == 3 and rows(db, "SELECT count(*) FROM rssd_magic_blob") == [(0,)]
    b = open_store(db)
    kept = payload(2 * LIMIT, seed=2)
    dropped = payload(2 * LIMIT, seed=3)
    record(b, [(buffer_digest(kept), kept), (buffer_digest(dropped), dropped)])
    doomed, kept_n, kept_bytes = tables.gc(b, lambda text: {buffer_digest(kept)}, dry_run=True)
    assert sorted(size for _, size in doomed) == sorted([len(dropped), partial])
    assert (kept_n, kept_bytes) == (1, len(kept))
    tables.gc(b, lambda text: {buffer_digest(kept)})
    assert rows(db, "SELECT DISTINCT digest FROM rssd_magic_blob_chunk") == [(buffer_digest(kept),)]
    assert bytes(b.blobs.get(buffer_digest(kept))) == kept
    b.close()


def test_chunks_of_another_chunk_size_are_made_whole(tmp_path):
    """A value part-written by a kernel with another row limit (or another
    version's chunk size) and left unfinished is completed, not misread."""
    db = tmp_path / "r.db"
    data = payload(5 * LIMIT, seed=4)
    digest = buffer_digest(data)
    first = open_store(db, limit=LIMIT // 2)
    first.blobs.stage(first.blobs.large([(digest, data)]))
    first.close()
    # Cut short: no blob row, and one of its chunks missing.
    rows(db, "DELETE FROM rssd_magic_blob WHERE digest = ?", (digest,))
    rows(db, "DELETE FROM rssd_magic_blob_chunk WHERE digest = ? AND offset > 0 AND offset < ?", (digest, LIMIT))
    before = rows(db, "SELECT offset, length(data) FROM rssd_magic_blob_chunk ORDER BY offset")
    assert len({n for _, n in before}) == 2 and len(before) > 5, "chunks of the other size"
    b = open_store(db)
    record(b, [(digest, data)])
    assert bytes(b.blobs.get(digest)) == data
    size = chunk_size(b.conn)
    after = rows(db, "SELECT offset, length(data) FROM rssd_magic_blob_chunk ORDER BY offset")
    assert after == [(off, min(size, len(data) - off)) for off in range(0, len(data), size)]
    b.close()


def test_single_row_blobs_of_an_older_rssd_still_read(tmp_path):
    """Schema 2 kept every blob in one row: such a file migrates on open and
    its blobs read back, even one longer than this connection's chunk."""
    db = tmp_path / "old.db"
    b = open_store(db, limit=None)
    b.close()
    data = payload(3 * LIMIT, seed=5)
    digest = buffer_digest(data)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DROP TABLE rssd_magic_blob_chunk")
        conn.execute("UPDATE rssd_magic_meta SET value = '2' WHERE key = 'schema_version'")
        conn.execute("INSERT INTO rssd_magic_blob (digest, size, data) VALUES (?, ?, ?)", (digest, len(data), data))
    conn.close()
    b = open_store(db)
    assert rows(db, "SELECT value FROM rssd_magic_meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    assert rows(db, "SELECT count(*) FROM rssd_magic_blob_chunk") == [(0,)]
    assert bytes(b.blobs.get(digest)) == data
    b.close()


def test_staging_a_value_stored_already_writes_nothing(tmp_path):
    db = tmp_path / "r.db"
    b = open_store(db)
    data = payload(3 * LIMIT, seed=6)
    digest = buffer_digest(data)
    record(b, [(digest, data)], "first()")
    before = b.conn.total_changes
    b.blobs.stage(b.blobs.large([(digest, data)]))
    assert b.conn.total_changes == before
    record(b, [(digest, data)], "second()")  # the same value from another cell: stored once
    chunks = -(-len(data) // chunk_size(b.conn))
    assert rows(db, "SELECT count(*), sum(length(data)) FROM rssd_magic_blob_chunk") == [(chunks, len(data))]
    b.close()


def test_a_connection_maps_the_file_at_its_first_large_read_only(tmp_path, monkeypatch):
    """Small reads go through SQLite's page cache (a mapping costs a new
    connection a page fault per page and the unmapping at close); the first
    read of a large blob maps the file, and the connection keeps it."""
    b = open_store(tmp_path / "m.db", limit=None)
    monkeypatch.setattr(b.db, "idle_close_s", 3600.0)  # one connection throughout, however slow the box
    try:
        small, large = payload(4096, seed=1), payload(3 << 20, seed=2)
        record(b, [(buffer_digest(small), small), (buffer_digest(large), large)])
        mapped = lambda: b.conn.execute("PRAGMA mmap_size").fetchone()[0]  # noqa: E731
        assert bytes(b.blobs.get(buffer_digest(small))) == small and tables.counts(b).blobs == 2
        assert mapped() == 0, "small reads and a report map nothing"
        assert bytes(b.blobs.get(buffer_digest(large))) == large
        assert mapped() > 1 << 20, "the large read mapped the file"
        assert bytes(b.blobs.get(buffer_digest(small))) == small and mapped() > 1 << 20
    finally:
        b.close()
