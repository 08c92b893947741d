"""Unit tests for rssd_magic.deps: read names, fingerprints, declared deps,
input digests and the "why it ran again" line."""

from __future__ import annotations

import copy
import json
import os
import pickle
import socket
import sqlite3
import threading
import types
from dataclasses import dataclass

import cloudpickle
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rssd_magic.deps import (
    Fingerprint,
    collect_inputs,
    env_deps,
    explain,
    file_deps,
    fingerprint,
    fingerprint_names,
    inputs_digest,
    package_deps,
    read_names,
    try_fingerprint,
)
from rssd_magic.engine.keys import cell_key


def fp(value):
    result, reason = try_fingerprint(value)
    assert result is not None, reason
    return result.digest


def notebook(source: str) -> dict:
    """Run *source* as a notebook cell would: globals named ``__main__``."""
    namespace = {"__name__": "__main__"}
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace


# ---------------------------------------------------------------------------
# read_names
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, expected",
    [
        ("x = y + 1", ["y"]),
        ("print(y)\ny = 1", ["y"]),  # used before it is assigned: the old y
        ("y = 1\nprint(y)", []),  # assigned first: the cell's own y
        ("a, b = b, a", ["b", "a"]),  # the value is evaluated before the targets
    ],
)
def test_reads_before_binding_count(code, expected):
    assert read_names(code) == expected


@pytest.mark.parametrize(
    "code, expected",
    [
        ("x += 1", ["x"]),
        ("total = 0\ntotal += 1", []),
        ("obj.attr += 1", ["obj"]),
        ("counts[key] += n", ["counts", "key", "n"]),
    ],
)
def test_augmented_assignment_reads_its_target(code, expected):
    assert read_names(code) == expected


@pytest.mark.parametrize(
    "code, expected",
    [
        ("import numpy as np\nnp.zeros(3)", []),
        ("import os.path\nos.getcwd()", []),
        ("from math import pi as PI\nPI * r", ["r"]),
        ("np.zeros(3)", ["np"]),  # a module imported by another cell is an input
        ("from math import *\nprint(pi)", ["pi"]),  # unknown bindings: be conservative
    ],
)
def test_imports_bind(code, expected):
    assert read_names(code) == expected


@pytest.mark.parametrize(
    "code, expected",
    [
        ("def f():\n    return g", ["g"]),
        ("def f(a, *args, k=1, **kw):\n    b = a\n    return b + k + c", ["c"]),
        ("def f():\n    return k\nk = 2", []),  # the cell binds k: f sees the cell's k
        ("def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)", []),
        ("def outer():\n    v = 1\n    def inner():\n        return v + w\n    return inner", ["w"]),
        ("def f():\n    global counter\n    counter += 1", ["counter"]),
        ("def f():\n    import json\n    return json.dumps(cfg)", ["cfg"]),
        ("f = lambda a, b=default: a + b + offset", ["default", "offset"]),
        ("@decorate(level)\ndef f(x: Annot = dflt) -> Ret:\n    pass", ["decorate", "level", "dflt", "Annot", "Ret"]),
        ("async def f():\n    async for i in source:\n        await sink(i)", ["source", "sink"]),
    ],
)
def test_functions_and_lambdas_read_globals(code, expected):
    assert read_names(code) == expected


@pytest.mark.parametrize(
    "code, expected",
    [
        ("[i * k for i in range(n)]", ["n", "k"]),
        ("{k: v for k, v in pairs}", ["pairs"]),
        ("x = [a for a in a]", ["a"]),  # the first iterable is read outside
        ("[(i, j) for i in rows for j in cols if j != i]", ["rows", "cols"]),
        ("sum(v for v in vals)", ["vals"]),
        ("[[y for y in x] for x in grid]", ["grid"]),
        ("def f():\n    return [q for q in src]", ["src"]),
    ],
)
def test_comprehension_variables_are_not_inputs(code, expected):
    assert read_names(code) == expected


