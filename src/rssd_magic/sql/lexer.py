"""Reading SQL text: tokens, statements, the normalized form that keys
hash, and the ``$name``/``:name`` parameters a cell uses.

One pass of :func:`_tokens` over a cell is shared by everything else in the
package (:func:`parse_statements` is memoized), so a cell's body is lexed once
although it is normalized, bound, keyed and run.

The tokenizer knows just enough SQL to never split or normalize inside
something that is not ours to touch: string literals (``'…'``, ``E'…'``,
``$tag$…$tag$``), quoted identifiers and comments.  It does not parse.

Parameters are written ``$name`` or ``:name``.  A ``:name`` only counts as a
parameter where an operand can start (after a space, an operator, ``(`` or
``,``): ``x::INT``, ``arr[1:n]``, ``{'k':v}``, ``f(a := 1)`` and ``lambda x:
x`` are DuckDB syntax, not parameters.  Positional ``?`` and ``$1`` are
tokens of their own, so binding can refuse them by name.
"""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import chain
from typing import Iterator, NamedTuple


# The package's usage error lives in its lowest module, so every other one
# (target, key, run) can raise it without importing another's idea.
class SQLUsageError(ValueError):
    """The cell can't be run as written (missing parameter, bad target, …).

    Raised before anything is executed.
    """


class Token(NamedTuple):
    kind: str  # word, number, string, qident, param, positional, op, punct
    text: str  # for params: the name only
    start: int
    end: int
    gap: bool  # whitespace or a comment came before it


_IDENT_START = re.compile(r"[^\W\d]", re.UNICODE)
_IDENT = re.compile(r"[^\W\d][\w$]*", re.UNICODE)
_PARAM_NAME = re.compile(r"[^\W\d]\w*", re.UNICODE)
_NUMBER = re.compile(
    r"(?:0[xX][0-9a-fA-F_]+|\d[\d_]*(?:\.[\d_]*)?(?:[eE][+-]?\d+)?|\.\d[\d_]*(?:[eE][+-]?\d+)?)\w*"
)
_DOLLAR_TAG = re.compile(r"\$(?:[^\W\d]\w*)?\$", re.UNICODE)
_DOLLAR_POSITIONAL = re.compile(r"\$\d+")
_QMARK_POSITIONAL = re.compile(r"\?\d*")
_PUNCT = set(",;()[]{}")
# A ``:`` right after one of these closes an operand (``a:b``, ``1:n``,
# ``'k':v``, ``x)::t``) rather than starting a ``:name`` parameter.
_NOT_BEFORE_PARAM = set("'\"`)]}:$.")


def _quoted_end(text: str, i: int, backslash: bool) -> int:
    """End of the string or quoted identifier opening at ``text[i]``: a
    doubled quote is an escaped one, and with *backslash* so is ``\\x``."""
    quote, n = text[i], len(text)
    i += 1
    while i < n:
        c = text[i]
        if backslash and c == "\\":
            i += 2
        elif c != quote:
            i += 1
        elif i + 1 < n and text[i + 1] == quote:
            i += 2
        else:
            return i + 1
    return n


_DIGITS = frozenset("0123456789")


def _tokens(text: str) -> Iterator[Token]:
    """Yield the tokens of *text*; comments and whitespace only set ``gap``.

    Unterminated strings and comments run to the end of the text (the engine
    reports the error; we just must not split inside them).  ``/* */`` does
    not nest (SQLite's rule).
    """
    i, n = 0, len(text)
    gap = False
    prev: Token | None = None
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            gap = True
            continue
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            gap = True
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            gap = True
            continue
        start = i
        if ch in "'\"`":
            # E'…' (DuckDB/PostgreSQL escape strings) take backslash escapes.
            backslash = (
                ch == "'" and prev is not None and not gap and prev.end == start
                and prev.kind == "word" and prev.text in ("E", "e")
            )
            i = _quoted_end(text, i, backslash)
            tok = Token("string" if ch == "'" else "qident", text[start:i], start, i, gap)
        elif ch == "$":
            m = _DOLLAR_TAG.match(text, i)
            if m:  # $$…$$ or $tag$…$tag$: a DuckDB dollar-quoted string
                j = text.find(m.group(), m.end())
                i = n if j < 0 else j + len(m.group())
                tok = Token("string", text[start:i], start, i, gap)
            else:
                m = _PARAM_NAME.match(text, i + 1)
                if m:
                    i = m.end()
                    tok = Token("param", m.group(), start, i, gap)
                elif m := _DOLLAR_POSITIONAL.match(text, i):
                    i = m.end()
                    tok = Token("positional", m.group(), start, i, gap)
                else:
                    i += 1
                    tok = Token("op", ch, start, i, gap)
        elif ch == ":":
            m = _PARAM_NAME.match(text, i + 1)
            before = text[i - 1] if i else " "
            if m and not (before in _NOT_BEFORE_PARAM or before == "_" or before.isalnum()):
                i = m.end()
                tok = Token("param", m.group(), start, i, gap)
            else:
                i += 1
                tok = Token("op", ch, start, i, gap)
        elif ch == "?":
            m = _QMARK_POSITIONAL.match(text, i)
            i = m.end()
            tok = Token("positional", m.group(), start, i, gap)
        # ASCII digits only: str.isdigit() is also true for "²", which the
        # number pattern doesn't match.
        elif ch in _DIGITS or (ch == "." and i + 1 < n and text[i + 1] in _DIGITS):
            m = _NUMBER.match(text, i)
            i = m.end()
            tok = Token("number", m.group(), start, i, gap)
        elif _IDENT_START.match(ch):
            m = _IDENT.match(text, i)
            i = m.end()
            tok = Token("word", m.group(), start, i, gap)
        else:
            i += 1
            tok = Token("punct" if ch in _PUNCT else "op", ch, start, i, gap)
        yield tok
        prev = tok
        gap = False


