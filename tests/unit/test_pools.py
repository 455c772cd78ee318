"""Pools: validation (clear errors naming the field), selection, usage, quota refusals, and the scheduler's
Pool plugin on an in-memory fleet."""

from __future__ import annotations

import pytest

from gpumesh.v1 import pool_service_pb2 as P
from gpumesh.v1 import types_pb2
from mesh import errors, pools
from mesh.cost import PriceTable
from mesh.poolapi import pool_from_dict

PRICES = PriceTable.parse(["H100-80GB=2.40"])


def pool(**kw) -> P.Pool:
    return pool_from_dict({"name": "inference-a", **kw})


@pytest.mark.parametrize("doc,field", [
    ({"selector": {"gpu_models": ["H900"]}}, "pool.selector.gpu_models[0]"),
    ({"quota": {"max_gpus": -1}}, "pool.quota.max_gpus"),
    ({"quota": {"max_slices": -2}}, "pool.quota.max_slices"),
    ({"name": "-bad"}, "pool.name"),
    ({"tenants": ["team a"]}, "pool.tenants[0]"),
    ({"tenants": [f"t{i}" for i in range(257)]}, "pool.tenants"),
    ({"selector": {"node_labels": {f"k{i}": "v" for i in range(33)}}}, "pool.selector.node_labels"),
])
def test_bad_pools_name_the_field(doc, field):
    with pytest.raises(errors.InvalidArgument) as e:
        pools.validate(pool_from_dict({"name": "inference-a", **doc}))
    assert e.value.field == field and field in str(e.value)


def test_a_pool_open_to_some_tenants_refuses_the_others_deployments():
    from types import SimpleNamespace

    from controlplane.serving import deployspec
    from gpumesh.v1 import deployment_service_pb2 as D
    store = SimpleNamespace(pools={"inference-a": pools.validate(pool(tenants=["team-a"]))})
    deployspec.check_pool(D.DeploymentSpec(name="chat", tenant="team-a", pool="inference-a"), store)
    with pytest.raises(errors.InvalidArgument) as e:
        deployspec.check_pool(D.DeploymentSpec(name="chat", tenant="team-b", pool="inference-a"), store)
    assert e.value.field == "spec.pool" and "not open to tenant 'team-b'" in str(e.value)


def test_a_tenants_deployment_learns_nothing_of_pools_not_open_to_it():
    """check_pool listed every pool's name when the one named did not exist, and told a pool open to other tenants
    apart from an unknown one (PoolService hides those pools from the tenant)."""
    from types import SimpleNamespace

    from controlplane.api import auth
    from controlplane.serving import deployspec
    from gpumesh.v1 import deployment_service_pb2 as D
    store = SimpleNamespace(pools={"acme-private": pools.validate(pool(name="acme-private", tenants=["acme"])),
                                   "shared": pools.validate(pool(name="shared"))})
    token = auth._current.set(auth.Principal("client", "b-client", tenant="team-b", role="tenant"))
    try:
        answers = []
        for name in ("nope", "acme-private"):
            with pytest.raises(errors.InvalidArgument) as e:
                deployspec.check_pool(D.DeploymentSpec(name="chat", tenant="team-b", pool=name), store)
            assert e.value.field == "spec.pool" and "acme" not in str(e.value).replace(name, "")
            answers.append(str(e.value).replace(repr(name), "X"))
        assert answers[0] == answers[1] and "shared" in answers[0]
        deployspec.check_pool(D.DeploymentSpec(name="chat", tenant="team-b", pool="shared"), store)
    finally:
        auth._current.reset(token)


def test_deployment_labels_cannot_name_a_pool_or_say_warm():
    from controlplane.serving import deployspec
    from gpumesh.v1 import deployment_service_pb2 as D
    from gpumesh.v1 import model_service_pb2 as M
    for key in ("gpumesh.pool", "gpumesh.io/warm", "gpumesh.deployment"):
        with pytest.raises(errors.InvalidArgument) as e:
            deployspec.check_settings(D.DeploymentSpec(name="chat", labels={key: "x"}), M.Variant(max_context=512))
        assert e.value.field == f"spec.labels[{key}]"


def test_not_finite_quota_is_refused():
    with pytest.raises(errors.InvalidArgument) as e:
        pools.validate(P.Pool(name="a", quota=P.PoolQuota(max_dollars_per_hour=float("nan"))))
    assert e.value.field == "pool.quota.max_dollars_per_hour"


@pytest.mark.parametrize("field,value", [
    ("max_gpus", float("nan")), ("max_dollars_per_hour", float("inf")), ("max_slices", 99_999_999_999),
    ("max_memory_bytes", 2**70), ("max_gpus", -1.0),
])
def test_a_quota_the_api_cannot_carry_names_its_field(field, value):
    """`meshctl create pool --max-gpus nan` (and a pool file's `max_slices: 99999999999`): the SDK's pool_from_dict
    answered protobuf's parse error ("pool: Failed to parse quota field: Failed to parse max_gpus field: Couldn't
    parse NaN, use quoted "NaN" instead ..."), naming `pool` and the JSON mapping's rules, not the field and what
    it may be."""
    with pytest.raises(errors.InvalidArgument) as e:
        pool(quota={field: value})
    assert e.value.field == f"pool.quota.{field}"
    assert "0: no limit" in str(e.value) and "parse" not in str(e.value)


