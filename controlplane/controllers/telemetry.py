"""What the agents measure, turned into fleet state: memory pressure and
thermal state per GPU, node events, and the inputs of the GPU health
controller (controlplane/controllers/health.py: XIDs, lost GPUs, resets, readings).

The agent sends raw readings (NodeTelemetry every interval, NodeEvents as
they happen); the judgement is made here, with thresholds from the control
plane's configuration, so every node is judged alike. Health changes are
written to etcd (`/gpumesh/v1/gpuhealth/<node>/<index>`) by the health
controller, so an unhealthy GPU stays unhealthy across a control-plane
restart; the scheduler reads the
states from the fleet (GpuState.memory_pressure / thermal_state / health).
"""

from __future__ import annotations

import collections
import logging
import re
import time
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from controlplane.state import keys
from controlplane.controllers.slices import Controller
from controlplane.state.fleet import GpuState
from controlplane.controllers.health import HEALTH_ENUM, HealthController
from controlplane.controllers.healthpolicy import HealthPolicy
from gpumesh.v1 import types_pb2
from mesh.levels import PRESSURE, THERMAL, level
from mesh.logs import log

logger = logging.getLogger(__name__)
T = types_pb2

PRESSURE_ENUM = dict(zip(PRESSURE, (T.MEMORY_PRESSURE_LOW, T.MEMORY_PRESSURE_NORMAL, T.MEMORY_PRESSURE_HIGH,
                                    T.MEMORY_PRESSURE_CRITICAL)))
THERMAL_ENUM = dict(zip(THERMAL, (T.THERMAL_STATE_NORMAL, T.THERMAL_STATE_WARNING, T.THERMAL_STATE_THROTTLING,
                                  T.THERMAL_STATE_CRITICAL)))
