"""Prometheus gauges of the fleet, read from a snapshot taken on the event loop.

The scrape runs in prometheus_client's HTTP thread while the event loop changes the fleet; reading
the fleet's dicts from that thread can see them half-changed (or fail with "dictionary changed size
during iteration"). So `collect` asks the loop for a snapshot (`snapshot`, plain numbers computed in
one loop callback, consistent with each other) and renders that; if the loop does not answer within
`timeout` the last snapshot is served and `gpumesh_metrics_snapshot_stale` says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily

from gpumesh.v1 import types_pb2
from mesh.levels import PRESSURE, THERMAL

LEADER = Gauge("gpumesh_leader", "1 while this control plane leads, 0 while it stands by")
ELECTIONS = Counter("gpumesh_leader_elections_total", "Times this control plane process became the leader")
MIGRATIONS_FINISHED = Counter("gpumesh_migrations_finished_total", "Migrations that ended, by result (done, aborted)",
                              ["result"])
STATES = ("pending", "ready", "releasing", "failed", "unknown")
HEALTHS = ("healthy", "unhealthy", "lost", "quarantined")


def _gpus(ctl) -> list[tuple]:
    """(node, index, model, health, pressure, thermal, used, total, temperature, utilization, slices) per GPU."""
    out = []
    for name, entry in ctl.fleet.nodes.items():
        for g in entry.gpus:
            t = g.telemetry
            out.append((name, str(g.index), getattr(g.model, "name", str(g.model)), g.health, g.memory_pressure,
                        g.thermal_state, t.memory_used_bytes if t is not None else 0,
                        (t.memory_total_bytes if t is not None and t.memory_total_bytes else g.memory_bytes),
                        t.temperature_c if t is not None else 0.0, t.utilization_pct if t is not None else 0.0,
                        len(g.slices)))
    return out


def snapshot(ctl, workloads=None, migrations=None, history=None) -> dict:
    """Everything the gauges show, computed at once (call it on the event loop). `history`: the history
    recorder, whose nodes' last readings become the per-slice, per-node and per-workload gauges."""
    counts: dict[str, int] = {}
    tenants: dict[tuple[str, str], list[int]] = {}
    for s in ctl.fleet.slices.values():
        name = types_pb2.SliceState.Name(s.state).removeprefix("SLICE_STATE_").lower()
        counts[name] = counts.get(name, 0) + 1
        t = tenants.setdefault((s.tenant, name), [0, 0])
        t[0] += 1
        t[1] += s.memory_bytes
    phases: dict[str, int] = {}
    if migrations is not None:
        from controlplane.controllers.migration_phases import phase_name
        for m in migrations.migrations.values():
            phases[phase_name(m.phase)] = phases.get(phase_name(m.phase), 0) + 1
    ready = sum(1 for n in ctl.fleet.nodes.values() if n.ready)
    records = {"slices": len(ctl.fleet.slices), "requests": len(ctl.requests),
               "slice_revisions": len(ctl.fleet.revisions), "allocations": len(ctl.fleet.by_allocation),
               "ready_waiters": sum(len(v) for v in ctl.ready_waiters.values()),
               "gone_waiters": sum(len(v) for v in ctl.gone_waiters.values())}
    if workloads is not None:
        records.update(workloads=len(workloads.workloads), log_streams=len(workloads.log_queues),
                       stopping=len(workloads.stopping), expired_ids=len(workloads.expired_ids),
                       workload_waiters=sum(len(v) for v in workloads.waiters.values()))
    if migrations is not None:
        records.update(migrations=len(migrations.migrations), checkpoints=len(migrations.checkpoints),
                       migration_tasks=len(getattr(migrations, "tasks", {})))
    return {"slices": counts, "tenants": tenants, "gpus": _gpus(ctl), "migration_phases": phases,
            "node_list": [(n, e.ready, e.record.cordoned) for n, e in ctl.fleet.nodes.items()],
            "events": len(ctl.recorder.log.events) if hasattr(ctl.recorder, "log") else 0,
            "nodes_ready": ready, "nodes": len(ctl.fleet.nodes),
            "batches": ctl.writer.batches, "writes": ctl.writer.writes, "writer_restarts": ctl.writer.restarts,
            "watchers": len(ctl.events.subscribers), "sessions": len(ctl.sessions.by_node), "records": records,
            "series": history.latest_rows() if history is not None else []}


