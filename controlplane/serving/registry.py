"""The model registry (ModelService): models and their variants, in etcd under `/gpumesh/v1/models/<name>`.

The leader loads every model at start and keeps them in memory; Register, Update and Delete write
through the group-commit writer (controlplane/state/writer.py) like every other record: one transaction
guarded by the leader key (fencing) plus the key's precondition (Register: absent, so a name is taken
once; Update and Delete: present). The registry's own lock orders its writes, so Update's generation
check and the write it guards are one step. Standbys answer Get and List from the same records, kept
current by their follower (controlplane/state/follower.py).

What is stored is what `validate` returned: the derived facts (artifact format, kv_bytes_per_token,
the VRAM need at the serving point and the smallest slice per GPU model) are computed when written,
against the GPU models of the fleet at that moment. Reads answer the smallest slices for the fleet as
it is when read (`view`): nodes of new GPU models show up, departed ones drop out.
"""

from __future__ import annotations

import asyncio
import os
import logging

from prometheus_client import Gauge

from controlplane.state import keys
from controlplane.controllers.slices import Controller, now
from controlplane.api.rpc import unary
from controlplane.serving.validate import check_name, pin_digests, slice_fits, validate
from controlplane.state.store import Absent, Delete, Present, Put
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import model_service_pb2_grpc
from mesh import errors, gpumodels
from mesh.logs import log
from mesh.models import vram

logger = logging.getLogger(__name__)
MODELS = Gauge("gpumesh_models", "Models in the registry (the leader's count)")
VARIANTS = Gauge("gpumesh_model_variants", "Variants of the registry's models (the leader's count)")


def same_artifact(a: str, b: str) -> bool:
    """Do two artifact references name the same path (a path and its file:// URI do)?"""
    from mesh.models import artifact
    try:
        return os.path.realpath(artifact.resolve(a)) == os.path.realpath(artifact.resolve(b))
    except (artifact.ArtifactError, OSError, ValueError):
        return a == b


def pinned(model: M.Model, old: M.Model | None) -> M.Model:
    """`model` with the registered digest filled in for each variant that names the same artifact as before
    and gives no digest: new weights at the same path are then refused until their digest is given."""
    if old is None:
        return model
    before = {v.name: v for v in old.variants}
    m = M.Model()
    m.CopyFrom(model)
    for v in m.variants:
        prev = before.get(v.name)
        if prev is not None and not v.artifact_sha256 and same_artifact(v.artifact, prev.artifact):
            v.artifact_sha256 = prev.artifact_sha256
    return m


def variants_run(spec) -> list[str]:
    """Every variant a deployment can run: its own, then those its scaling policy names (the autoscaler starts
    an overflow companion of one when the deployment's own variant gets no room)."""
    policy = list(spec.scaling.variants) if spec.HasField("scaling") else []
    return list(dict.fromkeys([spec.variant, *policy]))


