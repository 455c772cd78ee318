"""The agent's own NVML code path (nodeagent.gpu + nodeagent.slicer) over the
simulated NVML: every valid MIG layout is created, enumerated, adopted by a
restarted agent, and destroyed; invalid placements fail with NVML's error."""

from __future__ import annotations

import pytest

from gpumesh.v1 import types_pb2 as t
from mesh import gpumodels
from nodeagent.gpu import GpuError, NvmlGpus
from nodeagent.hostfile import make_host
from nodeagent.nvml import load_nvml
from nodeagent.slicer import Slicer

MODELS = ["A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB"]


def agent_gpus(state_dir, model, gpus=1):
    nvml = load_nvml("sim", make_host("n1", gpus, model), state_dir / "state.json")
    g = NvmlGpus(nvml)
    g.init()
    inv = g.inventory()
    return g, inv


def desired(inv_gpu, layout, prefix="s"):
    out = {}
    for k, (profile, start) in enumerate(layout):
        s = t.Slice(id=f"{prefix}-{k}", node="n1", gpu_index=inv_gpu.index, gpu_uuid=inv_gpu.uuid,
                    isolation=t.ISOLATION_MIG, profile=profile)
        s.placement.start = start
        out[s.id] = s
    return out


@pytest.mark.parametrize("model", MODELS)
def test_every_maximal_layout_through_the_agent_path(state_dir, model):
    m = gpumodels.get_model(model)
    layouts = gpumodels.enumerate_layouts(m, maximal_only=True)
    assert layouts
    gpus, inv = agent_gpus(state_dir, model)
    for layout in layouts:
        want = desired(inv[0], layout)
        slicer = Slicer(gpus, "/tmp/mps")
        statuses = [slicer.realize(s) for s in want.values()]
        assert all(st.state == t.SLICE_STATE_READY for st in statuses), [st.message for st in statuses]
        assert len({st.device_uuid for st in statuses}) == len(layout)
        found = gpus.mig_instances(0)
        assert sorted((i.profile, i.start) for i in found) == sorted(layout)
        # every other placement is refused by NVML now (the layout is maximal)
        for p in m.mig_profiles:
            for start in p.starts:
                if (p.name, start) in layout:
                    continue
                with pytest.raises(GpuError) as exc:
                    gpus.create_mig(0, p.name, start)
                assert exc.value.nvml_code is not None
        # a restarted agent (new NVML handle on the same device state) adopts all of them
        gpus2, _ = agent_gpus(state_dir, model)
        again = Slicer(gpus2, "/tmp/mps")
        assert again.adopt(want) == []
        assert {sid: (i.gi_id, i.uuid) for sid, i in again.mig.items()} == \
               {st.slice_id: (st.gpu_instance_id, st.device_uuid) for st in statuses}
        for sid in want:
            assert again.teardown(sid) is None
        assert gpus2.mig_instances(0) == []


def test_orphans_are_found_and_invalid_placements_refused(state_dir):
    gpus, inv = agent_gpus(state_dir, "H100-80GB", gpus=2)
    kept = gpus.create_mig(0, "3g.40gb", 4)
    stray = gpus.create_mig(1, "1g.10gb", 2)
    slicer = Slicer(gpus, "/tmp/mps")
    orphans = slicer.adopt(desired(inv[0], [("3g.40gb", 4)]))
    assert [(o.gpu_index, o.gi_id) for o in orphans] == [(1, stray.gi_id)]
    assert slicer.mig["s-0"].gi_id == kept.gi_id
    slicer.destroy_orphan(orphans[0])
    assert gpus.mig_instances(1) == []
    with pytest.raises(GpuError) as exc:          # overlaps the 3g.40gb at slots 4-7
        gpus.create_mig(0, "2g.20gb", 4)
    assert exc.value.nvml_code == gpus.nvml.NVML_ERROR_INSUFFICIENT_RESOURCES
    with pytest.raises(GpuError) as exc:          # not a legal start for the profile
        gpus.create_mig(0, "3g.40gb", 2)
    assert exc.value.nvml_code == gpus.nvml.NVML_ERROR_INVALID_ARGUMENT


def test_non_mig_slices_and_hardware_mismatch(state_dir):
    gpus, inv = agent_gpus(state_dir, "L4")
    slicer = Slicer(gpus, "/tmp/mps")
    s = t.Slice(id="s-1", gpu_index=0, gpu_uuid=inv[0].uuid, isolation=t.ISOLATION_MPS,
                memory_bytes=4 << 30, compute_share=0.3)
    st = slicer.realize(s)
    assert st.state == t.SLICE_STATE_READY and st.device_uuid == inv[0].uuid
    assert st.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert st.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=4096M"
    s.gpu_uuid = "GPU-something-else"
    assert slicer.realize(s).state == t.SLICE_STATE_FAILED
    s.gpu_index = 5
    assert "no GPU 5" in slicer.realize(s).message


def test_a_lost_gpu_keeps_its_last_known_identity_in_the_inventory(state_dir):
    gpus, inv = agent_gpus(state_dir, "H100-80GB", gpus=2)
    gpus.nvml.sim_lose_gpu(1)
    again = gpus.inventory()
    assert [g.uuid for g in again] == [g.uuid for g in inv]          # no crash, same identity
    fresh, _ = agent_gpus(state_dir, "H100-80GB", gpus=2)             # a restarted agent never saw it
    assert [g.index for g in fresh.inventory()] == [0]
