"""The tally (store/tally.py): what ``stats`` and ``gc --dry-run`` read
instead of every record, kept by every append, on both stores.

What must hold: after any mix of runs, failures, re-runs, forgets, replays
and blobs, the tally says what counting the records says; rows it did not
count (another tool's, an older rssd_magic's) are noticed, never reported
as if counted; a store made before the tally is counted once when opened
for writing, and read the old way when opened read-only; and gc, which
deletes, never takes the tally's word for what is named.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time

import pytest

from rssd_magic.backends import open_backend
from rssd_magic.engine.keys import cell_key
from rssd_magic.engine.lifecycle import EXECUTED, FAILED, FORGOTTEN
from rssd_magic.manage import render, report
from rssd_magic.records.canonical import dumps
from rssd_magic.records.trust import stream_digest
from rssd_magic.store import tables, tally, transfer
from test_backend_contract import ENVS, ask


@pytest.fixture(params=sorted(ENVS))
def env(request, tmp_path):
    e = ENVS[request.param](tmp_path)
    yield e
    e.close_all()


def record(value: int, blob: str | None = None, duration: float = 0.5) -> str:
    names: dict = {"x": {"kind": "json", "value": value}}
    if blob:
        names["arr"] = {"kind": "pickle", "type": "bytes", "size": 4, "blob": blob}
    return dumps({"format": "rssd_magic.result.v1", "host": "h", "duration_s": duration, "outputs": [], "names": names})


def both(store) -> tuple[tally.Sums | None, tally.Sums]:
    """The tally as read, and the sums counted from the records, in one read."""
    return store.read(lambda t: (tally.read(t), tally.count_all(t)[0]))


def assert_agree(store) -> tuple[tally.Sums, tally.Refs]:
    """The tally and its refs say what counting the records says."""
    kept, refs, (counted, named) = store.read(lambda t: (tally.read(t), tally.refs(t), tally.count_all(t)))
    assert kept is not None, "the tally is complete and current"
    assert kept.saved_s == pytest.approx(counted.saved_s)
    kept.saved_s = counted.saved_s
    assert kept == counted and refs == named
    return kept, refs


def test_the_tally_says_what_counting_the_records_says(env):
    store = env.open()
    rnd = random.Random(24)
    keys = [cell_key(f"cell_{i}()", "tally") for i in range(8)]
    latest: dict[str, object] = {}
    named = replayed = 0
    for step in range(60):
        key = rnd.choice(keys)
        prev = latest.get(key.ingest_src)
        action = rnd.choice(["run", "run", "fail", "forget", "hit"])
        if action == "forget" and prev is not None and prev.to_state == EXECUTED:
            latest[key.ingest_src] = store.append_if_latest(prev.entry_id, EXECUTED, FORGOTTEN, '{"forgotten":1}',
                                                            "forgotten", if_latest=prev.state_id)  # fmt: skip
        elif action == "hit" and prev is not None and prev.to_state == EXECUTED:
            for _ in range(rnd.randint(1, 3)):
                store.note_hit(prev.state_id)
            store.flush_hits()
        elif action in ("run", "fail"):
            rerun = prev.state_id if prev is not None and prev.to_state == EXECUTED else None
            mine = store.claim(ask(store, key, rerun_of=rerun, rerun_reason="again" if rerun else ""))
            assert mine.kind == "run"
            if action == "fail":
                done = store.finish(mine.running, mine.claim.token, FAILED, '{"error":{"ename":"E","evalue":"x"}}', "E")
            else:
                data = b"v%d" % step
                blob = stream_digest(data) if rnd.random() < 0.5 else None
                done = store.finish(mine.running, mine.claim.token, EXECUTED, record(step, blob, rnd.random()),
                                    "completed", [(blob, data)] if blob else [])  # fmt: skip
            latest[key.ingest_src] = done
        sums, refs = assert_agree(store)
        named, replayed = max(named, len(refs)), sums.hits
    assert sums.cells == len(latest) and sum(sums.by_state.values()) == len(latest)
    assert replayed > 0 and named > 1, "the walk replayed and named blobs"
    stats = report.stats(store)
    assert stats["cells"] == sums.cells and stats["transitions"] == sums.transitions


def test_rows_no_tally_counted_are_noticed_not_reported_as_counted(env):
    """Another tool appends a transition to one of our cells: readers count
    the records themselves (an RSSD's next writer recounts; a server's gc)."""
    store = env.open()
    key = cell_key("foreign()", "tally")
    mine = store.claim(ask(store, key))
    done = store.finish(mine.running, mine.claim.token, EXECUTED, record(1), "completed")
    assert report.stats(store)["by_state"] == {EXECUTED: 1}
    env.raw(
        """INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, session_entry_id,
               from_state, to_state, transition_result, transition_reason, transitioned_at)
           VALUES ('7ZZZZZZZZZZZZZZZZZZZZZZZZZ', ?, ?, 'EXECUTED', 'FORGOTTEN', '{}', 'by hand', '2026-12-07 00:00:00')""",
        (done.session_id, done.entry_id),
    )
    kept, counted = both(store)
    assert kept is None, "a row no tally counted: the tally is not used"
    assert counted.by_state == {FORGOTTEN: 1} and counted.transitions == 3
    assert report.stats(store)["by_state"] == {FORGOTTEN: 1}
    other = cell_key("other()", "tally")
    mine = store.claim(ask(store, other))
    store.finish(mine.running, mine.claim.token, EXECUTED, record(2), "completed")
    if env.name == "sqlite":
        assert assert_agree(store)[0].by_state == {EXECUTED: 1, FORGOTTEN: 1}, "the next writer recounted"
    else:
        assert both(store)[0] is None
        report.gc(store)
        assert assert_agree(store)[0].by_state == {EXECUTED: 1, FORGOTTEN: 1}, "gc recounted"


def test_a_blob_the_refs_lost_is_still_kept_by_gc(env):
    """The refs speed up a dry run; a deletion is decided from the records."""
    store = env.open()
    data = b"named"
    digest = stream_digest(data)
    mine = store.claim(ask(store, cell_key("named()", "tally")))
    store.finish(mine.running, mine.claim.token, EXECUTED, record(1, digest), "completed", [(digest, data)])
    assert report.gc(store, dry_run=True)["deleted"] == 0
    env.raw("DELETE FROM rssd_magic_ref")
    assert report.gc(store)["deleted"] == 0
    assert digest in set(store.blobs.sizes())


def test_a_store_made_before_the_tally_is_counted_once_opened_to_write(env):
    store = env.open(session_args={"t": 1})
    for i in range(3):
        mine = store.claim(ask(store, cell_key(f"old_{i}()", "tally")))
        store.finish(mine.running, mine.claim.token, EXECUTED, record(i), "completed")
    store.close()
    # What the version before the tally left: no tally, no refs.
    env.raw("DROP TABLE rssd_magic_tally")
    env.raw("DROP TABLE rssd_magic_ref")
    env.raw("UPDATE rssd_magic_meta SET value = ? WHERE key = 'schema_version'", ("4" if env.name == "sqlite" else "1",))
    readonly = env.open(readonly=True)
    assert both(readonly)[0] is None
    assert report.stats(readonly)["cells"] == 3, "read the old way"
    readonly.close()
    tables_left = env.raw("SELECT count(*) FROM " + (
        "sqlite_master WHERE name = 'rssd_magic_tally'" if env.name == "sqlite"
        else "information_schema.tables WHERE table_name = 'rssd_magic_tally' AND table_schema = current_schema()"))
    assert tables_left == [(0,)], "a read-only open writes nothing"
    store = env.open(session_args={"t": 2})
    assert assert_agree(store)[0].cells == 3


def test_a_new_store_starts_with_a_complete_empty_tally(env):
    store = env.open()
    sums = store.read(tally.read)
    assert sums is not None and (sums.cells, sums.transitions, sums.by_state) == (0, 0, {})
    assert tables.counts(store).cells == 0


def test_a_merge_is_counted(tmp_path):
    """Rows transfer.py copies in were not appended: the target recounts."""
    a, b = (open_backend(str(tmp_path / f"{n}.sqlite.db"), session_args={"t": n}) for n in "ab")
    try:
        for store, n in ((a, 2), (b, 1)):
            for i in range(n):
                mine = store.claim(ask(store, cell_key(f"merged_{i}_{n}()", "tally")))
                store.finish(mine.running, mine.claim.token, EXECUTED, record(i), "completed")
        transfer.transfer(a, b)
        assert assert_agree(b)[0].cells == 3
    finally:
        a.close()
        b.close()


def test_kernels_writing_side_by_side_keep_one_true_tally(env):
    """Four stores (kernels) run, fail and replay cells at once, their
    replay counts going with their next claims: no write fails and no sum
    is lost."""
    stores = [env.open(session_args={"kernel": n}) for n in range(4)]
    errors: list[BaseException] = []
    ran: set[str] = set()

    def kernel(n: int) -> None:
        store, rnd = stores[n], random.Random(n)
        try:
            for i in range(40):
                key = cell_key(f"shared_{rnd.randrange(12)}()", "tally")
                mine = store.claim(ask(store, key))
                if mine.kind == "done":  # its count goes with this kernel's next claim, before the cell's lock
                    store.pending.hit(mine.previous.state_id)
                elif mine.kind == "run":
                    state = FAILED if rnd.random() < 0.2 else EXECUTED
                    store.finish(mine.running, mine.claim.token, state, record(i), "completed")
                    ran.add(key.ingest_src)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=kernel, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    for store in stores:
        store.flush_hits()
    sums, _ = assert_agree(stores[0])
    assert sums.cells == len(ran) and sum(sums.by_state.values()) == len(ran)


def test_verify_reports_a_tally_the_records_do_not_confirm_and_repair_recounts_it(env):
    store = env.open()
    for i in range(3):
        mine = store.claim(ask(store, cell_key(f"v_{i}()", "tally")))
        store.finish(mine.running, mine.claim.token, EXECUTED, record(i), "completed")
    assert report.verify(store)["tally"] == {"differs": [], "recounted": False}
    env.raw("""UPDATE rssd_magic_tally SET value = value + 5 WHERE name = 'cells'
               AND shard = (SELECT min(shard) FROM rssd_magic_tally WHERE name = 'cells')""")  # a hand edit no check sees
    assert report.stats(store)["cells"] == 8, "the tally is what stats reads"
    found = report.verify(store)
    assert found["tally"] == {"differs": ["cells"], "recounted": False}
    assert "differs from the records (cells)" in render.verify_text(found) and "verify --repair" in render.verify_text(found)
    assert report.verify(store, repair=True)["tally"] == {"differs": ["cells"], "recounted": True}
    assert report.stats(store)["cells"] == 3 and report.verify(store)["tally"]["differs"] == []


def test_an_rssd_where_surveilr_wrote_much_since_is_checked_from_our_cells_side(tmp_path):
    """Thousands of surveilr's own transitions after our last one: the check
    looks at our cells instead of every row since, and still finds a row
    another tool added to one of them."""
    path = tmp_path / "busy.sqlite.db"
    store = open_backend(str(path), session_args={"t": 1})
    try:
        mine = store.claim(ask(store, cell_key("busy()", "tally")))
        done = store.finish(mine.running, mine.claim.token, EXECUTED, record(1), "completed")
        conn = sqlite3.connect(path)
        with conn:
            conn.executemany(
                """INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, session_entry_id,
                       from_state, to_state, transitioned_at) VALUES (?, ?, NULL, 'a', 'b', '2026-12-07 00:00:00')""",
                [(f"S{i:025d}", done.session_id) for i in range(3000)],
            )
        assert both(store)[0] is not None, "surveilr's rows are not ours"
        with conn:
            conn.execute(
                """INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, session_entry_id,
                       from_state, to_state, transitioned_at) VALUES ('T', ?, ?, 'EXECUTED', 'FORGOTTEN', '2026-12-07')""",
                (done.session_id, done.entry_id),
            )
            conn.executemany(
                """INSERT INTO orchestration_session_state (orchestration_session_state_id, session_id, session_entry_id,
                       from_state, to_state, transitioned_at) VALUES (?, ?, NULL, 'a', 'b', '2026-12-07 00:00:00')""",
                [(f"U{i:025d}", done.session_id) for i in range(3000)],
            )
        conn.close()
        assert both(store)[0] is None
        assert report.stats(store)["by_state"] == {FORGOTTEN: 1}
    finally:
        store.close()


def test_a_recount_while_kernels_write_loses_none_of_their_sums(env):
    """A recount (gc's, an upgrade's, an import's) replaces the whole tally
    while other kernels add to it: on a server it waits for those that
    added and holds back those about to, so no delta lands in the rows it
    is replacing, nor goes uncounted."""
    writers = [env.open(session_args={"kernel": n}) for n in range(2)]
    store = env.open(session_args={"recount": True})
    stop, errors, written = threading.Event(), [], [0, 0]

    def kernel(n: int) -> None:
        b = writers[n]
        try:
            while not stop.is_set():
                written[n] += 1
                mine = b.claim(ask(b, cell_key(f"w{n}_{written[n]}()", "tally")))
                b.finish(mine.running, mine.claim.token, EXECUTED, record(written[n]), "completed")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=kernel, args=(n,)) for n in range(2)]
    for th in threads:
        th.start()
    recounts, deadline = 0, time.monotonic() + 60
    try:  # recounts until both kernels wrote cells among them
        while (recounts < 8 or min(written) < 20) and time.monotonic() < deadline:
            store.write(lambda t, _retrying: tally.rebuild(t))
            recounts += 1
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    assert not errors, errors
    sums, _ = assert_agree(store)
    assert recounts >= 8 and sums.cells >= 40
