"""Checkpointing and live migration of workloads.

Cheap to import: the torch-dependent parts (`state`, `sdk`) load on first use, so the
agent can use `format`, `transfer`, `precopy` and `criu` on hosts without torch.

A workload uses `mesh.checkpoint.connect()` (see `mesh.checkpoint.sdk`); the agent drives
it through `mesh.checkpoint.agent_link.AgentLink` and `mesh.checkpoint.precopy`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["connect", "Checkpointer", "WorkloadState", "WorkloadStopped"]


def __getattr__(name: str) -> Any:
    if name in ("connect", "Checkpointer", "WorkloadStopped"):
        from mesh.checkpoint import sdk
        return getattr(sdk, name)
    if name == "WorkloadState":
        from mesh.checkpoint.state import WorkloadState
        return WorkloadState
    raise AttributeError(name)
