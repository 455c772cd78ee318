"""A workload's network mode: the label `gpumesh.io/network` and what it may say.

- `host`: the workload shares the host's network namespace (every address and port of the host,
  behind the egress guard of nodeagent/isolation/egress.py).
- `none`: the workload gets a network namespace of its own with only a loopback interface, brought
  up (docker's `--network none`): it reaches nothing of the host or of other workloads, and nothing
  reaches it; its own 127.0.0.1 / ::1 work (a localhost rendezvous of its processes).
- `isolated`: `none` plus a veth pair into the agent's bridge with an address of the node's workload
  network (nodeagent/isolation/bridge.py): the host reaches the ports it serves; it still reaches nothing
  of the host, other workloads, or beyond.

The mode comes from the workload's label, else its slice's label, else the agent's `workload_network`
option. Model servers (a deployment's replicas: a run with a backend) always run in `host`: the gateway
must reach their port. `gpumesh.io/isolation=criu` workloads run without namespaces, so in `host`.

The API checks the label (`check_labels`); the agent decides the mode (`resolve`).
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh import errors

LABEL_NETWORK = "gpumesh.io/network"
HOST, NONE, ISOLATED = "host", "none", "isolated"
MODES = (HOST, NONE, ISOLATED)
OWN_NAMESPACE = (NONE, ISOLATED)        # the modes with a network namespace of the workload's own
ALLOWED = ("host (the host's network), none (its own namespace, loopback only) or isolated (its own namespace "
           "and an address on the node's workload bridge, reachable from the host only)")
LABEL_ISOLATION = "gpumesh.io/isolation"


def check_mode(value: str, field: str) -> str:
    """`value` if it is a network mode, else InvalidArgument naming `field`."""
    if value not in MODES:
        raise errors.InvalidArgument.of(field, f"{value!r} is not a network mode", ALLOWED)
    return value


def check_labels(labels: Mapping[str, str], prefix: str = "labels") -> str:
    """The network mode the labels ask for ("" when none) or InvalidArgument naming the label; a
    `gpumesh.io/isolation=criu` workload (no namespaces) cannot have `none`."""
    value = labels.get(LABEL_NETWORK, "")
    if not value:
        return ""
    check_mode(value, f"{prefix}[{LABEL_NETWORK}]")
    if value in OWN_NAMESPACE and labels.get(LABEL_ISOLATION, "") == "criu":
        raise errors.InvalidArgument.of(f"{prefix}[{LABEL_NETWORK}]", f"{value} needs a network namespace, which "
                                        f"{LABEL_ISOLATION}=criu workloads run without",
                                        f"host, or drop {LABEL_ISOLATION}=criu")
    return value


def check_model_server(labels: Mapping[str, str], prefix: str) -> None:
    """Model servers take inbound requests from the gateway on `backend_host`: only `host` (or no label)."""
    value = check_labels(labels, prefix)
    if value in OWN_NAMESPACE:
        raise errors.InvalidArgument.of(f"{prefix}[{LABEL_NETWORK}]", f"{value} is not possible for a model server "
                                        "(the gateway must reach its port)", "host, or no label")


def resolve(workload_labels: Mapping[str, str], slice_labels: Mapping[str, str], default: str, *,
            model_server: bool) -> str:
    """The mode a workload runs in: its label, else its slice's, else the agent's default; `host` for a
    model server and for a `gpumesh.io/isolation=criu` workload unless it asked for `none` itself (the
    API refuses that; an agent refuses it again)."""
    if model_server:
        return HOST
    own = workload_labels.get(LABEL_NETWORK, "")
    if own:
        return own
    if workload_labels.get(LABEL_ISOLATION, "") == "criu":
        return HOST
    return slice_labels.get(LABEL_NETWORK, "") or default
