"""The autoscaler on a real local cluster: etcd, the control plane (its leader-only autoscaler sampling every
0.5 s), two simulated H100 hosts' agents reporting the backends' load every 0.5 s, real llama.cpp servers
(llama-cpp-python's) with the real SmolLM2-135M GGUF, and the gateway in front. The policies' windows are
seconds, not minutes, so each scale happens within the test.

- A burst of concurrent requests through the gateway queues at the backend (the gateway lets 8 requests at
  once onto a llama.cpp replica here, which decodes one at a time): the autoscaler scales the deployment up,
  never past max_replicas, each change an event with the signals, the policy listed by `meshctl get
  policies` and the gateway's `/policies`; after the burst it scales back to min_replicas.
- Scale to zero: idle past scale_to_zero_after, the deployment goes to 0 replicas and its slice is
  released; the next request through the gateway wakes it and is held until the new replica is ready,
  answered with `x-gpumesh-degraded: queued` and the held time (printed: the cold start).
- The cost ceiling: the same burst on a deployment whose ceiling pays for two replicas stops at two, and a
  Warning event says so with the figures.
- Bad policies are refused with INVALID_ARGUMENT naming the field, from the SDK and from meshctl.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from gpumesh.v1 import deployment_service_pb2 as D
from mesh import errors, scalingpolicy
from tests.integration.conftest import wait_for
from tests.integration.serving import h100_hosts, llama_env, need_llama, register_smollm2, started_cluster
from tests.integration.serving import meshctl_in_process as meshctl
from tests.models_util import smollm2_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]
HOSTS = h100_hosts(2)
READY = D.REPLICA_STATE_READY
SLOW = 300
NO_EOS = {"0": -100, "1": -100, "2": -100}     # SmolLM2's end tokens banned: every answer is max_tokens long
H100_1G = 2.49 / 8                              # one replica: a 1g.10gb MIG slice, 1/8 of an H100 at $2.49/h


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_llama("starlette")
    smollm2_gguf()
    with started_cluster(tmp_path_factory, "autoscale", HOSTS, timeout=120, env=llama_env(),
                         agent_args=["--telemetry-interval-seconds", "0.5"],
                         controlplane_args=["--autoscaler-interval-seconds", "0.5", "--deployment-backoff-seconds",
                                            "0.5", "--deployment-backoff-max-seconds", "2"],
                         gateway=True, gateway_args=["--llamacpp-concurrency", "8", "--queue-size", "64"]) as c:
        yield c


@pytest.fixture(scope="module")
def mesh(cluster):
    from mesh.client import MeshClient
    with MeshClient(cluster.endpoint, timeout=60) as m:
        register_smollm2(m)
        yield m


def ready(n: int):
    return lambda d: d.spec.replicas == n and d.status.ready_replicas == n and len(d.replicas) == n


def in_gateway(cluster, name: str, ready_n: int | None = None, total: int | None = None) -> bool:
    import httpx
    models = httpx.get(f"{cluster.gateway_url}/v1/gpu/status", timeout=30).json()["models"]
    m = next((m for m in models if m["name"] == name), None)
    if m is None:
        return False
    return ((ready_n is None or sum(1 for r in m["replicas"] if r["ready"]) == ready_n)
            and (total is None or len(m["replicas"]) == total))


def complete(cluster, name: str, max_tokens: int = 48, headers=None):
    import httpx
    return httpx.post(f"{cluster.gateway_url}/v1/chat/completions", timeout=900, headers=headers or {},
                      json={"model": name, "messages": [{"role": "user", "content": "Tell me a story."}],
                            "max_tokens": max_tokens, "logit_bias": NO_EOS, "temperature": 0.7})


class Burst:
    """`n` concurrent requests through the gateway, repeated until stopped; records the replicas wanted."""

    def __init__(self, cluster, mesh, name: str, n: int) -> None:
        self.cluster, self.mesh, self.name, self.n = cluster, mesh, name, n
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.wanted: list[int] = []
        self.threads = [threading.Thread(target=self._send, daemon=True) for _ in range(n)]
        self.threads.append(threading.Thread(target=self._watch, daemon=True))

    def _send(self) -> None:
        while not self.stop.is_set():
            try:
                self.statuses.append(complete(self.cluster, self.name).status_code)
            except Exception:       # noqa: BLE001 - counted as a failure below
                self.statuses.append(-1)

    def _watch(self) -> None:
        while not self.stop.is_set():
            self.wanted.append(self.mesh.get_deployment(self.name).spec.replicas)
            time.sleep(0.2)

    def __enter__(self) -> "Burst":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=900)


def events(mesh, name: str, reason: str) -> list:
    return [e for e in mesh.list_events(kind="Deployment", name=name) if e.reason == reason]


def test_a_burst_scales_up_within_the_bounds_and_back_down(cluster, mesh):
    mesh.deploy("smollm2", name="burst", replicas=1, context=512)
    mesh.wait_deployment("burst", ready(1), timeout=SLOW)
    policy = scalingpolicy.build(min_replicas=1, max_replicas=3, metric="concurrency", target=1,
                                 stable_window_s=4, panic_window_s=1, scale_down_delay_s=3)
    d = mesh.set_scaling("burst", policy)
    assert d.spec.scaling.max_replicas == 3
    wait_for(lambda: in_gateway(cluster, "burst", ready_n=1), 60, "the gateway sees the replica")
    with Burst(cluster, mesh, "burst", 6) as burst:
        wait_for(lambda: mesh.get_deployment("burst").spec.replicas >= 2, SLOW, "a scale-up under the burst")
        d = mesh.wait_deployment("burst", lambda d: d.status.ready_replicas >= 2, timeout=SLOW)
        # while the burst goes on: the policy and the decision, from meshctl and the gateway
        rc, out, err = meshctl(cluster, "get", "policies", "-o", "json")
        assert rc == 0, err
        doc = next(x for x in json.loads(out)["items"] if x["deployment"] == "burst")
        assert doc["policy"]["max_replicas"] == 3 and doc["policy"]["stable_window_seconds"] == 4
        assert doc["autoscaler"]["desired"] >= 2 and "in_flight" in doc["autoscaler"]["signals"]
        rc, out, _ = meshctl(cluster, "get", "policies", "-o", "wide")
        assert rc == 0 and "burst" in out and "4s/1s" in out
        import httpx

        def gateway_lists_the_policy():      # the gateway learns the policy by watching the deployments
            gw = httpx.get(f"{cluster.gateway_url}/policies", timeout=30).json()
            return [p["policy"]["max_replicas"] for p in gw["scaling_policies"] if p["deployment"] == "burst"] == [3]
        wait_for(gateway_lists_the_policy, 30, "the gateway's /policies to list the burst's policy")
        rc, out, _ = meshctl(cluster, "describe", "deployment", "burst")
        assert rc == 0 and "Scaling:" in out and "1-3" in out and "Desired:" in out
    print(f"burst: {len(burst.statuses)} requests, replicas wanted over time: max {max(burst.wanted)}, "
          f"ready during the burst {d.status.ready_replicas}")
    assert burst.statuses and all(s == 200 for s in burst.statuses), burst.statuses
    assert 2 <= max(burst.wanted) <= 3, burst.wanted
    up = wait_for(lambda: events(mesh, "burst", "Autoscaled"), 30, "the scale-up's Autoscaled event")
    assert "replicas 1 -> " in up[0].message and "signals:" in up[0].message and "queue=" in up[0].message
    # after the burst: back to min_replicas once the stable window and the scale-down delay pass
    d = mesh.wait_deployment("burst", ready(1), timeout=SLOW)
    assert d.status.autoscaler.desired == 1
    wait_for(lambda: [e for e in events(mesh, "burst", "Autoscaled") if "-> 1 " in e.message], 30,
             "the scale-down's Autoscaled event")        # written in a batch after the change it records
    mesh.undeploy("burst")


def test_scale_to_zero_then_the_first_request_is_held_until_a_replica_is_ready(cluster, mesh):
    mesh.deploy("smollm2", name="sleepy", replicas=1, context=512)
    mesh.wait_deployment("sleepy", ready(1), timeout=SLOW)
    mesh.set_scaling("sleepy", scalingpolicy.build(max_replicas=1, target=1, scale_to_zero_after_s=3,
                                                   stable_window_s=2, panic_window_s=0.5, scale_down_delay_s=0))
    d = mesh.wait_deployment("sleepy", lambda d: d.spec.replicas == 0 and not d.replicas, timeout=SLOW)
    assert d.status.autoscaler.desired == 0
    wait_for(lambda: events(mesh, "sleepy", "ScaledToZero"), 30, "the ScaledToZero event")
    wait_for(lambda: in_gateway(cluster, "sleepy", total=0), 60, "the gateway sees no replica")
    started = time.monotonic()
    r = complete(cluster, "sleepy", max_tokens=4)
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert r.headers["x-gpumesh-degraded"] == "queued"
    held_ms = int(r.headers["x-gpumesh-held-ms"])
    print(f"scale from zero: the first request was held {held_ms / 1000:.1f}s (cold start: slice + model load), "
          f"answered after {took:.1f}s")
    assert held_ms > 0
    woke = wait_for(lambda: events(mesh, "sleepy", "WokenFromZero"), 30, "the WokenFromZero event")
    assert "0 -> 1" in woke[0].message
    d = mesh.get_deployment("sleepy")
    assert d.status.autoscaler.HasField("woken_at")
    mesh.undeploy("sleepy")


def test_the_cost_ceiling_stops_a_scale_up_and_says_why(cluster, mesh):
    mesh.deploy("smollm2", name="capped", replicas=1, context=512)
    mesh.wait_deployment("capped", ready(1), timeout=SLOW)
    ceiling = round(2 * H100_1G + 0.02, 2)         # pays for two replicas, not three
    mesh.set_scaling("capped", scalingpolicy.build(min_replicas=1, max_replicas=4, target=1, stable_window_s=4,
                                                   panic_window_s=1, scale_down_delay_s=3,
                                                   cost_ceiling_per_hour=ceiling))
    wait_for(lambda: in_gateway(cluster, "capped", ready_n=1), 60, "the gateway sees the replica")
    with Burst(cluster, mesh, "capped", 6) as burst:
        warn = wait_for(lambda: events(mesh, "capped", "CostCeiling"), SLOW, "the cost ceiling's warning")
        wait_for(lambda: mesh.get_deployment("capped").status.autoscaler.bound_by == "cost_ceiling", SLOW,
                 "the decision bound by the cost ceiling")
        # the event and the status can come before the replicas are written: wait for the write, then keep
        # the burst on a little so that a scale past the ceiling would show
        wait_for(lambda: mesh.get_deployment("capped").spec.replicas == 2, SLOW, "the two replicas it pays for")
        time.sleep(3)
    assert max(burst.wanted) == 2, burst.wanted
    print(f"cost ceiling: {warn[0].message}")
    assert warn[0].type == "Warning" and f"${ceiling:g}/h" in warn[0].message
    assert f"${H100_1G:.4f}/h each" in warn[0].message
    d = mesh.get_deployment("capped")
    assert d.status.autoscaler.replica_cost_per_hour == pytest.approx(H100_1G)
    mesh.undeploy("capped")


def test_bad_policies_are_refused_naming_the_field(cluster, mesh):
    mesh.deploy("smollm2", name="strict", replicas=0, context=512)
    cases = [(dict(min_replicas=3, max_replicas=2, target=1), "policy.min_replicas"),
             (dict(max_replicas=2, target=1, stable_window_s=-10), "policy.stable_window_seconds"),
             (dict(max_replicas=2, target=1, scale_down_delay_s=-1), "policy.scale_down_delay_seconds"),
             (dict(max_replicas=2, target=1, metric="gpu_util"), "policy.metric"),
             (dict(max_replicas=2, target=0), "policy.target"),
             (dict(min_replicas=1, max_replicas=2, target=1, scale_to_zero_after_s=60),
              "policy.scale_to_zero_after_seconds"),
             (dict(max_replicas=2, target=1, cost_ceiling_per_hour=0.1), "policy.cost_ceiling_per_hour"),
             (dict(max_replicas=2, target=1, slo_ttft_ms=-5), "policy.slo_ttft_ms"),
             (dict(max_replicas=2, target=1, predictive=True, sizing="erlang"), "policy.sizing"),
             (dict(max_replicas=2, target=1, slo_ttft_ms=800, sizing_quantile=1.5), "policy.sizing_quantile")]
    for fields, field in cases:
        with pytest.raises(errors.InvalidArgument) as e:
            mesh.set_scaling("strict", scalingpolicy.build(**fields))
        assert field in str(e.value) and "allowed" in str(e.value), str(e.value)
    with pytest.raises(errors.InvalidArgument) as e:
        mesh.set_scaling("strict", scalingpolicy.build(max_replicas=2, target=1, cost_ceiling_per_hour=0.1))
    assert f"{H100_1G:.4f}" in str(e.value)            # one replica's cost, from its slice and the price table
    # Create checks the policy too, naming the spec's field
    from gpumesh.v1 import deployment_service_pb2_grpc
    stub = deployment_service_pb2_grpc.DeploymentServiceStub(mesh._channel)
    import grpc
    spec = D.DeploymentSpec(name="strict2", model="smollm2", replicas=1,
                            scaling=scalingpolicy.build(min_replicas=3, max_replicas=2, target=1))
    with pytest.raises(grpc.RpcError) as e:
        stub.Create(D.CreateDeploymentRequest(spec=spec), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec.scaling.min_replicas" in e.value.details()
    # meshctl says it too, and exits non-zero
    rc, _, err = meshctl(cluster, "autoscale", "strict", "--min", "5", "--max", "2", "--target", "1")
    assert rc != 0 and "policy.min_replicas" in err
    rc, _, err = meshctl(cluster, "autoscale", "strict", "--max", "2", "--target", "1", "--stable-window=-5s")
    assert rc != 0 and "policy.stable_window_seconds" in err
    assert not mesh.get_deployment("strict").spec.HasField("scaling")
    rc, out, err = meshctl(cluster, "autoscale", "strict", "--max", "2", "--target", "3", "--scale-down-delay", "1m")
    assert rc == 0 and "1-2 replicas" in out and "down after 60s" in out, err
    # the objective and the sizing the bench measures reach the control plane from meshctl and come back
    rc, out, err = meshctl(cluster, "autoscale", "strict", "--max", "2", "--target", "1", "--predictive",
                           "--slo-ttft", "6800", "--catch-up", "off", "-o", "json")
    assert rc == 0, err
    doc = json.loads(out)["policy"]
    assert (doc["slo_ttft_ms"], doc["sizing"], doc["sizing_quantile"], doc["nowcast"], doc["catch_up"]) == \
        (6800, "erlang", 0.7, True, False)
    sc = mesh.get_deployment("strict").spec.scaling
    assert sc.slo_ttft_ms == 6800 and sc.HasField("catch_up") and not sc.catch_up and not sc.HasField("nowcast")
    mesh.undeploy("strict")
