"""The simulated NVML's telemetry model and fault surface, through pynvml's API."""

from __future__ import annotations

import math
import os
import threading
import time

import pynvml
import pytest

from nodeagent.hostfile import dump_host, make_host, parse_host
from nodeagent.nvml.sim import SimNvml

GiB = 2**30
XID = pynvml.nvmlEventTypeXidCriticalError
R = pynvml


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def host(gpus=None, **top):
    return parse_host({"node": "n1", "gpus": gpus or [{"model": "H100-80GB", "count": 2, "mig": False}], **top})


@pytest.fixture
def sim(state_dir):
    made = []

    def go(spec=None, clock=None, name="state.json"):
        clock = clock or Clock()
        n = SimNvml(spec or host(), state_dir / name, clock=clock)
        n.nvmlInit()
        made.append(n)
        return n, clock

    yield go
    for n in made:
        n.nvmlShutdown()


def temp(n, h):
    return n.nvmlDeviceGetTemperature(h, R.NVML_TEMPERATURE_GPU)


def test_idle_gpu_is_at_its_idle_equilibrium(sim):
    n, _ = sim()
    h = n.nvmlDeviceGetHandleByIndex(0)
    util = n.nvmlDeviceGetUtilizationRates(h)
    assert (util.gpu, util.memory) == (0, 0)
    assert n.nvmlDeviceGetPowerUsage(h) == 70_000  # 10% of the 700 W TDP
    assert n.nvmlDeviceGetEnforcedPowerLimit(h) == 700_000
    assert temp(n, h) == round(30 + 40 * 0.1)
    assert n.nvmlDeviceGetCurrentClocksEventReasons(h) == R.nvmlClocksEventReasonGpuIdle
    assert n.nvmlDeviceGetCurrentClocksThrottleReasons(h) == R.nvmlClocksEventReasonGpuIdle
    assert n.nvmlDeviceGetClockInfo(h, R.NVML_CLOCK_SM) < n.nvmlDeviceGetMaxClockInfo(h, R.NVML_CLOCK_SM) == 1980
    assert n.nvmlDeviceGetClockInfo(h, R.NVML_CLOCK_MEM) == n.nvmlDeviceGetMaxClockInfo(h, R.NVML_CLOCK_MEM)
    assert n.nvmlDeviceGetMemoryInfo(h).used == 0
    assert n.nvmlDeviceGetPerformanceState(h) == R.NVML_PSTATE_8


@pytest.mark.parametrize("tau", [30.0, 10.0])
def test_temperature_follows_power_with_the_time_constant(sim, tau):
    spec = host([{"model": "H100-80GB", "count": 1, "mig": False, "thermal": {"time_constant_s": tau}}])
    n, clock = sim(spec)
    h = n.nvmlDeviceGetHandleByIndex(0)
    idle, full = 30 + 40 * 0.1, 70.0
    n.sim_set_load(0, util=100, memory_used=10 * GiB)
    assert n.nvmlDeviceGetPowerUsage(h) == 700_000  # power follows load at once
    assert n.nvmlDeviceGetUtilizationRates(h).gpu == 100
    assert n.nvmlDeviceGetMemoryInfo(h).used == 10 * GiB
    assert temp(n, h) == round(idle)  # temperature lags
    clock.t += tau
    assert n.sim_readings()[0]["temperature_c"] == pytest.approx(full + (idle - full) * math.exp(-1), abs=0.05)
    clock.t += 4 * tau
    assert abs(temp(n, h) - full) <= 1
    # dropping the load: continuous, then down toward idle with the same constant
    before = n.sim_readings()[0]["temperature_c"]
    n.sim_set_load(0)
    assert n.sim_readings()[0]["temperature_c"] == pytest.approx(before, abs=0.05)
    clock.t += tau
    expected = idle + (before - idle) * math.exp(-1)
    assert n.sim_readings()[0]["temperature_c"] == pytest.approx(expected, abs=0.05)


def test_two_simulators_of_one_state_file_agree(sim, state_dir):
    a, clock = sim()
    b = SimNvml(host(), state_dir / "state.json", clock=clock)
    b.nvmlInit()
    a.sim_set_load(0, util=80)
    clock.t += 17
    ha, hb = a.nvmlDeviceGetHandleByIndex(0), b.nvmlDeviceGetHandleByIndex(0)
    assert temp(a, ha) == temp(b, hb) and a.nvmlDeviceGetPowerUsage(ha) == b.nvmlDeviceGetPowerUsage(hb)
    b.nvmlShutdown()


def test_reads_do_not_write_the_state_file(sim, state_dir):
    n, clock = sim()
    n.sim_set_load(0, util=50)
    before = os.stat(state_dir / "state.json").st_mtime_ns
    h = n.nvmlDeviceGetHandleByIndex(0)
    for _ in range(200):
        clock.t += 1
        temp(n, h)
        n.nvmlDeviceGetUtilizationRates(h)
        n.nvmlDeviceGetCurrentClocksEventReasons(h)
    assert os.stat(state_dir / "state.json").st_mtime_ns == before


