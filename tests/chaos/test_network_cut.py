"""Scenario 3: cut an agent off the network (a network namespace, nftables dropping its traffic).

The control plane listens on a bridge address in the root namespace; agent `cut-a` runs inside the
namespace gpm-cut (veth into the bridge gpmcbr0, 10.231.1.0/24: apart from tests/integration/test_mesh.py's
gpm-a/gpm-b, gpmbr0, 10.231.0.0/24), agent `cut-b` in the root namespace. With slices READY on cut-a,
an nft table `inet gpumesh_chaos` inside the namespace drops everything on its eth0: the node must go
NotReady within the lease TTL (plus slack) with its slices UNKNOWN, and allocations meanwhile go to
cut-b. Once the table is deleted the agent re-registers and reconciles: the same slices READY again with
the same device UUIDs, and the invariant checker finds nothing over-committed and no overlapping placement.
Only loopback and the addresses made here carry traffic; the namespace, links and table are removed in
`finally` whatever happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from gpumesh.v1 import types_pb2
from tests.chaos import invariants
from tests.chaos.conftest import wait_for
from tools.localcluster import LocalCluster

TENANT = "chaos"
LEASE_TTL = 3
NS = "gpm-cut"
BRIDGE = "gpmcbr0"
VETH = "gpmcv0"
CP_ADDR, AGENT_ADDR = "10.231.1.1", "10.231.1.2"
TABLE = "gpumesh_chaos"
HOSTS = [{"node": "cut-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
         {"node": "cut-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]


def _run(*argv, check=True):
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


def _unavailable() -> str:
    if os.geteuid() != 0:
        return "network namespaces and nftables need root"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"the `{tool}` command ({pkg}) is not installed"
    probe = _run("ip", "netns", "add", "gpm-cut-probe", check=False)
    if probe.returncode != 0:
        return f"`ip netns add` does not work here: {probe.stderr.strip()}"
    try:
        nft = _run("ip", "netns", "exec", "gpm-cut-probe", "nft", "add", "table", "inet", TABLE, check=False)
        if nft.returncode != 0:
            return f"nftables does not work here: {nft.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", "gpm-cut-probe", check=False)
    return ""


def _teardown() -> None:
    _run("ip", "netns", "exec", NS, "nft", "delete", "table", "inet", TABLE, check=False)
    _run("ip", "netns", "del", NS, check=False)
    _run("ip", "link", "del", VETH, check=False)
    _run("ip", "link", "del", BRIDGE, check=False)


def _setup() -> None:
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{CP_ADDR}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    _run("ip", "netns", "add", NS)
    _run("ip", "link", "add", VETH, "type", "veth", "peer", "name", "eth0", "netns", NS)
    _run("ip", "link", "set", VETH, "master", BRIDGE, "up")
    _run("ip", "-n", NS, "addr", "add", f"{AGENT_ADDR}/24", "dev", "eth0")
    _run("ip", "-n", NS, "link", "set", "eth0", "up")
    _run("ip", "-n", NS, "link", "set", "lo", "up")


def _cut() -> None:
    """Drop every packet in and out of the namespace's eth0 (its loopback keeps working)."""
    nft = ["ip", "netns", "exec", NS, "nft"]
    _run(*nft, "add", "table", "inet", TABLE)
    for chain, hook, iface in (("in", "input", "iifname"), ("out", "output", "oifname")):
        _run(*nft, "add", "chain", "inet", TABLE, chain, f"{{ type filter hook {hook} priority 0 ; policy accept ; }}")
        _run(*nft, "add", "rule", "inet", TABLE, chain, iface, "eth0", "drop")


def _restore() -> None:
    _run("ip", "netns", "exec", NS, "nft", "delete", "table", "inet", TABLE)


def _node_state(mesh, name):
    return mesh.get_node(name).state


def test_agent_cut_off_the_network(tmp_path, figures):
    why = _unavailable()
    if why:
        pytest.skip(why)
    _teardown()
    cluster = None
    try:
        _setup()
        cluster = LocalCluster(tmp_path, HOSTS, lease_ttl=LEASE_TTL, agents_per_process=1, etcd_members=1,
                               log_level="warning")
        cluster.endpoint = f"{CP_ADDR}:0"        # the control plane listens on the bridge, root namespace
        cluster.start_controlplane(60)
        python = cluster.python
        proc = cluster._agent_proc("cut-a")      # cut-a's agent runs inside the namespace
        proc.argv = ["ip", "netns", "exec", NS, python, *proc.argv[1:]]
        cluster.agents["cut-a"] = proc
        cluster._spawn(proc)
        cluster.start_agent("cut-b")
        cluster.wait_ready(60)
        acked: dict[str, str] = {}
        with cluster.client(timeout=30) as mesh:
            mesh.cordon("cut-b")
            before = {}
            for i in range(2):
                resp = mesh.allocate(tenant=TENANT, mig_profile="3g.40gb", request_id=f"cut-{i}")
                acked[f"cut-{i}"] = resp.allocation_id
                for s in resp.slices:
                    assert s.node == "cut-a" and s.state == types_pb2.SLICE_STATE_READY
                    before[s.id] = s.device_uuid
            mesh.uncordon("cut-b")

            cut_at = time.monotonic()
            _cut()
            wait_for(lambda: _node_state(mesh, "cut-a") == types_pb2.NODE_STATE_NOT_READY, LEASE_TTL + 6,
                     "cut-a NotReady after the lease TTL")
            not_ready = time.monotonic() - cut_at
            wait_for(lambda: all(mesh.get_slice(sid).state == types_pb2.SLICE_STATE_UNKNOWN for sid in before),
                     5, "cut-a's slices UNKNOWN")
            # While cut off, new allocations go elsewhere (cut-a's capacity is kept for its slices).
            during = []
            for i in range(2):
                resp = mesh.allocate(tenant=TENANT, mig_profile="3g.40gb", request_id=f"during-{i}")
                acked[f"during-{i}"] = resp.allocation_id
                during += resp.slices
            assert {s.node for s in during} == {"cut-b"}, [(s.id, s.node) for s in during]
            cut_for = time.monotonic() - cut_at

            restored_at = time.monotonic()
            _restore()
            cluster.wait_ready(60, nodes=["cut-a"])
            back = time.monotonic() - restored_at

            def reconciled():
                got = {sid: mesh.get_slice(sid) for sid in before}
                return all(s.state == types_pb2.SLICE_STATE_READY for s in got.values()) and got
            got = wait_for(reconciled, 30, "cut-a's slices READY again")
            reconcile = time.monotonic() - restored_at
            assert {sid: s.device_uuid for sid, s in got.items()} == before, "device UUIDs changed"
            assert {s.node for s in mesh.list_slices(tenant=TENANT)} == {"cut-a", "cut-b"}
        rep = invariants.check(cluster.etcd_endpoints, tenant=TENANT, acked=acked)
        assert rep.ok, str(rep)
        assert rep.allocations == 4
        figures["3-agent-network-cut"] = {
            "allocations": len(acked), "faults": 1, "lease_ttl_seconds": LEASE_TTL,
            "not_ready_seconds": round(not_ready, 2), "cut_seconds": round(cut_for, 2),
            "allocations_elsewhere_while_cut": len(during), "reregistered_seconds": round(back, 2),
            "reconcile_seconds": round(reconcile, 2), "same_device_uuids": len(before),
            "lost": len(rep.lost), "duplicated": len(rep.duplicated), "violations": len(rep.violations)}
    finally:
        try:
            if cluster is not None:
                cluster.stop(grace=5)
        finally:
            _teardown()
