"""`meshctl recommend --apply` moves a pack's slices to the GPUs the recommendation names, not merely to their nodes.

A pack recommendation lists each move as slice -> node/GPU (best fit: the GPU with the least free memory that
holds it). Its migration used to name only the node, and the scheduler then chose the GPU on that node by its own
scores (the default profile spreads an MPS slice onto the emptier GPU): the move landed on another GPU than the
one listed. Now the migration's target is pinned to the listed GPU (an internal field of the slice request, no API
field); when that GPU has no room for it any more the apply is refused (FAILED_PRECONDITION naming the GPU) and
nothing moves anywhere else.

Real slice controller (scheduler, fleet), real migration and workload managers and the real Recommender over an
in-memory fleet; etcd is an in-memory writer and no agent answers (the target slice stays PENDING: the test looks
at where it was placed)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from controlplane.controllers.migrations import MigrationManager
from controlplane.controllers.slices import Controller
from controlplane.controllers.workloads import WorkloadManager
from controlplane.cost.recommender import Recommender
from controlplane.cost.service import CostService
from controlplane.scheduler import profiles
from gpumesh.v1 import cost_service_pb2 as C
from gpumesh.v1 import types_pb2 as T
from mesh import errors, slicespec
from mesh.cost import PriceTable
from tests.unit._wait import until
from tests.unit.test_placement import make_fleet

GiB = 1 << 30
MODEL = "H100-80GB"


def _slice(sid: str, node: str, gpu: int, gib: int) -> T.Slice:
    return T.Slice(id=sid, allocation_id="a-" + sid, tenant="t", node=node, gpu_index=gpu,
                   gpu_uuid=f"GPU-{node}-{gpu}", gpu_model=MODEL, isolation=T.ISOLATION_MPS, memory_bytes=gib * GiB,
                   compute_share=0.1, state=T.SLICE_STATE_READY)


def world():
    """Node a: one MPS H100 with s-a (10 GiB, workload w-a). Node b: two MPS H100s, GPU 0 holding 20 GiB and GPU 1
    60 GiB. The pack of a's GPU moves s-a to b/1 (best fit: 20 GiB free); the default scheduler puts a 10 GiB MPS
    slice on b/0."""
    ctl = Controller(store=None, ready_timeout=600.0)
    ctl.recorder = SimpleNamespace(emit=lambda *a, **k: None)

    async def write(ops, conds=()):
        return 1
    ctl.writer = SimpleNamespace(write=write)
    fleet = make_fleet(("a", [(MODEL, False)]), ("b", [(MODEL, False)] * 2))
    ctl.fleet.nodes, ctl.fleet.index = fleet.nodes, fleet.index
    for s in (_slice("s-a", "a", 0, 10), _slice("s-b0", "b", 0, 20), _slice("s-b1", "b", 1, 60)):
        ctl.fleet.put_slice(s)
    wm = WorkloadManager(ctl)
    wm.workloads["w-a"] = T.Workload(id="w-a", tenant="t", node="a", slice_id="s-a", command=["train"],
                                     state=T.WORKLOAD_STATE_RUNNING)
    mm = MigrationManager(ctl, wm)

    async def sdk_answers(w, what="migration"):
        return None
    mm.check_sdk = sdk_answers          # no agent here: the workload's checkpoint SDK is taken to answer
    rec = Recommender(ctl, SimpleNamespace(store=SimpleNamespace(deployments={}, replicas={})), mm,
                      SimpleNamespace(prices=PriceTable({MODEL: 2.40}), observed={}))
    return ctl, mm, CostService(None, rec)


def call(svc: CostService, **kw) -> C.RecommendResponse:
    return CostService.Recommend.__wrapped__(svc, C.RecommendRequest(**kw), None)


def test_the_default_scheduler_would_put_the_moved_slice_on_the_other_gpu():
    ctl, _, _ = world()
    req = slicespec.validate(T.SliceSpec(tenant="t", gpu_model=MODEL, isolation=T.ISOLATION_MPS,
                                         memory_bytes=10 * GiB, compute_share=0.1))
    fw = profiles.build("default")
    got = fw.schedule(dataclasses.replace(req, avoid_nodes=("a",)), ctl.fleet).choices[0]
    assert (got.node, got.gpu_index) == ("b", 0)


async def test_the_pack_moves_the_slice_to_the_gpu_it_lists():
    ctl, mm, svc = world()
    (listed,) = (await call(svc, kinds=["pack"])).recommendations
    assert listed.id == "pack:a/0:s-a@w-a>b/1" and listed.target == "s-a->b/1"
    try:
        got = await call(svc, apply=True, ids=[listed.id])
        assert [r.result for r in got.recommendations] == ["applied"]
        (m,) = mm.migrations.values()
        await until(lambda: m.target_slice, "the migration to place its target")
        t = ctl.fleet.slices[m.target_slice]
        assert (t.node, t.gpu_index) == ("b", 1)           # the listed GPU, not the scheduler's b/0
    finally:
        await mm.stop()


async def test_a_listed_gpu_without_room_now_is_refused_and_nothing_moves_elsewhere():
    """b/1 filled up after the listing: the apply is refused naming b/1, no migration starts (the move is not
    placed on b/0, which still has room)."""
    ctl, mm, svc = world()
    (listed,) = (await call(svc, kinds=["pack"])).recommendations
    ctl.fleet.put_slice(_slice("s-new", "b", 1, 15))
    try:
        with pytest.raises(errors.FailedPrecondition, match=r"no longer holds: GPU b/1 has \S+ GiB free"):
            await call(svc, apply=True, ids=[listed.id])
        assert not mm.migrations
    finally:
        await mm.stop()


async def test_a_gpu_that_fills_while_the_move_is_planned_refuses_the_apply():
    """The recommendation holds when checked; b/1 fills while its migration is planned (the source agent's probe is
    awaited): the apply is refused as no longer holding, naming b/1, and no migration is recorded."""
    ctl, mm, svc = world()
    (listed,) = (await call(svc, kinds=["pack"])).recommendations

    async def meanwhile(w, what="migration"):
        ctl.fleet.put_slice(_slice("s-new", "b", 1, 15))
    mm.check_sdk = meanwhile
    try:
        with pytest.raises(errors.FailedPrecondition, match=r"pack of GPU a/0 no longer holds: GPU b/1 has \S+ GiB "
                                                            r"free now; slice s-a needs 10\.00 GiB \(not carried out"):
            await call(svc, apply=True, ids=[listed.id])
        assert not mm.migrations
    finally:
        await mm.stop()


async def test_a_move_refused_for_another_reason_is_a_failure_not_a_change():
    """Only a change of the listed GPU reads as the recommendation no longer holding; a move the migration refuses
    for what the workload does (its checkpoint SDK does not answer) is the step's failure, as before."""
    _, mm, svc = world()
    (listed,) = (await call(svc, kinds=["pack"])).recommendations

    async def sdk_silent(w, what="migration"):
        raise errors.FailedPrecondition(f"workload {w.id} does not use the checkpoint SDK")
    mm.check_sdk = sdk_silent
    try:
        got = await call(svc, apply=True, ids=[listed.id])
        (r,) = got.recommendations
        assert r.result.startswith("failed: workload w-a does not use the checkpoint SDK") and got.stopped
        assert not got.applied
        assert not mm.migrations
    finally:
        await mm.stop()


