"""The gateway's side of scale to zero, without a cluster (the whole path runs in
tests/integration/test_autoscaling.py): which deployments are asleep, how long a request for one is held, the
held time on the answer, and `/policies` listing the scaling policies the caller may see."""

from __future__ import annotations

import httpx

from controlplane.gateway.service import Gateway, Trace
from controlplane.gateway.wake import scales_to_zero
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import servingview_service_pb2 as V
from mesh import scalingpolicy
from tests.unit.test_gateway_routing import cfg


def _view() -> V.ServingView:
    asleep = D.Deployment(spec=D.DeploymentSpec(name="sleepy", model="m", tenant="team-a", replicas=0,
                                                scaling=scalingpolicy.build(max_replicas=2, target=1,
                                                                            scale_to_zero_after_s=60)))
    awake = D.Deployment(spec=D.DeploymentSpec(name="awake", model="m2", tenant="team-b", replicas=1,
                                               scaling=scalingpolicy.build(max_replicas=2, target=1,
                                                                           scale_to_zero_after_s=60)))
    awake.replicas.append(D.Replica(id="r-1", deployment="awake", state=D.REPLICA_STATE_READY,
                                    endpoint="127.0.0.1:9"))
    fixed = D.Deployment(spec=D.DeploymentSpec(name="fixed", model="m3", tenant="team-a", replicas=0,
                                               scaling=scalingpolicy.build(min_replicas=0, max_replicas=2, target=1)))
    plain = D.Deployment(spec=D.DeploymentSpec(name="plain", model="m4", tenant="team-a", replicas=0))
    return V.ServingView(deployments=[asleep, awake, fixed, plain])


def test_only_a_deployment_without_ready_replicas_whose_policy_scales_to_zero_is_asleep():
    gw = Gateway(cfg(wake_timeout_seconds=120))
    gw.view.apply(_view())
    deps = list(gw.view.deployments.values())
    assert gw.waker.asleep(deps) == ["sleepy"]
    assert not scales_to_zero(gw.view.raw.deployments[2])          # min 0 but no idle period: never at zero
    assert gw.waker.hold_seconds(None) == 120 and gw.waker.hold_seconds(5000) == 5
    t = Trace(degraded="queued", queued_s=12.3456)
    from types import SimpleNamespace
    h = gw._headers(SimpleNamespace(candidate=SimpleNamespace(key="sleepy/r-2")), t)
    assert h["x-gpumesh-degraded"] == "queued" and h["x-gpumesh-held-ms"] == "12346"


async def test_policies_lists_the_scaling_policies():
    from controlplane.gateway.app import create_app
    gw = Gateway(cfg())
    gw.view.apply(_view())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gw") as c:
        doc = (await c.get("/policies")).json()
    assert doc["routing_policy"] == "gpu-aware"
    got = {p["deployment"]: p for p in doc["scaling_policies"]}
    assert sorted(got) == ["awake", "fixed", "sleepy"]                     # "plain" has no policy
    assert got["sleepy"]["policy"]["min_replicas"] == 0 and got["sleepy"]["policy"]["scale_to_zero_after_seconds"] == 60
    assert got["awake"]["replicas"] == 1 and got["fixed"]["policy"]["scale_to_zero_after_seconds"] == 0
    from controlplane.gateway import gpuapi
    mine = gpuapi.policies(gw, "team-a")["scaling_policies"]               # a tenant sees its own only
    assert sorted(p["deployment"] for p in mine) == ["fixed", "sleepy"]
