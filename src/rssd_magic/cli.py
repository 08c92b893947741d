"""``rssd-magic``: inspect and maintain the ``%%stateful`` cells of an RSSD
or a PostgreSQL store.

A thin click adapter over :mod:`rssd_magic.report`: it finds the store (a
file, or a ``postgresql://`` URL), opens it (read-only unless the command
writes), calls one report function or backend method and prints the answer
as aligned text or, with ``--json``, as JSON.  It never creates a file or a
database: a missing, non-SQLite or non-RSSD path, or a server it can't use,
is one line on stderr and exit status 1.  ``export`` and ``import`` move
records between a PostgreSQL store and RSSD files; ``keys`` shows the
person's public key and edits their trusted signers.  Text that comes from
a store (cells, outputs, names) is printed without terminal escapes.  A
secret is never taken on the command line (``ps`` shows it to everyone):
``$RSSD_MAGIC_SECRET`` or ``--secret-file``.  Importing it does not import
IPython.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

from . import __version__, render, report
from .backends import DEFAULT_RSSD, ENV_DB, ENV_RSSD, open_backend, redact, resolve_location, scheme_of
from .canonical import fmt_bytes, plural
from .backends.base import StateBackend, StoreError
from .keyfiles import KeyProblem, check_private
from .keyring import Keyring, data_dir, signers_path
from .signers import ENV_SIGNERS, add, lines_of, quote, revoke
from .signing import KEY_FILE, PersonalKey
from .trust import ENV_SECRET


class Fail(click.ClickException):
    """One line on stderr, exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"rssd-magic: {self.format_message()}", err=True)


@contextmanager
def opened(ctx: click.Context, write: bool = False) -> Iterator[StateBackend]:
    """The store, validated read-only first (so a SQLite file that is not an
    RSSD is refused, never given tables), then reopened for writing if asked."""
    location: str = ctx.obj["db"]
    try:
        backend = open_backend(location, create=False, readonly=True)
        if write:
            backend.close()
            backend = open_backend(location, create=False)
    except StoreError as exc:
        raise Fail(str(exc)) from None
    try:
        yield backend
    except (StoreError, report.ReportError) as exc:
        raise Fail(str(exc)) from None
    finally:
        backend.close()


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def echo(text: str, err: bool = False) -> None:
    """Print text that may come from a store, without terminal escapes."""
    click.echo(render.strip_escapes(text), err=err)


# -- commands ---------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    metavar="PATH|URL",
    help=f"RSSD file or postgresql:// URL (default: ${ENV_DB}, ${ENV_RSSD}, then ./{DEFAULT_RSSD}). Never created.",
)
@click.version_option(__version__, prog_name="rssd-magic")
@click.pass_context
def main(ctx: click.Context, db: str | None) -> None:
    """Inspect and maintain the %%stateful cells recorded in a surveilr RSSD
    (a file) or a PostgreSQL store (--db postgresql://user@host/db).

    KEY arguments take any unique prefix of a cell's 64-hex key (or a
    --name given to the cell).
    """
    ctx.ensure_object(dict)
    ctx.obj["db"] = resolve_location(db)


