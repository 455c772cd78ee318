"""Table-driven tests of each scheduler plugin (a name and the wanted verdict per case)."""

from __future__ import annotations

import pytest

from controlplane.state.fleet import Fleet
from controlplane.scheduler import profiles
from controlplane.scheduler.framework import Code, CycleState, Pick
from controlplane.scheduler.plugins import (antiaffinity, fgd, gpumodel, nodehealth, noderesources, quota,
                                            random_score, topology)
from gpumesh.v1 import types_pb2 as t
from mesh import errors
from mesh.slicespec import validate
from tests.unit.test_placement import commit, make_fleet

GiB = 1 << 30


def req(**spec):
    return validate(t.SliceSpec(tenant=spec.pop("tenant", "t"), **spec))


def with_host(fleet: Fleet, name: str, cpu_milli: int, memory_bytes: int) -> None:
    rec = t.Node()
    rec.CopyFrom(fleet.nodes[name].record)
    rec.inventory.cpu_milli, rec.inventory.memory_bytes = cpu_milli, memory_bytes
    fleet.nodes[name].record = rec


@pytest.mark.parametrize("name,spec,model,want", [
    ("any model", {"memory_bytes": GiB}, "L4", None),
    ("named model matches", {"memory_bytes": GiB, "gpu_model": "L4"}, "L4", None),
    ("named model differs", {"memory_bytes": GiB, "gpu_model": "H100-80GB"}, "L4", "model is not H100-80GB"),
])
def test_gpumodel(name, spec, model, want):
    fleet = make_fleet(("n", [(model, False)]))
    assert gpumodel.Plugin().filter_gpu(req(**spec), fleet.nodes["n"].gpus[0]) == want


@pytest.mark.parametrize("name,ready,cordoned,health,pressure,thermal,node_code,gpu_why", [
    ("healthy", True, False, "healthy", "low", "normal", Code.SUCCESS, None),
    ("not ready", False, False, "healthy", "low", "normal", Code.UNSCHEDULABLE, None),
    ("cordoned", True, True, "healthy", "low", "normal", Code.UNSCHEDULABLE, None),
    ("unhealthy GPU", True, False, "unhealthy", "low", "normal", Code.SUCCESS, "GPU unhealthy"),
    ("high pressure is allowed", True, False, "healthy", "high", "normal", Code.SUCCESS, None),
    ("critical pressure", True, False, "healthy", "critical", "normal", Code.SUCCESS, "GPU memory pressure critical"),
    ("critical heat", True, False, "healthy", "low", "critical", Code.SUCCESS, "GPU thermal state critical"),
])
def test_nodehealth(name, ready, cordoned, health, pressure, thermal, node_code, gpu_why):
    fleet = make_fleet(("n", [("L4", False)]), ready=ready)
    node = fleet.nodes["n"]
    if cordoned:
        rec = t.Node()
        rec.CopyFrom(node.record)
        rec.cordoned = True
        node.record = rec
    g = node.gpus[0]
    g.health, g.memory_pressure, g.thermal_state = health, pressure, thermal
    p = nodehealth.Plugin()
    assert p.filter(CycleState(), req(memory_bytes=GiB), node).code == node_code
    assert p.filter_gpu(req(memory_bytes=GiB), g) == gpu_why


def test_nodehealth_args_are_validated():
    with pytest.raises(ValueError, match="max_memory_pressure"):
        nodehealth.Plugin(max_memory_pressure="extreme")


