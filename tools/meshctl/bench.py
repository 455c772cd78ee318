"""`meshctl bench alloc`: allocation latency and throughput through the real API.

Starts its own LocalCluster (control plane + embedded etcd + agent processes
with simulated hosts) in a temporary state dir, unless --endpoint names a
running one; then `--clients` threads sharing one gRPC channel allocate
(waiting for READY) and release as fast as they can for `--duration` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tools.meshctl.common import CliError, info, out, positive_float, positive_int, subcommand

EPILOG = """\
examples:
  meshctl bench alloc --sim-hosts 100 --gpus-per-host 8 --clients 16 --duration 10 -o json
  meshctl bench alloc --profile 3g.40gb --clients 4 --duration 5
  meshctl bench alloc --no-release --duration 5       # fill the fleet; count RESOURCE_EXHAUSTED
  meshctl --endpoint 127.0.0.1:7070 bench alloc        # against a running cluster

Prints {"allocations", "allocations_per_s", "p50_ms", "p99_ms", "mean_ms", "errors",
"hosts", "gpus", "clients", "duration_s", ...}; progress goes to stderr.
"""


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks against a local cluster",
                           description="Benchmarks through the real API.")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCHMARK", title="benchmarks")
    bench.set_defaults(func=lambda args: (bench.print_help(sys.stderr), 2)[1])
    p = subcommand(kinds, "alloc", help="allocation latency and throughput",
                   description=__doc__.split("\n\n", 1)[1], epilog=EPILOG, skip=("timeout",))
    p.add_argument("--sim-hosts", type=positive_int, default=100, metavar="N", help="(default: 100)")
    p.add_argument("--gpus-per-host", type=positive_int, default=8, metavar="G", help="(default: 8)")
    p.add_argument("--gpu-model", default="H100-80GB", metavar="MODEL", help="(default: H100-80GB)")
    p.add_argument("--agents-per-process", type=positive_int, metavar="K",
                   help="hosts per agent process (default: at most 8 processes)")
    p.add_argument("--clients", type=positive_int, default=16, metavar="N", help="concurrent clients (default: 16)")
    p.add_argument("--duration", type=positive_float, default=10.0, metavar="SECONDS", help="(default: 10)")
    p.add_argument("--profile", default="1g.10gb", help="MIG profile to allocate (default: 1g.10gb)")
    p.add_argument("--release", action=argparse.BooleanOptionalAction, default=True,
                   help="release each allocation right away so the fleet never fills (default: on)")
    p.add_argument("--lease-ttl", type=positive_float, metavar="SECONDS", help="node lease TTL")
    p.add_argument("--timeout", dest="ready_timeout", type=positive_float, default=300.0, metavar="SECONDS",
                   help="how long to wait for the cluster to be Ready (default: 300)")
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state dir (logs) afterwards")
    p.set_defaults(func=run_alloc_bench)
    s = subcommand(kinds, "schedule", help="scheduler decision time per request as the fleet grows",
                   description="Scheduler decision time per request (no gRPC, no etcd) on simulated fleets of "
                               "8-GPU nodes (half H100 in MIG mode, half A100 shared), filled at random.",
                   epilog="examples:\n  meshctl bench schedule -o json\n"
                          "  meshctl bench schedule --gpus 10000 --requests 5000 --profile bestfit\n",
                   skip=("timeout",))
    s.add_argument("--gpus", default="1000,10000,50000", metavar="N[,N...]",
                   help="fleet sizes in GPUs (default: 1000,10000,50000)")
    s.add_argument("--requests", type=positive_int, default=2000, metavar="N", help="timed requests per size")
    s.add_argument("--profile", dest="sched_profile", default="default", metavar="NAME", help="scheduler profile")
    s.add_argument("--fill", type=float, default=0.6, metavar="X", help="share of GPUs holding slices (default: 0.6)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run_schedule_bench)
    __import__("tools.meshctl.bench_migrate", fromlist=["add_migrate_bench"]).add_migrate_bench(kinds)  # bench migrate
    __import__("tools.meshctl.benchmesh", fromlist=["register"]).register(kinds)   # bench mesh
    __import__("tools.meshctl.bench_soak", fromlist=["add_soak_bench"]).add_soak_bench(kinds)  # bench soak


def run_schedule_bench(args: argparse.Namespace) -> int:
    from tools.meshctl.output import dump, render_table
    from tools.replay import benchsched
    try:
        sizes = [int(x) for x in args.gpus.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--gpus: {args.gpus!r} is not a list of integers") from None
    if not sizes or min(sizes) < 8:
        raise CliError("--gpus: each size must be at least 8")
    results = []
    for n in sizes:
        info(f"{n} GPUs: building the fleet and timing {args.requests} decisions...")
        results.append(benchsched.run(n, args.requests, args.sched_profile, args.seed, args.fill))
    if args.output in ("json", "yaml"):
        out(dump(results, args.output))
    else:
        keys = ["gpus", "nodes", "p50_ms", "p99_ms", "mean_ms", "max_ms", "placed", "refused"]
        out(render_table([k.upper() for k in keys], [[r[k] for k in keys] for r in results]))
    return 0


@dataclass
class Tally:
    """What the clients measured (all in one event loop: no lock needed)."""

    latencies: list[float] = field(default_factory=list)
    release_latencies: list[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    kept: list[str] = field(default_factory=list)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def _client_loop(stub: Any, index: int, profile: str, release: bool, end: float, tally: Tally) -> None:
    import grpc

    from gpumesh.v1 import slice_service_pb2, types_pb2
    req = slice_service_pb2.AllocateRequest(spec=types_pb2.SliceSpec(tenant=f"bench-{index:03d}",
                                                                    mig_profile=profile))
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            resp = await stub.Allocate(req, timeout=60)
        except grpc.aio.AioRpcError as exc:
            tally.errors[exc.code().name] += 1
            await asyncio.sleep(0.01)
            continue
        tally.latencies.append(time.perf_counter() - t0)
        if not release:
            tally.kept.append(resp.allocation_id)
            continue
        t1 = time.perf_counter()
        try:
            await stub.Release(slice_service_pb2.ReleaseRequest(id=resp.allocation_id), timeout=60)
            tally.release_latencies.append(time.perf_counter() - t1)
        except grpc.aio.AioRpcError as exc:
            tally.errors[f"release:{exc.code().name}"] += 1


async def _run_clients(endpoint: str, clients: int, duration: float, profile: str, release: bool,
                       tally: Tally) -> float:
    """Drive `clients` concurrent callers over one grpc.aio channel (cheap on the client's CPU,
    so the figures are the server's); returns the elapsed seconds."""
    import grpc

    from gpumesh.v1 import slice_service_pb2, slice_service_pb2_grpc
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = slice_service_pb2_grpc.SliceServiceStub(channel)
        start = time.monotonic()
        end = start + duration
        tasks = [asyncio.create_task(_client_loop(stub, i, profile, release, end, tally)) for i in range(clients)]
        next_report = start + 1.0
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=max(0.0, next_report - time.monotonic()))
            if time.monotonic() >= next_report:
                next_report += 1.0
                elapsed = time.monotonic() - start
                n, errs = len(tally.latencies), sum(tally.errors.values())
                info(f"  {elapsed:5.1f}s  allocations={n}  ({n / elapsed:.1f}/s)  errors={errs}")
        elapsed = time.monotonic() - start
        for t in tasks:
            t.result()
        # not timed: leave the fleet as it was
        for i in range(0, len(tally.kept), 64):
            await asyncio.gather(*(stub.Release(slice_service_pb2.ReleaseRequest(id=a), timeout=60)
                                   for a in tally.kept[i:i + 64]), return_exceptions=True)
    return elapsed