class ModelRegistry:
    """The registry's records (name -> Model) and its guarded writes."""

    def __init__(self, ctl: Controller, check_artifacts: bool = True) -> None:
        self.ctl = ctl
        self.models: dict[str, M.Model] = {}
        self.check_artifacts = check_artifacts
        self._lock = asyncio.Lock()

    @property
    def lock(self) -> asyncio.Lock:
        """Held while a write changes the registry (Update and Delete check the deployments that run the model
        under it): DeploymentManager.create checks its model and writes under it too."""
        return self._lock

    async def load(self) -> None:
        snap = await self.ctl.store.load(keys.MODELS)
        self.models.clear()
        for key, (value, _rev, _lease) in snap.kvs.items():
            m = M.Model.FromString(value)
            self.models[keys.name_of(key, keys.MODELS)] = m
        self._count()
        log(logger, logging.INFO, "model registry loaded", models=len(self.models))

    def _count(self) -> None:
        MODELS.set(len(self.models))
        VARIANTS.set(sum(len(m.variants) for m in self.models.values()))

    def gpu_models(self) -> list[gpumodels.GpuModel]:
        """The GPU models of the fleet's nodes (empty while no node has registered)."""
        return list({g.model.name: g.model for e in self.ctl.fleet.nodes.values() for g in e.gpus}.values())

    # -- reads ------------------------------------------------------------------------------

    def view(self, m: M.Model) -> M.Model:
        """`m` with each variant's smallest slices for the fleet's GPU models now (as stored while no
        node has registered, or when they are the same models)."""
        fleet = self.gpu_models()
        names = sorted(g.name for g in fleet)
        if not fleet or all(sorted(s.gpu_model for s in v.vram.slices) == names for v in m.variants):
            return m
        out = M.Model()
        out.CopyFrom(m)
        for v in out.variants:
            del v.vram.slices[:]
            v.vram.slices.extend(slice_fits(vram.slices_for(v.vram.total_bytes, fleet)))
        return out

    def get(self, name: str) -> M.Model:
        check_name(name, "name")
        m = self.models.get(name)
        if m is None:
            raise errors.NotFound(f"no model {name!r}", kind="model", name=name)
        return m

    def list(self, family: str = "", labels: dict[str, str] | None = None) -> list[M.Model]:
        labels = labels or {}
        return [m for _, m in sorted(self.models.items())
                if (not family or m.family == family) and all(m.labels.get(k) == v for k, v in labels.items())]

    # -- writes -----------------------------------------------------------------------------

    async def _validated(self, model: M.Model, old: M.Model | None = None) -> M.Model:
        """`model` validated (with `old`, the registered one: its digests pinned where the artifact is the same).
        Everything that touches the filesystem runs in a worker thread, off the event loop: resolving and
        comparing paths (a stat on a slow or hung network filesystem blocks), checking the artifact's type
        and format (never opening anything but a regular file: artifact.check_kind), and its digest, which
        reads it whole (about a second per GB), after the cheap checks have passed."""
        fleet, check = self.gpu_models(), self.check_artifacts

        def work() -> M.Model:
            m = validate(pinned(model, old), fleet, check)
            return pin_digests(m) if check else m
        return await asyncio.to_thread(work)

    async def register(self, model: M.Model) -> M.Model:
        m = await self._validated(model)
        async with self._lock:
            if m.name in self.models:
                raise errors.AlreadyExists(f"model {m.name!r} already exists: update it, or delete it first")
            m.created_at.CopyFrom(now())
            m.updated_at.CopyFrom(m.created_at)
            m.generation = 1
            try:
                await self.ctl.writer.write([Put(keys.model(m.name), m.SerializeToString())],
                                            [Absent(keys.model(m.name))])
            except errors.Aborted:
                raise errors.AlreadyExists(f"model {m.name!r} already exists") from None
            self.models[m.name] = m
            self._count()
        log(logger, logging.INFO, "model registered", model=m.name, variants=",".join(v.name for v in m.variants))
        return m

    async def update(self, model: M.Model) -> M.Model:
        check_name(model.name, "model.name")
        if model.generation < 0:
            raise errors.InvalidArgument.of("model.generation", f"{model.generation} is negative",
                                            "0 (no check) or the generation the model was read at")
        m = await self._validated(model, self.models.get(model.name))
        async with self._lock:
            old = self.get(m.name)
            if model.generation and model.generation != old.generation:
                raise errors.Aborted(f"model {m.name!r} is at generation {old.generation}, not {model.generation}: "
                                     f"read it again and retry")
            users = self.users(m.name, {v.name for v in m.variants})
            if users:
                raise errors.FailedPrecondition(
                    f"model.variants: the update drops variant(s) that deployment(s) {', '.join(users)} run or "
                    f"name in their scaling policy; keep them, or delete those deployments (or take the variants "
                    f"out of their policies) first")
            before = self.misfits(old)
            misfits = [why for n, why in self.misfits(m).items() if n not in before]    # (the update's doing)
            if misfits:
                raise errors.FailedPrecondition(
                    f"model.variants: deployment(s) run settings the updated variant(s) do not allow: "
                    f"{'; '.join(misfits)}; change those deployments first, or keep the variants as they are"[:2000])
            m.created_at.CopyFrom(old.created_at)
            m.updated_at.CopyFrom(now())
            m.generation = old.generation + 1
            try:
                await self.ctl.writer.write([Put(keys.model(m.name), m.SerializeToString())],
                                            [Present(keys.model(m.name))])
            except errors.Aborted:
                self.models.pop(m.name, None)
                raise errors.NotFound(f"no model {m.name!r} (deleted meanwhile)", kind="model", name=m.name) from None
            self.models[m.name] = m
            self._count()
        log(logger, logging.INFO, "model updated", model=m.name, generation=m.generation)
        return m

    def users(self, name: str, variants: set[str] | None = None) -> list[str]:
        """The deployments that run model `name` (with `variants`: those that can run a variant not among them,
        each with the variants it lacks). A variant named only in a deployment's scaling policy is in use too
        (`variants_run`): the overflow would find it gone when it is needed."""
        dm = getattr(self.ctl, "deployments", None)
        if dm is None:
            return []
        out = []
        for n, d in sorted(dm.store.deployments.items()):
            if d.spec.model != name:
                continue
            if variants is None:
                out.append(n)
                continue
            missing = [v for v in variants_run(d.spec) if v not in variants]
            if missing:
                out.append(f"{n} ({', '.join(missing)})")
        return out

    def misfits(self, m: M.Model) -> dict[str, str]:
        """The deployments of `m` whose settings its variants do not allow, each with why: a context beyond the
        variant's max_context, a need no slice of the fleet holds, ... (their replicas could not start)."""
        from controlplane.serving import deployspec
        dm = getattr(self.ctl, "deployments", None)
        variants = {v.name: v for v in m.variants}
        out = {}
        for n, d in sorted(dm.store.deployments.items()) if dm is not None else ():
            v = variants.get(d.spec.variant)
            if d.spec.model != m.name or v is None:
                continue
            try:
                deployspec.check_settings(d.spec, v)
                deployspec.check_fits(deployspec.need_bytes(d.spec, v), self.gpu_models())
            except errors.MeshError as e:
                out[n] = f"{n} ({d.spec.variant}): {e}"
        return out

    async def delete(self, name: str) -> M.Model:
        async with self._lock:
            m = self.get(name)
            users = self.users(name)
            if users:
                # their replicas could no longer be replaced (a crash, a node lost, a scale-up)
                raise errors.FailedPrecondition(f"model {name!r} is in use by deployment(s) {', '.join(users)}: "
                                                f"delete them first")
            try:
                await self.ctl.writer.write([Delete(keys.model(name))], [Present(keys.model(name))])
            except errors.Aborted:
                pass            # gone already: the same end state
            self.models.pop(name, None)
            self._count()
        log(logger, logging.INFO, "model deleted", model=name)
        return m


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """The v1 API onto the registry. Roles are checked by the interceptor (controlplane/api/auth.py RULES):
    Register, Update and Delete need admin; Get and List a viewer or more. Models are not per tenant."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.r = registry

    @unary
    async def Register(self, request, context):
        return await self.r.register(request.model)

    @unary
    async def Get(self, request, context):
        return self.r.view(self.r.get(request.name))

    @unary
    async def List(self, request, context):
        return M.ListModelsResponse(models=[self.r.view(m) for m in self.r.list(request.family, dict(request.labels))])

    @unary
    async def Update(self, request, context):
        return await self.r.update(request.model)

    @unary
    async def Delete(self, request, context):
        return await self.r.delete(request.name)