def test_processes_drive_utilization_and_memory(sim):
    n, _ = sim()
    h = n.nvmlDeviceGetHandleByIndex(0)
    uuid = n.nvmlDeviceGetUUID(h)
    n.sim_add_process(uuid, 100, 4 * GiB, util=60)
    n.sim_add_process(uuid, 101, 2 * GiB)  # default util
    n.sim_set_load(0, util=10, memory_used=GiB)
    assert n.nvmlDeviceGetUtilizationRates(h).gpu == min(100, 60 + 35 + 10)
    assert n.nvmlDeviceGetMemoryInfo(h).used == 7 * GiB
    assert sorted(p.pid for p in n.nvmlDeviceGetComputeRunningProcesses(h)) == [100, 101]
    assert n.nvmlDeviceGetCurrentClocksEventReasons(h) & R.nvmlClocksEventReasonGpuIdle == 0
    with pytest.raises(ValueError, match="util"):
        n.sim_add_process(uuid, 102, GiB, util=150)


def test_mig_slices_load_their_share_of_the_gpu(sim):
    n, _ = sim(make_host("n1", 1, "H100"))
    dev = n.nvmlDeviceGetHandleByIndex(0)
    info = n.nvmlDeviceGetGpuInstanceProfileInfo(dev, R.NVML_GPU_INSTANCE_PROFILE_1_SLICE)
    gi = n.nvmlDeviceCreateGpuInstance(dev, info.id)
    ci_info = n.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, R.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE,
                                                             R.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
    n.nvmlGpuInstanceCreateComputeInstance(gi, ci_info.id)
    mig = n.nvmlDeviceGetMigDeviceHandleByIndex(dev, 0)
    n.sim_add_process(n.nvmlDeviceGetUUID(mig), 7, 3 * GiB, util=100)
    assert n.nvmlDeviceGetUtilizationRates(dev).gpu == round(100 / 7)
    assert n.nvmlDeviceGetMemoryInfo(mig).used == 3 * GiB
    assert n.nvmlDeviceGetMemoryInfo(mig).total == 9984 * 2**20
    assert [p.pid for p in n.nvmlDeviceGetComputeRunningProcesses(mig)] == [7]
    for call in (n.nvmlDeviceGetUtilizationRates, n.nvmlDeviceGetPowerUsage, n.nvmlDeviceGetCurrentClocksEventReasons):
        with pytest.raises(n.NVMLError_NotSupported):
            call(mig)


def test_hot_gpu_throttles_and_its_clocks_drop(sim):
    spec = host([{"model": "H100-80GB", "count": 1, "mig": False, "faults": {"extra_heat_c": 25}}])
    n, clock = sim(spec)
    h = n.nvmlDeviceGetHandleByIndex(0)
    n.sim_set_load(0, util=100)
    assert n.nvmlDeviceGetCurrentClocksEventReasons(h) == 0
    assert n.nvmlDeviceGetClockInfo(h, R.NVML_CLOCK_SM) == 1980
    clock.t += 600
    assert temp(n, h) == 95
    reasons = n.nvmlDeviceGetCurrentClocksEventReasons(h)
    assert reasons & R.nvmlClocksEventReasonSwThermalSlowdown and reasons & R.nvmlClocksEventReasonHwThermalSlowdown
    assert reasons & R.nvmlClocksEventReasonHwSlowdown
    assert n.nvmlDeviceGetClockInfo(h, R.NVML_CLOCK_SM) <= 1980 // 2
    assert n.nvmlDeviceGetTemperatureThreshold(h, R.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN) == 88
    assert n.nvmlDeviceGetTemperatureThreshold(h, R.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN) == 92


def test_sw_thermal_slowdown_lowers_clocks_gradually(sim):
    n, _ = sim()
    h = n.nvmlDeviceGetHandleByIndex(0)
    n.sim_set_load(0, util=100)
    clocks = []
    for celsius in (82, 83, 85, 87):
        n.sim_set_telemetry(0, temperature_c=celsius)  # a pin applies at once
        assert temp(n, h) == celsius
        clocks.append(n.nvmlDeviceGetClockInfo(h, R.NVML_CLOCK_SM))
        assert bool(n.nvmlDeviceGetCurrentClocksEventReasons(h) & R.nvmlClocksEventReasonSwThermalSlowdown) == \
            (celsius >= 83)
    assert clocks[0] == 1980 and clocks[0] > clocks[1] > clocks[2] > clocks[3]


