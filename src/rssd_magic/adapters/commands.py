"""Every command of rssd_magic, once, for both places people type them:
``rssd-magic CMD`` in a shell and ``%stateful CMD`` in a notebook run the
same click commands with the same options and say the same words.

What differs is the :class:`Surface`: how a store is opened (a shell opens
it read-only unless the command writes, and never creates one; a notebook
uses the kernel's own store), where an answer goes (aligned text or
``--json`` on a terminal, an HTML table in a notebook, text in a terminal
IPython), how the person is asked (a prompt on a terminal; ``--yes`` in a
notebook), and what a command is called in a hint (``rssd-magic`` or
``%stateful``).  Reports come from report.py, their text and HTML from
render.py.  Text that comes from a store (cells, outputs, names) is shown
without terminal escapes.  A secret is never taken on the command line
(``ps`` shows it to everyone): ``$RSSD_MAGIC_SECRET`` or
``--secret-file``.  Importing this module does not import IPython.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import click

from .. import __version__
from ..manage import render, report
from ..store.locations import DEFAULT_RSSD, ENV_DB, ENV_RSSD, redact, resolve_location
from ..backends import open_backend
from ..store.base import StoreError
from ..store.journal import StateBackend
from ..records.canonical import fmt_bytes, plural
from ..records.keyfiles import KeyProblem
from ..records.keyring import data_dir, signers_path
from ..records.signers import ENV_SIGNERS, add, lines_of, quote, revoke
from ..records.signing import KEY_FILE, PersonalKey
from ..store.transfer import transfer
from ..engine.ttl import parse_duration
from .surfaces import CommandError, Group, Notebook, Reply, Surface, json_text, parse, split
from ..records.trust import ENV_SECRET

__all__ = ["CommandError", "main", "parse", "run_line", "split"]

#: How many cells ``list`` shows unless told (a screenful).
SCREENFUL = 20
#: The commands, as said when none is given.
USAGE = """\
{p} list [--limit N|--all]     the newest cells: key, name, scope, state, source, when, where, hits
{p} show KEY                  source, every transition, what a replay shows
{p} forget KEY|--all          run again next time (EXECUTED -> FORGOTTEN)
{p} stats                     cells, hits, time saved, storage
{p} gc [--dry-run] [--grace D] delete blobs no current result refers to
{p} verify [--repair]         check the bytes of every blob current records name
{p} trust [KEY] [--signer NAME|FINGERPRINT] [--yes]
                              what records would do once trusted; --yes signs them with your key
{p} keys show|trust|revoke|list    your key, and whose records act here
{p} export --to FILE|URL      copy the cells into another store
{p} import FILE|URL           bring another store's cells into this one"""


# -- the commands -----------------------------------------------------------------------------


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
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
    obj = ctx.ensure_object(dict)
    obj.setdefault("surface", Surface())
    obj["given"] = db
    obj["db"] = resolve_location(db)


def _db_here(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        obj = ctx.ensure_object(dict)
        obj["given"], obj["db"] = value, resolve_location(value)


#: ``--db`` is accepted after the command too (``rssd-magic list --db x.db``),
#: the way people type it; there it overrides the one before the command.
db_option = click.option(
    "--db", metavar="PATH|URL", expose_value=False, callback=_db_here, help="The store (as before the command)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")


def _surface(ctx: click.Context) -> Surface:
    return ctx.obj["surface"]


@main.command("list")
@db_option
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help=f"The N newest cells (default: {SCREENFUL}; with --json, all).")
@click.option("--all", "all_", is_flag=True, help="Every cell.")
@json_option
@click.pass_context
def list_cmd(ctx: click.Context, limit: int | None, all_: bool, as_json: bool) -> None:
    """One line per cell, the newest (latest transition) first."""
    surface = _surface(ctx)
    n = None if all_ or (as_json and limit is None) else (limit or SCREENFUL)
    with surface.store(ctx) as store, contextlib.closing(report.iter_cells(store, None if n is None else n + 1)) as cells:
        # closing: the read ends here when the listing stops at the limit,
        # not when the store is gone (PostgreSQL: not idle in transaction).
        more = [False]

        def upto(rows: Iterator[dict]) -> Iterator[dict]:
            for i, row in enumerate(rows):
                if n is not None and i == n:
                    more[0] = True
                    return
                yield row

        shown = surface.stream(upto(cells), lambda c: c, render.cells_text, as_json)
        location = store.location
    if not shown:
        surface.note(f"no %%stateful cells in {redact(location)}")
    elif more[0]:
        surface.note(f"the {shown} newest cells shown; --limit N or --all for more")


