"""Declared inputs: the files, environment variables and packages a cell
names (``--deps-file``, ``--deps-env``, ``--deps-package``), and
:func:`collect_inputs`, which puts them beside the fingerprints of the names
the cell reads to make the inputs dict of a run::

    {"names":    {"df": {"digest": "3f2a…", "hint": "1000×3 DataFrame"}, …},
     "files":    {"data/x.csv": "81b0…", "data/*.json": None},   # None: no match
     "env":      {"API_URL": "scrypt:<digest of the value>", "DEBUG": None},
     "packages": {"pandas": "2.2.1", "missing-pkg": None}}

It is stored in the RSSD beside the run, so a later run can say what changed.
"""

from __future__ import annotations

import glob
import hashlib
import os
from functools import lru_cache
from typing import Any, Iterable, Mapping

from .fingerprint import fingerprint_names
from .versions import file_digest, installed_version


def _expand(pattern: str) -> list[str]:
    path = os.path.expanduser(pattern)
    matches = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
    files: list[str] = []
    for match in matches:
        if os.path.isdir(match):
            for root, dirs, names in os.walk(match):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names)]
        elif os.path.exists(match):
            files.append(match)
    return files


def file_deps(patterns: Iterable[str]) -> dict[str, str | None]:
    """``{path: content digest}`` for the files *patterns* match.

    Globs (``**`` too) are expanded, directories stand for every file below
    them.  A pattern that matches no file is recorded as ``{pattern: None}``,
    so "the file appeared" is a change too; an unreadable file as
    ``"error:<exception type>"``.
    """
    out: dict[str, str | None] = {}
    for pattern in patterns:
        files = _expand(pattern)
        if not files:
            out[pattern] = None
        for path in files:
            try:
                out[path] = file_digest(path)
            except OSError as exc:
                out[path] = f"error:{type(exc).__name__}"
    return out


#: What stretches an environment variable's value before it is stored:
#: scrypt (~50 ms and 16 MB per try) under a fixed salt and the variable's
#: name.  Fixed, so equal values give equal digests on every machine (a
#: cell keyed on them replays on a teammate's); slow, so whoever reads the
#: store can't test guesses at a token at the speed of SHA-256.
ENV_KDF = {"n": 2**14, "r": 8, "p": 1}
ENV_SALT = b"rssd_magic --deps-env v1\0"


@lru_cache(maxsize=256)
def _env_digest(name: str, value: str) -> str:
    """One variable's stored digest, computed once per process and value."""
    data = value.encode("utf-8", "surrogateescape")
    return "scrypt:" + hashlib.scrypt(data, salt=ENV_SALT + name.encode("utf-8", "surrogateescape"), dklen=32, **ENV_KDF).hex()


def env_deps(names: Iterable[str]) -> dict[str, str | None]:
    """``{VAR: digest of its value or None if unset}``.

    Values are stored only as slow, salted digests (:data:`ENV_KDF`):
    environment variables hold tokens and passwords, and the inputs dict is
    written to a shared store.  A notebook pays for each value once.
    """
    out: dict[str, str | None] = {}
    for name in names:
        value = os.environ.get(name)
        out[name] = None if value is None else _env_digest(name, value)
    return out


def package_deps(names: Iterable[str]) -> dict[str, str | None]:
    """``{name: installed version or None}``; import names (``sklearn``) work too."""
    return {name: installed_version(name) for name in names}


def collect_inputs(
    namespace: Mapping[str, Any],
    names: Iterable[str],
    files: Iterable[str] = (),
    env: Iterable[str] = (),
    packages: Iterable[str] = (),
) -> dict[str, dict]:
    """The inputs dict of a run (see the module docstring); empty sections omitted."""
    sections = {
        "names": fingerprint_names(namespace, names),
        "files": file_deps(files),
        "env": env_deps(env),
        "packages": package_deps(packages),
    }
    return {k: v for k, v in sections.items() if v}
