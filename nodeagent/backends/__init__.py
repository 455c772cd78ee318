"""Model servers the agent starts as workloads (deployments' replicas; docs/serving.md).

A workload with a `backend` (types.proto ServingBackend) carries no command line: the agent builds it
here, for the backend's kind, with a TCP port it picks (a free one on `host`), and reports the address
in the workload's `endpoint`. The process then runs like any other workload (nodeagent/workloads.py):
under the shim, with the slice's environment, restarted or stopped by the control plane.
"""

from __future__ import annotations

import socket

from gpumesh.v1 import types_pb2

from nodeagent.backends import llamacpp

BUILDERS = {llamacpp.KIND: llamacpp.command}


def free_port(host: str) -> int:
    """A TCP port free on `host` now (the kernel's pick for port 0). The server binds it a moment later;
    a port taken meanwhile makes the backend fail to start, and the controller restarts it on another."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prepare(w: types_pb2.Workload, host: str, python: str) -> None:
    """Fill `w.command` and `w.endpoint` from `w.backend` (ValueError for an unknown kind)."""
    b = w.backend
    build = BUILDERS.get(b.kind)
    if build is None:
        raise ValueError(f"backend {b.kind!r} is not supported by this agent (supported: {', '.join(BUILDERS)})")
    port = free_port(host)
    del w.command[:]
    w.command.extend(build(b, host, port, python))
    w.endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