@pytest.mark.parametrize(
    "code, expected",
    [
        ("class A:\n    z = 1\n    w = z + q", ["q"]),  # class-local z
        ("class A:\n    def m(self):\n        return z\n    z = 1", ["z"]),  # methods skip the class
        ("class A(Base, metaclass=Meta):\n    pass\nA()", ["Base", "Meta"]),
        ("class A:\n    z = 1\n    ys = [z for _ in range(3)]", ["z"]),  # comprehension skips the class
        ("class Node:\n    def clone(self):\n        return Node()", []),
    ],
)
def test_class_bodies(code, expected):
    assert read_names(code) == expected


@pytest.mark.parametrize(
    "code, expected",
    [
        ("(y := 5)\nprint(y)", []),
        ("if (n := len(data)) > 3:\n    print(n)", ["data"]),
        ("[last := i for i in data]\nprint(last)", ["data"]),  # binds in the cell
        ("print(y)\n(y := 1)", ["y"]),
    ],
)
def test_walrus(code, expected):
    assert read_names(code) == expected


@pytest.mark.parametrize(
    "code, expected",
    [
        ("del x", []),  # needs x to exist, does not use its value
        ("x = 1\ndel x\nprint(x)", ["x"]),  # unbound again: a later read is a read
        ("del df['a']", ["df"]),
        ("del obj.attr, items[0]", ["obj", "items"]),
    ],
)
def test_del(code, expected):
    assert read_names(code) == expected


@pytest.mark.parametrize(
    "code, expected",
    [
        ("df.col = 3", ["df"]),
        ("lst[i] = 2", ["lst", "i"]),
        ("cfg['a']['b'] = val", ["val", "cfg"]),
        ("model.fit(X).predict(Y)", ["model", "X", "Y"]),
        ("df = df[df.x > 0]", ["df"]),
    ],
)
def test_attribute_and_subscript_roots_are_read(code, expected):
    assert read_names(code) == expected


@pytest.mark.parametrize(
    "code, expected",
    [
        ("try:\n    pass\nexcept Err as e:\n    print(e)\nprint(e)", ["Err", "e"]),
        ("with open(p) as fh:\n    fh.read()", ["p"]),
        ("for i in items:\n    last = i\nprint(i, last)", ["items"]),
        ("print(f'{name}!')", ["name"]),
        ("x: int", []),
        ("x: MyType = make()", ["make", "MyType"]),
        (
            "match cmd:\n    case Point(x=0, y=yy):\n        print(yy, z)\n"
            "    case {'k': v, **rest}:\n        print(v, rest)\n    case [first, *others]:\n        print(others)",
            ["cmd", "Point", "z"],
        ),
    ],
)
def test_other_statements(code, expected):
    assert read_names(code) == expected


def test_builtins_and_shell_names_are_not_inputs():
    assert read_names("print(len(x), sorted(x))") == ["x"]
    # what IPython makes of ``!ls`` and ``_ + Out[1]``
    assert read_names("get_ipython().system('ls')\ny = _ + Out[1] + _i2") == []


def test_shadowed_builtin_is_an_input():
    assert read_names("print(input)", {"input": 5}) == ["input"]
    assert read_names("print(input)", {}) == []


def test_unparsable_code_reads_nothing():
    assert read_names("!ls -l") == []
    assert read_names("def (:") == []


# ---------------------------------------------------------------------------
# fingerprints: plain Python values
# ---------------------------------------------------------------------------


def test_equal_values_as_new_objects_fingerprint_equal():
    text = "".join(["ab", "c"])
    assert fp("abc") == fp(text)
    assert fp(10**30) == fp(int("1" + "0" * 30))
    assert fp([1, "a", None, 2.5]) == fp(list((1, "a", None, 2.5)))
    assert fp({"a": [1, 2], "b": {3}}) == fp(json.loads('{"b": [3], "a": [1, 2]}') | {"b": {3}})
    assert fp((1, (2, 3))) == fp(tuple([1, tuple([2, 3])]))
    assert fp(b"xyz") == fp(bytes(bytearray(b"xyz")))


