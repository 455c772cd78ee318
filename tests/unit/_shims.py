"""The workload runner's tests start real shims (nodeagent/shim.py, each in a session of its own): what a test
started is killed, group and all, when it ends, whatever it left running."""

from __future__ import annotations

import os
import signal


def kill_shims(runner) -> None:
    """SIGKILL the process group of every shim `runner` started (those gone already are skipped)."""
    for meta in runner.meta.values():
        if meta.get("shim_pid"):
            try:
                os.killpg(meta["shim_pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
