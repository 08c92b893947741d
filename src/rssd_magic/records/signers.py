"""Trusted signers: the file that names whose records act in your notebooks.

One key a line, in OpenSSH's allowed-signers format (what git's
``gpg.ssh.allowedSignersFile`` and ``ssh-keygen -Y verify`` read)::

    # the team (comments and blank lines are fine)
    alice@laptop ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI… alice's work laptop
    "Bob Builder" namespaces="rssd-magic,git" ssh-ed25519 AAAAC3Nz…

The first field names the signer (quote it when it has spaces); options may
follow; then the key and an optional comment.  Records are signed with
Ed25519 keys only, so lines of other key types (``ssh-rsa``, ``ecdsa-…``,
``sk-…``) are skipped — a team can point at the file it already keeps for
git — and so is a line whose ``namespaces=`` doesn't include
``rssd-magic``.  Other options (``cert-authority``, ``valid-after`` …) are
not supported, and any line that is none of the above is an error naming
the file and the line (:class:`SignersError`): a typo must never quietly
trust someone, nor quietly stop trusting.

The file: ``StatefulMagics.trusted_signers``, ``$RSSD_MAGIC_TRUSTED_SIGNERS``,
else ``allowed_signers`` in the Jupyter data directory; a team can point
everyone at one file committed to its repository.  A missing file trusts
nobody.  A file others may write decides whom you trust, so one writable by
group or others, or owned by someone other than you or root, is refused.

A kernel reads the file once and then only looks at its status (one
``stat`` per replay, :meth:`SignersFile.refresh`): an edit, a ``git pull``
or ``rssd-magic keys revoke`` takes effect at the next replay.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .keyfiles import KeyProblem, replace_file
from .signing import KEY_TYPE, PublicKey, is_fingerprint

ENV_SIGNERS = "RSSD_MAGIC_TRUSTED_SIGNERS"
#: The default file's name, in ``<jupyter data dir>/rssd_magic/``.
SIGNERS_FILE = "allowed_signers"
#: The namespace a line's ``namespaces=`` must match to count here.
NAMESPACE = "rssd-magic"
#: Key types OpenSSH knows: their lines are valid, and skipped (not Ed25519).
OTHER_KEY_TYPES = frozenset(
    {
        "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)  # fmt: skip


class SignersError(KeyProblem):
    """A trusted-signers line or file that can't be used."""


@dataclass(frozen=True)
class Signer:
    """One trusted key: who it is, and where that was said."""

    name: str
    key: PublicKey
    source: str  # "path:line"

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    @property
    def line(self) -> str:
        """The allowed-signers line for this key."""
        return f"{quote(self.name)} {self.key.openssh}"


def quote(name: str) -> str:
    return f'"{name}"' if any(c.isspace() for c in name) or not name else name


def _split(line: str) -> list[str]:
    """Whitespace-separated fields, double quotes keeping spaces inside."""
    fields, current, quoted, started = [], [], False, False
    for ch in line:
        if ch == '"':
            quoted, started = not quoted, True
            current.append(ch)
        elif ch.isspace() and not quoted:
            if started:
                fields.append("".join(current))
                current, started = [], False
        else:
            current.append(ch)
            started = True
    if quoted:
        raise ValueError("a quote is not closed")
    if started:
        fields.append("".join(current))
    return fields


def _options(text: str) -> list[str] | None:
    """The namespaces an options field allows (None: any); ValueError for an
    option this file can't honour."""
    namespaces = None
    for option in _comma_split(text):
        name, _, value = option.partition("=")
        if name.lower() == "namespaces":
            namespaces = [p for p in value.strip('"').split(",") if p]
        else:
            raise ValueError(f"option {name!r} is not supported here (only namespaces=)")
    return namespaces


def _comma_split(text: str) -> list[str]:
    parts, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p]


def parse_line(line: str, source: str) -> Signer | None:
    """The signer one line names; None for a comment, a blank line or a
    valid line that doesn't apply here; ValueError saying what is wrong."""
    text = line.strip(" \t\r")
    if not text or text.startswith("#"):
        return None
    if not text.isprintable():
        raise ValueError("the line holds control characters")
    fields = _split(text)
    if len(fields) < 3:
        raise ValueError(f"expected NAME {KEY_TYPE} KEY")
    name, rest = fields[0], fields[1:]
    if name == KEY_TYPE or name in OTHER_KEY_TYPES:
        raise ValueError(f"the line starts with the key type: put the signer's name first (NAME {KEY_TYPE} KEY)")
    namespaces = None
    if rest[0] != KEY_TYPE and rest[0] not in OTHER_KEY_TYPES:
        namespaces = _options(rest[0])
        rest = rest[1:]
        if len(rest) < 2:
            raise ValueError(f"expected NAME [OPTIONS] {KEY_TYPE} KEY")
    key_type, key_text = rest[0], rest[1]
    if key_type in OTHER_KEY_TYPES:
        return None
    if key_type != KEY_TYPE:
        raise ValueError(f"unknown key type {key_type[:40]!r} (records are signed with {KEY_TYPE} keys)")
    if name.startswith('"'):
        name = name[1:-1]
    if not name or '"' in name:
        raise ValueError("the signer's name is empty or badly quoted")
    try:
        key = PublicKey.from_base64(key_text)
    except ValueError:
        raise ValueError(f"the key is not a valid {KEY_TYPE} public key") from None
    if namespaces is not None and not any(fnmatch.fnmatchcase(NAMESPACE, p) for p in namespaces):
        return None
    return Signer(name, key, source)


