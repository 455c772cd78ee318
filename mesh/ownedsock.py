"""Dial a Unix socket that lies in a directory another user controls, and only if it is that user's.

The node agent (root) talks to sockets its tenants' workloads make in their own directories: the
checkpoint control socket (`<runner dir>/<id>.d/.gpumesh-ctl.sock`, mesh/checkpoint/agent_link.py) and a
receiving target's listener (nodeagent/isolation/netrelay.py). A tenant may put anything at such a name: a
link to another tenant's socket or to a root service's. A plain `connect(path)` follows it, and the agent
then hands that other socket what it meant for this workload (a checkpoint's secret, `stop`, `pause`).

`dial` therefore opens the name without following a link (O_PATH|O_NOFOLLOW, relative to the directory's
descriptor), requires a socket owned by the workload's uid, connects to exactly that inode through
`/proc/self/fd/N` (also short enough for any directory depth) and requires the listener to run as that uid
(SO_PEERCRED). Workloads started unconfined run as the agent's own uid: the caller passes `os.geteuid()`.

Standard library only: the workload-side SDK imports mesh/checkpoint/agent_link.py, which imports this.
"""

from __future__ import annotations

import os
import socket
import stat
import struct

_UCRED = struct.Struct("3i")      # struct ucred: pid, uid, gid


class NotOwned(ConnectionRefusedError):
    """The name is not a socket of the expected uid (a link, another file, another user's socket), or its
    listener runs as another uid; nothing was sent to it."""


def peer_uid(sock: socket.socket) -> int:
    """The uid the connected Unix socket's peer had when it listened (or connected)."""
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


def dial(directory: str, name: str, uid: int, timeout: float | None) -> socket.socket:
    """A stream socket connected to `<directory>/<name>`, which must be a socket (never a link) owned by
    `uid` whose listener runs as `uid`; `timeout` applies to the connect and stays set on the socket.
    Raises NotOwned when it is not the workload's, OSError when it cannot be reached."""
    shown = os.path.join(directory, name)
    dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        st = os.fstat(pfd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
            kind = "a link" if stat.S_ISLNK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a file"
            raise NotOwned(f"{shown} is not a socket of uid {uid} ({kind} of uid {st.st_uid})")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(f"/proc/self/fd/{pfd}")         # exactly the inode checked above
            served_by = peer_uid(s)
            if served_by != uid:
                raise NotOwned(f"{shown} is served by uid {served_by}, not the workload's uid {uid}")
        except OSError:
            s.close()
            raise
        return s
    finally:
        os.close(pfd)
