"""What a cell depends on, so its key can say "this code ran *on these inputs*".

One idea per module, each depending only on the ones before it:

* :mod:`.analysis`: one parse of a cell gives a :class:`CellAnalysis`, the
  module-level names it reads, binds and deletes (memoized by code);
* :mod:`.versions`: what identifies a file, an installed package, a module;
* :mod:`.fingerprint`: content digests of the values a cell reads;
* :mod:`.declared`: declared files, environment variables and packages, and
  :func:`collect_inputs`, the inputs dict of a run;
* :mod:`.explain`: :func:`inputs_digest` for the key, :func:`explain` for the
  one line that says why a cell ran again;
* :mod:`.changes`: which of the names a cell read it changed in place
  (their fingerprints before and after a run).

Nothing here imports IPython, numpy or pandas.  Everything the rest of the
package (and its tests) uses is importable from here.
"""

from __future__ import annotations

from .analysis import (
    UNANALYSABLE,
    CellAnalysis,
    analyse_cell,
    bound_names,
    is_shell_name,
    names_bound,
    read_names,
    snapshot,
)
from . import changes
from .declared import collect_inputs, env_deps, file_deps, package_deps
from .explain import MAX_EXPLAINED, explain, inputs_digest
from .fingerprint import (
    FINGERPRINT_VERSION,
    Fingerprint,
    Unfingerprintable,
    fingerprint,
    fingerprint_names,
    try_fingerprint,
)

__all__ = [
    "FINGERPRINT_VERSION",
    "MAX_EXPLAINED",
    "UNANALYSABLE",
    "CellAnalysis",
    "Fingerprint",
    "Unfingerprintable",
    "analyse_cell",
    "bound_names",
    "changes",
    "collect_inputs",
    "env_deps",
    "explain",
    "file_deps",
    "fingerprint",
    "fingerprint_names",
    "inputs_digest",
    "is_shell_name",
    "names_bound",
    "package_deps",
    "read_names",
    "snapshot",
    "try_fingerprint",
]
