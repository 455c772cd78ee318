"""The live control plane (Allocate through gRPC and etcd) and the replay's path (the scheduler
over a snapshot, as `meshctl sim` runs it) choose the same node, GPU and MIG start slot."""

from __future__ import annotations

import pytest

from controlplane.scheduler import profiles
from gpumesh.v1 import types_pb2 as t
from mesh.slicespec import validate
from tools.replay import sim

pytestmark = pytest.mark.integration
GiB = 1 << 30

SEQUENCE = [
    dict(gpu_model="A100-40GB", mig_profile="3g.20gb"),
    dict(gpu_model="A100-40GB", mig_profile="1g.5gb"),
    dict(gpu_model="A100-40GB", mig_profile="2g.10gb", count=2, topology=t.TOPOLOGY_SAME_NODE),
    dict(gpu_model="H100-80GB", mig_profile="1g.10gb"),
    dict(gpu_model="H100-80GB", mig_profile="3g.40gb"),
    dict(gpu_model="H100-80GB", mig_profile="2g.20gb"),
    dict(gpu_model="L4", memory_bytes=4 * GiB, isolation=t.ISOLATION_MPS, compute_share=0.25),
    dict(gpu_model="A100-40GB", mig_profile="1g.5gb", count=2),
]


def where(node, gpu_index, start):
    return node, gpu_index, start


def test_live_allocate_and_replay_choose_the_same_place(mesh):
    framework = profiles.build("default")   # the control plane's default profile, fresh like it
    for spec in SEQUENCE:
        fleet = sim.snapshot(mesh.list_nodes(), mesh.list_slices())
        want = [where(c.node, c.gpu_index, c.start) for c in
                sim.decide(framework, fleet, validate(t.SliceSpec(tenant="team-a", **spec)))]
        got = mesh.allocate(tenant="team-a", **spec).slices
        assert want, f"the replay path found no place for {spec}"
        assert [where(s.node, s.gpu_index, s.placement.start if s.profile else None) for s in got] == want, spec


def test_preemption_evicts_the_lower_priority_allocation_and_says_why(mesh):
    low = mesh.allocate(tenant="batch", gpu_model="L4", memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE,
                        priority=-5)
    with pytest.raises(Exception) as exc:   # no preempt flag: refused with reasons
        mesh.allocate(tenant="prod", gpu_model="L4", memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE, priority=50)
    assert "GPU is in use" in str(exc.value)
    high = mesh.allocate(t.SliceSpec(tenant="prod", gpu_model="L4", memory_bytes=GiB,
                                     isolation=t.ISOLATION_EXCLUSIVE, priority=50, preempt=True))
    (s,) = high.slices
    assert s.node == "gpu-b" and s.state == t.SLICE_STATE_READY
    gone = [x for x in mesh.list_slices(tenant="batch") if x.allocation_id == low.allocation_id]
    assert all(x.state == t.SLICE_STATE_RELEASING for x in gone)
    # batch is told it was preempted, not by whom (another tenant's allocation and name stay in the log)
    assert all("preempted by a higher-priority allocation (priority 50) of another tenant" in x.message
               and "prod" not in x.message for x in gone)
