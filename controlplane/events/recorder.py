"""Recording events: cheap for the caller, durable through the leader's writer, repeats coalesced.

`emit(kind, name, type, reason, message)` returns at once: it never waits for etcd and never raises
into the operation that emits. Like Kubernetes' event correlator, a repeat of an event (same object,
type, reason, message and tenant) within `coalesce_seconds` of its last occurrence is not a new
record: the existing one's `count` goes up and its `last_timestamp` moves. A flusher task writes what
changed (one Put per event, however often it repeated meanwhile) through the group-commit writer
every `flush_delay` seconds, then puts it in the `EventLog`, which tells the watchers. At most
`max_pending` distinct events wait for a write; beyond that new ones are dropped and counted
(`gpumesh_events_dropped_total`), so a storm of events cannot grow memory or delay real writes.

Retention (controlplane/controllers/retention.py) deletes events older than
`events_retention_seconds` and the oldest beyond `events_kept`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time

from prometheus_client import Counter

from controlplane.events.log import EventLog, seconds
from controlplane.loops import PeriodicTask
from controlplane.state import keys
from controlplane.state.store import Put
from gpumesh.v1 import event_service_pb2 as E
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)
NORMAL, WARNING = "Normal", "Warning"
TYPES = (NORMAL, WARNING)
MAX_MESSAGE = 1024
MAX_OPS = 100
RECENT = 20_000           # coalescing keys remembered (the newest)

EMITTED = Counter("gpumesh_events_total", "Events emitted (repeats included)", ["type", "reason"])
DROPPED = Counter("gpumesh_events_dropped_total", "Events dropped because too many waited to be written")
WRITE_ERRORS = Counter("gpumesh_event_write_errors_total", "Events whose etcd write failed (lost)")


def _ts(at: float, ts) -> None:
    ts.FromNanoseconds(int(at * 1e9))


class NullRecorder:
    """Where nothing records (a standby's read-only controller, unit tests): emit does nothing."""

    def emit(self, kind: str, name: str, type: str, reason: str, message: str, *, tenant: str = "",
             node: str = "", source: str = "") -> None:
        return None


class Recorder:
    def __init__(self, writer, event_log: EventLog, *, source: str = "controlplane", clock=time.time,
                 coalesce_seconds: float = 600.0, max_pending: int = 10_000, flush_delay: float = 0.05) -> None:
        self.writer = writer
        self.log = event_log
        self.source = source
        self.clock = clock
        self.coalesce_seconds = coalesce_seconds
        self.max_pending = max_pending
        self.flush_delay = flush_delay
        self.pending: dict[str, E.Event] = {}            # id -> newest version, not yet written
        self.inflight: set[str] = set()
        self.latest: collections.OrderedDict[tuple, E.Event] = collections.OrderedDict()
        self._wake = asyncio.Event()
        # a write each time events arrive (woken by emit), of all that came within flush_delay
        self._loop = PeriodicTask("event-recorder", self._write_pending, interval=None, wake=self._wake,
                                  on_error=self._write_failed)

    # -- the API other components call -------------------------------------------------------

    def emit(self, kind: str, name: str, type: str, reason: str, message: str, *, tenant: str = "",
             node: str = "", source: str = "") -> None:
        """Record that `reason` happened to the object `kind`/`name` (type "Normal" or "Warning").
        Returns at once; never raises."""
        try:
            self._emit(kind, name, type, reason, message, tenant, node, source)
        except Exception:  # noqa: BLE001 - an event must never break the operation that emits it
            logger.exception("recording an event failed")

    def _emit(self, kind, name, type, reason, message, tenant, node, source) -> None:
        if type not in TYPES:
            type = WARNING
        message = message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."
        now = self.clock()
        EMITTED.labels(type, reason).inc()
        key = (kind, name, type, reason, message, tenant)
        prev = self.latest.get(key)
        if prev is not None and not self._alive(prev.id):
            prev = None
        ev = E.Event()
        if prev is not None and now - seconds(prev.last_timestamp) <= self.coalesce_seconds:
            ev.CopyFrom(prev)
            ev.count += 1
            self.latest.move_to_end(key)
        else:
            ev.id = f"ev-{secrets.token_hex(8)}"
            ev.kind, ev.name, ev.tenant, ev.type, ev.reason, ev.message = kind, name, tenant, type, reason, message
            ev.count = 1
            ev.node = node
            ev.source = source or self.source
            _ts(now, ev.first_timestamp)
        _ts(now, ev.last_timestamp)
        if ev.id not in self.pending and len(self.pending) >= self.max_pending:
            DROPPED.inc()
            return
        self.latest[key] = ev
        while len(self.latest) > RECENT:
            self.latest.popitem(last=False)
        self.pending[ev.id] = ev
        self._wake.set()

    def _alive(self, event_id: str) -> bool:
        """Still recorded (or about to be): not expired by retention meanwhile."""
        return event_id in self.log.events or event_id in self.pending or event_id in self.inflight

    # -- loading and writing -----------------------------------------------------------------

    async def load(self, store) -> None:
        """The recorded events (a new leader): into the log, and their keys for coalescing."""
        snap = await store.load(keys.EVENTS)
        for _key, (value, _rev, _lease) in snap.kvs.items():
            ev = E.Event.FromString(value)
            self.log.events[ev.id] = ev
        for ev in self.log.oldest_first()[-RECENT:]:
            self.latest[(ev.kind, ev.name, ev.type, ev.reason, ev.message, ev.tenant)] = ev

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        """Write what is pending (best effort), then stop."""
        await self._loop.stop()
        if self.pending and not self.writer.failed:
            try:
                await asyncio.wait_for(self.flush(), 2.0)
            except (asyncio.TimeoutError, errors.MeshError):
                pass

    async def _write_pending(self) -> None:
        await asyncio.sleep(self.flush_delay)       # gather the events of this moment into one write
        await self.flush()

    @staticmethod
    def _write_failed(e: Exception) -> None:   # flush() handles etcd errors itself: this is a bug
        log(logger, logging.ERROR, "event recorder: a write failed; writing again at the next event", error=repr(e))

    async def flush(self) -> int:
        """Write every pending event; returns how many were written."""
        batch, self.pending = list(self.pending.values()), {}
        written = 0
        for i in range(0, len(batch), MAX_OPS):
            chunk = batch[i:i + MAX_OPS]
            self.inflight.update(ev.id for ev in chunk)
            try:
                await self.writer.write([Put(keys.event(ev.id), ev.SerializeToString()) for ev in chunk])
            except errors.MeshError as e:
                WRITE_ERRORS.inc(len(chunk))
                log(logger, logging.WARNING, "events could not be written; they are lost", events=len(chunk),
                    error=str(e))
                continue
            finally:
                self.inflight.difference_update(ev.id for ev in chunk)
            for ev in chunk:
                if ev.id not in self.pending:       # a newer version waits: that one is put once written
                    self.log.put(ev)
            written += len(chunk)
        return written