@pytest.mark.parametrize("name,spec,host,code", [
    ("no host ask", {"memory_bytes": GiB}, (4000, 8 * GiB), Code.SUCCESS),
    ("cpu fits", {"memory_bytes": GiB, "cpu_milli": 4000}, (4000, 8 * GiB), Code.SUCCESS),
    ("cpu short", {"memory_bytes": GiB, "cpu_milli": 4001}, (4000, 8 * GiB), Code.UNSCHEDULABLE),
    ("memory short", {"memory_bytes": GiB, "host_memory_bytes": 9 * GiB}, (4000, 8 * GiB), Code.UNSCHEDULABLE),
    ("gang needs cpu for all", {"memory_bytes": GiB, "cpu_milli": 3000, "count": 2,
                                "topology": t.TOPOLOGY_SAME_NODE}, (4000, 8 * GiB), Code.UNSCHEDULABLE),
    ("host not reported: not enforced", {"memory_bytes": GiB, "cpu_milli": 10 ** 6}, (0, 0), Code.SUCCESS),
])
def test_noderesources_host_filter(name, spec, host, code):
    fleet = make_fleet(("n", [("L4", False), ("L4", False)]))
    with_host(fleet, "n", *host)
    assert noderesources.Plugin().filter(CycleState(), req(**spec), fleet.nodes["n"]).code == code


@pytest.mark.parametrize("name,model,mig,existing,spec,n_options,why", [
    ("1g on empty H100: 7 starts", "H100-80GB", True, [], {"mig_profile": "1g.10gb"}, 7, ""),
    ("3g on empty H100: 2 starts", "H100-80GB", True, [], {"mig_profile": "3g.40gb"}, 2, ""),
    ("7g on used H100", "H100-80GB", True, [{"mig_profile": "1g.10gb"}], {"mig_profile": "7g.80gb"}, 0,
     "no free 7g.80gb placement"),
    ("mps half fits", "L4", False, [{"memory_bytes": 8 * GiB, "isolation": t.ISOLATION_MPS, "compute_share": 0.5}],
     {"memory_bytes": 4 * GiB, "isolation": t.ISOLATION_MPS, "compute_share": 0.5}, 1, ""),
    ("mps shares used up", "L4", False, [{"memory_bytes": GiB, "isolation": t.ISOLATION_MPS, "compute_share": 0.7}],
     {"memory_bytes": GiB, "isolation": t.ISOLATION_MPS, "compute_share": 0.5}, 0, "MPS compute shares used up"),
    ("exclusive on used GPU", "L4", False, [{"memory_bytes": GiB}],
     {"memory_bytes": GiB, "isolation": t.ISOLATION_EXCLUSIVE}, 0, "GPU is in use"),
    ("timeshare beside mps", "L4", False, [{"memory_bytes": GiB, "isolation": t.ISOLATION_MPS}],
     {"memory_bytes": GiB, "isolation": t.ISOLATION_TIMESHARE}, 0, "GPU shared by mps"),
])
def test_noderesources_options(name, model, mig, existing, spec, n_options, why):
    fleet = make_fleet(("n", [(model, mig)]))
    from controlplane.placement import place
    for e in existing:
        commit(fleet, place(fleet, req(**e)))
    node = fleet.nodes["n"]
    opts, reasons = noderesources.Plugin().options(req(**spec), node, [(0, node.gpus[0])])
    assert len(opts) == n_options
    if why:
        assert reasons == [(model, why)]


@pytest.mark.parametrize("name,mix,model,cpu,frees,want", [
    ("empty node, all fit", [fgd.MixType(1, 500, weight=1.0)], "T4", 1e9, (1000, 1000), 0.0),
    ("slivers too small", [fgd.MixType(1, 500, weight=1.0)], "T4", 1e9, (1000, 300, 200), 500.0),
    ("no GPU big enough: all free is fragment", [fgd.MixType(1, 500, weight=1.0)], "T4", 1e9, (400, 300), 700.0),
    ("host CPU short: all free is fragment", [fgd.MixType(1, 100, 8000, weight=1.0)], "T4", 4000, (1000,), 1000.0),
    ("model excluded", [fgd.MixType(1, 100, 0, frozenset({"V100M16"}), 1.0)], "T4", 1e9, (1000,), 1000.0),
    ("8-GPU type needs 8 whole GPUs", [fgd.MixType(8, 1000, weight=1.0)], "G2", 1e9, (1000,) * 7 + (500,), 7500.0),
    ("weighted mix", [fgd.MixType(1, 1000, weight=0.5), fgd.MixType(1, 200, weight=0.5)], "T4", 1e9,
     (1000, 500), 250.0),
])
def test_fgd_fragmentation(name, mix, model, cpu, frees, want):
    assert fgd.frag_of(mix, model, cpu, frees) == pytest.approx(want)


