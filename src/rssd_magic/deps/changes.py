"""Names a cell changed in place: values it read, did not rebind, and left
with other content, so that a replay can restore them like bound names.

``df["b"] = df["a"] * 2`` or ``results.append(x)`` binds no name: neither the
code's binds nor a namespace diff by identity sees them, and a replay that
restores only bound names would leave ``df`` without its column.  Content
does see them.  The names a cell reads are fingerprinted before it runs (for
its key); fingerprinting the same names again after the run says which
changed, at the cost of a second digest of each (xxh3 over the buffers: a
few milliseconds for a 200 MB array), paid on a first run only.

Values that can't be fingerprinted (a connection, a client holding a lock)
can't be compared: :func:`changes` names those the code visibly changes
(stores into an attribute or item, or calls a method as a statement of its
own), so the run can say they are not restored.

Nothing here imports IPython.
"""

from __future__ import annotations

import ast
import functools
import types
from typing import Any, Iterable, Mapping

from .analysis import is_shell_name
from .fingerprint import fingerprint_names

#: Values that can't change in place: never fingerprinted a second time.
_IMMUTABLE = frozenset({int, float, complex, bool, str, bytes, type(None), range, frozenset})
#: Code and modules: their fingerprint folds in the globals a function reads,
#: which the cell may rebind; that is not a change of the value itself.
_CODE = (
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    type,
    functools.partial,
)


def may_change(value: Any) -> bool:
    """False for values a cell can't change in place (numbers, strings,
    modules, functions, classes): they are not fingerprinted again."""
    return type(value) not in _IMMUTABLE and not isinstance(value, _CODE)


def before(namespace: Mapping[str, Any], reads: Iterable[str], known: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """The fingerprint entries (``fingerprint_names``' form) of the names
    *reads* that may change in place, taken before the run; entries in
    *known* (the key's inputs) are reused, not computed again."""
    known = known or {}
    wanted = [n for n in reads if n in namespace and not is_shell_name(n) and may_change(namespace[n])]
    missing = [n for n in wanted if n not in known]
    fresh = fingerprint_names(namespace, missing) if missing else {}
    return {n: known[n] if n in known else fresh[n] for n in wanted if n in known or n in fresh}


def changes(
    namespace: Mapping[str, Any], taken: Mapping[str, dict], python: str, recorded: Iterable[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """``(changed, unknown)`` after a run, for the names fingerprinted in
    *taken* before it.

    *changed*: names whose content differs (or that can't be fingerprinted
    any more: something was put into them), in the order read.  *unknown*:
    ``{name: reason}`` for names that could not be fingerprinted before and
    that the code visibly changes.  Names in *recorded* (bound by the run)
    are skipped: they are recorded anyway.
    """
    skip = set(recorded)
    names = [n for n in taken if n not in skip and n in namespace]
    if not names:
        return [], {}
    after = fingerprint_names(namespace, [n for n in names if taken[n].get("digest") is not None])
    changed = [n for n in names if n in after and after[n].get("digest") != taken[n]["digest"]]
    blind = [n for n in names if taken[n].get("digest") is None]
    unknown: dict[str, str] = {}
    if blind:
        touched = changed_by_code(python)
        unknown = {n: str(taken[n].get("reason") or taken[n].get("hint") or "") for n in blind if n in touched}
    return changed, unknown


@functools.lru_cache(maxsize=256)
def changed_by_code(python: str) -> frozenset[str]:
    """Names whose value the code visibly changes: ``x.a = …``, ``x[i] = …``,
    ``del x[i]``, ``x[i] += …``, or ``x.m(…)`` as a statement of its own
    (a call whose result is dropped is made for what it does).  Only to
    word a warning about values that can't be fingerprinted; scoping is
    not resolved (a local ``x`` in a function counts too)."""
    try:
        tree = ast.parse(python)
    except (SyntaxError, ValueError, RecursionError):
        return frozenset()
    found: set[str] = set()
    for node in ast.walk(tree):
        target = None
        if isinstance(node, (ast.Attribute, ast.Subscript)) and not isinstance(node.ctx, ast.Load):
            target = node.value
        elif isinstance(node, ast.Expr):
            call = node.value.value if isinstance(node.value, ast.Await) else node.value
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
                target = call.func.value
        while isinstance(target, (ast.Attribute, ast.Subscript, ast.Call)):
            target = target.func if isinstance(target, ast.Call) else target.value
        if isinstance(target, ast.Name):
            found.add(target.id)
    return frozenset(found)
