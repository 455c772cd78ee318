"""Resize by migration, end to end: real etcd, the control plane, agents as processes.

A MIG slice running tools/examples/train_mnist_like.py (a real PyTorch loop on the CPU) is
resized to a bigger profile: the workload is migrated (pre-copy) into a new MIG instance and
the placements are swapped, so the slice keeps its ID. The run is compared with an unmigrated
reference run of the same seed: same final step, bit-identical parameter checksum. A resize
that fits nowhere is refused with RESOURCE_EXHAUSTED and leaves the slice and the workload as
they were.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

from gpumesh.v1 import migration_service_pb2 as M  # noqa: E402
from gpumesh.v1 import types_pb2 as t  # noqa: E402
from mesh import errors  # noqa: E402
from mesh.migrationapi import migration_phase  # noqa: E402
from tests.integration.conftest import release_all, stop_running, wait_for  # noqa: E402
from tests.integration.test_migration import alive, last_step, lines, reference_checksums  # noqa: E402
from tests.integration.test_migration import check_result as check_continues  # noqa: E402
from tests.integration.test_migration_transparent import WHY_NOT as CRIU_MISSING  # noqa: E402
from tests.unit._checkpoint_util import ROOT  # noqa: E402
from tools.localcluster import LocalCluster  # noqa: E402

pytestmark = pytest.mark.integration
HOSTS = [{"node": "rz-a", "gpus": [{"model": "H100-80GB", "count": 2, "mig": True}]},
         {"node": "rz-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True},
                                   {"model": "H100-80GB", "count": 1, "mig": False}]}]
STEPS = 3000     # 60 s at 20 ms a step: the resize (target start included) ends long before, even on a slow host
TRAIN = [sys.executable, "-m", "tools.examples.train_mnist_like", "--steps", str(STEPS), "--sleep-ms", "20",
         "--print-every", "5"]


@pytest.fixture(scope="module")
def reference():
    return reference_checksums(STEPS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("resize")
    c = LocalCluster(d, HOSTS, lease_ttl=3, agents_per_process=1,
                     agent_args=["--workload-stop-grace-seconds", "2"])
    c.start(timeout=90)
    yield c
    c.stop()


@pytest.fixture
def mesh(cluster):
    cluster.wait_ready(timeout=30)
    with cluster.client(timeout=30) as client:
        client.cordon("rz-b")           # everything stays on rz-a: the same-node path
        yield client
        stop_running(client)
        release_all(client)
        client.uncordon("rz-b")


def check_result(mesh, wid, reference, started_at):
    """The moved run continues from `started_at` bit-identically (then it is stopped: the run is long
    only so that the resize lands mid-run on a slow machine)."""
    check_continues(mesh, wid, reference, started_at, steps=STEPS)


def start_training(mesh, profile="1g.10gb"):
    s = mesh.allocate(tenant="rz", mig_profile=profile).slices[0]
    w = mesh.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)})
    assert w.state == t.WORKLOAD_STATE_RUNNING
    wait_for(lambda: last_step(mesh, w.id) >= 10, 60, "training to reach step 10")
    return s, mesh.get_workload(w.id)


def test_resize_mig_slice_with_running_training_keeps_id_and_step(mesh, reference):
    s, w = start_training(mesh)
    new = mesh.resize(s.id, mig_profile="3g.40gb", timeout=300)
    assert new.id == s.id and new.profile == "3g.40gb" and new.state == t.SLICE_STATE_READY
    assert new.node == "rz-a" and new.device_uuid and new.device_uuid != s.device_uuid
    assert new.allocation_id == s.allocation_id and new.memory_bytes > s.memory_bytes
    assert mesh.get_slice(s.id).profile == "3g.40gb"
    m = mesh.list_migrations(workload_id=w.id)[-1]
    assert migration_phase(m) == "done" and m.reason == "resize" and m.resize_slice == s.id, m.message
    assert m.source_node == m.target_node == "rz-a" and 10 <= m.step < STEPS and m.rounds
    assert m.transfer in ("grpc", "shm")        # the channel the state took is on the record
    moved = mesh.get_workload(w.id)
    assert moved.slice_id == s.id and moved.node == "rz-a" and moved.pid != w.pid
    wait_for(lambda: not alive(w.pid), 30, "the source process to end")
    # the old placement is released; only the resized slice is left
    wait_for(lambda: [x.id for x in mesh.list_slices()] == [s.id], 30, "the old placement to be released")
    check_result(mesh, w.id, reference, started_at=m.step)     # continues from the exact step


def test_resize_to_another_node_when_the_node_is_full(mesh, reference):
    whole = mesh.allocate(tenant="rz", mig_profile="7g.80gb").slices[0]     # rz-a: one GPU taken whole
    s, w = start_training(mesh)                                              # the other GPU of rz-a
    mesh.uncordon("rz-b")
    new = mesh.resize(s.id, mig_profile="7g.80gb", timeout=300)              # fits on rz-b only
    assert new.id == s.id and new.profile == "7g.80gb" and new.node == "rz-b" and s.node == "rz-a"
    m = mesh.list_migrations(workload_id=w.id)[-1]
    assert migration_phase(m) == "done" and m.target_node == "rz-b" and m.source_node == "rz-a", m.message
    moved = mesh.get_workload(w.id)
    assert moved.slice_id == s.id and moved.node == "rz-b"
    wait_for(lambda: sorted(x.id for x in mesh.list_slices()) == sorted([s.id, whole.id]), 30,
             "the old placement to be released")
    check_result(mesh, w.id, reference, started_at=m.step)


def test_resize_that_cannot_fit_is_refused_and_changes_nothing(mesh):
    whole = mesh.allocate(tenant="rz", mig_profile="7g.80gb").slices[0]     # one GPU of rz-a taken whole
    s, w = start_training(mesh)
    before = mesh.get_slice(s.id)
    with pytest.raises(errors.ResourceExhausted):
        mesh.resize(s.id, mig_profile="7g.80gb", timeout=120)
    after = mesh.get_slice(s.id)
    assert (after.profile, after.device_uuid, after.node, after.gpu_index, after.state) == (
        before.profile, before.device_uuid, before.node, before.gpu_index, t.SLICE_STATE_READY)
    now = mesh.get_workload(w.id)
    assert now.state == t.WORKLOAD_STATE_RUNNING and now.pid == w.pid and now.slice_id == s.id
    step = last_step(mesh, w.id)
    wait_for(lambda: last_step(mesh, w.id) > step, 30, "training to go on")
    assert sorted(x.id for x in mesh.list_slices()) == sorted([s.id, whole.id])
    m = mesh.list_migrations()[-1]
    assert m.resize_slice == s.id and migration_phase(m) == "aborted"
    assert len([d for d in lines(mesh, w.id) if "started_at" in d]) == 1


def test_resize_idle_slice_replaces_it_under_the_same_id(mesh):
    s = mesh.allocate(tenant="rz", mig_profile="2g.20gb").slices[0]
    new = mesh.resize(s.id, mig_profile="1g.10gb", timeout=120)
    assert new.id == s.id and new.profile == "1g.10gb" and new.state == t.SLICE_STATE_READY
    assert new.device_uuid != s.device_uuid
    assert not s.HasField("resized_at") and new.HasField("resized_at")     # the autoresize cooldown's start
    wait_for(lambda: [x.id for x in mesh.list_slices()] == [s.id], 30, "the old placement to be released")
    got = mesh.get_slice(s.id)
    assert got.env["GPUMESH_SLICE_ID"] == s.id and got.env["CUDA_VISIBLE_DEVICES"] == got.device_uuid


def test_mps_slice_resizes_in_place_and_refuses_what_no_gpu_holds(mesh):
    mesh.uncordon("rz-b")
    s = mesh.allocate(tenant="rz", isolation="mps", memory_bytes=8 << 30, compute_share=0.25).slices[0]
    new = mesh.resize(s.id, memory_bytes=16 << 30, compute_share=0.5)
    assert (new.id, new.node, new.gpu_index, new.device_uuid) == (s.id, s.node, s.gpu_index, s.device_uuid)
    assert new.memory_bytes == 16 << 30 and new.compute_share == 0.5 and "in place" in new.message
    assert new.HasField("resized_at")
    mesh.allocate(tenant="rz", isolation="mps", memory_bytes=60 << 30, compute_share=0.25)   # same GPU
    with pytest.raises(errors.ResourceExhausted):
        mesh.resize(s.id, memory_bytes=30 << 30)     # no room in place, and no other GPU of this kind
    got = mesh.get_slice(s.id)
    assert got.memory_bytes == 16 << 30 and got.device_uuid == s.device_uuid and got.state == t.SLICE_STATE_READY
    assert got.resized_at == new.resized_at          # a refused resize is no resize


@pytest.mark.skipif(not CRIU_MISSING, reason="CRIU works here: transparent mode runs (tests/integration/"
                                             "test_migration_transparent.py); the refusal is for hosts without it")
def test_transparent_mode_is_refused_by_the_agent_naming_criu(mesh):
    _, w = start_training(mesh)
    before = len(mesh.list_migrations())
    with pytest.raises(errors.FailedPrecondition) as exc:
        mesh.migrate(w.id, mode="transparent")
    assert "criu" in str(exc.value).lower() and "rz-a" in str(exc.value)
    if "not installed" in str(exc.value) or "too old" in str(exc.value):
        assert ">= 4.0" in str(exc.value)          # the version needed
    now = mesh.get_workload(w.id)
    assert now.state == t.WORKLOAD_STATE_RUNNING and now.pid == w.pid
    assert len(mesh.list_migrations()) == before


@pytest.mark.parametrize("phase", ["copying", "committed"])
def test_control_plane_killed_during_a_resize(cluster, mesh, reference, phase):
    """kill -9 of the control plane with the resize held in a phase: before the commit it rolls
    back (the old slice and the source untouched), at the commit it finishes (new placement
    under the same slice ID, the target trains on from the exact step)."""
    cluster.controlplane_args = ["--migration-pause-at", phase]
    cluster.restart_controlplane(timeout=60)
    try:
        s, w = start_training(mesh)
        before = mesh.get_slice(s.id)

        def resize():
            try:
                mesh.resize(s.id, mig_profile="3g.40gb", timeout=300)
            except Exception:
                pass                    # the control plane dies under the call
        threading.Thread(target=resize, daemon=True).start()
        m = wait_for(lambda: next((x for x in mesh.list_migrations(workload_id=w.id)
                                   if migration_phase(x) == phase), None), 120, f"the resize to reach {phase}")
        if phase == "copying":
            time.sleep(1.0)             # the agents carry on: the target restores and holds
        cluster.controlplane_args = []
        cluster.restart_controlplane(kill=True, timeout=60)
        m = wait_for(lambda: (x := mesh.get_migration(m.id)).phase in (
            M.MIGRATION_PHASE_DONE, M.MIGRATION_PHASE_ABORTED) and x, 120, "the resize to end")
        now = mesh.get_workload(w.id)
        if phase == "committed":
            assert migration_phase(m) == "done", m.message
            got = mesh.get_slice(s.id)
            assert got.profile == "3g.40gb" and got.device_uuid != before.device_uuid and now.slice_id == s.id
            wait_for(lambda: not alive(w.pid), 30, "the source process to end")
            wait_for(lambda: [x.id for x in mesh.list_slices()] == [s.id], 30, "the old placement to be released")
            check_result(mesh, w.id, reference, started_at=m.step)
        else:
            assert migration_phase(m) == "aborted" and "restarted in phase " + phase in m.message, m.message
            got = mesh.get_slice(s.id)
            assert (got.profile, got.device_uuid, got.state) == ("1g.10gb", before.device_uuid, t.SLICE_STATE_READY)
            assert now.state == t.WORKLOAD_STATE_RUNNING and now.pid == w.pid and now.slice_id == s.id
            wait_for(lambda: [x.id for x in mesh.list_slices()] == [s.id], 30, "the reserved slice to be released")
            step = last_step(mesh, w.id)
            wait_for(lambda: last_step(mesh, w.id) > step, 30, "the source to train on")
    finally:
        cluster.controlplane_args = []
