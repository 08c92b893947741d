"""Where a command of commands.py runs, and what differs there: a
terminal (``rssd-magic``) or a notebook (``%stateful``).

How a store is opened (a shell opens it read-only unless the command
writes, and never creates one; a notebook uses the kernel's own store),
where an answer goes (aligned text or ``--json`` on a terminal, a value a
notebook shows — an HTML table), how the person is asked (a prompt on a
terminal; ``--yes`` in a notebook), and what commands are called in a hint
(:attr:`Surface.prog`).  Also the suggestions for a mistyped option or
command, for the commands and for ``%%stateful``'s option line.  Importing
it does not import IPython.
"""

from __future__ import annotations

import argparse
import difflib
import html
import json
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import click

from ..manage import render, report
from ..backends import open_backend
from ..store import buckets
from ..store.base import StoreError
from ..store.journal import StateBackend
from ..records.canonical import plural
from ..records.keyfiles import KeyProblem, check_private
from ..records.keyring import Keyring


class CommandError(click.ClickException):
    """One line that says why a command could not be done (exit status 1
    in a shell; a UsageError in a notebook)."""

    def show(self, file=None) -> None:
        click.echo(f"rssd-magic: {self.format_message()}", err=True)


#: The name older code and tests know it by.
Fail = CommandError


class Reply:
    """An answer that shows as text in a terminal and as HTML in a notebook;
    ``value`` is what ``--json`` prints."""

    def __init__(self, value: Any, text: Callable[[Any], str], html_: Callable[[Any], str] | None = None):
        self.value, self._text, self._html = value, text, html_

    def __repr__(self) -> str:
        return self._text(self.value)

    def _repr_html_(self) -> str | None:
        return self._html(self.value) if self._html else None


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


# -- where a command runs -----------------------------------------------------------------


