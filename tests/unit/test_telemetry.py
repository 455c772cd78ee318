"""The agent's telemetry collector (nodeagent/telemetry.py) over the simulated NVML."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from gpumesh.v1 import types_pb2
from nodeagent.gpu import NvmlGpus
from nodeagent.hostfile import load_host_file, make_host, parse_host
from nodeagent.infiniband import write_sysfs
from nodeagent.nvml.sim import SimNvml
from nodeagent.telemetry import TelemetryCollector, cpu_list, run_telemetry, throttle_names

HOSTS = Path(__file__).resolve().parents[2] / "tools" / "hosts"
GiB = 2**30
XID_IN_TEXT = re.compile(r"\bXID\s*(\d+)", re.IGNORECASE)  # how the control plane reads XidError events


class Clock:
    def __init__(self, t: float = 2_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def agent_side(state_dir, tmp_path):
    """(nvml, NvmlGpus, collector factory) for a host, as the agent builds them."""
    made = []

    def go(host, slices=None, ib=True, clock=None):
        clock = clock or Clock()
        spec = host if not isinstance(host, Path) else load_host_file(host)
        nvml = SimNvml(spec, state_dir / f"s{len(made)}.json", clock=clock)
        gpus = NvmlGpus(nvml)
        gpus.init()
        gpus.inventory()
        ib_root = None
        if ib:
            ib_root = str(tmp_path / f"ib{len(made)}")
            write_sysfs(ib_root, spec.nics)
        c = TelemetryCollector(nvml, gpus, slices, ib_root, clock=clock)
        made.append((gpus, c))
        return nvml, gpus, c

    yield go
    for gpus, c in made:
        c.close()
        gpus.shutdown()


def test_a_full_reading_of_an_hgx_host(agent_side):
    nvml, gpus, c = agent_side(HOSTS / "h100x8.yaml")
    nvml.sim_set_load(2, util=75, memory_used=20 * GiB)
    t = c.collect()
    assert [g.index for g in t.gpus] == list(range(8))
    g0, g2 = t.gpus[0], t.gpus[2]
    assert g0.memory_total_bytes == 81559 * 2**20 and g0.memory_used_bytes == 0
    assert (g2.utilization_pct, g2.memory_used_bytes) == (75.0, 20 * GiB)
    assert g0.power_limit_w == 700.0 and g0.power_w == 70.0 and g2.power_w > g0.power_w
    assert g0.temperature_c > 0 and g0.sm_clock_mhz > 0 and g2.sm_clock_mhz == 1980 and g2.memory_clock_mhz == 2619
    assert list(g0.throttle_reasons) == ["gpu_idle"] and list(g2.throttle_reasons) == []
    assert (g0.ecc_corrected, g0.ecc_uncorrected) == (0, 0)
    assert len(g0.nvlinks) == 18 and all(link.active for link in g0.nvlinks)
    assert {link.peer_pci_bus_id for link in g0.nvlinks} == {g.pci_bus_id for g in t.gpus[1:]}
    assert g0.pci_bus_id and (g0.numa_node, t.gpus[7].numa_node) == (0, 1)
    assert (g0.cpu_affinity, t.gpus[7].cpu_affinity) == ("0-31", "32-63")
    assert list(g0.xid_events) == []  # XIDs travel as events
    assert g0.memory_pressure == types_pb2.MEMORY_PRESSURE_UNSPECIFIED  # judged by the control plane
    assert [(p.device, p.state, p.rate_gbps) for p in t.ib_ports] == [(f"mlx5_{k}", "ACTIVE", 400.0) for k in range(4)]
    assert t.at.seconds == 2_000_000 and g0.at.seconds == 2_000_000


def test_unconnected_and_pcie_gpus_have_no_active_nvlinks_and_no_ib(agent_side):
    _, _, c = agent_side(HOSTS / "mixed.yaml")  # 2 A100 (12 links, in no NVLink domain) + 2 L4 (PCIe only)
    t = c.collect()
    assert [g.index for g in t.gpus] == [0, 1, 2, 3]
    assert [len(g.nvlinks) for g in t.gpus] == [12, 12, 0, 0]
    assert not any(link.active or link.peer_pci_bus_id for g in t.gpus for link in g.nvlinks)
    assert len(t.ib_ports) == 0


def test_unsupported_queries_leave_fields_unset(agent_side):
    nvml, gpus, _ = agent_side(make_host("n1", 1, "H100"))

    class Partial:
        """The sim with a driver that lacks some queries (NOT_SUPPORTED, FUNCTION_NOT_FOUND, absent)."""

        def __getattr__(self, name):
            if name == "nvmlDeviceGetTemperature":
                def unsupported(*a):
                    raise nvml.NVMLError(nvml.NVML_ERROR_NOT_SUPPORTED)
                return unsupported
            if name == "nvmlDeviceGetCurrentClocksEventReasons":
                def missing(*a):
                    raise nvml.NVMLError(nvml.NVML_ERROR_FUNCTION_NOT_FOUND)
                return missing
            if name == "nvmlDeviceGetNumaNodeId":
                raise AttributeError(name)
            return getattr(nvml, name)

    c = TelemetryCollector(Partial(), gpus, None, None)
    g = c.collect().gpus[0]
    assert g.temperature_c == 0 and g.numa_node == -1
    assert list(g.throttle_reasons) == ["gpu_idle"]  # from the older ThrottleReasons call
    assert g.power_w == 70.0


def test_mig_slices_report_memory_and_processes(agent_side):
    slices = {}
    nvml, gpus, c = agent_side(make_host("n1", 1, "H100"), slices=lambda: slices)
    a = gpus.create_mig(0, "3g.40gb", 0)
    b = gpus.create_mig(0, "1g.10gb", 4)
    slices.update({"s-a": a, "s-b": b, "s-none": a.__class__(0, 9, None, "1g.10gb", 6, "")})
    nvml.sim_add_process(a.uuid, 41, 12 * GiB, util=100)
    nvml.sim_add_process(a.uuid, 42, 1 * GiB, util=50)
    t = c.collect()
    got = {s.slice_id: (s.memory_used_bytes, sorted(s.pids), s.utilization_pct) for s in t.slices}
    assert got == {"s-a": (13 * GiB, [41, 42], 0.0), "s-b": (0, [], 0.0)}
    assert t.gpus[0].utilization_pct == pytest.approx(round(150 * 3 / 7))


def test_shared_slices_report_their_workloads_memory(agent_side):
    """MPS, time-share and exclusive slices have no NVML device of their own: each reads the memory of its
    GPU's compute processes that are in its workloads' process trees; another slice's process is not its."""
    nvml, gpus, c = agent_side(make_host("n1", 2, "H100", mig=False))
    uuid0, uuid1 = (nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i)) for i in (0, 1))
    nvml.sim_add_process(uuid0, 100, 6 * GiB)
    nvml.sim_add_process(uuid0, 101, 2 * GiB)          # the same slice's child process
    nvml.sim_add_process(uuid0, 200, 9 * GiB)          # the other tenant's slice on the same GPU
    nvml.sim_add_process(uuid1, 300, 1 * GiB)          # nobody's
    c.shared_slices = lambda: {"s-mps-a": (0, {100, 101, 102}), "s-mps-b": (0, {200}), "s-ts": (1, {400})}
    got = {s.slice_id: (s.memory_used_bytes, list(s.pids)) for s in c.collect().slices}
    assert got == {"s-mps-a": (8 * GiB, [100, 101]), "s-mps-b": (9 * GiB, [200]), "s-ts": (0, [])}
    nvml.sim_lose_gpu(0)
    c.collect()                                         # the lost GPU's slices are left out, the others read
    assert {s.slice_id for s in c.read_slices()} == {"s-ts"}


