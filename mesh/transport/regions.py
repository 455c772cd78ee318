"""The data plane's table of served regions: their keys, connection scopes, revocations and damage.

A `Region` is one buffer the agent serves (its bytes, key, base address, the
connection it belongs to, its SEND inbox). `RegionTable` adds and revokes them
(a revoked key answers REVOKED for a while, `REVOKED_KEPT` of them), finds one
for a request's key within the channel's scope (keys of other connections read
as unknown), and marks a region over a tenant's shared memory segment damaged
when the tenant shrank it (counted in `gpumesh_mesh_buffers_damaged_total`,
logged, reported through `on_damaged`). `mesh.transport.dataplane` serves them.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
from dataclasses import dataclass, field

from prometheus_client import Counter

from mesh.logs import log
from mesh.transport.base import BufferDamaged, TransportError, new_key
from mesh.transport.segment import Segment
from mesh.transport.wire import INVALID_KEY, OK, REVOKED, REVOKED_KEPT

logger = logging.getLogger(__name__)
DAMAGED_BUFFERS = Counter("gpumesh_mesh_buffers_damaged_total", "Mesh buffers found damaged by a process that maps "
                          "their segment (reason: shrunk, header)", ["reason"])


@dataclass
class Region:
    buffer_id: str
    slice_id: str
    rkey: int
    base: int
    data: memoryview
    scope: str = ""             # the connection it belongs to ("" when registered without a secret)
    secret: bytes = b""         # the connection's secret (channels authenticate with it)
    local_only: bool = False    # RDMA buffers: one-sided access from this host only (peers use RDMA)
    segment: Segment | None = None   # the tenant's shm segment under `data`: reached by system calls only
    tenant: str = ""            # whose segment it is (for the log line when it is damaged)
    damaged: str = ""           # why its segment can no longer be used ("": it can)
    inbox: collections.deque = field(default_factory=collections.deque)
    queued: int = 0             # bytes of SEND messages in `inbox` or being received into it (under `cond`)
    cond: threading.Condition = field(default_factory=threading.Condition)
    length: int = field(init=False)     # kept: a deregistration releases `data` while requests may read this

    def __post_init__(self) -> None:
        self.length = self.data.nbytes


def slice_of(region: Region, off: int, length: int) -> memoryview | None:
    """The region's bytes [off, off+length), taken once per request: a deregistration releases `region.data`
    (remove()), not this slice, so a copy under way finishes; None when it was released before."""
    try:
        return region.data[off:off + length]
    except ValueError:
        return None


class RegionTable:
    """The regions a data plane serves, by key and by buffer id, and the keys revoked lately."""

    def __init__(self, on_damaged=None) -> None:
        """`on_damaged(region, error)`: called (in a serving thread) when a region is first found damaged."""
        self.on_damaged = on_damaged
        self.by_key: dict[int, Region] = {}
        self.by_id: dict[str, Region] = {}
        self.revoked: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, buffer_id: str, slice_id: str, data, rkey: int = 0, base: int = 0, *, scope: str = "",
            secret: bytes = b"", local_only: bool = False, segment: Segment | None = None,
            tenant: str = "") -> Region:
        """Serve `data` (a writable bytes-like) under a key; the region (with its base address:
        `base`, e.g. a verbs MR's address, or a random one). With `secret`, only channels that
        authenticated with it for a buffer of `scope` (the connection) reach it. `segment`: `data` is
        the mapping of that shared memory segment, which another process (`tenant`'s) can shrink."""
        mv = memoryview(data).cast("B")
        if mv.readonly:
            raise TransportError(f"buffer {buffer_id} is read-only", op="register", buffer_id=buffer_id)
        if bool(scope) != bool(secret):
            raise TransportError(f"buffer {buffer_id}: a scope needs a secret and a secret a scope", op="register",
                                 buffer_id=buffer_id)
        base = base or (secrets.randbits(32) + 1) << 16
        region = Region(buffer_id, slice_id, rkey or new_key(), base, mv, scope, secret, local_only, segment,
                        tenant)
        with self._lock:
            self.by_key[region.rkey] = region
            self.by_id[buffer_id] = region
        return region

    def secret_of(self, buffer_id: str) -> tuple[str, bytes] | None:
        """The scope and secret a channel to `buffer_id` authenticates with (None: the buffer has none)."""
        region = self.by_id.get(buffer_id)
        return (region.scope, region.secret) if region is not None and region.secret else None

    def remove(self, rkey: int) -> None:
        """Revoke a key: later requests with it answer REVOKED; waiting receivers wake up."""
        with self._lock:
            region = self.by_key.pop(rkey, None)
            if region is None:
                return
            if self.by_id.get(region.buffer_id) is region:
                del self.by_id[region.buffer_id]
            self.revoked[rkey] = (region.buffer_id, region.scope)
            while len(self.revoked) > REVOKED_KEPT:
                self.revoked.popitem(last=False)
        with region.cond:
            region.queued -= sum(len(m) for m in region.inbox)
            region.inbox.clear()
            region.cond.notify_all()
        try:
            region.data.release()     # in-flight operations keep their own slices of it
        except BufferError:
            pass

    def lookup(self, rkey: int, scope: str) -> tuple[Region | None, int, str]:
        """The region a request's key names within the channel's `scope`, or the status and message to answer."""
        region = self.by_key.get(rkey)
        if region is not None and region.scope == scope:
            return region, OK, ""
        gone = self.revoked.get(rkey)
        if region is None and gone is not None and gone[1] == scope:
            return None, REVOKED, f"buffer {gone[0]} was deregistered"
        return None, INVALID_KEY, "no region has this key"     # also: a key of another connection

    def mark_damaged(self, region: Region, e: BufferDamaged) -> None:
        """From now on `region`'s one-sided operations answer DAMAGED; the first time: counted, logged, reported."""
        with self._lock:
            first, region.damaged = not region.damaged, region.damaged or e.message
        if first:
            DAMAGED_BUFFERS.labels(e.reason or "shrunk").inc()
            log(logger, logging.WARNING, "mesh buffer damaged by a process that maps its segment: its one-sided "
                "operations fail from now on", buffer=region.buffer_id, slice=region.slice_id, tenant=region.tenant,
                size=e.size, expected=e.expected, reason=e.reason, op=e.op)
            if self.on_damaged is not None:
                self.on_damaged(region, e)
