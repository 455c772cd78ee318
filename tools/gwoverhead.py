"""The gateway's own overhead, measured quickly: `python -m tools.gwoverhead [-n 200]`.

Starts a local cluster (etcd, control plane, one simulated H100 host, the gateway), deploys one llama.cpp
replica of SmolLM2-135M, then sends the same one-token completion alternately straight to the replica and
through the gateway (both over TLS to the replica, pinned to its certificate, when its agent's backend_tls
is on), and prints JSON: p50/p99 of each, of the paired difference (what the gateway adds,
including the extra HTTP hop), and of the gateway's own time per request from its
`gpumesh_gateway_overhead_seconds` histogram (its time minus the backend's). The full comparison against
other balancers under injected faults is `meshctl bench serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _q(xs: list[float], p: float) -> float:
    return round(sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000, 3)


def _own(metrics: str) -> dict:
    buckets = []
    for line in metrics.splitlines():
        if line.startswith("gpumesh_gateway_overhead_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float(le), float(line.split()[-1])))
    total = buckets[-1][1] if buckets else 0
    out = {}
    for p in (0.5, 0.99):
        le = next((b for b, n in buckets if n >= p * total), None)
        out[f"p{int(p * 100)}_at_most_ms"] = le * 1000 if le is not None else None
    return {**out, "requests": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200, help="request pairs (default 200)")
    args = ap.parse_args(argv)
    import httpx

    from gpumesh.v1 import model_service_pb2 as M
    from mesh.models import importer
    from tests.models_util import smollm2_gguf
    from tools.localcluster import LocalCluster
    env = dict(os.environ, N_THREADS="1", N_THREADS_BATCH="1", N_BATCH="1")
    c = LocalCluster(Path(tempfile.mkdtemp(prefix="gwoverhead-")),
                     [{"node": "gpu-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}],
                     lease_ttl=3, agents_per_process=1, env=env, gateway=True,
                     gateway_args=["--no-log-requests", "--cache-entries", "0"])
    c.start(timeout=120)
    try:
        with c.client(60) as m:
            v, _ = importer.variant_from_artifact(str(smollm2_gguf()), context=512)
            m.register_model(M.Model(name="smollm2", family="smollm2", variants=[v]))
            m.deploy("smollm2", name="chat", replicas=1, context=512)
            rep = m.wait_deployment("chat", lambda x: x.status.ready_replicas == 1, timeout=300).replicas[0]
            ep, key = rep.endpoint, m.replica_api_keys().get(rep.id, "")     # the replica requires its key
            cert = rep.endpoint_certificate         # ... and is reached over TLS pinned to its certificate
        gw = c.gateway_url
        deadline = time.monotonic() + 60
        while not any(r["ready"] for mm in httpx.get(f"{gw}/v1/gpu/status").json()["models"] for r in mm["replicas"]):
            if time.monotonic() > deadline:
                raise SystemExit("the gateway never saw the replica ready")
            time.sleep(0.2)
        body = {"model": "smollm2", "prompt": "Hi", "max_tokens": 1, "temperature": 0.5}
        direct, via = [], []
        from mesh import replicatls
        with httpx.Client(timeout=120) as h, httpx.Client(timeout=120, verify=replicatls.verify(cert)) as hr:
            for i in range(args.n + 5):
                t = time.perf_counter()
                r1 = hr.post(f"{replicatls.base_url(ep, cert)}/v1/completions", json=body,
                             headers={"authorization": f"Bearer {key}"})
                a = time.perf_counter() - t
                t = time.perf_counter()
                r2 = h.post(f"{gw}/v1/completions", json=dict(body, model="chat"))
                b = time.perf_counter() - t
                if r1.status_code != 200 or r2.status_code != 200:
                    raise SystemExit(f"a request failed: {r1.status_code} {r2.status_code} {r2.text[:200]}")
                if i >= 5:                      # warm-up
                    direct.append(a)
                    via.append(b)
            own = _own(h.get(f"{gw}/metrics").text)
        diff = [b - a for a, b in zip(direct, via)]
        print(json.dumps({"pairs": args.n, "direct_ms": {"p50": _q(direct, .5), "p99": _q(direct, .99)},
                          "gateway_ms": {"p50": _q(via, .5), "p99": _q(via, .99)},
                          "gateway_overhead_ms": {"p50": _q(diff, .5), "p99": _q(diff, .99)},
                          "gateway_own_time_ms": own, "replica_scheme": replicatls.scheme(cert),
                          "load_average": os.getloadavg()}, indent=1))
    finally:
        c.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