XID_IN_TEXT = re.compile(r"\bXID\s*(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Policy:
    pressure_pct: tuple[float, float, float] = (50.0, 70.0, 85.0)
    thermal_c: tuple[float, float, float] = (65.0, 80.0, 85.0)
    health: HealthPolicy = field(default_factory=HealthPolicy)   # the XID policy (controlplane/controllers/healthpolicy.py)
    events_kept: int = 100

    def memory_pressure(self, used: int, total: int) -> str:
        pct = 100.0 * used / total if total > 0 else 0.0
        return level(pct, self.pressure_pct, PRESSURE)

    def thermal_state(self, celsius: float) -> str:
        return level(celsius, self.thermal_c, THERMAL)




def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class TelemetryManager:
    def __init__(self, ctl: Controller, policy: Policy = Policy(), clock=time.time) -> None:
        self.ctl = ctl
        self.policy = policy
        self.clock = clock
        self.events: dict[str, collections.deque] = {}
        self.ib_ports: dict[str, list[types_pb2.IbPort]] = {}
        self.health = HealthController(self, policy.health)
        # async fn(node, [BackendLoad]) called with each reading's model-server loads (the deployment
        # controller attaches them to its replicas: controlplane/serving/deployments.py)
        self.backend_listeners: list = []
        # fn(GpuState, GpuTelemetry) called with each judged reading (the history: controlplane/forecast/)
        self.reading_listeners: list = []
        # fn(node, NodeTelemetry) called after a whole reading is judged (the history's slice, node and
        # workload series: controlplane/forecast/fleet_series.py)
        self.node_listeners: list = []
        ctl.agent_handlers["telemetry"] = self.on_telemetry
        ctl.agent_handlers["event"] = self.on_event
        ctl.telemetry = self

    # -- restart: health is durable --------------------------------------------------------

    async def load(self) -> None:
        snap = await self.ctl.store.load(keys.GPU_HEALTH)
        for key, (value, _, _) in snap.kvs.items():
            node, _, index = keys.name_of(key, keys.GPU_HEALTH).partition("/")
            rec = types_pb2.GpuTelemetry()
            rec.ParseFromString(value)
            g = self.ctl.fleet.gpu(node, int(index))
            if g is not None:
                self.health.restore(g, rec)

    # -- events -----------------------------------------------------------------------------

    def record(self, node: str, kind: str, reason: str, message: str, gpu: int = -1,
               at: float | None = None) -> types_pb2.NodeEvent:
        ev = types_pb2.NodeEvent(at=_ts(at if at is not None else self.clock()), type=kind, reason=reason,
                                 message=message, gpu_index=gpu)
        self.events.setdefault(node, collections.deque(maxlen=self.policy.events_kept)).append(ev)
        self._durable(node, ev)
        log(logger, logging.WARNING if kind == "Warning" else logging.INFO, message, node=node, reason=reason,
            gpu=gpu)
        return ev

    def events_of(self, node: str) -> list[types_pb2.NodeEvent]:
        return list(self.events.get(node, ()))

    async def on_event(self, node: str, ev: types_pb2.NodeEvent) -> None:
        g = self.ctl.fleet.gpu(node, ev.gpu_index) if ev.gpu_index >= 0 else None
        if ev.reason == "XidError" and g is not None:
            m = XID_IN_TEXT.search(ev.message)
            if m:
                await self._xid(g, int(m.group(1)))
                return
        if ev.reason == "GpuLost" and g is not None:
            await self.health.on_lost(g, ev.message or f"GPU {g.index} fell off the bus")
            return
        if ev.reason in ("GpuReset", "GpuResetFailed") and g is not None:
            await self.health.on_reset_result(g, ev.reason == "GpuReset", ev.message)
        stored = types_pb2.NodeEvent()
        stored.CopyFrom(ev)
        if not stored.HasField("at"):
            stored.at.CopyFrom(_ts(self.clock()))
        self.events.setdefault(node, collections.deque(maxlen=self.policy.events_kept)).append(stored)
        self._durable(node, stored)

    def _durable(self, node: str, ev: types_pb2.NodeEvent) -> None:
        """Into the durable event stream too (controlplane/events/): a GPU's events under Gpu node/index."""
        kind, name = ("Gpu", f"{node}/{ev.gpu_index}") if ev.gpu_index >= 0 else ("Node", node)
        self.ctl.recorder.emit(kind, name, ev.type, ev.reason, ev.message, node=node, source="health-controller")

    # -- telemetry ----------------------------------------------------------------------------

    async def on_telemetry(self, node: str, t: types_pb2.NodeTelemetry) -> None:
        entry = self.ctl.fleet.nodes.get(node)
        if entry is None:
            return
        if t.ib_ports:
            self.ib_ports[node] = list(t.ib_ports)
        if t.backends:
            for listener in self.backend_listeners:
                try:
                    await listener(node, list(t.backends))
                except Exception:   # noqa: BLE001 - load signals never stop the GPU readings
                    logger.exception("backend load listener")
        seen = set()
        for reading in t.gpus:
            g = self.ctl.fleet.gpu(node, reading.index)
            if g is None:
                continue
            seen.add(g.index)
            await self._reading(g, reading)
        for g in entry.gpus:
            if g.index not in seen and g.health == "healthy" and t.gpus:
                await self.health.on_lost(g, f"GPU {g.index} missing from the agent's telemetry")
        for listener in self.node_listeners:
            try:
                listener(node, t)
            except Exception:   # noqa: BLE001 - history never stops the GPU readings
                logger.exception("node reading listener")

    async def _reading(self, g: GpuState, r: types_pb2.GpuTelemetry) -> None:
        for code in r.xid_events:
            await self._xid(g, code)
        total = r.memory_total_bytes or g.memory_bytes
        pressure = self.policy.memory_pressure(r.memory_used_bytes, total)
        thermal = self.policy.thermal_state(r.temperature_c)
        if (pressure, thermal) != (g.memory_pressure, g.thermal_state):
            if PRESSURE.index(pressure) >= 2 and PRESSURE.index(pressure) > PRESSURE.index(g.memory_pressure):
                self.record(g.node, "Warning", "MemoryPressure",
                            f"GPU {g.index} memory pressure {pressure} ({r.memory_used_bytes * 100 // max(total, 1)}%"
                            f" used)", g.index)
            if THERMAL.index(thermal) >= 1 and THERMAL.index(thermal) > THERMAL.index(g.thermal_state):
                self.record(g.node, "Warning", "ThermalState",
                            f"GPU {g.index} thermal state {thermal} ({r.temperature_c:.0f} C)", g.index)
        g.memory_pressure, g.thermal_state = pressure, thermal
        reading = types_pb2.GpuTelemetry()
        reading.CopyFrom(r)
        reading.memory_pressure = PRESSURE_ENUM[pressure]
        reading.thermal_state = THERMAL_ENUM[thermal]
        reading.health = HEALTH_ENUM[g.health]
        reading.health_reason = g.telemetry.health_reason if g.telemetry is not None and g.health != "healthy" else ""
        if not reading.HasField("at"):
            reading.at.CopyFrom(_ts(self.clock()))
        g.telemetry = reading
        await self.health.on_reading(g, reading)
        reading.health = HEALTH_ENUM[g.health]
        for listener in self.reading_listeners:
            try:
                listener(g, reading)
            except Exception:   # noqa: BLE001 - history never stops the GPU readings
                logger.exception("reading listener")

    async def _xid(self, g: GpuState, code: int) -> None:
        await self.health.on_xid(g, code)
