"""`meshctl bench soak`: allocate/run/stop/release cycles through the real API; is state flat?

Starts its own LocalCluster (control plane + embedded etcd + one agent process over a
simulated H100 host with MIG) with a short `--retention` so that finished workloads expire
during the run, then `--clients` threads each repeat: allocate a 1g.10gb slice (waiting for
READY), run a workload on it (`sleep 30`), stop it, release the slice. Every `--every`
cycles it samples the control plane's resident memory (VmRSS), the number of etcd keys under
/gpumesh/v1/ and the records the control plane holds in memory (its /metrics), printing one
line per sample to stderr. After `--warmup` cycles the samples must stay flat: the report
gives the first and last post-warm-up figures and their growth. At the end it waits one
retention period and samples once more (everything finished has expired by then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

EPILOG = """\
examples:
  meshctl bench soak --cycles 10000 -o json
  meshctl bench soak --cycles 500 --every 50 --warmup 100 --retention 5
  python -m tools.meshctl.bench_soak --cycles 10000 -o json

Prints {"cycles", "seconds", "cycles_per_s", "retention_s", "samples": [{"cycle", "rss_mb",
"etcd_keys", "records"}...], "after_warmup": {"samples", "rss_mb_first", "rss_mb_last", "rss_mb_max",
"rss_growth_mb", "etcd_keys_first", "etcd_keys_last", "etcd_keys_max"}, "final": {...}, "errors"}.
"""

HOST = {"node": "soak-0", "gpus": [{"model": "H100-80GB", "count": 2, "mig": True}]}


def _pos_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cycles", type=_pos_int, default=10_000, help="allocate/run/stop/release cycles (default: 10000)")
    p.add_argument("--clients", type=_pos_int, default=4, help="concurrent client threads (default: 4)")
    p.add_argument("--every", type=_pos_int, default=500, metavar="N", help="sample every N cycles (default: 500)")
    p.add_argument("--warmup", type=int, default=1000, metavar="N",
                   help="cycles before flatness is judged (default: 1000)")
    p.add_argument("--retention", type=float, default=10.0, metavar="SECONDS",
                   help="the control plane's retention_seconds for finished records (default: 10)")
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state dir (logs) afterwards")


def add_soak_bench(subparsers: Any) -> argparse.ArgumentParser:
    """Registers `soak` under `meshctl bench`."""
    from tools.meshctl.common import subcommand
    p = subcommand(subparsers, "soak", help="allocate/run/stop/release cycles: memory and etcd keys stay flat",
                   description=__doc__.split("\n\n", 1)[1], epilog=EPILOG, skip=("timeout",))
    add_arguments(p)
    p.set_defaults(func=run_soak_bench)
    return p


def info(msg: str) -> None:
    sys.stderr.write(f"{msg}\n")
    sys.stderr.flush()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def etcd_keys(cluster) -> int:
    import aetcd
    ports = json.loads((cluster.etcd_data_dir / "ports.json").read_text())

    async def count() -> int:
        client = aetcd.Client(host="127.0.0.1", port=ports["client"], timeout=10)
        await client.connect()
        try:
            from controlplane.state import keys
            prefix = keys.PREFIX.encode()
            end = prefix[:-1] + bytes([prefix[-1] + 1])
            resp = await client.kvstub.Range(aetcd.rpc.RangeRequest(key=prefix, range_end=end, count_only=True),
                                             timeout=10, metadata=client.metadata)
            return int(resp.count)
        finally:
            await client.close()
    return asyncio.run(count())


def records(cluster) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{cluster.metrics_endpoint}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): int(float(m.group(2))) for m in re.finditer(r'gpumesh_records\{kind="([a-z_]+)"\} (\S+)', text)}


def soak(state_dir, cycles: int, clients: int = 4, every: int = 500, warmup: int = 1000, retention: float = 10.0,
         say=info, min_seconds: float = 0.0) -> dict:
    """Runs at least `cycles` cycles and at least `min_seconds`. The warm-up ends after `warmup` cycles and after
    the longest retention window (request ids: 1.25 x their retention plus a sweep): before that, records are
    still accumulating up to their steady number, whatever the machine's speed."""
    from gpumesh.v1 import types_pb2
    from tools.localcluster import LocalCluster
    request_retention, sweep = max(10.0, retention), max(0.2, min(retention / 4, 5))
    window = 1.25 * request_retention + sweep + 1.0      # the longest a finished record can live
    cluster = LocalCluster(state_dir, [HOST], lease_ttl=5, agents_per_process=1, log_level="warning",
                           controlplane_args=["--retention-seconds", str(retention),
                                              "--request-id-retention-seconds", str(request_retention),
                                              "--retention-interval-seconds", str(sweep),
                                              "--events-retention-seconds", str(retention)])
    cluster.start(timeout=120)
    samples, errors = [], {}
    done, started = [0], [0]
    lock = threading.Lock()
    t0 = time.monotonic()
    base = {}

    def sample(cycle: int) -> dict:
        s = {"cycle": cycle, "seconds": round(time.monotonic() - t0, 1), "rss_mb": rss_mb(cluster.controlplane.pid),
             "etcd_keys": etcd_keys(cluster), "records": records(cluster)}
        say(json.dumps(s))
        return s

    def one(client) -> None:
        a = client.allocate(tenant="soak", mig_profile="1g.10gb", gpu_model="H100-80GB")
        try:
            w = client.run_workload(a.slices[0].id, ["sleep", "30"])
            client.stop_workload(w.id, grace_seconds=1)
        finally:
            client.release(a.allocation_id)

    def worker() -> None:
        with cluster.client(timeout=60) as client:
            while True:
                with lock:
                    if started[0] >= cycles and time.monotonic() - t0 >= min_seconds:
                        return
                    started[0] += 1
                try:
                    one(client)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        key = type(e).__name__ + ": " + str(e)[:120]
                        errors[key] = errors.get(key, 0) + 1
                    with lock:
                        started[0] -= 1        # not a cycle: another try
                    time.sleep(0.2)
                    continue
                with lock:
                    done[0] += 1
                    n = done[0]
                if n % every == 0:
                    s = sample(n)
                    with lock:
                        samples.append(s)

    try:
        cluster.wait_ready(timeout=120)
        base = sample(0)
        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - t0
        # finished records expire after `retention`; request ids live up to 1.25 x their retention (leases)
        time.sleep(window + 2)
        final = sample(done[0])
        with cluster.client(timeout=30) as client:
            final["workloads_listed"] = len(client.list_workloads())
            final["slices_listed"] = len(client.list_slices())
    finally:
        cluster.stop()
    samples.sort(key=lambda s: s["cycle"])
    post = [s for s in samples if s["cycle"] > warmup and s["seconds"] >= window] or samples[-1:]
    after = {}
    if post:
        after = {"samples": len(post), "rss_mb_first": post[0]["rss_mb"], "rss_mb_last": post[-1]["rss_mb"],
                 "rss_mb_max": max(s["rss_mb"] for s in post),
                 "rss_growth_mb": round(post[-1]["rss_mb"] - post[0]["rss_mb"], 1),
                 "etcd_keys_first": post[0]["etcd_keys"], "etcd_keys_last": post[-1]["etcd_keys"],
                 "etcd_keys_max": max(s["etcd_keys"] for s in post)}
    return {"cycles": done[0], "clients": clients, "seconds": round(seconds, 1),
            "cycles_per_s": round(done[0] / seconds, 2) if seconds else 0, "retention_s": retention,
            "warmup_cycles": warmup, "warmup_seconds": round(window, 1), "base": base, "samples": samples, "after_warmup": after, "final": final, "errors": errors}


def run_soak_bench(args: argparse.Namespace) -> int:
    out_fmt = getattr(args, "output", "json") or "json"
    with tempfile.TemporaryDirectory(prefix="gpumesh-soak-") as tmp:
        state = tmp if not args.keep_state else tempfile.mkdtemp(prefix="gpumesh-soak-keep-")
        result = soak(state, args.cycles, args.clients, args.every, args.warmup, args.retention)
    if out_fmt in ("json", "yaml"):
        from tools.meshctl.output import dump
        sys.stdout.write(dump(result, out_fmt) + "\n")
    else:
        a = result["after_warmup"]
        sys.stdout.write(f"{result['cycles']} cycles in {result['seconds']}s; after warm-up RSS "
                         f"{a.get('rss_mb_first')} -> {a.get('rss_mb_last')} MiB, etcd keys {a.get('etcd_keys_first')}"
                         f" -> {a.get('etcd_keys_last')}; final {result['final']}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_soak", description=__doc__.split("\n\n", 1)[1], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("-o", "--output", default="json", choices=("json", "yaml", "table"))
    return run_soak_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
