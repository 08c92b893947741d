"""SQL cell keys: parameters are fingerprinted like a Python cell's inputs."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from rssd_magic import deps
from rssd_magic import sql as S

ROOT = Path(__file__).resolve().parents[1]
SQL = "SELECT * FROM t -- why\nWHERE a = :a"


class Ratio(float):
    pass


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


def test_the_key_names_its_version(lite):
    assert json.loads(S.key_extra(SQL, lite, {"a": 1}))["v"] == S.SQL_KEY_VERSION == "rssd_magic.sql.v2"


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
