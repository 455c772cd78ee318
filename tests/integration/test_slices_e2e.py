"""Slices end to end: real etcd, the control plane process, agent processes
over the simulated NVML, the SDK over real gRPC."""

from __future__ import annotations

import pytest

from gpumesh.v1 import types_pb2 as t
from mesh import errors
from mesh.client import slice_to_dict
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration
GiB = 1 << 30

H100_LAYOUTS = [
    ["1g.10gb"] * 7,
    ["4g.40gb", "3g.40gb"],
    ["2g.20gb"] * 3 + ["1g.10gb"],
]


@pytest.mark.parametrize("layout", H100_LAYOUTS, ids=["7x1g.10gb", "4g+3g", "3x2g+1g"])
def test_fill_h100_exactly_as_nvml_allows_then_refuse_release_and_reuse(mesh, layout):
    slices = []
    for profile in layout:
        resp = mesh.allocate(tenant="team-a", mig_profile=profile, gpu_model="H100-80GB")
        (s,) = resp.slices
        assert s.state == t.SLICE_STATE_READY and s.node == "gpu-a"
        assert s.device_uuid.startswith("MIG-") and s.env["CUDA_VISIBLE_DEVICES"] == s.device_uuid
        slices.append(s)
    assert len({s.device_uuid for s in slices}) == len(layout)
    assert len({s.placement.start for s in slices}) == len(layout)
    with pytest.raises(errors.ResourceExhausted) as exc:
        mesh.allocate(tenant="team-a", mig_profile="1g.10gb", gpu_model="H100-80GB")
    assert "no free 1g.10gb placement" in exc.value.reasons["H100-80GB"]
    # release one and the same placement is usable again
    freed = slices[-1]
    mesh.release(freed.id)
    with pytest.raises(errors.NotFound):
        mesh.get_slice(freed.id)
    again = mesh.allocate(tenant="team-a", mig_profile=freed.profile, gpu_model="H100-80GB").slices[0]
    assert again.placement.start == freed.placement.start and again.state == t.SLICE_STATE_READY
    (gpu,) = [g for g in mesh.list_gpus("gpu-a")]
    assert sorted(gpu.mig_layout) == sorted(f"{s.profile}@{s.placement.start}" for s in slices[:-1] + [again])


def test_shared_isolations_and_gangs(mesh):
    mps = mesh.allocate(tenant="team-b", memory_bytes=8 * GiB, isolation="mps", compute_share=0.25).slices[0]
    assert mps.node == "gpu-b" and mps.gpu_model == "L4" and mps.device_uuid.startswith("GPU-")
    assert mps.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert mps.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8192M"
    gang = mesh.allocate(tenant="team-b", mig_profile="7g.40gb", count=2, topology="same-nvlink").slices
    assert {s.gpu_index for s in gang} == {0, 1} and all(s.state == t.SLICE_STATE_READY for s in gang)
    assert len({s.allocation_id for s in gang}) == 1
    with pytest.raises(errors.ResourceExhausted):
        mesh.allocate(tenant="team-b", mig_profile="1g.5gb", count=2, gpu_model="A100-40GB")
    released = mesh.release(gang[0].allocation_id).slices
    assert {s.id for s in released} == {s.id for s in gang}


def test_bad_input_gets_the_right_status(mesh):
    with pytest.raises(errors.InvalidArgument) as exc:
        mesh.allocate(tenant="t", memory_bytes=-1)
    assert exc.value.field == "spec.memory_bytes"
    with pytest.raises(errors.InvalidArgument) as exc:
        mesh.allocate(tenant="t", memory_bytes=GiB, compute_share=1.5)
    assert exc.value.field == "spec.compute_share" and "(0, 1]" in str(exc.value)
    with pytest.raises(errors.InvalidArgument) as exc:
        mesh.allocate(tenant="t", memory_bytes=GiB, gpu_model="Voodoo5")
    assert exc.value.field == "spec.gpu_model" and "H100-80GB" in str(exc.value)
    with pytest.raises(errors.InvalidArgument) as exc:
        mesh.allocate(tenant="t", mig_profile="9g.90gb")
    assert exc.value.field == "spec.mig_profile"
    with pytest.raises(errors.InvalidArgument) as exc:
        mesh.allocate(tenant="t", memory_bytes=GiB, gpu_model="L4", isolation="mig")
    assert exc.value.field == "spec.isolation"
    with pytest.raises(errors.ResourceExhausted) as exc:
        mesh.allocate(tenant="t", mig_profile="7g.80gb", count=2)
    assert exc.value.reasons
    with pytest.raises(errors.NotFound):
        mesh.release("s-000000000000")
    with pytest.raises(errors.InvalidArgument):
        mesh.release("")
    with pytest.raises(errors.NotFound):
        mesh.get_node("no-such-node")
    assert mesh.list_slices() == []       # nothing was half-created by the refusals


def test_idempotent_allocate_with_request_id(mesh):
    a = mesh.allocate(tenant="t", mig_profile="1g.5gb", request_id="job-42")
    b = mesh.allocate(tenant="t", mig_profile="1g.5gb", request_id="job-42")
    assert a.allocation_id == b.allocation_id and [s.id for s in a.slices] == [s.id for s in b.slices]
    assert len(mesh.list_slices(tenant="t")) == 1


