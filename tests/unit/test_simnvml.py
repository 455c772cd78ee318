"""The simulated NVML, driven only through its pynvml-shaped API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from ctypes import byref, c_uint
from pathlib import Path

import pynvml
import pytest

from mesh.gpumodels import enumerate_layouts, get_model
from nodeagent.hostfile import make_host
from nodeagent.nvml import load_nvml, sim
from nodeagent.nvml.sim import SimNvml

ROOT = Path(__file__).resolve().parents[2]
H100X8 = ROOT / "tools" / "hosts" / "h100x8.yaml"
MIXED = ROOT / "tools" / "hosts" / "mixed.yaml"
SHARED = pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED


@pytest.fixture
def start(state_dir):
    """A simulator of a host, initialised, as the agent loads it; returns (nvml, state path)."""

    started = []

    def go(host, name="state.json"):
        state = state_dir / name
        nvml = load_nvml("sim", host, state)
        nvml.nvmlInit()
        started.append(nvml)
        return nvml, state

    yield go
    for nvml in started:
        while nvml._refcount > 0:
            nvml.nvmlShutdown()


# -- agent-style helpers: only pynvml calls ---------------------------------

def placements(n, dev, profile_id):
    count = c_uint(0)
    n.nvmlDeviceGetGpuInstancePossiblePlacements(dev, profile_id, None, byref(count))
    arr = (n.c_nvmlGpuInstancePlacement_t * count.value)()
    n.nvmlDeviceGetGpuInstancePossiblePlacements(dev, profile_id, arr, byref(count))
    return [(arr[i].start, arr[i].size) for i in range(count.value)]


def create(n, dev, model, name, start):
    p = model.profile(name)
    info = n.nvmlDeviceGetGpuInstanceProfileInfo(dev, p.nvml_profile)
    placement = n.c_nvmlGpuInstancePlacement_t(start, p.memory_slices)
    gi = n.nvmlDeviceCreateGpuInstanceWithPlacement(dev, info.id, byref(placement))
    ci_info = n.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, p.ci_profile, SHARED)
    return gi, n.nvmlGpuInstanceCreateComputeInstance(gi, ci_info.id)


def list_gis(n, dev, model):
    out = []
    for p in model.mig_profiles:
        info = n.nvmlDeviceGetGpuInstanceProfileInfo(dev, p.nvml_profile)
        arr = (n.c_nvmlGpuInstance_t * info.instanceCount)()
        count = c_uint()
        n.nvmlDeviceGetGpuInstances(dev, info.id, arr, byref(count))
        for i in range(count.value):
            gi_info = n.nvmlGpuInstanceGetInfo(arr[i])
            assert (gi_info.profileId, gi_info.placement.size) == (info.id, p.memory_slices)
            out.append((p.name, gi_info.placement.start, arr[i]))
    return out


def list_cis(n, gi, p):
    info = n.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, p.ci_profile, SHARED)
    arr = (n.c_nvmlComputeInstance_t * info.instanceCount)()
    count = c_uint()
    n.nvmlGpuInstanceGetComputeInstances(gi, info.id, arr, byref(count))
    return [arr[i] for i in range(count.value)]


def mig_devices(n, dev):
    out = []
    for i in range(n.nvmlDeviceGetMaxMigDeviceCount(dev)):
        try:
            out.append(n.nvmlDeviceGetMigDeviceHandleByIndex(dev, i))
        except n.NVMLError_NotFound:
            break
    return out


def teardown_all(n, dev, model):
    for name, _, gi in list_gis(n, dev, model):
        for ci in list_cis(n, gi, model.profile(name)):
            n.nvmlComputeInstanceDestroy(ci)
        n.nvmlGpuInstanceDestroy(gi)


# -- every maximal layout round-trips ---------------------------------------

@pytest.mark.parametrize("model_name", ["A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB"])
def test_every_maximal_layout_round_trips(start, model_name):
    model = get_model(model_name)
    n, _ = start(make_host(f"rt-{model_name}", 1, model_name))
    dev = n.nvmlDeviceGetHandleByIndex(0)
    infos = {p.name: n.nvmlDeviceGetGpuInstanceProfileInfo(dev, p.nvml_profile) for p in model.mig_profiles}
    all_placements = {name: placements(n, dev, info.id) for name, info in infos.items()}
    for p in model.mig_profiles:
        assert all_placements[p.name] == [(s, p.memory_slices) for s in p.starts]
    gpu_uuid = n.nvmlDeviceGetUUID(dev)
    for layout in enumerate_layouts(model, maximal_only=True):
        for name, s in layout:
            create(n, dev, model, name, s)
        assert sorted((name, s) for name, s, _ in list_gis(n, dev, model)) == list(layout)

        migs = mig_devices(n, dev)
        assert len(migs) == len(layout)
        uuids = [n.nvmlDeviceGetUUID(m) for m in migs]
        assert len(set(uuids)) == len(uuids) and all(u.startswith("MIG-") for u in uuids)
        for m, u in zip(migs, uuids):
            assert n.nvmlDeviceIsMigDeviceHandle(m)
            assert n.nvmlDeviceGetUUID(n.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m)) == gpu_uuid
            again = n.nvmlDeviceGetHandleByUUID(u)
            gi = n.nvmlDeviceGetGpuInstanceById(dev, n.nvmlDeviceGetGpuInstanceId(again))
            p = model.profile_by_id(n.nvmlGpuInstanceGetInfo(gi).profileId)
            assert n.nvmlDeviceGetMemoryInfo(again).total == p.memory_mib * 2**20
            assert n.nvmlDeviceGetName(m) == f"{model.product_name} MIG {p.name}"

        for name, info in infos.items():
            assert n.nvmlDeviceGetGpuInstanceRemainingCapacity(dev, info.id) == 0
            for s, size in all_placements[name]:
                with pytest.raises(n.NVMLError_InsufficientResources):
                    n.nvmlDeviceCreateGpuInstanceWithPlacement(dev, info.id, byref(n.c_nvmlGpuInstancePlacement_t(s, size)))
            with pytest.raises(n.NVMLError_InsufficientResources):
                n.nvmlDeviceCreateGpuInstance(dev, info.id)

        teardown_all(n, dev, model)
        assert list_gis(n, dev, model) == [] and mig_devices(n, dev) == []
    assert n.sim_state()["gpus"][0]["gis"] == []


# -- errors ----------------------------------------------------------------

def test_invalid_placements_are_invalid_argument(start):
    n, _ = start(H100X8)
    dev = n.nvmlDeviceGetHandleByIndex(0)
    model = get_model("H100-80GB")
    for name, s, size in [("1g.10gb", 7, 1), ("3g.40gb", 2, 4), ("2g.20gb", 0, 1), ("7g.80gb", 1, 8)]:
        info = n.nvmlDeviceGetGpuInstanceProfileInfo(dev, model.profile(name).nvml_profile)
        with pytest.raises(n.NVMLError_InvalidArgument) as exc:
            n.nvmlDeviceCreateGpuInstanceWithPlacement(dev, info.id, byref(n.c_nvmlGpuInstancePlacement_t(s, size)))
        assert exc.value.value == pynvml.NVML_ERROR_INVALID_ARGUMENT
    with pytest.raises(n.NVMLError_InvalidArgument):
        n.nvmlDeviceCreateGpuInstance(dev, 77)  # no such GI profile id
    with pytest.raises(n.NVMLError_NotSupported):
        n.nvmlDeviceGetGpuInstanceProfileInfo(dev, pynvml.NVML_GPU_INSTANCE_PROFILE_6_SLICE)
    with pytest.raises(n.NVMLError_InvalidArgument):
        n.nvmlDeviceGetGpuInstanceProfileInfo(dev, pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT)
    with pytest.raises(TypeError, match="byref"):
        n.nvmlDeviceCreateGpuInstanceWithPlacement(dev, 19, n.c_nvmlGpuInstancePlacement_t(0, 1))


def test_create_without_placement_and_insufficient_size(start):
    n, _ = start(H100X8)
    dev = n.nvmlDeviceGetHandleByIndex(1)
    starts = [n.nvmlGpuInstanceGetInfo(n.nvmlDeviceCreateGpuInstance(dev, 19)).placement.start for _ in range(7)]
    assert starts == list(range(7))
    assert [n.nvmlGpuInstanceGetInfo(g).id for _, _, g in list_gis(n, dev, get_model("H100"))] == list(range(1, 8))
    with pytest.raises(n.NVMLError_InsufficientResources):
        n.nvmlDeviceCreateGpuInstance(dev, 19)
    count = c_uint(2)
    with pytest.raises(n.NVMLError_InsufficientSize):
        n.nvmlDeviceGetGpuInstancePossiblePlacements(dev, 19, (n.c_nvmlGpuInstancePlacement_t * 2)(), byref(count))
    assert count.value == 7


def test_in_use_rules(start):
    n, _ = start(H100X8)
    dev = n.nvmlDeviceGetHandleByIndex(0)
    gi, ci = create(n, dev, get_model("H100"), "3g.40gb", 4)
    with pytest.raises(n.NVMLError_InUse) as exc:
        n.nvmlGpuInstanceDestroy(gi)
    assert isinstance(exc.value, pynvml.NVMLError_InUse) and exc.value.value == pynvml.NVML_ERROR_IN_USE
    assert str(exc.value) == "In use by another client"
    mig = n.nvmlDeviceGetMigDeviceHandleByIndex(dev, 0)
    uuid = n.nvmlDeviceGetUUID(mig)
    n.sim_add_process(uuid, 4242, 3 * 2**30)
    procs = n.nvmlDeviceGetComputeRunningProcesses(mig)
    assert [(p.pid, p.usedGpuMemory, p.gpuInstanceId, p.computeInstanceId) for p in procs] == [
        (4242, 3 * 2**30, n.nvmlDeviceGetGpuInstanceId(mig), n.nvmlDeviceGetComputeInstanceId(mig))]
    assert [p.pid for p in n.nvmlDeviceGetComputeRunningProcesses(dev)] == [4242]
    assert n.nvmlDeviceGetMemoryInfo(mig).used == 3 * 2**30
    with pytest.raises(n.NVMLError_InUse):
        n.nvmlComputeInstanceDestroy(ci)
    with pytest.raises(n.NVMLError_InUse):
        n.nvmlDeviceSetMigMode(dev, pynvml.NVML_DEVICE_MIG_DISABLE)
    with pytest.raises(n.NVMLError_InUse):
        n.sim_reset_gpu(0)
    assert n.sim_remove_process(uuid, 4242) and not n.sim_remove_process(uuid, 4242)
    n.nvmlComputeInstanceDestroy(ci)
    n.nvmlGpuInstanceDestroy(gi)
    with pytest.raises(n.NVMLError_InvalidArgument):  # stale handle
        n.nvmlGpuInstanceGetInfo(gi)
    with pytest.raises(n.NVMLError_NotFound):
        n.nvmlDeviceGetHandleByUUID(uuid)


def test_uninitialized_and_refcount(tmp_path):
    n = SimNvml()
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        n.nvmlInit()
    n.configure(H100X8, tmp_path / "s.json")
    with pytest.raises(pynvml.NVMLError_Uninitialized) as exc:
        n.nvmlDeviceGetCount()
    assert exc.value.value == pynvml.NVML_ERROR_UNINITIALIZED
    n.nvmlInit()
    n.nvmlInit()
    n.nvmlShutdown()
    assert n.nvmlDeviceGetCount() == 8
    dev = n.nvmlDeviceGetHandleByIndex(0)
    n.nvmlShutdown()
    for call in (n.nvmlDeviceGetCount, lambda: n.nvmlDeviceGetMigMode(dev), n.nvmlShutdown):
        with pytest.raises(n.NVMLError_Uninitialized):
            call()


def test_mig_mode_pending_until_reset(start):
    n, _ = start(make_host("pending", 2, "A100-40GB", mig=False))
    dev = n.nvmlDeviceGetHandleByIndex(0)
    assert n.nvmlDeviceGetMigMode(dev) == [0, 0] and n.nvmlDeviceGetMaxMigDeviceCount(dev) == 0
    # a MIG-capable GPU describes its profiles with MIG off too (as a real H100 does), lists no
    # instances, and refuses to create one
    info = n.nvmlDeviceGetGpuInstanceProfileInfo(dev, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE)
    assert (info.sliceCount, info.instanceCount) == (1, 7)
    count = c_uint(7)
    n.nvmlDeviceGetGpuInstances(dev, info.id, (n.c_nvmlGpuInstance_t * 7)(), byref(count))
    assert count.value == 0
    assert n.nvmlDeviceSetMigMode(dev, pynvml.NVML_DEVICE_MIG_ENABLE) == pynvml.NVML_ERROR_RESET_REQUIRED
    assert n.nvmlDeviceGetMigMode(dev) == [0, 1]
    with pytest.raises(n.NVMLError_NotSupported):
        n.nvmlDeviceCreateGpuInstance(dev, 19)
    n.sim_reset_gpu(0)
    assert n.nvmlDeviceGetMigMode(dev) == [1, 1]
    assert n.nvmlDeviceGetMigMode(n.nvmlDeviceGetHandleByIndex(1)) == [0, 0]
    gi, _ = create(n, dev, get_model("A100-40GB"), "7g.40gb", 0)
    with pytest.raises(n.NVMLError_InUse):  # instances must go before MIG is disabled
        n.nvmlDeviceSetMigMode(dev, pynvml.NVML_DEVICE_MIG_DISABLE)
    assert n.nvmlDeviceSetMigMode(dev, pynvml.NVML_DEVICE_MIG_ENABLE) == pynvml.NVML_SUCCESS
    n.sim_reset_gpu(0)  # a reset keeps the mode but drops the layout
    assert n.nvmlDeviceGetMigMode(dev) == [1, 1] and mig_devices(n, dev) == []


def test_non_mig_model(start):
    n, _ = start(MIXED)
    l4 = n.nvmlDeviceGetHandleByIndex(2)
    assert n.nvmlDeviceGetName(l4) == "NVIDIA L4"
    for call in (lambda: n.nvmlDeviceGetMigMode(l4), lambda: n.nvmlDeviceSetMigMode(l4, 1),
                 lambda: n.nvmlDeviceGetGpuInstanceProfileInfo(l4, 0), lambda: n.nvmlDeviceGetMaxMigDeviceCount(l4),
                 lambda: n.nvmlDeviceGetNvLinkState(l4, 0)):
        with pytest.raises(n.NVMLError_NotSupported):
            call()
    n.sim_add_process(n.nvmlDeviceGetUUID(l4), 7, 2**30)
    (proc,) = n.nvmlDeviceGetComputeRunningProcesses(l4)
    assert (proc.pid, proc.gpuInstanceId) == (7, pynvml.NVML_VALUE_NOT_AVAILABLE_uint.value)
    assert n.nvmlDeviceGetUtilizationRates(l4).gpu > 0
    a100 = n.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(ValueError, match="MIG mode"):
        n.sim_add_process(n.nvmlDeviceGetUUID(a100), 8, 1)


def test_same_objects_as_pynvml():
    for name in ("NVMLError", "NVMLError_InUse", "NVMLError_InsufficientResources", "c_nvmlGpuInstancePlacement_t",
                 "c_nvmlGpuInstanceProfileInfo_v2_t", "c_nvmlMemory_t", "NVML_DEVICE_MIG_ENABLE", "nvmlFriendlyObject"):
        assert getattr(sim, name) is getattr(pynvml, name)
        assert getattr(SimNvml(), name) is getattr(pynvml, name)
    err = sim.NVMLError(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
    assert type(err) is pynvml.NVMLError_InsufficientResources
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        sim.nvmlDeviceGetBrand(None)


def test_load_nvml_backends(state_dir, monkeypatch):
    assert load_nvml("real") is pynvml
    with pytest.raises(ValueError, match="allowed: real, sim"):
        load_nvml("mock")
    with pytest.raises(ValueError, match="both host_file and state_file"):
        load_nvml("sim", H100X8)
    # one simulator per host: several agents in one process do not share state
    a = load_nvml("sim", H100X8, state_dir / "a.json")
    b = load_nvml("sim", MIXED, state_dir / "b.json")
    assert isinstance(a, SimNvml) and a is not b
    a.nvmlInit()
    b.nvmlInit()
    assert (a.nvmlDeviceGetCount(), b.nvmlDeviceGetCount()) == (8, 4)
    # the module itself, configured from the environment
    monkeypatch.setattr(sim, "_default", SimNvml())
    monkeypatch.setattr(sim, "nvmlInit", sim._default.nvmlInit)
    monkeypatch.setattr(sim, "nvmlDeviceGetCount", sim._default.nvmlDeviceGetCount)
    monkeypatch.setenv("GPUMESH_SIM_HOST_FILE", str(MIXED))
    monkeypatch.setenv("GPUMESH_SIM_STATE_FILE", str(state_dir / "env.json"))
    mod = load_nvml("sim")
    assert mod is sim
    mod.nvmlInit()
    assert mod.nvmlDeviceGetCount() == 4


def test_device_identity_telemetry_and_nvlink(start):
    n, _ = start(H100X8)
    assert n.nvmlSystemGetDriverVersion() == "550.54.15" and n.nvmlSystemGetCudaDriverVersion_v2() == 12040
    handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(n.nvmlDeviceGetCount())]
    uuids = [n.nvmlDeviceGetUUID(h) for h in handles]
    assert len(set(uuids)) == 8 and all(u.startswith("GPU-") for u in uuids)
    for i, h in enumerate(handles):
        assert n.nvmlDeviceGetIndex(n.nvmlDeviceGetHandleByUUID(uuids[i])) == i
        assert n.nvmlDeviceGetIndex(n.nvmlDeviceGetHandleByPciBusId(n.nvmlDeviceGetPciInfo(h).busId)) == i
        assert n.nvmlDeviceGetIndex(n.nvmlDeviceGetHandleBySerial(n.nvmlDeviceGetSerial(h))) == i
    h = handles[3]
    mem = n.nvmlDeviceGetMemoryInfo(h)
    assert (mem.total, mem.used) == (81559 * 2**20, 0)
    assert n.nvmlDeviceGetEnforcedPowerLimit(h) == 700_000
    n.sim_set_telemetry(3, utilization_gpu=90, temperature_c=83, power_w=650)
    assert (n.nvmlDeviceGetUtilizationRates(h).gpu, n.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            n.nvmlDeviceGetPowerUsage(h)) == (90, 83, 650_000)
    peers = {n.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId for link in range(18)}
    assert n.nvmlDeviceGetNvLinkState(h, 0) == pynvml.NVML_FEATURE_ENABLED
    assert peers == {n.nvmlDeviceGetPciInfo(o).busId for o in handles if o is not h}
    with pytest.raises(n.NVMLError_NotFound):
        n.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")


def test_two_simulators_in_one_process(tmp_path):
    a = SimNvml(make_host("a", 1, "H100"), tmp_path / "a.json")
    b = SimNvml(make_host("b", 2, "L4"), tmp_path / "b.json")
    a.nvmlInit()
    b.nvmlInit()
    assert (a.nvmlDeviceGetCount(), b.nvmlDeviceGetCount()) == (1, 2)
    assert a.nvmlDeviceGetUUID(a.nvmlDeviceGetHandleByIndex(0)) != b.nvmlDeviceGetUUID(b.nvmlDeviceGetHandleByIndex(0))


# -- persistence and other processes ------------------------------------------

def run_py(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


LIST_SCRIPT = """
    import json, sys
    from nodeagent.nvml import load_nvml
    n = load_nvml("sim", sys.argv[1], sys.argv[2])
    n.nvmlInit()
    dev = n.nvmlDeviceGetHandleByIndex(0)
    out = []
    for i in range(n.nvmlDeviceGetMaxMigDeviceCount(dev)):
        try:
            m = n.nvmlDeviceGetMigDeviceHandleByIndex(dev, i)
        except n.NVMLError_NotFound:
            break
        gi = n.nvmlDeviceGetGpuInstanceById(dev, n.nvmlDeviceGetGpuInstanceId(m))
        out.append([n.nvmlDeviceGetUUID(m), n.nvmlGpuInstanceGetInfo(gi).placement.start])
    n.nvmlDeviceCreateGpuInstance(dev, 19)  # fills the next free 1g slot
    print(json.dumps(out))
