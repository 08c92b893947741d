"""The SQL-cell engine (rssd_magic.sql) against real DuckDB and SQLite files.

No IPython here: keys, binding, transactions, lock messages and result
frames are all testable without a shell.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys

import duckdb
import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from rssd_magic import sql as S
from rssd_magic.engine.keys import cell_key
from rssd_magic.sql import (
    SQLExecutionError,
    SQLUsageError,
    bind,
    describe_lock_error,
    dump_frame,
    frame_bundle,
    key_extra,
    load_frame,
    normalize_sql,
    placeholders,
    run_sql,
    split_statements,
    target_identity,
)
from rssd_magic.records.trust import verify


@pytest.fixture
def duck(tmp_path):
    conn = duckdb.connect(str(tmp_path / "t.duckdb"))
    yield conn
    conn.close()


@pytest.fixture
def lite(tmp_path):
    conn = sqlite3.connect(tmp_path / "t.sqlite")
    yield conn
    conn.close()


@pytest.fixture(params=["duckdb", "sqlite"])
def conn(request, duck, lite):
    return duck if request.param == "duckdb" else lite


def tables(conn) -> set[str]:
    if isinstance(conn, sqlite3.Connection):
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {r[0] for r in conn.execute("SELECT table_name FROM duckdb_tables()").fetchall()}


def roundtrip(df: pd.DataFrame, trusted: bool = True) -> tuple[dict, pd.DataFrame]:
    spec, blobs = dump_frame(df)
    store = {}
    for digest, data in blobs:
        verify(digest, data)  # every blob is named by its own digest
        store[digest] = bytes(data)
    # The spec goes into transition_result: it must survive strict JSON.
    spec = json.loads(json.dumps(spec, allow_nan=False))
    return spec, load_frame(spec, store.__getitem__, trusted=trusted)


# -- normalization and splitting --------------------------------------------


def test_comments_and_spacing_do_not_change_normalized_sql():
    a = "SELECT a, b FROM t WHERE x = 1 AND s = 'it''s'"
    b = "-- the query\nSELECT  a ,b\n  FROM t /* block\n comment */ WHERE x=1 AND s = 'it''s' ; -- done\n"
    assert normalize_sql(a) == normalize_sql(b)
    assert normalize_sql(a) == normalize_sql(a + ";;")


def test_string_literals_and_quoted_identifiers_count_exactly():
    base = normalize_sql("SELECT 'a  b' AS \"x  y\"")
    assert normalize_sql("SELECT 'a b' AS \"x  y\"") != base
    assert normalize_sql("SELECT 'a  b' AS \"x y\"") != base
    assert normalize_sql("SELECT 'A  b' AS \"x  y\"") != base
    # A comment marker inside a string is data, not a comment.
    assert normalize_sql("SELECT '-- x'") != normalize_sql("SELECT '-- y'")
    assert normalize_sql("SELECT '/* x */'") != normalize_sql("SELECT '/* y */'")


def test_spaces_that_separate_tokens_survive():
    # 'a' 'b' is a string and an alias; 'a''b' one string with a quote.
    assert normalize_sql("SELECT 'a' 'b'") != normalize_sql("SELECT 'a''b'")
    assert normalize_sql("SELECT a - -1") != normalize_sql("SELECT a --1")
    assert normalize_sql("SELECT x 'ab'") != normalize_sql("SELECT x'ab'")
    assert normalize_sql("SELECT a=1") == normalize_sql("SELECT a = 1")


def test_colon_and_dollar_parameters_normalize_alike():
    assert normalize_sql("SELECT * FROM t WHERE a = :a") == normalize_sql("SELECT * FROM t WHERE a = $a")


def test_split_respects_quotes_comments_and_trigger_bodies():
    text = """
    SELECT 'a;b', "c;d" -- e;f
    ; /* g;h */ SELECT $$i;j$$, $t$k;l$t$;
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN
      UPDATE t SET a = CASE WHEN 1 THEN 2 END;
      INSERT INTO u VALUES (1);
    END;
    ;  -- trailing comment only
    """
    stmts = split_statements(text)
    assert len(stmts) == 3
    assert stmts[0] == "SELECT 'a;b', \"c;d\""
    assert stmts[1] == "SELECT $$i;j$$, $t$k;l$t$"
    assert stmts[2].startswith("CREATE TRIGGER") and stmts[2].endswith("END")


def test_sqlite_trigger_with_semicolons_runs(lite):
    run_sql(
        lite,
        """CREATE TABLE t(a); CREATE TABLE log(a);
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN
          INSERT INTO log VALUES (new.a * 10);
          INSERT INTO log VALUES (CASE WHEN new.a > 0 THEN 1 ELSE 0 END);
        END;
        INSERT INTO t VALUES (4);""",
    )
    assert lite.execute("SELECT a FROM log ORDER BY a").fetchall() == [(1,), (40,)]


# -- parameters -------------------------------------------------------------


def test_placeholders_both_syntaxes_and_not_duckdb_syntax():
    sql = (
        "SELECT :a, $b, x::INT, arr[1:n], arr[i:j], {'k':v}, f(p := 1), "
        "list_transform(l, lambda x: x + 1), ':c', '$d', :a -- :e\n"
    )
    assert placeholders(sql) == ["a", "b"]


def test_bind_rewrites_colon_names_and_takes_only_used_values():
    sql, params = bind("SELECT :a, $b, :a", {"a": 1, "b": "x", "unused": 3})
    assert sql == "SELECT $a, $b, $a"
    assert params == {"a": 1, "b": "x"}


def test_missing_parameter_is_named():
    with pytest.raises(SQLUsageError, match=r"\$missing_one") as info:
        bind("SELECT :present, :missing_one", {"present": 1})
    assert "present" not in str(info.value)


def test_positional_parameters_are_refused():
    for sql in ("SELECT ?", "SELECT $1", "SELECT ?2"):
        with pytest.raises(SQLUsageError, match="positional"):
            bind(sql, {})


@pytest.mark.parametrize("style", ["$", ":"])
def test_parameters_bind_on_both_engines(conn, style):
    ns = {"lo": 2, "name": "it's", "when": dt.datetime(2024, 5, 6, 7, 8, 9)}
    result = run_sql(
        conn,
        f"CREATE TABLE t(a INTEGER, s TEXT); INSERT INTO t VALUES (1, 'x'), (2, {style}name), (3, 'z');"
        f"SELECT a, s, {style}lo AS lo FROM t WHERE a >= {style}lo ORDER BY a",
        ns,
    )
    df = result.frame
    assert df["a"].tolist() == [2, 3]
    assert df["s"].tolist() == ["it's", "z"]
    assert df["lo"].tolist() == [2, 2]


def test_duckdb_parameter_names_differing_only_in_case_are_refused(duck):
    with pytest.raises(SQLUsageError, match="ignore case"):
        run_sql(duck, "SELECT $Foo, $foo", {"Foo": 1, "foo": 2})


# -- target identity and keys -----------------------------------------------


def test_file_identity_is_the_absolute_real_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = duckdb.connect("rel.duckdb")
    s = sqlite3.connect("rel.sqlite")
    try:
        assert target_identity(d) == f"duckdb:{os.path.realpath(tmp_path / 'rel.duckdb')}"
        assert target_identity(s) == f"sqlite:{os.path.realpath(tmp_path / 'rel.sqlite')}"
        os.symlink(tmp_path / "rel.sqlite", tmp_path / "link.sqlite")
        s2 = sqlite3.connect("link.sqlite")
        assert target_identity(s2) == target_identity(s)
        s2.close()
    finally:
        d.close()
        s.close()


def test_duckdb_identity_ignores_use(duck, tmp_path):
    before = target_identity(duck)
    duck.execute(f"ATTACH '{tmp_path / 'other.duckdb'}' AS other; USE other")
    assert target_identity(duck) == before


def test_memory_identities_are_per_connection_object():
    for connect in (lambda: sqlite3.connect(":memory:"), lambda: duckdb.connect(":memory:")):
        a, b = connect(), connect()
        assert target_identity(a) == target_identity(a)
        assert target_identity(a) != target_identity(b)
        assert ":memory:" in target_identity(a)
        a.close()
        b.close()


def test_sqlite_memory_identity_survives_id_reuse():
    # sqlite3 connections take no weak references and ids get reused: a new
    # connection must never inherit a dead one's identity.
    seen = set()
    for _ in range(20):
        c = sqlite3.connect(":memory:")
        ident = target_identity(c)
        assert ident not in seen
        seen.add(ident)
        c.close()
        del c


def test_identity_of_other_objects_names_the_type():
    with pytest.raises(SQLUsageError, match="pandas.DataFrame"):
        target_identity(pd.DataFrame())
    closed = sqlite3.connect(":memory:")
    closed.close()
    with pytest.raises(SQLUsageError, match="closed"):
        target_identity(closed)


def test_key_extra_follows_sql_target_and_parameters(duck, lite, tmp_path):
    sql = "SELECT * FROM t WHERE a = :a"
    base = key_extra(sql, duck, {"a": 1})
    assert key_extra("-- comment\nSELECT *\nFROM t WHERE a=$a;", duck, {"a": 1}) == base
    assert key_extra(sql, duck, {"a": 2}) != base
    assert key_extra(sql, duck, {"a": 1.0}) != base
    assert key_extra(sql, duck, {"a": True}) != base
    assert key_extra(sql, lite, {"a": 1}) != base
    assert key_extra("SELECT * FROM t WHERE a = :a AND s = 'x'", duck, {"a": 1}) != base
    other = duckdb.connect(str(tmp_path / "other.duckdb"))
    assert key_extra(sql, other, {"a": 1}) != base
    other.close()


def test_key_extra_is_canonical_for_non_json_values(duck):
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    a = key_extra("SELECT 1", duck, {"w": when, "s": {3, 1, 2}, "b": b"\x00" * 100, "n": np.int64(5)})
    b = key_extra("SELECT 1", duck, {"n": np.int64(5), "b": b"\x00" * 100, "s": {2, 3, 1}, "w": when})
    assert a == b
    assert key_extra("SELECT 1", duck, {"w": when + dt.timedelta(microseconds=1)}) != key_extra(
        "SELECT 1", duck, {"w": when}
    )
    assert key_extra("SELECT 1", duck, {"f": pd.DataFrame({"x": [1]})}) != key_extra(
        "SELECT 1", duck, {"f": pd.DataFrame({"x": [2]})}
    )
    with pytest.raises(SQLUsageError, match=r"\$f"):
        key_extra("SELECT 1", duck, {"f": lambda: 1})


def test_cell_keys_through_key_extra(duck):
    def key(body, params):
        return cell_key(normalize_sql(body), "nb", extra=key_extra(body, duck, params)).digest

    assert key("SELECT :a", {"a": 1}) == key("SELECT  $a -- x", {"a": 1})
    assert key("SELECT :a", {"a": 1}) != key("SELECT :a", {"a": 2})
    assert key("SELECT 'x'", {}) != key("SELECT 'y'", {})


# -- running ----------------------------------------------------------------


def test_last_row_returning_statement_is_the_result(conn):
    result = run_sql(
        conn,
        "CREATE TABLE t(a INTEGER); INSERT INTO t VALUES (1), (2), (3);"
        "SELECT 'first' AS x; UPDATE t SET a = a * 10 WHERE a > 1; SELECT a FROM t ORDER BY a;"
        "DELETE FROM t WHERE a = 1",
    )
    assert result.mode == "transaction"
    assert result.frame_index == 4
    assert result.frame["a"].tolist() == [1, 20, 30]
    assert [s.kind for s in result.statements] == ["status", "changes", "rows", "changes", "rows", "changes"]
    assert [s.rowcount for s in result.statements if s.kind == "changes"] == [3, 2, 1]
    assert result.rows_changed == 6
    assert "6 rows changed" in result.summary() and "3 rows × 1 column" in result.summary()


def test_no_row_returning_statement_gives_no_frame(conn):
    result = run_sql(conn, "CREATE TABLE t(a INTEGER); INSERT INTO t VALUES (1)")
    assert result.frame is None and result.frame_index is None


def test_failing_cell_is_rolled_back(conn):
    run_sql(conn, "CREATE TABLE keep(a INTEGER); INSERT INTO keep VALUES (1)")
    with pytest.raises(SQLExecutionError) as info:
        run_sql(
            conn,
            "CREATE TABLE made(a INTEGER); INSERT INTO made VALUES (1);"
            "INSERT INTO keep VALUES (2); SELECT * FROM no_such_table; INSERT INTO keep VALUES (3)",
        )
    err = info.value
    assert err.index == 3 and err.total == 5
    assert err.statement == "SELECT * FROM no_such_table"
    assert err.rolled_back and err.committed == ()
    assert "no_such_table" in err.message  # the engine's own words
    assert "Traceback" not in str(err)
    assert "changed nothing" in str(err)
    assert "made" not in tables(conn)
    assert run_sql(conn, "SELECT a FROM keep").frame["a"].tolist() == [1]


def test_sqlite_connection_settings_are_restored(lite):
    lite.isolation_level = "DEFERRED"
    with pytest.raises(SQLExecutionError):
        run_sql(lite, "CREATE TABLE t(a); SELECT * FROM nope")
    assert lite.isolation_level == "DEFERRED" and not lite.in_transaction
    run_sql(lite, "CREATE TABLE t(a)")
    assert lite.isolation_level == "DEFERRED"


def test_open_transaction_is_refused_before_running(conn):
    conn.execute("CREATE TABLE t(a INTEGER)")
    if isinstance(conn, sqlite3.Connection):
        conn.commit()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(SQLUsageError, match="open transaction"):
        run_sql(conn, "INSERT INTO t VALUES (2)")
    conn.execute("ROLLBACK")
    assert run_sql(conn, "SELECT count(*) AS n FROM t").frame["n"].tolist() == [0]


def test_cell_with_its_own_transactions_runs_as_written(conn):
    with pytest.raises(SQLExecutionError) as info:
        run_sql(
            conn,
            "BEGIN; CREATE TABLE first_t(a INTEGER); COMMIT;"
            "BEGIN; CREATE TABLE second_t(a INTEGER); SELECT * FROM nope; COMMIT",
        )
    err = info.value
    assert err.index == 5 and err.rolled_back
    assert err.committed == (0, 1, 2)
    assert "statements 1-3" in str(err)
    assert "first_t" in tables(conn) and "second_t" not in tables(conn)


def test_cell_ending_inside_its_own_transaction_is_rolled_back(conn):
    with pytest.raises(SQLExecutionError, match="BEGIN without COMMIT") as info:
        run_sql(conn, "BEGIN; CREATE TABLE t(a INTEGER)")
    assert info.value.rolled_back
    assert "t" not in tables(conn)


def test_sqlite_statements_that_cannot_run_in_a_transaction_split_the_cell(lite):
    with pytest.raises(SQLExecutionError) as info:
        run_sql(
            lite,
            "CREATE TABLE before_t(a); PRAGMA foreign_keys = ON; VACUUM;"
            "CREATE TABLE after_t(a); SELECT * FROM nope",
        )
    err = info.value
    assert err.rolled_back and err.committed == (0, 1, 2)
    assert "before_t" in tables(lite) and "after_t" not in tables(lite)
    # Inside a transaction SQLite ignores this PRAGMA without a word.
    assert lite.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert run_sql(lite, "PRAGMA journal_mode = WAL").mode == "split"
    assert lite.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_duckdb_checkpoint_runs_outside_the_transaction(duck):
    result = run_sql(duck, "CREATE TABLE t(a INTEGER); INSERT INTO t VALUES (1); CHECKPOINT; SELECT a FROM t")
    assert result.mode == "split"
    assert result.frame["a"].tolist() == [1]
    assert result.statements[2].kind == "status"


def test_duckdb_settings_are_not_rolled_back(duck):
    # Documented limit: DuckDB settings are not transactional.
    with pytest.raises(SQLExecutionError):
        run_sql(duck, "SET threads = 3; SELECT * FROM nope")
    assert duck.execute("SELECT current_setting('threads')").fetchone() == (3,)


def test_empty_cell_is_a_usage_error(conn):
    with pytest.raises(SQLUsageError, match="no SQL statements"):
        run_sql(conn, "-- nothing\n ; /* at all */")


def test_missing_parameter_stops_before_anything_runs(conn):
    with pytest.raises(SQLUsageError, match=r"\$later"):
        run_sql(conn, "CREATE TABLE t(a INTEGER); SELECT :later")
    assert "t" not in tables(conn)


# -- DuckDB lock conflicts --------------------------------------------------


def test_lock_conflict_names_the_holding_process(tmp_path):
    path = tmp_path / "locked.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb,sys;c=duckdb.connect(sys.argv[2]);print('ready',flush=True);sys.stdin.read()",
            "lock-holder-marker",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(duckdb.IOException) as info:
            duckdb.connect(str(path))
        message = describe_lock_error(info.value)
        assert message is not None and "\n" not in message
        assert f"PID {holder.pid}" in message
        assert str(path) in message
        if os.path.exists(f"/proc/{holder.pid}/cmdline"):
            assert "lock-holder-marker" in message

        # The same message when a cell's ATTACH meets the lock.
        mem = duckdb.connect()
        with pytest.raises(SQLExecutionError) as err:
            run_sql(mem, f"ATTACH '{path}' AS l; SELECT 1")
        assert f"PID {holder.pid}" in err.value.message
        assert "Conflicting lock" in err.value.engine_message
        mem.close()
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_other_errors_are_not_lock_errors():
    assert describe_lock_error(RuntimeError("Catalog Error: Table x does not exist")) is None
    text = 'IO Error: Could not set lock on file "/x/y.duckdb": Conflicting lock is held in /usr/bin/python3 (PID 4242) by user alice. See also …'
    message = describe_lock_error(text)
    assert "PID 4242" in message and "alice" in message and "/x/y.duckdb" in message


# -- result frames ----------------------------------------------------------

COMMON = """
SELECT 1::BIGINT AS i, NULL::INTEGER AS i_null, 7::INTEGER AS i32, 1.5::DOUBLE AS f,
       'inf'::DOUBLE AS f_inf, 1.25::FLOAT AS f32, 'x' AS s, NULL::VARCHAR AS s_null,
       true AS b, NULL::BOOLEAN AS b_null, TIMESTAMP '2024-01-02 03:04:05.123456' AS ts,
       TIMESTAMPTZ '2024-01-02 03:04:05+00' AS tstz, DATE '2024-01-02' AS d,
       INTERVAL 90 MINUTE AS td, 'ab'::BLOB AS blob
