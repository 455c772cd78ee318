"""The deployment controller (leader only): makes each deployment's replicas match its spec.

Level-triggered, like the slice and node controllers: every `interval` seconds, and at once after any
API change, it observes each deployment's replicas (their records, slices, workloads, nodes:
controlplane/serving/observe.py), asks `reconcile` (a pure function, controlplane/serving/reconcile.py) what
to do, and carries the actions out (controlplane/serving/actuator.py), each in a task of its own; a replica
with an action in flight is `busy` and left alone until it ends. The state it acts on is in etcd
(controlplane/serving/deploystore.py), so a new leader loads the deployments and replicas and adopts the
running ones: a READY replica's backend is probed again, nothing is restarted that still runs.

Deleting a deployment removes its record at once; its replicas, now of no deployment, are removed by
the next pass (the same rule finishes a delete interrupted by a restart).

Each deployment is reconciled on its own: one whose reconcile raises is logged, counted and told as a
`ReconcileFailed` Warning event (once while its error stays the same: controlplane/serving/passerrors.py), and
the pass goes on with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import Gauge

from controlplane.controllers.slices import new_id, now
from controlplane.loops import PeriodicTask
from controlplane.serving import deployspec, deploystatus, observe, replicamove, scaling
from controlplane.serving import reconcile as rc
from controlplane.serving.actuator import Actuator
from controlplane.serving.deploystore import DeploymentStore
from controlplane.serving.observe import STATE_NAMES
from controlplane.serving.passerrors import PassErrors
from controlplane.scheduler.plugins import quota
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)
REPLICAS = Gauge("gpumesh_deployment_replicas", "Replicas of the leader's deployments by state", ["state"])
W = types_pb2


class DeploymentManager:
    def __init__(self, ctl, workloads, registry, policy: rc.Policy = rc.Policy(), interval: float = 1.0,
                 probe_timeout: float = 60.0, node_lost_seconds: float = 20.0) -> None:
        self.ctl = ctl
        self.workloads = workloads
        self.registry = registry
        self.policy = policy
        self.interval = interval
        self.store = DeploymentStore(ctl)
        self.act = Actuator(ctl, workloads, self.store, probe_timeout)
        self.busy: dict[str, asyncio.Task] = {}          # replica id -> its action
        self.last_probe: dict[str, float] = {}
        self.node_lost_seconds = node_lost_seconds
        self.down_since: dict[str, float] = {}          # node -> when this leader first saw it NotReady
        self._kick = asyncio.Event()
        # a pass every interval, or at once when kicked (a change to a deployment or replica)
        self._loop = PeriodicTask("deployments", self.reconcile_all, interval=lambda: self.interval, wake=self._kick,
                                  on_error=lambda e: logger.error("deployment controller pass", exc_info=e))
        self._lock = asyncio.Lock()
        telemetry = getattr(ctl, "telemetry", None)
        if telemetry is not None and hasattr(telemetry, "backend_listeners"):
            telemetry.backend_listeners.append(self.on_loads)
        self.drain_notes: dict[str, str] = {}          # deployment -> the last "waiting for" node event sent
        ctl.deployments = self                          # NodeManager.drain asks which slices are replicas'
        self.prices = None                              # mesh.cost.PriceTable (the server sets it): policy checks
        self.scaling = scaling.ScalingOps(self)
        self.pass_errors = PassErrors(self._event)      # deployments whose reconcile failed (serving/passerrors.py)

    async def on_loads(self, node: str, loads: list) -> None:
        """The model servers' load signals from `node`'s telemetry: each onto the replica whose current
        workload it was read from (memory only, DeploymentStore.set_load), with the GPU's memory
        pressure and thermal state as the control plane judged them."""
        from controlplane.controllers.telemetry import PRESSURE_ENUM, THERMAL_ENUM
        by_workload = {r.workload_id: r for reps in self.store.replicas.values() for r in reps.values()
                       if r.workload_id and r.node == node}
        for load in loads:
            r = by_workload.get(load.workload_id)
            if r is None:
                continue
            out = types_pb2.BackendLoad()
            out.CopyFrom(load)
            g = self.ctl.fleet.gpu(node, r.gpu_index)
            if g is not None:
                out.gpu_memory_pressure = PRESSURE_ENUM.get(g.memory_pressure, 0)
                out.gpu_thermal_state = THERMAL_ENUM.get(g.thermal_state, 0)
            self.store.set_load(r, out)

    async def load(self) -> None:
        await self.store.load()
        self._loop.start()

    async def stop(self) -> None:
        for t in self.busy.values():
            t.cancel()
        await self._loop.stop()
        await self.act.close()

    def kick(self) -> None:
        self._kick.set()

    def replica_slices(self, node: str) -> set[str]:
        """The slices on `node` that hold replicas of existing deployments (a drain leaves them to this
        controller, which replaces each replica elsewhere before releasing its slice)."""
        return {r.slice_id for name, rs in self.store.replicas.items() if name in self.store.deployments
                for r in rs.values() if r.slice_id and r.node == node}

    # -- API ----------------------------------------------------------------------------------

    def _resolve(self, spec: D.DeploymentSpec):
        model = self.registry.get(deployspec.check_name(spec.model, "spec.model")) if spec.model else None
        if model is None:
            raise errors.InvalidArgument.of("spec.model", "is required", "the name of a registered model")
        variant = deployspec.pick_variant(model, spec.variant)
        deployspec.check_settings(spec, variant)
        need = deployspec.need_bytes(spec, variant)
        return variant, need

    def _resolve_new(self, spec: D.DeploymentSpec):
        try:
            return self._resolve(spec)
        except errors.NotFound:
            raise errors.InvalidArgument.of("spec.model", f"no model {spec.model!r} in the registry",
                                            "a registered model (meshctl get models)") from None

    async def create(self, spec: D.DeploymentSpec) -> D.Deployment:
        deployspec.check_name(spec.name)
        deployspec.check_replicas(spec.replicas)
        deployspec.check_restart_stamp(spec.restart_stamp)
        variant, need = self._resolve_new(spec)
        deployspec.check_fits(need, self.registry.gpu_models())
        deployspec.check_pool(spec, getattr(self.ctl, "pools", None))
        cap = quota.priority_cap(getattr(self.ctl, "scheduler", None), spec.tenant)
        if cap is not None and spec.priority > cap:       # its replicas' slices would never be admitted
            raise errors.ResourceExhausted(f"spec.priority: tenant {spec.tenant} quota max_priority={cap:g} "
                                           f"exceeded: asks priority {spec.priority}")
        scaling.check(self, spec, variant, need, self.registry.get(spec.model))
        deployspec.slice_request(spec, need, "r-check", spread=True)   # tenant, labels, priority as slices take them
        spec.variant = variant.name
        ts = now()
        d = D.Deployment(spec=spec, created_at=ts, updated_at=ts, generation=1,
                         status=D.DeploymentStatus(vram_bytes=need,
                                                   backend=deployspec.BACKEND_KINDS[variant.backend]))
        # checked again under the registry's lock (and the pool under the pools'): a model's (a pool's) Delete checks
        # its users there, then writes; a deployment created between the two ran a model (drew a pool) that was gone
        pools = getattr(self.ctl, "pools", None)
        async with getattr(self.registry, "lock", None) or contextlib.nullcontext():
            scaling.check(self, spec, *self._resolve_new(spec), self.registry.get(spec.model))  # (policy variants)
            async with (getattr(pools, "lock", None) if spec.pool else None) or contextlib.nullcontext():
                deployspec.check_pool(spec, pools)
                async with self._lock:
                    if spec.name in self.store.deployments:
                        raise errors.AlreadyExists(f"deployment {spec.name!r} already exists")
                    if self.store.replicas.get(spec.name):
                        raise errors.FailedPrecondition(f"deployment {spec.name!r} is still being deleted: retry soon")
                    await self.store.create(d)
        log(logger, logging.INFO, "deployment created", deployment=spec.name, model=spec.model,
            variant=variant.name, replicas=spec.replicas, vram=need)
        self._event(spec.name, "Normal", "Created", f"model {spec.model} variant {variant.name}, "
                    f"{spec.replicas} replica(s)", spec.tenant)
        self.kick()
        return self.store.full(spec.name)

    async def _change(self, name: str, generation: int, edit) -> D.Deployment:
        async with self._lock:
            old = self.store.get(name)
            if generation and generation != old.generation:
                raise errors.Aborted(f"deployment {name!r} is at generation {old.generation}, not {generation}")
            d = D.Deployment()
            d.CopyFrom(old)
            edit(d)
            d.generation = old.generation + 1
            d.updated_at.CopyFrom(now())
            await self.store.put(d)
        self.kick()
        return self.store.full(name)

    async def scale(self, name: str, replicas: int) -> D.Deployment:
        deployspec.check_name(name, "name")
        deployspec.check_replicas(replicas, "replicas")
        log(logger, logging.INFO, "deployment scaled", deployment=name, replicas=replicas)
        before = self.store.deployments.get(name)
        out = await self._change(name, 0, lambda d: setattr(d.spec, "replicas", replicas))
        if before is not None and before.spec.replicas != replicas:
            self._event(name, "Normal", "Scaled", f"replicas {before.spec.replicas} -> {replicas}", out.spec.tenant)
        return out

    async def update(self, spec: D.DeploymentSpec, generation: int) -> D.Deployment:
        # checked and written under the registry's lock: a model's Update checks the settings of the deployments
        # that run it there, then writes; new settings written between the two could be ones it refuses
        async with getattr(self.registry, "lock", None) or contextlib.nullcontext():
            return await self._update(spec, generation)

    async def _update(self, spec: D.DeploymentSpec, generation: int) -> D.Deployment:
        deployspec.check_name(spec.name)
        if generation < 0:
            raise errors.InvalidArgument.of("generation", f"{generation} is negative",
                                            "0 (no check) or the generation the change was read at")
        deployspec.check_replicas(spec.replicas)
        deployspec.check_restart_stamp(spec.restart_stamp)
        old = self.store.get(spec.name)
        probe = D.DeploymentSpec()
        probe.CopyFrom(old.spec)
        probe.backend.CopyFrom(spec.backend)
        probe.labels.clear()
        probe.labels.update(spec.labels)
        new_policy = spec.HasField("scaling") and spec.scaling != old.spec.scaling
        if new_policy:
            probe.scaling.CopyFrom(spec.scaling)
        variant, need = self._resolve(probe)
        deployspec.check_fits(need, self.registry.gpu_models())
        # a policy is checked when it changes, or when new backend settings change what a replica costs
        # (an Update from Get passes the stored policy back unchanged)
        if probe.HasField("scaling") and (new_policy or probe.backend != old.spec.backend):
            scaling.check(self, probe, variant, need, self.registry.get(probe.model))
        deployspec.slice_request(probe, need, "r-check", spread=True)     # labels as slices take them

        def edit(d: D.Deployment) -> None:
            d.spec.replicas = spec.replicas
            d.spec.backend.CopyFrom(spec.backend)
            d.spec.labels.clear()
            d.spec.labels.update(spec.labels)
            d.spec.restart_stamp = spec.restart_stamp
            if spec.HasField("scaling"):
                d.spec.scaling.CopyFrom(spec.scaling)
            d.status.vram_bytes = need
        return await self._change(spec.name, generation, edit)

    async def delete(self, name: str) -> D.Deployment:
        deployspec.check_name(name, "name")
        async with self._lock:
            d = self.store.full(name)
            await self.store.delete(name)
            self.drain_notes.pop(name, None)        # (a deployment created later under the name starts afresh)
            self.scaling.woken.pop(name, None)
        log(logger, logging.INFO, "deployment deleted", deployment=name, replicas=len(d.replicas))
        self._event(name, "Normal", "Deleted", f"deleted with {len(d.replicas)} replica(s)", d.spec.tenant)
        self.kick()
        return d

    def _event(self, name: str, type: str, reason: str, message: str, tenant: str = "") -> None:
        """A durable event of the deployment `name` (controlplane/events/)."""
        self._event_as(name, type, reason, message, tenant, "deployment-controller")

    def _event_as(self, name: str, type: str, reason: str, message: str, tenant: str, source: str) -> None:
        if not tenant:
            d = self.store.deployments.get(name)
            tenant = d.spec.tenant if d is not None else ""
        self.ctl.recorder.emit("Deployment", name, type, reason, message, tenant=tenant, source=source)

    async def write_autoscaler_status(self, name: str, status, generation: int = 0) -> bool:
        """Replace `status.autoscaler` (scaling_pb2.AutoscalerStatus) of `name`; the generation stays. With a
        `generation` (the one the status was computed from), only while the deployment is still at it: a Wake, a
        Scale or a SetScaling written since is not undone by a status decided before it (False: not written)."""
        async with self._lock:
            d = self.store.deployments.get(name)
            if d is None or generation and d.generation != generation:
                return False
            n = D.Deployment()
            n.CopyFrom(d)
            n.status.autoscaler.CopyFrom(status)
            try:
                await self.store.put(n)
            except errors.NotFound:
                return False
        return True

    # -- one pass (self._loop runs it every interval, or at once when kicked) ------------------

    async def reconcile_all(self) -> None:
        names = set(self.store.deployments) | set(self.store.replicas)
        counts: dict[str, int] = {}
        self.pass_errors.keep_only(names)
        for name in sorted(names):
            # each deployment on its own: one whose reconcile raises (every pass, maybe) holds back no other
            try:
                await self.reconcile_one(name)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - logged, counted and a Warning event (passerrors.py)
                self.pass_errors.failed(name, e)
            else:
                self.pass_errors.succeeded(name)
            for r in self.store.replicas_of(name):
                state = STATE_NAMES.get(r.state, "pending")
                counts[state] = counts.get(state, 0) + 1
        for state in (rc.PENDING, rc.STARTING, rc.READY, rc.FAILED, rc.TERMINATING):
            REPLICAS.labels(state).set(counts.get(state, 0))
        self.act.retain(r.endpoint for reps in self.store.replicas.values() for r in reps.values() if r.endpoint)

    async def reconcile_one(self, name: str) -> None:
        d = self.store.deployments.get(name)
        replicas = {r.id: r for r in self.store.replicas_of(name)}
        for rid, r in list(replicas.items()):
            if rid not in self.busy:        # a migration moved its workload: it follows (replicamove.py)
                try:
                    n = await replicamove.follow(self.ctl, self.workloads, self.store, r)
                except errors.MeshError as e:
                    log(logger, logging.WARNING, "replica cannot follow its workload yet", replica=rid, error=str(e))
                    n = None
                if n is not None:
                    replicas[rid] = n
                    self._event(name, "Normal", "ReplicaMoved", f"replica {rid} follows workload {n.workload_id} to "
                                f"slice {n.slice_id} on {n.node} (endpoint {n.endpoint})")
        desired = rc.Desired(replicas=d.spec.replicas if d else 0, deleting=d is None)
        current = ""
        if d is not None:
            try:
                current = deployspec.template(d.spec, self._resolve(d.spec)[0])
            except errors.MeshError:
                current = ""        # its model or variant is gone: keep what runs
        plan = rc.reconcile(desired, [observe.replica(self, r, current) for r in replicas.values()], time.time(),
                            self.policy)
        for a in plan.actions:
            if a.kind == "create":
                for _ in range(a.count):
                    r = D.Replica(id=new_id("r"), deployment=name, state=D.REPLICA_STATE_PENDING,
                                  message="waiting for a slice", created_at=now())
                    await self.store.put_replica(r)
                    self._event(name, "Normal", "ReplicaCreated", f"created replica {r.id}")
                    self._spawn(r.id, self._advance(name, r.id))
            elif a.kind in ("advance", "restart"):
                self._spawn(a.replica, self._advance(name, a.replica))
            elif a.kind == "probe":
                self._spawn(a.replica, self._probe(name, a.replica))
            elif a.kind == "fail":
                r = replicas[a.replica]
                self._event(name, "Warning", "ReplicaFailed", f"replica {r.id} ended (restart {r.restarts + 1}): "
                            f"{r.message[:300]}")
                self._spawn(a.replica, self.act.failed(replicas[a.replica], a.next_start))
            elif a.kind == "reset":
                n = D.Replica()
                n.CopyFrom(replicas[a.replica])
                n.restarts = 0
                await self.store.put_replica(n)
            elif a.kind == "remove":
                self.last_probe.pop(a.replica, None)
                self._event(name, "Normal", "ReplicaRemoved", f"removing replica {a.replica}: {a.reason}")
                self._spawn(a.replica, self.act.remove(replicas[a.replica], a.reason))
        if d is not None:
            await self._set_status(d, plan)

    def _spawn(self, rid: str, coro) -> None:
        if rid in self.busy:
            coro.close()
            return

        async def run():
            idle = False
            try:
                # an action that found nothing to do yet (False) kicks no pass: the next one looks again; a kick
                # made each pass start it again at once, a busy loop while a replica's slice was being realized
                idle = await coro is False
            except asyncio.CancelledError:
                raise
            except errors.MeshError as e:
                log(logger, logging.WARNING, "replica action failed; retrying on a later pass", replica=rid,
                    error=str(e))
                await asyncio.sleep(self.policy.backoff_base)
            except Exception:   # noqa: BLE001
                logger.exception("replica action %s", rid)
                await asyncio.sleep(self.policy.backoff_base)
            finally:
                self.busy.pop(rid, None)
                if not idle:
                    self.kick()
        self.busy[rid] = asyncio.create_task(run(), name=f"replica-{rid}")

    async def _advance(self, name: str, rid: str) -> bool:
        """Bring a replica one step further: a slice, then (slice READY) its backend. False: nothing to do yet."""
        d = self.store.deployments.get(name)
        r = self.store.replicas.get(name, {}).get(rid)
        if d is None or r is None:
            return False
        variant, need = self._resolve(d.spec)
        allocated = not r.slice_id
        if allocated:
            r = await self.act.allocate(r, d.spec, need)
        s = self.ctl.fleet.slices.get(r.slice_id)
        if s is None or s.state != W.SLICE_STATE_READY:
            return allocated    # the next pass looks again once its node realized it
        await self.act.run(r, d.spec, variant)
        return True

    async def _probe(self, name: str, rid: str) -> None:
        d = self.store.deployments.get(name)
        r = self.store.replicas.get(name, {}).get(rid)
        if d is None or r is None:
            return
        ok, why = await self.act.probe(r.endpoint, d.spec.model, complete=r.state != D.REPLICA_STATE_READY,
                                       kind=d.status.backend, api_key=self.store.keys.get(rid),
                                       certificate=r.endpoint_certificate)
        self.last_probe[rid] = time.time()
        r2 = self.store.replicas.get(name, {}).get(rid)
        if r2 is None or r2.workload_id != r.workload_id or r2.state not in (D.REPLICA_STATE_STARTING,
                                                                            D.REPLICA_STATE_READY):
            return              # changed meanwhile (crashed, removed)
        n = D.Replica()
        n.CopyFrom(r2)
        if ok and r2.state != D.REPLICA_STATE_READY:
            n.state, n.message = D.REPLICA_STATE_READY, "answers completions"
            n.ready_at.CopyFrom(now())
            log(logger, logging.INFO, "replica ready", deployment=name, replica=rid, endpoint=r.endpoint)
            self._event(name, "Normal", "ReplicaReady", f"replica {rid} answers completions at {r.endpoint}")
        elif not ok and r2.state == D.REPLICA_STATE_READY:
            n.state, n.message = D.REPLICA_STATE_STARTING, f"readiness probe failed: {why}"
            self._event(name, "Warning", "ReplicaNotReady", f"replica {rid}: readiness probe failed: {why}"[:500])
            n.ClearField("ready_at")
        elif not ok:
            n.message = f"not ready yet: {why}"
        if n != r2:
            await self.store.put_replica(n)

    async def _set_status(self, d: D.Deployment, plan: rc.Plan) -> None:
        async with self._lock:      # read again under the lock: a Scale or the autoscaler may have written since
            d = self.store.deployments.get(d.spec.name)
            if d is not None:
                await self._write_status(d, plan)

    async def _write_status(self, d: D.Deployment, plan: rc.Plan) -> None:
        st = deploystatus.status_of(self, d, plan, self.store.replicas_of(d.spec.name))
        if st != d.status:
            n = D.Deployment()
            n.CopyFrom(d)
            n.status.CopyFrom(st)
            try:
                await self.store.put(n)
            except errors.NotFound:
                pass        # deleted meanwhile
