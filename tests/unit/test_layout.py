"""Declared MIG layouts, MIG mode and IN_USE through the agent's NVML path over
the simulated NVML (nodeagent.layout, nodeagent.gpu, nodeagent.slicer)."""

from __future__ import annotations

import asyncio

import pytest

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from mesh import gpumodels
from nodeagent.agent import NodeAgent
from nodeagent.gpu import GpuInUse, NvmlGpus
from nodeagent.hostfile import make_host
from nodeagent.layout import (LABEL, GpuLayout, LayoutError, MigPlan, NodeMig, apply_layout, assert_layout,
                              named_layouts, parse_modes)
from nodeagent.nvml import load_nvml
from nodeagent.slicer import Slicer


def gpus_of(state_dir, model, count=1, mig=True):
    nvml = load_nvml("sim", make_host("n1", count, model, mig=mig), state_dir / "state.json")
    g = NvmlGpus(nvml)
    g.init()
    return g, g.inventory()


def mig_slice(gpu, profile, start, sid="s-1"):
    s = t.Slice(id=sid, node="n1", gpu_index=gpu.index, gpu_uuid=gpu.uuid, isolation=t.ISOLATION_MIG, profile=profile)
    s.placement.start = start
    return s


# -- named layouts ------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["A100-40GB", "H100-80GB"])
def test_every_named_layout_applies_and_asserts_idempotently(state_dir, model):
    m = gpumodels.get_model(model)
    names = named_layouts(m)
    assert {"all-disabled", "balanced", f"all-{m.mig_profiles[0].name}"} <= set(names)
    assert len([n for n in names if n.startswith("all-") and n not in ("all-disabled", "all-balanced")]) == \
        len(m.mig_profiles)
    gpus, _ = gpus_of(state_dir, model)
    previous = None
    for name, want in names.items():
        if not want.mig_enabled:
            continue       # MIG mode changes need a reset: tested below
        for p, s in want.placements:    # every named layout is legal and uses its profile to the full
            assert gpumodels.placement_conflict(m, [x for x in want.placements if x != (p, s)], p, s) is None
        res = apply_layout(gpus, 0, want)
        assert not res.error and not res.pending, (name, res.error)
        assert res.changed == (previous is None or set(previous.placements) != set(want.placements))
        assert sorted((i.profile, i.start) for i in gpus.mig_instances(0)) == sorted(want.placements)
        assert assert_layout(gpus, 0, want) == []
        again = apply_layout(gpus, 0, want)                 # idempotent: the assert passes, nothing is done
        assert not again.changed and not again.destroyed and not again.created
        previous = want
    # only what differs is destroyed and created
    gpus2, _ = gpus_of(state_dir, model)
    bal = names["balanced"]
    apply_layout(gpus2, 0, names[f"all-{m.mig_profiles[0].name}"])
    res = apply_layout(gpus2, 0, bal)
    assert set(res.created).isdisjoint(res.destroyed)
    kept = set(names[f"all-{m.mig_profiles[0].name}"].placements) & set(bal.placements)
    assert kept and not kept & set(res.destroyed)


def test_balanced_uses_the_whole_gpu():
    for model in ("A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB"):
        m = gpumodels.get_model(model)
        bal = named_layouts(m)["balanced"].placements
        assert sum(m.profile(p).compute_slices for p, _ in bal) == 7
        assert sum(m.profile(p).memory_slices for p, _ in bal) == 8


