"""The simulated driver after an XID, and GPU reset with nvidia-smi's semantics: memory repairs
pending after ECC XIDs (row remapping on Ampere+, page retirement before), IN_USE while processes
run, GPU_IS_LOST off the bus, what a reset applies and what it cannot fix; and the agent's
GpuResetter on top of it."""

from __future__ import annotations

import asyncio

import pynvml
import pytest

from nodeagent.hostfile import make_host
from nodeagent.nvml import load_nvml

VOL, UNC = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED


@pytest.fixture
def sim(state_dir):
    made = []

    def go(model="H100", count=2):
        n = load_nvml("sim", make_host("n1", count, model, mig=False), state_dir / f"{model}.json")
        n.nvmlInit()
        made.append(n)
        return n
    yield go
    for n in made:
        n.nvmlShutdown()


def test_ecc_xid_leaves_a_pending_row_remap_that_a_reset_applies(sim):
    n = sim()
    h = n.nvmlDeviceGetHandleByIndex(0)
    assert n.nvmlDeviceGetRemappedRows(h) == (0, 0, 0, 0)
    with pytest.raises(n.NVMLError_NotSupported):          # Ampere and newer remap rows instead
        n.nvmlDeviceGetRetiredPagesPendingStatus(h)
    n.sim_inject_xid(0, 48)
    assert n.nvmlDeviceGetRemappedRows(h)[2:] == (1, 0)
    assert n.nvmlDeviceGetTotalEccErrors(h, UNC, VOL) == 1
    n.sim_reset_gpu(0)
    assert n.nvmlDeviceGetRemappedRows(h) == (0, 1, 0, 0)  # remapped, no longer pending
    assert n.nvmlDeviceGetTotalEccErrors(h, UNC, VOL) == 0  # volatile counters start again
    assert n.nvmlDeviceGetTotalEccErrors(h, UNC, pynvml.NVML_AGGREGATE_ECC) == 1


def test_older_gpus_retire_pages(sim):
    n = sim("V100", 1)
    h = n.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(n.NVMLError_NotSupported):
        n.nvmlDeviceGetRemappedRows(h)
    n.sim_inject_xid(0, 95)
    assert n.nvmlDeviceGetRetiredPagesPendingStatus(h) == pynvml.NVML_FEATURE_ENABLED
    n.sim_reset_gpu(0)
    assert n.nvmlDeviceGetRetiredPagesPendingStatus(h) == pynvml.NVML_FEATURE_DISABLED


def test_reset_is_refused_while_in_use_and_off_the_bus_and_cannot_fix_a_failed_remap(sim):
    n = sim()
    h = n.nvmlDeviceGetHandleByIndex(0)
    n.sim_add_process(n.nvmlDeviceGetUUID(h), 4242, 1 << 30)
    n.sim_inject_xid(0, 63)
    with pytest.raises(n.NVMLError_InUse):
        n.sim_reset_gpu(0)
    assert n.nvmlDeviceGetRemappedRows(h)[2] == 1           # nothing applied
    n.sim_remove_process(n.nvmlDeviceGetUUID(h), 4242)
    n.sim_inject_xid(0, 64)
    n.sim_reset_gpu(0)
    assert n.nvmlDeviceGetRemappedRows(h)[2:] == (0, 1)     # the failure stays: the GPU needs service
    n.sim_inject_xid(1, 79)                                 # off the bus, as the driver reports
    with pytest.raises(n.NVMLError_GpuIsLost):
        n.nvmlDeviceGetHandleByIndex(1)
    with pytest.raises(n.NVMLError_GpuIsLost):
        n.sim_reset_gpu(1)
    n.sim_reboot()                                          # the node reboots: back on the bus
    assert n.nvmlDeviceGetHandleByIndex(1) is not None



class _Agent:
    def __init__(self, n):
        from nodeagent.gpu import NvmlGpus
        self.node = "n1"
        self.gpus = NvmlGpus(n)
        self.desired = {}
        self.applied = 0
        self.handlers = {}

    async def _apply(self, d, outbox):
        self.applied += 1


def test_the_agent_resetter_refuses_in_use_then_resets(sim):
    from nodeagent.gpureset import GpuResetter
    from gpumesh.v1 import node_service_pb2 as N
    n = sim()
    agent = _Agent(n)
    r = GpuResetter(agent).install()
    h = n.nvmlDeviceGetHandleByIndex(0)
    n.sim_add_process(n.nvmlDeviceGetUUID(h), 77, 1 << 30)
    n.sim_inject_xid(0, 48)
    outbox: asyncio.Queue = asyncio.Queue()
    asyncio.run(r.on_command(N.GpuReset(gpu_index=0, reason="XID 48"), outbox))
    ev = outbox.get_nowait().event
    assert (ev.reason, ev.type, ev.gpu_index) == ("GpuResetFailed", "Warning", 0) and "77" in ev.message
    assert n.nvmlDeviceGetRemappedRows(h)[2] == 1 and agent.applied == 0
    n.sim_remove_process(n.nvmlDeviceGetUUID(h), 77)
    asyncio.run(r.on_command(N.GpuReset(gpu_index=0, reason="XID 48"), outbox))
    ev = outbox.get_nowait().event
    assert (ev.reason, ev.type) == ("GpuReset", "Normal")
    assert n.nvmlDeviceGetRemappedRows(h)[2] == 0 and agent.applied == 1    # slices realized again


def test_the_xids_logged_before_a_reset_reach_the_control_plane_before_its_result(sim):
    """A burst (48, 63, 94) the last event poll cut in two: the reset asked after 48 reports 63 and 94 first, so
    the control plane counts them in the incident the reset ends, not as a new incident after it (which, with
    two earlier incidents, quarantined the GPU under load)."""
    from gpumesh.v1 import node_service_pb2 as N
    from nodeagent.gpureset import GpuResetter
    from nodeagent.telemetry import TelemetryCollector
    n = sim()
    agent = _Agent(n)
    agent.collector = TelemetryCollector(n, agent.gpus, ib_root=None)
    agent.collector.start()
    outbox: asyncio.Queue = asyncio.Queue()
    n.sim_inject_xid(0, 48)
    assert asyncio.run(agent.collector.report_events(outbox)) == 1        # the poll that saw 48
    n.sim_inject_xid(0, 63)
    n.sim_inject_xid(0, 94)
    asyncio.run(GpuResetter(agent).install().on_command(N.GpuReset(gpu_index=0, reason="XID 48"), outbox))
    order = []
    while not outbox.empty():
        ev = outbox.get_nowait().event
        order.append(ev.reason + (ev.message.rsplit("XID ", 1)[1] if ev.reason == "XidError" else ""))
    assert order == ["XidError48", "XidError63", "XidError94", "GpuReset"]
