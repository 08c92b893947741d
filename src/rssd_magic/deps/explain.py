"""Inputs as keys and as words: :func:`inputs_digest` folds the inputs dict
of a run (see :mod:`.declared`) into one string for ``cell_key(inputs=...)``;
:func:`explain` turns two of them into the one line shown when a cell runs
again although an earlier result exists (``input factor changed (2 → 3)``).

The digest hashes :func:`rssd_magic.records.canonical.canonical_bytes`, the form
every digest of the project uses.  While deps was one module (up to commit
8f30161) it had its own ``json.dumps`` with ``ensure_ascii=True``.  The text,
and so the key, is byte-identical for inputs whose names, paths, values and
type names are ASCII (control characters included: both forms escape them),
except U+007F (DEL), which only the old form escaped.  Anything else
(``größe = …``, ``data/café.csv``, DEL) is now written as UTF-8 instead of a
``\\u`` escape: such a cell's key changes once, and it runs once more after
the upgrade.  It cannot alias an old key: an old text was printable ASCII,
a new one with such a character is not.  ``FINGERPRINT_VERSION`` stays, so
the ASCII keys stay.
"""

from __future__ import annotations

import functools
import glob
import hashlib
from typing import Any, Mapping

from ..records.canonical import canonical_bytes
from .fingerprint import FINGERPRINT_VERSION


def _identity(entry: Any) -> Any:
    """What of an entry decides the key: a name by its digest, else by its
    type (``"?"`` + hint); a file, env var or package by its recorded value."""
    if isinstance(entry, Mapping):
        return entry.get("digest") or "?" + str(entry.get("hint", ""))
    return entry


def inputs_digest(inputs: Mapping[str, Mapping[str, Any]] | None) -> str:
    """Canonical digest of an inputs dict, for ``cell_key(inputs=...)``.

    Hints and rendered values are left out (only content decides; a value
    that can't be fingerprinted counts by its type name, which is then its
    hint), and no inputs at all give ``""``, so a cell that reads nothing
    keeps the key it had before dependency tracking existed.
    """
    if not inputs or not any(inputs.values()):
        return ""
    identities = {
        section: {k: _identity(v) for k, v in entries.items()}
        for section, entries in inputs.items()
        if entries
    }
    return hashlib.sha256(canonical_bytes([FINGERPRINT_VERSION, identities])).hexdigest()


def _name_change(name: str, old: Mapping | None, new: Mapping | None) -> str | None:
    # old / new: the name's entry in each run, None when that run did not read it.
    if old is None and new is None:
        return None
    if new is None:
        return f"input {name} removed"
    if new.get("digest") is None:
        if old is not None and old.get("digest") is None and old.get("hint") == new.get("hint"):
            return None
        return f"input {name} can't be fingerprinted ({new.get('reason') or new.get('hint')})"
    short = str(new["digest"])[:6]
    if old is None:
        return f"new input {name} ({short}, {new.get('hint', '')})"
    if old.get("digest") == new["digest"]:
        return None
    if old.get("digest") is None:
        return f"input {name} changed (unfingerprintable → {short}, {new.get('hint', '')})"
    if old.get("value") is not None and new.get("value") is not None:
        return f"input {name} changed ({old['value']} → {new['value']})"
    old_hint, new_hint = old.get("hint", ""), new.get("hint", "")
    hint = new_hint if old_hint == new_hint else f"{old_hint} → {new_hint}"
    return f"input {name} changed ({str(old['digest'])[:6]} → {short}, {hint})"


#: Stands for a file pattern one of the runs did not declare.
_ABSENT = object()


def _file_change(path: str, old: Any, new: Any) -> str | None:
    # Unlike the other sections, a recorded None (no match) is not the same
    # as not declared: a new pattern that matches nothing is worth saying.
    if old == new:
        return None
    if new is _ABSENT:
        return None if old is None else f"file {path} removed"
    if new is None:
        return f"no file matches {path}" if glob.has_magic(path) else f"file {path} missing"
    if isinstance(new, str) and new.startswith("error:"):
        return f"file {path} unreadable ({new[6:]})"
    if old is None or old is _ABSENT:
        return f"new file {path}"
    return f"file {path} changed"


def _declared_change(wording: tuple[str, str, str], key: str, old: Any, new: Any) -> str | None:
    """An env var or a package: *wording* for None (unset, not installed) to
    a value, for a value to None, and for one value to another."""
    if old == new:
        return None
    added, removed, changed = wording
    template = added if old is None else removed if new is None else changed
    return template.format(key=key, old=old, new=new)


_ENV_WORDING = ("env {key} set", "env {key} unset", "env {key} changed")
_PACKAGE_WORDING = (
    "package {key} {new} installed",
    "package {key} {old} uninstalled",
    "package {key} {old} → {new}",
)

#: What explain() reports, in order: the section, how to word a change of one
#: of its keys, and what stands for a key one run did not record.
_CHANGES = (
    ("names", _name_change, None),
    ("files", _file_change, _ABSENT),
    ("env", functools.partial(_declared_change, _ENV_WORDING), None),
    ("packages", functools.partial(_declared_change, _PACKAGE_WORDING), None),
)

#: explain() names at most this many changes, then says how many more.
MAX_EXPLAINED = 5


def explain(old: Mapping[str, Mapping] | None, new: Mapping[str, Mapping] | None) -> str:
    """One line saying how *new* inputs differ from *old* ("" if they don't).

    e.g. ``input df changed (3f2a9c → 81b0e4, 1000×3 DataFrame); env TOKEN set``.
    """
    old, new = old or {}, new or {}
    changes: list[str] = []
    for section, change, absent in _CHANGES:
        o, n = old.get(section) or {}, new.get(section) or {}
        for k in [*n, *(k for k in o if k not in n)]:
            if said := change(k, o.get(k, absent), n.get(k, absent)):
                changes.append(said)
    if len(changes) > MAX_EXPLAINED:
        more = len(changes) - MAX_EXPLAINED
        changes = changes[:MAX_EXPLAINED] + [f"and {more} more"]
    return "; ".join(changes)