def test_plan_from_settings_and_errors(tmp_path):
    h100, l4 = gpumodels.get_model("H100-80GB"), gpumodels.get_model("L4")
    models = {0: h100, 1: h100, 2: l4}
    plan = MigPlan.build(models, "keep", "all-1g.10gb")
    assert set(plan.layouts) == {0, 1} and plan.modes == {0: True, 1: True}     # the L4 is left alone
    assert plan.labels()[LABEL] == "all-1g.10gb" and plan.labels()[f"{LABEL}.gpu0"].startswith("1g.10gb@0,")
    f = tmp_path / "layout.yaml"
    f.write_text('version: v1\ngpus:\n  "0": balanced\n  "1": [3g.40gb@0, 3g.40gb@4]\n')
    plan = MigPlan.build(models, "keep", str(f))
    assert plan.layouts[1].placements == (("3g.40gb", 0), ("3g.40gb", 4))
    assert plan.labels()[LABEL] == "0=balanced,1=custom"
    assert MigPlan.build(models, "0=enable,1=disable", "").modes == {0: True, 1: False}
    assert MigPlan.build(models, "keep", "").layouts == {}
    for mode, layout, text in [
            ("keep", "all-1g.5gb", "unknown layout 'all-1g.5gb' for H100-80GB"),
            ("disable", "balanced", "needs MIG enabled"),
            ("2=enable", "", "GPU 2 is not MIG-capable"),
            ("7=enable", "", "GPU 7 does not exist")]:
        with pytest.raises(LayoutError, match=text):
            MigPlan.build(models, mode, layout)
    f.write_text('gpus:\n  "0": [3g.40gb@0, 4g.40gb@0]\n')
    with pytest.raises(LayoutError, match="overlaps"):
        MigPlan.build(models, "keep", str(f))
    with pytest.raises(LayoutError, match="allowed: keep, enable, disable"):
        parse_modes("sometimes")
    assert parse_modes("0-1,3=enable,2=disable") == {"0-1,3": "enable", "2": "disable"}


def test_declared_layout_maps_slices_and_refuses_others(state_dir):
    gpus, inv = gpus_of(state_dir, "H100-80GB")
    plan = MigPlan.build(gpus.models, "keep", "all-3g.40gb")
    assert apply_layout(gpus, 0, plan.layouts[0]).created == [("3g.40gb", 0), ("3g.40gb", 4)]
    slicer = Slicer(gpus, "/tmp/mps")
    slicer.layout = plan
    before = {(i.gi_id, i.uuid) for i in gpus.mig_instances(0)}
    st = slicer.realize(mig_slice(inv[0], "3g.40gb", 4))
    assert st.state == t.SLICE_STATE_READY and st.device_uuid in {u for _, u in before}
    bad = slicer.realize(mig_slice(inv[0], "1g.10gb", 0, "s-2"))
    assert bad.state == t.SLICE_STATE_FAILED and "not in the declared MIG layout 'all-3g.40gb'" in bad.message
    assert slicer.teardown("s-1") is None                           # released, the instance stays
    assert {(i.gi_id, i.uuid) for i in gpus.mig_instances(0)} == before
    assert Slicer(gpus, "/tmp/mps").adopt({}) != []                 # without the declaration: orphans
    slicer2 = Slicer(gpus, "/tmp/mps")
    slicer2.layout = plan
    assert slicer2.adopt({}) == []                                  # with it: declared instances are kept


# -- MIG mode -----------------------------------------------------------------------------

def test_mig_mode_enable_stays_pending_until_a_reset_and_is_reported(state_dir):
    gpus, inv = gpus_of(state_dir, "A100-40GB", count=2, mig=False)
    agent = NodeAgent("n1", "127.0.0.1:1", gpus, mps_root=str(state_dir / "mps"), backend="sim")
    mig = NodeMig(agent, mig_mode="1=enable").install()
    mig.start()
    mode = gpus.mig_mode(1)
    assert not mode.current and mode.pending and mode.reset_needed      # asked for, never forced
    assert not gpus.mig_mode(0).reset_needed                             # GPU 0 kept as it was
    gpu1 = [g for g in agent.inventory().gpus if g.index == 1][0]
    assert not gpu1.mig_enabled and gpu1.mig_pending
    outbox: asyncio.Queue = asyncio.Queue()
    mig.on_session(outbox)
    events = [outbox.get_nowait().event for _ in range(outbox.qsize())]
    assert [(e.reason, e.gpu_index, e.type) for e in events] == [("MigModePending", 1, "Warning")]
    assert "next GPU reset" in events[0].message
    mig.start()                                                          # a restarted agent asks again: no change
    assert gpus.mig_mode(1).reset_needed
    gpus.nvml.sim_reset_gpu(1)                                           # the operator resets the GPU
    assert gpus.mig_mode(1).current and not gpus.mig_mode(1).reset_needed
    outbox = asyncio.Queue()
    mig.on_session(outbox)
    assert outbox.empty()
    assert gpus.create_mig(1, "1g.5gb", 0).uuid.startswith("MIG-")


