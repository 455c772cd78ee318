"""A workload's own directory on the host (`<runner dir>/<id>.d`): 0700, owned by its tenant's uid and gid, below
directories it may pass through (0711: mesh/fsmodes.py). A fresh start makes it in the isolation plan
(nodeagent/isolation/plan.py); a transparent (CRIU) restore makes the working directory the dumped process had,
by the path it had on the source host (`restore_cwd`), which the same way is the tenant's when it is (or lies
in) the workload's own directory there."""

from __future__ import annotations

import errno
import os

from mesh.fsmodes import PASSAGE, PRIVATE_DIR


def make_workdir(path: str, uid: int, gid: int) -> None:
    """The workload's own directory, as a fresh start makes it, in a directory that must be the agent's alone
    (the runner's: no one else can have put a link in its place); nothing at its name is followed."""
    parent, name = os.path.split(os.path.normpath(path))
    os.makedirs(parent, exist_ok=True)
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(pfd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise OSError(errno.EPERM, f"{parent} is not the agent's alone: the workload's directory is not made there")
        try:
            os.mkdir(name, PRIVATE_DIR, dir_fd=pfd)
        except FileExistsError:
            pass
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, PRIVATE_DIR)
        finally:
            os.close(fd)
    finally:
        os.close(pfd)


def restore_cwd(cwd: str, workdir: str, uid: int, gid: int) -> None:
    """Make the working directory `cwd` of a process CRIU restores (it restores it by path: it must exist).

    `workdir`: the workload's own directory on the source host (empty when not known). When `cwd` is it, or lies
    in it, that directory is made as a fresh start makes it (`make_workdir`), and so are the directories below it
    on the way to `cwd` (0700, the tenant's: the tenant made them there). Every other missing directory on the
    way (the source's runner directory, when this host keeps its state elsewhere) is made a passage (0711,
    the agent's). Directories that exist already keep their owner and mode."""
    cwd, workdir = os.path.normpath(cwd), os.path.normpath(workdir) if workdir else ""
    inside = bool(workdir) and (cwd == workdir or cwd.startswith(workdir.rstrip(os.sep) + os.sep))
    _passages(os.path.dirname(workdir) if inside else cwd)
    if not inside:
        return
    make_workdir(workdir, uid, gid)
    rel = os.path.relpath(cwd, workdir)
    if rel == ".":
        return
    # the tenant's own directory: nothing in it is followed (a link the tenant left there fails the restore)
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in rel.split(os.sep):
            try:
                os.mkdir(part, PRIVATE_DIR, dir_fd=fd)
                made = True
            except FileExistsError:
                made = False
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = sub
            if made:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, PRIVATE_DIR)
    finally:
        os.close(fd)


def _passages(path: str) -> None:
    """Make the missing directories of `path` 0711 (whatever the agent's umask); those there stay as they are."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, PASSAGE)
        except FileExistsError:
            continue
        os.chmod(d, PASSAGE)