def test_xids_become_events_once(agent_side):
    slices = {}
    nvml, gpus, c = agent_side(make_host("n1", 2, "H100"), slices=slices)
    c.start()
    inst = gpus.create_mig(1, "1g.10gb", 0)
    slices["s-1"] = inst
    nvml.sim_inject_xid(0, 48)          # (79 takes the GPU off the bus too: the next test)
    nvml.sim_inject_xid(1, 31, gi=inst.gi_id, ci=inst.ci_id)
    evs = c.events()
    assert [(e.type, e.reason, e.gpu_index) for e in evs] == [("Warning", "XidError", 0), ("Warning", "XidError", 1)]
    assert [int(XID_IN_TEXT.search(e.message).group(1)) for e in evs] == [48, 31]
    assert "slice s-1" in evs[1].message and evs[0].message == "GPU 0: XID 48"
    assert c.events() == []


def test_a_lost_gpu_yields_one_event_and_leaves_the_readings(agent_side):
    nvml, _, c = agent_side(make_host("n1", 3, "L4"))
    c.start()
    nvml.sim_lose_gpu(1)
    evs = c.events()
    assert [(e.reason, e.gpu_index) for e in evs] == [("XidError", 1), ("GpuLost", 1)]
    assert "XID 79" in evs[0].message
    assert c.events() == []
    assert [g.index for g in c.collect().gpus] == [0, 2]
    nvml.sim_clear(1)  # back on the bus: read again, and its XIDs reported again
    assert c.events() == [] and [g.index for g in c.collect().gpus] == [0, 1, 2]
    nvml.sim_inject_xid(1, 48)
    assert [(e.reason, e.gpu_index) for e in c.events()] == [("XidError", 1)]


