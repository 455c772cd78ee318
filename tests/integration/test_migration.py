"""Live migration, checkpoint/restore and control-plane crashes, end to end.

Two agent processes (one node each, an H100 with MIG), the control plane and etcd; the
workload is tools/examples/train_mnist_like.py (a real PyTorch loop on the CPU) started
through the API. Every run is compared with an unmigrated reference run of the same seed:
bit-identical parameters at every printed step after the move.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time

import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

from gpumesh.v1 import migration_service_pb2 as M  # noqa: E402
from gpumesh.v1 import types_pb2 as t  # noqa: E402
from mesh.migrationapi import migration_phase  # noqa: E402
from tests.integration.conftest import client_for_test, json_lines, wait_for, workload_cluster  # noqa: E402
from tests.unit._checkpoint_util import ROOT, run_example  # noqa: E402

pytestmark = pytest.mark.integration
HOSTS = [{"node": "mig-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
         {"node": "mig-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
STEPS = 800      # 16 s at 20 ms a step: each migration (target start included) lands mid-run on a loaded machine
TRAIN = [sys.executable, "-m", "tools.examples.train_mnist_like", "--steps", str(STEPS), "--sleep-ms", "20",
         "--print-every", "5"]
KEY = base64.b64encode(bytes(range(32))).decode()


def reference_checksums(steps: int) -> dict[int, str]:
    """The unmigrated run's parameter checksum at every fifth step."""
    return {d["step"]: d["checksum"] for d in run_example("--steps", str(steps), "--print-every", "5")
            if "loss" in d}


@pytest.fixture(scope="module")
def reference():
    return reference_checksums(STEPS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("mig")
    (d / "keys.yaml").write_text(f"sealed: {KEY}\n")
    with workload_cluster(d, HOSTS, agent_args=["--workload-stop-grace-seconds", "2", "--checkpoint-dir",
                                                str(d / "store"), "--checkpoint-keys-file", str(d / "keys.yaml")]) as c:
        yield c


@pytest.fixture
def mesh(cluster):
    with client_for_test(cluster) as client:
        yield client


lines = json_lines


def last_step(mesh, wid) -> int:
    return max((d.get("step", 0) for d in lines(mesh, wid)), default=0)


LABELS = {"team": "research", "run": "lr-sweep-3"}


def start_training(mesh, tenant="mig", node=None):
    s = mesh.allocate(tenant=tenant, mig_profile="1g.10gb").slices[0]
    w = mesh.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)}, labels=LABELS)
    assert w.state == t.WORKLOAD_STATE_RUNNING
    wait_for(lambda: last_step(mesh, w.id) >= 10, 60, "training to reach step 10")
    return s, mesh.get_workload(w.id)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def check_kept(cluster, mesh, before, m):
    """After migration `m` the workload's record is `before`'s on the target (tenant, command, env, labels,
    created_at), with the target process's own pid, and the target agent's record keeps the same."""
    from google.protobuf import json_format
    now = wait_for(lambda: (x := mesh.get_workload(before.id)).pid not in (0, before.pid) and x, 30,
                   "the target's pid in the record")
    assert (now.node, now.slice_id) == (m.target_node, m.target_slice) and alive(now.pid)
    assert (now.tenant, list(now.command), dict(now.env), dict(now.labels), now.created_at) == (
        before.tenant, list(before.command), dict(before.env), LABELS, before.created_at)
    path, = cluster.state_dir.glob(f"agents/*/workloads/{m.target_node}/{before.id}.json")
    rec = json_format.ParseDict(json.loads(path.read_text())["workload"], t.Workload())
    assert (rec.tenant, dict(rec.labels), rec.env["PYTHONPATH"], rec.slice_id) == (
        before.tenant, LABELS, before.env["PYTHONPATH"], m.target_slice)
    assert not {"GPUMESH_RESTORE_FROM", "GPUMESH_RESTORE_HOLD"} & set(now.env)


def check_result(mesh, wid, reference, started_at=0, steps=STEPS):
    """The run goes on from `started_at` bit-identically to the unmigrated reference: its parameters
    match at every printed step for 100 steps past where it is now; then it is stopped (the run is
    long only so that a migration lands mid-run on a slow machine)."""
    goal = min(max(last_step(mesh, wid), started_at) + 100, steps)
    wait_for(lambda: last_step(mesh, wid) >= goal, 120, f"{wid} to train on")
    out = lines(mesh, wid)
    assert out[0]["started_at"] == started_at
    after = [d for d in out if "loss" in d and d["step"] > started_at]
    assert len(after) >= 20 and all(d["checksum"] == reference[d["step"]] for d in after)
    w = mesh.get_workload(wid)
    assert w.state in (t.WORKLOAD_STATE_RUNNING, t.WORKLOAD_STATE_SUCCEEDED), w.message
    if w.state == t.WORKLOAD_STATE_RUNNING:
        mesh.stop_workload(wid)
    return w


