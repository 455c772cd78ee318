"""What the gateway tests of this folder share besides the fixtures (conftest.py): the cluster's hosts, a
control-plane client per tenant, request bodies, the simulated GPUs' controls (`simctl`) and the gateway's view."""

from __future__ import annotations

import subprocess
import sys
import threading

from gpumesh.v1 import deployment_service_pb2 as D
from tests.integration.gatewayhttp import post
from tests.integration.gatewayhttp import status as gateway_status
from tests.integration.secure import TOKENS

HOSTS = [{"node": f"gpu-{x}", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]} for x in "abc"]
READY = D.REPLICA_STATE_READY
SLOW = 300
NO_EOS = {"0": -100, "1": -100, "2": -100}     # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>: a long answer


def all_ready(n: int):
    return lambda d: len(d.replicas) == n and d.status.ready_replicas == n and all(r.state == READY
                                                                                  for r in d.replicas)


def client(cluster, who):
    from mesh.client import MeshClient
    return MeshClient(cluster.endpoint, token=TOKENS[who], ca=str(cluster.tls_dir / "ca.crt"), timeout=60)


def chat_body(text="Say hello.", **kw):
    return {"model": "chat", "messages": [{"role": "user", "content": text}], "max_tokens": kw.pop("max_tokens", 4),
            **kw}


def simctl(cluster, node, *args):
    state = next((cluster.state_dir / "agents").glob(f"*/sim/{node}.state.json"))
    host = cluster.state_dir / "hosts" / f"{node}.yaml"
    subprocess.run([sys.executable, "-m", "nodeagent.nvml.simctl", "--state", str(state), "--host-file", str(host),
                    *args], check=True, capture_output=True, timeout=30)


def gpu_state(cluster, node) -> dict:
    return next(g for g in gateway_status(cluster)["gpus"] if g["node"] == node)


def in_flight(cluster) -> int:
    return sum(r["in_flight"] for m in gateway_status(cluster)["models"] for r in m["replicas"])


def served_by(cluster, n: int, concurrent: int = 2) -> list[str]:
    """Send n requests, `concurrent` at a time; the replicas that served them (all must succeed)."""
    out, errors = [], []

    def one(i):
        r = post(cluster, chat_body(f"Say a word about number {i}.", max_tokens=3, temperature=0.8))
        (out if r.status_code == 200 else errors).append(r.headers.get("x-gpumesh-served-by") or r.text)
    for start in range(0, n, concurrent):
        ts = [threading.Thread(target=one, args=(i,)) for i in range(start, min(n, start + concurrent))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors, errors
    return out