"""


def duck_frame(sql: str) -> pd.DataFrame:
    conn = duckdb.connect()
    try:
        return conn.execute(sql).df()
    finally:
        conn.close()


def test_small_frame_round_trips_as_json():
    df = duck_frame(COMMON + " UNION ALL " + COMMON.replace("1::BIGINT", "2::BIGINT").replace("true", "NULL"))
    spec, back = roundtrip(df)
    assert spec["format"] == "json"
    assert spec["rows"] == 2 and spec["columns"] == list(df.columns)
    assert_frame_equal(back, df)
    assert back["s_null"].tolist() == [None, None]


def test_large_frame_round_trips_as_parquet():
    n = S.JSON_MAX_CELLS // 10 + 1
    df = duck_frame(COMMON.replace("SELECT 1::BIGINT", "SELECT range::BIGINT") + f" FROM range({n})")
    assert df.size > S.JSON_MAX_CELLS
    spec, back = roundtrip(df)
    assert spec["format"] == "parquet" and spec["size"] > 0
    assert_frame_equal(back, df)


def test_parquet_blob_is_readable_by_duckdb(tmp_path):
    df = pd.DataFrame({"a": np.arange(S.JSON_MAX_CELLS + 1), "b": "x"})
    spec, blobs = dump_frame(df)
    (tmp_path / "r.parquet").write_bytes(bytes(blobs[0][1]))
    got = duckdb.connect().execute(f"SELECT count(*), sum(a) FROM read_parquet('{tmp_path / 'r.parquet'}')").fetchone()
    assert got == (len(df), int(df["a"].sum()))


def test_second_resolution_timestamps_take_arrow_ipc():
    df = pd.DataFrame({"t": np.arange(S.JSON_MAX_CELLS + 1).astype("datetime64[s]")})
    spec, back = roundtrip(df)
    assert spec["format"] == "arrow"  # Parquet would make them milliseconds
    assert_frame_equal(back, df)


@pytest.mark.parametrize("rows", [4, S.JSON_MAX_CELLS + 1])
def test_sqlite_mixed_type_columns_round_trip(rows):
    conn = sqlite3.connect(":memory:")
    result = run_sql(
        conn,
        f"""WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
        SELECT i, CASE i % 4 WHEN 0 THEN 'text' WHEN 1 THEN i WHEN 2 THEN 2.5 ELSE X'00FF' END AS mixed,
               CASE WHEN i % 2 THEN NULL ELSE i END AS sparse
        FROM n""",
    )
    df = result.frame
    assert df["sparse"].dtype == "Int64"  # not float: integers stay integers
    spec, back = roundtrip(df, trusted=False)  # no pickle needed
    assert spec["format"] in ("json", "parquet")
    assert_frame_equal(back, df)
    assert [type(v) for v in back["mixed"][:4]] == [int, float, bytes, str]


def test_duplicate_and_empty_results_round_trip():
    for df in (
        duck_frame("SELECT 1 AS a, 2 AS a"),
        run_sql(sqlite3.connect(":memory:"), "SELECT 1 AS a, 'x' AS a").frame,
        duck_frame("SELECT 1 AS a, 'x' AS b WHERE false"),
        pd.DataFrame(np.zeros((S.JSON_MAX_CELLS, 2)), columns=["a", "a"]),
    ):
        _, back = roundtrip(df)
        assert_frame_equal(back, df)


def test_unarrowable_frame_needs_trust():
    df = pd.DataFrame({"c": [dt.timezone.utc, None]})
    spec, blobs = dump_frame(df)
    assert spec["format"] == "pickle"
    store = dict(blobs)
    with pytest.raises(ValueError, match="not signed"):
        load_frame(spec, store.__getitem__, trusted=False)
    assert_frame_equal(load_frame(spec, store.__getitem__, trusted=True), df)


def test_frame_bundle_is_a_table():
    df = pd.DataFrame({"alpha": range(500), "beta": ["x"] * 500})
    data, metadata = frame_bundle(df)
    assert set(data) == {"text/html", "text/plain"}
    assert "<table" in data["text/html"] and "alpha" in data["text/html"]
    assert "beta" in data["text/plain"]
    assert data["text/html"].count("<tr") < 100  # long results are cut for display
    assert isinstance(metadata, dict)


def test_non_ascii_digits_are_not_numbers():
    # "²" passes str.isdigit(); it must tokenize as an ordinary character.
    assert normalize_sql("select  'x²'  ,  x²") == normalize_sql("select 'x²', x²")
    assert normalize_sql("select ²") == normalize_sql("select   ²")