def parse(text: str, source: str) -> list[Signer]:
    """Every signer in *text*; SignersError naming ``source:line`` at the
    first bad line."""
    out = []
    for number, line in enumerate(text.split("\n"), 1):  # lines as editors count them (not str.splitlines)
        try:
            signer = parse_line(line, f"{source}:{number}")
        except ValueError as exc:
            raise SignersError(f"trusted signers {source}, line {number}: {exc}") from None
        if signer is not None:
            out.append(signer)
    return out


def _stamp(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SignersError(f"trusted signers {path} can't be read ({exc.strerror or exc})") from None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid)


def _read(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SignersError(f"trusted signers {path} can't be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SignersError(f"trusted signers {path} is not a regular file")
        if hasattr(os, "getuid") and st.st_uid not in (0, os.getuid()):
            raise SignersError(f"trusted signers {path} is owned by someone else (uid {st.st_uid}): they decide whom you trust")
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise SignersError(
                f"trusted signers {path} can be changed by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"they would decide whom you trust; run chmod go-w {path}"
            )
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SignersError(f"trusted signers {path} is not UTF-8 text") from None


class SignersFile:
    """The trusted-signers file as last read, re-read when it changes."""

    def __init__(self, path: Path):
        self.path = path
        self.signers: list[Signer] = []
        self.by_fingerprint: dict[str, Signer] = {}
        self._stamp: tuple | None = ("unread",)
        self.refresh()

    def refresh(self) -> bool:
        """Look at the file (one ``stat``); read it again if it changed.
        True when it changed.  SignersError when it can't be used."""
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        text = _read(self.path)
        signers = parse(text, str(self.path)) if text is not None else []
        by_fp: dict[str, Signer] = {}
        for signer in signers:
            by_fp.setdefault(signer.fingerprint, signer)
        self.signers, self.by_fingerprint, self._stamp = signers, by_fp, stamp
        return True

    def find(self, what: str) -> list[Signer]:
        """The signers named *what*, or whose key has fingerprint *what*."""
        return [s for s in self.signers if what in (s.name, s.fingerprint)]


def lines_of(argument: str) -> tuple[list[Signer], str]:
    """The signers ``rssd-magic keys trust`` is given: one line, or a file of
    lines; and what to call the source in messages."""
    if KEY_TYPE in argument.split():
        return parse(argument, "(the line given)"), "the line given"
    path = Path(argument).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SignersError(
            f"{argument}: neither a line (NAME {KEY_TYPE} KEY) nor a readable file of them ({exc})"
        ) from None
    return parse(text, str(path)), str(path)


def add(path: Path, new: list[Signer]) -> list[Signer]:
    """Append the lines of *new* signers not in *path* yet (same name and
    key); the file is rewritten whole, every other line kept.  Returns
    those added."""
    text = _read(path) or ""
    present = {(s.name, s.key) for s in parse(text, str(path))}
    added = [s for s in new if (s.name, s.key) not in present and not present.add((s.name, s.key))]
    if added:
        body = text if not text or text.endswith("\n") else text + "\n"
        replace_file(path, (body + "".join(s.line + "\n" for s in added)).encode("utf-8"))
    return added


def revoke(path: Path, what: str) -> list[Signer]:
    """Remove every line naming *what* (a name, or a key's fingerprint);
    SignersError when there is none.  Returns the signers removed."""
    text = _read(path) or ""
    kept, removed = [], []
    for number, line in enumerate(text.split("\n"), 1):
        try:
            signer = parse_line(line, f"{path}:{number}")
        except ValueError as exc:
            raise SignersError(f"trusted signers {path}, line {number}: {exc}") from None
        if signer is not None and what in (signer.name, signer.fingerprint):
            removed.append(signer)
        else:
            kept.append(line)
    if not removed:
        kind = "key with fingerprint" if is_fingerprint(what) else "signer named"
        raise SignersError(f"no {kind} {what!r} in trusted signers {path} (see rssd-magic keys list)")
    replace_file(path, "\n".join(kept).encode("utf-8"))
    return removed
