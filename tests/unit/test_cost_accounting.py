"""Cost accounting arithmetic, apportioning, idle detection, the ledger, and recommendations on a synthetic fleet."""

from __future__ import annotations

import pytest

from controlplane.cost.ledger import CostLedger
from mesh.cost import PriceTable, slice_share
from mesh.cost import accounting as acc
from mesh.cost import recommend as R

PRICES = PriceTable.parse(["H100-80GB=2.40", "A100-40GB=1.20"])


def facts(sid="s1", share=0.25, price=2.40, created=1000.0, **kw):
    return acc.SliceFacts(sid, kw.pop("tenant", "t1"), kw.pop("node", "n1"), kw.pop("gpu_model", "H100-80GB"), share,
                          share * price, created, **kw)


def test_charge_from_creation_then_from_cursor():
    f = facts(share=0.25)
    c = acc.charge(f, None, 1000.0 + 3600)
    assert c.seconds == 3600 and c.gpu_seconds == pytest.approx(900) and c.dollars == pytest.approx(0.60)
    c2 = acc.charge(f, 4600.0, 4610.0)
    assert c2.seconds == 10 and c2.dollars == pytest.approx(0.60 / 360)
    assert acc.charge(f, 4610.0, 4610.0) is None
    # a cursor before the slice's creation (a reused id, a clock step) never charges before it was created
    assert acc.charge(f, 0.0, 1010.0).seconds == 10


def test_apportioned_by_share_adds_up_to_the_gpu():
    """Seven 1g.10gb MIG slices plus nothing else pay 7/8 of the GPU; MPS pays the larger of compute and memory."""
    mig = slice_share(1, "H100-80GB", profile="1g.10gb")
    assert mig == pytest.approx(1 / 8)
    mps = slice_share(2, "H100-80GB", memory_bytes=20 * 2**30, compute_share=0.1)
    assert mps == pytest.approx(20 * 1024 / 81559, rel=0.05)
    total = sum(acc.charge(facts(f"s{i}", mig), None, 1000.0 + 3600).dollars for i in range(8))
    assert total == pytest.approx(2.40)


def test_timeshare_pays_its_memory_not_the_whole_gpu():
    """The scheduler gives a memory-sized time-share slice a compute share of 1.0: charged by its memory."""
    assert slice_share(3, "H100-80GB", memory_bytes=8 * 2**30, compute_share=1.0) == pytest.approx(8 * 1024 / 81559,
                                                                                                   rel=0.05)
    assert slice_share(3, "H100-80GB", compute_share=0.5) == 0.5            # memory unknown: the compute share


def test_categories_counted_apart():
    assert acc.charge(facts(warm=True), None, 1100.0).category == acc.IDLE_WARM
    assert acc.charge(facts(), None, 1100.0, idle_replica=True).category == acc.IDLE_REPLICA
    assert acc.charge(facts(), None, 1100.0).category == acc.BUSY


@pytest.mark.parametrize("prev,now,idle,tokens", [
    (None, acc.Activity(5, 100, 0), False, 0.0),                                  # nothing known before
    (acc.Activity(5, 100, 0), None, False, 0.0),                                  # no reading now: not idle
    (acc.Activity(5, 100, 0), acc.Activity(5, 100, 0), True, 0.0),                # nothing happened
    (acc.Activity(5, 100, 0), acc.Activity(7, 160, 0), False, 60.0),              # two requests finished
    (acc.Activity(5, 100, 0), acc.Activity(5, 100, 1), False, 0.0),               # one running now
    (acc.Activity(50, 900, 0), acc.Activity(2, 40, 0), False, 40.0),              # backend restarted
])
def test_replica_activity(prev, now, idle, tokens):
    assert acc.replica_activity(prev, now) == (idle, tokens)


def test_per_1k_tokens():
    assert acc.per_1k_tokens(0.5, 10_000) == pytest.approx(0.05)
    assert acc.per_1k_tokens(0.5, 0) == 0.0


def test_charge_key_rejects_unknown_grouping():
    with pytest.raises(ValueError, match="by: 'gpu'"):
        acc.charge(facts(), None, 1100.0).key("gpu")


