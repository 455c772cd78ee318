"""Which transport a mesh connection uses, how its bytes move, and why not RDMA (MeshService.Connect)."""

from __future__ import annotations

from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors

TRANSPORT_CHOICES = ("tcp", "shm", "verbs", "cuda_ipc")


def has_infiniband(node: types_pb2.Node) -> bool:
    return any(n.kind == "infiniband" for n in node.inventory.nics)


def choose_transport(node_a: types_pb2.Node, node_b: types_pb2.Node, transports_a, transports_b,
                     requested: str = "") -> tuple[str, str]:
    """(transport, why) for a connection between slices on these nodes; the best path the topology offers."""
    same = node_a.name == node_b.name
    verbs = "verbs" in transports_a and "verbs" in transports_b
    ib = has_infiniband(node_a) and has_infiniband(node_b)
    if requested:
        if requested not in TRANSPORT_CHOICES:
            raise errors.InvalidArgument.of("transport", f"unknown transport {requested!r}",
                                            "empty (from the topology), " + ", ".join(TRANSPORT_CHOICES))
        if requested in ("shm", "cuda_ipc") and not same:
            raise errors.FailedPrecondition(f"transport {requested} needs both slices on one node "
                                            f"({node_a.name} and {node_b.name} differ)")
        if requested == "verbs" and not verbs:
            raise errors.FailedPrecondition("transport verbs needs an RDMA device the agents can open on both "
                                            f"nodes ({node_a.name}, {node_b.name})")
        if requested == "cuda_ipc" and not ("cuda_ipc" in transports_a and "cuda_ipc" in transports_b):
            raise errors.FailedPrecondition(f"transport cuda_ipc needs CUDA (a GPU and a CUDA build of torch) in "
                                            f"the agent of node {node_a.name}")
        return requested, "requested"
    if same:
        return "shm", f"both slices on node {node_a.name}"
    if ib and verbs:
        return "verbs", "both nodes have InfiniBand and RDMA verbs"
    if ib:
        return "tcp", "both nodes have InfiniBand NICs but no RDMA device the agents can open"
    return "tcp", "different nodes without InfiniBand on both"


def same_host(a: M.BufferDescriptor, b: M.BufferDescriptor) -> bool:
    """Whether two buffers' data planes share an address (agents of simulated nodes on one host)."""
    host = lambda d: d.endpoint.rpartition(":")[0].strip("[]")   # noqa: E731
    return bool(host(a)) and host(a) == host(b)


def data_path(transport: str, same_node: bool, tls: bool) -> str:
    """How the bytes move (MeshConnection.data_path); `same_node`: both buffers on one host (one node,
    or agents whose data planes share an address: their channels are same-host, hence plaintext)."""
    if transport == "verbs":
        return "rdma"
    if transport == "tcp":
        return "tcp_tls" if tls and not same_node else "tcp"
    return transport


def fallback_reason(transport: str, why: str, na: types_pb2.Node, nb: types_pb2.Node, hello_a: M.MeshHello,
                    hello_b: M.MeshHello) -> str:
    """Why a connection does not use RDMA ("" when it does)."""
    if transport == "verbs":
        return ""
    if why == "requested":
        return f"transport {transport} was requested"
    if na.name == nb.name:
        return f"both slices on node {na.name}: same-host {transport} needs no NIC"
    out = []
    for n, h in ((na, hello_a), (nb, hello_b)):
        if not has_infiniband(n):
            out.append(f"node {n.name} has no InfiniBand NIC")
        elif "verbs" not in h.transports:
            out.append(f"node {n.name}: {h.verbs_unavailable or 'the agent offers no verbs transport'}")
    return "; ".join(out) or why