def test_one_element_changed_differs():
    base = {"a": [1, 2, 3], "b": ("x", {1, 2}), "c": {"d": 1.5}}
    for change in (
        lambda v: v["a"].__setitem__(2, 4),
        lambda v: v["a"].append(4),
        lambda v: v.__setitem__("b", ("y", {1, 2})),
        lambda v: v["b"][1].add(3),
        lambda v: v["c"].__setitem__("d", 1.25),
        lambda v: v["c"].__setitem__("e", None),
        lambda v: v.__setitem__("z", v.pop("a")),  # a key renamed
    ):
        other = copy.deepcopy(base)
        change(other)
        assert other != base
        assert fp(other) != fp(base)


def test_types_are_part_of_the_value():
    digests = {fp(v) for v in (1, 1.0, True, "1", b"1", (1,), [1], {1}, frozenset({1}), None, 0)}
    assert len(digests) == 11


def test_dicts_and_sets_ignore_order_lists_do_not():
    assert fp({"a": 1, "b": 2}) == fp({"b": 2, "a": 1})
    assert fp({3, 1, 2}) == fp({2, 3, 1})
    assert fp([1, 2]) != fp([2, 1])


def test_long_lists_of_primitives_equal_whatever_object_sharing():
    shared = ["abc"] * 40
    distinct = ["".join(["ab", "c"]) for _ in range(40)]
    assert fp(shared) == fp(distinct)
    changed = list(distinct)
    changed[39] = "abd"
    assert fp(changed) != fp(shared)


def test_cycles_are_fingerprinted():
    a = [1]
    a.append(a)
    b = [1]
    b.append(b)
    c = [2]
    c.append(c)
    assert fp(a) == fp(b)
    assert fp(a) != fp(c)


@dataclass
class Point:
    x: int
    y: list


def test_objects_by_state():
    assert fp(Point(1, [2])) == fp(Point(1, [2]))
    assert fp(Point(1, [2])) != fp(Point(1, [3]))
    assert fp(pd.Timestamp("2024-01-01")) != fp(pd.Timestamp("2024-01-02"))


@pytest.mark.parametrize(
    "make",
    [
        threading.Lock,
        lambda: (i for i in range(3)),
        lambda: sqlite3.connect(":memory:"),
        lambda: socket.socket(),
        lambda: open(os.devnull),
    ],
    ids=["lock", "generator", "sqlite", "socket", "file"],
)
def test_unfingerprintable_objects_give_a_reason(make):
    value = make()
    try:
        result, reason = try_fingerprint(value)
        assert result is None
        assert fingerprint(value) is None
        assert type(value).__name__ in reason
    finally:
        if hasattr(value, "close"):
            value.close()


def test_unfingerprintable_inside_a_container():
    result, reason = try_fingerprint({"ok": 1, "lock": threading.Lock()})
    assert result is None and "lock" in reason


def test_hint_and_value_for_messages():
    assert fingerprint(5).value == "5"
    assert fingerprint([1, 2, 3]).hint == "list of 3"
    assert fingerprint("secret").value is None  # strings are never rendered
    assert fingerprint(np).hint == "module numpy" and fingerprint(np).value == np.__version__
    assert len(fingerprint(1).digest) == 32


def test_fingerprint_json_round_trip():
    f = fingerprint(pd.DataFrame({"a": [1, 2]}))
    data = json.loads(json.dumps(f.to_json()))
    assert Fingerprint.from_json(data) == f


# ---------------------------------------------------------------------------
# fingerprints: numpy and pandas
# ---------------------------------------------------------------------------


def test_numpy_views_and_copies_with_same_content_are_equal():
    a = np.arange(24, dtype=np.float64).reshape(4, 6)
    assert fp(a) == fp(a.copy())
    assert fp(a[:, ::2]) == fp(np.ascontiguousarray(a[:, ::2]))
    assert fp(a.T) == fp(a.T.copy())
    assert fp(np.asfortranarray(a)) == fp(a)
    assert fp(a[::-1]) == fp(a[::-1].copy())