def test_bad_isolation_in_a_file_names_the_field():
    with pytest.raises(errors.InvalidArgument) as e:
        pool(selector={"isolations": ["vgpu"]})
    assert e.value.field == "pool.selector.isolations[0]" and "mig" in str(e.value)


def test_validate_canonicalizes_models():
    p = pools.validate(pool(selector={"gpu_models": ["h100"]}))
    assert list(p.selector.gpu_models) == ["H100-80GB"]


def test_selection():
    p = pools.validate(pool(selector={"gpu_models": ["H100-80GB"], "isolations": ["mps"],
                                      "node_labels": {"tier": "a"}}))
    assert pools.selects_gpu(p, "H100-80GB", False, "mps") is None
    assert "isolation mps" in pools.selects_gpu(p, "H100-80GB", False, None)      # unspecified: time-share there
    assert "isolation mps" in pools.selects_gpu(p, "H100-80GB", True, None)       # MIG GPU gives MIG
    assert pools.default_isolation(p) == types_pb2.ISOLATION_MPS                  # the pool's only kind
    both = pools.validate(pool(selector={"isolations": ["mig", "timeshare"]}))
    assert pools.default_isolation(both) == types_pb2.ISOLATION_UNSPECIFIED
    assert pools.selects_gpu(both, "H100-80GB", True, None) is None
    assert pools.selects_gpu(both, "H100-80GB", False, None) is None
    assert "GPU models" in pools.selects_gpu(p, "A100-40GB", False, None)
    assert pools.selects_node(p, {"tier": "a", "x": "y"}) and not pools.selects_node(p, {"tier": "b"})


def _slice(sid, pool_name, mem=10 * 2**30, share=0.125):
    return types_pb2.Slice(id=sid, gpu_model="H100-80GB", isolation=types_pb2.ISOLATION_MPS, memory_bytes=mem,
                           compute_share=share, labels={pools.LABEL: pool_name} if pool_name else {})


def test_usage_and_refusal_names_the_pool():
    p = pools.validate(pool(quota={"max_slices": 2}))
    u = pools.usage("inference-a", [_slice("a", "inference-a"), _slice("b", "inference-a"), _slice("c", "")], PRICES)
    assert u.slices == 2 and u.memory_bytes == 20 * 2**30
    assert u.dollars_per_hour == pytest.approx(u.gpus * 2.40) and u.gpus > 0
    why = pools.refusal(p, u, 1, 2**30, 0.1, 0.1)
    assert why.startswith('PoolExhausted: pool "inference-a" quota max_slices=2 reached')
    assert pools.refusal(p, pools.Usage(slices=1), 1, 0, 0, 0) is None


def test_scheduler_plugin_restricts_and_refuses():
    from controlplane.scheduler import profiles
    from controlplane.state.fleet import Fleet
    from mesh import slicespec
    fleet = Fleet()
    for name, labels in (("n1", {"tier": "a"}), ("n2", {"tier": "b"})):
        inv = types_pb2.NodeInventory(labels=labels, cpu_milli=8000, memory_bytes=64 * 2**30, gpus=[
            types_pb2.Gpu(index=0, uuid=f"GPU-{name}", model="H100-80GB", memory_bytes=80 * 2**30)])
        fleet.upsert_node(types_pb2.Node(name=name, inventory=inv))
        fleet.nodes[name].ready = True
    fw = profiles.build()
    plugin = fw.plugin("Pool")
    plugin.set_pools({"inference-a": pools.validate(pool(selector={"node_labels": {"tier": "b"}},
                                                         quota={"max_slices": 1}))}, PRICES)

    def req(pool_name):
        spec = types_pb2.SliceSpec(tenant="t", memory_bytes=8 * 2**30, isolation=types_pb2.ISOLATION_MPS, count=1,
                                   labels={pools.LABEL: pool_name} if pool_name else {})
        return slicespec.validate(spec)
    d = fw.schedule(req("inference-a"), fleet)
    assert d.ok and d.choices[0].node == "n2"
    s = _slice("x", "inference-a")
    s.node, s.gpu_index = "n2", 0
    fleet.put_slice(s)
    d = fw.schedule(req("inference-a"), fleet)
    assert not d.ok and 'pool "inference-a" quota max_slices=1' in str(d.reasons)
    assert fw.schedule(req(""), fleet).ok                 # no pool: no pool rules
    d = fw.schedule(req("gone"), fleet)
    assert not d.ok and "PoolNotFound" in str(d.reasons)


