"""The control plane's in-memory view of the fleet: nodes, their GPUs, and
what each GPU has promised to slices.

It is rebuilt from etcd at start and kept current by the writes this process
commits; the scheduler reads it synchronously (no awaits), and a placement is
"assumed" here before its etcd write so that concurrent requests never see the
same free capacity.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

from gpumesh.v1 import types_pb2

from controlplane.state import drainpairs
from mesh import gpumodels, replacing

MIB = 1 << 20

ISOLATION_NAMES = {
    types_pb2.ISOLATION_MIG: "mig",
    types_pb2.ISOLATION_MPS: "mps",
    types_pb2.ISOLATION_TIMESHARE: "timeshare",
    types_pb2.ISOLATION_EXCLUSIVE: "exclusive",
}


@functools.lru_cache(maxsize=None)
def _smallest_profile(model: gpumodels.GpuModel) -> str:
    return min(model.mig_profiles, key=lambda p: (p.memory_slices, p.compute_slices, p.media_extensions)).name


@dataclass
class GpuState:
    node: str
    index: int
    uuid: str
    model: gpumodels.GpuModel
    mig_enabled: bool
    memory_bytes: int
    nvlink_domain: int
    slices: dict[str, types_pb2.Slice] = field(default_factory=dict)
    mig_layout: list[tuple[str, int]] = field(default_factory=list)
    allocated_memory: int = 0
    allocated_compute: float = 0.0
    _free: dict[str, list[int]] = field(default_factory=dict)   # profile -> free starts (cache)
    _used_slots: int = 0
    fill_index: "FillIndex | None" = None
    bucket: int = 0
    # Derived from the agent's telemetry (controlplane/controllers/telemetry.py); the scheduler reads them.
    memory_pressure: str = "low"        # low | normal | high | critical
    thermal_state: str = "normal"       # normal | warning | throttling | critical
    health: str = "healthy"             # healthy | unhealthy | lost | quarantined (controlplane/controllers/health.py)
    telemetry: types_pb2.GpuTelemetry | None = None
    owner: "NodeEntry | None" = field(default=None, repr=False, compare=False)
    # values derived from the state above (state_key, the scheduler's free capacity), dropped on change
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name in _GPU_WATCHED:
            self.__dict__["derived"] = {}
            owner = self.__dict__.get("owner")
            if owner is not None:
                owner._sig = owner.sid = None

    def state_key(self) -> tuple:
        """Everything the scheduler's cacheable plugins look at (equal keys: interchangeable GPUs)."""
        key = self.derived.get("key")
        if key is None:
            key = self.derived["key"] = self._state_key()
        return key

    def _state_key(self) -> tuple:
        return (self.model.name, self.mig_enabled, self.memory_bytes, self.allocated_memory,
                round(self.allocated_compute, 6), self.sharing, tuple(sorted(self.mig_layout)), self.nvlink_domain,
                self.health, self.memory_pressure, self.thermal_state)

    @property
    def fill(self) -> int:
        """How full the GPU is, 0-10 (best fit looks at the fullest GPUs first); -1 when it
        cannot take any slice at all (skipped by the scan)."""
        if self.mig_enabled:
            # nothing fits when the smallest profile (fewest memory and compute slices) does not
            if self.mig_layout and not self.free_starts(_smallest_profile(self.model)):
                return -1
            return self._used_slots * 10 // gpumodels.MIG_MEMORY_SLOTS
        if self.allocated_memory >= self.memory_bytes or self.sharing == "exclusive":
            return -1
        return min(10, self.allocated_memory * 10 // max(1, self.memory_bytes))

    def _reindex(self) -> None:
        self.derived = {}
        owner = self.owner
        if owner is not None:
            owner._sig = owner.sid = None
        if self.fill_index is not None:
            self.fill_index.move(self)

    @property
    def sharing(self) -> str | None:
        """The isolation of the slices on this GPU (one kind at a time), None when free."""
        for s in self.slices.values():
            return ISOLATION_NAMES.get(s.isolation)
        return None

    @property
    def used_slots(self) -> int:
        return self._used_slots

    def free_starts(self, profile: str) -> list[int]:
        """Start slots where `profile` fits now (cached until the layout changes)."""
        got = self._free.get(profile)
        if got is None:
            got = self._free[profile] = gpumodels.free_starts(self.model, self.mig_layout, profile)
        return got

    def _layout_changed(self) -> None:
        self._free.clear()
        self._used_slots = sum(self.model.profile(p).memory_slices for p, _ in self.mig_layout)

    def add(self, s: types_pb2.Slice) -> None:
        if s.id in self.slices:
            self.remove(s.id)
        self.slices[s.id] = s
        self.allocated_memory += s.memory_bytes
        self.allocated_compute += s.compute_share
        if s.isolation == types_pb2.ISOLATION_MIG and s.profile:
            self.mig_layout.append((s.profile, s.placement.start))
            self._layout_changed()
        self._reindex()

    def remove(self, slice_id: str) -> None:
        s = self.slices.pop(slice_id, None)
        if s is None:
            return
        self.allocated_memory -= s.memory_bytes
        self.allocated_compute -= s.compute_share
        if s.isolation == types_pb2.ISOLATION_MIG and s.profile:
            self.mig_layout.remove((s.profile, s.placement.start))
            self._layout_changed()
        self._reindex()


_SIG_IDS: dict[tuple, int] = {}
_SIG_COUNTER = itertools.count(1)
_SIG_LIMIT = 1_000_000
_GPU_WATCHED = frozenset({"health", "memory_pressure", "thermal_state", "mig_enabled", "memory_bytes",
                          "allocated_memory", "allocated_compute", "_used_slots"})
_NODE_WATCHED = frozenset({"record", "ready", "allocated_cpu_milli", "allocated_host_memory", "gpus"})


@dataclass
class NodeEntry:
    record: types_pb2.Node
    gpus: list[GpuState]
    ready: bool = False
    lease_id: int = 0
    # Host resources promised to slices on this node (capacity: record.inventory.cpu_milli/memory_bytes).
    allocated_cpu_milli: int = 0
    allocated_host_memory: int = 0
    _sig: tuple | None = field(default=None, repr=False, compare=False)
    sid: int | None = field(default=None, repr=False, compare=False)   # interned signature (signature_id)
    _perm: tuple = field(default=(), repr=False, compare=False)

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name in _NODE_WATCHED:
            object.__setattr__(self, "_sig", None)
            object.__setattr__(self, "sid", None)
            if name == "gpus":
                for g in value:
                    g.owner = self

    def __post_init__(self) -> None:
        for g in self.gpus:
            g.owner = self

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def cpu_free(self) -> int:
        return self.record.inventory.cpu_milli - self.allocated_cpu_milli

    @property
    def host_memory_free(self) -> int:
        return self.record.inventory.memory_bytes - self.allocated_host_memory

    def signature(self) -> tuple:
        """The node's schedulable state, GPUs in a canonical order (`gpu_order()`): two nodes with
        equal signatures are interchangeable to every cacheable scheduler plugin. Cached until a
        slice, a host resource, cordon/readiness or a GPU's health/pressure changes."""
        sig = self._sig
        if sig is None:
            keys = [(g.state_key(), g.index, i) for i, g in enumerate(self.gpus)]
            keys.sort()
            inv = self.record.inventory
            rails = tuple(tuple(n.gpus) for n in inv.nics) if inv.nics else ()
            sig = (self.ready, self.record.cordoned, inv.cpu_milli, inv.memory_bytes,
                   self.allocated_cpu_milli, self.allocated_host_memory, tuple(k[0] for k in keys), rails)
            object.__setattr__(self, "_perm", tuple(k[2] for k in keys))
            object.__setattr__(self, "_sig", sig)
        return sig

    def signature_id(self) -> int:
        """A small integer standing for `signature()` (equal signatures, equal ids while the intern
        table lasts), cheap to hash on the scheduler's per-node path."""
        sid = self.sid
        if sid is None:
            sig = self.signature()
            sid = _SIG_IDS.get(sig)
            if sid is None:
                if len(_SIG_IDS) >= _SIG_LIMIT:
                    _SIG_IDS.clear()   # ids are never reused, so stale cache entries just miss
                sid = _SIG_IDS[sig] = next(_SIG_COUNTER)
            object.__setattr__(self, "sid", sid)
        return sid

    def gpu_order(self) -> tuple:
        """Positions in `gpus` in the signature's order."""
        self.signature()
        return self._perm

    @property
    def schedulable(self) -> bool:
        return self.ready and not self.record.cordoned


def gpus_from_inventory(name: str, inv: types_pb2.NodeInventory) -> list[GpuState]:
    out = []
    for g in inv.gpus:
        try:
            model = gpumodels.get_model(g.model)
        except KeyError:
            continue  # a GPU model this control plane does not know is not schedulable
        out.append(GpuState(node=name, index=g.index, uuid=g.uuid, model=model, mig_enabled=g.mig_enabled,
                            memory_bytes=g.memory_bytes or model.memory_mib * MIB,
                            nvlink_domain=g.nvlink_domain))
    return out


class FillIndex:
    """GPUs bucketed by fill (0-10), so best fit scans the fullest GPUs first and stops early."""

    def __init__(self) -> None:
        self.buckets: dict[int, dict[int, GpuState]] = {}

    def add(self, g: GpuState) -> None:
        g.fill_index, g.bucket = self, g.fill
        self.buckets.setdefault(g.bucket, {})[id(g)] = g

    def discard(self, g: GpuState) -> None:
        self.buckets.get(g.bucket, {}).pop(id(g), None)
        g.fill_index = None

    def move(self, g: GpuState) -> None:
        fill = g.fill
        if fill != g.bucket:
            self.buckets.get(g.bucket, {}).pop(id(g), None)
            g.bucket = fill
            self.buckets.setdefault(fill, {})[id(g)] = g

    def fullest_first(self):
        """Lists of GPUs, one per fill level, fullest first."""
        for fill in sorted(self.buckets, reverse=True):
            if fill >= 0 and self.buckets[fill]:
                yield list(self.buckets[fill].values())


class Fleet:
    def __init__(self) -> None:
        self.index = FillIndex()
        self.nodes: dict[str, NodeEntry] = {}
        self.slices: dict[str, types_pb2.Slice] = {}
        self.revisions: dict[str, int] = {}   # slice id -> etcd mod revision
        # tenant -> [slices, GPU memory bytes, GPUs (sum of compute shares)], for quotas
        self.usage: dict[str, list] = {}
        self.by_node: dict[str, dict[str, None]] = {}   # node -> ids of its slices (insertion order)
        self.by_allocation: dict[str, dict[str, None]] = {}  # allocation id -> ids of its slices
        # ids of the slices that replace another (a move's target, a drain's replacement replica: mesh/replacing.py),
        # and who says whether a move is live (target, source) -> bool: set by the migration manager; None: no
        # migration's pair counts once (a drain's replacement does: drainpairs.py)
        self.reservations: dict[str, None] = {}
        self.reservation_live = None

    # -- nodes ---------------------------------------------------------------------

    def upsert_node(self, record: types_pb2.Node) -> NodeEntry:
        entry = self.nodes.get(record.name)
        if entry is None:
            entry = NodeEntry(record=record, gpus=gpus_from_inventory(record.name, record.inventory))
            self.nodes[record.name] = entry
            for g in entry.gpus:
                self.index.add(g)
        else:
            if record.inventory != entry.record.inventory:
                for g in entry.gpus:
                    self.index.discard(g)
                old = {(g.index, g.uuid): g for g in entry.gpus}
                gpus = gpus_from_inventory(record.name, record.inventory)
                for g in gpus:
                    # the same GPU (index and UUID) keeps what the telemetry and health controllers judged of it:
                    # only a control-plane start restores that from etcd, so a quarantined GPU would otherwise be
                    # schedulable again after any change of its node's inventory (a re-registration)
                    o = old.get((g.index, g.uuid))
                    if o is not None:
                        g.health, g.memory_pressure, g.thermal_state = o.health, o.memory_pressure, o.thermal_state
                        g.telemetry = o.telemetry
                entry.gpus = gpus
                for g in entry.gpus:
                    self.index.add(g)
            entry.record = record
        entry.allocated_cpu_milli = entry.allocated_host_memory = 0
        for g in entry.gpus:
            g.slices.clear()
            g.mig_layout.clear()
            g._layout_changed()
            g.allocated_memory, g.allocated_compute = 0, 0.0
        for sid in self.by_node.get(record.name, ()):
            self._place(self.slices[sid])
        return entry

    def drop_node(self, name: str) -> NodeEntry | None:
        """Forget a node (deleted, controlplane/controllers/nodedelete.py): its GPUs leave the fill index.
        Its slices are dropped before (drop_slice); any left stay, placed nowhere."""
        entry = self.nodes.pop(name, None)
        if entry is not None:
            for g in entry.gpus:
                self.index.discard(g)
        if not self.by_node.get(name):
            self.by_node.pop(name, None)
        return entry

    def gpu(self, node: str, index: int) -> GpuState | None:
        entry = self.nodes.get(node)
        if entry is None:
            return None
        for g in entry.gpus:
            if g.index == index:
                return g
        return None

    def gpu_memory_of(self, s: types_pb2.Slice) -> int:
        """The memory of the GPU a slice is on (by its UUID), 0 when its node or GPU is unknown."""
        entry = self.nodes.get(s.node)
        return next((g.memory_bytes for g in (entry.gpus if entry else []) if g.uuid == s.gpu_uuid), 0)

    # -- slices --------------------------------------------------------------------

    def _account(self, s: types_pb2.Slice, sign: int) -> None:
        u = self.usage.get(s.tenant)
        if u is None:
            u = self.usage[s.tenant] = [0, 0, 0.0]
        u[0] += sign
        u[1] += sign * s.memory_bytes
        u[2] += sign * s.compute_share

    def _place(self, s: types_pb2.Slice) -> None:
        g = self.gpu(s.node, s.gpu_index)
        if g is not None:
            g.add(s)
        entry = self.nodes.get(s.node)
        if entry is not None:
            entry.allocated_cpu_milli += s.cpu_milli
            entry.allocated_host_memory += s.host_memory_bytes

    def _unplace(self, s: types_pb2.Slice) -> None:
        g = self.gpu(s.node, s.gpu_index)
        if g is not None:
            g.remove(s.id)
        entry = self.nodes.get(s.node)
        if entry is not None:
            entry.allocated_cpu_milli -= s.cpu_milli
            entry.allocated_host_memory -= s.host_memory_bytes

    def put_slice(self, s: types_pb2.Slice, revision: int = 0) -> None:
        old = self.slices.get(s.id)
        if old is not None:
            self._unplace(old)
            self._account(old, -1)
            if old.node != s.node:
                self.by_node.get(old.node, {}).pop(s.id, None)
        self.slices[s.id] = s
        self.by_node.setdefault(s.node, {})[s.id] = None
        if old is not None and old.allocation_id != s.allocation_id:
            self._forget_allocation(old.allocation_id, s.id)
        self.by_allocation.setdefault(s.allocation_id, {})[s.id] = None
        if replacing.source_id(s.labels):
            self.reservations[s.id] = None
        else:
            self.reservations.pop(s.id, None)
        self._account(s, 1)
        if revision:
            self.revisions[s.id] = revision
        self._place(s)

    def drop_slice(self, slice_id: str) -> types_pb2.Slice | None:
        s = self.slices.pop(slice_id, None)
        self.revisions.pop(slice_id, None)
        if s is not None:
            self._unplace(s)
            self._account(s, -1)
            self.by_node.get(s.node, {}).pop(slice_id, None)
            self._forget_allocation(s.allocation_id, slice_id)
            self.reservations.pop(slice_id, None)
        return s

    # -- moves: a target and its source count once (mesh/replacing.py) ---------------------------

    def replaced(self, t) -> types_pb2.Slice | None:
        """The source slice that `t` (a slice, or a request: its `labels` and `tenant`) replaces while its move is
        live, else None: the source must exist, be another slice of the same tenant, and either the migration
        manager (`reservation_live`) must say the move is live, or `t` be a drain's replacement of the source's
        replica (drainpairs.live, read from the records)."""
        sid = replacing.source_id(t.labels)
        s = self.slices.get(sid) if sid else None
        if s is None or s.tenant != t.tenant or s.id == getattr(t, "id", None):
            return None
        if self.reservation_live is not None and self.reservation_live(t, s):
            return s
        return s if drainpairs.live(self, t, s) else None

    def tenant_usage(self, tenant: str, gone: frozenset = frozenset()) -> tuple[int, int, float]:
        """What `tenant`'s quota counts (slices, GPU memory bytes, GPUs: the sum of compute shares), each live move's
        pair once at the larger of the two; less the slices of the allocations `gone` (preemption victims)."""
        n, memory, gpus = self.usage.get(tenant, (0, 0, 0.0))
        for a in gone:
            for s in self.slices_of(a):
                if s.tenant == tenant:
                    n, memory, gpus = n - 1, memory - s.memory_bytes, gpus - s.compute_share
        for tid in self.reservations:
            t = self.slices[tid]
            src = self.replaced(t) if t.tenant == tenant and t.allocation_id not in gone else None
            if src is not None and src.allocation_id not in gone:
                twice = replacing.overlap((1, t.memory_bytes, t.compute_share),
                                          (1, src.memory_bytes, src.compute_share))
                n, memory, gpus = n - twice[0], memory - twice[1], gpus - twice[2]
        return n, memory, gpus

    def _forget_allocation(self, allocation_id: str, slice_id: str) -> None:
        group = self.by_allocation.get(allocation_id)
        if group is not None:
            group.pop(slice_id, None)
            if not group:
                del self.by_allocation[allocation_id]

    def slices_on(self, node: str) -> list[types_pb2.Slice]:
        return [self.slices[i] for i in self.by_node.get(node, ())]

    def slices_of(self, allocation_id: str) -> list[types_pb2.Slice]:
        """The slices of an allocation, in the order they were added."""
        return [self.slices[i] for i in self.by_allocation.get(allocation_id, ())]