def test_numpy_changes_differ():
    a = np.arange(12, dtype=np.int64)
    b = a.copy()
    b[7] = -1
    assert fp(a) != fp(b)
    assert fp(a) != fp(a.astype(np.int32))  # dtype
    assert fp(a) != fp(a.astype(np.float64))
    assert fp(a) != fp(a.reshape(3, 4))  # same bytes, other shape
    assert fp(a.view(np.uint64)) != fp(a)  # same bytes, other dtype


def test_numpy_special_arrays():
    strings = np.array(["a", "bb", None], dtype=object)
    assert fp(strings) == fp(np.array(["a", "b" + "b", None], dtype=object))
    assert fp(np.array(["a\x00b"], dtype=object)) != fp(np.array(["a", "b"], dtype=object))
    m1 = np.ma.array([1, 2, 3], mask=[0, 1, 0])
    m2 = np.ma.array([1, 2, 3], mask=[0, 0, 1])
    assert fp(m1) != fp(m2)
    dates = np.arange("2024-01", "2024-06", dtype="datetime64[D]")
    assert fp(dates) == fp(dates.copy()) != fp(dates + 1)
    assert fp(np.float64(1.5)) == fp(np.float64(1.5)) != fp(np.float32(1.5))


def frame():
    return pd.DataFrame(
        {
            "a": np.arange(5),
            "b": ["x", "y", None, "w", "v"],
            "c": pd.Categorical(list("pqpqp")),
            "d": pd.array([1, None, 3, 4, 5], dtype="Int64"),
            "e": pd.date_range("2024-01-01", periods=5, tz="UTC"),
        },
        index=list("klmno"),
    )


def test_dataframe_equal_when_rebuilt():
    df = frame()
    assert fp(df) == fp(frame())
    assert fp(df) == fp(pickle.loads(pickle.dumps(df)))  # as a replay restores it
    assert fp(df) == fp(df.copy())
    assert fp(df[["a", "b"]]) == fp(df[["a", "b"]].copy())


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.rename(columns={"a": "z"}),
        lambda d: d.assign(a=d["a"] + 1),
        lambda d: d.assign(b=["x", "y", "q", "w", "v"]),
        lambda d: d.assign(a=d["a"].astype("float64")),
        lambda d: d.set_axis(list("KLMNO"), axis=0),
        lambda d: d[["b", "a", "c", "d", "e"]],
        lambda d: d.assign(c=pd.Categorical(list("pqppp"))),
        lambda d: d.assign(d=pd.array([1, 2, 3, 4, 5], dtype="Int64")),
        lambda d: d.iloc[:4],
    ],
    ids=["rename", "value", "string", "dtype", "index", "column order", "category", "mask", "rows"],
)
def test_dataframe_changes_differ(change):
    assert fp(change(frame())) != fp(frame())


def test_series_and_index():
    s = pd.Series([1.0, 2.0], name="s")
    assert fp(s) == fp(pd.Series([1.0, 2.0], name="s"))
    assert fp(s) != fp(s.rename("t"))
    strings = pd.Series(["a", None, "c"], dtype="string")
    assert fp(strings) == fp(strings.copy())
    assert fp(strings) != fp(pd.Series(["a", "", "c"], dtype="string"))
    assert fp(strings) != fp(pd.Series([None, "a", "c"], dtype="string"))  # where the NA is
    mi = pd.MultiIndex.from_tuples([(1, "a"), (2, "b")], names=["n", "s"])
    assert fp(mi) == fp(pickle.loads(pickle.dumps(mi)))
    assert fp(mi) != fp(mi.set_names(["n", "t"]))


def test_dataframe_hint():
    assert fingerprint(pd.DataFrame(np.zeros((1000, 3)))).hint == "1000×3 DataFrame"
    assert fingerprint(np.zeros((4, 2))).hint == "4×2 float64 array"


