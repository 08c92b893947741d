"""What identifies code and data that live outside the notebook: a file by
its content, an installed distribution by its version, a module by either.

Shared by fingerprints (a module, or a library function, is identified by
the version of the code behind it) and declared inputs (``--deps-file``,
``--deps-package``).  Both are cached: they are asked on every run of a cell.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from importlib import metadata
from typing import Mapping

import xxhash


@functools.lru_cache(maxsize=None)
def _distributions() -> Mapping[str, list[str]]:
    try:
        return metadata.packages_distributions()
    except Exception:  # noqa: BLE001 - broken metadata must not break fingerprints
        return {}


@functools.lru_cache(maxsize=4096)
def dist_version(top: str) -> str | None:
    """Version of the distribution that installs import name *top*
    (``sklearn`` → scikit-learn's), or None; cached for the process, as
    fits a module already imported (its code does not change when a newer
    version is installed under it)."""
    return _version_now(top)


def _version_now(top: str) -> str | None:
    for dist in _distributions().get(top, ()):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def installed_version(name: str) -> str | None:
    """The version installed *now* of distribution or import name *name*
    (``--deps-package``): a ``%pip install`` in the running kernel counts.
    importlib.metadata rereads a folder whose mtime changed; the map from
    import names to distributions is read again when a name is not in it."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    found = _version_now(name)
    if found is None:
        _distributions.cache_clear()
        found = _version_now(name)
    return found


def module_version(module: types.ModuleType) -> str:
    """What identifies the code of *module*.

    An installed package: its version (``__version__`` as loaded, else its
    distribution's).  The standard library: Python's major.minor.  A module
    of the project itself (``helpers.py`` beside the notebook, no
    distribution): the content of its file, so editing it is a change.
    """
    name = getattr(module, "__name__", "") or ""
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return "python-%d.%d" % sys.version_info[:2]
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    version = dist_version(top)
    if version is not None:
        return version
    path = getattr(module, "__file__", None)
    if isinstance(path, str) and os.path.isfile(path):
        return "file:" + file_digest(path)
    return "unknown"


_FILE_CHUNK = 8 << 20
#: absolute path → ((size, mtime, ctime, inode, device), digest): re-running
#: a cell does not re-read an unchanged multi-GB input.  The stamp names the
#: file itself, so a symlink pointed elsewhere is a change without resolving
#: the path (``realpath`` costs several times the ``stat``) on every run.
_file_cache: dict[str, tuple[tuple[int, ...], str]] = {}


def file_digest(path: str) -> str:
    """xxh3-128 of the file's content (hex), read again only when its stat
    stamp changed."""
    st = os.stat(path)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    where = os.path.abspath(path)
    cached = _file_cache.get(where)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with open(path, "rb") as f:
        if st.st_size < _FILE_CHUNK:  # most files: one read, no buffer to zero
            digest = xxhash.xxh3_128_hexdigest(f.read())
        else:
            h = xxhash.xxh3_128()
            buf = bytearray(_FILE_CHUNK)  # reused: far faster than a new chunk per read
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
            digest = h.hexdigest()
    _file_cache[where] = (stamp, digest)
    return digest
