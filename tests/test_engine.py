"""The engine on its own: keys, schema, store, serialization — no shell."""

from __future__ import annotations

import ast
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ulid import ULID

from rssd_magic.records import serialize
from rssd_magic.deps import bound_names
from rssd_magic.records.ids import new_ulid
from rssd_magic.engine.keys import cell_key, normalize_code
from rssd_magic.store.base import ClaimRequest, StoreError
from rssd_magic.backends.sqlite import SqliteBackend
from rssd_magic.backends.sqlite_schema import EXPECTED_COLUMNS
from rssd_magic.engine.claims import current_holder
from rssd_magic.engine.lifecycle import EXECUTED, FAILED, REFUSE, REPLAY, RUN, RUNNING, WAIT, decide
from rssd_magic.records.trust import buffer_digest

SHARED_DDL = Path(__file__).resolve().parents[2] / "shared" / "rssd" / "orchestration.sql"


# Dotted names below rssd_magic: a subpackage is listed itself (its
# __init__) and with each of its modules.
ENGINE = [
    "engine", "engine.runner", "engine.runs", "engine.replaying", "engine.acquire", "engine.claims",
    "engine.lifecycle", "engine.keys", "engine.bindable", "engine.ttl", "engine.ports", "engine.recorder",
    "records", "records.record", "records.outputs", "records.serialize", "records.canonical", "records.ids",
    "records.digests", "records.trust", "records.signing", "records.signers", "records.keyring", "records.keyfiles",
    "output", "output.capture", "output.fdcapture", "output.widgets",
    "manage", "manage.report", "manage.render", "manage.trusting", "manage.sweep",
    "store", "store.base", "store.journal", "store.rows", "store.dialect", "store.tables",
    "store.tally", "store.transfer",
    "store.blobs", "store.blobcache", "store.pending", "store.schema",
    "store.locations", "store.buckets", "store.mounts",
    "backends", "backends.sqlite", "backends.sqlite_blobs", "backends.sqlite_sessions", "backends.sqlite_schema",
    "backends.sqlite_file", "backends.sqlite_conn", "backends.postgres", "backends.postgres_blobs",
    "backends.postgres_conn", "backends.postgres_live", "backends.postgres_schema", "backends.objects",
    "sql", "sql.frames", "sql.key", "sql.lexer", "sql.locks", "sql.run", "sql.target",
    "deps", "deps.analysis", "deps.changes", "deps.declared", "deps.explain", "deps.fingerprint", "deps.versions",
]  # fmt: skip
ADAPTERS = ["adapters", "adapters.magic", "adapters.body", "adapters.commands", "adapters.surfaces",
            "adapters.hooks", "adapters.transform", "cli"]  # fmt: skip
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rssd_magic"


