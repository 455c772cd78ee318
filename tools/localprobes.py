"""Asking a local cluster's control planes (tools/localcluster.py) how the cluster is: which control plane leads,
and when the nodes are Ready."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tools.localprocs import ClusterError, registered_since


def leader_index(endpoints: list[str | None], running: Callable[[int], bool], client_auth: dict,
                 timeout: float) -> int:
    """Index of the control plane that leads (its health says SERVING) among `endpoints` (None: not started;
    `running(i)`: whether its process runs), waiting up to `timeout`."""
    from mesh.client import MeshClient
    deadline = time.monotonic() + timeout
    while True:
        for i, ep in enumerate(endpoints):
            if ep and running(i):
                try:
                    with MeshClient(ep, timeout=2.0, **client_auth) as c:
                        if c.health() == "serving":
                            return i
                except Exception:  # noqa: BLE001 - down or standby: try the next
                    pass
        if time.monotonic() > deadline:
            raise ClusterError(f"no control plane leads after {timeout:g}s")
        time.sleep(0.1)


def wait_nodes_ready(mesh, wanted: set[str], started: dict[str, float], check_running: Callable[[], None],
                     timeout: float, progress: Callable[[int, int], None] | None, logs: Path) -> list:
    """Poll AdminService.ListNodes (`mesh`, a MeshClient) until the `wanted` nodes are Ready; the Node messages.
    A node in `started` (its agent's start time) counts once that agent has registered since. `check_running()`
    raises when a process the nodes need has exited; `logs`: named when they are not Ready in time."""
    from gpumesh.v1 import types_pb2
    from mesh import errors
    deadline, last = time.monotonic() + timeout, -1
    while True:
        check_running()
        try:
            listed = mesh.list_nodes()
        except (errors.Unavailable, errors.DeadlineExceeded):
            listed = []
        ready = [n for n in listed if n.name in wanted and n.state == types_pb2.NODE_STATE_READY
                 and registered_since(n, started.get(n.name, 0.0))]
        if progress and len(ready) != last:
            progress(len(ready), len(wanted))
            last = len(ready)
        if len(ready) == len(wanted):
            return ready
        if time.monotonic() > deadline:
            missing = sorted(wanted - {n.name for n in ready})
            raise ClusterError(f"{len(missing)} node(s) not Ready after {timeout:g}s: "
                               f"{', '.join(missing[:10])}; logs in {logs}")
        time.sleep(0.2)