def test_power_cap(sim):
    spec = host([{"model": "A100-80GB", "count": 1, "mig": False, "thermal": {"power_limit_w": 300}}])
    n, _ = sim(spec)
    h = n.nvmlDeviceGetHandleByIndex(0)
    assert n.nvmlDeviceGetEnforcedPowerLimit(h) == 300_000
    n.sim_set_load(0, util=100)
    assert n.nvmlDeviceGetPowerUsage(h) == 300_000
    assert n.nvmlDeviceGetCurrentClocksEventReasons(h) == R.nvmlClocksEventReasonSwPowerCap
    assert n.nvmlDeviceGetClockInfo(h, R.NVML_CLOCK_SM) < 1410


# -- XID events --------------------------------------------------------------------------------

def registered(n, index, mask=XID):
    es = n.nvmlEventSetCreate()
    n.nvmlDeviceRegisterEvents(n.nvmlDeviceGetHandleByIndex(index), mask, es)
    return es


def test_injected_xid_arrives_through_the_event_api(sim):
    n, _ = sim()
    n.sim_inject_xid(0, 13)  # before registration: not delivered
    es = registered(n, 0)
    assert isinstance(es, R.c_nvmlEventSet_t)
    with pytest.raises(n.NVMLError_Timeout):
        n.nvmlEventSetWait_v2(es, 0)
    n.sim_inject_xid(0, 74)  # (79 would take GPU 0 off the bus: GPU_IS_LOST below)
    n.sim_inject_xid(1, 48)  # another GPU: not in this set
    n.sim_inject_xid(0, 31)
    got = [n.nvmlEventSetWait_v2(es, 0) for _ in range(2)]
    assert [(d.eventType, d.eventData) for d in got] == [(XID, 74), (XID, 31)]
    assert isinstance(got[0], R.c_nvmlEventData_t)
    assert n.nvmlDeviceGetIndex(got[0].device) == 0
    assert got[0].gpuInstanceId == R.NVML_VALUE_NOT_AVAILABLE_uint.value
    with pytest.raises(pynvml.NVMLError_Timeout):
        n.nvmlEventSetWait(es, 10)
    n.nvmlEventSetFree(es)
    with pytest.raises(n.NVMLError_InvalidArgument):
        n.nvmlEventSetWait_v2(es, 0)


def test_wait_returns_an_xid_logged_while_waiting(sim):
    n, _ = sim()
    es = registered(n, 1)
    threading.Timer(0.1, n.sim_inject_xid, (1, 94)).start()
    start = time.monotonic()
    data = n.nvmlEventSetWait_v2(es, 120_000)
    assert data.eventData == 94 and time.monotonic() - start < 60   # woken by the event, not the timeout


def test_xid_on_a_mig_instance_and_unsupported_registrations(sim):
    n, _ = sim(make_host("n1", 1, "H100"))
    es = registered(n, 0)
    n.sim_inject_xid(0, 31, gi=1, ci=0)
    d = n.nvmlEventSetWait_v2(es, 0)
    assert (d.eventData, d.gpuInstanceId, d.computeInstanceId) == (31, 1, 0)
    with pytest.raises(n.NVMLError_NotSupported):
        n.nvmlDeviceRegisterEvents(n.nvmlDeviceGetHandleByIndex(0), R.nvmlEventTypePState, es)
    assert n.nvmlDeviceGetSupportedEventTypes(n.nvmlDeviceGetHandleByIndex(0)) & XID


def test_host_file_xids_fire_after_their_delay(sim):
    spec = host([{"model": "L4", "count": 1, "faults": {"xids": [{"code": 63, "after_s": 10}]}}])
    n, clock = sim(spec)
    es = registered(n, 0)
    with pytest.raises(n.NVMLError_Timeout):
        n.nvmlEventSetWait_v2(es, 0)
    clock.t += 10
    assert n.nvmlEventSetWait_v2(es, 0).eventData == 63
    with pytest.raises(n.NVMLError_Timeout):
        n.nvmlEventSetWait_v2(es, 0)


def test_ecc_errors_count_and_raise_events(sim):
    spec = host([{"model": "H100-80GB", "count": 1, "mig": False, "faults": {"ecc_corrected": 3}}])
    n, _ = sim(spec)
    h = n.nvmlDeviceGetHandleByIndex(0)
    es = registered(n, 0, XID | R.nvmlEventTypeDoubleBitEccError)
    n.sim_inject_ecc(0, corrected=2, uncorrected=1)
    assert n.nvmlDeviceGetTotalEccErrors(h, R.NVML_MEMORY_ERROR_TYPE_CORRECTED, R.NVML_VOLATILE_ECC) == 5
    assert n.nvmlDeviceGetTotalEccErrors(h, R.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, R.NVML_AGGREGATE_ECC) == 1
    assert n.nvmlEventSetWait_v2(es, 0).eventType == R.nvmlEventTypeDoubleBitEccError  # single-bit not registered


