"""`meshctl bench alloc`: allocation latency and throughput through the real API.

Starts its own LocalCluster (control plane + embedded etcd + agent processes
with simulated hosts) in a temporary state dir, unless --endpoint names a
running one; then `--clients` concurrent callers sharing one gRPC channel
allocate (waiting for READY) and release as fast as they can for `--duration`
seconds. Its own cluster keeps etcd's data on disk, as an operator's does
(--tmpfs: on /dev/shm, as before); --secure runs it with TLS and tokens.
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
  meshctl bench alloc --tmpfs --duration 5            # etcd's data on tmpfs (no fsync cost)
  meshctl bench alloc --secure --sim-hosts 8 --duration 5   # TLS, mTLS agents, a token per tenant
  meshctl --endpoint 127.0.0.1:7070 bench alloc        # against a running cluster
  meshctl bench alloc --endpoint cp:50051 --ca ca.crt --token "$T" --tenant team-a   # a secured one

Prints {"allocations", "allocations_per_s", "p50_ms", "p99_ms", "mean_ms", "errors",
"hosts", "gpus", "clients", "duration_s", "etcd_storage" (disk | tmpfs), "etcd_data_dir",
"etcd_fs", "tls", "token", ...}; progress goes to stderr.
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
    p.add_argument("--tmpfs", action="store_true",
                   help="keep etcd's data (the whole state dir) on /dev/shm: no disk fsync in the figures "
                        "(default: on disk, as an operator runs it)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="the disk directory the temporary state dir goes under (default: $TMPDIR, else /var/tmp, "
                        "whichever is on disk; a tmpfs is refused)")
    p.add_argument("--secure", action="store_true",
                   help="start the cluster with TLS, mTLS agents (one process per host) and a bearer token per "
                        "client's tenant; a running cluster takes --ca/--cert/--key/--token instead")
    p.add_argument("--tenant", metavar="NAME",
                   help="allocate as this tenant (default: bench-000, bench-001, ... one per client); a tenant "
                        "token of a running cluster needs its own tenant here")
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
    __import__("tools.meshctl.bench_serve", fromlist=["register"]).register(kinds)   # bench serve
    __import__("tools.meshctl.bench_autoscale", fromlist=["register"]).register(kinds)   # bench autoscale


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
    kept: list[tuple[str, str]] = field(default_factory=list)   # (allocation id, its client's token)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _metadata(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def _client_loop(stub: Any, tenant: str, token: str, profile: str, release: bool, end: float,
                       tally: Tally) -> None:
    import grpc

    from gpumesh.v1 import slice_service_pb2, types_pb2
    req = slice_service_pb2.AllocateRequest(spec=types_pb2.SliceSpec(tenant=tenant, mig_profile=profile))
    md = _metadata(token)
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            resp = await stub.Allocate(req, timeout=60, metadata=md)
        except grpc.aio.AioRpcError as exc:
            tally.errors[exc.code().name] += 1
            await asyncio.sleep(0.01)
            continue
        tally.latencies.append(time.perf_counter() - t0)
        if not release:
            tally.kept.append((resp.allocation_id, token))
            continue
        t1 = time.perf_counter()
        try:
            await stub.Release(slice_service_pb2.ReleaseRequest(id=resp.allocation_id), timeout=60, metadata=md)
            tally.release_latencies.append(time.perf_counter() - t1)
        except grpc.aio.AioRpcError as exc:
            tally.errors[f"release:{exc.code().name}"] += 1


def _channel(endpoint: str, creds: Any):
    import grpc
    if creds is not None and creds.tls:
        from mesh.tls import channel_credentials
        return grpc.aio.secure_channel(endpoint, channel_credentials(creds.ca, creds.cert, creds.key))
    return grpc.aio.insecure_channel(endpoint)


async def _run_clients(endpoint: str, clients: int, duration: float, profile: str, release: bool,
                       tally: Tally, tenants: list[str], creds: list[Any]) -> float:
    """Drive `clients` concurrent callers over one grpc.aio channel (cheap on the client's CPU,
    so the figures are the server's); returns the elapsed seconds. Client i allocates as tenants[i]
    with creds[i]'s token (the channel's TLS files are the first client's)."""
    from gpumesh.v1 import slice_service_pb2, slice_service_pb2_grpc
    async with _channel(endpoint, creds[0] if creds else None) as channel:
        stub = slice_service_pb2_grpc.SliceServiceStub(channel)
        start = time.monotonic()
        end = start + duration
        tokens = [c.token if c is not None else "" for c in creds] if creds else [""] * clients
        tasks = [asyncio.create_task(_client_loop(stub, tenants[i], tokens[i], profile, release, end, tally))
                 for i in range(clients)]
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
        kept = [(a, _metadata(tok)) for a, tok in tally.kept]
        for i in range(0, len(kept), 64):
            await asyncio.gather(*(stub.Release(slice_service_pb2.ReleaseRequest(id=a), timeout=60, metadata=md)
                                   for a, md in kept[i:i + 64]), return_exceptions=True)
    return elapsed


def run_clients(endpoint: str, clients: int, duration: float, profile: str, release: bool,
                tenants: list[str] | None = None, creds: list[Any] | None = None) -> dict:
    """Run the clients for `duration` seconds; the measurements (without fleet facts). `tenants`: each
    client's tenant (default bench-000, ...); `creds`: each client's bench_cluster.Credentials."""
    tally = Tally()
    tenants = tenants or [f"bench-{i:03d}" for i in range(clients)]
    elapsed = asyncio.run(_run_clients(endpoint, clients, duration, profile, release, tally, tenants, creds or []))
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
    from mesh.client import MeshClient
    from tools.localcluster import ClusterError
    from tools.meshctl.bench_cluster import BenchCluster
    from tools.meshctl.output import dump

    bc = None
    endpoint = getattr(args, "endpoint", None)
    try:
        if endpoint:
            bc = BenchCluster.existing(args, endpoint)
            hosts = gpus = None
        else:
            bc = BenchCluster.start(args)
            hosts = args.sim_hosts
            gpus = hosts * args.gpus_per_host
        with MeshClient(bc.endpoint, timeout=60.0, **bc.admin.auth()) as mesh:
            if hosts is None:
                hosts, gpus = len(mesh.list_nodes()), len(mesh.list_gpus())
            info(f"running {args.clients} clients for {args.duration:g}s "
                 f"(profile {args.profile}, {'alloc+release' if args.release else 'alloc only'})")
            result = run_clients(bc.endpoint, args.clients, args.duration, args.profile, args.release,
                                 bc.tenants, bc.client_creds)
        result.update({"hosts": hosts, "gpus": gpus, "endpoint": bc.endpoint, **bc.facts})
    except ClusterError as exc:
        raise CliError(f"{exc}") from None
    finally:
        if bc is not None and not endpoint:
            bc.stop()
    out(dump(result, args.output) if args.output in ("json", "yaml") else _format_table(result))
    return 0
