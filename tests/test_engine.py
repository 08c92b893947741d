"""The engine on its own: keys, schema, store, serialization — no shell."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rssd_magic import serialize
from rssd_magic.deps import bound_names
from rssd_magic.ids import new_ulid
from rssd_magic.keys import cell_key, normalize_code
from rssd_magic.schema import EXPECTED_COLUMNS
from rssd_magic.store import RSSDError, Store
from rssd_magic.trust import buffer_digest

SHARED_DDL = Path(__file__).resolve().parents[2] / "shared" / "rssd" / "orchestration.sql"


# Dotted names below rssd_magic: a subpackage is listed itself (its
# __init__) and with each of its modules.
ENGINE = [
    "acquire", "canonical", "capture", "claims", "ids", "keys", "lifecycle", "plan",
    "record", "render", "report", "schema", "serialize", "sql", "store", "trust", "ttl",
    "deps", "deps.analysis", "deps.declared", "deps.explain", "deps.fingerprint", "deps.versions",
]  # fmt: skip


def test_engine_modules_do_not_import_ipython():
    imports = "; ".join(f"import rssd_magic.{m}" for m in ENGINE)
    code = f"import sys; {imports}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('IPython', 'ipykernel')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _modules(package: Path) -> set[str]:
    """Dotted names of every module below *package*, subpackages included
    (``deps/__init__.py`` is ``deps``, ``deps/analysis.py`` is ``deps.analysis``)."""
    names = set()
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and parts != ("__main__",):
            names.add(".".join(parts))
    return names


def test_every_module_is_either_engine_or_adapter():
    package = Path(__file__).resolve().parents[1] / "src" / "rssd_magic"
    modules = _modules(package)
    assert modules == set(ENGINE) | {"magic", "cli"}, "a new module must be classified here"


@pytest.mark.skipif(not SHARED_DDL.exists(), reason="shared/rssd not beside this checkout")
def test_packaged_ddl_matches_the_shared_schema_column_for_column():
    mem = sqlite3.connect(":memory:")
    mem.executescript(SHARED_DDL.read_text())
    for table, columns in EXPECTED_COLUMNS.items():
        if table.startswith("rssd_magic_"):
            continue
        info = mem.execute(f'PRAGMA table_info("{table}")').fetchall()
        assert [(r[1], r[2]) for r in info] == columns, table


@pytest.mark.parametrize(
    "a, b",
    [
        ("x=1", "x = 1  # set x"),
        ("if a:\n    b = 1\n", "if a:\n  b = 1\n\n\n"),
        ("f(a,\n  b)", "f(a, b)"),
        ("!ls -l\nx = 1", "!ls -l   \n\n# hi\nx = 1"),
    ],
)
def test_cosmetic_edits_keep_the_normalized_code(a, b):
    assert normalize_code(a) == normalize_code(b)
    assert cell_key(a, "s").digest == cell_key(b, "s").digest


@pytest.mark.parametrize(
    "a, b",
    [
        ("x = 1", "x = 2"),
        ("s = 'a  b'", "s = 'a b'"),
        ("s = '# x'", "s = '# y'"),
        ("if a:\n    b = 1\nc = 2", "if a:\n    b = 1\n    c = 2"),
    ],
)
def test_code_changes_change_the_key(a, b):
    assert cell_key(a, "s").digest != cell_key(b, "s").digest


def test_keys_depend_on_scope_name_and_extra():
    assert cell_key("x", "a").digest != cell_key("x", "b").digest
    assert cell_key("x", "a", name="n").digest == cell_key("y", "a", name="n").digest
    assert cell_key("x", "a", extra="db1").digest != cell_key("x", "a", extra="db2").digest


def test_ulids_are_strictly_increasing():
    ids = [new_ulid() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 26 for i in ids)


def test_bound_names_finds_top_level_bindings_only():
    code = (
        "import os.path, numpy as np\nfrom a import b as c\nx, (y, *z) = 1, (2, 3)\n"
        "def f():\n    inner = 1\nclass K: attr = 1\nfor i in []: pass\n"
        "with open('f') as fh: pass\nif (w := 3): pass\n[q for q in ()]\nt: int = 1\nu: int\n"
        "try:\n    pass\nexcept Exception as e:\n    handled = 1\n"
    )
    assert bound_names(code) == {"os", "np", "c", "x", "y", "z", "f", "K", "i", "fh", "w", "t", "handled"}


def test_serialize_round_trips_and_reports_failures():
    ns = {"i": 7, "s": "x" * 10_000, "arr": np.arange(100_000), "nan": float("nan"), "g": (v for v in [])}
    specs, blobs = serialize.dump_names(ns, list(ns))
    assert specs["i"] == {"kind": "json", "value": 7}
    assert specs["s"]["kind"] == "pickle"  # long strings stay out of the JSON
    assert specs["arr"]["buffers"], "large buffers go out of band"
    assert specs["g"]["kind"] == "unserializable" and "generator" in specs["g"]["error"]
    store = dict(blobs)
    untrusted, why = serialize.load_names(specs, lambda d: bytearray(store[d]), {})
    assert "s" not in untrusted and why["s"] == serialize.UNTRUSTED and untrusted["i"] == 7
    values, missing = serialize.load_names(specs, lambda d: bytearray(store[d]), {}, lambda name: True)
    assert values["i"] == 7 and values["s"] == ns["s"] and np.isnan(values["nan"])
    assert (values["arr"] == ns["arr"]).all()
    assert set(missing) == {"g"}

    def blob_gone(digest):
        raise KeyError(digest)

    values, missing = serialize.load_names({"arr": specs["arr"]}, blob_gone, {}, lambda name: True)
    assert "missing from the RSSD" in missing["arr"] and not values


def test_store_refuses_missing_file_without_creating_it(tmp_path):
    path = tmp_path / "nope.db"
    with pytest.raises(RSSDError, match="no such file"):
        Store.open(path, create=False)
    assert not path.exists()


def test_store_readonly_refuses_plain_sqlite_without_rssd_tables(tmp_path):
    path = tmp_path / "plain.db"
    sqlite3.connect(path).execute("CREATE TABLE t(x)").connection.close()
    before = path.read_bytes()
    with pytest.raises(RSSDError, match="not an RSSD"):
        Store.open(path, readonly=True)
    assert path.read_bytes() == before


def test_blobs_read_back_in_chunks(tmp_path, monkeypatch):
    from rssd_magic import store as store_mod

    monkeypatch.setattr(store_mod, "READ_CHUNK", 1000)
    store = Store.open(tmp_path / "b.db", {"test": True})
    data = np.random.default_rng(0).bytes(10_500)
    digest = buffer_digest(data)
    key = cell_key("x", "s")
    running = store.claim(key, "x", {}).running
    store.finish_run(running, "EXECUTED", {"names": {}}, "completed", [(digest, data)])
    assert bytes(store.get_blob(digest)) == data
    store.close()


def test_plan_decides_replay_rerun_and_why(tmp_path):
    import time as _time

    from rssd_magic.plan import NothingToReplay, plan

    store = Store.open(tmp_path / "p.db", {"test": True})
    key = cell_key("x = 1", "s")
    with pytest.raises(NothingToReplay, match="never run"):
        plan(store, key, None, replay_only=True)
    assert plan(store, key, None).first_reason == "first run"
    running = store.claim(key, "x = 1", {}).running
    done = store.finish_run(running, "EXECUTED", {"names": {}}, "completed")
    assert plan(store, key, done).replay == done
    forced = plan(store, key, done, force=True)
    assert forced.replay is None and forced.rerun_of == done.state_id and forced.rerun_reason.startswith("forced")
    stale = plan(store, key, done, ttl_s=60, ttl_text="1m", now=_time.time() + 3600)
    assert stale.replay is None and stale.rerun_reason.startswith("stale") and "--ttl 1m" in stale.note
    assert plan(store, key, done, ttl_s=60, ttl_text="1m", now=_time.time()).replay == done
    store.close()
