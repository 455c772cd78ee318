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

from prometheus_client.core import GaugeMetricFamily

from gpumesh.v1 import types_pb2

STATES = ("pending", "ready", "releasing", "failed", "unknown")


def snapshot(ctl, workloads=None, migrations=None) -> dict:
    """Everything the gauges show, computed at once (call it on the event loop)."""
    counts: dict[str, int] = {}
    for s in ctl.fleet.slices.values():
        name = types_pb2.SliceState.Name(s.state).removeprefix("SLICE_STATE_").lower()
        counts[name] = counts.get(name, 0) + 1
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
    return {"slices": counts, "nodes_ready": ready, "nodes": len(ctl.fleet.nodes),
            "batches": ctl.writer.batches, "writes": ctl.writer.writes, "writer_restarts": ctl.writer.restarts,
            "watchers": len(ctl.events.subscribers), "sessions": len(ctl.sessions.by_node), "records": records}


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
        yield GaugeMetricFamily("gpumesh_metrics_snapshot_stale", "1 when the event loop did not answer the last "
                                "scrape in time and an older snapshot was served", value=int(self.stale))