def test_ledger_sums_groups_and_keeps_cursors(tmp_path):
    led = CostLedger(str(tmp_path / "history.db"))
    a = acc.charge(facts("s1", 0.5, deployment="d1", model="m1"), None, 1120.0, tokens=2000)
    b = acc.charge(facts("s2", 0.25, tenant="t2", node="n2", warm=True), None, 1120.0)
    c = acc.charge(facts("s1", 0.5, deployment="d1", model="m1"), 1120.0, 1180.0, idle_replica=True)
    led.write([a, b], {"s1": 1120.0, "s2": 1120.0}, set())
    led.write([c], {"s1": 1180.0}, {"s2"})
    assert led.cursors() == {"s1": 1180.0}
    by_tenant = {ln.key: ln for ln in led.query("tenant", 0.0)}
    assert by_tenant["t1"].slice_seconds == pytest.approx(180)
    assert by_tenant["t1"].dollars == pytest.approx(180 * 1.2 / 3600)
    assert by_tenant["t1"].idle_replica_dollars == pytest.approx(60 * 1.2 / 3600)
    assert by_tenant["t2"].idle_warm_dollars == pytest.approx(by_tenant["t2"].dollars)
    by_model = {ln.key: ln for ln in led.query("model", 0.0)}
    assert by_model["m1"].tokens == 2000
    with pytest.raises(ValueError):
        led.query("gpu", 0.0)
    # reopened (a restart): the same sums and cursors
    led.close()
    led2 = CostLedger(str(tmp_path / "history.db"))
    assert led2.cursors() == {"s1": 1180.0}
    assert sum(ln.dollars for ln in led2.query("node", 0.0)) == pytest.approx(a.dollars + b.dollars + c.dollars)


def test_ledger_compaction_keeps_the_sums(tmp_path):
    led = CostLedger(str(tmp_path / "h.db"), raw_keep=3600.0)
    charges = [acc.charge(facts("s1", 0.5), 1000.0 + 60 * i, 1000.0 + 60 * (i + 1)) for i in range(200)]
    led.write(charges, {}, set())
    before = led.query("slice", 0.0)[0]
    led.compact(1000.0 + 60 * 200 + 7200)
    after = led.query("slice", 0.0)[0]
    assert after.dollars == pytest.approx(before.dollars) and after.slice_seconds == pytest.approx(12000)
    rows = led.db.execute("SELECT COUNT(*) FROM cost_ledger").fetchone()[0]
    assert rows < 200


# -- recommendations on a synthetic fleet --------------------------------------------------------

GIB = 2**30


def rep(name="d1", rid="r1", iso="mps", profile="", mem=20 * GIB, share=0.25, sized=8, need=20 * GIB, peak=1.0,
        peak_need=6 * GIB, observed=7200.0, idle=False, peers=0, model="H100-80GB", tenant="t1"):
    return R.ReplicaFacts(name, rid, f"s-{rid}", "n1", 0, model, iso, profile, mem, share, PRICES.gpu_hour(model),
                          sized, need, peak, peak_need, observed, True, idle, peers, tenant)


def test_resize_mps_to_measured_peak_with_saving_and_risk():
    recs = R.recommend([rep()], [], [], min_observed=3600)
    assert [r.kind for r in recs] == ["resize"]
    r = recs[0]
    new_share = 6 * GIB / (81559 * 2**20)
    assert r.memory_bytes == 6 * GIB and r.compute_share == pytest.approx(new_share, rel=1e-4)
    assert r.saving_per_day == pytest.approx((0.25 - new_share) * 2.40 * 24)
    assert "sized for 8 sequence(s)" in r.risk and "measured peak 1" in r.risk


def test_resize_mig_to_smaller_profile():
    recs = R.recommend([rep(iso="mig", profile="3g.40gb", mem=40 * GIB, share=0.5, peak_need=8 * GIB)], [], [], 0)
    assert recs[0].profile == "1g.10gb"
    assert recs[0].saving_per_day == pytest.approx((0.5 - 1 / 8) * 2.40 * 24)


def test_no_resize_before_enough_observation_or_when_right_sized():
    assert R.recommend([rep(observed=60.0)], [], [], 3600) == []
    assert R.recommend([rep(peak_need=20 * GIB)], [], [], 3600) == []


def test_idle_replica_never_the_last_one():
    reps = [rep(rid="r1", idle=True, peers=1, peak_need=20 * GIB),
            rep(rid="r2", idle=True, peers=1, peak_need=20 * GIB)]
    recs = R.recommend(reps, [], [], 3600, kinds=("idle-replica",))
    assert len(recs) == 1 and recs[0].saving_per_day == pytest.approx(0.25 * 2.40 * 24)
    assert R.recommend([rep(idle=True, peers=0)], [], [], 3600, kinds=("idle-replica",)) == []