def _db_here(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(dict)["db"] = resolve_location(value)


#: ``--db`` is accepted after the command too (``rssd-magic list --db x.db``),
#: the way people type it; there it overrides the one before the command.
db_option = click.option(
    "--db", metavar="PATH|URL", expose_value=False, callback=_db_here, help="The store (as before the command)."
)


@main.command("list")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of cells.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """One line per cell, in the order first seen."""
    with opened(ctx) as backend:
        cells = report.list_cells(backend)
    if as_json:
        emit_json(cells)
        return
    if not cells:
        click.echo(f"no %%stateful cells in {redact(ctx.obj['db'])}", err=True)
        return
    echo(render.cells_text(cells))


@main.command("show")
@db_option
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print the cell as a JSON object.")
@click.pass_context
def show_cmd(ctx: click.Context, key: str, as_json: bool) -> None:
    """A cell's source, every transition, and what its next run replays."""
    with opened(ctx) as backend:
        cell = report.show_cell(backend, report.resolve_key(backend, key)["key"])
    if as_json:
        emit_json(cell)
        return
    echo(render.cell_text(cell))


@main.command("forget")
@db_option
@click.argument("key", required=False)
@click.option("--all", "all_", is_flag=True, help="Forget every executed cell.")
@click.option("--json", "as_json", is_flag=True, help="Print what was forgotten as JSON.")
@click.pass_context
def forget_cmd(ctx: click.Context, key: str | None, all_: bool, as_json: bool) -> None:
    """Make executed cells run again next time (EXECUTED → FORGOTTEN).

    History is kept: a FORGOTTEN transition is appended, nothing is deleted.
    Give KEY or --all.
    """
    if bool(key) == all_:
        raise click.UsageError("give either KEY or --all")
    with opened(ctx, write=True) as backend:
        if all_:
            done = report.forget_all(backend)
        else:
            cell = report.resolve_key(backend, key)
            done = report.forget(backend, cell["key"])
            if not done:
                click.echo(
                    f"nothing to forget: cell {cell['key'][:12]} is {cell['state'] or 'not run'}, not EXECUTED",
                    err=True,
                )
    if as_json:
        emit_json(done)
        return
    for d in done:
        label = f" (--name {d['name']})" if d["name"] is not None else ""
        click.echo(f"forgot {d['key'][:12]}{label}: {d['from_state']} → {d['to_state']}")
    if all_:
        click.echo(f"{plural(len(done), 'cell')} forgotten")


@main.command("stats")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as a JSON object.")
@click.pass_context
def stats_cmd(ctx: click.Context, as_json: bool) -> None:
    """Cells, replays, time saved and storage."""
    with opened(ctx) as backend:
        s = report.stats(backend)
    if as_json:
        emit_json(s)
        return
    click.echo(render.stats_text(s))


@main.command("gc")
@db_option
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def gc_cmd(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Delete blobs no cell's current EXECUTED record refers to.

    Only rows of rssd_magic_blob are deleted; SQLite reuses the freed pages
    (run VACUUM yourself to shrink the file).
    """
    with opened(ctx, write=not dry_run) as backend:
        r = report.gc(backend, dry_run=dry_run)
    if as_json:
        emit_json(r)
        return
    verb = "would free" if dry_run else "freed"
    click.echo(
        f"{verb} {plural(r['deleted'], 'blob')}, {fmt_bytes(r['bytes_freed'])}; "
        f"kept {plural(r['kept'], 'blob')}, {fmt_bytes(r['kept_bytes'])}"
    )


@main.command("verify")
@db_option
@click.option("--repair", is_flag=True, help="Delete bad blobs and forget the cells that name them (they run again).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def verify_cmd(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Check the bytes of every blob the current records name.

    Each blob is read back from the store and checked against its digest.
    Exit status 1 when any is missing or holds other bytes; --repair then
    deletes the bad ones and forgets the cells naming them.
    """
    with opened(ctx, write=repair) as backend:
        r = report.verify(backend, repair=repair)
    if as_json:
        emit_json(r)
    else:
        click.echo(render.verify_text(r))
    if r["bad"]:
        sys.exit(1)


def _no_secret_in_argv(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        raise Fail(
            f"--secret is not accepted: a value on the command line is visible to every user of this machine "
            f"(ps, /proc); set ${ENV_SECRET} or give --secret-file PATH instead"
        )


def _interactive() -> bool:
    """Is there a person at a terminal to ask?"""
    return sys.stdin.isatty()


def _keyring(secret_file: str | None = None, signers: str | None = None) -> Keyring:
    """Your keys (and the team secret from --secret-file or $RSSD_MAGIC_SECRET)."""
    secret = None
    if secret_file:
        path = Path(secret_file).expanduser()
        try:
            with open(path, "rb") as fh:
                check_private(path, os.fstat(fh.fileno()))
                secret = fh.read().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise Fail(f"--secret-file {secret_file}: can't be read ({exc})") from None
        except KeyProblem as exc:
            raise Fail(f"--secret-file: {exc}") from None
        if not secret:
            raise Fail(f"--secret-file {secret_file} is empty")
    try:
        return Keyring.load(secret, signers)
    except KeyProblem as exc:
        raise Fail(str(exc)) from None


@main.command("trust")
@db_option
@click.argument("key", required=False)
@click.option("--signer", "by", metavar="NAME|FINGERPRINT", help="Only the records this key signed.")
@click.option("--yes", "-y", is_flag=True, help="Sign without asking (scripts).")
@click.option("--dry-run", is_flag=True, help="Only show what would be signed.")
@click.option("--secret-file", metavar="PATH", help=f"A team secret (default: ${ENV_SECRET}) whose records act already.")
@click.option("--secret", hidden=True, expose_value=False, callback=_no_secret_in_argv, is_eager=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def trust_cmd(
    ctx: click.Context, key: str | None, by: str | None, yes: bool, dry_run: bool, secret_file: str | None, as_json: bool
) -> None:
    """Let records act: sign them with your key, after seeing what they do.

    Shows each record no key you trust signed yet — who signed it, where it
    ran, what it would unpickle, import and publish — and asks before
    signing. KEY (a key prefix or --name) takes one cell, --signer the
    records one key signed. Records whose blobs are missing, don't match
    their digests or are named by XXH3 are listed and never signed.
    """
    keyring = _keyring(secret_file)
    with opened(ctx, write=not dry_run) as backend:
        try:
            preview = report.trust_preview(backend, keyring, key, by)
        except KeyProblem as exc:
            raise Fail(str(exc)) from None
        ready = [r for r in preview["records"] if r["refused"] is None]
        if dry_run or not ready:
            if as_json:
                emit_json(preview)
            else:
                echo(render.trust_preview_text(preview))
            return
        if not yes:
            if not _interactive():
                raise Fail(
                    f"trust: {plural(len(ready), 'record')} would be signed, and there is no terminal to ask: "
                    "see them with --dry-run, sign them with --yes"
                )
            echo(render.trust_preview_text(preview))
            if not click.confirm(f"Sign {plural(len(ready), 'record')} with your key {keyring.key_id}?", default=False):
                raise Fail("nothing signed")
        r = report.trust(backend, keyring, key, by)
    if as_json:
        emit_json(r)
        return
    click.echo(f"signed {plural(r['signed'], 'record')} in {plural(r['cells'], 'cell')} with your key {r['key_id']}")
    for bad in r["refused"]:
        echo(f"not trusted: {bad['key'][:12]} {bad['name']}: {bad['why']}", err=True)


# -- keys ---------------------------------------------------------------------------------


@main.group("keys")
@click.option(
    "--file", "signers", metavar="PATH",
    help=f"The trusted signers file (default: ${ENV_SIGNERS}, else allowed_signers in the Jupyter data directory).",
)  # fmt: skip
@click.pass_context
def keys_cmd(ctx: click.Context, signers: str | None) -> None:
    """Your signing key, and whose records act in your notebooks.

    Each person signs records with an Ed25519 key of their own (made on
    first use in the Jupyter data directory). A teammate's records act once
    their line is in your trusted signers file: they run `keys show`, you
    run `keys trust LINE` (or the team commits one file and points
    everyone at it).
    """
    ctx.ensure_object(dict)["signers"] = signers


def _signers_file(ctx: click.Context) -> Path:
    return signers_path(ctx.obj.get("signers"))


@keys_cmd.command("show")
@click.option("--name", metavar="NAME", help="The name on the line (default: user@host).")
def keys_show(name: str | None) -> None:
    """Your public key, as one trusted-signers line for teammates."""
    try:
        own = PersonalKey.load(data_dir() / KEY_FILE)
    except KeyProblem as exc:
        raise Fail(str(exc)) from None
    click.echo(f"{quote(name or report.who_am_i())} {own.public.openssh}")


@keys_cmd.command("trust")
@click.argument("line_or_file", metavar="LINE|FILE")
@click.pass_context
def keys_trust(ctx: click.Context, line_or_file: str) -> None:
    """Trust a key: add its line (NAME ssh-ed25519 KEY), or every line of FILE."""
    path = _signers_file(ctx)
    try:
        new, source = lines_of(line_or_file)
        if not new:
            raise Fail(f"{source}: no ssh-ed25519 key to trust")
        added = add(path, new)
    except KeyProblem as exc:
        raise Fail(str(exc)) from None
    for s in added:
        echo(f"trusted {s.name} ({s.fingerprint}) in {path}")
    if len(added) < len(new):
        click.echo(f"{plural(len(new) - len(added), 'key')} already trusted in {path}", err=True)


@keys_cmd.command("revoke")
@click.argument("what", metavar="NAME|FINGERPRINT")
@click.pass_context
def keys_revoke(ctx: click.Context, what: str) -> None:
    """Stop trusting a key: its records no longer act, from their next replay."""
    path = _signers_file(ctx)
    try:
        removed = revoke(path, what)
    except KeyProblem as exc:
        raise Fail(str(exc)) from None
    for s in removed:
        echo(f"revoked {s.name} ({s.fingerprint}) from {path}")


@keys_cmd.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """The keys whose records act here: yours, then your trusted signers."""
    rows = _keyring(signers=ctx.obj.get("signers")).listing()
    if as_json:
        emit_json(rows)
        return
    echo(render.table(["NAME", "FINGERPRINT", "SOURCE"], [[r["name"], r["fingerprint"], r["source"]] for r in rows]))


def _transfer_report(r: dict, as_json: bool) -> None:
    """What export/import did; exit status 1 when anything was left out."""
    if as_json:
        emit_json(r)
    else:
        where = f"to {r['to']}" if r.get("to") else ""
        rows = ", ".join(f"{n} {t}" for t, n in r["inserted"].items()) or "none"
        b = r["blobs"]
        click.echo(
            f"{plural(r['cells'], 'cell')} from {r['from']} {where}: rows added: {rows}; {r['unchanged']} already there; "
            f"{plural(b['copied'], 'blob')} copied, {b['present']} already there"
            + (f"; {plural(r['devices_merged'], 'device')} matched by host" if r["devices_merged"] else "")
        )
        for c in r["conflicts"]:
            cols = f" ({', '.join(c['columns'])})" if c["columns"] else ""
            click.echo(f"conflict: {c['table']} {c['id']}{cols}: {c['why']}", err=True)
        for bad in b["bad"]:
            click.echo(f"blob not copied: {bad['digest'][:24]}…: {bad['why']}", err=True)
        for digest in b.get("missing", []):
            click.echo(f"blob missing from the store: {digest[:24]}…", err=True)
    if r["conflicts"] or r["blobs"]["bad"] or r["blobs"].get("missing"):
        sys.exit(1)


@main.command("export")
@db_option
@click.option("--to", "to", required=True, metavar="FILE", help="The RSSD file to write (created, or merged into by id).")
@click.option("--scope", metavar="SCOPE", help="Only the cells of this scope (a notebook path, or a cell's --scope).")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@click.pass_context
def export_cmd(ctx: click.Context, to: str, scope: str | None, as_json: bool) -> None:
    """Copy a PostgreSQL store's cells into an RSSD file.

    The file gets surveilr's tables, the cells' devices, sessions, entries,
    transitions and exec rows, their blobs and signatures: surveilr reads
    it, and any kernel replays the cells with --db FILE. Rows already in the
    file are left as they are (a differing one is reported as a conflict).
    """
    if scheme_of(ctx.obj["db"]) == "file":
        raise Fail(f"{ctx.obj['db']} is an RSSD file already: export copies from a PostgreSQL store (--db postgresql://…)")
    with opened(ctx) as store:
        r = store.export_rssd(to, scope=scope, digests_of=report.digests_of)
    _transfer_report(r, as_json)


@main.command("import")
@db_option
@click.argument("rssd", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@click.pass_context
def import_cmd(ctx: click.Context, rssd: str, as_json: bool) -> None:
    """Bring the %%stateful cells of an RSSD file into a PostgreSQL store.

    Idempotent by id: rows already there are left, and one that differs is
    reported as a conflict, never overwritten. Blobs are checked against
    their digests on the way. The store's tables are created when missing.
    """
    if scheme_of(ctx.obj["db"]) == "file":
        raise Fail(f"{ctx.obj['db']} is a file: import brings an RSSD into a PostgreSQL store (--db postgresql://…)")
    try:
        store = open_backend(ctx.obj["db"], create=False)
    except StoreError as exc:
        raise Fail(str(exc)) from None
    try:
        r = store.import_rssd(rssd)
    except StoreError as exc:
        raise Fail(str(exc)) from None
    finally:
        store.close()
    _transfer_report(r, as_json)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
