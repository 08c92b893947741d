"""``%stateful list|show|forget|stats|gc|trust`` in a notebook (IPython
adapter): parse the command line, ask report.py, show the answer as text in
a terminal and as HTML in a notebook.  Nothing here creates a store: a typo
in ``--db`` is an error, not a new file."""

from __future__ import annotations

import argparse
import difflib
import html
import shlex
from functools import lru_cache
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser

from . import render, report
from .backends import redact
from .backends.base import StoreError
from .keyfiles import KeyProblem
from .canonical import fmt_bytes, plural

#: The commands, as the line magic's help lists them (said when none is given).
USAGE = """\
%stateful list               the cells: key, name, scope, state, source, when, where, hits
%stateful show KEY           source, every transition, what a replay shows
%stateful forget KEY|--all   run again next time (EXECUTED -> FORGOTTEN)
%stateful stats              cells, hits, time saved, storage
%stateful gc [--dry-run]     delete blobs no current result refers to
%stateful verify [--repair]  check the bytes of every blob current records name
%stateful trust [KEY] [--signer NAME|FINGERPRINT] [--yes]
                             what records would do once trusted; --yes signs them with your key"""


def run_command(magics: Any, line: str) -> Any:
    """One ``%stateful`` line, run against the store its ``--db`` names."""
    argv = split("%stateful", line)
    if not [a for a in argv if not a.startswith("-")]:
        raise UsageError(f"%stateful needs a command:\n{USAGE}")
    args = parse(_line_parser(), "%stateful", argv)
    # What a command reads, counts or collects includes the records still
    # being written in the background.
    magics.runner.settle()
    try:
        # Never creates a store: a typo in --db is an error, not a new file.
        backend = magics.runner.backend(args.db, create=False)
        try:
            backend.flush_hits(patience_s=1.0)  # this kernel's counts, unless a neighbour holds the lock
        except StoreError:
            pass
        if args.command == "trust":
            return _trust(magics, backend, args, line)
        return _line_command(magics, backend, args)
    except (StoreError, report.ReportError, KeyProblem) as exc:
        raise UsageError(f"%stateful {args.command}: {exc}") from None


def _line_command(magics: Any, backend: Any, args: argparse.Namespace) -> Any:
    if args.command == "list":
        return _Rendered(render.cells_text, render.cells_html, report.list_cells(backend))
    if args.command == "show":
        key = report.resolve_key(backend, args.key, prog="%stateful")["key"]
        return _Rendered(render.cell_text, None, report.show_cell(backend, key))
    if args.command == "forget":
        if bool(args.key) == args.all:
            raise UsageError("%stateful forget: give KEY or --all")
        key = None if args.all else report.resolve_key(backend, args.key, prog="%stateful")["key"]
        done = report.forget_all(backend) if args.all else report.forget(backend, key)
        print(f"forgot {plural(len(done), 'cell')}: " + ", ".join(d["key"][:12] for d in done) if done else "nothing to forget")
        return None
    if args.command == "stats":
        return _Rendered(lambda s: render.stats_text(s, prog="%stateful"), None, report.stats(backend))
    if args.command == "gc":
        r = report.gc(backend, dry_run=args.dry_run)
        verb = "would free" if args.dry_run else "freed"
        print(f"{verb} {plural(r['deleted'], 'blob')}, {fmt_bytes(r['bytes_freed'])}; "
              f"kept {plural(r['kept'], 'blob')}, {fmt_bytes(r['kept_bytes'])}")  # fmt: skip
        return None
    if args.command == "verify":
        r = report.verify(backend, repair=args.repair)
        print(render.verify_text(r, prog="%stateful"))
        return None
    raise AssertionError(args.command)  # pragma: no cover - the parser knows no other


