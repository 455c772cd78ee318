"""Each agent registration is stamped (`Node.agent_registered_at`), the node's first one kept apart
(`registered_at`); LocalCluster.wait_ready waits for the registration of an agent it (re)started."""

from __future__ import annotations

import time

from controlplane.state import keys
from gpumesh.v1 import types_pb2 as T
from tests.unit._nodedelete_world import A, Etcd, control_plane, fleet, node
from tools.localprocs import registered_since as _registered_since


async def test_every_registration_is_stamped_and_the_first_one_is_kept():
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        first = await cp.nodes.register("n-new", node("n-new").inventory, "agent/1")
        assert first.HasField("registered_at") and first.agent_registered_at == first.registered_at
        time.sleep(0.01)
        again = await cp.nodes.register("n-new", node("n-new").inventory, "agent/2")   # a restarted agent
        assert again.registered_at == first.registered_at
        assert again.agent_registered_at.ToNanoseconds() > first.agent_registered_at.ToNanoseconds()
        stored = etcd.get(keys.node("n-new"), T.Node)
        assert stored.agent_registered_at == again.agent_registered_at and stored.agent_version == "agent/2"
        assert not etcd.get(keys.node(A), T.Node).HasField("agent_registered_at")     # a record from before it
    finally:
        await cp.stop()


def test_wait_ready_counts_a_node_once_the_agent_it_started_registered():
    n = T.Node(name="n", state=T.NODE_STATE_READY)
    assert _registered_since(n, 0.0)                       # no start of ours to wait for
    assert _registered_since(n, time.time())               # a control plane that does not stamp: its Ready
    n.agent_registered_at.FromNanoseconds(int((time.time() - 30) * 1e9))
    assert not _registered_since(n, time.time() - 5)       # the killed agent's registration, its lease not run out
    assert _registered_since(n, time.time() - 60)
