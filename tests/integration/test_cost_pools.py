"""Resource pools, cost accounting and consolidation on a real local cluster: etcd, the control plane, two
simulated H100 hosts' agents (no MIG: replicas get MPS shares), and real llama.cpp servers loading the real
SmolLM2-135M GGUF.

- a pool's quota limits a deployment: the replica beyond it stays PENDING with the pool named, in its
  message and an event, PoolService.Get reports the usage and no room; raising the quota lets it through;
- `meshctl cost` adds up to the slice-seconds the cluster ran, checked against the slice records' creation
  times and the release time (within one accounting interval), also across a control-plane restart;
- `meshctl recommend --apply` moves a replica sized for 4 sequences, measured at 1, to a smaller slice,
  and the deployment answers a completion before, during and after; the gateway's /metrics carries the
  model's cost;
- an idle warm slice is counted apart and released by `recommend --apply --kind idle-warm`; two idle READY
  replicas are counted as idle replica cost and `recommend --apply --kind idle-replica` scales the deployment
  down by one, never to zero;
- the autoscaler scales a pooled deployment within the pool's room and says so (bound_by pool, PoolLimit);
- a drain of the node of a deployment's replica that fills its pool replaces the replica all the same (the
  replacement counts once with the old replica until that is removed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from gpumesh.v1 import deployment_service_pb2 as D
from mesh import errors
from tests.integration.conftest import wait_for
from tests.integration.serving import completion, h100_hosts, llama_env, started_cluster
from tests.integration.serving import module_mesh, smollm2_model  # noqa: F401 - fixtures mesh, smollm2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
HOSTS = h100_hosts(2, mig=False)
READY = D.REPLICA_STATE_READY
SLOW = 240
INTERVAL = 1.0          # the accountant's interval in this cluster
PRICE = 2.49            # H100-80GB's default price (gpu_prices)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with started_cluster(tmp_path_factory, "cost", HOSTS, env=llama_env(), gateway=True,
                         controlplane_args=["--deployment-backoff-seconds", "0.5", "--deployment-backoff-max-seconds",
                                            "2", "--cost-interval-seconds", str(INTERVAL),
                                            "--cost-recommend-observe-seconds", "4",
                                            "--autoscaler-interval-seconds", "0.5"]) as c:
        yield c


def meshctl(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "--endpoint", cluster.endpoint, *args],
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p


def _ts(t) -> float:
    return t.seconds + t.nanos / 1e9


def test_bad_pools_and_unknown_pool_are_refused(cluster, mesh, smollm2):
    p = meshctl(cluster, "create", "pool", "bad", "--gpu-model", "H900", check=False)
    assert p.returncode != 0 and "pool.selector.gpu_models[0]" in p.stderr and "H100-80GB" in p.stderr
    p = meshctl(cluster, "create", "pool", "bad", "--max-slices", "-1", check=False)
    assert p.returncode != 0 and "pool.quota.max_slices" in p.stderr
    with pytest.raises(errors.InvalidArgument) as e:
        mesh.deploy("smollm2", name="nopool", pool="missing", context=512)
    assert e.value.field == "spec.pool"
    p = meshctl(cluster, "cost", "--by", "gpu", check=False)
    assert p.returncode != 0 and "--by" in p.stderr and "tenant" in p.stderr
    p = meshctl(cluster, "cost", "--since", "yesterday", check=False)
    assert p.returncode != 0 and "--since" in p.stderr


def test_pool_quota_limits_a_deployment(cluster, mesh, smollm2):
    meshctl(cluster, "create", "pool", "inference-a", "--gpu-model", "H100-80GB", "--isolation", "mps",
            "--max-slices", "1")
    mesh.deploy("smollm2", name="pooled", replicas=2, context=512, pool="inference-a")

    def one_ready_one_refused():
        d = mesh.get_deployment("pooled")
        ready = [r for r in d.replicas if r.state == READY]
        pending = [r for r in d.replicas if r.state == D.REPLICA_STATE_PENDING]
        return (d, pending[0]) if len(ready) == 1 and pending and "PoolExhausted" in pending[0].message else None
    d, pending = wait_for(one_ready_one_refused, SLOW, "one replica READY, the other refused by the pool", interval=0.5)
    assert 'pool "inference-a" quota max_slices=1 reached' in pending.message
    ready = next(r for r in d.replicas if r.state == READY)
    assert ready.isolation == 2          # MPS: the pool's only isolation kind, though the spec left it unspecified
    avail = wait_for(lambda: next((c for c in mesh.get_deployment("pooled").status.conditions
                                   if c.type == "Available" and c.reason == "PoolExhausted"), None),
                     30, "the Available condition naming the pool")
    assert not avail.status and 'pool "inference-a"' in avail.message
    p = mesh.get_pool("inference-a")
    assert p.usage.slices == 1 and p.usage.available_slices == 0 and list(p.usage.deployments) == ["pooled"]
    assert p.usage.capacity_gpus == 2 and p.usage.dollars_per_hour > 0
    evs = wait_for(lambda: [e for e in mesh.list_events(kind="Deployment", name="pooled")
                            if e.reason == "PoolExhausted"], 30, "a PoolExhausted event")
    assert "inference-a" in evs[0].message
    table = meshctl(cluster, "get", "pools").stdout
    assert "inference-a" in table and "1/1" in table and "pooled" in table
    desc = wait_for(lambda: (lambda out: out if "PoolExhausted" in out else None)(
        meshctl(cluster, "describe", "pool", "inference-a").stdout), 30, "the pool's PoolExhausted event")
    assert "Deployments:   pooled" in desc and "max_slices:           1" in desc
    events = desc[desc.index("Events:"):]                # the pool's own events, as describe deployment shows its
    assert "Created" in events and "deployment pooled: replica r-" in events and "quota max_slices=1" in events
    # still refused after a while (not a race): then a larger quota lets the second replica through
    time.sleep(3)
    assert sum(r.state == READY for r in mesh.get_deployment("pooled").replicas) == 1
    meshctl(cluster, "update", "pool", "inference-a", "--max-slices", "2")
    assert mesh.get_pool("inference-a").selector.isolations == [2]          # the other fields kept
    wait_for(lambda: mesh.get_deployment("pooled").status.ready_replicas == 2, SLOW, "both replicas READY")
    assert any(e.reason == "Updated" and "quota.max_slices 1 -> 2" in e.message
               for e in mesh.list_events(kind="Pool", name="inference-a"))
    with pytest.raises(errors.FailedPrecondition, match="pooled"):
        mesh.delete_pool("inference-a")
    mesh.undeploy("pooled")
    wait_for(lambda: not mesh.get_pool("inference-a").usage.slices, 60, "the pool's slices released")
    wait_for(lambda: _deleted(mesh, "inference-a"), 60, "the pool deleted once unused")


def test_a_full_pools_replica_on_a_drained_node_is_replaced(cluster, mesh, smollm2):
    """A drain's replacement counts once with the replica it replaces: in a pool of one slice, full with the
    deployment's one replica, a drain of its node places the replacement on the other node (it was refused with
    PoolExhausted and the old replica stayed for ever, Draining: NoRoomForReplacement), the old replica goes once
    the new one is READY, and the pool never counts more than its one slice."""
    meshctl(cluster, "create", "pool", "drainpool", "--isolation", "mps", "--max-slices", "1")
    mesh.deploy("smollm2", name="drainpooled", replicas=1, context=512, pool="drainpool")
    old = wait_for(lambda: (lambda d: d.replicas[0] if len(d.replicas) == 1 and d.replicas[0].state == READY
                            else None)(mesh.get_deployment("drainpooled")), SLOW, "the replica READY")
    assert mesh.get_pool("drainpool").usage.slices == 1
    try:
        mesh.drain(old.node)

        def replaced():
            d = mesh.get_deployment("drainpooled")
            assert mesh.get_pool("drainpool").usage.slices <= 1, "the pool counted the pair twice"
            assert not any(r.state == D.REPLICA_STATE_PENDING and "PoolExhausted" in r.message for r in d.replicas), \
                f"the replacement was refused by the pool: {d.replicas}"
            return d if [r.id for r in d.replicas if r.state == READY] not in ([], [old.id]) and \
                old.id not in {r.id for r in d.replicas} else None
        d = wait_for(replaced, SLOW, "the replacement READY and the old replica removed", interval=0.5)
        new = d.replicas[0]
        assert new.node != old.node and completion(mesh, new)
        labels = next(s.labels for s in mesh.list_slices() if s.id == new.slice_id)
        assert labels["gpumesh.replaces"] == old.slice_id
        wait_for(lambda: old.slice_id not in {s.id for s in mesh.list_slices()}, 60, "the old replica's slice gone")
        assert mesh.get_pool("drainpool").usage.slices == 1          # the replacement alone: where it began
        assert "Draining" not in {c.type for c in mesh.get_deployment("drainpooled").status.conditions}
    finally:
        mesh.uncordon(old.node)
    mesh.undeploy("drainpooled")
    wait_for(lambda: not mesh.get_pool("drainpool").usage.slices, 60, "the pool's slices released")
    wait_for(lambda: _deleted(mesh, "drainpool"), 60, "the pool deleted once unused")


def _deleted(mesh, name) -> bool:
    try:
        mesh.delete_pool(name)
        return True
    except errors.FailedPrecondition:
        return False


def test_cost_adds_up_to_slice_seconds(cluster, mesh):
    a = mesh.allocate(tenant="team-cost", memory_bytes=16 * 2**30, isolation="mps").slices[0]
    b = mesh.allocate(tenant="team-cost", memory_bytes=8 * 2**30, isolation="mps").slices[0]
    time.sleep(4)
    asked_release_b = time.time()         # b is charged up to its deletion, which comes after this
    mesh.release(b.allocation_id)
    released_b = time.time()
    wait_for(lambda: b.id not in {s.id for s in mesh.list_slices(tenant="team-cost")}, 60, "slice b gone")
    gone_b = time.time()                  # its deletion is written within an etcd write of this

    def lines():
        doc = json.loads(meshctl(cluster, "cost", "--by", "slice", "--since", "1h", "-o", "json").stdout)
        return {ln["key"]: ln for ln in doc["lines"]}, doc
    ran_b = released_b - _ts(b.created_at)
    slack = INTERVAL + 1.0        # one accounting interval, plus the accountant's own time

    def charged():
        """The charges once the accountant (a background loop) has run since b's release and charged a up to
        within `slack` of the moment asked (measured before the command: its start-up is not the accountant's
        lag); a loaded machine may take a few passes to get there."""
        asked = time.time()
        got, doc = lines()
        if a.id not in got or b.id not in got:
            return None
        seconds_a = got[a.id]["slice_seconds"]
        caught_up = seconds_a >= asked - _ts(a.created_at) - slack and seconds_a > released_b - _ts(a.created_at)
        # b up to its release (it was charged up to the last accounting before it, losing up to an interval)
        return (got, doc) if caught_up and got[b.id]["slice_seconds"] >= asked_release_b - _ts(b.created_at) else None
    got, doc = wait_for(charged, 60, "the accountant to charge slice a up to now and slice b up to its release")
    ran_a = time.time() - _ts(a.created_at)
    assert doc["interval_seconds"] == INTERVAL
    assert got[a.id]["slice_seconds"] <= ran_a + 0.5, (got[a.id], ran_a)       # never more than it ran
    assert got[b.id]["slice_seconds"] <= gone_b - _ts(b.created_at) + slack, (got[b.id], ran_b)
    # dollars are GPU-seconds (seconds x share) at the H100's price
    for ln in (got[a.id], got[b.id]):
        assert ln["dollars"] == pytest.approx(ln["gpu_seconds"] * PRICE / 3600, rel=1e-6)
        assert 0 < ln["gpu_seconds"] < ln["slice_seconds"]
    assert got[a.id]["gpu_seconds"] / got[a.id]["slice_seconds"] == pytest.approx(16 / 79.6, rel=0.05)
    # by tenant: the same total
    by_tenant = {ln["key"]: ln for ln in json.loads(
        meshctl(cluster, "cost", "--by", "tenant", "--since", "1h", "-o", "json").stdout)["lines"]}
    assert by_tenant["team-cost"]["slice_seconds"] >= got[a.id]["slice_seconds"] + got[b.id]["slice_seconds"] - 0.01
    assert by_tenant["team-cost"]["dollars_per_hour"] == pytest.approx(
        16 * 2**30 / (81559 * 2**20) * PRICE, rel=0.02)      # only a is live
    text = urllib.request.urlopen(f"http://{cluster.metrics_endpoint}/metrics", timeout=10).read().decode()
    assert 'gpumesh_cost_dollars_total{deployment="",model="",node="' in text and 'tenant="team-cost"' in text

    # a control-plane restart loses nothing of a live slice: the time it was down is charged after it
    before = got[a.id]["slice_seconds"]
    cluster.restart_controlplane()
    mesh_after = cluster.client()
    try:
        def charged_after_the_restart():
            """a's charge once the restarted accountant has run and caught up to within `slack` (and the restart's
            second) of the moment asked: the time the control plane was down is charged too."""
            asked = time.time()
            doc = mesh_after.get_cost(by="slice", since_seconds=3600)
            after = next((ln for ln in doc.lines if ln.key == a.id), None)
            caught_up = after is not None and after.slice_seconds > before and \
                after.slice_seconds >= asked - _ts(a.created_at) - slack - 1
            return after if caught_up else None
        after = wait_for(charged_after_the_restart, 60, "the restarted accountant to charge slice a up to now")
        ran_a = time.time() - _ts(a.created_at)
        assert after.slice_seconds <= ran_a + 0.5, (after.slice_seconds, ran_a)
        mesh_after.release(a.allocation_id)
    finally:
        mesh_after.close()


def test_recommend_apply_resizes_a_replica(cluster, smollm2):
    from mesh.client import MeshClient
    with MeshClient(cluster.endpoint, timeout=30) as mesh:
        mesh.deploy("smollm2", name="chat", replicas=1, context=512, concurrency=4, isolation="mps")
        d = mesh.wait_deployment("chat", lambda x: x.status.ready_replicas == 1, timeout=SLOW)
        r = d.replicas[0]
        assert completion(mesh, r)                                    # before
        big = mesh.get_slice(r.slice_id).memory_bytes

        def recommended():
            resp = mesh.recommend(kinds=["resize"])
            return next((x for x in resp.recommendations if x.replica == r.id), None)
        rec = wait_for(recommended, 120, "a resize recommendation for the replica", interval=1.0)
        assert rec.saving_per_day > 0 and "sized for 4 sequence(s)" in rec.risk
        answered, stop = [], threading.Event()

        def keep_asking():
            while not stop.is_set():
                answered.append(bool(completion(mesh, r, "Hello")))
        t = threading.Thread(target=keep_asking, daemon=True)
        t.start()
        try:
            p = meshctl(cluster, "recommend", "--apply", "--kind", "resize", "-o", "json")   # during
        finally:
            stop.set()
            t.join(180)
        doc = json.loads(p.stdout)
        mine = next(x for x in doc["recommendations"] if x["replica"] == r.id)
        assert mine["result"] == "applied" and doc["applied"] >= 1 and not doc["stopped"]
        small = mesh.get_slice(r.slice_id).memory_bytes
        assert small < big
        assert answered and all(answered)
        d = mesh.get_deployment("chat")
        assert d.status.ready_replicas == 1 and d.replicas[0].id == r.id
        assert completion(mesh, d.replicas[0])                        # after
        table = meshctl(cluster, "cost", "--by", "deployment", "--since", "1h").stdout
        assert "chat" in table

        # the gateway's /metrics carries the model's cost (from the serving view it follows)
        def gateway_cost():
            text = urllib.request.urlopen(f"{cluster.gateway_url}/metrics", timeout=10).read().decode()
            for line in text.splitlines():
                if line.startswith('gpumesh_gateway_model_cost_dollars_per_hour{model="smollm2"}'):
                    return float(line.split()[-1]) > 0
            return False
        wait_for(gateway_cost, 60, "the gateway's per-model cost gauge", interval=1.0)
        mesh.undeploy("chat")


def test_idle_warm_slice_is_counted_apart_and_released_by_recommend(cluster, mesh):
    """A warm slice (labelled gpumesh.io/warm=true, as the orchestrator pre-carves them) is charged as idle warm, and
    `meshctl recommend --apply --kind idle-warm` releases it."""
    w = mesh.allocate(tenant="team-warm", memory_bytes=8 * 2**30, isolation="mps",
                      labels={"gpumesh.io/warm": "true"}).slices[0]

    def charged():      # the accountant (a loop every INTERVAL) has charged the warm slice's time
        doc = json.loads(meshctl(cluster, "cost", "--by", "tenant", "--since", "1h", "-o", "json").stdout)
        return next((x for x in doc["lines"] if x["key"] == "team-warm" and x["dollars"] > 0), None)
    ln = wait_for(charged, 60, "the warm slice's time charged", interval=1.0)
    assert ln["idle_warm_dollars"] == pytest.approx(ln["dollars"])
    assert ln["idle_replica_dollars"] == 0

    def recommended():  # once the recommender has watched the slice idle for its observation time (4 s here)
        return next((x for x in mesh.recommend(kinds=["idle-warm"]).recommendations if x.slice_id == w.id), None)
    wait_for(recommended, 120, "an idle-warm recommendation for the slice", interval=1.0)
    p = meshctl(cluster, "recommend", "--apply", "--kind", "idle-warm", "-o", "json")
    rec = next(x for x in json.loads(p.stdout)["recommendations"] if x["slice_id"] == w.id)
    assert rec["result"] == "applied" and rec["saving_per_day"] > 0 and "unclaimed" in rec["risk"]
    wait_for(lambda: w.id not in {s.id for s in mesh.list_slices(tenant="team-warm")}, 60, "the warm slice released")


def test_idle_replica_is_scaled_away_by_recommend(cluster, smollm2):
    """Two READY replicas that serve nothing: their time is counted as idle replica cost, and `recommend --apply
    --kind idle-replica` scales the deployment down by one (never to zero), removing the replica it listed, the other
    still answering."""
    from mesh.client import MeshClient
    with MeshClient(cluster.endpoint, timeout=30) as mesh:
        mesh.deploy("smollm2", name="quiet", replicas=2, context=512, isolation="mps")
        mesh.wait_deployment("quiet", lambda x: x.status.ready_replicas == 2, timeout=SLOW)

        def idle_cost():
            doc = json.loads(meshctl(cluster, "cost", "--by", "deployment", "--since", "1h", "-o", "json").stdout)
            ln = next((x for x in doc["lines"] if x["key"] == "quiet"), None)
            return ln if ln is not None and ln["idle_replica_dollars"] > 0 else None
        ln = wait_for(idle_cost, 60, "idle replica cost of the quiet deployment", interval=1.0)
        assert ln["idle_replica_dollars"] <= ln["dollars"]

        def recommended():
            return [x for x in mesh.recommend(kinds=["idle-replica"]).recommendations if x.deployment == "quiet"]
        recs = wait_for(recommended, 120, "an idle-replica recommendation", interval=1.0)
        assert len(recs) == 1 and "other READY replica" in recs[0].risk          # never the last one
        p = meshctl(cluster, "recommend", "--apply", "--kind", "idle-replica", "-o", "json")
        mine = next(x for x in json.loads(p.stdout)["recommendations"] if x["deployment"] == "quiet")
        assert mine["result"] == "applied"
        d = wait_for(lambda: (lambda x: x if len(x.replicas) == 1 and x.status.ready_replicas == 1 else None)(
            mesh.get_deployment("quiet")), 120, "scaled down to one READY replica")
        assert d.spec.replicas == 1
        assert mine["replica"] and d.replicas[0].id != mine["replica"]          # the one listed went, not another
        assert completion(mesh, d.replicas[0])
        mesh.undeploy("quiet")


def test_autoscaler_scales_within_the_pool_and_says_so(cluster, smollm2):
    """A policy that wants two replicas of a deployment whose pool holds one: the autoscaler stays at one, its
    decision says bound_by pool, and a PoolLimit event names the pool."""
    from mesh import scalingpolicy
    from mesh.client import MeshClient
    with MeshClient(cluster.endpoint, timeout=30) as mesh:
        mesh.create_pool({"name": "scaled", "selector": {"isolations": ["mps"]}, "quota": {"max_slices": 1}})
        mesh.deploy("smollm2", name="grow", replicas=1, context=512, pool="scaled")
        mesh.wait_deployment("grow", lambda x: x.status.ready_replicas == 1, timeout=SLOW)
        mesh.set_scaling("grow", scalingpolicy.build(min_replicas=2, max_replicas=3, target=4))
        d = wait_for(lambda: (lambda x: x if x.status.autoscaler.bound_by == "pool" else None)(
            mesh.get_deployment("grow")), 60, "the autoscaler's decision bound by the pool", interval=0.5)
        assert d.spec.replicas == 1 and "pool has room for 0 more" in d.status.autoscaler.reason
        evs = wait_for(lambda: [e for e in mesh.list_events(kind="Deployment", name="grow")
                                if e.reason == "PoolLimit"], 30, "a PoolLimit event")
        assert "'scaled'" in evs[0].message
        on_pool = wait_for(lambda: [e for e in mesh.list_events(kind="Pool", name="scaled")
                                    if e.reason == "PoolLimit"], 30, "a PoolLimit event on the pool")
        assert on_pool[0].message.startswith("deployment grow: held at 1 replica(s)")
        mesh.undeploy("grow")
        wait_for(lambda: _deleted(mesh, "scaled"), 60, "the pool deleted once unused")