def test_describe_yaml_round_trips_through_a_file(tmp_path):
    """What `meshctl describe pool NAME -o yaml` prints is what `create pool -f` / `update pool -f` read."""
    import argparse

    import yaml

    from mesh.poolapi import pool_to_dict
    from tools.meshctl.pools import pool_from_args
    p = pools.validate(pool(description="chat", selector={"gpu_models": ["H100-80GB"], "isolations": ["mps", "mig"],
                                                          "node_labels": {"tier": "a"}},
                            quota={"max_slices": 3, "max_memory_bytes": 40 * 2**30}))
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(pool_to_dict(p)))
    back = pool_from_dict(pool_from_args(argparse.Namespace(file=str(path), name="")))
    assert pools.validate(back) == p


def test_pool_room_in_replicas_for_the_autoscaler():
    """PoolStore.room: the fewest more replicas any quota (slices, memory, $/hour) or the capacity admits."""
    from types import SimpleNamespace

    from controlplane.pools.store import PoolStore
    from controlplane.state.fleet import Fleet
    fleet = Fleet()
    inv = types_pb2.NodeInventory(gpus=[types_pb2.Gpu(index=0, uuid="GPU-a", model="H100-80GB",
                                                      memory_bytes=80 * 2**30)])
    fleet.upsert_node(types_pb2.Node(name="n1", inventory=inv))
    fleet.nodes["n1"].ready = True
    ctl = SimpleNamespace(fleet=fleet, scheduler=None)
    store = PoolStore(ctl, PRICES)
    store.pools["a"] = pools.validate(pool(name="a", quota={"max_slices": 5, "max_dollars_per_hour": 1.0}))
    store.pools["free"] = pools.validate(pool(name="free"))
    s = _slice("x", "a")
    s.node, s.gpu_index = "n1", 0
    fleet.put_slice(s)
    # 4 slices left by max_slices; $1/h minus what x costs, at $0.30 a replica: 2
    used = pools.usage("a", fleet.slices.values(), PRICES).dollars_per_hour
    assert store.room("a", 10 * 2**30, 0.30) == min(4, int((1.0 - used) / 0.30))
    # no quota: the free capacity bounds it (the 80 GiB GPU less x's 10 GiB, whatever pool x is in; 10 GiB a replica)
    assert store.room("free", 10 * 2**30, 0.30) == 7
    assert store.room("missing", 10 * 2**30, 0.30) is None


def test_pool_quota_is_checked_on_the_gpu_model_chosen():
    # the pre-filter judges the least a slice can take over the pool's models present (8 GiB: a tenth of an
    # H100-80GB); the H100 is taken, so it lands on the A100-40GB, where it takes a fifth: past max_gpus 0.15
    from controlplane.scheduler import profiles
    from controlplane.state.fleet import Fleet
    from mesh import slicespec
    fleet = Fleet()
    for name, model, mem in (("a-small", "A100-40GB", 40), ("b-big", "H100-80GB", 80)):
        inv = types_pb2.NodeInventory(gpus=[types_pb2.Gpu(index=0, uuid=f"GPU-{name}", model=model,
                                                          memory_bytes=mem * 2**30)])
        fleet.upsert_node(types_pb2.Node(name=name, inventory=inv))
        fleet.nodes[name].ready = True
    fleet.put_slice(types_pb2.Slice(id="held", allocation_id="a-held", tenant="other", node="b-big", gpu_index=0,
                                    gpu_model="H100-80GB", isolation=types_pb2.ISOLATION_EXCLUSIVE,
                                    memory_bytes=80 * 2**30, compute_share=1.0))
    fw = profiles.build()
    fw.plugin("Pool").set_pools({"inference-a": pools.validate(pool(quota={"max_gpus": 0.15}))},
                                PriceTable.parse(["H100-80GB=1.00", "A100-40GB=5.00"]))
    spec = types_pb2.SliceSpec(tenant="t", memory_bytes=8 * 2**30, isolation=types_pb2.ISOLATION_TIMESHARE,
                               count=1, labels={pools.LABEL: "inference-a"})
    d = fw.schedule(slicespec.validate(spec), fleet)
    assert not d.ok and 'pool "inference-a" quota max_gpus=0.15' in str(d.reasons) and "asks 0.2" in str(d.reasons)
    fleet.drop_slice("held")
    fleet.drop_node("a-small")
    d = fw.schedule(slicespec.validate(spec), fleet)           # on the H100: a tenth, within the quota
    assert d.ok and d.choices[0].gpu_model == "H100-80GB"


def test_update_refuses_a_negative_generation_naming_it():
    """INVALID_ARGUMENT naming pool.generation (it answered ABORTED, 'at generation 1, not -1', as for a
    change read at another generation)."""
    import asyncio
    from types import SimpleNamespace

    from controlplane.pools.store import PoolStore
    from controlplane.state.fleet import Fleet
    store = PoolStore(SimpleNamespace(fleet=Fleet(), scheduler=None), PRICES)
    store.pools["a"] = pools.validate(pool(name="a"))
    store.pools["a"].generation = 1
    p = pool(name="a")
    p.generation = -1
    with pytest.raises(errors.InvalidArgument, match="pool.generation"):
        asyncio.run(store.update(p))