def test_watch_streams_slice_events(mesh):
    stream = mesh.watch_slices(tenant="watcher")      # returns once the watch is live
    s = mesh.allocate(tenant="watcher", mig_profile="1g.5gb").slices[0]
    mesh.release(s.id)
    seen = []
    with stream:
        for ev in stream:
            if ev.slice.id == s.id:
                seen.append((ev.type, ev.slice.state))
            if ev.type == 3:   # DELETED
                break
    states = [st for _, st in seen]
    assert seen[0][0] == 1 and states[0] == t.SLICE_STATE_PENDING          # ADDED, pending
    assert t.SLICE_STATE_READY in states and t.SLICE_STATE_RELEASING in states
    assert seen[-1][0] == 3


def test_cordon_and_drain(mesh):
    s = mesh.allocate(tenant="t", mig_profile="1g.10gb", gpu_model="H100-80GB").slices[0]
    assert s.node == "gpu-a"
    mesh.cordon("gpu-a")
    try:
        with pytest.raises(errors.ResourceExhausted) as exc:
            mesh.allocate(tenant="t", mig_profile="1g.10gb", gpu_model="H100-80GB")
        assert "node cordoned" in exc.value.reasons["H100-80GB"]
        dry = mesh.drain("gpu-a", dry_run=True)
        assert [x.id for x in dry.evicted] == [s.id] and mesh.get_slice(s.id).state == t.SLICE_STATE_READY
        out = mesh.drain("gpu-a")
        assert out.node.cordoned and [x.id for x in out.evicted] == [s.id]
        wait_for(lambda: not mesh.list_slices(node="gpu-a"), 30, "the drained slice to go")
    finally:
        mesh.uncordon("gpu-a")
    assert not mesh.get_node("gpu-a").cordoned
    assert mesh.allocate(tenant="t", mig_profile="1g.10gb", gpu_model="H100-80GB").slices[0].node == "gpu-a"


def test_controlplane_restart_loses_nothing(cluster, mesh):
    before = [mesh.allocate(tenant="keep", mig_profile=p).slices[0] for p in ("3g.40gb", "2g.10gb", "1g.5gb")]
    before += mesh.allocate(tenant="keep", memory_bytes=4 * GiB, isolation="timeshare").slices
    snapshot = sorted((slice_to_dict(s) for s in mesh.list_slices()), key=lambda d: d["id"])
    strip = lambda ds: [{k: v for k, v in d.items() if k not in ("updated_at", "message", "state")} for d in ds]
    for kill in (False, True):
        cluster.restart_controlplane(kill=kill)
        with cluster.client() as c:
            # every slice as it was; on a slow machine a node's lease can lapse during the restart, its
            # slices then read UNKNOWN until its agent reports again, and READY after that
            after = sorted((slice_to_dict(s) for s in c.list_slices()), key=lambda d: d["id"])
            assert strip(after) == strip(snapshot)
            wait_for(lambda: all(s.state == t.SLICE_STATE_READY for s in c.list_slices()), 60, "every slice READY")
            assert {n.name for n in c.list_nodes()} == {"gpu-a", "gpu-b"}
    # and it keeps working
    with cluster.client() as c:
        more = c.allocate(tenant="keep", mig_profile="1g.10gb").slices[0]
        assert more.state == t.SLICE_STATE_READY


def test_agent_restart_adopts_its_slices(cluster, mesh):
    mine = [mesh.allocate(tenant="adopt", mig_profile=p, gpu_model="A100-40GB").slices[0]
            for p in ("4g.20gb", "2g.10gb", "1g.5gb")]
    cluster.kill_agent("gpu-b")
    cluster.start_agent("gpu-b")
    cluster.wait_ready(nodes=["gpu-b"], timeout=30)
    wait_for(lambda: all(mesh.get_slice(s.id).state == t.SLICE_STATE_READY for s in mine), 60, "adoption")
    for s in mine:
        now = mesh.get_slice(s.id)
        assert now.device_uuid == s.device_uuid and now.gpu_instance_id == s.gpu_instance_id
    # no duplicate instance was created: the GPUs hold exactly the three placements
    layouts = {g.gpu.index: sorted(g.mig_layout) for g in mesh.list_gpus("gpu-b")}
    assert sum(len(v) for v in layouts.values()) == 3


def test_killed_agent_makes_node_not_ready_then_recovers(cluster, mesh):
    s = mesh.allocate(tenant="lost", mig_profile="1g.10gb", gpu_model="H100-80GB").slices[0]
    assert s.node == "gpu-a"
    cluster.kill_agent("gpu-a")
    wait_for(lambda: mesh.get_node("gpu-a").state == t.NODE_STATE_NOT_READY, 60, "NotReady")  # lease TTL 3 s
    assert mesh.get_slice(s.id).state == t.SLICE_STATE_UNKNOWN            # kept, not lost
    with pytest.raises(errors.ResourceExhausted) as exc:
        mesh.allocate(tenant="lost", mig_profile="1g.10gb", gpu_model="H100-80GB")
    assert "node not ready" in exc.value.reasons["H100-80GB"]
    cluster.start_agent("gpu-a")
    cluster.wait_ready(nodes=["gpu-a"], timeout=30)
    wait_for(lambda: mesh.get_slice(s.id).state == t.SLICE_STATE_READY, 60, "the slice to be READY again")
    assert mesh.get_slice(s.id).device_uuid == s.device_uuid
