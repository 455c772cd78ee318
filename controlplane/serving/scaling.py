"""The deployment API's scaling operations: checking a policy against its deployment (the variant's names,
one replica's cost at the configured GPU prices), SetScaling and Wake; and a scale-down by one that names the
replica it removes (`meshctl recommend --apply` of an idle replica).

The policy is part of the deployment's spec (`DeploymentSpec.scaling`), stored in etcd with it by the
deployment store. The leader's autoscaler controller (controlplane/controllers/autoscaler.py) reads it from
there every pass; Wake leaves a note for it (`woken`) so the idle period starts again from the wake.
"""

from __future__ import annotations

import contextlib
import logging
import time

from controlplane.controllers.slices import now
from controlplane.serving import replicacost, scalingspec
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import scaling_pb2 as S
from mesh import errors
from mesh.cost import PriceTable
from mesh.logs import log

logger = logging.getLogger(__name__)


def replica_cost(manager, spec: D.DeploymentSpec, need: int) -> float | None:
    """The least one replica of `spec` costs per hour on the fleet's GPU models (None: no GPU model known
    yet, or no price table)."""
    prices: PriceTable | None = getattr(manager, "prices", None)
    if prices is None:
        return None
    return replicacost.cheapest(need, int(spec.isolation), manager.registry.gpu_models(), prices)


def check(manager, spec: D.DeploymentSpec, variant: M.Variant | None, need: int, model: M.Model | None = None,
          prefix: str = scalingspec.PREFIX) -> None:
    """InvalidArgument naming the field when `spec.scaling` (set) is not a valid policy for `spec`."""
    if not spec.HasField("scaling"):
        return
    names = tuple(v.name for v in model.variants) if model is not None else None
    scalingspec.check(spec.scaling, replica_cost=replica_cost(manager, spec, need), variants=names, prefix=prefix)