def test_idle_warm_and_share_mps_and_pack():
    warm = [R.WarmSlice("w1", "n1", "H100-80GB", 1 / 8, 2.40, 7200.0),
            R.WarmSlice("w2", "n1", "H100-80GB", 1 / 8, 2.40, 60)]
    recs = R.recommend([], warm, [], 3600)
    assert [r.slice_id for r in recs] == ["w1"] and recs[0].saving_per_day == pytest.approx(0.3 * 24)
    whole = [rep("a", "ra", iso="exclusive", share=1.0, peak_need=30 * GIB),
             rep("b", "rb", iso="exclusive", share=1.0, peak_need=30 * GIB)]
    sm = R.recommend(whole, [], [], 3600, kinds=("share-mps",))
    assert len(sm) == 1 and sm[0].saving_per_day == pytest.approx(2.40 * 24)
    theirs = [whole[0], rep("b", "rb", iso="exclusive", share=1.0, peak_need=30 * GIB, tenant="t2")]
    assert R.recommend(theirs, [], [], 3600, kinds=("share-mps",)) == []     # never two tenants on one MPS GPU
    gpus = [R.GpuFacts("n1", 0, "H100-80GB", 80 * GIB, 2.40, "mps", (("s1", 10 * GIB, "w-1"),), 10 * GIB),
            R.GpuFacts("n2", 0, "H100-80GB", 80 * GIB, 2.40, "mps", (("s2", 60 * GIB, "w-2"),), 60 * GIB),
            R.GpuFacts("n3", 0, "H100-80GB", 80 * GIB, 2.40, "mps", (("s3", 75 * GIB, "w-3"),), 75 * GIB)]
    pk = R.recommend([], [], gpus, 3600, kinds=("pack",))
    assert len(pk) == 1 and pk[0].node == "n1" and pk[0].moves == [("s1", "w-1", "n2", 0)]


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kinds: 'shrink'"):
        R.recommend([], [], [], kinds=("shrink",))


# -- the accountant on an in-memory fleet ----------------------------------------------------------

def test_accountant_tick_categories_tokens_and_cursors(tmp_path):
    from types import SimpleNamespace

    from controlplane.cost.accountant import CostAccountant
    from controlplane.state.fleet import Fleet
    from gpumesh.v1 import deployment_service_pb2 as D
    from gpumesh.v1 import types_pb2

    fleet = Fleet()

    def add(sid, labels):
        s = types_pb2.Slice(id=sid, tenant="t1", node="n1", gpu_model="H100-80GB", isolation=types_pb2.ISOLATION_MIG,
                            profile="1g.10gb", memory_bytes=10 * GIB, labels=labels)
        s.created_at.FromSeconds(1000)
        fleet.slices[sid] = s
    add("s-rep", {"gpumesh.deployment": "chat", "gpumesh.replica": "r-1"})
    add("s-warm", {acc.WARM_LABEL: "true"})
    rep_ = D.Replica(id="r-1", deployment="chat", state=D.REPLICA_STATE_READY, slice_id="s-rep")
    store = SimpleNamespace(deployments={"chat": D.Deployment(spec=D.DeploymentSpec(name="chat", model="smollm2"))},
                            replicas={"chat": {"r-1": rep_}}, loads={})
    deployments = SimpleNamespace(store=store)
    clock = [1000.0]
    a = CostAccountant(SimpleNamespace(fleet=fleet), deployments, CostLedger(str(tmp_path / "h.db")), PRICES,
                       interval=10, clock=lambda: clock[0])

    def load(requests, tokens, running=0):
        return types_pb2.BackendLoad(workload_id="w", scraped=True, requests_total=requests,
                                     prompt_tokens_total=tokens, generation_tokens_total=0, requests_running=running)

    def tick(t, ld):
        clock[0] = t
        if ld is not None:
            store.loads["r-1"] = ld
        charges, live, gone = a.tick(t)
        return {c.slice_id: c for c in charges}, live, gone
    got, live, _ = tick(1010.0, load(3, 300))
    assert got["s-rep"].category == acc.BUSY and got["s-warm"].category == acc.IDLE_WARM
    assert got["s-rep"].model == "smollm2" and got["s-rep"].seconds == 10
    assert got["s-rep"].dollars == pytest.approx(10 * 2.40 / 8 / 3600)
    got, _, _ = tick(1020.0, load(3, 300))                       # nothing served: idle
    assert got["s-rep"].category == acc.IDLE_REPLICA and got["s-rep"].seconds == 10
    got, _, _ = tick(1030.0, load(5, 520))                       # two requests, 220 tokens
    assert got["s-rep"].category == acc.BUSY and got["s-rep"].tokens == 220
    assert a.observed["r-1"][1] >= 1                             # a request ran: peak at least one
    assert a.rate("model", "smollm2") == pytest.approx(2.40 / 8)
    assert a.rate("node", "n1", "t1") > 0 and a.rate("node", "n1", "t2") == 0    # a tenant sees its own rate
    # `meshctl cost --by slice`: each live slice's own rate now (it answered $0 for every slice)
    assert a.rate("slice", "s-rep") == pytest.approx(2.40 / 8) and a.rate("slice", "s-rep", "t2") == 0
    assert a.rate("slice", "s-rep", "t1") + a.rate("slice", "s-warm") == pytest.approx(a.rate("node", "n1"))
    for by, key, tenant in (("model", "smollm2", None), ("node", "n1", "t1"), ("node", "n1", None),
                            ("slice", "s-rep", None), ("slice", "s-rep", "t2"), ("tenant", "t1", None)):
        assert a.rates_by(by, tenant).get(key, 0.0) == pytest.approx(a.rate(by, key, tenant))   # GetCost's all-at-once
    del fleet.slices["s-warm"]
    _, live, gone = tick(1040.0, load(5, 520))
    assert gone == {"s-warm"} and set(live) == {"s-rep"}
    assert a.rate("slice", "s-warm") == 0                                         # released: no rate now
    assert [c.model for c in a.model_costs(["smollm2"])] == ["smollm2"]


