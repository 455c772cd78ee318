"""The agent's NVML layer on a real GPU, and the simulated NVML checked call for call against it.

Runs where `pynvml` finds an NVIDIA GPU and driver; everywhere else every test skips with the
reason. It only reads: it never changes the MIG mode, creates or destroys instances, or resets.

`GPUMESH_HW_REPORT=FILE` writes what each call answered on the real GPU and on the simulator
(for the docs and for fixing the simulator where they differ).
"""

from __future__ import annotations

import json
import os

import pytest

pynvml = pytest.importorskip("pynvml")

from mesh import gpumodels  # noqa: E402
from nodeagent.gpu import NvmlGpus, model_of  # noqa: E402
from nodeagent.hostfile import make_host  # noqa: E402
from nodeagent.nvml.sim import SimNvml  # noqa: E402
from nodeagent.telemetry import TelemetryCollector  # noqa: E402


def _probe() -> str | None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return f"NVML cannot start: {e}"
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return "NVML sees no GPU"
    finally:
        pynvml.nvmlShutdown()
    return None


WHY = _probe()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"needs an NVIDIA GPU and driver: {WHY}")


@pytest.fixture
def real():
    pynvml.nvmlInit()
    yield pynvml
    pynvml.nvmlShutdown()


@pytest.fixture
def sim_like(tmp_path, real):
    """A simulated host with one GPU of the real GPU 0's model and MIG mode."""
    h = real.nvmlDeviceGetHandleByIndex(0)
    model = model_of(_text(real.nvmlDeviceGetName(h)))
    if model is None:
        pytest.skip(f"GPU 0 ({_text(real.nvmlDeviceGetName(h))}) is not a model in mesh/gpumodels.py")
    mig = False
    if model.mig_capable:
        mig = real.nvmlDeviceGetMigMode(h)[0] == real.NVML_DEVICE_MIG_ENABLE
    sim = SimNvml(make_host("hw-compare", 1, model.name, mig=mig), tmp_path / "sim.json")
    sim.nvmlInit()
    yield sim, model
    sim.nvmlShutdown()


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _outcome(nvml, fn: str, *args):
    """("ok", value) or ("error", the NVMLError subclass name)."""
    try:
        return "ok", getattr(nvml, fn)(*args)
    except nvml.NVMLError as e:
        return "error", type(e).__name__


def _kind(nvml, fn: str, *args) -> str:
    """"ok", or the NVMLError subclass name (for calls whose values are handles)."""
    kind, value = _outcome(nvml, fn, *args)
    return kind if kind == "ok" else value


def test_inventory_identity_and_memory(real):
    gpus = NvmlGpus(real)
    gpus.init()
    try:
        inv = gpus.inventory()
        assert len(inv) == real.nvmlDeviceGetCount()
        for g in inv:
            h = real.nvmlDeviceGetHandleByIndex(g.index)
            assert g.uuid == _text(real.nvmlDeviceGetUUID(h))
            assert g.memory_bytes == real.nvmlDeviceGetMemoryInfo(h).total
            assert g.product_name == _text(real.nvmlDeviceGetName(h))
            known = model_of(g.product_name)
            if known is not None:
                assert g.model == known.name
                # the catalog's memory is what NVML reports for the model (MiB), within 1%
                assert abs(g.memory_bytes / 2**20 - known.memory_mib) <= known.memory_mib * 0.01
    finally:
        gpus.shutdown()


def test_mig_mode_as_nvml_reports_it(real):
    gpus = NvmlGpus(real)
    gpus.init()
    try:
        gpus.inventory()
        h = real.nvmlDeviceGetHandleByIndex(0)
        kind, value = _outcome(real, "nvmlDeviceGetMigMode", h)
        if kind == "error":
            pytest.skip(f"GPU 0 has no MIG mode ({value})")
        mode = gpus.mig_mode(0)
        assert mode.current == (value[0] == real.NVML_DEVICE_MIG_ENABLE)
        assert mode.pending == (value[1] == real.NVML_DEVICE_MIG_ENABLE)
    finally:
        gpus.shutdown()


def test_telemetry_collector_reads_a_real_gpu(real):
    gpus = NvmlGpus(real)
    gpus.init()
    gpus.inventory()
    c = TelemetryCollector(real, gpus, None, ib_root=None)
    try:
        t = c.collect()
        assert len(t.gpus) == real.nvmlDeviceGetCount()
        g = t.gpus[0]
        h = real.nvmlDeviceGetHandleByIndex(0)
        assert g.memory_total_bytes == real.nvmlDeviceGetMemoryInfo(h).total
        assert 0 < g.temperature_c < 120
        assert g.power_w > 0
        assert 0 <= g.utilization_pct <= 100
    finally:
        c.close()
        gpus.shutdown()