@main.command("show")
@db_option
@click.argument("key")
@json_option
@click.pass_context
def show_cmd(ctx: click.Context, key: str, as_json: bool) -> None:
    """A cell's source, every transition, and what its next run replays."""
    surface = _surface(ctx)
    with surface.store(ctx) as store:
        cell = report.show_cell(store, report.resolve_key(store, key, prog=surface.prog)["key"])
    surface.show(Reply(cell, render.cell_text), as_json)


@main.command("forget")
@db_option
@click.argument("key", required=False)
@click.option("--all", "all_", is_flag=True, help="Forget every executed cell.")
@json_option
@click.pass_context
def forget_cmd(ctx: click.Context, key: str | None, all_: bool, as_json: bool) -> None:
    """Make executed cells run again next time (EXECUTED → FORGOTTEN).

    History is kept: a FORGOTTEN transition is appended, nothing is deleted.
    Give KEY or --all.
    """
    if bool(key) == all_:
        raise click.UsageError("give KEY or --all", ctx)
    surface = _surface(ctx)
    with surface.store(ctx, write=True) as store:
        if all_:
            done = report.forget_all(store)
        else:
            cell = report.resolve_key(store, key, prog=surface.prog)
            done = report.forget(store, cell["key"])
            if not done:
                surface.note(f"nothing to forget: cell {cell['key'][:12]} is {cell['state'] or 'not run'}, not EXECUTED")
    if as_json:
        return surface.show(Reply(done, json_text), True)

    def text(rows: list[dict]) -> str:
        lines = [f"forgot {d['key'][:12]}" + (f" (--name {d['name']})" if d["name"] is not None else "")
                 + f": {d['from_state']} → {d['to_state']}" for d in rows]  # fmt: skip
        return "\n".join(lines + [f"{plural(len(rows), 'cell')} forgotten" if rows else "nothing to forget"])

    if done or all_:
        surface.say(text(done))


@main.command("stats")
@db_option
@json_option
@click.pass_context
def stats_cmd(ctx: click.Context, as_json: bool) -> None:
    """Cells, replays, time saved and storage."""
    surface = _surface(ctx)
    with surface.store(ctx) as store:
        s = report.stats(store)
    surface.show(Reply(s, lambda v: render.stats_text(v, prog=surface.prog)), as_json)


@main.command("gc")
@db_option
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@click.option("--blob-store", "blob_store", metavar="s3://BUCKET/PREFIX",
              help="The bucket to sweep too (default: StatefulMagics.blob_store, $RSSD_MAGIC_BLOBS).")
@click.option("--grace", "grace", default="1h", show_default=True, metavar="DURATION",
              help="Objects in the bucket younger than this are kept (a recording may be about to name them).")
@json_option
@click.pass_context
def gc_cmd(ctx: click.Context, dry_run: bool, blob_store: str | None, grace: str, as_json: bool) -> None:
    """Delete blobs no cell's current EXECUTED record refers to.

    In the store, only rows of rssd_magic_blob are deleted; SQLite reuses
    the freed pages (run VACUUM yourself to shrink the file).  In the bucket
    large values go to (--blob-store), only objects this store wrote, that
    no current record names and older than --grace are deleted.
    """
    try:
        grace_s = parse_duration(grace)
    except ValueError as exc:
        raise CommandError(f"--grace {grace!r}: {exc}") from None
    surface = _surface(ctx)
    bucket = surface.blob_store(blob_store)
    with surface.store(ctx, write=not dry_run) as store:
        r = report.gc(store, dry_run=dry_run, grace_s=grace_s, bucket=bucket)
    if as_json:
        return surface.show(Reply(r, json_text), True)
    surface.say(render.gc_text(r))