def test_declared_layout_with_a_pending_mode_and_all_disabled(state_dir):
    gpus, _ = gpus_of(state_dir, "H100-80GB", count=1, mig=False)
    res = apply_layout(gpus, 0, named_layouts(gpumodels.get_model("H100-80GB"))["balanced"])
    assert res.pending and not res.error and gpus.mig_mode(0).pending
    gpus.nvml.sim_reset_gpu(0)
    res = apply_layout(gpus, 0, named_layouts(gpumodels.get_model("H100-80GB"))["balanced"])
    assert not res.pending and len(res.created) == 4
    off = GpuLayout("all-disabled", False)
    res = apply_layout(gpus, 0, off)                      # destroys the instances, then asks for the mode
    assert res.pending and gpus.mig_instances(0) == [] and not gpus.mig_mode(0).pending


def test_set_mig_mode_with_instances_is_in_use(state_dir):
    gpus, _ = gpus_of(state_dir, "H100-80GB")
    gpus.create_mig(0, "1g.10gb", 0)
    with pytest.raises(GpuInUse) as exc:
        gpus.set_mig_mode(0, False)
    assert exc.value.nvml_code == 19


# -- IN_USE ---------------------------------------------------------------------------------

def test_teardown_refused_while_processes_run_then_released(state_dir):
    gpus, inv = gpus_of(state_dir, "H100-80GB")
    slicer = Slicer(gpus, "/tmp/mps")
    st = slicer.realize(mig_slice(inv[0], "2g.20gb", 2))
    gpus.nvml.sim_add_process(st.device_uuid, 4242, 1 << 30)
    gpus.nvml.sim_add_process(st.device_uuid, 4343, 1 << 30)
    with pytest.raises(GpuInUse) as exc:
        gpus.destroy_mig(0, st.gpu_instance_id)
    assert exc.value.pids == [4242, 4343] and exc.value.nvml_code == 19
    err = slicer.teardown("s-1")
    assert err and "4242, 4343" in err and "in use" in err
    assert [i.gi_id for i in gpus.mig_instances(0)] == [st.gpu_instance_id]       # nothing was destroyed
    assert gpus.device_pids(st.device_uuid) == [4242, 4343]
    gpus.nvml.sim_remove_process(st.device_uuid, 4242)
    gpus.nvml.sim_remove_process(st.device_uuid, 4343)
    assert slicer.teardown("s-1") is None and gpus.mig_instances(0) == []


async def test_agent_keeps_a_blocked_release_and_retries_it(state_dir, monkeypatch):
    from nodeagent import agent as agent_mod
    monkeypatch.setattr(agent_mod, "RETRY_TEARDOWN_S", 0.05)
    gpus, inv = gpus_of(state_dir, "H100-80GB")
    agent = NodeAgent("n1", "127.0.0.1:1", gpus, mps_root=str(state_dir / "mps"), backend="sim")
    outbox: asyncio.Queue = asyncio.Queue()
    s = mig_slice(inv[0], "1g.10gb", 3)
    await agent._apply(node_service_pb2.DesiredSlices(full=True, upserts=[s]), outbox)
    st = outbox.get_nowait().report.statuses[0]
    assert st.state == t.SLICE_STATE_READY
    gpus.nvml.sim_add_process(st.device_uuid, 777, 1 << 20)
    await agent._apply(node_service_pb2.DesiredSlices(removals=[s.id]), outbox)
    msgs = [outbox.get_nowait() for _ in range(outbox.qsize())]
    ev = [m.event for m in msgs if m.WhichOneof("kind") == "event"]
    assert [(e.reason, e.gpu_index) for e in ev] == [("ReleaseBlocked", 0)] and "777" in ev[0].message
    assert s.id in ev[0].message
    assert not any(m.WhichOneof("kind") == "report" and m.report.released for m in msgs)
    assert agent.stuck == {s.id}
    retry = asyncio.create_task(agent._retry_stuck(outbox))
    try:
        await asyncio.sleep(0.2)
        assert outbox.empty() and agent.stuck == {s.id}              # still in use
        gpus.nvml.sim_remove_process(st.device_uuid, 777)
        msg = await asyncio.wait_for(outbox.get(), 60)          # a retry in a thread: no tight bound
        assert list(msg.report.released) == [s.id] and not agent.stuck
    finally:
        retry.cancel()
    assert gpus.mig_instances(0) == []