# ---------------------------------------------------------------------------
# fingerprints: notebook functions and classes
# ---------------------------------------------------------------------------

FUNC = """
import math
SCALE = 3
def f(x, y=2):
    '''Doc.'''
    return [math.floor(x * SCALE) + i for i in range(y)]
"""


def test_function_same_code_equal_edited_body_differs():
    f1 = notebook(FUNC)["f"]
    f2 = notebook("\n\n# moved to another cell\n" + FUNC)["f"]
    assert f1 is not f2 and f1.__module__ == "__main__"
    assert fp(f1) == fp(f2)
    assert fp(f1) != fp(notebook(FUNC.replace("+ i", "- i"))["f"])
    assert fp(f1) != fp(notebook(FUNC.replace("y=2", "y=3"))["f"])  # defaults
    assert fp(f1) != fp(notebook(FUNC.replace("'''Doc.'''", "'''Other.'''"))["f"])


def test_function_depends_on_the_globals_it_reads():
    namespace = notebook(FUNC)
    before = fp(namespace["f"])
    namespace["SCALE"] = 4
    assert fp(namespace["f"]) != before
    namespace["SCALE"] = 3
    assert fp(namespace["f"]) == before
    namespace["unrelated"] = 99
    assert fp(namespace["f"]) == before


def test_function_attribute_names_are_not_globals():
    namespace = notebook("data = [1]\ndef h(obj):\n    return obj.data\n")
    before = fp(namespace["h"])
    namespace["data"] = [2]  # a global named like the attribute: not read by h
    assert fp(namespace["h"]) == before


def test_function_survives_cloudpickle_round_trip():
    f = notebook(FUNC)["f"]
    restored = cloudpickle.loads(cloudpickle.dumps(f))
    assert restored is not f
    assert fp(restored) == fp(f)


def test_function_with_unfingerprintable_global_is_still_fingerprinted():
    namespace = notebook("import threading\nLOCK = threading.Lock()\ndef g():\n    return LOCK\n")
    assert fingerprint(namespace["g"]) is not None


def test_closures_and_lambdas():
    make = "def make(k):\n    return lambda x: x + k\n"
    assert fp(notebook(make)["make"](1)) == fp(notebook(make)["make"](1))
    assert fp(notebook(make)["make"](1)) != fp(notebook(make)["make"](2))


CLASS = """
class Base:
    pass
class Model(Base):
    rate = 0.1
    def step(self, x):
        return x * self.rate
    @property
    def double(self):
        return Model()
"""


def test_class_by_methods_and_bases():
    c1 = notebook(CLASS)["Model"]
    c2 = notebook(CLASS)["Model"]
    assert c1 is not c2
    assert fp(c1) == fp(c2)
    assert fp(c1) != fp(notebook(CLASS.replace("x * self", "x / self"))["Model"])
    assert fp(c1) != fp(notebook(CLASS.replace("rate = 0.1", "rate = 0.2"))["Model"])
    assert fp(c1) != fp(notebook(CLASS.replace("class Base:\n    pass", "class Base:\n    z = 1"))["Model"])
    # instances of notebook classes: by class and state
    assert fp(c1()) == fp(c2())


def test_class_fingerprint_unchanged_by_pickling_an_instance():
    cls = notebook(CLASS)["Model"]
    before = fp(cls)
    cls.__new__(cls).__reduce_ex__(4)  # as pickling does: copyreg caches __slotnames__
    assert "__slotnames__" in vars(cls)
    assert fp(cls) == before


