"""From one node's telemetry and the fleet's records to the history's slice, node and workload samples,
and to seed 000's interaction-log entries (pure: no I/O; the recorder stores what these return).

Per slice (`slice/<id>`, owned by the slice's tenant): `utilization` and `memory_used` (a MIG slice's own
device when the agent reports it, `SliceTelemetry`; otherwise the GPU's reading split across the GPU's
slices, memory in proportion to their memory and utilization to their compute share), `power` (the
GPU's, split by compute share), and the slice's demand: `memory_bytes` and `compute_share` it holds.
Per node (`node/<name>`): `utilization` (mean over its GPUs), `memory_used`, `memory_total`, `power`
(sums), `temperature` (the hottest), `slices` and `allocated_memory` (its slices' count and memory).
Per workload (`workload/<id>`, owned by its tenant): the `utilization` and `memory_used` of its slice,
split evenly between the workloads running on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from gpumesh.v1 import types_pb2

APP_TYPE_LABELS = ("app-type", "app_type", "gpumesh.io/app-type")
PHASE_LABELS = ("phase", "gpumesh.io/phase")
ISOLATION = {types_pb2.ISOLATION_MIG: "mig", types_pb2.ISOLATION_MPS: "mps",
             types_pb2.ISOLATION_TIMESHARE: "timeshare"}
TERMINAL = (types_pb2.WORKLOAD_STATE_SUCCEEDED, types_pb2.WORKLOAD_STATE_FAILED, types_pb2.WORKLOAD_STATE_STOPPED)
STATE = {v: types_pb2.WorkloadState.Name(v).removeprefix("WORKLOAD_STATE_").lower()
         for v in types_pb2.WorkloadState.values()}


# (kind, metric) -> (the Prometheus gauge the control plane exports the latest sample as, its help): the
# control plane's /metrics (controlplane/api/metrics.py) and the Prometheus source of the history
# (controlplane/forecast/prometheus.py) both read this table. Labels: the kind (slice, node, workload), plus
# node and tenant for slices and workloads.
GAUGES = {
    ("slice", "utilization"): ("gpumesh_slice_utilization_percent", "Slice compute utilization (its own reading, "
                               "else the GPU's split by compute share)"),
    ("slice", "memory_used"): ("gpumesh_slice_memory_used_bytes", "Slice GPU memory in use (its own reading, else "
                               "the GPU's split by memory share)"),
    ("slice", "power"): ("gpumesh_slice_power_watts", "Slice share of its GPU's power draw"),
    ("slice", "memory_bytes"): ("gpumesh_slice_memory_bytes", "GPU memory the slice holds"),
    ("slice", "compute_share"): ("gpumesh_slice_compute_share", "Compute share the slice holds (0-1)"),
    ("node", "utilization"): ("gpumesh_node_utilization_percent", "Mean GPU utilization of the node"),
    ("node", "memory_used"): ("gpumesh_node_memory_used_bytes", "GPU memory in use on the node"),
    ("node", "memory_total"): ("gpumesh_node_memory_total_bytes", "GPU memory of the node"),
    ("node", "power"): ("gpumesh_node_power_watts", "GPU power draw of the node"),
    ("node", "temperature"): ("gpumesh_node_temperature_celsius", "The node's hottest GPU"),
    ("node", "slices"): ("gpumesh_node_slices", "Slices on the node"),
    ("node", "allocated_memory"): ("gpumesh_node_allocated_memory_bytes", "GPU memory the node's slices hold"),
    ("workload", "utilization"): ("gpumesh_workload_utilization_percent", "Workload share of its slice's "
                                  "utilization"),
    ("workload", "memory_used"): ("gpumesh_workload_memory_used_bytes", "Workload share of its slice's memory "
                                  "in use"),
}


def _seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def _label(labels, keys) -> str:
    for k in keys:
        if labels.get(k):
            return labels[k]
    return ""


@dataclass
class SliceUse:
    slice: types_pb2.Slice
    utilization: float
    memory_used: float
    power: float


def slice_use(gpu, reading: types_pb2.GpuTelemetry, own: dict[str, types_pb2.SliceTelemetry]) -> list[SliceUse]:
    """The use of every slice on `gpu` at `reading` (see the module docstring for the attribution)."""
    slices = list(gpu.slices.values())
    if not slices:
        return []
    mem_total = sum(s.memory_bytes for s in slices) or len(slices)
    share_total = sum(s.compute_share for s in slices) or len(slices)
    out = []
    for s in slices:
        mem_share = (s.memory_bytes or 1) / mem_total if any(x.memory_bytes for x in slices) else 1 / len(slices)
        cpu_share = (s.compute_share / share_total) if any(x.compute_share for x in slices) else 1 / len(slices)
        t = own.get(s.id)
        util = reading.utilization_pct * cpu_share
        mem = reading.memory_used_bytes * mem_share
        if t is not None:
            mem = float(t.memory_used_bytes)
            if t.utilization_pct:
                util = t.utilization_pct
        out.append(SliceUse(s, float(util), float(mem), float(reading.power_w) * cpu_share))
    return out


def node_samples(entry, t: types_pb2.NodeTelemetry, at: float) -> tuple[list[tuple], list[SliceUse]]:
    """(history samples of the node and its slices, the slices' use) for one node reading."""
    name = entry.record.name
    own = {s.slice_id: s for s in t.slices}
    by_index = {g.index: g for g in entry.gpus}
    rows, uses = [], []
    utils, mem, total, power, temps = [], 0.0, 0.0, 0.0, []
    for r in t.gpus:
        g = by_index.get(r.index)
        if g is None:
            continue
        utils.append(r.utilization_pct)
        mem += r.memory_used_bytes
        total += r.memory_total_bytes or g.memory_bytes
        power += r.power_w
        temps.append(r.temperature_c)
        for u in slice_use(g, r, own):
            uses.append(u)
            sid, tenant = u.slice.id, u.slice.tenant
            for metric, value in (("utilization", u.utilization), ("memory_used", u.memory_used),
                                  ("power", u.power), ("memory_bytes", u.slice.memory_bytes),
                                  ("compute_share", u.slice.compute_share)):
                rows.append(("slice", sid, metric, tenant, at, float(value)))
    if utils:
        slices = [s for g in entry.gpus for s in g.slices.values()]
        for metric, value in (("utilization", sum(utils) / len(utils)), ("memory_used", mem),
                              ("memory_total", total), ("power", power), ("temperature", max(temps)),
                              ("slices", len(slices)), ("allocated_memory", sum(s.memory_bytes for s in slices))):
            rows.append(("node", name, metric, "", at, float(value)))
    return rows, uses


def workload_samples(uses: list[SliceUse], workloads: list[types_pb2.Workload], at: float) -> list[tuple]:
    """Each running workload's share of its slice's use at `at`."""
    running: dict[str, list[types_pb2.Workload]] = {}
    for w in workloads:
        if w.state == types_pb2.WORKLOAD_STATE_RUNNING:
            running.setdefault(w.slice_id, []).append(w)
    rows = []
    for u in uses:
        ws = running.get(u.slice.id, [])
        for w in ws:
            rows.append(("workload", w.id, "utilization", w.tenant, at, u.utilization / len(ws)))
            rows.append(("workload", w.id, "memory_used", w.tenant, at, u.memory_used / len(ws)))
    return rows


@dataclass
class Interaction:
    """One workload's entry in the interaction log (seed 000)."""

    workload: str
    tenant: str
    app_type: str
    phase: str
    labels: dict[str, str]
    fingerprint: dict
    node: str
    slice_id: str
    state: str
    started: float
    ended: float = 0.0
    updated: float = 0.0
    usage: list[tuple[float, float, float]] = field(default_factory=list)   # (t, utilization, memory_used)

    def row(self) -> tuple:
        return (self.workload, self.tenant, self.app_type, self.phase, json.dumps(self.labels, sort_keys=True),
                json.dumps(self.fingerprint, sort_keys=True), self.node, self.slice_id, self.state, self.started,
                self.ended, self.updated)


def fingerprint(w: types_pb2.Workload, s: types_pb2.Slice | None, entry) -> dict:
    """The hardware a workload ran on: GPU model and memory, driver and CUDA version (the agent's
    inventory), isolation, MIG profile or MPS share, and the slice's memory."""
    fp: dict = {"node": w.node}
    inv = entry.record.inventory if entry is not None else None
    if inv is not None:
        fp.update(driver_version=inv.driver_version, cuda_version=inv.cuda_version, gpu_backend=inv.gpu_backend)
    if s is not None:
        fp.update(gpu_model=s.gpu_model, gpu_index=s.gpu_index, isolation=ISOLATION.get(s.isolation, "whole"),
                  mig_profile=s.profile, slice_memory_bytes=s.memory_bytes, compute_share=s.compute_share)
        if s.isolation == types_pb2.ISOLATION_MPS:
            fp["mps_share"] = s.compute_share
        if inv is not None:
            for g in inv.gpus:
                if g.index == s.gpu_index:
                    fp.update(gpu_memory_bytes=g.memory_bytes, gpu_product=g.product_name)
    return fp


def interaction(w: types_pb2.Workload, s: types_pb2.Slice | None, entry, now: float) -> Interaction:
    labels = dict(s.labels) if s is not None else {}
    labels.update(w.labels)
    started = _seconds(w.started_at) if w.HasField("started_at") else _seconds(w.created_at) or now
    ended = _seconds(w.finished_at) if w.state in TERMINAL and w.HasField("finished_at") else 0.0
    return Interaction(workload=w.id, tenant=w.tenant, app_type=_label(labels, APP_TYPE_LABELS),
                       phase=_label(labels, PHASE_LABELS), labels=labels, fingerprint=fingerprint(w, s, entry),
                       node=w.node, slice_id=w.slice_id, state=STATE.get(w.state, "unknown"), started=started,
                       ended=ended, updated=now)