def _modules(package: Path) -> dict[str, Path]:
    """Dotted name (relative to the package, ``""`` for its ``__init__``) →
    file, for every module under *package*, subpackages included."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


#: Functions whose imports are not edges: IPython calls these hooks on the
#: loaded package (``%load_ext rssd_magic``), and they are how the package
#: reaches its adapter; magic.py's ``from . import __version__`` would
#: otherwise close a loop through them.
ENTRY_POINTS = {"": {"load_ipython_extension", "unload_ipython_extension"}}


def import_graph(
    package: Path, name: str = "rssd_magic", entry_points: dict[str, set[str]] = ENTRY_POINTS
) -> dict[str, set[str]]:
    """Module → the modules of the package it imports (``from .x import``,
    ``from . import x``, ``import name.x``), by dotted name relative to
    *package*.  Imports inside functions count too (a lazy import is still
    a dependency), except in the *entry_points* functions.

    ``from .pkg import y`` counts as importing ``pkg.y`` when that is a
    module, else ``pkg`` (y is a name defined there).  Importing ``a.b.c``
    runs ``a`` and ``a.b`` first: their ``__init__`` count as imported too
    (a package's ``__init__`` that imports back closes a loop at run time).
    """
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def resolve(target: str) -> str | None:
        # The longest prefix of *target* that is one of our modules.
        parts = target.split(".") if target else []
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) if ".".join(parts) in modules else None

    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if mod else []
        base = here if is_pkg else here[:-1]  # the package a relative import starts from
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hooks = entry_points.get(mod, set())
        tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name in hooks)]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == name or alias.name.startswith(name + "."):
                        targets.append(alias.name[len(name) + 1 :])
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    start = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    src = ".".join(start + ([node.module] if node.module else []))
                elif node.module and (node.module == name or node.module.startswith(name + ".")):
                    src = node.module[len(name) + 1 :]
                else:
                    continue
                for alias in node.names:
                    sub = f"{src}.{alias.name}" if src else alias.name
                    targets.append(sub if sub in modules else src)
            for target in targets:
                found = resolve(target)
                if found == "" and mod != "":
                    graph[mod].add(found)  # the package itself (``from .. import __version__``)
                parts = found.split(".") if found else []
                for n in range(1, len(parts) + 1):  # the packages on the way, then the module
                    step = ".".join(parts[:n])
                    if step in modules and step != mod and not mod.startswith(step + "."):
                        graph[mod].add(step)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of *graph* as ``[a, b, …, a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_engine_modules_do_not_import_ipython():
    imports = "; ".join(f"import rssd_magic.{m}" for m in ENGINE)
    code = f"import sys; {imports}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('IPython', 'ipykernel')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_module_is_either_engine_or_adapter():
    modules = set(_modules(PACKAGE)) - {"", "__main__"}
    assert modules == set(ENGINE) | set(ADAPTERS), "a new module must be classified here"


def test_no_module_is_over_600_lines_and_the_magic_adapter_is_small():
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in _modules(PACKAGE).items()}
    assert {m: n for m, n in sizes.items() if n > 600} == {}, "one idea per module"
    assert sizes["adapters.magic"] <= 400, "the magic adapter stays thin"


def test_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert graph["engine.runner"] >= {"sql", "deps"}, "the graph must see `from .. import x` and `from ..x import y`"
    assert graph["sql.frames"] >= {"records.serialize"}, "the frame codec registers itself in serialize"


def test_the_cycle_check_sees_cycles(tmp_path):
    pkg = tmp_path / "rssd_magic"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")
    (pkg / "a.py").write_text("def g():\n    import rssd_magic.sub.b\n")
    (pkg / "sub" / "b.py").write_text("from ..c import h\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text("from .sub import f, b\nfrom rssd_magic import c\nimport json\n")
    graph = import_graph(pkg)
    assert graph == {
        "": set(), "a": {"sub", "sub.b"}, "sub": {"sub.b"}, "sub.b": {"c"}, "c": {"a"}, "d": {"sub", "sub.b", "c"},
    }  # fmt: skip
    assert find_cycle(graph) == ["a", "sub", "sub.b", "c", "a"], "importing sub.b runs sub's __init__ first"
    (pkg / "c.py").write_text("import json\n")
    assert find_cycle(import_graph(pkg)) is None
    (pkg / "sub" / "b.py").write_text("def late():\n    from .. import d\n")  # lazy: still a cycle
    cycle = find_cycle(import_graph(pkg))
    assert cycle[0] == cycle[-1] and set(cycle) == {"d", "sub", "sub.b"}


@pytest.mark.skipif(not SHARED_DDL.exists(), reason=f"the team's shared schema {SHARED_DDL} is not beside this checkout (clone the workspace with its shared/ folder to compare the packaged DDL against it)")
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


def test_ulids_are_strictly_increasing_and_read_as_ulids_by_a_ulid_library():
    before = time.time()
    ids = [new_ulid() for _ in range(2000)]
    after = time.time()
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for text in ids[:50] + ids[-50:]:
        parsed = ULID.from_str(text)  # python-ulid, the reference
        assert str(parsed) == text
        assert int(before * 1000) <= parsed.milliseconds <= int(after * 1000) + 1
    # In a new millisecond the 80 random bits are drawn anew (within one
    # they count up from the last: the spec's monotonic mode).
    spaced = []
    for _ in range(10):
        time.sleep(0.002)
        spaced.append(int(ULID.from_str(new_ulid())) & (2**80 - 1))
    assert len({r >> 40 for r in spaced}) == 10


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
    values, missing = serialize.load_names(specs, lambda d: bytearray(store[d]), {}, trusted=True)
    assert values["i"] == 7 and values["s"] == ns["s"] and np.isnan(values["nan"])
    assert (values["arr"] == ns["arr"]).all()
    assert set(missing) == {"g"}

    def blob_gone(digest):
        raise KeyError(digest)

    values, missing = serialize.load_names({"arr": specs["arr"]}, blob_gone, {}, trusted=True)
    assert "missing from the RSSD" in missing["arr"] and not values


def test_store_refuses_missing_file_without_creating_it(tmp_path):
    path = tmp_path / "nope.db"
    with pytest.raises(StoreError, match="no such file"):
        SqliteBackend.open(path, create=False)
    assert not path.exists()


def test_store_readonly_refuses_plain_sqlite_without_rssd_tables(tmp_path):
    path = tmp_path / "plain.db"
    sqlite3.connect(path).execute("CREATE TABLE t(x)").connection.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not an RSSD"):
        SqliteBackend.open(path, readonly=True)
    assert path.read_bytes() == before


def test_blobs_read_back_in_chunks(tmp_path, monkeypatch):
    from rssd_magic.backends import sqlite_blobs as sqlite_backend

    monkeypatch.setattr(sqlite_backend, "READ_CHUNK", 1000)
    store = SqliteBackend.open(tmp_path / "b.db", session_args={"test": True})
    data = np.random.default_rng(0).bytes(10_500)
    digest = buffer_digest(data)
    ask = ClaimRequest(cell_key("x", "s"), "x", {}, current_holder(store.session_id), 60.0)
    mine = store.claim(ask)
    store.finish(mine.running, mine.claim.token, "EXECUTED", '{"names":{}}', "completed", [(digest, data)])
    assert bytes(store.blobs.get(digest)) == data
    store.close()


@pytest.mark.parametrize(
    "latest, rerun, replay_only, action, reason",
    [
        (None, None, False, RUN, "first run"),
        (None, None, True, REFUSE, ""),
        (EXECUTED, None, False, REPLAY, ""),
        (EXECUTED, None, True, REPLAY, ""),
        (EXECUTED, "forced (--force)", False, RUN, "forced (--force) after EXECUTED"),
        (EXECUTED, "stale: old", True, REPLAY, ""),
        (RUNNING, None, False, WAIT, ""),
        (RUNNING, None, True, REFUSE, ""),
        (FAILED, None, False, RUN, "retry after FAILED"),
        ("FORGOTTEN", None, False, RUN, "retry after FORGOTTEN"),
        ("ABANDONED", None, True, REFUSE, ""),
    ],
)
def test_decision_table(latest, rerun, replay_only, action, reason):
    decision = decide(latest, rerun=rerun, replay_only=replay_only)
    assert (decision.action, decision.reason) == (action, reason)
