"""The filesystem a path lies on, from the kernel's mount table: an RSSD on
a network filesystem (NFS, SMB, sshfs …) can't use SQLite's WAL, and its
file locks can't be trusted (SQLite's own documentation), so a store asks
before it opens one."""

from __future__ import annotations

import os
from pathlib import Path

#: Filesystem types whose locking SQLite can't rely on, and where WAL's
#: shared memory does not work (SQLite's own documentation).
NETWORK_FS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs",
        "beegfs", "ocfs2", "gfs2", "davfs", "fuse.sshfs", "sshfs", "fuse.glusterfs", "fuse.rclone",
        "fuse.s3fs", "fuse.gcsfuse", "fuse.davfs2", "fuse.cephfs", "fuse.juicefs", "fuse.goofys",
    }
)  # fmt: skip
#: Where the mount table is read from (the tests point it at a fixture).
MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_of(path: Path) -> tuple[str, str] | None:
    """``(fstype, mount point)`` of the filesystem holding *path*, from the
    mount table; None where there is no Linux mount table to read."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)  # symlinks resolved as far as they exist
    best: tuple[str, str] | None = None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount = _unescape(fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        # Later lines win for the same mount point (mounted over).
        if inside and (best is None or len(mount) >= len(best[1])):
            best = (right.split()[0], mount)
    return best


def network_filesystem(path: Path) -> tuple[str, str] | None:
    """``(fstype, mount point)`` when *path* lies on a network filesystem."""
    found = filesystem_of(path)
    if found is not None and found[0].lower() in NETWORK_FS:
        return found
    return None
