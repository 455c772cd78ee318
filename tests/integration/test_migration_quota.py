"""Moving a slice of a full pool, or of a tenant at its tenants-file quota, on a real local cluster.

Two agent processes (one node each, an H100 with MIG), the control plane with a tenants file (TLS, tokens) and
etcd; the workload is tools/examples/train_mnist_like.py (the checkpoint SDK). `meshctl migrate` (the Migrate RPC)
and a node drain used to be refused for such a slice: the target slice and the source both counted, so the
scheduler answered "PoolExhausted: pool ... quota max_slices=1 reached" / "tenant q quota max_slices=1 exceeded",
the migration rolled back, and the drain evicted the workload. Now the target is a reservation for the source and
the pair counts once (docs/pools.md, docs/checkpointing.md); a new allocation is still refused throughout, and
once the moves are over the counts are back at the limit.
"""

from __future__ import annotations

import sys

import pytest
import yaml

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

from gpumesh.v1 import migration_service_pb2 as M  # noqa: E402
from gpumesh.v1 import types_pb2 as t  # noqa: E402
from mesh import errors, pools  # noqa: E402
from tests.integration.conftest import json_lines, wait_for, workload_cluster  # noqa: E402
from tests.integration.conftest import client_for_test  # noqa: E402
from tests.unit._checkpoint_util import ROOT  # noqa: E402

pytestmark = pytest.mark.integration
HOSTS = [{"node": "mig-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
         {"node": "mig-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
TRAIN = [sys.executable, "-m", "tools.examples.train_mnist_like", "--steps", "3000", "--sleep-ms", "20",
         "--print-every", "5"]
ADMIN = "admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("migquota")
    tenants = d / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({
        "tenants": {"q": {"quota": {"max_slices": 1}}, "pooled": {}},
        "tokens": [{"name": "ops", "role": "admin", "token": ADMIN}]}))
    tls = d / "tls"
    with workload_cluster(d / "cluster", HOSTS, tls_dir=tls, tenants_file=str(tenants),
                          client_auth={"token": ADMIN, "ca": str(tls / "ca.crt")},
                          agent_args=["--workload-stop-grace-seconds", "2"]) as c:
        yield c


@pytest.fixture
def mesh(cluster):
    with client_for_test(cluster, stop_workloads=True) as client:
        yield client


def last_step(mesh, wid) -> int:
    return max((d.get("step", 0) for d in json_lines(mesh, wid)), default=0)


def training(mesh, tenant: str, labels: dict):
    s = mesh.allocate(tenant=tenant, mig_profile="1g.10gb", labels=labels).slices[0]
    w = mesh.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)})
    wait_for(lambda: last_step(mesh, w.id) >= 10, 60, "training to reach step 10")
    return s, w


def refused(mesh, tenant: str, labels: dict, why: str) -> None:
    with pytest.raises(errors.ResourceExhausted, match=why):
        mesh.allocate(tenant=tenant, mig_profile="1g.10gb", labels=labels, no_wait=True)


def moved(mesh, w, m: M.Migration, tenant: str, labels: dict, why: str) -> t.Workload:
    """Migration `m` of `w` ends DONE (a new allocation refused while it runs and after), the workload trains on."""
    refused(mesh, tenant, labels, why)              # the reservation opens no room
    done = mesh.wait_migration(m.id, timeout=300)
    assert done.phase == M.MIGRATION_PHASE_DONE, done.message
    now = mesh.get_workload(w.id)
    assert (now.node, now.slice_id) == (done.target_node, done.target_slice)
    step = last_step(mesh, w.id)
    wait_for(lambda: last_step(mesh, w.id) > step, 60, "the moved workload to train on")
    refused(mesh, tenant, labels, why)
    return now


def drain_moves(mesh, w, tenant: str, labels: dict, why: str) -> t.Workload:
    """A drain of the workload's node moves it (not evicted), then the node is uncordoned."""
    node = mesh.get_workload(w.id).node
    try:
        mesh.drain(node)
        m = next(m for m in mesh.list_migrations(workload_id=w.id) if m.reason == "drain")
        assert m.phase == M.MIGRATION_PHASE_DONE, m.message
        now = mesh.get_workload(w.id)
        assert now.state == t.WORKLOAD_STATE_RUNNING and now.node != node and now.slice_id == m.target_slice
    finally:
        mesh.uncordon(node)
    return now


def test_a_full_pools_slice_is_migrated_and_drained(mesh):
    mesh.create_pool({"name": "full", "quota": {"max_slices": 1}})
    labels = {pools.LABEL: "full"}
    why = 'pool "full" quota max_slices=1'
    s, w = training(mesh, "pooled", labels)
    refused(mesh, "pooled", labels, why)
    now = moved(mesh, w, mesh.migrate(w.id), "pooled", labels, why)
    # `migrate` leaves the client's source slice allocated: once the move is over it counts again
    assert mesh.get_pool("full").usage.slices == 2
    mesh.release(s.id)
    wait_for(lambda: mesh.get_pool("full").usage.slices == 1, 30, "the released source to leave the pool")
    now = drain_moves(mesh, now, "pooled", labels, why)
    wait_for(lambda: mesh.get_pool("full").usage.slices == 1, 30, "the drained source to be evicted")
    refused(mesh, "pooled", labels, why)
    mesh.stop_workload(w.id)
    mesh.release(now.slice_id)
    wait_for(lambda: mesh.get_pool("full").usage.slices == 0, 30, "the pool empty")


def test_a_tenant_at_its_quota_has_its_slice_migrated_and_drained(mesh):
    why = "tenant q quota max_slices=1 exceeded"
    s, w = training(mesh, "q", {})
    refused(mesh, "q", {}, why)
    now = moved(mesh, w, mesh.migrate(w.id), "q", {}, why)
    mesh.release(s.id)
    wait_for(lambda: len(mesh.list_slices(tenant="q")) == 1, 30, "the released source gone")
    now = drain_moves(mesh, now, "q", {}, why)
    wait_for(lambda: len(mesh.list_slices(tenant="q")) == 1, 30, "the drained source evicted")
    refused(mesh, "q", {}, why)
    mesh.stop_workload(w.id)
    mesh.release(now.slice_id)
    wait_for(lambda: not mesh.list_slices(tenant="q"), 30, "the tenant's slices gone")
    mesh.allocate(tenant="q", mig_profile="1g.10gb", no_wait=True)      # the count is back: one fits again
