"""The chaos suite's invariant checker: reads etcd directly (aetcd), after each scenario.

- no GPU over-committed: the memory of the slices on a GPU fits the GPU (and compute shares sum to 1 at most);
- no overlapping MIG placements on one GPU;
- every slice in a known state;
- every acknowledged allocation present (its request key names it, its slices exist unless released);
- nothing granted twice: every allocation of the checked tenant is named by exactly one request key.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses

import aetcd

from controlplane.state import keys, requestids
from controlplane.state.etcdconn import parse_endpoint
from gpumesh.v1 import types_pb2

KNOWN_STATES = {types_pb2.SLICE_STATE_PENDING, types_pb2.SLICE_STATE_READY, types_pb2.SLICE_STATE_RELEASING,
                types_pb2.SLICE_STATE_FAILED, types_pb2.SLICE_STATE_UNKNOWN}


@dataclasses.dataclass
class Report:
    slices: int = 0
    allocations: int = 0
    acknowledged: int = 0
    lost: list = dataclasses.field(default_factory=list)
    duplicated: list = dataclasses.field(default_factory=list)
    violations: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.violations)

    def __str__(self) -> str:
        return (f"{self.slices} slices, {self.allocations} allocations, {self.acknowledged} acknowledged; "
                f"lost {self.lost[:5]} ({len(self.lost)}), duplicated {self.duplicated[:5]} ({len(self.duplicated)}), "
                f"violations {self.violations[:5]} ({len(self.violations)})")


async def _load(endpoints: list[str]) -> dict[str, bytes]:
    last = None
    for ep in endpoints:             # the first member that answers
        host, port = parse_endpoint(ep)
        client = aetcd.Client(host=host, port=port, timeout=5)
        try:
            res = await client.get_prefix(keys.PREFIX.encode())
            return {kv.key.decode(): kv.value for kv in res.kvs}
        except Exception as e:  # noqa: BLE001 - a dead member: try the next
            last = e
        finally:
            await client.close()
    raise RuntimeError(f"no etcd member answered: {last}")


def read(endpoints: list[str]) -> dict[str, bytes]:
    return asyncio.run(_load(endpoints))


def check(endpoints: list[str], tenant: str = "", acked: dict[str, str] | None = None,
          released: set[str] = frozenset()) -> Report:
    """`acked`: request_id -> allocation id the clients were answered; `released`: allocations they released."""
    kvs = read(endpoints)
    rep = Report()
    gpus = {}
    for k, v in kvs.items():
        if k.startswith(keys.NODES):
            n = types_pb2.Node.FromString(v)
            for g in n.inventory.gpus:
                gpus[(n.name, g.uuid)] = g
    slices = [types_pb2.Slice.FromString(v) for k, v in kvs.items() if k.startswith(keys.SLICES)]
    rep.slices = len(slices)
    by_gpu = collections.defaultdict(list)
    for s in slices:
        if s.state not in KNOWN_STATES:
            rep.violations.append(f"slice {s.id} in unknown state {s.state}")
        by_gpu[(s.node, s.gpu_uuid)].append(s)
    for (node, uuid), group in by_gpu.items():
        g = gpus.get((node, uuid))
        if g is None:
            rep.violations.append(f"slices {[s.id for s in group]} on unknown GPU {node}/{uuid}")
            continue
        mem = sum(s.memory_bytes for s in group)
        if g.memory_bytes and mem > g.memory_bytes:
            rep.violations.append(f"GPU {node}/{g.index} over-committed: {mem} > {g.memory_bytes} bytes")
        # MIG compute is checked by the placements below; MPS shares must not sum past the whole GPU.
        shares = sum(s.compute_share for s in group if s.isolation == types_pb2.ISOLATION_MPS)
        if shares > 1.0 + 1e-3:
            rep.violations.append(f"GPU {node}/{g.index} compute over-committed: {shares:.3f}")
        mig = sorted((s.placement.start, s.placement.start + s.placement.size, s.id) for s in group
                     if s.isolation == types_pb2.ISOLATION_MIG)
        for a, b in zip(mig, mig[1:]):
            if b[0] < a[1]:
                rep.violations.append(f"GPU {node}/{g.index}: MIG placements of {a[2]} and {b[2]} overlap")
    # a request key's value: {"id", "fingerprint"} (or a bare id, written before fingerprints were kept)
    requests = {k[len(keys.REQUESTS):]: requestids.decode(v)[0] for k, v in kvs.items()
                if k.startswith(keys.REQUESTS)}
    allocs = collections.defaultdict(list)
    for s in slices:
        allocs[s.allocation_id].append(s)
    if tenant:
        named = collections.Counter(a for r, a in requests.items() if r.startswith(tenant + "/"))
        mine = {a for a, group in allocs.items() if group[0].tenant == tenant}
        rep.allocations = len(mine)
        rep.duplicated += [a for a, n in named.items() if n > 1]
        rep.duplicated += [f"{a} (no request key)" for a in mine if a not in named]
    for rid, alloc in (acked or {}).items():
        rep.acknowledged += 1
        if requests.get(f"{tenant}/{rid}") != alloc:
            rep.lost.append(f"{rid}: request key {requests.get(f'{tenant}/{rid}')!r} != {alloc}")
        elif alloc not in released and alloc not in allocs:
            rep.lost.append(f"{rid}: allocation {alloc} has no slices")
    return rep


async def _members(endpoints: list[str]) -> list[str]:
    """Each member's disagreement with the first one on the keys under the prefix at one revision (the
    lowest any member has applied: every member holds that one), read locally (serializable) from each."""
    clients = []
    try:
        for ep in endpoints:
            host, port = parse_endpoint(ep)
            c = aetcd.Client(host=host, port=port, timeout=10)
            await c.connect()
            clients.append((ep, c))

        async def rng(c, revision=0):
            req = aetcd.rpc.RangeRequest(key=keys.PREFIX.encode(), range_end=aetcd.utils.prefix_range_end(
                keys.PREFIX.encode()), serializable=True, revision=revision)
            return await c.kvstub.Range(req, timeout=10)
        at = min([(await rng(c)).header.revision for _, c in clients])
        views = [(ep, {kv.key: (kv.mod_revision, kv.value) for kv in (await rng(c, at)).kvs}) for ep, c in clients]
    finally:
        for _, c in clients:
            await c.close()
    first_ep, first = views[0]
    out = []
    for ep, view in views[1:]:
        missing, extra = first.keys() - view.keys(), view.keys() - first.keys()
        differ = [k for k in first.keys() & view.keys() if first[k] != view[k]]
        if missing or extra or differ:
            out.append(f"{ep} at revision {at} against {first_ep}: {len(missing)} keys missing, {len(extra)} more, "
                       f"{len(differ)} differ (e.g. {sorted(missing or extra or differ)[:3]})")
    return out


def members_disagree(endpoints: list[str]) -> list[str]:
    """[] when every etcd member holds the same keys and values at one revision; else what differs (an etcd
    member that came back from a kill without writes the others committed: etcd-io/etcd#13766 in 3.5.0-3.5.2)."""
    return asyncio.run(_members(endpoints))