class ScalingOps:
    """SetScaling, Wake and remove_replica on a DeploymentManager (controlplane/serving/deployments.py)."""

    def __init__(self, manager) -> None:
        self.m = manager
        self.woken: dict[str, float] = {}          # deployment -> wall time of the last Wake that raised it

    async def set_scaling(self, name: str, policy: S.ScalingPolicy, clear: bool) -> D.Deployment:
        # checked and written under the registry's lock: a model's Update refuses to drop a variant a policy
        # names (registry.py users); a policy naming it written between that check and the write would name a
        # variant that is gone
        async with getattr(self.m.registry, "lock", None) or contextlib.nullcontext():
            return await self._set_scaling(name, policy, clear)

    async def _set_scaling(self, name: str, policy: S.ScalingPolicy, clear: bool) -> D.Deployment:
        d = self.m.store.get(name)
        if not clear:
            probe = D.DeploymentSpec()
            probe.CopyFrom(d.spec)
            probe.scaling.CopyFrom(policy)
            model = self.m.registry.get(d.spec.model)
            variant, need = self.m._resolve(probe)
            check(self.m, probe, variant, need, model, prefix="policy")

        def edit(n: D.Deployment) -> None:
            if clear:
                n.spec.ClearField("scaling")
                n.status.ClearField("autoscaler")
            else:
                n.spec.scaling.CopyFrom(policy)
        out = await self.m._change(name, 0, edit)
        what = "removed" if clear else scalingspec.describe(policy)
        log(logger, logging.INFO, "scaling policy set", deployment=name, policy=what)
        self.m._event(name, "Normal", "ScalingPolicySet" if not clear else "ScalingPolicyRemoved",
                      f"scaling policy {what}", out.spec.tenant)
        return out

    async def wake(self, name: str) -> D.WakeDeploymentResponse:
        d = self.m.store.get(name)
        if not d.spec.HasField("scaling") or not scalingspec.scales_to_zero(d.spec.scaling):
            raise errors.FailedPrecondition(f"deployment {name!r} has no scaling policy that scales to zero "
                                            f"(min_replicas 0 and scale_to_zero_after_seconds > 0): nothing wakes it")
        woke = False
        if d.spec.replicas == 0:
            want = max(1, scalingspec.to_policy(d.spec.scaling).min_replicas)
            raised = []

            def edit(n: D.Deployment) -> None:
                if n.spec.replicas == 0:
                    raised.append(True)
                    n.spec.replicas = want
                    n.status.autoscaler.woken_at.CopyFrom(now())
                    n.status.autoscaler.last_scale_at.CopyFrom(now())
                    n.status.autoscaler.desired = want
                    n.status.autoscaler.mode = "wake"
                    n.status.autoscaler.reason = "a request arrived at the gateway while at zero replicas"
            d = await self.m._change(name, 0, edit)
            woke = bool(raised)
            if woke:
                self.woken[name] = time.time()
                log(logger, logging.INFO, "deployment woken from zero", deployment=name, replicas=want)
                self.m._event(name, "Normal", "WokenFromZero", f"replicas 0 -> {want}: a request arrived at the "
                              f"gateway while at zero replicas (held there until a replica is ready)", d.spec.tenant)
        else:
            d = self.m.store.full(name)
        ready = sum(1 for r in self.m.store.replicas_of(name) if r.state == D.REPLICA_STATE_READY)
        return D.WakeDeploymentResponse(woke=woke, replicas=d.spec.replicas, ready_replicas=ready)

    async def remove_replica(self, name: str, rid: str, generation: int, why: str) -> D.Deployment:
        """Scale deployment `name` down by one, removing its READY replica `rid` and no other. A plain scale-down
        leaves the choice to the controller (the newest READY replica goes first: reconcile.py); here `spec.replicas`
        is lowered and the replica marked TERMINATING in one transaction, so the controller's next pass removes that
        replica (reconcile: terminating) and finds the others as many as wanted. Only while the deployment is at
        `generation` (the one the caller judged), the replica READY beside another READY one, and one replica at
        least stays wanted; else FailedPrecondition naming what changed, and nothing is written."""
        async with self.m._lock:
            d = self.m.store.deployments.get(name)
            if d is None:
                raise errors.FailedPrecondition(f"deployment {name} is gone")
            if d.generation != generation:
                raise errors.FailedPrecondition(f"deployment {name} changed (generation {generation} -> "
                                                f"{d.generation}: scaled or updated meanwhile)")
            replicas = self.m.store.replicas.get(name, {})
            r = replicas.get(rid)
            if r is None or r.state == D.REPLICA_STATE_TERMINATING:
                raise errors.FailedPrecondition(f"replica {rid} of deployment {name} is gone (or being removed)")
            if r.state != D.REPLICA_STATE_READY:
                state = D.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_")
                raise errors.FailedPrecondition(f"replica {rid} of deployment {name} is {state} now")
            if not any(x.id != rid and x.state == D.REPLICA_STATE_READY for x in replicas.values()):
                raise errors.FailedPrecondition(f"replica {rid} is the last READY replica of deployment {name}")
            if d.spec.replicas <= 1:
                raise errors.FailedPrecondition(f"deployment {name} wants {d.spec.replicas} replica(s): one fewer "
                                                f"would be none")
            n = D.Deployment()
            n.CopyFrom(d)
            n.spec.replicas -= 1
            n.generation = d.generation + 1
            n.updated_at.CopyFrom(now())
            t = D.Replica()
            t.CopyFrom(r)
            t.state, t.message = D.REPLICA_STATE_TERMINATING, f"removed: {why}"
            await self.m.store.put_with_replica(n, t)
        self.m.kick()
        log(logger, logging.INFO, "deployment scaled down removing a named replica", deployment=name, replica=rid,
            replicas=n.spec.replicas, why=why)
        self.m._event(name, "Normal", "Scaled", f"replicas {d.spec.replicas} -> {n.spec.replicas}: removing "
                      f"replica {rid}, {why}", n.spec.tenant)
        return self.m.store.full(name)
