"""SQL cell keys: v2 keys fingerprint parameters like Python inputs, and the
v1 extra is still computed byte for byte so old records replay.

The v1 expectations were generated once by running the pre-split
``src/rssd_magic/sql.py`` (commit ``V1_COMMIT``); when that commit is in the
checkout's history, :func:`test_legacy_extra_matches_the_v1_source` also
runs it directly, on real connections and a wider spread of values.
"""

from __future__ import annotations

import datetime as dt
import decimal
import fractions
import http
import json
import os
import sqlite3
import subprocess
import sys
import types
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from rssd_magic import deps, serialize
from rssd_magic import sql as S
from rssd_magic.keys import cell_key
from rssd_magic.sql import key as K

ROOT = Path(__file__).resolve().parents[1]
#: The last commit whose sql.py wrote v1 keys.
V1_COMMIT = "8f30161"
SQL = "SELECT * FROM t -- why\nWHERE a = :a"
FIXED_TARGET = "sqlite:/data/notebook.sqlite"


class Ratio(float):
    pass


# v1 wrote the type's name into the key: pin it, whatever this file is imported as.
Ratio.__module__ = "spread"


def stable_spread() -> dict[str, dict]:
    """Parameter sets whose v1 encoding depends on nothing but the values
    (no pickle bytes, no pandas hashing, which may change with versions)."""
    return {
        "none": {},
        "int": {"a": 1},
        "float": {"a": 1.0},
        "bool": {"a": True},
        "null": {"a": None},
        "big_int": {"a": 2**70, "b": -5},
        "non_finite": {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"), "nzero": -0.0, "huge": 1e300},
        "strings": {"e": "", "u": "é ☃ \u2028 \"q\" \\", "long": "x" * 50},
        "bytes": {"s": b"\x00\xff", "l": b"ab" * 50, "ba": bytearray(b"xyz"), "mv": memoryview(b"m" * 70)},
        "times": {
            "naive": dt.datetime(2024, 1, 2, 3, 4, 5, 6),
            "utc": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
            "ist": dt.datetime(2024, 1, 2, 3, 4, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
            "d": dt.date(2024, 2, 29),
            "t": dt.time(23, 59, 59, 999999),
            "td": dt.timedelta(days=-1, seconds=5, microseconds=7),
        },
        "numbers": {
            "dec": decimal.Decimal("1.10"),
            "dnan": decimal.Decimal("NaN"),
            "enum": http.HTTPStatus.OK,
            "ratio": Ratio(0.5),
        },
        "uuid": {"u": uuid.UUID("12345678-1234-5678-1234-567812345678")},
        "containers": {
            "l": [1, [2, "x"], {"k": (1, 2)}],
            "t": (1, "a", None),
            "d": {2: "b", "a": 1, (1, 2): None},
            "s": {3, 1, 2},
            "fs": frozenset({"b", "a"}),
            "es": set(),
        },
        "numpy": {
            "i": np.int64(5),
            "f": np.float32(1.5),
            "b": np.bool_(True),
            "arr": np.arange(10),
            "arr2": np.linspace(0, 1, 6).reshape(2, 3),
            "obj": np.array(["a", 1, None], dtype=object),
        },
        "order": {"b": 2, "a": 1},
    }


def wide_spread() -> dict[str, dict]:
    """Everything above plus values whose v1 encoding pickles or hashes with pandas."""
    return {
        **stable_spread(),
        "pandas": {
            "df": pd.DataFrame({"x": [1, 2], "y": ["a", "b"]}),
            "ser": pd.Series([1.5, None], name="s"),
            "idx": pd.Index([3, 1, 2]),
        },
        "pickled": {"fr": fractions.Fraction(1, 3), "c": complex(1, 2)},
    }


# Generated once with the v1 sql.py and target_identity pinned to FIXED_TARGET.
_SQL_SHA = "568d869b7d04746a7e933cf73c496f0e9db1ffd75e5f2ab65429cade59ffd2db"
V1_PARAMS = {
    "none": "{}",
    "int": '{"a":1}',
    "float": '{"a":1.0}',
    "bool": '{"a":true}',
    "null": '{"a":null}',
    "big_int": '{"a":1180591620717411303424,"b":-5}',
    "non_finite": '{"huge":1e+300,"inf":{"$float":"inf"},"nan":{"$float":"nan"},"ninf":{"$float":"-inf"},"nzero":-0.0}',
    "strings": '{"e":"","long":"' + "x" * 50 + '","u":"é ☃ \u2028 \\"q\\" \\\\"}',
    "bytes": (
        '{"ba":{"$bytes":"eHl6"},'
        '"l":{"$bytes_sha256":"c7f0d9258cbfa32241423dc831494b5b02e26a3ec1676e4335b4cce72ff6cb8a","len":100},'
        '"mv":{"$bytes_sha256":"d053228cb0c31c42e575676e6aba662af74dc6080b581bf65dddbeb90387ac26","len":70},'
        '"s":{"$bytes":"AP8="}}'
    ),
    "times": (
        '{"d":{"$date":"2024-02-29"},"ist":{"$datetime":"2024-01-02T03:04:00+05:30","type":"datetime"},'
        '"naive":{"$datetime":"2024-01-02T03:04:05.000006","type":"datetime"},"t":{"$time":"23:59:59.999999"},'
        '"td":{"$timedelta":[-1,5,7]},"utc":{"$datetime":"2024-01-02T03:04:05+00:00","type":"datetime"}}'
    ),
    "numbers": (
        '{"dec":{"$decimal":"1.10"},"dnan":{"$decimal":"NaN"},"enum":{"$int":200,"type":"http.HTTPStatus"},'
        '"ratio":{"$float":"0.5","type":"spread.Ratio"}}'
    ),
    "uuid": '{"u":{"$uuid":"12345678-1234-5678-1234-567812345678"}}',
    "containers": (
        '{"d":{"$dict":[["a",1],[2,"b"],[{"$tuple":[1,2]},null]]},"es":{"$set":[]},"fs":{"$set":["a","b"]},'
        '"l":[1,[2,"x"],{"$dict":[["k",{"$tuple":[1,2]}]]}],"s":{"$set":[1,2,3]},"t":{"$tuple":[1,"a",null]}}'
    ),
    "numpy": (
        '{"arr":{"$ndarray":"<i8","sha256":"23c379d6c0f22ef64cdef873fd530df1f1419b4a3935e9323d5f1d82ca697b6a","shape":[10]},'
        '"arr2":{"$ndarray":"<f8","sha256":"d3574fc522452efb4344365fcd945bc3455d10a5bcbfb2855b4b79998f720a1e","shape":[2,3]},'
        '"b":{"$numpy":"|b1","value":true},"f":{"$numpy":"<f4","value":1.5},"i":{"$numpy":"<i8","value":5},'
        '"obj":{"$ndarray":"object","shape":[3],"value":["a",1,null]}}'
    ),
    "order": '{"a":1,"b":2}',
}


def v1_extra(params_json: str) -> str:
    return (
        '{"params":' + params_json + ',"sql":"' + _SQL_SHA + '","target":"' + FIXED_TARGET + '","v":"rssd_magic.sql.v1"}'
    )


@pytest.fixture
def lite(tmp_path):
    conn = sqlite3.connect(tmp_path / "k.sqlite")
    yield conn
    conn.close()


@pytest.fixture
def duck(tmp_path):
    conn = duckdb.connect(str(tmp_path / "k.duckdb"))
    yield conn
    conn.close()


# -- v1 (legacy lookup) --------------------------------------------------------


@pytest.mark.parametrize("case", sorted(V1_PARAMS))
def test_legacy_extra_is_byte_identical_to_v1(case, monkeypatch):
    monkeypatch.setattr(K, "target_identity", lambda conn: FIXED_TARGET)
    assert S.legacy_key_extra(SQL, None, stable_spread()[case]) == v1_extra(V1_PARAMS[case])


def test_v1_constants_cover_the_spread():
    assert set(V1_PARAMS) == set(stable_spread())


def _v1_module(monkeypatch) -> types.ModuleType:
    """The pre-split sql.py, loaded from git as ``rssd_magic._sql_v1``."""
    try:
        source = subprocess.run(
            ["git", "show", f"{V1_COMMIT}:src/rssd_magic/sql.py"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {V1_COMMIT} (the v1 SQL keys) is not in this checkout's history; use a full clone, not a shallow one")
    # Its last line registers its own frame codec: keep the current one.
    monkeypatch.setitem(serialize.CODECS, "frame", serialize.codec_for({"kind": "frame"}))
    module = types.ModuleType("rssd_magic._sql_v1")
    module.__package__ = "rssd_magic"
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look it up
    exec(compile(source, "rssd_magic/_sql_v1.py", "exec"), module.__dict__)
    return module


def test_legacy_extra_matches_the_v1_source(monkeypatch, lite, duck):
    v1 = _v1_module(monkeypatch)
    bodies = [SQL, "select 1", "CREATE TABLE t AS SELECT $a AS x, :b AS y; -- done"]
    for conn in (lite, duck):
        for body in bodies:
            for params in wide_spread().values():
                assert S.legacy_key_extra(body, conn, params) == v1.key_extra(body, conn, params)
                assert S.canonical_params(params) == v1.canonical_params(params)
    for bad in ({"f": lambda: 1}, {"g": (x for x in ())}):
        with pytest.raises(S.SQLUsageError) as new:
            S.legacy_key_extra("SELECT 1", lite, bad)
        with pytest.raises(v1.SQLUsageError) as old:
            v1.key_extra("SELECT 1", lite, bad)
        assert str(new.value) == str(old.value)


def test_legacy_and_current_keys_differ(lite):
    old = S.legacy_key_extra(SQL, lite, {"a": 1})
    new = S.key_extra(SQL, lite, {"a": 1})
    assert json.loads(old)["v"] == S.LEGACY_SQL_KEY_VERSION == "rssd_magic.sql.v1"
    assert json.loads(new)["v"] == S.SQL_KEY_VERSION == "rssd_magic.sql.v2"
    assert cell_key(S.normalize_sql(SQL), "nb", extra=old).digest != cell_key(S.normalize_sql(SQL), "nb", extra=new).digest


# -- v2: parameters by their fingerprints --------------------------------------


def _values() -> dict:
    """A fresh object for every value, each call."""
    return {
        "i": 7,
        "f": 0.25,
        "s": "naïve",
        "b": bytes(100),
        "when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        "dec": decimal.Decimal("1.10"),
        "l": [1, {"k": (2, 3)}],
        "st": {"x", "y", "z"},
        "arr": np.arange(1000, dtype="f8").reshape(10, 100),
        "df": pd.DataFrame({"x": np.arange(50), "y": [f"r{i}" for i in range(50)]}),
        "ser": pd.Series([1.5, None]),
        "n": np.int64(5),
    }


def test_equal_values_rebuilt_as_new_objects_keep_the_key(lite, duck):
    for conn in (lite, duck):
        a, b = _values(), _values()
        assert all(a[k] is not b[k] for k in a if not isinstance(a[k], (int, float, str)))
        assert S.key_extra(SQL, conn, a) == S.key_extra(SQL, conn, b)
        reordered = dict(reversed(list(_values().items())))
        assert S.key_extra(SQL, conn, reordered) == S.key_extra(SQL, conn, a)


@pytest.mark.parametrize(
    "name, other",
    [
        ("i", 8),
        ("i", 7.0),
        ("i", True),
        ("f", 0.5),
        ("s", "naive"),
        ("b", b"\x00" * 99 + b"\x01"),
        ("when", dt.datetime(2024, 1, 2, 3, 4, 5, 1, tzinfo=dt.timezone.utc)),
        ("dec", decimal.Decimal("1.1")),
        ("l", [1, {"k": (2, 4)}]),
        ("st", {"x", "y"}),
        ("arr", np.arange(1000, dtype="f4").reshape(10, 100)),
        ("df", pd.DataFrame({"x": np.arange(50), "y": [f"r{i}" for i in range(49)] + ["changed"]})),
        ("ser", pd.Series([1.5, 2.0])),
        ("n", np.int32(5)),
    ],
)
def test_a_different_value_changes_the_key(lite, name, other):
    base = _values()
    changed = {**_values(), name: other}
    assert S.key_extra(SQL, lite, changed) != S.key_extra(SQL, lite, base)


def test_sql_and_target_still_count(lite, duck):
    base = S.key_extra(SQL, lite, {"a": 1})
    assert S.key_extra("SELECT *\nFROM t WHERE a=$a;", lite, {"a": 1}) == base
    assert S.key_extra("SELECT * FROM t WHERE a = :a AND 1", lite, {"a": 1}) != base
    assert S.key_extra(SQL, duck, {"a": 1}) != base


def test_params_are_fingerprinted_like_a_python_cells_inputs():
    values = _values()
    inputs = S.params_inputs(values)
    python = deps.collect_inputs(values, list(values))
    assert inputs == {"names": python["names"]}
    assert S.params_inputs({}) == {} and S.params_inputs(None) == {}


def test_key_extra_accepts_precomputed_inputs(lite):
    values = _values()
    assert S.key_extra(SQL, lite, inputs=S.params_inputs(values)) == S.key_extra(SQL, lite, values)
    assert S.key_extra(SQL, lite, inputs={}) == S.key_extra(SQL, lite)


def test_params_inputs_explain_what_changed():
    old = S.params_inputs({"a": 1, "df": pd.DataFrame({"x": [1]})})
    new = S.params_inputs({"a": 2, "df": pd.DataFrame({"x": [1]})})
    said = deps.explain(old, new)
    assert "a" in said and "1 → 2" in said and "df" not in said
    assert deps.explain(old, S.params_inputs({"a": 1, "df": pd.DataFrame({"x": [1]})})) == ""


def test_values_that_cant_be_keyed_are_refused_by_name(lite):
    with pytest.raises(S.SQLUsageError, match=r"\$g .*can't be fingerprinted"):
        S.key_extra("SELECT $g", lite, {"g": (x for x in ())})
    for code in (lambda: 1, len, sqlite3, Ratio):
        with pytest.raises(S.SQLUsageError, match=r"\$f .*not a value SQL can bind"):
            S.params_inputs({"f": code})


def test_keys_are_stable_across_processes(tmp_path):
    # Set and dict iteration follows the string hash seed; keys must not.
    db = tmp_path / "same.sqlite"
    code = (
        "import sqlite3, sys; from rssd_magic import sql; "
        f"conn = sqlite3.connect({str(db)!r}); "
        "params = {'s': {'alpha', 'beta', 'gamma', 'delta'}, 'd': {'x': 1, 'y': [1, 2]}, 'fs': frozenset('abcdef')}; "
        "print(sql.key_extra('SELECT $s, $d, $fs', conn, params))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], env={**env, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        for seed in ("1", "2", "3")
    }
    assert len(outs) == 1 and '"v":"rssd_magic.sql.v2"' in outs.pop()