# -- lost GPUs ---------------------------------------------------------------------------------

def test_lost_gpu_fails_every_call_until_cleared(sim):
    n, _ = sim(make_host("n1", 2, "H100"))
    h = n.nvmlDeviceGetHandleByIndex(1)
    uuid = n.nvmlDeviceGetUUID(h)
    es = registered(n, 1)
    n.sim_lose_gpu(1)
    assert n.nvmlDeviceGetCount() == 2
    for call in (lambda: n.nvmlDeviceGetHandleByIndex(1), lambda: n.nvmlDeviceGetHandleByUUID(uuid),
                 lambda: temp(n, h), lambda: n.nvmlDeviceGetMemoryInfo(h), lambda: n.nvmlDeviceGetMigMode(h),
                 lambda: n.nvmlDeviceGetUUID(h)):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            call()
    assert n.nvmlEventSetWait_v2(es, 0).eventData == 79  # the driver's last word
    assert temp(n, n.nvmlDeviceGetHandleByIndex(0)) > 0  # the other GPU is fine
    n.sim_clear(1)
    assert n.nvmlDeviceGetUUID(n.nvmlDeviceGetHandleByIndex(1)) == uuid


def test_host_file_lost_gpu(sim):
    spec = host([{"model": "L4", "count": 2, "faults": {"lost": True}}])
    n, _ = sim(spec)
    with pytest.raises(n.NVMLError_GpuIsLost):
        n.nvmlDeviceGetHandleByIndex(0)
    assert n.sim_readings()[1]["lost"]


# -- affinity and host-file settings -----------------------------------------------------------

def test_numa_and_cpu_affinity(sim):
    n, _ = sim(host([{"model": "H100-80GB", "count": 8, "mig": False}], cpus=128))
    for i, (node, first) in enumerate([(0, 0)] * 4 + [(1, 64)] * 4):
        h = n.nvmlDeviceGetHandleByIndex(i)
        assert n.nvmlDeviceGetNumaNodeId(h) == node
        mask = n.nvmlDeviceGetCpuAffinity(h, 2)
        assert list(mask) == ([2**64 - 1, 0] if first == 0 else [0, 2**64 - 1])
        assert list(n.nvmlDeviceGetMemoryAffinity(h, 1, R.NVML_AFFINITY_SCOPE_NODE)) == [1 << node]
    m, _ = sim(host([{"model": "L4", "count": 2, "numa_node": 3}]), name="other.json")
    assert m.nvmlDeviceGetNumaNodeId(m.nvmlDeviceGetHandleByIndex(1)) == 3


def test_host_file_telemetry_keys_round_trip_and_validate():
    spec = host([{"model": "H100-80GB", "count": 2, "numa_node": 1, "thermal": {"ambient_c": 25, "time_constant_s": 12},
                  "faults": {"xids": [79, {"code": 31, "after_s": 5}], "extra_heat_c": 10}},
                 {"model": "H100-80GB", "count": 1}], cpus=96)
    assert spec.gpus[1].faults.xids == ((79, 0.0), (31, 5.0)) and spec.gpus[2].numa_node is None
    assert parse_host(dump_host(spec)) == spec
    bad = [
        ({"thermal": {"tau": 3}}, r"gpus\[0\]\.thermal\.tau: unknown key"),
        ({"thermal": {"throttle_c": 95}}, "throttle_c <= slowdown_c"),
        ({"thermal": {"time_constant_s": 0}}, "time_constant_s: expected a number"),
        ({"faults": {"xids": [0]}}, r"xids\[0\]: expected an XID code"),
        ({"faults": {"xids": [{"code": 79, "after": 1}]}}, "after: unknown key"),
        ({"faults": {"lost": "yes"}}, "faults.lost: expected bool"),
        ({"faults": {"ecc_uncorrected": -1}}, "ecc_uncorrected"),
        ({"numa_node": -1}, "numa_node"),
    ]
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            host([{"model": "H100-80GB", "count": 1, **extra}])
    with pytest.raises(ValueError, match="cpus"):
        host(cpus=0)


def test_old_state_files_without_telemetry_keys_still_read(sim, state_dir):
    import json
    path = state_dir / "old.json"
    path.write_text(json.dumps({"version": 1, "generation": 1, "faults": {}, "gpus": [
        {"mig_current": 0, "mig_pending": 0, "next_uid": 1, "telemetry": {}, "gis": [],
         "processes": [{"pid": 5, "used_memory": GiB, "gi": None, "ci": None}]}] * 2}))
    n, _ = sim(name="old.json")
    h = n.nvmlDeviceGetHandleByIndex(0)
    assert n.nvmlDeviceGetUtilizationRates(h).gpu == 35 and n.nvmlDeviceGetMemoryInfo(h).used == GiB
