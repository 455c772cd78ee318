"""One node in the control plane's fleet view (`NodeEntry`): its record, its GPUs and the host resources promised
to slices, with the interned signature that tells the scheduler which nodes are interchangeable; and
`gpus_from_inventory`, the GPUs of a node's inventory that this control plane can schedule on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from gpumesh.v1 import types_pb2

from controlplane.state.gpustate import GpuState
from mesh import gpumodels

MIB = 1 << 20

_SIG_IDS: dict[tuple, int] = {}
_SIG_COUNTER = itertools.count(1)
_SIG_LIMIT = 1_000_000
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