def test_a_hot_gpu_reads_as_throttled(agent_side):
    clock = Clock()
    spec = parse_host({"gpus": [{"model": "A100-80GB", "count": 1, "mig": False, "faults": {"extra_heat_c": 20}}]})
    nvml, _, c = agent_side(spec, ib=False, clock=clock)
    nvml.sim_set_load(0, util=100)
    first = c.collect().gpus[0]
    clock.t += 300
    hot = c.collect().gpus[0]
    assert first.temperature_c < 83 <= hot.temperature_c
    assert {"sw_thermal", "hw_thermal", "hw_slowdown"} <= set(hot.throttle_reasons)
    assert hot.sm_clock_mhz < first.sm_clock_mhz


def test_helpers():
    assert cpu_list([0b1111, 0]) == "0-3"
    assert cpu_list([(1 << 64) - 1, 0b101]) == "0-64,66"
    assert cpu_list([]) == ""
    assert throttle_names(0x28) == ["hw_slowdown", "sw_thermal"]


async def test_the_agent_loop_sends_readings_and_events(agent_side):
    nvml, _, c = agent_side(make_host("n1", 2, "H100"), ib=False)
    outbox: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(run_telemetry(c, 0.2, outbox, event_poll=0.05))
    try:
        first = await asyncio.wait_for(outbox.get(), 30)
        assert first.WhichOneof("kind") == "telemetry" and len(first.telemetry.gpus) == 2
        await asyncio.to_thread(nvml.sim_inject_xid, 1, 94)
        kinds = []
        while "event" not in kinds:
            msg = await asyncio.wait_for(outbox.get(), 30)
            kinds.append(msg.WhichOneof("kind"))
            if kinds[-1] == "event":
                assert (msg.event.reason, msg.event.gpu_index) == ("XidError", 1)
        second = msg
        while second.WhichOneof("kind") != "telemetry":
            second = await asyncio.wait_for(outbox.get(), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_the_runner_names_each_shared_slices_process_tree(tmp_path):
    """shared_slice_pids over a WorkloadRunner's records: a running workload's pid and its descendants, per non-MIG slice,
    with the slice's GPU; MIG slices (read through their own device) and ended workloads are left out."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    from nodeagent.telemetry import shared_slice_pids
    from nodeagent.workloads import WorkloadRunner
    tree = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen(['sleep', '30']); print('up', flush=True); time.sleep(30)"],
                            stdout=subprocess.PIPE)
    try:
        assert tree.stdout.readline() == b"up\n"
        desired = {"s-mps": types_pb2.Slice(id="s-mps", gpu_index=1, isolation=types_pb2.ISOLATION_MPS),
                   "s-mig": types_pb2.Slice(id="s-mig", gpu_index=0, isolation=types_pb2.ISOLATION_MIG)}
        collector = SimpleNamespace(shared_slices=None)
        agent = SimpleNamespace(desired=desired, collector=collector, handlers={}, session_hooks=[],
                                desired_hooks=[], start_hooks=[])
        runner = WorkloadRunner(agent, str(tmp_path / "w"))
        for wid, sid, state in (("w-1", "s-mps", types_pb2.WORKLOAD_STATE_RUNNING),
                                ("w-2", "s-mig", types_pb2.WORKLOAD_STATE_RUNNING),
                                ("w-3", "s-mps", types_pb2.WORKLOAD_STATE_SUCCEEDED)):
            runner.workloads[wid] = types_pb2.Workload(id=wid, slice_id=sid, state=state, pid=tree.pid)
        for _ in range(50):
            got = shared_slice_pids(runner.workloads.values(), desired)
            if len(got.get("s-mps", (0, set()))[1]) == 2:
                break
            time.sleep(0.1)
        assert set(got) == {"s-mps"} and got["s-mps"][0] == 1
        assert tree.pid in got["s-mps"][1] and len(got["s-mps"][1]) == 2      # the python and its sleep
    finally:
        subprocess.run(["pkill", "-P", str(tree.pid)])
        tree.kill()
        tree.wait()