async def test_a_pinned_migration_is_refused_when_its_gpu_filled_after_the_check():
    """The room is checked again as the migration is planned (the recommendation's check and the migration are
    apart by awaits): a GPU that filled meanwhile refuses it, naming the GPU, and no migration is recorded."""
    ctl, mm, _ = world()
    ctl.fleet.put_slice(_slice("s-new", "b", 1, 15))
    try:
        with pytest.raises(errors.FailedPrecondition, match=r"GPU b/1 has \S+ GiB free.*s-a needs 10\.00 GiB"):
            await mm.migrate("w-a", to_node="b", to_gpu=1, reason="consolidation")
        assert not mm.migrations and not mm.planning
    finally:
        await mm.stop()


async def test_two_moves_pinned_to_one_gpu_count_each_other_before_either_is_placed():
    ctl, mm, _ = world()
    ctl.fleet.put_slice(_slice("s-a2", "a", 0, 12))
    mm.wm.workloads["w-a2"] = T.Workload(id="w-a2", tenant="t", node="a", slice_id="s-a2", command=["train"],
                                         state=T.WORKLOAD_STATE_RUNNING)
    try:
        first = await mm.migrate("w-a", to_node="b", to_gpu=1)
        assert not first.target_slice                        # its state machine has not placed it yet
        with pytest.raises(errors.FailedPrecondition, match=r"GPU b/1 has .*migration " + first.id):
            await mm.migrate("w-a2", to_node="b", to_gpu=1)
    finally:
        await mm.stop()


async def test_the_gpu_must_be_on_the_named_node():
    _, mm, _ = world()
    try:
        with pytest.raises(errors.InvalidArgument, match="to_gpu"):
            await mm.migrate("w-a", to_gpu=1)
        with pytest.raises(errors.FailedPrecondition, match="GPU b/7 is gone"):
            await mm.migrate("w-a", to_node="b", to_gpu=7)
    finally:
        await mm.stop()


async def test_a_gpu_holding_a_model_server_is_not_listed_for_packing():
    """A model server moves only by CRIU to another node (a deployment replaces its replicas instead), so a pack
    that migrates it could only fail on apply: the GPU is not listed. Nor is one whose slice runs nothing."""
    _, mm, svc = world()
    mm.wm.workloads["w-a"].backend.kind = "llama.cpp"
    assert not (await call(svc, kinds=["pack"])).recommendations
    del mm.wm.workloads["w-a"]
    assert not (await call(svc, kinds=["pack"])).recommendations