def test_fgd_prefers_the_gpu_that_keeps_whole_gpus_whole():
    fleet = make_fleet(("n", [("L4", False), ("L4", False)]))
    from controlplane.placement import place
    commit(fleet, place(fleet, req(memory_bytes=8 * GiB, isolation=t.ISOLATION_MPS, compute_share=0.5)))
    fw = profiles.build("fgd-exact")
    fw.plugin(fgd.NAME).set_mix([fgd.MixType(1, 1000, weight=0.5), fgd.MixType(1, 500, weight=0.5)])
    choice = fw.schedule(req(memory_bytes=8 * GiB, isolation=t.ISOLATION_MPS, compute_share=0.5), fleet).choices[0]
    used = [g.index for g in fleet.nodes["n"].gpus if g.slices][0]
    assert choice.gpu_index == used   # filling the half-used GPU leaves a whole one


def test_fgd_learns_the_mix_from_requests():
    p = fgd.Plugin(refresh=1, coverage=1.0)
    for _ in range(3):
        p.observe(req(memory_bytes=GiB, isolation=t.ISOLATION_MPS, compute_share=0.25))
    p.observe(req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE))
    assert {(m.gpus, m.milli): round(m.weight, 2) for m in p.mix} == {(1, 250): 0.75, (1, 1000): 0.25}


@pytest.mark.parametrize("name,ranks,domains,nics,want", [
    ("single slice", [0], [[0, 1]], [], 0.0),
    ("gang in one NVLink domain", [0, 1], [[0, 1]], [], 1.0),
    ("gang across domains", [0, 2], [[0, 1], [2, 3]], [], 0.0),
    ("gang in a domain and under one NIC", [0, 1], [[0, 1]], [[0, 1]], 2.0),
])
def test_topology(name, ranks, domains, nics, want):
    fleet = make_fleet(("n", [("H100-80GB", False)] * 4, domains))
    node = fleet.nodes["n"]
    rec = t.Node()
    rec.CopyFrom(node.record)
    for gs in nics:
        rec.inventory.nics.add(name="ib0", kind="infiniband", gpus=gs)
    node.record = rec
    order = node.gpu_order()
    option = tuple(Pick(order.index(i), "exclusive") for i in ranks)
    assert topology.Plugin().score(CycleState(), req(memory_bytes=GiB), node, option) == want


@pytest.mark.parametrize("name,limits,used,spec,code", [
    ("no quota", {}, 3, {"memory_bytes": GiB}, Code.SUCCESS),
    ("slices under", {"max_slices": 4}, 3, {"memory_bytes": GiB}, Code.SUCCESS),
    ("slices over", {"max_slices": 3}, 3, {"memory_bytes": GiB}, Code.UNSCHEDULABLE_AND_UNRESOLVABLE),
    ("memory over", {"max_memory_bytes": 4 * GiB}, 3, {"memory_bytes": 2 * GiB}, Code.UNSCHEDULABLE_AND_UNRESOLVABLE),
    ("gpus over", {"max_gpus": 1}, 0, {"memory_bytes": GiB, "isolation": t.ISOLATION_EXCLUSIVE, "count": 2},
     Code.UNSCHEDULABLE_AND_UNRESOLVABLE),
    ("priority at the cap", {"max_priority": 100}, 3, {"memory_bytes": GiB, "priority": 100}, Code.SUCCESS),
    ("priority over the cap", {"max_priority": 100}, 0, {"memory_bytes": GiB, "priority": 101},
     Code.UNSCHEDULABLE_AND_UNRESOLVABLE),
])
def test_quota(name, limits, used, spec, code):
    fleet = make_fleet(("n", [("L4", False)]))
    for i in range(used):
        fleet.put_slice(t.Slice(id=f"q{i}", tenant="t", node="n", gpu_index=0, memory_bytes=GiB,
                                isolation=t.ISOLATION_TIMESHARE))
    st = quota.Plugin(tenants={"t": limits}).pre_filter(CycleState(), req(**spec), fleet)
    assert st.code == code
    if code != Code.SUCCESS:
        assert list(limits)[0] in st.reasons[0][1]