FRESH_KERNEL = """
import json, sys, cloudpickle
from dataclasses import dataclass
import numpy as np, pandas as pd
from rssd_magic.deps import fingerprint
RATE = 0.5
class Model:
    rate = 0.1
    def step(self, x):
        return x * self.rate * RATE
@dataclass
class Cfg:
    a: int = 1
    b: tuple = (1, 2)
def f(x):
    return Model().step(x) + np.sqrt(x)
values = {"Model": Model, "Cfg": Cfg, "f": f, "cfg": Cfg(3), "m": Model(),
          "df": pd.DataFrame({"a": [1, 2], "s": ["x", None]}), "arr": np.arange(6).reshape(2, 3).T}
open(sys.argv[1], "wb").write(cloudpickle.dumps(values))
print(json.dumps({k: fingerprint(v).digest for k, v in values.items()}))
"""


def test_values_restored_in_another_process_fingerprint_as_before(tmp_path):
    # What a replay in a fresh kernel does: unpickle what another process saved.
    import subprocess
    import sys

    blob = tmp_path / "values.pkl"
    out = subprocess.run(
        [sys.executable, "-c", FRESH_KERNEL, str(blob)], capture_output=True, text=True, check=True
    )
    before = json.loads(out.stdout)
    restored = pickle.loads(blob.read_bytes())
    assert {k: fp(v) for k, v in restored.items()} == before


WRAPPED = """
import functools
def deco(fn):
    def wrapper(*args):
        return fn(*args)
    return wrapper
@functools.lru_cache
def cached(x):
    return x + 1
"""


def test_wrapped_and_decorated_functions_follow_their_body():
    one = notebook(WRAPPED)
    two = notebook(WRAPPED.replace("x + 1", "x + 2"))
    assert fp(one["cached"]) == fp(notebook(WRAPPED)["cached"])
    assert fp(one["cached"]) != fp(two["cached"])  # lru_cache reduces to its name
    # a library decorator's inner function without functools.wraps
    library = types.ModuleType("some_library")
    exec(compile(WRAPPED, "<library>", "exec"), library.__dict__)
    assert library.deco(one["cached"]).__qualname__ == "deco.<locals>.wrapper"
    assert fp(library.deco(one["cached"])) != fp(library.deco(two["cached"]))


def test_library_functions_and_classes_by_reference():
    assert fp(np.mean) == fp(np.mean)
    assert fp(np.mean) != fp(np.median)
    assert fp(pd.DataFrame) != fp(pd.Series)
    assert fp(len) != fp(sorted)


# ---------------------------------------------------------------------------
# the names section, declared deps, digests
# ---------------------------------------------------------------------------


def test_fingerprint_names_is_json_and_keeps_unfingerprintables():
    lock = threading.Lock()
    namespace = {"df": pd.DataFrame({"a": [1]}), "lock": lock, "n": 3}
    section = fingerprint_names(namespace, ["df", "lock", "n", "absent"])
    assert json.loads(json.dumps(section)) == section
    assert list(section) == ["df", "lock", "n"]
    assert section["lock"]["digest"] is None and "lock" in section["lock"]["reason"]
    assert section["n"]["value"] == "3"


def test_file_deps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("1,2\n")
    (tmp_path / "data" / "b.csv").write_text("3,4\n")
    first = file_deps(["data/*.csv", "missing/*.json", "config.toml"])
    assert set(first) == {"data/a.csv", "data/b.csv", "missing/*.json", "config.toml"}
    assert first["missing/*.json"] is None and first["config.toml"] is None
    assert first["data/a.csv"] != first["data/b.csv"]
    assert file_deps(["data"]) == {os.path.join("data", "a.csv"): first["data/a.csv"],
                                   os.path.join("data", "b.csv"): first["data/b.csv"]}
    (tmp_path / "data" / "a.csv").write_text("1,3\n")
    assert file_deps(["data/a.csv"])["data/a.csv"] != first["data/a.csv"]


def test_env_deps_store_digests_not_values(monkeypatch):
    monkeypatch.setenv("RSSD_TEST_TOKEN", "hunter2")
    monkeypatch.delenv("RSSD_TEST_UNSET", raising=False)
    deps = env_deps(["RSSD_TEST_TOKEN", "RSSD_TEST_UNSET"])
    assert deps["RSSD_TEST_UNSET"] is None
    assert "hunter2" not in json.dumps(deps)
    monkeypatch.setenv("RSSD_TEST_TOKEN", "hunter3")
    assert env_deps(["RSSD_TEST_TOKEN"])["RSSD_TEST_TOKEN"] != deps["RSSD_TEST_TOKEN"]