class FleetCollector:
    """Registered with prometheus_client; renders the loop's snapshot."""

    def __init__(self, loop: asyncio.AbstractEventLoop, take, timeout: float = 5.0) -> None:
        self.loop = loop
        self.take = take            # () -> dict, run on the loop
        self.timeout = timeout
        self.last: dict | None = None
        self.stale = False

    def _fresh(self) -> dict | None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            # called on the loop itself (prometheus_client.REGISTRY.register collects once): take it
            # here, never wait on the loop from the loop
            self.last, self.stale = self.take(), False
            return self.last

        async def run():
            return self.take()
        try:
            fut = asyncio.run_coroutine_threadsafe(run(), self.loop)
            self.last, self.stale = fut.result(self.timeout), False
        except (concurrent.futures.TimeoutError, RuntimeError):
            self.stale = True          # the loop is busy or gone: the last snapshot
        return self.last

    def collect(self):
        snap = self._fresh()
        if snap is None:
            return
        by_state = GaugeMetricFamily("gpumesh_slices", "Slices by state", labels=["state"])
        for name in STATES:
            by_state.add_metric([name], snap["slices"].get(name, 0))
        yield by_state
        nodes = GaugeMetricFamily("gpumesh_nodes", "Nodes by readiness", labels=["ready"])
        nodes.add_metric(["true"], snap["nodes_ready"])
        nodes.add_metric(["false"], snap["nodes"] - snap["nodes_ready"])
        yield nodes
        yield GaugeMetricFamily("gpumesh_etcd_write_batches", "Group-commit transactions written",
                                value=snap["batches"])
        yield GaugeMetricFamily("gpumesh_etcd_writes", "Callers' writes those transactions carried "
                                "(writes / batches is the group-commit batch size)", value=snap["writes"])
        yield GaugeMetricFamily("gpumesh_etcd_writer_restarts", "Times the etcd writer failed unexpectedly and "
                                "was restarted", value=snap["writer_restarts"])
        yield GaugeMetricFamily("gpumesh_watchers", "Open slice watchers (Watch streams and internal followers)",
                                value=snap["watchers"])
        yield GaugeMetricFamily("gpumesh_agent_sessions", "Connected agents' Sync streams", value=snap["sessions"])
        records = GaugeMetricFamily("gpumesh_records", "Records held in memory, by kind", labels=["kind"])
        for kind, n in sorted(snap["records"].items()):
            records.add_metric([kind], n)
        yield records
        yield from self._fleet(snap)
        yield from self._series(snap.get("series", []))
        yield GaugeMetricFamily("gpumesh_metrics_snapshot_stale", "1 when the event loop did not answer the last "
                                "scrape in time and an older snapshot was served", value=int(self.stale))

    @staticmethod
    def _series(rows):
        """The history's latest slice, node and workload samples as gauges (fleet_series.GAUGES), so a
        Prometheus that scrapes /metrics holds them (the forecasts' Prometheus source reads them back)."""
        from controlplane.forecast.fleet_series import GAUGES
        fams = {}
        for (kind, metric), (name, help_) in GAUGES.items():
            fams[kind, metric] = GaugeMetricFamily(name, help_, labels=["node"] if kind == "node" else
                                                   [kind, "node", "tenant"])
        for node, (kind, sid, metric, tenant, _at, value) in rows:
            fam = fams.get((kind, metric))
            if fam is not None:
                fam.add_metric([node] if kind == "node" else [sid, node, tenant], value)
        yield from fams.values()

    @staticmethod
    def _fleet(snap: dict):
        """Per tenant, per node and per GPU: what the dashboard and the alert rules read
        (docs/monitoring/)."""
        by_tenant = GaugeMetricFamily("gpumesh_tenant_slices", "Slices by tenant and state", labels=["tenant", "state"])
        memory = GaugeMetricFamily("gpumesh_tenant_slice_memory_bytes", "GPU memory of the slices by tenant and state",
                                   labels=["tenant", "state"])
        for (tenant, state), (n, mem) in sorted(snap["tenants"].items()):
            by_tenant.add_metric([tenant, state], n)
            memory.add_metric([tenant, state], mem)
        yield by_tenant
        yield memory
        ready = GaugeMetricFamily("gpumesh_node_ready", "1 when the node's agent holds its lease (Ready)",
                                  labels=["node"])
        cordoned = GaugeMetricFamily("gpumesh_node_cordoned", "1 when the node takes no new slices", labels=["node"])
        for name, is_ready, is_cordoned in snap["node_list"]:
            ready.add_metric([name], int(is_ready))
            cordoned.add_metric([name], int(is_cordoned))
        yield ready
        yield cordoned
        labels = ["node", "gpu", "model"]
        fams = {k: GaugeMetricFamily(f"gpumesh_gpu_{k}", h, labels=labels) for k, h in (
            ("healthy", "1 when the GPU is healthy (0: unhealthy, lost or quarantined)"),
            ("memory_used_bytes", "GPU memory in use (agent telemetry)"),
            ("memory_total_bytes", "GPU memory in all"),
            ("temperature_celsius", "GPU temperature (agent telemetry)"),
            ("utilization_percent", "GPU compute utilization (agent telemetry)"),
            ("memory_pressure_level", "Memory pressure: 0 low, 1 normal, 2 high, 3 critical"),
            ("thermal_level", "Thermal state: 0 normal, 1 warning, 2 throttling, 3 critical"),
            ("slices", "Slices placed on the GPU"))}
        health = dict.fromkeys(HEALTHS, 0)
        pressure = dict.fromkeys(PRESSURE, 0)
        thermal = dict.fromkeys(THERMAL, 0)
        for node, index, model, h, p, t, used, total, temp, util, slices in snap["gpus"]:
            key = [node, index, model]
            for name, value in (("healthy", int(h == "healthy")), ("memory_used_bytes", used),
                                ("memory_total_bytes", total), ("temperature_celsius", temp),
                                ("utilization_percent", util),
                                ("memory_pressure_level", PRESSURE.index(p) if p in PRESSURE else 0),
                                ("thermal_level", THERMAL.index(t) if t in THERMAL else 0), ("slices", slices)):
                fams[name].add_metric(key, value)
            health[h] = health.get(h, 0) + 1
            pressure[p] = pressure.get(p, 0) + 1
            thermal[t] = thermal.get(t, 0) + 1
        yield from fams.values()
        for name, help_, label, table in (
                ("gpumesh_gpus", "GPUs by health", "health", health),
                ("gpumesh_gpus_by_memory_pressure", "GPUs by memory pressure level", "level", pressure),
                ("gpumesh_gpus_by_thermal_state", "GPUs by thermal state", "state", thermal)):
            fam = GaugeMetricFamily(name, help_, labels=[label])
            for k, n in table.items():
                fam.add_metric([k], n)
            yield fam
        phases = GaugeMetricFamily("gpumesh_migrations", "Migrations held (unfinished and finished within retention), "
                                   "by phase", labels=["phase"])
        for phase, n in sorted(snap["migration_phases"].items()):
            phases.add_metric([phase], n)
        yield phases
        yield GaugeMetricFamily("gpumesh_events_held", "Durable events held (bounded by events_kept)",
                                value=snap["events"])
