"""Running CRIU on a workload that has its tenant's uid.

Dumping another uid's process reads its rlimits with prlimit(2), which the kernel allows when the
caller's *real* uid/gid equal the target's, or with CAP_SYS_RESOURCE (which containers often drop).
So CRIU runs with the workload's ids as its real ids and root as its effective and saved ids: it
keeps every capability it needs (effective uid 0), and the prlimit check passes by the ids. The
same holds for the restore (CRIU sets up the restored tasks' limits the same way).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence


def real_ids_preexec(uid: int, gid: int):
    def preexec() -> None:
        os.setresgid(gid, 0, 0)
        os.setresuid(uid, 0, 0)
    return preexec


def runner_as(uid: int, gid: int):
    """A `mesh.checkpoint.criu.Runner` that runs CRIU (and cuda-checkpoint) with real ids uid/gid.

    Through util-linux `setpriv --ruid --rgid` (only the real ids change): the agent is
    multi-threaded, where a Python `preexec_fn` is not safe (it crashed the child here)."""
    setpriv = shutil.which("setpriv")

    def run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
        if setpriv:
            return subprocess.run([setpriv, "--ruid", str(uid), "--rgid", str(gid), "--keep-groups", *argv],
                                  capture_output=True, text=True, timeout=timeout)
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              preexec_fn=real_ids_preexec(uid, gid))
    return run