def test_package_deps():
    deps = package_deps(["pytest", "no-such-package-xyz", "ulid"])
    assert deps["pytest"] == pytest.__version__
    assert deps["no-such-package-xyz"] is None
    assert deps["ulid"] is not None  # import name of python-ulid


def test_inputs_digest():
    namespace = {"df": pd.DataFrame({"a": [1, 2]}), "n": 3}
    inputs = collect_inputs(namespace, ["df", "n"], env=["RSSD_TEST_UNSET_VAR"])
    again = collect_inputs({"n": 3, "df": pd.DataFrame({"a": [1, 2]})}, ["n", "df"], env=["RSSD_TEST_UNSET_VAR"])
    assert inputs_digest(inputs) == inputs_digest(again)
    assert inputs_digest({}) == "" and inputs_digest({"names": {}}) == ""
    # hints are for people: they do not change the key
    relabelled = json.loads(json.dumps(inputs))
    relabelled["names"]["df"]["hint"] = "something else"
    assert inputs_digest(relabelled) == inputs_digest(inputs)
    namespace["n"] = 4
    assert inputs_digest(collect_inputs(namespace, ["df", "n"])) != inputs_digest(inputs)
    with_pkg = dict(inputs, packages={"pandas": "9.9"})
    assert inputs_digest(with_pkg) != inputs_digest(inputs)
    # and it folds into the key
    code = "y = df.a.sum() * n"
    assert cell_key(code, "s", extra=inputs_digest(inputs)).digest != cell_key(code, "s").digest


# ---------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------


def entry(digest, hint, value=None):
    return Fingerprint(digest, hint, value).to_json()


def test_explain_input_changed():
    old = {"names": {"df": entry("3f2a9c" + "0" * 26, "1000×3 DataFrame")}}
    new = {"names": {"df": entry("81b0e4" + "0" * 26, "1000×3 DataFrame")}}
    assert explain(old, new) == "input df changed (3f2a9c → 81b0e4, 1000×3 DataFrame)"
    bigger = {"names": {"df": entry("81b0e4" + "0" * 26, "1200×3 DataFrame")}}
    assert explain(old, bigger) == "input df changed (3f2a9c → 81b0e4, 1000×3 DataFrame → 1200×3 DataFrame)"


def test_explain_small_values_and_new_removed_inputs():
    old = {"names": {"n": entry("a" * 32, "int", "5"), "gone": entry("b" * 32, "list of 2")}}
    new = {"names": {"n": entry("c" * 32, "int", "6"), "fresh": entry("d" * 32, "str of 3 chars")}}
    assert explain(old, new) == (
        "input n changed (5 → 6); new input fresh (dddddd, str of 3 chars); input gone removed"
    )


def test_explain_unfingerprintable():
    old = {"names": {"conn": {"digest": None, "hint": "sqlite3.Connection", "reason": "r"}}}
    same = json.loads(json.dumps(old))
    assert explain(old, same) == ""
    new = {"names": {"conn": entry("e" * 32, "int", "1")}}
    assert explain(old, new) == "input conn changed (unfingerprintable → eeeeee, int)"
    assert explain(new, old) == "input conn can't be fingerprinted (r)"


