"""Small process helpers shared by the agent, the transports and the local-cluster tools."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SETPRIV = shutil.which("setpriv")


def with_death_signal(argv: list[str], signal_name: str = "TERM") -> list[str]:
    """`argv` run so that the kernel sends the child `SIG<signal_name>` when the thread that started it dies
    (PR_SET_PDEATHSIG, set by util-linux's `setpriv --pdeathsig` before it execs `argv`).

    This replaces a Python `preexec_fn`: with one, `subprocess` forks instead of using vfork, and in a process
    that has started gRPC the fork runs gRPC's fork handlers in the child, whose poller can abort it between
    fork and exec ("epoll_wait error: Bad file descriptor", grpc/grpc#43055). Without setpriv, `argv` is
    returned unchanged (the child then outlives a parent killed by SIGKILL)."""
    if SETPRIV is None:
        return list(argv)
    return [SETPRIV, f"--pdeathsig={signal_name}", "--", *argv]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc's children lists; processes that exit meanwhile are skipped)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out
