"""The agent's telemetry: raw readings of its GPUs, MIG slices and InfiniBand
ports, and the XIDs and lost GPUs NVML reports, for the control plane to judge.

Only NVML calls (the real ``pynvml`` or the simulated one, same code path).
Every optional query is tried on its own: NOT_SUPPORTED, a function the
driver lacks, or any other NVML error leaves that field unset. A GPU whose
handle reports GPU_IS_LOST is left out of the reading and yields one
"GpuLost" event; it is read again once NVML gives its handle back. XIDs are
drained from one NVML event set per GPU and sent as "XidError" events (not
in ``GpuTelemetry.xid_events``, so the control plane sees each XID once).
Pressure, thermal state and health are the control plane's judgement.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from google.protobuf import timestamp_pb2

from gpumesh.v1 import node_service_pb2, types_pb2
from mesh.logs import log
from mesh.procs import process_tree
from nodeagent.gpu import MigInstance, NvmlGpus
from nodeagent.infiniband import DEFAULT_ROOT, read_ports

logger = logging.getLogger(__name__)
MAX_EVENTS_PER_GPU = 256  # drained per call, so a storm cannot stall the loop
EVENT_POLL_SECONDS = 1.0  # how often the agent drains events between readings
CPU_SET_WORDS = max(16, math.ceil((os.cpu_count() or 1) / 64))
# nvmlClocksEventReason* bit -> reported name (same bits as nvmlClocksThrottleReason*)
THROTTLE_REASONS = (
    (0x001, "gpu_idle"), (0x002, "applications_clocks"), (0x004, "sw_power_cap"), (0x008, "hw_slowdown"),
    (0x010, "sync_boost"), (0x020, "sw_thermal"), (0x040, "hw_thermal"), (0x080, "hw_power_brake"),
    (0x100, "display_clocks"), (0x200, "board_limit"), (0x400, "reliability"),
)


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def cpu_list(mask: Iterable[int]) -> str:
    """64-bit words of a CPU bitmask -> '0-31,64-95'."""
    cpus = [w * 64 + b for w, word in enumerate(mask) for b in range(64) if int(word) >> b & 1]
    runs: list[list[int]] = []
    for c in cpus:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def throttle_names(bits: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS if bits & bit]


TOPOLOGY_REFRESH_S = 30.0
"""How often NVLink links, PCI bus id, NUMA node and CPU affinity are read again (NVLink errors
arrive at once as XID events in between)."""


SharedSlices = Callable[[], Mapping[str, tuple[int, set[int]]]]


def shared_slice_pids(workloads, desired: Mapping[str, types_pb2.Slice]) -> dict[str, tuple[int, set[int]]]:
    """`TelemetryCollector.shared_slices` from the workload runner's records: each MPS, time-share or
    exclusive slice with running workloads -> (its GPU index, the host pids of their process trees)."""
    out: dict[str, tuple[int, set[int]]] = {}
    for w in workloads:
        if w.state != types_pb2.WORKLOAD_STATE_RUNNING or not w.pid:
            continue
        s = desired.get(w.slice_id)
        if s is None or s.isolation == types_pb2.ISOLATION_MIG or s.gpu_index < 0:
            continue
        out.setdefault(s.id, (s.gpu_index, set()))[1].update(process_tree(w.pid))
    return out


class TelemetryCollector:
    """Readings over NVML. ``slices``: the agent's Slicer (its ``mig`` map), or a mapping of
    slice id -> MigInstance, or a callable returning one; ``ib_root``: None for no IB ports.
    ``shared_slices``: slice id -> (GPU index, the host pids of its workloads' process trees) for the
    slices that are not MIG instances (MPS, time-share, exclusive), whose memory NVML reports per
    process only (set by the workload runner)."""

    def __init__(self, nvml: Any, gpus: NvmlGpus, slices: Any = None, ib_root: str | None = DEFAULT_ROOT,
                 clock: Callable[[], float] = time.time, topology_refresh_s: float = TOPOLOGY_REFRESH_S) -> None:
        self.nvml = nvml
        self.gpus = gpus
        self.slices = slices
        self.ib_root = ib_root
        self.clock = clock
        self.topology_refresh_s = topology_refresh_s
        self.lost: set[int] = set()
        self.shared_slices: SharedSlices | None = None
        self._sets: dict[int, Any] = {}  # GPU index -> its XID event set (None: not supported)
        # one drain-and-report at a time, so events reach the control plane in the order they were read
        # (a GPU reset reports what was logged before it first: report_events)
        self.event_turn = asyncio.Lock()
        # GPU index -> (read at, NVLink links, PCI bus id, NUMA node, CPU affinity): the slow-moving
        # part of a reading (NVLink alone is ~60 NVML calls a GPU), read again every topology_refresh_s
        self._topology: dict[int, tuple[float, list, str, int, str]] = {}

    # -- helpers

    def _try(self, fn_name: str, *args: Any) -> Any:
        """The call's result, or None when the driver cannot answer it; GPU_IS_LOST propagates."""
        n = self.nvml
        fn = getattr(n, fn_name, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except n.NVMLError_GpuIsLost:
            raise
        except n.NVMLError:
            return None

    def _mig_map(self) -> Mapping[str, MigInstance]:
        src = self.slices
        if callable(src):
            src = src()
        src = getattr(src, "mig", src)
        return src or {}

    # -- readings

    def collect(self) -> types_pb2.NodeTelemetry:
        """One reading of every GPU that answers, every MIG slice, and the IB ports."""
        now = self.clock()
        out = types_pb2.NodeTelemetry(at=_ts(now))
        for i in range(self.nvml.nvmlDeviceGetCount()):
            g = self.read_gpu(i, now)
            if g is not None:
                out.gpus.append(g)
        out.slices.extend(self.read_slices())
        if self.ib_root:
            out.ib_ports.extend(read_ports(self.ib_root))
        return out

    def read_gpu(self, index: int, now: float | None = None) -> types_pb2.GpuTelemetry | None:
        """GPU ``index``'s reading; None when it is lost or has no handle."""
        n = self.nvml
        try:
            h = n.nvmlDeviceGetHandleByIndex(index)
            return self._fill(h, types_pb2.GpuTelemetry(index=index, numa_node=-1,
                                                        at=_ts(self.clock() if now is None else now)))
        except n.NVMLError:
            return None

    def _fill(self, h: Any, g: types_pb2.GpuTelemetry) -> types_pb2.GpuTelemetry:
        n, q = self.nvml, self._try
        util = q("nvmlDeviceGetUtilizationRates", h)
        if util is not None:
            g.utilization_pct = float(util.gpu)
        mem = q("nvmlDeviceGetMemoryInfo", h)
        if mem is not None:
            g.memory_used_bytes, g.memory_total_bytes = int(mem.used), int(mem.total)
        temp = q("nvmlDeviceGetTemperature", h, n.NVML_TEMPERATURE_GPU)
        if temp is not None:
            g.temperature_c = float(temp)
        power = q("nvmlDeviceGetPowerUsage", h)
        if power is not None:
            g.power_w = power / 1000.0
        limit = q("nvmlDeviceGetEnforcedPowerLimit", h)
        if limit is not None:
            g.power_limit_w = limit / 1000.0
        sm = q("nvmlDeviceGetClockInfo", h, n.NVML_CLOCK_SM)
        if sm is not None:
            g.sm_clock_mhz = int(sm)
        memclk = q("nvmlDeviceGetClockInfo", h, n.NVML_CLOCK_MEM)
        if memclk is not None:
            g.memory_clock_mhz = int(memclk)
        reasons = q("nvmlDeviceGetCurrentClocksEventReasons", h)
        if reasons is None:
            reasons = q("nvmlDeviceGetCurrentClocksThrottleReasons", h)
        if reasons is not None:
            g.throttle_reasons.extend(throttle_names(int(reasons)))
        corrected = q("nvmlDeviceGetTotalEccErrors", h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC)
        if corrected is not None:
            g.ecc_corrected = int(corrected)
        uncorrected = q("nvmlDeviceGetTotalEccErrors", h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC)
        if uncorrected is not None:
            g.ecc_uncorrected = int(uncorrected)
        rows = self._try("nvmlDeviceGetRemappedRows", h)          # Ampere and newer
        if rows is not None:
            g.remap_pending, g.remap_failed = bool(rows[2]), bool(rows[3])
        pages = self._try("nvmlDeviceGetRetiredPagesPendingStatus", h)   # before Ampere
        if pages is not None:
            g.retired_pages_pending = pages == n.NVML_FEATURE_ENABLED
        now = self.clock()
        topo = self._topology.get(g.index)
        if topo is None or not 0 <= now - topo[0] < self.topology_refresh_s:
            pci = q("nvmlDeviceGetPciInfo", h)
            numa = q("nvmlDeviceGetNumaNodeId", h)
            cpus = q("nvmlDeviceGetCpuAffinity", h, CPU_SET_WORDS)
            topo = (now, self._nvlinks(h), _text(pci.busId) if pci is not None else "",
                    int(numa) if numa is not None else -1, cpu_list(cpus) if cpus is not None else "")
            self._topology[g.index] = topo
        _, links, g.pci_bus_id, g.numa_node, g.cpu_affinity = topo
        g.nvlinks.extend(links)
        return g

    def _nvlinks(self, h: Any) -> list[types_pb2.NvlinkLink]:
        n = self.nvml
        links = []
        for link in range(n.NVML_NVLINK_MAX_LINKS):
            state = self._try("nvmlDeviceGetNvLinkState", h, link)
            if state is None:  # past the GPU's last link (or no NVLink at all)
                break
            out = types_pb2.NvlinkLink(link=link, active=state == n.NVML_FEATURE_ENABLED)
            if out.active:
                peer = self._try("nvmlDeviceGetNvLinkRemotePciInfo", h, link)
                if peer is not None:
                    out.peer_pci_bus_id = _text(peer.busId)
            links.append(out)
        return links

    def read_slices(self) -> list[types_pb2.SliceTelemetry]:
        """MIG slices: memory and processes of each slice's MIG device; then the shared slices."""
        out = self._read_mig_slices()
        if self.shared_slices is not None:
            out.extend(self.read_shared_slices(self.shared_slices()))
        return out

    def read_shared_slices(self, slices: Mapping[str, tuple[int, set[int]]]) -> list[types_pb2.SliceTelemetry]:
        """MPS, time-share and exclusive slices: NVML has no device per slice, so a slice's memory is the
        sum of what its GPU's compute processes that belong to the slice's workloads use (one
        nvmlDeviceGetComputeRunningProcesses per GPU). A slice without a process on its GPU reads 0."""
        n = self.nvml
        by_gpu: dict[int, list[tuple[str, set[int]]]] = {}
        for sid, (index, pids) in slices.items():
            by_gpu.setdefault(index, []).append((sid, pids))
        out = []
        for index, members in sorted(by_gpu.items()):
            if index in self.lost:
                continue
            try:
                procs = n.nvmlDeviceGetComputeRunningProcesses(n.nvmlDeviceGetHandleByIndex(index))
            except n.NVMLError:          # lost, or not supported: no reading for these slices this time
                continue
            used = {}
            for p in procs:
                mem = getattr(p, "usedGpuMemory", None)
                used[int(p.pid)] = used.get(int(p.pid), 0) + (int(mem) if mem is not None else 0)
            for sid, pids in sorted(members):
                mine = sorted(pid for pid in used if pid in pids)
                out.append(types_pb2.SliceTelemetry(slice_id=sid, memory_used_bytes=sum(used[p] for p in mine),
                                                    pids=mine))
        return out

    def _read_mig_slices(self) -> list[types_pb2.SliceTelemetry]:
        n = self.nvml
        out = []
        for sid, inst in sorted(self._mig_map().items()):
            if not inst.uuid:
                continue
            try:
                h = n.nvmlDeviceGetHandleByUUID(inst.uuid)
                s = types_pb2.SliceTelemetry(slice_id=sid)
                mem = self._try("nvmlDeviceGetMemoryInfo", h)
                if mem is not None:
                    s.memory_used_bytes = int(mem.used)
                procs = self._try("nvmlDeviceGetComputeRunningProcesses", h)
                if procs is not None:
                    s.pids.extend(int(p.pid) for p in procs)
                util = self._try("nvmlDeviceGetUtilizationRates", h)  # NOT_SUPPORTED on MIG devices today
                if util is not None:
                    s.utilization_pct = float(util.gpu)
            except n.NVMLError:
                continue
            out.append(s)
        return out

    # -- events

    async def report_events(self, outbox: asyncio.Queue) -> int:
        """Drain the events (`events`, off the event loop) and put them on `outbox`, one caller at a time: what
        the GPU reset does before it resets (XIDs logged before a reset belong to the incident it ends, so the
        control plane must see them before the reset's result, not after it as a new incident); the number."""
        async with self.event_turn:
            found = await asyncio.to_thread(self.events)
            for ev in found:
                outbox.put_nowait(node_service_pb2.AgentMessage(event=ev))
            return len(found)

    def events(self) -> list[types_pb2.NodeEvent]:
        """XIDs since the last call, and a "GpuLost" event for each GPU that fell off the bus."""
        n = self.nvml
        now = self.clock()
        out: list[types_pb2.NodeEvent] = []
        for i in range(n.nvmlDeviceGetCount()):
            try:
                h = n.nvmlDeviceGetHandleByIndex(i)
            except n.NVMLError_GpuIsLost:
                out.extend(self._drain(i, now))  # what the driver logged before it went (XID 79)
                if i not in self.lost:
                    self.lost.add(i)
                    out.append(types_pb2.NodeEvent(at=_ts(now), type="Warning", reason="GpuLost", gpu_index=i,
                                                   message=f"GPU {i} has fallen off the bus (NVML: GPU is lost)"))
                continue
            except n.NVMLError:
                continue
            if i in self.lost:  # back on the bus (reset or reboot): register afresh
                self.lost.discard(i)
                self._free(i)
            self._register(i, h)
            out.extend(self._drain(i, now))
        return out

    def start(self) -> None:
        """Register the event sets now, so XIDs from here on are kept for the first events()."""
        n = self.nvml
        for i in range(n.nvmlDeviceGetCount()):
            try:
                self._register(i, n.nvmlDeviceGetHandleByIndex(i))
            except n.NVMLError:
                continue

    def _register(self, index: int, h: Any) -> None:
        n = self.nvml
        if index in self._sets:
            return
        es = None
        try:
            es = n.nvmlEventSetCreate()
            n.nvmlDeviceRegisterEvents(h, n.nvmlEventTypeXidCriticalError, es)
            self._sets[index] = es
        except n.NVMLError as e:
            if es is not None:
                try:
                    n.nvmlEventSetFree(es)
                except n.NVMLError:
                    pass
            if isinstance(e, (n.NVMLError_NotSupported, n.NVMLError_FunctionNotFound)):
                self._sets[index] = None  # this GPU or driver has no XID events; do not retry
            else:
                log(logger, logging.WARNING, "cannot register for XID events", gpu=index, error=str(e))

    def _free(self, index: int) -> None:
        es = self._sets.pop(index, None)
        if es is not None:
            try:
                self.nvml.nvmlEventSetFree(es)
            except self.nvml.NVMLError:
                pass

    def _drain(self, index: int, now: float) -> list[types_pb2.NodeEvent]:
        n = self.nvml
        es = self._sets.get(index)
        out = []
        if es is None:
            return out
        where = {(m.gi_id, m.ci_id): sid for sid, m in self._mig_map().items() if m.gpu_index == index}
        for _ in range(MAX_EVENTS_PER_GPU):
            try:
                data = n.nvmlEventSetWait_v2(es, 0)
            except n.NVMLError:  # TIMEOUT: nothing more
                break
            if not data.eventType & n.nvmlEventTypeXidCriticalError:
                continue
            na = n.NVML_VALUE_NOT_AVAILABLE_uint.value
            msg = f"GPU {index}: XID {int(data.eventData)}"
            if data.gpuInstanceId != na:
                ci = None if data.computeInstanceId == na else int(data.computeInstanceId)
                msg += f" on GPU instance {data.gpuInstanceId}" + (f", compute instance {ci}" if ci is not None else "")
                sid = where.get((int(data.gpuInstanceId), ci))
                if sid:
                    msg += f" (slice {sid})"
            out.append(types_pb2.NodeEvent(at=_ts(now), type="Warning", reason="XidError", message=msg,
                                           gpu_index=index))
        return out

    def close(self) -> None:
        for i in list(self._sets):
            self._free(i)


async def run_telemetry(collector: TelemetryCollector, interval: float, outbox: asyncio.Queue,
                        event_poll: float = EVENT_POLL_SECONDS, loads: Any = None) -> None:
    """Put ``AgentMessage(telemetry=...)`` on ``outbox`` every ``interval`` seconds (the first at
    once), and ``AgentMessage(event=...)`` for every event, checked every ``event_poll`` seconds.
    ``loads``: the model servers' load reader (nodeagent/backends/loadscraper.py; its ``read()`` fills
    ``NodeTelemetry.backends``), or None. Runs until cancelled; a failed reading is logged and retried
    at the next tick."""
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(collector.start)
    due = loop.time()
    failing = False
    while True:
        try:
            await collector.report_events(outbox)
            if loop.time() >= due:
                reading = await asyncio.to_thread(collector.collect)
                if loads is not None:
                    reading.backends.extend(await loads.read())
                outbox.put_nowait(node_service_pb2.AgentMessage(telemetry=reading))
                due = due + interval if due + interval > loop.time() else loop.time() + interval
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - keep reporting; the next tick retries
            if not failing:
                log(logger, logging.WARNING, "telemetry reading failed", error=f"{type(e).__name__}: {e}")
            failing = True
            due = loop.time() + interval
        await asyncio.sleep(max(0.0, min(event_poll, due - loop.time())))
