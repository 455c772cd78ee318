"""Scale from zero: a request for a deployment with no READY replica whose scaling policy scales to zero
wakes it and is held until a replica is ready.

The gateway's serving view carries each deployment's spec with its policy (`spec.scaling`). When a request
resolves to deployments with no READY replica among which one scales to zero, the gateway asks the control
plane to wake them (DeploymentService.Wake, idempotent: concurrent requests share one call per deployment)
and lets the request wait in its model's queue (controlplane/gateway/admission.py) for up to its deadline
(`x-gpumesh-deadline-ms`), else `wake_timeout_seconds`, rather than `queue_timeout_seconds`: a replica's
cold start (a slice, then the model's load) is longer than a queue wait. The queue hands it a slot as soon
as the view shows the replica READY; the answer says `x-gpumesh-degraded: queued` and
`x-gpumesh-held-ms`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import deployment_service_pb2_grpc
from mesh.logs import log

logger = logging.getLogger(__name__)
REWAKE_S = 2.0          # a deployment is asked again at most this often (the first call may race a scale-down)


def scales_to_zero(d: D.Deployment) -> bool:
    p = d.spec.scaling
    return d.spec.HasField("scaling") and p.scale_to_zero_after_seconds > 0 and p.HasField("min_replicas") \
        and p.min_replicas == 0


class Waker:
    def __init__(self, cfg, view) -> None:
        self.cfg = cfg
        self.view = view
        self.targets = [t.strip() for t in cfg.control_plane.split(",") if t.strip()]
        self.turn = 0
        self._channel: grpc.aio.Channel | None = None
        self._specs: dict[str, D.Deployment] = {}
        self._calls: dict[str, asyncio.Task] = {}
        self._asked: dict[str, float] = {}
        self.wakes = 0
        view.listeners.append(self._index)

    def _index(self) -> None:
        raw = self.view.raw
        self._specs = {d.spec.name: d for d in raw.deployments} if raw is not None else {}

    def asleep(self, deps) -> list[str]:
        """The deployments among `deps` (DeploymentInfo) with no READY replica that scale to zero."""
        out = []
        for d in deps:
            cur = self.view.deployments.get(d.name, d)
            spec = self._specs.get(d.name)
            if spec is not None and scales_to_zero(spec) and not any(r.ready for r in cur.replicas):
                out.append(d.name)
        return out

    def hold_seconds(self, deadline_ms: float | None) -> float:
        return deadline_ms / 1000 if deadline_ms else self.cfg.wake_timeout_seconds

    async def wake(self, names: list[str]) -> None:
        """Ask the control plane to wake each (one call in flight per deployment); never raises: a failed
        call is logged and the request waits for its deadline anyway (another request, or the autoscaler,
        may wake it)."""
        tasks = []
        for name in names:
            spec = self._specs.get(name)
            task = self._calls.get(name)
            if task is None or task.done():
                recent = time.monotonic() - self._asked.get(name, 0) < REWAKE_S
                if spec is not None and spec.spec.replicas > 0 and recent:
                    continue        # already woken (its replica is starting)
                self._asked[name] = time.monotonic()
                task = self._calls[name] = asyncio.get_running_loop().create_task(self._call(name))
            tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    async def keep_waking(self, names: list[str]) -> None:
        """While a request is held: ask again, every REWAKE_S, for each deployment still asleep whose
        replica count is still zero (the first Wake failed: a control plane restarting, a standby)."""
        while True:
            await asyncio.sleep(REWAKE_S)
            sleeping = self.asleep_names(names)
            still = [n for n in names if n in sleeping
                     and (self._specs.get(n) is None or self._specs[n].spec.replicas == 0)]
            if still:
                await self.wake(still)

    def asleep_names(self, names: list[str]) -> set[str]:
        deps = [self.view.deployments[n] for n in names if n in self.view.deployments]
        return set(self.asleep(deps))

    def _stub(self) -> deployment_service_pb2_grpc.DeploymentServiceStub:
        if self._channel is None:
            target = self.targets[self.turn % len(self.targets)]
            if self.cfg.insecure:
                self._channel = grpc.aio.insecure_channel(target)
            else:
                with open(self.cfg.tls_ca, "rb") as f:
                    creds = grpc.ssl_channel_credentials(root_certificates=f.read())
                self._channel = grpc.aio.secure_channel(target, creds)
        return deployment_service_pb2_grpc.DeploymentServiceStub(self._channel)

    async def _call(self, name: str) -> None:
        md = (("authorization", f"Bearer {self.cfg.token}"),) if self.cfg.token else None
        for _ in range(max(1, len(self.targets))):
            try:
                resp = await self._stub().Wake(D.WakeDeploymentRequest(name=name), metadata=md, timeout=8)
                self.wakes += int(resp.woke)
                log(logger, logging.INFO, "woke a deployment scaled to zero" if resp.woke else
                    "deployment already waking", deployment=name, replicas=resp.replicas, ready=resp.ready_replicas)
                return
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and len(self.targets) > 1:
                    await self.close()          # a standby: try the next control plane
                    self.turn += 1
                    continue
                log(logger, logging.WARNING, "waking a deployment failed; the request waits for its deadline",
                    deployment=name, code=e.code().name, detail=e.details())
                return

    async def close(self) -> None:
        if self._channel is not None:
            ch, self._channel = self._channel, None
            await ch.close()
