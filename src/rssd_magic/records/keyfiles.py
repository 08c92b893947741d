"""Secret files on disk: written whole or not at all, read only when they
are plainly the user's own.

A key file decides what a notebook unpickles, so a doubtful one is never
used and never silently replaced:

* **written** to a temporary file in the same folder (mode 0600), flushed
  and fsynced, then *linked* into place — a kernel killed half-way leaves
  no key file at all, never an empty one (an empty HMAC key signs with the
  empty key), and two kernels creating one at the same moment keep the
  first (a link, unlike a rename, never replaces a file);
* **refused**, in one line naming the file (:class:`KeyProblem`), when it is
  empty or shorter than its kind of key, not owned by the user, or readable
  or writable by group or others.

:class:`KeyProblem` is also what a bad trusted-signers file or a bad
``--secret-file`` raises: the adapters show it as one line (``UsageError``
in a notebook, exit status 1 on the CLI).
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path


class KeyProblem(Exception):
    """A key, secret or signers file that can't be used; the message names
    the file and the cause in one line."""


def check_private(path: Path, st: os.stat_result) -> None:
    """KeyProblem unless *st* (of *path*) is a regular file owned by this
    user that no one else may read or write."""
    if not stat.S_ISREG(st.st_mode):
        raise KeyProblem(f"key file {path} is not a regular file; move it away (a new key is made on first use)")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KeyProblem(f"key file {path} is not owned by you (uid {st.st_uid}): it is not used; move it away")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyProblem(
            f"key file {path} can be read or changed by others (mode {mode:04o}): it is not used; "
            f"run chmod 600 {path} if it is yours, else move it away"
        )


def read_private(path: Path, min_bytes: int) -> bytes | None:
    """The content of the key file *path* (None when there is none), or
    KeyProblem when it exists but must not be used."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyProblem(f"key file {path} can't be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        check_private(path, os.fstat(fh.fileno()))  # the file read, not a name that may change meanwhile
        data = fh.read(1 << 16)
    if not data.strip():
        raise KeyProblem(
            f"key file {path} is empty (a kernel was stopped while making it?): it is not used; "
            "delete it to make a new key (records signed by the old one then replay as untrusted)"
        )
    if len(data.strip()) < min_bytes:
        raise KeyProblem(f"key file {path} is too short to be a key ({len(data.strip())} bytes): it is not used")
    return data


def write_new(path: Path, data: bytes) -> bool:
    """Make the key file *path* holding *data*, unless one exists already
    (another kernel may have made it a moment ago): False then, and the
    existing file is left as it is."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # A filesystem without hard links: a rename, only if still absent.
            if path.exists():
                return False
            os.replace(tmp, path)
        _sync_dir(path.parent)
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write *path* whole (temporary file, fsync, rename): readers see the
    old content or the new, never a part.  The file keeps its mode."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # umask may have taken bits off
        os.replace(tmp, path)
        _sync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
