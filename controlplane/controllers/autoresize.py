"""Grow before the need (rule 3 of the orchestrator): slices whose client opted in are resized
ahead of their forecast memory use, through the resize machinery (`MigrationManager.resize`:
MPS and time-share in place, MIG by migration to the smallest profile that holds the new size).

Opt-in and bounds are the slice's labels (set at Allocate):

    gpumesh.io/autoresize: "true"
    gpumesh.io/autoresize-min-gib: "10"     # never below (default: 1 GiB)
    gpumesh.io/autoresize-max-gib: "40"     # never above (default: the GPU's memory)

The demand is the slice's memory used as its agent reports it (slice telemetry), forecast at the load
step and horizon; sizes in GiB, whole GiB. The tenant's `max_memory_bytes` quota bounds growth.
A slice resized is left alone for `orchestrator_resize_cooldown_seconds`: from when a resize was started
(in memory) or from the slice's `resized_at` (its etcd record: any resize that changed it, this leader's or
the last one's, so a new leader does not resize at once a slice the old one just resized).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.logs import log
from mesh.orchestrator import ResizePolicy, SliceView, resize_actions

logger = logging.getLogger(__name__)
OPT_IN = "gpumesh.io/autoresize"
MIN_LABEL = "gpumesh.io/autoresize-min-gib"
MAX_LABEL = "gpumesh.io/autoresize-max-gib"
GiB = 1 << 30


def _gib(labels, key: str, default: float) -> float:
    try:
        v = float(labels.get(key, ""))
        return v if math.isfinite(v) and v > 0 else default
    except ValueError:
        return default


def opted_in(s: types_pb2.Slice) -> bool:
    return s.labels.get(OPT_IN) == "true" and s.state == types_pb2.SLICE_STATE_READY


def quota_left_gib(ctl, tenant: str) -> float:
    fw = getattr(ctl, "scheduler", None)
    for p in getattr(fw, "pre_filters", ()):
        if getattr(p, "NAME", "") == "TenantQuota":
            q = p.tenants.get(tenant, p.default)
            if "max_memory_bytes" in q:
                used = ctl.fleet.tenant_usage(tenant)[1]
                return max(0.0, (q["max_memory_bytes"] - used) / GiB)
    return math.inf


def slice_views(ctl) -> list[SliceView]:
    out = []
    for s in ctl.fleet.slices.values():
        if not opted_in(s):
            continue
        g = ctl.fleet.gpu(s.node, s.gpu_index)
        gpu_gib = g.memory_bytes / GiB if g is not None else math.inf
        out.append(SliceView(s.id, s.memory_bytes / GiB, True, min_size=_gib(s.labels, MIN_LABEL, 1.0),
                             max_size=min(_gib(s.labels, MAX_LABEL, gpu_gib), gpu_gib),
                             quota_left=quota_left_gib(ctl, s.tenant), granularity=1.0))
    return out


class ResizePass:
    def __init__(self, ctl, migrations, settings, clock=time.time) -> None:
        self.ctl, self.migrations, self.s = ctl, migrations, settings
        self.clock = clock
        self.last: dict[str, float] = {}       # slice id -> when the orchestrator last resized it
        # slice id -> its resize under way: a MIG resize is a live migration (minutes), so it runs beside the
        # orchestrator's passes; awaited in the pass, it held warm slices and moves for as long as it took
        self.running: dict[str, asyncio.Task] = {}

    def decide(self, forecasts: dict) -> list:
        """(action, forecast) per resize; `forecasts`: slice id -> Forecast of memory_used (bytes)."""
        now = self.clock()
        for sid in [sid for sid, t in self.last.items() if now - t >= self.s.resize_cooldown_s]:
            del self.last[sid]          # cooled down (or released): kept no longer, so it never grows
        hi = {sid: [v / GiB for v in f.hi] for sid, f in forecasts.items()
              if sid not in self.last and not self._cooling(sid, now)}
        policy = ResizePolicy(headroom=self.s.resize_headroom, shrink_band=self.s.resize_shrink_band)
        return [(a, forecasts[a.subject]) for a in resize_actions(slice_views(self.ctl), hi, policy)]

    def _cooling(self, sid: str, now: float) -> bool:
        """Whether the slice's record says it was resized less than the cooldown ago."""
        s = self.ctl.fleet.slices.get(sid)
        if s is None or not s.HasField("resized_at"):
            return False
        return now - s.resized_at.ToNanoseconds() / 1e9 < self.s.resize_cooldown_s

    async def act(self, decisions) -> int:
        """Start the resizes (each in its own task, the slice's cooldown from its start); how many started."""
        started = 0
        for a, f in decisions:
            s = self.ctl.fleet.slices.get(a.subject)
            if s is None or a.subject in self.running:
                continue
            self.last[a.subject] = self.clock()
            task = asyncio.create_task(self._resize(a, f, s), name=f"autoresize-{a.subject}")
            self.running[a.subject] = task
            task.add_done_callback(lambda _, sid=a.subject: self.running.pop(sid, None))
            started += 1
        await asyncio.sleep(0)        # each has begun (an in-place resize is done at its first write)
        return started

    async def _resize(self, a, f, s) -> bool:
        what = (f"memory used now {f.last / GiB:.2f} GiB, forecast {f.points[-1] / GiB:.2f} GiB "
                f"[{min(f.lo) / GiB:.2f}, {f.peak_hi / GiB:.2f}] over the next {len(f.hi) * f.step_s:g}s ({f.model})")
        try:
            await self.migrations.resize(a.subject, int(a.size * GiB), 0.0)
        except errors.MeshError as e:
            log(logger, logging.WARNING, "orchestrator: resize refused", slice=a.subject, error=str(e))
            self.ctl.recorder.emit("Slice", a.subject, "Warning", "AutoResizeFailed", f"{what}; {a.reason}: {e}",
                                   tenant=s.tenant, node=s.node, source="orchestrator")
            return False
        except Exception as e:  # noqa: BLE001 - a task: said, never lost silently
            log(logger, logging.ERROR, "orchestrator: resize failed", slice=a.subject, error=repr(e))
            return False
        self.ctl.recorder.emit("Slice", a.subject, "Normal", "AutoGrow" if a.kind == "grow" else "AutoShrink",
                               f"{what}; {a.reason}", tenant=s.tenant, node=s.node, source="orchestrator")
        return True

    async def settle(self) -> None:
        """Wait for the resizes under way (tests)."""
        while self.running:
            await asyncio.wait(list(self.running.values()))

    async def stop(self) -> None:
        """Stop waiting for them (a resize by migration goes on in the MigrationManager; a new leader recovers
        it from its record)."""
        tasks = list(self.running.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