def run_clients(endpoint: str, clients: int, duration: float, profile: str, release: bool) -> dict:
    """Run the clients for `duration` seconds; the measurements (without fleet facts)."""
    tally = Tally()
    elapsed = asyncio.run(_run_clients(endpoint, clients, duration, profile, release, tally))
    lat = sorted(tally.latencies)
    rel = sorted(tally.release_latencies)
    ms = 1000.0
    result = {
        "allocations": len(lat),
        "allocations_per_s": round(len(lat) / elapsed, 2) if elapsed else 0.0,
        "p50_ms": round(percentile(lat, 50) * ms, 2),
        "p90_ms": round(percentile(lat, 90) * ms, 2),
        "p99_ms": round(percentile(lat, 99) * ms, 2),
        "max_ms": round(lat[-1] * ms, 2) if lat else 0.0,
        "mean_ms": round(sum(lat) / len(lat) * ms, 2) if lat else 0.0,
        "errors": dict(tally.errors),
        "clients": clients, "duration_s": round(elapsed, 2), "profile": profile, "release": release,
    }
    if release:
        result["release_p50_ms"] = round(percentile(rel, 50) * ms, 2)
        result["release_p99_ms"] = round(percentile(rel, 99) * ms, 2)
    return result


def _format_table(result: dict) -> str:
    from tools.meshctl.output import render_table
    rows = [[k, ", ".join(f"{c}={n}" for c, n in v.items()) or "none" if isinstance(v, dict) else v]
            for k, v in result.items()]
    return render_table(["metric", "value"], rows)


def run_alloc_bench(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile

    from mesh.client import MeshClient
    from tools.localcluster import ClusterError, LocalCluster
    from tools.meshctl.cluster import sim_hosts
    from tools.meshctl.output import dump

    cluster = None
    state_dir = None
    endpoint = getattr(args, "endpoint", None)
    try:
        if endpoint:
            hosts = gpus = None
        else:
            # tmpfs when there is one: the simulated GPUs' state files are rewritten on every MIG
            # change, and a disk's file-create latency would be measured instead of the control plane.
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            state_dir = tempfile.mkdtemp(prefix="meshctl-bench-", dir=shm)
            hosts = args.sim_hosts
            gpus = hosts * args.gpus_per_host
            cluster = LocalCluster(state_dir, sim_hosts(hosts, args.gpus_per_host, args.gpu_model),
                                   agents_per_process=args.agents_per_process, lease_ttl=args.lease_ttl,
                                   log_level="warning")
            info(f"starting a cluster of {hosts} hosts ({gpus} GPUs) in {state_dir}")
            cluster.start(timeout=args.ready_timeout, progress=lambda m: info("  " + m))
            endpoint = cluster.endpoint
        with MeshClient(endpoint, timeout=60.0) as mesh:
            if hosts is None:
                hosts, gpus = len(mesh.list_nodes()), len(mesh.list_gpus())
            info(f"running {args.clients} clients for {args.duration:g}s "
                 f"(profile {args.profile}, {'alloc+release' if args.release else 'alloc only'})")
            result = run_clients(endpoint, args.clients, args.duration, args.profile, args.release)
        result.update({"hosts": hosts, "gpus": gpus, "endpoint": endpoint})
    except ClusterError as exc:
        raise CliError(f"{exc}") from None
    finally:
        if cluster is not None:
            info("stopping the cluster...")
            cluster.stop()
        if state_dir and not args.keep_state:
            shutil.rmtree(state_dir, ignore_errors=True)
        elif state_dir:
            info(f"state and logs kept in {state_dir}")
    out(dump(result, args.output) if args.output in ("json", "yaml") else _format_table(result))
    return 0