"""


def test_state_survives_restart(start):
    n, state = start(H100X8)
    dev = n.nvmlDeviceGetHandleByIndex(0)
    model = get_model("H100")
    create(n, dev, model, "4g.40gb", 0)
    create(n, dev, model, "1g.10gb", 5)
    mine = [[n.nvmlDeviceGetUUID(m), n.nvmlGpuInstanceGetInfo(
        n.nvmlDeviceGetGpuInstanceById(dev, n.nvmlDeviceGetGpuInstanceId(m))).placement.start] for m in mig_devices(n, dev)]
    assert json.loads(run_py(LIST_SCRIPT, str(H100X8), str(state))) == mine
    # the other process's new instance is visible here without reconfiguring
    assert sorted((name, s) for name, s, _ in list_gis(n, dev, model)) == [("1g.10gb", 4), ("1g.10gb", 5), ("4g.40gb", 0)]


def test_concurrent_processes_share_the_gpu(start):
    n, state = start(H100X8)
    grab = """
        import sys
        from nodeagent.nvml import load_nvml
        n = load_nvml("sim", sys.argv[1], sys.argv[2])
        n.nvmlInit()
        dev = n.nvmlDeviceGetHandleByIndex(0)
        got = 0
        while True:
            try:
                n.nvmlDeviceCreateGpuInstance(dev, 19)
                got += 1
            except n.NVMLError_InsufficientResources:
                break
        print(got)
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(grab), str(H100X8), str(state)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    got = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(got) == 7
    gis = n.sim_state()["gpus"][0]["gis"]
    assert sorted(g["start"] for g in gis) == list(range(7)) and sorted(g["id"] for g in gis) == list(range(1, 8))
    dev = n.nvmlDeviceGetHandleByIndex(0)
    assert len(list_gis(n, dev, get_model("H100"))) == 7