def test_pack_never_empties_a_gpu_that_received_slices_and_stays_quick():
    gpus = [R.GpuFacts("n1", 0, "H100-80GB", 80 * GIB, 2.40, "mps", (("s1", 10 * GIB, "w-1"),), 10 * GIB),
            R.GpuFacts("n2", 0, "H100-80GB", 80 * GIB, 2.40, "mps", (("s2", 20 * GIB, "w-2"),), 20 * GIB)]
    recs = R.pack(gpus)
    assert len(recs) == 1 and recs[0].node == "n1"            # n2 received s1: it is not emptied in turn
    big = [R.GpuFacts(f"n{i}", 0, "H100-80GB", 80 * GIB, 2.40, "mps", ((f"s{i}", 30 * GIB, f"w-{i}"),), 30 * GIB)
           for i in range(5000)]
    recs = R.pack(big, max_sources=64)
    assert 0 < len(recs) <= 64
    moved = [m for r in recs for m in r.moves]
    sources = {r.node for r in recs}
    assert not sources & {m[2] for m in moved}                  # no GPU both emptied and receiving


def test_recommend_apply_resize_writes_the_replicas_new_size_to_etcd():
    """`meshctl recommend --apply`'s resize: the replica record follows the slice, durably (a new leader
    reads etcd), not only in the leader's memory."""
    import asyncio
    from types import SimpleNamespace

    from controlplane.cost.recommender import Recommender
    from gpumesh.v1 import deployment_service_pb2 as D
    from gpumesh.v1 import types_pb2
    from mesh.cost import recommend as R

    put = []
    replica = D.Replica(id="r-1", deployment="chat", slice_id="s-1", memory_bytes=20 << 30, profile="2g.20gb")
    store = SimpleNamespace(replicas={"chat": {"r-1": replica}})

    async def put_replica(r):
        put.append(r)
        store.replicas["chat"][r.id] = r
    store.put_replica = put_replica
    resized = types_pb2.Slice(id="s-1", memory_bytes=10 << 30, profile="1g.10gb")

    async def resize(slice_id, memory, share, profile):
        return resized
    rec = Recommender(SimpleNamespace(), SimpleNamespace(store=store), SimpleNamespace(resize=resize), None)
    out = asyncio.run(rec.apply_one(R.Rec(kind="resize", saving_per_day=1.0, action="resize", risk="", deployment="chat",
                                          replica="r-1", slice_id="s-1", memory_bytes=10 << 30, profile="1g.10gb")))
    assert out == "applied"
    assert [(r.memory_bytes, r.profile) for r in put] == [(10 << 30, "1g.10gb")]


