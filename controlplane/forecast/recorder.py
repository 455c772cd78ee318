"""Feeds the history store from what the leader already sees, and flushes it off the event loop.

- every GPU reading (controlplane/controllers/telemetry.py): utilization, memory used and total,
  temperature, power, and the memory-pressure and thermal levels as judged (0-3);
- every `sample_seconds`, per deployment: its replica count, and its READY replicas' load signals summed
  (requests running and waiting, prompt and generation tokens per second) with the autoscaler's age rule for a
  reading (controlplane/controllers/autoscale_freshness.py, `load_max_age`): while a READY replica's load is
  unknown (its reading is stale, or its backend's /metrics did not answer) no load sample is written (a gap the
  forecasts bridge, not a stale value nor a false zero); a replica not read yet (just READY) counts none; with no
  READY replica read, none is written;
- the slice-request stream (controlplane/controllers/slices.py): Allocate requests counted per minute,
  for the fleet, per tenant, per MIG profile or size class, and per GPU model;
- every node reading: per slice, per node and per running workload series (fleet_series.py), and seed
  000's interaction log (interactions.py): each workload's labels, hardware fingerprint and state.

Samples wait in memory and are written every `flush_seconds` in one transaction on a single worker
thread (SQLite is blocking); `stop()` flushes what is left (the current minute's Allocate counts too, which a
control plane back within that minute adds to), so a restart loses only an unclean exit's last interval. Compaction (downsampling and retention) runs on the same thread once a minute.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import time

from controlplane.controllers import autoscale_freshness
from controlplane.forecast import fleet_series
from controlplane.forecast.history import HistoryStore
from controlplane.forecast.interactions import InteractionLog
from controlplane.loops import PeriodicTask
from gpumesh.v1 import deployment_service_pb2 as D
from mesh.logs import log

logger = logging.getLogger(__name__)
GPU_METRICS = ("utilization", "memory_used", "memory_total", "temperature", "power", "memory_pressure",
               "thermal_state")
LOAD_FIELDS = (("requests_running", "requests_running"), ("requests_waiting", "requests_waiting"),
               ("prompt_tokens_per_second", "prompt_tokens_per_second"),
               ("generation_tokens_per_second", "generation_tokens_per_second"))
PENDING_LIMIT = 1_000_000      # samples kept in memory when the disk is slow; the oldest go first


class HistoryRecorder:
    def __init__(self, store: HistoryStore, flush_seconds: float = 5.0, sample_seconds: float = 5.0,
                 clock=time.time, quiet_keep: float | None = None,
                 load_max_age: float = autoscale_freshness.DEFAULT_MAX_AGE_S) -> None:
        self.store = store
        self.load_max_age = load_max_age        # a replica's reading received longer ago is stale (0: no bound)
        self.flush_seconds = flush_seconds
        self.sample_seconds = sample_seconds
        self.clock = clock
        self.pending: collections.deque = collections.deque(maxlen=PENDING_LIMIT)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")
        self.deployments = None
        self.counts: dict[tuple[str, str, str, str], int] = {}     # this minute's Allocate counts
        # key -> the last minute it counted a request: a quiet minute records 0 for it, until it has been quiet
        # for `quiet_keep` seconds (the store's longest retention by default: by then the store holds nothing of
        # it but those zeros). Kept for ever, every tenant, MIG profile and GPU model ever asked for got its
        # zero each minute for good, the set and the writes growing with churn.
        self.counted: dict[tuple[str, str, str, str], int] = {}
        self.quiet_keep = max(t.keep for t in store.tiers) if quiet_keep is None else quiet_keep   # (any tier's)
        self.minute = int(self.clock() // 60)
        # the minute this recorder started in, seen only in part: its counts are added to what is stored (the
        # part before a restart, written by stop()), as is the part of the minute stop() writes
        self._first_minute = self.minute
        self.pending_counts: list[tuple] = []
        self._loop = PeriodicTask("history", self._pass, on_error=self._pass_failed,
                                  interval=lambda: min(self.flush_seconds, self.sample_seconds))
        self._next_sample = 0.0                 # when the deployments' load is sampled next (clock seconds)
        self._last_compact = 0.0
        self.interactions = InteractionLog(store)
        self.fleet = None
        self.workloads = None                # controlplane/controllers/workloads.py WorkloadManager
        self.entries: dict[str, tuple] = {}  # workload -> the last interaction row written (changes only)
        self.pending_entries: dict[str, fleet_series.Interaction] = {}
        self._by_node: dict[str, list] | None = None
        self.latest: dict[str, list[tuple]] = {}      # node -> its last reading's slice, node and workload rows
        self._by_node_at = 0.0

    # -- sources ------------------------------------------------------------------------------

    def attach(self, telemetry, slices_ctl, deployments=None, workloads=None) -> None:
        telemetry.reading_listeners.append(self.on_gpu)
        if hasattr(telemetry, "node_listeners"):
            telemetry.node_listeners.append(self.on_node)
        slices_ctl.request_listeners.append(self.on_request)
        self.deployments = deployments
        self.fleet = getattr(slices_ctl, "fleet", None)
        self.workloads = workloads

    def on_node(self, node: str, t) -> None:
        """One node reading (types_pb2.NodeTelemetry), after its GPUs were judged: slice, node and workload
        series, and the interaction-log entries of the node's workloads."""
        entry = self.fleet.nodes.get(node) if self.fleet is not None else None
        if entry is None:
            return
        at = t.at.ToNanoseconds() / 1e9 if t.HasField("at") else self.clock()
        rows, uses = fleet_series.node_samples(entry, t, at)
        ws = self._workloads_on(node)
        rows += fleet_series.workload_samples(uses, ws, at)
        self.pending.extend(rows)
        self.latest[node] = rows
        self.note_workloads(ws, entry)

    def latest_rows(self) -> list[tuple[str, tuple]]:
        """(node, row) of every node's last reading (the control plane's per-slice, per-node and
        per-workload gauges); nodes no longer in the fleet are forgotten."""
        if self.fleet is not None:
            for gone in set(self.latest) - set(self.fleet.nodes):
                del self.latest[gone]
        return [(node, r) for node, rows in self.latest.items() for r in rows]

    def _workloads_on(self, node: str) -> list:
        """The workloads on `node`, from an index rebuilt at most once a second (a scan of every workload
        per node reading would grow with nodes x workloads)."""
        if self.workloads is None:
            return []
        now = self.clock()
        if self._by_node is None or now - self._by_node_at >= 1.0:
            by_node: dict[str, list] = {}
            for w in list(getattr(self.workloads, "workloads", {}).values()):
                by_node.setdefault(w.node, []).append(w)
            self._by_node, self._by_node_at = by_node, now
        return self._by_node.get(node, [])

    def note_workloads(self, ws, entry=None) -> None:
        """Queue the interaction entries of `ws` whose state, labels or placement changed."""
        now = self.clock()
        for w in ws:
            s = self.fleet.slices.get(w.slice_id) if self.fleet is not None else None
            e = fleet_series.interaction(w, s, entry if entry is not None else
                                         (self.fleet.nodes.get(w.node) if self.fleet is not None else None), now)
            # rewritten on a change, and hourly while it runs (its `updated` keeps it from expiring)
            key = e.row()[:11] + (0 if e.ended else int(now // 3600),)
            if self.entries.get(w.id) != key:
                self.entries[w.id] = key
                self.pending_entries[w.id] = e

    def add(self, kind: str, name: str, metric: str, value: float, tenant: str = "", at: float | None = None) -> None:
        self.pending.append((kind, name, metric, tenant, self.clock() if at is None else at, float(value)))

    def on_gpu(self, g, r) -> None:
        """One GPU reading (types_pb2.GpuTelemetry, with the control plane's judgement filled in)."""
        at = r.at.ToNanoseconds() / 1e9 if r.HasField("at") else self.clock()
        name = f"{g.node}/{g.index}"
        for metric, value in zip(GPU_METRICS, (r.utilization_pct, r.memory_used_bytes,
                                               r.memory_total_bytes or g.memory_bytes, r.temperature_c, r.power_w,
                                               max(0, r.memory_pressure - 1), max(0, r.thermal_state - 1))):
            self.add("gpu", name, metric, value, at=at)

    def on_request(self, req) -> None:
        """One Allocate request (mesh.slicespec.SliceRequest), counted into this minute."""
        self._roll()
        size = req.mig_profile or (f"{req.memory_bytes >> 30}GiB" if req.memory_bytes else "any")
        for key in (("fleet", "allocate", "requests", ""), ("tenant", req.tenant, "requests", req.tenant),
                    ("fleet", f"profile/{size}", "requests", ""),
                    ("fleet", f"gpu_model/{req.gpu_model or 'any'}", "requests", "")):
            self.counts[key] = self.counts.get(key, 0) + req.count
            self.counted[key] = self.minute

    def _roll(self) -> None:
        minute = int(self.clock() // 60)
        if minute == self.minute:
            return
        keep = math.ceil(self.quiet_keep / 60)       # minutes a key stays quiet before it is dropped
        for m in range(self.minute, min(minute, self.minute + 60)):      # at most an hour of quiet zeros
            for key, last in self.counted.items():
                if m - last <= keep:
                    if m == self._first_minute:
                        self.pending_counts.append((*key[:3], key[3], m * 60.0, self.counts.get(key, 0)))
                    else:
                        self.add(key[0], key[1], key[2], self.counts.get(key, 0) if m == self.minute else 0,
                                 key[3], m * 60.0)
        self.counts.clear()
        self.minute = minute
        for key in [k for k, last in self.counted.items() if minute - last > keep]:
            del self.counted[key]

    def sample_deployments(self) -> None:
        dm = self.deployments
        if dm is None:
            return
        st = dm.store
        now = self.clock()
        for name, d in list(st.deployments.items()):
            reps = list(st.replicas.get(name, {}).values())
            tenant = d.spec.tenant
            self.add("deployment", name, "replicas", len(reps), tenant)
            loads = self._known_loads(now, reps, st)
            if not loads:
                continue
            for metric, attr in LOAD_FIELDS:
                self.add("deployment", name, metric, sum(getattr(x, attr) for x in loads), tenant)

    def _known_loads(self, now: float, reps: list, st) -> list | None:
        """The READY replicas' readings of their current workload to sum; None when the deployment's load is unknown
        (a READY replica's reading is stale, or of a scrape that failed: its value would be false) or no READY
        replica was read. A READY replica with no reading of its current workload yet counts none."""
        gap = autoscale_freshness.gaps(now, reps, st.loads, getattr(st, "load_seen", {}), self.load_max_age)
        if gap.stale or gap.unscraped:
            return None
        return [st.loads[r.id] for r in reps if r.state == D.REPLICA_STATE_READY and r.id not in gap.absent]

    # -- flushing -----------------------------------------------------------------------------

    def start(self) -> None:
        self._next_sample = 0.0
        self._loop.start()

    async def _pass(self) -> None:
        now = self.clock()
        if now >= self._next_sample:
            self.sample_deployments()
            if self.workloads is not None:      # a workload that ended between node readings
                known = self.workloads.workloads
                self.note_workloads([w for w in known.values()
                                     if w.state in fleet_series.TERMINAL and w.id in self.entries])
                for wid in [wid for wid in self.entries if wid not in known]:
                    del self.entries[wid]
            self._next_sample = now + self.sample_seconds
        self._roll()
        await self.flush()
        if now - self._last_compact >= 60:
            self._last_compact = now
            await self._run(self.store.compact, now)
            await self._run(self.interactions.expire, now, self.store.tiers[-1].keep)

    @staticmethod
    def _pass_failed(e: Exception) -> None:   # history never stops the control plane
        log(logger, logging.WARNING, "history flush failed; retrying", error=repr(e))

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _write(self, fn, *args):
        """`_run` for a write of what was taken from memory: it goes on when the pass awaiting it is cancelled
        (stop() cancels the loop where it waits). A cancelled run_in_executor future whose job still waited
        its turn (behind a store read) was dropped from the pool's queue, and the batch with it; stop()'s own
        flush is queued after this one on the single history thread."""
        return await asyncio.shield(asyncio.get_running_loop().run_in_executor(self.pool, fn, *args))

    async def flush(self) -> int:
        entries = list(self.pending_entries.values())
        self.pending_entries.clear()
        if entries:
            try:
                await self._write(self.interactions.upsert, entries)
            except Exception:
                for e in entries:
                    self.pending_entries.setdefault(e.workload, e)
                raise
        counts, self.pending_counts = self.pending_counts, []
        if counts:
            try:
                await self._write(self.store.add_counts, counts)
            except Exception:
                self.pending_counts[:0] = counts
                raise
        batch = list(self.pending)
        self.pending.clear()
        if not batch:
            return 0
        try:
            return await self._write(self.store.write, batch)
        except Exception:
            # kept for the next try, before what came meanwhile; past the limit the oldest go (extendleft on the
            # full deque dropped the newest instead)
            kept = collections.deque(batch, maxlen=self.pending.maxlen)
            kept.extend(self.pending)
            self.pending = kept
            raise

    async def read(self, fn, *args):
        """Run a store read on the history thread (never on the event loop)."""
        return await self._run(fn, *args)

    async def stop(self) -> None:
        await self._loop.stop()
        self._roll()
        # the current minute's count so far (written when the minute ended, it was lost with every stop); a
        # control plane back within this minute adds its part to it
        self.pending_counts += [(*key[:3], key[3], self.minute * 60.0, n) for key, n in self.counts.items()]
        self.counts.clear()
        try:
            await self.flush()
        finally:
            await self._run(self.store.close)
            self.pool.shutdown(wait=True)
