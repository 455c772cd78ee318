"""The v1 DeploymentService onto the deployment controller (controlplane/serving/deployments.py).

Roles are checked by the interceptor (controlplane/api/auth.py RULES): Create, Scale, Update, Delete,
SetScaling and Wake need the tenant role, Get, List and Watch a viewer. A tenant acts on its own tenant's
deployments only (another tenant's read as unknown); an admin on all.
"""

from __future__ import annotations

import asyncio

from controlplane.api import auth
from controlplane.api.rpc import streaming, unary
from controlplane.controllers import autoscale_variants
from controlplane.serving import deployspec
from controlplane.serving.deployments import DeploymentManager
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import deployment_service_pb2_grpc
from mesh import errors

WATCH_HEARTBEAT = 30.0
DEFAULT_TENANT = "default"      # a Watch re-sends the deployment at least this often


class DeploymentService(deployment_service_pb2_grpc.DeploymentServiceServicer):
    def __init__(self, manager: DeploymentManager) -> None:
        self.m = manager

    def _own(self, name: str, field: str = "name") -> D.Deployment:
        deployspec.check_name(name, field)        # INVALID_ARGUMENT for a bad name, before looking it up
        d = self.m.store.get(name)
        auth.check_visible(d.spec.tenant, "deployment", name)
        return d

    @staticmethod
    def _check_system_labels(spec: D.DeploymentSpec, before: D.DeploymentSpec | None = None) -> None:
        """A tenant may not set the labels that make a deployment another's variant-overflow companion (the
        autoscaler sets them on the companions it creates; an Update that keeps the stored value is fine)."""
        if auth.current().admin:
            return
        for key in (autoscale_variants.LABEL_OVERFLOW_OF, autoscale_variants.LABEL_OVERFLOW_PARENT_CREATED):
            value = spec.labels.get(key)
            if value is not None and (before is None or before.labels.get(key) != value):
                raise errors.InvalidArgument.of(f"spec.labels[{key!r}]", "is set by gpumesh itself (the "
                                                "autoscaler's variant-overflow companions)", "other labels")

    @unary
    async def Create(self, request, context):
        spec = request.spec
        spec.tenant = auth.scope_tenant(spec.tenant, "spec.tenant")
        self._check_system_labels(spec)
        spec.tenant = spec.tenant or DEFAULT_TENANT        # an admin (or the insecure demo) naming none
        return await self.m.create(spec)

    @unary
    async def Get(self, request, context):
        self._own(request.name)
        return self.m.store.full(request.name)

    @unary
    async def List(self, request, context):
        tenant = auth.scope_tenant(request.tenant)
        labels = dict(request.labels)
        out = [self.m.store.full(n) for n, d in sorted(self.m.store.deployments.items())
               if (not tenant or d.spec.tenant == tenant) and (not request.model or d.spec.model == request.model)
               and all(d.spec.labels.get(k) == v for k, v in labels.items())]
        return D.ListDeploymentsResponse(deployments=out)

    @unary
    async def Scale(self, request, context):
        self._own(request.name)
        return await self.m.scale(request.name, request.replicas)

    @unary
    async def Update(self, request, context):
        d = self._own(request.spec.name, "spec.name")
        self._check_system_labels(request.spec, d.spec)
        return await self.m.update(request.spec, request.generation)

    @unary
    async def Delete(self, request, context):
        self._own(request.name)
        return await self.m.delete(request.name)

    @unary
    async def SetScaling(self, request, context):
        self._own(request.name)
        return await self.m.scaling.set_scaling(request.name, request.policy, request.clear)

    @unary
    async def Wake(self, request, context):
        self._own(request.name)
        return await self.m.scaling.wake(request.name)

    @streaming
    async def Watch(self, request, context):
        first = self._own(request.name)
        ev = self.m.store.subscribe(request.name)
        try:
            while True:
                if getattr(ev, "ended", False):
                    raise errors.Aborted("the watch was ended by the control plane (a standby reloaded or was "
                                         "promoted): watch again")
                ev.clear()
                cur = self.m.store.deployments.get(request.name)
                # deleted: the stream ends. A deployment created since under the same name is another one (maybe
                # another tenant's), which this stream was never allowed to see: it ends too.
                if cur is None or cur.created_at != first.created_at or cur.spec.tenant != first.spec.tenant:
                    return
                yield self.m.store.full(request.name)
                try:
                    async with asyncio.timeout(WATCH_HEARTBEAT):   # not wait_for: it can drop a cancel (gh-86296)
                        await ev.wait()
                except TimeoutError:
                    pass
        finally:
            self.m.store.unsubscribe(request.name, ev)
