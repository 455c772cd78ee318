"""The control plane's in-memory view of the fleet: nodes, their GPUs, and
what each GPU has promised to slices.

It is rebuilt from etcd at start and kept current by the writes this process
commits; the scheduler reads it synchronously (no awaits), and a placement is
"assumed" here before its etcd write so that concurrent requests never see the
same free capacity. A node is a `NodeEntry` (`controlplane.state.nodeentry`),
a GPU a `GpuState` (`controlplane.state.gpustate`); both, `MIB` and
`ISOLATION_NAMES` are importable from here, as the scheduler and controllers do.
"""

from __future__ import annotations

from gpumesh.v1 import types_pb2

from controlplane.state import drainpairs
from controlplane.state.gpustate import ISOLATION_NAMES, FillIndex, GpuState
from controlplane.state.nodeentry import MIB, NodeEntry, gpus_from_inventory
from mesh import replacing

__all__ = ["Fleet", "GpuState", "NodeEntry", "MIB", "ISOLATION_NAMES"]


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
