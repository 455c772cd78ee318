"""simctl, run as its own process, changes what a running simulated NVML reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pynvml
import pytest

from nodeagent.gpu import NvmlGpus
from nodeagent.nvml.sim import SimNvml
from nodeagent.telemetry import TelemetryCollector

ROOT = Path(__file__).resolve().parents[2]
HOST = ROOT / "tools" / "hosts" / "h100x8.yaml"
GiB = 2**30


@pytest.fixture
def running(state_dir):
    """A simulator as the agent holds it (initialised, handles taken), and a simctl runner."""
    state = state_dir / "node.json"
    nvml = SimNvml(HOST, state)
    nvml.nvmlInit()

    def simctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, "-m", "nodeagent.nvml.simctl", "--state", str(state),
                              "--host-file", str(HOST), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        if check:
            assert res.returncode == 0, res.stderr
        return res

    yield nvml, simctl
    nvml.nvmlShutdown()


def test_xid_reaches_a_registered_event_set(running):
    nvml, simctl = running
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    es = nvml.nvmlEventSetCreate()
    nvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, es)
    simctl("xid", "--gpu", "0", "--code", "79")
    data = nvml.nvmlEventSetWait_v2(es, 0)
    assert (data.eventType, data.eventData) == (pynvml.nvmlEventTypeXidCriticalError, 79)
    simctl("xid", "--gpu", "0", "--code", "31", "--gi", "2", "--ci", "0")
    data = nvml.nvmlEventSetWait_v2(es, 1000)
    assert (data.eventData, data.gpuInstanceId, data.computeInstanceId) == (31, 2, 0)


def test_lose_and_clear(running):
    nvml, simctl = running
    h = nvml.nvmlDeviceGetHandleByIndex(1)
    simctl("lose", "--gpu", "1")
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetHandleByIndex(1)
    simctl("clear", "--gpu", "1")
    assert nvml.nvmlDeviceGetTemperature(nvml.nvmlDeviceGetHandleByIndex(1), pynvml.NVML_TEMPERATURE_GPU) > 0


def test_heat_load_and_ecc_show_in_the_agents_reading(running):
    nvml, simctl = running
    gpus = NvmlGpus(nvml)
    gpus.inventory()
    collector = TelemetryCollector(nvml, gpus, None, None)
    simctl("heat", "--gpu", "0", "--celsius", "88")
    simctl("load", "--gpu", "3", "--util", "90", "--memory-used", "60GiB")
    simctl("ecc", "--gpu", "5", "--uncorrected", "2")
    t = {g.index: g for g in collector.collect().gpus}
    assert t[0].temperature_c == 88 and "sw_thermal" in t[0].throttle_reasons
    assert (t[3].utilization_pct, t[3].memory_used_bytes) == (90.0, 60 * GiB)
    assert t[3].power_w > t[4].power_w
    assert t[5].ecc_uncorrected == 2
    simctl("heat", "--gpu", "0", "--power-w", "650")
    assert nvml.nvmlDeviceGetPowerUsage(nvml.nvmlDeviceGetHandleByIndex(0)) == 650_000
    simctl("clear", "--gpu", "0")
    simctl("load", "--gpu", "3")
    t = {g.index: g for g in collector.collect().gpus}
    assert t[0].temperature_c < 83 and t[0].power_w == 70.0 and t[3].utilization_pct == 0


def test_show_and_errors(running):
    nvml, simctl = running
    simctl("heat", "--gpu", "2", "--extra-c", "30")
    simctl("xid", "--gpu", "6", "--code", "48")
    rows = json.loads(simctl("show", "-o", "json").stdout)
    assert len(rows) == 8 and rows[6]["xids"] == [48] and rows[2]["pins"] == {"extra_heat_c": 30.0}
    table = simctl("show").stdout.splitlines()
    assert table[0].split()[:3] == ["GPU", "MODEL", "STATE"] and len(table) == 9
    for args, message in [(("xid", "--gpu", "8", "--code", "79"), "no GPU 8"),
                          (("xid", "--gpu", "0", "--code", "0"), "XID code"),
                          (("heat", "--gpu", "0"), "give --celsius"),
                          (("load", "--gpu", "0", "--util", "120"), "util"),
                          (("load", "--gpu", "0", "--memory-used", "lots"), "invalid size")]:
        res = simctl(*args, check=False)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    assert simctl("bogus", check=False).returncode == 2