@main.command("verify")
@db_option
@click.option("--repair", is_flag=True, help="Delete bad blobs and forget the cells that name them (they run again).")
@json_option
@click.pass_context
def verify_cmd(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Check the bytes of every blob the current records name.

    Each blob is read back from the store and checked against its digest.
    Exit status 1 when any is missing or holds other bytes, or sits in a
    bucket that could not be asked; --repair then deletes the bad ones and
    forgets the cells naming them (never for a bucket out of reach).
    """
    surface = _surface(ctx)
    with surface.store(ctx, write=repair) as store:
        r = report.verify(store, repair=repair)
    if as_json:
        surface.show(Reply(r, json_text), True)
    else:
        surface.say(render.verify_text(r, prog=surface.prog))
    surface.exit_status(1 if r["bad"] or r["unchecked"] else 0)


def _no_secret_in_argv(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        raise CommandError(
            f"--secret is not accepted: a value on the command line is visible to every user of this machine "
            f"(ps, /proc); set ${ENV_SECRET} or give --secret-file PATH instead"
        )


@main.command("trust")
@db_option
@click.argument("key", required=False)
@click.option("--signer", "by", metavar="NAME|FINGERPRINT", help="Only the records this key signed.")
@click.option("--yes", "-y", is_flag=True, help="Sign without asking (scripts, notebooks).")
@click.option("--dry-run", is_flag=True, help="Only show what would be signed.")
@click.option("--secret-file", metavar="PATH", help=f"A team secret (default: ${ENV_SECRET}) whose records act already.")
@click.option("--secret", hidden=True, expose_value=False, callback=_no_secret_in_argv, is_eager=True)
@json_option
@click.pass_context
def trust_cmd(ctx: click.Context, key: str | None, by: str | None, yes: bool, dry_run: bool, secret_file: str | None,
              as_json: bool) -> None:  # fmt: skip
    """Let records act: sign them with your key, after seeing what they do.

    Shows each record no key you trust signed yet — who signed it, where it
    ran, what it would unpickle, import and publish — and asks before
    signing (in a notebook: add --yes). KEY (a key prefix or --name) takes
    one cell, --signer the records one key signed. Records whose blobs are
    missing, don't match their digests or are named by XXH3 are listed and
    never signed.
    """
    surface = _surface(ctx)
    keyring = surface.keyring(secret_file)
    with surface.store(ctx, write=not dry_run) as store:
        try:
            preview = report.trust_preview(store, keyring, key, by)
        except KeyProblem as exc:
            raise CommandError(str(exc)) from None
        ready = [r for r in preview["records"] if r["refused"] is None]
        if dry_run or not (ready or yes):
            return surface.show(Reply(preview, render.trust_preview_text, render.trust_preview_html), as_json)
        if not yes and not surface.confirm(preview, ready, keyring, ctx.obj.get("line", "trust")):
            return
        r = report.trust(store, keyring, key, by)
        location = store.location
    if as_json:
        surface.show(Reply(r, json_text), True)
    else:
        surface.say(f"signed {plural(r['signed'], 'record')} in {plural(r['cells'], 'cell')} of {redact(location)} "
                    f"with your key {r['key_id']}")  # fmt: skip
    for bad in r["refused"]:
        surface.warn(f"not trusted: {bad['key'][:12]} {bad['name']}: {bad['why']}")


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


@keys_cmd.command("show")
@click.option("--name", metavar="NAME", help="The name on the line (default: user@host).")
@click.pass_context
def keys_show(ctx: click.Context, name: str | None) -> None:
    """Your public key, as one trusted-signers line for teammates."""
    try:
        own = PersonalKey.load(data_dir() / KEY_FILE)
    except KeyProblem as exc:
        raise CommandError(str(exc)) from None
    _surface(ctx).say(f"{quote(name or report.who_am_i())} {own.public.openssh}", store_text=False)


@keys_cmd.command("trust")
@click.argument("line_or_file", metavar="LINE|FILE")
@click.pass_context
def keys_trust(ctx: click.Context, line_or_file: str) -> None:
    """Trust a key: add its line (NAME ssh-ed25519 KEY), or every line of FILE."""
    path, surface = signers_path(ctx.obj.get("signers")), _surface(ctx)
    try:
        new, source = lines_of(line_or_file)
        if not new:
            raise CommandError(f"{source}: no ssh-ed25519 key to trust")
        added = add(path, new)
    except KeyProblem as exc:
        raise CommandError(str(exc)) from None
    for s in added:
        surface.say(f"trusted {s.name} ({s.fingerprint}) in {path}")
    if len(added) < len(new):
        surface.note(f"{plural(len(new) - len(added), 'key')} already trusted in {path}")


@keys_cmd.command("revoke")
@click.argument("what", metavar="NAME|FINGERPRINT")
@click.pass_context
def keys_revoke(ctx: click.Context, what: str) -> None:
    """Stop trusting a key: its records no longer act, from their next replay."""
    path = signers_path(ctx.obj.get("signers"))
    try:
        removed = revoke(path, what)
    except KeyProblem as exc:
        raise CommandError(str(exc)) from None
    for s in removed:
        _surface(ctx).say(f"revoked {s.name} ({s.fingerprint}) from {path}")


@keys_cmd.command("list")
@json_option
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """The keys whose records act here: yours, then your trusted signers."""
    surface = _surface(ctx)
    rows = surface.keyring(signers=ctx.obj.get("signers")).listing()
    text = lambda rs: render.table(["NAME", "FINGERPRINT", "SOURCE"], [[r["name"], r["fingerprint"], r["source"]] for r in rs])  # noqa: E731
    surface.show(Reply(rows, text), as_json)


# -- moving cells between stores ------------------------------------------------------------


def _transfer(ctx: click.Context, other: str, scope: str | None, as_json: bool, *, into_db: bool) -> None:
    """Copy cells between this store (``--db``) and *other* (transfer.py),
    into ``--db`` when *into_db*, and say what was done; exit status 1 when
    anything was left out.  ``--db`` is opened first (so a server that can't
    be used, or a store that must not be written, is what is said), *other*
    is created when it is the target."""
    surface = _surface(ctx)
    opened: list[StateBackend] = []
    try:
        here = open_backend(ctx.obj["db"], create=False, readonly=not into_db)
        opened.append(here)
        if into_db:
            here._writable()
        there = open_backend(resolve_location(other), create=not into_db, readonly=into_db)
        opened.append(there)
        r = transfer(there, here) if into_db else transfer(here, there, scope)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    finally:
        for store in opened:
            store.close()
    if as_json:
        surface.show(Reply(r, json_text), True)
    else:
        where = f"to {r['to']}" if r.get("to") else ""
        rows = ", ".join(f"{n} {t}" for t, n in r["inserted"].items()) or "none"
        b = r["blobs"]
        surface.say(
            f"{plural(r['cells'], 'cell')} from {r['from']} {where}: rows added: {rows}; {r['unchanged']} already there; "
            f"{plural(b['copied'], 'blob')} copied, {b['present']} already there"
            + (f"; {plural(r['devices_merged'], 'device')} matched by host" if r["devices_merged"] else "")
        )
        for c in r["conflicts"]:
            cols = f" ({', '.join(c['columns'])})" if c["columns"] else ""
            surface.warn(f"conflict: {c['table']} {c['id']}{cols}: {c['why']}")
        for bad in b["bad"]:
            surface.warn(f"blob not copied: {bad['digest'][:24]}…: {bad['why']}")
        for digest in b.get("missing", []):
            surface.warn(f"blob missing from the store: {digest[:24]}…")
    surface.exit_status(1 if r["conflicts"] or r["blobs"]["bad"] or r["blobs"].get("missing") else 0)


@main.command("export")
@db_option
@click.option("--to", "to", required=True, metavar="FILE|URL",
              help="The store to copy into: an RSSD file (created, or merged into by id), or a postgresql:// URL.")  # fmt: skip
@click.option("--scope", metavar="SCOPE", help="Only the cells of this scope (a notebook path, or a cell's --scope).")
@json_option
@click.pass_context
def export_cmd(ctx: click.Context, to: str, scope: str | None, as_json: bool) -> None:
    """Copy this store's cells into another store (an RSSD file, or a server).

    The file gets surveilr's tables, the cells' devices, sessions, entries,
    transitions and exec rows, their blobs and signatures: surveilr reads
    it, and any kernel replays the cells with --db FILE. Rows already there
    are left as they are (a differing one is reported as a conflict).
    """
    _transfer(ctx, to, scope, as_json, into_db=False)


@main.command("import")
@db_option
@click.argument("other", metavar="FILE|URL")
@json_option
@click.pass_context
def import_cmd(ctx: click.Context, other: str, as_json: bool) -> None:
    """Bring the cells of another store (an RSSD file, or a server) into this one.

    Idempotent by id: rows already there are left, and one that differs is
    reported as a conflict, never overwritten. Blobs are checked against
    their digests on the way. The store's tables are created when missing.
    """
    _transfer(ctx, other, None, as_json, into_db=True)


# -- %stateful --------------------------------------------------------------------------------


def run_line(magics: Any, line: str) -> Any:
    """One ``%stateful`` line: the command's answer, to show as the cell's
    result (None when it printed what it had to say).  CommandError when
    the line or the command fails."""
    argv = split("%stateful", line)
    if not [a for a in argv if not a.startswith("-")]:
        raise CommandError("%stateful needs a command:\n" + USAGE.format(p="%stateful"))
    surface = Notebook(magics)
    command = next((a for a in argv if a in main.commands), "")
    try:
        main.main(argv, prog_name="%stateful", standalone_mode=False, obj={"surface": surface, "line": line})
    except click.ClickException as exc:
        raise CommandError(f"%stateful{' ' + command if command else ''}: {exc.format_message()}") from None
    except click.exceptions.Exit:
        pass
    return surface.reply