def test_explain_files_env_packages():
    old = {
        "files": {"data/x.csv": "1" * 32, "data/old.csv": "2" * 32, "gone.txt": "3" * 32, "in/*.json": None},
        "env": {"A": None, "B": "h1", "C": "h2"},
        "packages": {"pandas": "2.1", "extra": None, "dropped": "1.0"},
    }
    new = {
        "files": {"data/x.csv": "4" * 32, "data/new.csv": "5" * 32, "gone.txt": None, "in/*.json": None},
        "env": {"A": "h0", "B": None, "C": "h3"},
        "packages": {"pandas": "2.2", "extra": "0.5", "dropped": None},
    }
    assert explain(old, new) == (
        "file data/x.csv changed; new file data/new.csv; file gone.txt missing; file data/old.csv removed; "
        "env A set; and 5 more"
    )
    from rssd_magic import deps

    assert deps.MAX_EXPLAINED == 5
    only_env = explain({"env": old["env"]}, {"env": new["env"]})
    assert only_env == "env A set; env B unset; env C changed"
    only_pkg = explain({"packages": old["packages"]}, {"packages": new["packages"]})
    assert only_pkg == "package pandas 2.1 → 2.2; package extra 0.5 installed; package dropped 1.0 uninstalled"
    nomatch = explain({"files": {"data/a.csv": "1" * 32}}, {"files": {"data/*.csv": None}})
    assert nomatch == "no file matches data/*.csv; file data/a.csv removed"


def test_explain_nothing_changed():
    inputs = collect_inputs({"x": [1, 2]}, ["x"])
    assert explain(inputs, json.loads(json.dumps(inputs))) == ""
    assert explain(None, None) == ""


def test_explain_real_fingerprints():
    old = collect_inputs({"df": pd.DataFrame(np.zeros((10, 3)))}, ["df"])
    new = collect_inputs({"df": pd.DataFrame(np.ones((10, 3)))}, ["df"])
    line = explain(old, new)
    assert line.startswith("input df changed (")
    assert old["names"]["df"]["digest"][:6] in line and new["names"]["df"]["digest"][:6] in line
    assert line.endswith(", 10×3 DataFrame)")


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------

leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=40) | st.dictionaries(st.text(max_size=5), children, max_size=6),
    max_leaves=60,
)


def rebuild(value):
    """An equal value made of new objects, dicts filled in reverse order."""
    if isinstance(value, list):
        return [rebuild(v) for v in value]
    if isinstance(value, dict):
        return {"".join(list(k)): rebuild(v) for k, v in reversed(list(value.items()))}
    if isinstance(value, str):
        return "".join(list(value))
    if type(value) is int:
        return int(str(value))
    return value


def mutate(value, data):
    """A copy of *value* differing in one place."""
    if isinstance(value, list):
        if not value:
            return [0]
        i = data.draw(st.integers(0, len(value) - 1))
        return value[:i] + [mutate(value[i], data)] + value[i + 1 :]
    if isinstance(value, dict):
        if not value:
            return {"k": 0}
        key = data.draw(st.sampled_from(sorted(value)))
        return {**value, key: mutate(value[key], data)}
    if type(value) is int:
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return [value]  # a leaf of another kind, wrapped


@settings(max_examples=150, deadline=None)
@given(values)
def test_equal_values_built_differently_fingerprint_equal(value):
    other = rebuild(value)
    assert other == value
    assert fp(other) == fp(value)


@settings(max_examples=150, deadline=None)
@given(values, st.data())
def test_a_mutated_copy_fingerprints_differently(value, data):
    other = mutate(value, data)
    assert other != value
    assert fp(other) != fp(value)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=64), min_size=1, max_size=200), st.data())
def test_arrays_equal_by_content(items, data):
    a = np.array(items)
    step = data.draw(st.integers(1, 3))
    view = a[::step]
    assert fp(view) == fp(np.array(items[::step]))
    i = data.draw(st.integers(0, len(a) - 1))
    b = a.copy()
    b[i] = b[i] + 1 if b[i] + 1 != b[i] else -b[i] - 1
    assert fp(b) != fp(a)


def test_a_failing_hint_does_not_cost_the_fingerprint():
    class Odd(list):
        def __len__(self):
            raise RuntimeError("no length")

    fp_, reason = try_fingerprint(Odd([1, 2]))
    assert fp_ is not None and reason is None