#: One statement's tokens, without its ``;``.
Statement = tuple[Token, ...]


@lru_cache(maxsize=32)
def parse_statements(text: str) -> tuple[Statement, ...]:
    """Token lists of the statements in *text* (empty statements dropped).

    ``;`` ends a statement except inside a SQLite trigger body
    (``CREATE TRIGGER … BEGIN …; …; END``), where ``CASE … END`` nests too.
    Memoized: a cell's body is normalized, bound, keyed and run, and each of
    these starts from its tokens.
    """
    out: list[Statement] = []
    cur: list[Token] = []
    depth = 0  # BEGIN/CASE … END nesting inside a trigger
    trigger = False
    for tok in _tokens(text):
        if tok.kind == "punct" and tok.text == ";" and depth == 0:
            if cur:
                out.append(tuple(cur))
            cur, trigger = [], False
            continue
        cur.append(tok)
        if tok.kind != "word":
            continue
        word = tok.text.upper()
        if len(cur) <= 6 and word == "TRIGGER" and cur[0].text.upper() == "CREATE":
            trigger = True
        elif trigger and word in ("BEGIN", "CASE"):
            depth += 1
        elif trigger and word == "END" and depth:
            depth -= 1
    if cur:
        out.append(tuple(cur))
    return tuple(out)


def statement_source(text: str, toks: Statement) -> str:
    """The statement *toks* of *text* as written."""
    return text[toks[0].start : toks[-1].end]


def split_statements(text: str) -> list[str]:
    """The statements of *text*, each as written (interior comments kept,
    surrounding ones and the ``;`` dropped)."""
    return [statement_source(text, toks) for toks in parse_statements(text)]


def first_word(toks: Statement) -> str:
    """The statement's leading keyword, upper-cased ("" if it starts otherwise)."""
    return toks[0].text.upper() if toks[0].kind == "word" else ""


_WORDISH = {"word", "number", "string", "qident", "param", "positional"}


def _side(tok: Token) -> str:
    if tok.kind in _WORDISH:
        return "w"
    return "o" if tok.kind == "op" else "p"


def _normalize_tokens(toks: Statement) -> str:
    parts: list[str] = []
    prev: Token | None = None
    for tok in toks:
        # One space survives where dropping it would join two tokens into
        # something else (``a b``/``ab``, ``'a' 'b'``/``'a''b'``, ``- -``/
        # ``--``); elsewhere ``a = 1`` and ``a=1`` are the same SQL.
        if prev is not None and tok.gap and _side(prev) == _side(tok) != "p":
            parts.append(" ")
        parts.append("$" + tok.text if tok.kind == "param" else tok.text)
        prev = tok
    return "".join(parts)


def normalize_sql(text: str) -> str:
    """*text* with comments, spacing and empty statements folded away.

    String literals, quoted identifiers and letter case are kept exactly;
    ``:name`` parameters are written ``$name`` (they mean the same).
    """
    return ";\n".join(_normalize_tokens(toks) for toks in parse_statements(text))


def placeholders(sql: str) -> list[str]:
    """Names of the ``$name``/``:name`` parameters *sql* uses, in order."""
    seen: dict[str, None] = {}
    for tok in chain.from_iterable(parse_statements(sql)):
        if tok.kind == "param":
            seen.setdefault(tok.text, None)
    return list(seen)