def test_quota_args_are_validated():
    with pytest.raises(ValueError, match="unknown quota 'max_cpus'"):
        quota.Plugin(tenants={"t": {"max_cpus": 1}})


@pytest.mark.parametrize("name,existing_labels,existing_rules,labels,rules,code", [
    ("no rules", {"app": "db"}, {}, {}, {}, Code.SUCCESS),
    ("rule matches a slice there", {"replica-of": "db"}, {}, {}, {"replica-of": "db"}, Code.UNSCHEDULABLE),
    ("rule does not match", {"replica-of": "web"}, {}, {}, {"replica-of": "db"}, Code.SUCCESS),
    ("slice there is anti-affine to us", {}, {"team": "a"}, {"team": "a"}, {}, Code.UNSCHEDULABLE),
])
def test_antiaffinity(name, existing_labels, existing_rules, labels, rules, code):
    fleet = make_fleet(("n", [("L4", False)]))
    fleet.put_slice(t.Slice(id="x", tenant="t", node="n", gpu_index=0, memory_bytes=GiB,        # req's tenant
                            isolation=t.ISOLATION_TIMESHARE, labels=existing_labels, anti_affinity=existing_rules))
    r = req(memory_bytes=GiB, labels=labels, anti_affinity=rules)
    assert antiaffinity.Plugin().filter(CycleState(), r, fleet.nodes["n"]).code == code


def test_random_is_seeded():
    a, b = random_score.Plugin(seed=3), random_score.Plugin(seed=3)
    assert [a.score(None, None, None, ()) for _ in range(3)] == [b.score(None, None, None, ()) for _ in range(3)]


@pytest.mark.parametrize("policy,want", [("bestfit", "full"), ("packing", "full"), ("spread", "empty")])
def test_packing_policies_choose_nodes(policy, want):
    fleet = make_fleet(("empty", [("L4", False)] * 2), ("full", [("L4", False)] * 2))
    from controlplane.placement import place
    commit(fleet, place(fleet, req(memory_bytes=8 * GiB, gpu_model="L4")))
    fleet2 = make_fleet(("empty", [("L4", False)] * 2), ("full", [("L4", False)] * 2))
    fleet2.put_slice(t.Slice(id="x", node="full", gpu_index=0, memory_bytes=8 * GiB, isolation=t.ISOLATION_TIMESHARE))
    choice = profiles.build(policy).schedule(req(memory_bytes=4 * GiB), fleet2).choices[0]
    assert choice.node == want


