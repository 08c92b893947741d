"""Cell identity: normalized code, keys and the URI an RSSD entry is filed under.

A cell is identified either by its *code* (so that re-running an unchanged
cell is recognised, while editing comments, blank lines or spacing is not a
change) or by a *name* the user gives (surveilr's ``_once_`` migrations: the
name, not the code, says whether it ran).  Either way the key is scoped: by
default one scope for the whole store, so the same cell on the same inputs
replays in any notebook and from any client; ``--scope`` keeps groups of
cells apart.

Nothing here imports IPython: the key of a cell must be computable (and
testable) without a shell.
"""

from __future__ import annotations

import hashlib
import io
import tokenize
from dataclasses import dataclass
from functools import cached_property, lru_cache
from urllib.parse import quote

#: Bumped whenever normalization changes, so old keys can never alias new ones.
KEY_VERSION = "rssd_magic.key.v1"

#: Every entry we write has an ``ingest_src`` starting with this; it is how our
#: rows are told apart from the rest of a shared RSSD.
URI_PREFIX = "rssd-magic:"


def src_range(prefix: str) -> tuple[str, str]:
    """``[lo, hi)`` covering every string that starts with *prefix*: a range,
    unlike LIKE, is answered by the ingest_src index."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


#: ``[lo, hi)`` of the ``ingest_src`` of every cell of ours.
OURS = src_range(URI_PREFIX)

_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER}


def normalize_code(code: str) -> str:
    """Return *code* with comments, blank lines and spacing folded away.

    Python is tokenized so that ``x=1`` and ``x = 1  # one`` normalize alike,
    while a change inside a string literal still counts.  Indentation is kept
    as structure (INDENT/DEDENT markers), not as a number of spaces.  Cells
    that don't tokenize (IPython syntax such as ``!ls`` or ``%time`` lines
    can) fall back to a line-wise form: trailing spaces and comment-only or
    blank lines dropped.
    """
    try:
        parts: list[str] = []
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in _SKIP:
                continue
            if tok.type == tokenize.INDENT:
                parts.append("<INDENT>")
            elif tok.type == tokenize.DEDENT:
                parts.append("<DEDENT>")
            elif tok.type == tokenize.NEWLINE:
                parts.append("\n")
            else:
                parts.append(tok.string)
        return " ".join(parts).replace(" \n ", "\n").strip()
    except (tokenize.TokenError, IndentationError, SyntaxError):
        lines = (line.rstrip() for line in code.splitlines())
        return "\n".join(
            line for line in lines if line.strip() and not line.lstrip().startswith("#")
        )


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        # Length-prefix each part so ("ab", "c") and ("a", "bc") differ.
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def code_hash(code: str, extra: str = "", strict: bool = False) -> str:
    """Hash of the code (what says "the code changed"): normalized, or with
    *strict* the raw text, where any edit counts."""
    if strict:
        return _digest(KEY_VERSION, "raw", code, extra)
    return _digest(KEY_VERSION, "code", normalize_code(code), extra)


@dataclass(frozen=True)
class CellKey:
    """Where a cell's state is filed.

    ``digest`` is the 64-hex key users see (a prefix is enough for the CLI).
    ``base`` is the key of the code alone; cells whose inputs are part of the
    key (see deps/) file each set of inputs under ``base~inputs``, so the
    runs of one code on other inputs are one index range away (to say why a
    cell ran again).
    """

    scope: str
    kind: str  # "code" or "name"
    ident: str  # the code hash, or the user's name
    digest: str
    code_hash: str
    base: str
    inputs: str = ""

    @cached_property  # a key is looked up on every replay: quote it once
    def base_src(self) -> str:
        """``ingest_src`` of the code alone (the prefix of every variant)."""
        return f"{URI_PREFIX}{quote(self.scope, safe='/.-_~')}#{self.base}"

    @cached_property
    def ingest_src(self) -> str:
        """The URI stored in ``orchestration_session_entry``."""
        return self.base_src + (f"~{self.inputs[:32]}" if self.inputs else "")

    @property
    def name(self) -> str | None:
        return self.ident if self.kind == "name" else None


@lru_cache(maxsize=1024)
def cell_key(
    code: str,
    scope: str,
    name: str | None = None,
    extra: str = "",
    inputs: str = "",
    strict: bool = False,
) -> CellKey:
    """Compute the key of a cell.

    *extra* is folded into code keys: it carries whatever else decides what
    the code does (for SQL cells, the target database and parameters).
    *inputs* is the digest of the values the cell reads (deps/): the same
    code on other inputs is another key, filed next to it.  Named cells
    ignore both: a name runs once, whatever changed.  Memoized: a notebook
    re-runs the same few cells, and tokenizing them is most of a replay's
    own cost.
    """
    chash = code_hash(code, extra, strict)
    if name is not None:
        digest = _digest(KEY_VERSION, scope, "name", name)
        return CellKey(scope, "name", name, digest, chash, digest)
    base = _digest(KEY_VERSION, scope, "code", chash)
    digest = _digest(KEY_VERSION, base, "inputs", inputs) if inputs else base
    return CellKey(scope, "code", chash, digest, chash, base, inputs)