def test_a_failed_ledger_write_loses_no_charge(tmp_path):
    """The ledger refuses one write (history.db locked by the history's compaction, a full disk): the next
    accounting writes that interval's charges too; before, the cursors had moved on and the interval was lost."""
    import asyncio
    import sqlite3
    from types import SimpleNamespace

    from controlplane.cost.accountant import CostAccountant
    from controlplane.state.fleet import Fleet
    from gpumesh.v1 import types_pb2

    fleet = Fleet()
    for sid in ("s1", "s2"):
        s = types_pb2.Slice(id=sid, tenant="t1", node="n1", gpu_model="H100-80GB", isolation=types_pb2.ISOLATION_MIG,
                            profile="1g.10gb", memory_bytes=10 * GIB)
        s.created_at.FromSeconds(1000)
        fleet.slices[sid] = s
    led = CostLedger(str(tmp_path / "h.db"))
    clock = [1000.0]
    a = CostAccountant(SimpleNamespace(fleet=fleet), None, led, PRICES, interval=10, clock=lambda: clock[0])
    write, fail = led.write, [0]

    def flaky(*args):
        if fail[0]:
            fail[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        return write(*args)
    led.write = flaky

    async def go():
        clock[0] = 1010.0
        await a.account()                      # s1, s2: 10 s each, written
        clock[0] = 1020.0
        fail[0] = 1
        del fleet.slices["s2"]                 # released meanwhile
        with pytest.raises(sqlite3.OperationalError):
            await a.account()                  # s1: 10 s, s2 gone: refused
        clock[0] = 1030.0
        await a.account()
        a.pool.shutdown(wait=True)
    asyncio.run(go())
    seconds = {ln.key: ln.slice_seconds for ln in led.query("slice", 0.0)}
    assert seconds == {"s1": pytest.approx(30), "s2": pytest.approx(10)}
    assert led.cursors() == {"s1": 1030.0}     # the released slice's cursor went with the later write


def test_an_accounting_cancelled_by_stop_while_its_write_waits_its_turn_loses_nothing(tmp_path):
    """stop() cancels the loop's pass where it waits; the pass had moved the cursors on in memory and its
    write waited behind another ledger job (a GetCost query, the compaction): the cancel dropped the queued
    write, and stop()'s last accounting charged from the new cursors, so that interval was never charged."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from controlplane.cost.accountant import CostAccountant
    from controlplane.state.fleet import Fleet
    from gpumesh.v1 import types_pb2

    fleet = Fleet()
    s = types_pb2.Slice(id="s1", tenant="t1", node="n1", gpu_model="H100-80GB", isolation=types_pb2.ISOLATION_MIG,
                        profile="1g.10gb", memory_bytes=10 * GIB)
    s.created_at.FromSeconds(1000)
    fleet.slices["s1"] = s
    path = str(tmp_path / "h.db")
    clock = [1010.0]
    a = CostAccountant(SimpleNamespace(fleet=fleet), None, CostLedger(path), PRICES, interval=10,
                       clock=lambda: clock[0])

    async def go():
        gate = threading.Event()
        a.pool.submit(gate.wait, 30)              # the ledger's thread is busy with a query
        task = asyncio.create_task(a.account())
        deadline = asyncio.get_running_loop().time() + 10
        while a.cursors.get("s1") != 1010.0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert a.cursors.get("s1") == 1010.0      # charged in memory, its write queued
        task.cancel()                             # stop() cancelling the pass
        with pytest.raises(asyncio.CancelledError):
            await task
        clock[0] = 1020.0
        gate.set()
        await a.stop()                            # the last interval, written after the first
    asyncio.run(go())
    led = CostLedger(path)
    assert {ln.key: ln.slice_seconds for ln in led.query("slice", 0.0)} == {"s1": pytest.approx(20)}
    assert led.cursors() == {"s1": 1020.0}


def test_pack_lists_no_gpu_whose_slices_cannot_all_be_migrated():
    """A pack is carried out by migrating each slice's workload. A slice that runs no workload the migration can move
    (none at all, or a model server: a deployment replaces its replicas instead; the recommender passes "" for both)
    would make the apply fail on its first move: such a GPU is not listed."""
    recv = R.GpuFacts("n2", 0, "H100-80GB", 80 * GIB, 2.40, "mps", (("s2", 60 * GIB, "w-2"),), 60 * GIB)
    for unmovable in ((("s1", 10 * GIB, ""),), (("s1", 5 * GIB, "w-1"), ("s3", 5 * GIB, ""))):
        src = R.GpuFacts("n1", 0, "H100-80GB", 80 * GIB, 2.40, "mps", unmovable, 10 * GIB)
        assert [r.node for r in R.pack([src, recv])] == ["n2"]     # n1 stays (n2 may go into it)
    movable = R.GpuFacts("n1", 0, "H100-80GB", 80 * GIB, 2.40, "mps", (("s1", 10 * GIB, "w-1"),), 10 * GIB)
    assert [r.node for r in R.pack([movable, recv])] == ["n1"]     # n2 received: it stays