@pytest.mark.parametrize("cfg,match", [
    ({"profile": "nope"}, "unknown scheduler profile"),
    ({"weights": {"Nope": 1}}, "unknown plugin"),
    ({"weights": {"BestFit": -1}}, "not a finite number >= 0"),
    # NaN or infinite weights and arguments make NaN scores (every comparison false: the first node wins)
    ({"weights": {"Topology": float("nan")}}, r"weights.Topology: nan is not a finite number"),
    ({"weights": {"Topology": float("inf")}}, r"weights.Topology: inf is not a finite number"),
    ({"args": {"Topology": {"nvlink_weight": float("nan")}}}, "nvlink_weight must be a finite number"),
    ({"profile": "bestfit", "args": {"BestFit": {"gpu_weight": float("inf")}}}, "gpu_weight must be a finite"),
    ({"profile": "packing", "args": {"Packing": {"used_gpu": float("nan")}}}, "used_gpu must be a finite"),
    ({"args": {"FragmentationGradient": {"scale": float("nan")}}}, "scale must be a finite number > 0"),
    ({"args": {"FragmentationGradient": {"quantum": float("inf")}}}, "quantum must be a finite number"),
    # a NaN quota is never exceeded: it would switch the quota off
    ({"args": {"TenantQuota": {"default": {"max_slices": float("nan")}}}}, "max_slices must be a number"),
    ({"args": {"TenantQuota": {"tenants": {"t": {"max_slices": -1}}}}}, "max_slices must be a number"),
    ({"preemption": "yes"}, "preemption must be true or false"),
    ({"extra": 1}, "unknown key"),
])
def test_profile_config_errors_name_the_problem(cfg, match):
    with pytest.raises(profiles.ConfigError, match=match):
        profiles.from_config(cfg)


@pytest.mark.parametrize("field,value,match", [
    ("cpu_milli", -1, "spec.cpu_milli"),
    ("host_memory_bytes", -5, "spec.host_memory_bytes"),
])
def test_slicespec_host_resources_are_validated(field, value, match):
    with pytest.raises(errors.InvalidArgument, match=match):
        req(memory_bytes=GiB, **{field: value})


def test_slicespec_anti_affinity_keys_are_validated():
    with pytest.raises(errors.InvalidArgument, match="anti_affinity"):
        req(memory_bytes=GiB, anti_affinity={"bad key!": "x"})
    r = req(memory_bytes=GiB, anti_affinity={"replica-of": "db"}, preempt=True, cpu_milli=500)
    assert (r.anti_affinity, r.preempt, r.cpu_milli) == ({"replica-of": "db"}, True, 500)


@pytest.mark.parametrize("name,pressure,thermal,want", [
    ("calm", "low", "normal", 0.0),
    ("normal pressure is calm", "normal", "normal", 0.0),
    ("high pressure", "high", "normal", -1.0),
    ("warm and pressed", "high", "warning", -2.0),
])
def test_pressure(name, pressure, thermal, want):
    from controlplane.scheduler.plugins import pressure as pressure_plugin
    fleet = make_fleet(("n", [("L4", False)]))
    node = fleet.nodes["n"]
    node.gpus[0].memory_pressure, node.gpus[0].thermal_state = pressure, thermal
    assert pressure_plugin.Plugin().score(CycleState(), req(memory_bytes=GiB), node, (Pick(0, "timeshare"),)) == want


@pytest.mark.parametrize("plugin,args,match", [
    ("Preemption", {"max_victims": 0}, "max_victims"),
    ("FragmentationGradient", {"coverage": 0}, "coverage"),
    ("FragmentationGradient", {"weighting": "size"}, "weighting"),
    ("BestFit", {"cpu_weight": -1}, "cpu_weight"),
    ("Packing", {"used_gpu": "x"}, "used_gpu"),
    ("Topology", {"rail_weight": -2}, "rail_weight"),
    ("Random", {"seed": "x"}, "seed"),
    ("NodeResourcesFit", {"enforce_host": 1}, "enforce_host"),
])
def test_plugin_constructors_validate_their_arguments(plugin, args, match):
    from controlplane.scheduler.plugins import REGISTRY
    with pytest.raises(ValueError, match=match):
        REGISTRY[plugin](**args)


def _mps(fleet, node: str, gpu: int, share: float, sid: str) -> None:
    mem = fleet.nodes[node].gpus[gpu].memory_bytes
    fleet.put_slice(t.Slice(id=sid, node=node, gpu_index=gpu, memory_bytes=int(share * mem),
                            compute_share=share, isolation=t.ISOLATION_MPS))