def _trust(magics: Any, backend: Any, args: argparse.Namespace, line: str) -> Any:
    """``%stateful trust``: without ``--yes``, the preview of what would be
    signed and what it would make active (nothing is written, nothing
    blocks); with it, the signing."""
    if not args.yes:
        preview = report.trust_preview(backend, magics.signer, args.key, args.signer)
        ready = [r for r in preview["records"] if r["refused"] is None]
        hint = f"to sign {plural(len(ready), 'record')} with your key: %stateful {line.strip()} --yes" if ready else ""

        def text(p: dict) -> str:
            return render.trust_preview_text(p) + (f"\n{hint}" if hint else "")

        def html_(p: dict) -> str:
            return render.trust_preview_html(p) + (f"<p><code>{html.escape(hint)}</code></p>" if hint else "")

        return _Rendered(text, html_, preview)
    r = report.trust(backend, magics.signer, args.key, args.signer)
    print(
        f"signed {plural(r['signed'], 'record')} in {plural(r['cells'], 'cell')} of {redact(backend.location)} "
        f"with your key {r['key_id']}"
    )
    for bad in r["refused"]:
        magics.note(f"[stateful] not trusted: {bad['key'][:12]} {bad['name']}: {bad['why']}")
    return None


class _Rendered:
    """A report value that shows as text in a terminal and HTML in a notebook."""

    def __init__(self, text, html_, value):
        self.value, self._text, self._html = value, text, html_

    def __repr__(self) -> str:
        return self._text(self.value)

    def _repr_html_(self) -> str | None:
        return self._html(self.value) if self._html else None


def parse(parser: argparse.ArgumentParser, prog: str, argv: list[str]) -> argparse.Namespace:
    """*argv* parsed by *parser*, or a UsageError that names *prog* and,
    for a mistyped option or command, the one that was probably meant."""
    try:
        return parser.parse_args(argv)
    except UsageError as exc:
        message = str(exc)
        hint = _did_you_mean(parser, message)
        raise UsageError(f"{prog}: {message}" + (f"; did you mean {hint}?" if hint else "")) from None


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str | None:
    options: list[str] = []
    commands: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse keeps them here, documented for subclasses
        options += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            commands += list(action.choices)
            for sub in action.choices.values():
                options += [o for a in sub._actions for o in a.option_strings if o.startswith("--")]  # noqa: SLF001
    if "unrecognized arguments:" in message:
        wrong = [t for t in message.split("unrecognized arguments:", 1)[1].split() if t.startswith("-")]
        pool = options
    elif "invalid choice:" in message:
        wrong, pool = [message.split("invalid choice:", 1)[1].split("'")[1]], commands
    else:
        return None
    for token in wrong:
        close = difflib.get_close_matches(token.split("=")[0], sorted(set(pool)), n=1, cutoff=0.6)
        if close:
            return close[0]
    return None


def split(prog: str, line: str) -> list[str]:
    """The option line split as a shell would (``--db "my dir/x.db"``)."""
    try:
        return shlex.split(line)
    except ValueError as exc:  # an unclosed quote
        raise UsageError(f"{prog}: {exc} in the option line: {line.strip()}") from None


@lru_cache(maxsize=1)
def _line_parser() -> MagicArgumentParser:
    parser = MagicArgumentParser(prog="%stateful", add_help=False)
    parser.add_argument("--db", metavar="PATH")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=MagicArgumentParser)
    for name in ("list", "stats"):
        sub.add_parser(name).add_argument("--db", metavar="PATH", default=argparse.SUPPRESS)
    gc = sub.add_parser("gc")
    gc.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS)
    gc.add_argument("--dry-run", action="store_true")
    verify = sub.add_parser("verify")
    verify.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS)
    verify.add_argument("--repair", action="store_true")
    trust = sub.add_parser("trust")
    trust.add_argument("key", nargs="?")
    trust.add_argument("--signer", metavar="NAME|FINGERPRINT")
    trust.add_argument("--yes", action="store_true")
    trust.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS)
    show = sub.add_parser("show")
    show.add_argument("key")
    forget = sub.add_parser("forget")
    forget.add_argument("key", nargs="?")
    forget.add_argument("--all", action="store_true")
    for p in (show, forget):
        p.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS)
    return parser
