"""NodeHealth: no slices on NotReady or cordoned nodes, nor on GPUs that are unhealthy or whose
memory pressure or temperature has reached the configured level (set by the telemetry component)."""

from __future__ import annotations

from controlplane.state.fleet import GpuState, NodeEntry
from controlplane.scheduler.framework import SUCCESS, Code, CycleState, Status
from mesh.levels import PRESSURE, THERMAL
from mesh.slicespec import SliceRequest

NAME = "NodeHealth"


class Plugin:
    NAME = NAME
    cacheable = True   # readiness, cordon, health and pressure are all in the node's signature

    def __init__(self, max_memory_pressure: str = "high", max_thermal_state: str = "throttling") -> None:
        if max_memory_pressure not in PRESSURE:
            raise ValueError(f"{NAME}: max_memory_pressure {max_memory_pressure!r} is not one of {', '.join(PRESSURE)}")
        if max_thermal_state not in THERMAL:
            raise ValueError(f"{NAME}: max_thermal_state {max_thermal_state!r} is not one of {', '.join(THERMAL)}")
        self.max_pressure = PRESSURE.index(max_memory_pressure)
        self.max_thermal = THERMAL.index(max_thermal_state)

    def filter(self, state: CycleState, req: SliceRequest, node: NodeEntry) -> Status:
        if not node.ready or node.record.cordoned:
            why = "node not ready" if not node.ready else "node cordoned"
            # counted per GPU, as operators read capacity in GPUs
            return Status(Code.UNSCHEDULABLE,
                          tuple((g.model.name, why) for g in node.gpus) or (("host", "node:" + why),), NAME)
        return SUCCESS

    def filter_gpu(self, req: SliceRequest, gpu: GpuState) -> str | None:
        if gpu.health != "healthy":
            return f"GPU {gpu.health}"
        if gpu.memory_pressure in PRESSURE and PRESSURE.index(gpu.memory_pressure) > self.max_pressure:
            return f"GPU memory pressure {gpu.memory_pressure}"
        if gpu.thermal_state in THERMAL and THERMAL.index(gpu.thermal_state) > self.max_thermal:
            return f"GPU thermal state {gpu.thermal_state}"
        return None