@pytest.mark.parametrize("name,used,spec,gpu,want", [
    # the artifact's GPU-packing tiers, in whole numbers
    ("idle node of 4 GPUs: 33 - 4", {}, {"compute_share": 0.25}, 0, 29),
    ("used GPU half free: 100 - 50/10", {0: 0.5}, {"compute_share": 0.25}, 0, 95),
    ("idle GPU of a used node: 50 - 1", {0: 0.5}, {"compute_share": 0.25}, 1, 49),
    ("two idle GPUs of a used node: 50 - 2", {0: 0.5}, {"count": 2, "topology": t.TOPOLOGY_SAME_NODE,
                                                      "isolation": t.ISOLATION_EXCLUSIVE}, None, 48),
    ("no GPU asked for: 0", {}, "host", None, 0),
])
def test_packing_integer_tiers(name, used, spec, gpu, want):
    from controlplane.scheduler.plugins import packing
    fleet = make_fleet(("n", [("L4", False)] * 4))
    for i, share in used.items():
        _mps(fleet, "n", i, share, f"u{i}")
    node = fleet.nodes["n"]
    if spec == "host":   # a request for host CPU only (the trace's CPU pods; not in the API)
        from tools.replay.trace import TracePod, request_of
        r = request_of(TracePod("p", 1000, 1024, 0, 0))
    else:
        r = req(**{"isolation": t.ISOLATION_MPS, "memory_bytes": GiB, **spec})
    fw = profiles.build("packing")
    opts = fw.node_options(CycleState(), r, node)
    if gpu is not None:
        opts = [o for o in opts if node.gpus[node.gpu_order()[o[0].rank]].index == gpu]
    assert packing.Plugin(integer=True).score(CycleState(), r, node, opts[0]) == want


