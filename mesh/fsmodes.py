"""File modes of what gpumesh's daemons write on a host (docs/security.md, "Files on the host").

Tenant workloads run as unprivileged uids on the same hosts; those labelled `gpumesh.io/isolation=criu` have
no mount namespace and see the host's file tree with their uid's permissions. So everything an agent or a
control plane writes is its user's alone: the daemons run with `PRIVATE_UMASK`, and the few things that are
handed to a tenant say so with an explicit mode:

- 0700 / 0600: state, records, logs, the checkpoint store, CRIU images, keys (`private_dir`, `private_file`);
- 0711 (`passage`): a directory a workload's uid must pass through, not read, to reach its own directory
  (the agent's state directory down to the workloads' runner directory, the MPS pipe directories' parents);
- a workload's own directory: 0700, owned by its tenant's uid (nodeagent/isolation/plan.py).

Only directories this process's user owns are changed, and never a shared sticky one (/tmp, /dev/shm).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

PRIVATE_UMASK = 0o077
PASSAGE = 0o711         # others may traverse, not list
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def _ours(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX


def set_dir_mode(path: str | os.PathLike[str], mode: int) -> bool:
    """Give the directory exactly `mode` when it is this user's own (never a shared sticky one); whether it did."""
    st = os.stat(path)
    if not _ours(st):
        return False
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    return True


def private_dir(path: str | os.PathLike[str], mode: int = PRIVATE_DIR) -> str:
    """Make `path` (and missing parents, with the process's umask) and give it `mode`."""
    os.makedirs(path, mode=mode, exist_ok=True)
    set_dir_mode(path, mode)
    return os.fspath(path)


def passage(top: str | os.PathLike[str], leaf: str | os.PathLike[str], mode: int = PASSAGE) -> str:
    """Make `leaf` and give it and every directory from `top` down to it `mode` (0711 by default: other
    users may pass through to their own directories below, but list nothing)."""
    top, leaf = os.path.abspath(top), os.path.abspath(leaf)
    if leaf != top and not leaf.startswith(top.rstrip(os.sep) + os.sep):
        raise ValueError(f"{leaf} is not below {top}")
    os.makedirs(leaf, mode=mode, exist_ok=True)
    rel = os.path.relpath(leaf, top)
    d = top
    set_dir_mode(d, mode)
    for part in ([] if rel == "." else rel.split(os.sep)):
        d = os.path.join(d, part)
        set_dir_mode(d, mode)
    return leaf


def private_file(path: str | os.PathLike[str], mode: int = PRIVATE_FILE):
    """Open `path` for writing (created or truncated, not through a symbolic link) with exactly `mode`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


def copy_private(src: str | os.PathLike[str], dst: str | os.PathLike[str], mode: int = PRIVATE_FILE) -> None:
    """Copy a file's bytes to `dst` with exactly `mode` (shutil.copyfile would take the umask's)."""
    with open(src, "rb") as f, private_file(dst, mode) as out:
        shutil.copyfileobj(f, out, 1 << 20)


def others_may_read(path: str | os.PathLike[str]) -> bool:
    """Whether a user with neither the owner's uid nor gid may read the file (or list/enter the directory)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    bits = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
    return bool(st.st_mode & bits)


def replace_private(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> None:
    """Write `text` to `path` all at once (0600): a temporary file in the same directory renamed over it,
    so a reader (or a crash) sees the old content or the new, never a part; the temporary file is removed
    on failure. `fsync`: the bytes reach the disk before the rename."""
    directory, name = os.path.split(os.fspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory or ".", prefix=f".{name}-", suffix=".tmp")   # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