class Surface:
    """Where a command runs (see the module)."""

    #: How the person runs commands here (named in hints).
    prog = "rssd-magic"

    def say(self, text: str, store_text: bool = True) -> None:
        """A line of the answer (stdout)."""
        click.echo(render.strip_escapes(text) if store_text else text)

    def warn(self, text: str) -> None:
        """A line the person may have to act on (stderr)."""
        click.echo(render.strip_escapes(text), err=True)

    def note(self, text: str) -> None:
        """A line that informs, beside the answer (a shell keeps stdout for the answer)."""
        self.warn(text)

    def show(self, reply: Reply, as_json: bool = False) -> None:
        self.say(json_text(reply.value), store_text=False) if as_json else self.say(repr(reply))

    def stream(self, rows: Iterable[Any], to_json: Callable[[Any], Any], to_text: Callable[[list], str], as_json: bool) -> int:
        """Rows as they come: a JSON array of one object a line, or text a
        page at a time."""
        n = 0
        if as_json:
            for row in rows:
                click.echo(("[\n  " if n == 0 else ",\n  ") + json.dumps(to_json(row), ensure_ascii=False), nl=False)
                n += 1
            click.echo("\n]" if n else "[]")
            return n
        page: list = []
        for row in rows:
            page.append(row)
            n += 1
            if len(page) == 500:
                self.say(to_text(page) if n == 500 else to_text(page).split("\n", 1)[1])
                page = []
        if page:
            self.say(to_text(page) if n <= 500 else to_text(page).split("\n", 1)[1])
        return n

    @contextmanager
    def store(self, ctx: click.Context, write: bool = False) -> Iterator[StateBackend]:
        """The store, validated read-only first (so a SQLite file that is not
        an RSSD is refused, never given tables), then reopened for writing
        if asked; never created."""
        location = ctx.obj["db"]
        try:
            backend = open_backend(location, create=False, readonly=True)
            if write:
                backend.close()
                backend = open_backend(location, create=False)
        except StoreError as exc:
            raise CommandError(str(exc)) from None
        try:
            yield backend
        except (StoreError, report.ReportError) as exc:
            raise CommandError(str(exc)) from None
        finally:
            backend.close()

    def blob_store(self, given: str | None = None) -> str | None:
        """The bucket large values go to here: *given* (``--blob-store``),
        else ``$RSSD_MAGIC_BLOBS``; CommandError when it is malformed."""
        try:
            return buckets.configured(given)
        except StoreError as exc:
            raise CommandError(f"--blob-store: {exc}") from None

    def keyring(self, secret_file: str | None = None, signers: str | None = None) -> Keyring:
        """Your keys (and the team secret from --secret-file or $RSSD_MAGIC_SECRET)."""
        secret = None
        if secret_file:
            path = Path(secret_file).expanduser()
            try:
                with open(path, "rb") as fh:
                    check_private(path, os.fstat(fh.fileno()))
                    secret = fh.read().decode("utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise CommandError(f"--secret-file {secret_file}: can't be read ({exc})") from None
            except KeyProblem as exc:
                raise CommandError(f"--secret-file: {exc}") from None
            if not secret:
                raise CommandError(f"--secret-file {secret_file} is empty")
        try:
            return Keyring.load(secret, signers)
        except KeyProblem as exc:
            raise CommandError(str(exc)) from None

    def confirm(self, preview: dict, ready: list, keyring: Keyring, line: str) -> bool:
        """Ask before signing: on a terminal, after showing the preview."""
        if not _interactive():
            raise CommandError(
                f"trust: {plural(len(ready), 'record')} would be signed, and there is no terminal to ask: "
                "see them with --dry-run, sign them with --yes"
            )
        self.say(render.trust_preview_text(preview))
        if not click.confirm(f"Sign {plural(len(ready), 'record')} with your key {keyring.key_id}?", default=False):
            raise CommandError("nothing signed")
        return True

    def exit_status(self, status: int) -> None:
        if status:
            sys.exit(status)


def _interactive() -> bool:
    """Is there a person at a terminal to ask?"""
    return sys.stdin.isatty()


class Notebook(Surface):
    """``%stateful`` in a kernel: the kernel's own store (never created),
    answers as values the notebook shows (HTML tables), notes on stderr."""

    prog = "%stateful"

    def __init__(self, magics: Any):
        self.magics = magics
        self.reply: Reply | None = None

    def say(self, text: str, store_text: bool = True) -> None:
        print(text, flush=True)

    def warn(self, text: str) -> None:
        print(f"[stateful] {text}", file=sys.stderr, flush=True)  # as every note of the magic

    def note(self, text: str) -> None:
        print(f"[stateful] {text}", flush=True)  # informs: stdout, as the magic's own notes

    def show(self, reply: Reply, as_json: bool = False) -> None:
        self.reply = Reply(reply.value, json_text) if as_json else reply

    def stream(self, rows, to_json, to_text, as_json) -> int:
        rows = list(rows)
        if rows:
            self.show(Reply([to_json(r) for r in rows], lambda _: to_text(rows), lambda _: render.cells_html(rows)), as_json)
        return len(rows)

    @contextmanager
    def store(self, ctx: click.Context, write: bool = False) -> Iterator[StateBackend]:
        # What a command reads, counts or collects includes the records still
        # being written in the background.
        self.magics.runner.settle()
        try:
            # Never creates a store: a typo in --db is an error, not a new file.
            backend = self.magics.runner.backend(ctx.obj["given"], create=False)
            try:
                backend.flush_hits(patience_s=1.0)  # this kernel's counts, unless a neighbour holds the lock
            except StoreError:
                pass
            yield backend
        except (StoreError, report.ReportError) as exc:
            raise CommandError(str(exc)) from None

    def blob_store(self, given: str | None = None) -> str | None:
        """The bucket large values go to here: *given* (``--blob-store``),
        else ``StatefulMagics.blob_store``, else ``$RSSD_MAGIC_BLOBS``."""
        return super().blob_store(given or self.magics.blob_store)

    def keyring(self, secret_file: str | None = None, signers: str | None = None) -> Keyring:
        if secret_file or signers:
            return super().keyring(secret_file, signers)
        try:
            return self.magics.signer
        except KeyProblem as exc:
            raise CommandError(str(exc)) from None

    def confirm(self, preview: dict, ready: list, keyring: Keyring, line: str) -> bool:
        hint = f"to sign {plural(len(ready), 'record')} with your key: %stateful {line.strip()} --yes"
        text = lambda p: render.trust_preview_text(p) + f"\n{hint}"  # noqa: E731
        html_ = lambda p: render.trust_preview_html(p) + f"<p><code>{html.escape(hint)}</code></p>"  # noqa: E731
        self.show(Reply(preview, text, html_))
        return False

    def exit_status(self, status: int) -> None:
        pass  # a notebook shows what was found; there is no exit status


# -- typos ------------------------------------------------------------------------------------


def did_you_mean(word: str, pool: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word.split("=")[0], sorted(set(pool)), n=1, cutoff=0.6)
    return close[0] if close else None


class Command(click.Command):
    """A mistyped option gets a suggestion."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            options = [o for p in self.get_params(ctx) for o in p.opts + p.secondary_opts if o.startswith("--")]
            hint = did_you_mean(exc.option_name, options)
            raise click.UsageError(f"unrecognized arguments: {exc.option_name}" + (f"; did you mean {hint}?" if hint else ""),
                                   ctx) from None  # fmt: skip


class Group(click.Group):
    """A mistyped command gets a suggestion; commands parse as :class:`Command`."""

    command_class = Command

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and self.get_command(ctx, name) is None and not name.startswith("-"):
            hint = did_you_mean(name, self.list_commands(ctx))
            choices = ", ".join(self.list_commands(ctx))
            raise click.UsageError(f"invalid choice: {name!r} (choose from {choices})" + (f"; did you mean {hint}?" if hint else ""), ctx)
        return super().resolve_command(ctx, args)


Group.group_class = Group



def split(prog: str, line: str) -> list[str]:
    """An option line split as a shell would (``--db "my dir/x.db"``)."""
    try:
        return shlex.split(line)
    except ValueError as exc:  # an unclosed quote
        raise CommandError(f"{prog}: {exc} in the option line: {line.strip()}") from None


def parse(parser: argparse.ArgumentParser, prog: str, argv: list[str]) -> argparse.Namespace:
    """*argv* parsed by an argparse *parser* (the cell magic's), or a
    CommandError naming *prog* and, for a mistyped option, the one that was
    probably meant."""
    try:
        return parser.parse_args(argv)
    except Exception as exc:  # noqa: BLE001 - IPython's parser raises its UsageError
        message = str(exc)
        hint = None
        if "unrecognized arguments:" in message:
            options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]  # noqa: SLF001
            for token in message.split("unrecognized arguments:", 1)[1].split():
                hint = hint or (did_you_mean(token, options) if token.startswith("-") else None)
        raise CommandError(f"{prog}: {message}" + (f"; did you mean {hint}?" if hint else "")) from None