@pytest.mark.parametrize("name,cpu_used,gpus_used,want", [
    # 100 x (1 - (free CPU after / 128 cores + free GPU after / 8 GPUs) / 2), whole numbers
    ("empty 64-core 4-GPU node, one GPU asked", 0, 0, int((1 - (64 / 128 + 3 / 8) / 2) * 100)),
    ("fuller node scores higher", 32000, 2, int((1 - (32 / 128 + 1 / 8) / 2) * 100)),
])
def test_bestfit_integer(name, cpu_used, gpus_used, want):
    from controlplane.scheduler.plugins import bestfit
    fleet = make_fleet(("n", [("L4", False)] * 4))
    with_host(fleet, "n", 64000, 256 * GiB)
    for i in range(gpus_used):
        fleet.put_slice(t.Slice(id=f"x{i}", node="n", gpu_index=i, memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE,
                                cpu_milli=cpu_used // max(1, gpus_used)))
    if cpu_used and not gpus_used:
        fleet.put_slice(t.Slice(id="h", node="n", gpu_index=-1, isolation=t.ISOLATION_HOST, cpu_milli=cpu_used))
    node = fleet.nodes["n"]
    r = req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE)
    opt = profiles.build("bestfit").node_options(CycleState(), r, node)[0]
    assert bestfit.Plugin(integer=True).score(CycleState(), r, node, opt) == want


@pytest.mark.parametrize("name,counts,cpu_types,normalize,want", [
    ("host-only types left out", {(1, 1000, 0, frozenset()): 6, (0, 0, 4000, frozenset()): 4}, False, False,
     {(1, 1000): 1.0}),
    ("host-only types kept (the artifact)", {(1, 1000, 0, frozenset()): 6, (0, 0, 4000, frozenset()): 4}, True,
     False, {(1, 1000): 0.6, (0, 0): 0.4}),
    ("share of all requests", {(1, 1000, 0, frozenset()): 90, (1, 500, 0, frozenset()): 5,
                               (1, 100, 0, frozenset()): 5}, False, False, {(1, 1000): 0.9, (1, 500): 0.05}),
    ("normalized over the kept types", {(1, 1000, 0, frozenset()): 90, (1, 500, 0, frozenset()): 5,
                                        (1, 100, 0, frozenset()): 5}, False, True,
     {(1, 1000): 0.9 / 0.95, (1, 500): 0.05 / 0.95}),
])
def test_fgd_mix_from_counts(name, counts, cpu_types, normalize, want):
    from collections import Counter
    p = fgd.Plugin(cpu_types=cpu_types, normalize=normalize)
    p.set_counts(Counter(counts))
    assert {(m.gpus, m.milli): m.weight for m in p.mix} == pytest.approx(want)


def test_fgd_host_only_type_counts_all_free_gpu():
    mix = [fgd.MixType(0, 0, 4000, weight=0.5), fgd.MixType(1, 500, weight=0.5)]
    assert fgd.frag_of(mix, "T4", 1e9, (1000, 300)) == pytest.approx(0.5 * 1300 + 0.5 * 300)


def test_fgd_integer_score_is_the_artifacts():
    fleet = make_fleet(("n", [("L4", False)] * 2))
    node = fleet.nodes["n"]
    p = fgd.Plugin(integer=True)
    p.set_mix([fgd.MixType(1, 1000, weight=1.0)])
    r = req(memory_bytes=GiB, isolation=t.ISOLATION_MPS, compute_share=0.25)
    opt = profiles.build("fgd").node_options(CycleState(), r, node)[0]
    # 250 milli taken from an idle GPU: fragment 2000 - 1000 ... the 750 left is unusable by whole-GPU pods
    assert p.score(CycleState(), r, node, opt) == int(100 / (1 + __import__("math").exp(750 / 1000)))


class _Flat:
    """A score plugin that scores every option alike and prefers the fuller GPU inside a node."""
    NAME = "Flat"
    cacheable = True

    def score(self, state, req, node, option):
        return 1.0

    def tiebreak(self, state, req, node, option):
        from controlplane.scheduler.framework import gpu_of
        from controlplane.scheduler.plugins._gpu import free_milli
        return -sum(free_milli(gpu_of(node, p)) for p in option)


def test_tiebreak_chooses_the_gpu_inside_a_node_never_the_node():
    from controlplane.scheduler.framework import Framework, Profile
    from controlplane.scheduler.plugins import noderesources
    fleet = make_fleet(("a", [("L4", False)] * 2), ("b", [("L4", False)]))
    _mps(fleet, "a", 1, 0.5, "half")
    _mps(fleet, "b", 0, 0.7, "most")   # b's GPU is the fullest of all, but b comes second
    fw = Framework(Profile("t", [noderesources.Plugin(), _Flat()], {"Flat": 1.0}))
    c = fw.schedule(req(memory_bytes=GiB, isolation=t.ISOLATION_MPS, compute_share=0.25), fleet).choices[0]
    assert (c.node, c.gpu_index) == ("a", 1)


@pytest.mark.parametrize("name,mem_free,want", [
    ("memory enough: only slivers are fragment", 64 * GiB, 300.0),
    ("memory short: every free GPU is fragment", 8 * GiB, 1300.0),
])
def test_fgd_host_memory_strands_gpus(name, mem_free, want):
    mix = [fgd.MixType(1, 500, 0, frozenset(), 1.0, 48 * GiB)]
    assert fgd.frag_of(mix, "T4", 1e9, (1000, 300), mem_free) == pytest.approx(want)


def test_fgd_learns_each_types_host_memory():
    p = fgd.Plugin(refresh=1, coverage=1.0, host_memory=True)
    for mem in (48, 48, 16):
        p.observe(req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE, host_memory_bytes=mem * GiB))
    assert [(m.gpus, m.memory) for m in p.mix] == [(1, 48 * GiB)]   # the type's most common ask
    from collections import Counter
    q = fgd.Plugin(host_memory=True)
    q.set_counts(Counter({(1, 1000, 0, frozenset()): 3}), {(1, 1000, 0, frozenset()): 24 * GiB})
    assert q.mix[0].memory == 24 * GiB
    assert fgd.Plugin().mix[0].memory == 0   # off by default (the artifact ignores host memory)