def test_live_migration_mid_training_is_bit_identical(cluster, mesh, reference):
    src_slice, w = start_training(mesh)
    m = mesh.migrate(w.id)
    assert migration_phase(m) == "planned" and m.source_node == w.node
    seen = [migration_phase(x) for x in mesh.watch_migration(m.id, timeout=120)]
    m = mesh.get_migration(m.id)
    assert migration_phase(m) == "done", m.message
    assert seen[-1] == "done" and "committed" in seen and "copying" in seen
    assert 10 <= m.step < STEPS and m.bytes_sent >= m.state_bytes > 0 and m.rounds
    moved = mesh.get_workload(w.id)
    assert moved.node == m.target_node != w.node and moved.slice_id == m.target_slice != src_slice.id
    wait_for(lambda: not alive(w.pid), 30, "the source process to end")
    check_kept(cluster, mesh, w, m)
    check_result(mesh, w.id, reference, started_at=m.step)
    assert mesh.list_migrations(workload_id=w.id)[-1].id == m.id


def test_a_process_without_the_sdk_is_refused_precopy_at_once(cluster, mesh):
    """A plain process has no checkpoint control socket: pre-copy, stop-and-copy and a resize by migration are
    refused when asked, naming why, instead of starting a target that never listens and rolling back after the
    step timeout (90 s of a CLI waiting). Nothing is left planned; the workload runs on where it was."""
    from mesh import errors
    s = mesh.allocate(tenant="nosdk", mig_profile="1g.10gb").slices[0]
    w = mesh.run_workload(s.id, ["sleep", "120"])
    for mode in ("precopy", "stop-and-copy"):
        with pytest.raises(errors.FailedPrecondition) as refused:
            mesh.migrate(w.id, mode=mode)
        assert "does not use the mesh.checkpoint SDK" in str(refused.value)
    with pytest.raises(errors.FailedPrecondition) as refused:
        mesh.resize(s.id, mig_profile="2g.20gb")
    assert "resize by migration" in str(refused.value) and "mesh.checkpoint SDK" in str(refused.value)
    assert not [m for m in mesh.list_migrations(workload_id=w.id)]
    now = mesh.get_workload(w.id)
    assert now.state == t.WORKLOAD_STATE_RUNNING and now.slice_id == s.id and now.pid == w.pid
    mesh.stop_workload(w.id)
    mesh.release(s.allocation_id)


def test_restore_from_the_store_after_the_source_agent_is_killed(cluster, mesh, reference, tmp_path):
    _, w = start_training(mesh, tenant="sealed")
    ck = mesh.checkpoint(w.id)
    assert ck.encrypted and ck.step >= 10 and ck.bytes > 0 and ck.workload_id == w.id
    store = cluster.state_dir / "store" / ck.path
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["extras"]["encryption"]["alg"] == "AES-256-GCM"
    assert all((store / e["file"]).read_bytes().startswith(b"GMENC2") for e in manifest["entries"])
    assert [c.id for c in mesh.list_checkpoints(workload_id=w.id)] == [ck.id]
    # the source host dies: its agent and the workload with it
    cluster.kill_agent(w.node)
    os.kill(w.pid, signal.SIGKILL)
    try:
        wait_for(lambda: mesh.get_workload(w.id).state == t.WORKLOAD_STATE_UNKNOWN, 30, "the workload to be UNKNOWN")
        m = mesh.wait_migration(mesh.restore(ck.id).id, timeout=120)
        assert migration_phase(m) == "done", m.message
        assert m.target_node != w.node and m.step == ck.step
        check_kept(cluster, mesh, w, m)
        check_result(mesh, w.id, reference, started_at=ck.step)
    finally:
        cluster.start_agent(w.node)
        cluster.wait_ready(nodes=[w.node], timeout=30)


PHASES = ["planned", "target_ready", "copying", "paused", "committed"]


def test_control_plane_crash_in_every_phase(cluster, mesh, reference):
    """kill -9 of the control plane with the migration held in each phase: before the commit it
    rolls back (the source trains on), at the commit it finishes (the target trains on); either
    way one copy runs and the final state equals the reference."""
    cluster.controlplane_args = ["--migration-pause-at", PHASES[0]]
    cluster.restart_controlplane(timeout=60)
    try:
        for i, phase in enumerate(PHASES):
            _, w = start_training(mesh)
            m = mesh.migrate(w.id)
            wait_for(lambda: migration_phase(mesh.get_migration(m.id)) == phase, 60, f"phase {phase}")
            if phase in ("copying", "paused"):
                time.sleep(1.0)          # the agents carry on: the target restores and holds
            cluster.controlplane_args = ["--migration-pause-at", PHASES[i + 1]] if i + 1 < len(PHASES) else []
            cluster.restart_controlplane(kill=True, timeout=60)
            m = wait_for(lambda: (x := mesh.get_migration(m.id)).phase in (
                M.MIGRATION_PHASE_DONE, M.MIGRATION_PHASE_ABORTED) and x, 90, f"the migration in {phase} to end")
            now = mesh.get_workload(w.id)
            if phase == "committed":
                assert migration_phase(m) == "done", m.message
                assert now.node == m.target_node != w.node
                wait_for(lambda: not alive(w.pid), 30, "the source process to end")
                check_kept(cluster, mesh, w, m)      # the commit's record and the recovery keep it whole
                check_result(mesh, w.id, reference, started_at=m.step)
            else:
                assert migration_phase(m) == "aborted" and "restarted in phase " + phase in m.message, m.message
                assert now.node == w.node and now.pid == w.pid        # the source, never replaced
                if m.target_slice:
                    wait_for(lambda: m.target_slice not in {s.id for s in mesh.list_slices()}, 30,
                             "the target slice to be released")
                check_result(mesh, w.id, reference, started_at=0)
    finally:
        cluster.controlplane_args = []
