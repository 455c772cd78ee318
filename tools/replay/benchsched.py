"""Decision time of the scheduler per request as the fleet grows (`meshctl bench schedule`).

A fleet of 8-GPU nodes (half H100-80GB in MIG mode, half A100-80GB shared by MPS or whole), filled
at random to `fill` of its GPUs, then `requests` requests of a mixed shape (MIG profiles, MPS
shares, whole GPUs, same-node gangs, host CPU) are each scheduled and bound; every bound request
also frees a random earlier one so the fill stays level. Timed: `Framework.schedule` alone (the
synchronous part of Allocate; the etcd write is measured by `bench alloc`).
"""

from __future__ import annotations

import random
import time

from controlplane.state.fleet import MIB, Fleet
from controlplane.scheduler import profiles
from gpumesh.v1 import types_pb2
from mesh import gpumodels
from mesh.slicespec import ISOLATION_ENUM, SliceRequest

GIB = 1 << 30


def build(gpus: int, seed: int = 0, fill: float = 0.6) -> Fleet:
    rng = random.Random(seed)
    fleet = Fleet()
    mig_layouts = gpumodels.enumerate_layouts(gpumodels.get_model("H100-80GB"), maximal_only=True)
    n = 0
    for i in range(max(1, gpus // 8)):
        mig = i % 2 == 0
        model = gpumodels.get_model("H100-80GB" if mig else "A100-80GB")
        inv = types_pb2.NodeInventory(hostname=f"node-{i:05d}", cpu_milli=128_000, memory_bytes=1024 * GIB)
        for j in range(8):
            inv.gpus.add(index=j, uuid=f"GPU-{i}-{j}", model=model.name, memory_bytes=model.memory_mib * MIB,
                         mig_enabled=mig, nvlink_domain=0)
        inv.nvlink_domains.add(gpus=list(range(8)))
        entry = fleet.upsert_node(types_pb2.Node(name=inv.hostname, inventory=inv))
        entry.ready = True
        for g in entry.gpus:
            if rng.random() >= fill:
                continue
            if mig:
                layout = rng.choice(mig_layouts)
                for prof, start in layout[:rng.randint(1, len(layout))]:
                    p = model.profile(prof)
                    n += 1
                    s = types_pb2.Slice(id=f"f{n}", allocation_id=f"f{n}", node=entry.name, gpu_index=g.index,
                                        isolation=types_pb2.ISOLATION_MIG, profile=prof, memory_bytes=p.memory_mib * MIB,
                                        compute_share=p.compute_slices / 7, cpu_milli=1000)
                    s.placement.start, s.placement.size = start, p.memory_slices
                    fleet.put_slice(s)
            else:
                share = rng.choice((0.25, 0.5, 0.75))
                n += 1
                fleet.put_slice(types_pb2.Slice(id=f"f{n}", allocation_id=f"f{n}", node=entry.name,
                                                gpu_index=g.index, isolation=types_pb2.ISOLATION_MPS,
                                                memory_bytes=int(share * g.memory_bytes), compute_share=share,
                                                cpu_milli=2000))
    return fleet


def _requests(rng: random.Random, count: int) -> list[SliceRequest]:
    base = dict(tenant="bench", gpu_model=None, priority=0, compute_share=0.0, mig_profile=None, count=1,
                topology="any", memory_bytes=0, isolation=None, cpu_milli=2000)
    shapes = [dict(mig_profile="1g.10gb", isolation="mig"), dict(mig_profile="2g.20gb", isolation="mig"),
              dict(mig_profile="3g.40gb", isolation="mig"),
              dict(isolation="mps", memory_bytes=20 * GIB, compute_share=0.25),
              dict(isolation="mps", memory_bytes=40 * GIB, compute_share=0.5),
              dict(isolation="exclusive", memory_bytes=GIB),
              dict(isolation="exclusive", memory_bytes=GIB, count=4, topology="same-node")]
    return [SliceRequest(**{**base, **rng.choice(shapes)}) for _ in range(count)]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def run(gpus: int, requests: int = 2000, profile: str = "default", seed: int = 0, fill: float = 0.6) -> dict:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    fleet = build(gpus, seed, fill)
    built = time.perf_counter() - t0
    fw = profiles.build(profile)
    times, placed, refused, held = [], 0, 0, []
    ids = 0
    warmup = max(requests // 5, 2000)   # covers the FGD plugin's learning window (its mix settles)
    for i, req in enumerate(_requests(rng, warmup + requests)):
        t = time.perf_counter()
        d = fw.schedule(req, fleet)
        if i >= warmup:   # the first decisions of each shape fill the verdict tables (a cold start)
            times.append(time.perf_counter() - t)
        if not d.ok:
            refused += i >= warmup
            continue
        placed += i >= warmup
        group = []
        for c in d.choices:
            ids += 1
            s = types_pb2.Slice(id=f"b{ids}", allocation_id=f"b{ids}", node=c.node, gpu_index=c.gpu_index,
                                isolation=ISOLATION_ENUM[c.isolation], profile=c.profile or "",
                                memory_bytes=c.memory_bytes, compute_share=c.compute_share, cpu_milli=c.cpu_milli)
            if c.profile:
                s.placement.start, s.placement.size = c.start, c.size
            fleet.put_slice(s)
            group.append(s.id)
        held.append(group)
        if len(held) > 1:   # free a random earlier one: the fill stays level
            for sid in held.pop(rng.randrange(len(held) - 1)):
                fleet.drop_slice(sid)
    times.sort()
    ms = 1000
    return {"gpus": sum(len(n.gpus) for n in fleet.nodes.values()), "nodes": len(fleet.nodes), "profile": profile,
            "requests": requests, "placed": placed, "refused": refused,
            "p50_ms": round(percentile(times, 50) * ms, 3), "p99_ms": round(percentile(times, 99) * ms, 3),
            "mean_ms": round(sum(times) / len(times) * ms, 3), "max_ms": round(times[-1] * ms, 3),
            "warmup_requests": warmup, "build_s": round(built, 1)}