# Calls whose answers the simulator must give as the real GPU gives them: the same value, or the
# same NVML error class. (Identity such as UUIDs, and live readings, differ by nature.)
def _same_answers(real, sim, model: gpumodels.GpuModel) -> list[tuple[str, tuple, tuple, bool]]:
    rh, sh = real.nvmlDeviceGetHandleByIndex(0), sim.nvmlDeviceGetHandleByIndex(0)
    rows = []

    def cmp(label, fn, *args, value=lambda v: v, sim_args=None):
        r = _outcome(real, fn, rh, *args)
        s = _outcome(sim, fn, sh, *(args if sim_args is None else sim_args))
        rv = (r[0], value(r[1]) if r[0] == "ok" else r[1])
        sv = (s[0], value(s[1]) if s[0] == "ok" else s[1])
        rows.append((label, rv, sv, None))

    cmp("name", "nvmlDeviceGetName", value=_text)
    cmp("cuda capability", "nvmlDeviceGetCudaComputeCapability", value=tuple)
    cmp("mig mode", "nvmlDeviceGetMigMode", value=tuple)
    cmp("max MIG devices", "nvmlDeviceGetMaxMigDeviceCount")
    cmp("fan speed", "nvmlDeviceGetFanSpeed", value=lambda v: "a reading")
    cmp("ECC mode", "nvmlDeviceGetEccMode", value=tuple)
    if model.mig_capable:
        for p in model.mig_profiles:
            pid = p.nvml_profile
            cmp(f"GI profile {p.name}", "nvmlDeviceGetGpuInstanceProfileInfo", pid,
                value=lambda i: (i.sliceCount, i.instanceCount, i.multiprocessorCount, i.memorySizeMB))
            rows.append((f"GI placements {p.name}", _placements(real, rh, pid), _placements(sim, sh, pid), None))
        first = model.mig_profiles[0]
        rows.append(("remaining capacity of the first profile",
                     _outcome(real, "nvmlDeviceGetGpuInstanceRemainingCapacity", rh, first.gi_profile_id),
                     _outcome(sim, "nvmlDeviceGetGpuInstanceRemainingCapacity", sh, first.gi_profile_id), None))
        rows.append(("GPU instance by id 1", _kind(real, "nvmlDeviceGetGpuInstanceById", rh, 1),
                     _kind(sim, "nvmlDeviceGetGpuInstanceById", sh, 1), None))
        rows.append(("GPU instances of the first profile", _gi_count(real, rh, model.mig_profiles[0].nvml_profile),
                     _gi_count(sim, sh, model.mig_profiles[0].nvml_profile), None))
    return rows


def _placements(nvml, h, nvml_profile: int):
    """The possible placements of a profile, the two-call way NVML's C API asks for them."""
    from ctypes import byref, c_uint
    try:
        info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(h, nvml_profile)
        count = c_uint(0)
        nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, info.id, None, byref(count))
        arr = (nvml.c_nvmlGpuInstancePlacement_t * count.value)()
        nvml.nvmlDeviceGetGpuInstancePossiblePlacements(h, info.id, arr, byref(count))
        return "ok", sorted((p.start, p.size) for p in arr[:count.value])
    except nvml.NVMLError as e:
        return "error", type(e).__name__


def _gi_count(nvml, h, nvml_profile: int):
    try:
        from ctypes import byref, c_uint
        info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(h, nvml_profile)
        count = c_uint(info.instanceCount)
        arr = (nvml.c_nvmlGpuInstance_t * info.instanceCount)()
        nvml.nvmlDeviceGetGpuInstances(h, info.id, arr, byref(count))
        return "ok", count.value
    except nvml.NVMLError as e:
        return "error", type(e).__name__


def test_the_simulator_answers_as_the_real_gpu(real, sim_like):
    sim, model = sim_like
    rows = _same_answers(real, sim, model)
    report = os.environ.get("GPUMESH_HW_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump([{"call": c, "real": repr(r), "sim": repr(s), "same": r == s} for c, r, s, _ in rows], f,
                      indent=1)
    differ = [f"{c}: real {r!r}, sim {s!r}" for c, r, s, _ in rows if r != s]
    assert not differ, "the simulator answers differently:\n" + "\n".join(differ)


def test_memory_repair_calls_answer_like_the_simulator(real, sim_like):
    """The health policy's evidence (controlplane/controllers/health.py): the real driver and the simulator give
    the same kind of answer to the memory-repair calls (rows on Ampere+, pages before). Read only."""
    sim, model = sim_like
    rh, sh = real.nvmlDeviceGetHandleByIndex(0), sim.nvmlDeviceGetHandleByIndex(0)
    for fn in ("nvmlDeviceGetRemappedRows", "nvmlDeviceGetRetiredPagesPendingStatus"):
        r, s = _outcome(real, fn, rh), _outcome(sim, fn, sh)
        assert r[0] == s[0], f"{fn} on {model.name}: real {r}, simulated {s}"
        if r[0] == "error":
            assert r[1] == s[1], f"{fn} on {model.name}: real {r}, simulated {s}"
