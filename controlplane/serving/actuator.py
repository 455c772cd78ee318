"""Carrying out the deployment controller's actions: slices, backends, readiness probes.

It uses the control plane's own paths, not a second way: slices come from `Controller.allocate` (what
SliceService.Allocate calls: the scheduler framework, quotas, preemption, the agent realizing the
slice) with the replica's ID as the request ID, so a retry after a restart finds the same allocation;
backends run through `WorkloadManager.run` (what WorkloadService.Run calls) as workloads with a
`backend`, whose command line and port the agent makes (nodeagent/backends/); a replica is removed by
`WorkloadManager.stop_workload` and `Controller.release`.

Readiness is checked here, by the control plane, over HTTPS pinned to the server's own certificate (plain
HTTP where its agent's backend_tls is off; mesh/replicahttp.py, httpx): the backend's health endpoint
answers 200 (vLLM's `/health`; llama-cpp-python's server has none: its `/v1/models`), and a one-token
completion of a short prompt comes back with a choice, both sent with the replica's API key (every backend
requires its replica's own key: controlplane/serving/replicakeys.py). The control plane must reach the
endpoints anyway (so must the gateway).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from controlplane.controllers.slices import now
from controlplane.serving import deployspec
from controlplane.serving.deploystore import DeploymentStore
from controlplane.state import drainpairs, requestids
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import slice_service_pb2, types_pb2, workload_service_pb2
from mesh import errors, replacing, slicespec
from mesh.logs import log

MAX_SPENT_IDS = 8      # request ids a replica goes through before it gives up (each a released allocation)
logger = logging.getLogger(__name__)
# the endpoint that says a backend's server is up, by kind (llama-cpp-python's server has no /health)
HEALTH_PATHS = {"llama.cpp": "/v1/models", "vllm": "/health"}
LOG_LINES = 15          # of a crashed backend's log, in the replica's message and the CrashLoop condition
LOG_CHARS = 4000        # at most (its end): lines are of any length, and the replica's etcd record holds them


def ts(t: float):
    out = now()
    out.FromNanoseconds(int(t * 1e9))
    return out


class Actuator:
    def __init__(self, ctl, workloads, store: DeploymentStore, probe_timeout: float = 60.0) -> None:
        self.ctl = ctl
        self.workloads = workloads
        self.store = store
        self.probe_timeout = probe_timeout
        self._http = None
        self._pools = None          # its PinnedTransport (mesh/replicahttp.py), one pool per replica

    def retain(self, endpoints) -> None:
        """Close the probe pools of replicas no longer recorded (the deployments controller's reconcile pass
        names the live endpoints): a removed replica's port is never probed again."""
        if self._pools is not None:
            self._pools.retain(endpoints)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def _copy(self, r: D.Replica, **fields) -> D.Replica:
        n = D.Replica()
        n.CopyFrom(r)
        for k, v in fields.items():
            setattr(n, k, v)
        return n

    # -- placing and starting ---------------------------------------------------------------

    async def allocate(self, r: D.Replica, spec: D.DeploymentSpec, need: int) -> D.Replica:
        """A slice for `r`: spread from the deployment's other replicas' nodes when the fleet allows,
        else anywhere it fits (under a request id of its own, `<replica>-any`).

        A replica holds one allocation. An earlier call's allocation that the replica's record does not name
        (a crash, or a failed write, between the allocation and the record) is reused when it is for this
        request: a fallback one too, though the spread attempt might succeed now (before, the retry took a
        second slice, spread, and the first stayed allocated until the replica was removed). Any other
        allocation carrying the replica's label (one for an earlier spec of the deployment, one under an id
        that expired) is released once this one is had, before the record names it."""
        pool = getattr(getattr(self.ctl, "pools", None), "pools", {}).get(spec.pool) if spec.pool else None
        attempts = [(deployspec.slice_spec(spec, need, r.id, spread=True, pool=pool), r.id),
                    (deployspec.slice_spec(spec, need, r.id, spread=False, pool=pool), r.id + "-any")]
        # a replacement for a replica on a drained node: counts once with it (controlplane/state/drainpairs.py)
        replaces = drainpairs.source_for(self.ctl.fleet, spec.name, spec.tenant, r.id)
        try:
            if self._held(*attempts[1]) and not self._held(*attempts[0]):
                attempts.reverse()      # the fallback allocation an earlier call made: its replay answers it
            try:
                slices = await self._allocate(*attempts[0], replaces)
            except errors.ResourceExhausted:
                slices = await self._allocate(*attempts[1], replaces)
        except errors.MeshError as e:
            n = self._copy(r, message=f"no slice yet: {e}")
            changed = n != r
            if changed:         # a replica waiting for room is retried every few seconds: written when the why changes
                await self.store.put_replica(n)
            if spec.pool and "Pool" in str(e):
                # the pool is the limit: an event on the deployment (repeats coalesce into one with a count)
                why = next((part.strip() for part in str(e).split(";") if "Pool" in part), str(e))
                self.ctl.recorder.emit("Deployment", spec.name, "Warning", "PoolExhausted",
                                       f"replica {r.id}: {why}"[:500], tenant=spec.tenant,
                                       source="deployment-controller")
                held = getattr(getattr(self.ctl, "pools", None), "held", None)
                if changed and held is not None and "PoolExhausted" in why:
                    # and on the pool, once while the replica waits for the same reason (docs/pools.md)
                    held(spec.pool, "PoolExhausted", spec.name, spec.tenant,
                         f"replica {r.id} waits: {why[why.index('PoolExhausted'):]}",
                         "deployment-controller")
            raise
        s = slices[0]
        await self._release_unrecorded(r, s.allocation_id, "a superfluous allocation (another one now holds it)")
        n = self._copy(r, slice_id=s.id, allocation_id=s.allocation_id, node=s.node, gpu_uuid=s.gpu_uuid,
                       gpu_index=s.gpu_index, gpu_model=s.gpu_model, isolation=s.isolation, profile=s.profile,
                       memory_bytes=s.memory_bytes, message="slice allocated; waiting for its node to realize it")
        await self.store.put_replica(n)
        log(logger, logging.INFO, "replica placed", deployment=r.deployment, replica=r.id, slice=s.id, node=s.node)
        return n

    @staticmethod
    def _request_ids(slice_spec: types_pb2.SliceSpec, request_id: str):
        """(the request, its fingerprint, the ids `_allocate` tries in turn) for `slice_spec` under `request_id`."""
        req = slicespec.validate(slice_spec)
        fp = requestids.allocate_fingerprint(slice_service_pb2.AllocateRequest(spec=slice_spec))
        derived = f"{request_id}.{fp.removeprefix('sha256:')[:12]}"
        return req, fp, [request_id, derived, *(f"{derived}.{k}" for k in range(2, MAX_SPENT_IDS))]

    def _held(self, slice_spec: types_pb2.SliceSpec, request_id: str) -> bool:
        """Whether an earlier call made a live allocation for this very request under one of its ids (a retry's
        `_allocate` gets it back instead of placing another)."""
        req, fp, ids = self._request_ids(slice_spec, request_id)
        return any((alloc := self.ctl.requests.answers(req.tenant, rid, fp)) and not self.ctl.released(alloc)
                   for rid in ids)

    async def _release_unrecorded(self, r: D.Replica, keep: str, why: str) -> None:
        """Release the live allocations carrying the replica's label, but `keep` (the one its record names or is
        about to): allocations no record names, which nothing else would release."""
        for alloc in sorted({x.allocation_id for x in self.ctl.fleet.slices.values()
                             if x.labels.get(deployspec.LABEL_REPLICA) == r.id and x.allocation_id
                             and x.state != types_pb2.SLICE_STATE_RELEASING} - {keep, ""}):
            log(logger, logging.INFO, "releasing an allocation of the replica's that its record does not name",
                deployment=r.deployment, replica=r.id, allocation=alloc, kept=keep)
            await self.ctl.release(alloc, wait=False, message=f"replica {r.id} of deployment {r.deployment}: {why} "
                                                              f"(an allocation its record did not name)")

    async def _allocate(self, slice_spec: types_pb2.SliceSpec, request_id: str,
                        replaces: str = "") -> list[types_pb2.Slice]:
        """Allocate under the replica's request id, with its request's fingerprint. An id an earlier call used
        with another request (the deployment changed between that allocation and the replica's record of it,
        e.g. a control-plane crash in between) names an allocation no replica records, of the old size:
        it is released, and this request placed under an id of its own (the same on a retry). An id whose
        allocation was released since (its slice lost) is spent: the next id of the replica's is used.

        `replaces` (a drained replica's slice) labels the request, not its fingerprint: which old slice a
        replacement is tied to is decided again on each try (the first may be gone), and a retry still gets the
        first call's allocation back."""
        req, fp, ids = self._request_ids(slice_spec, request_id)
        if replaces:
            req = dataclasses.replace(req, labels={**req.labels, replacing.REPLACES: replaces})
        for rid in ids:
            try:
                return (await self.ctl.allocate(req, request_id=rid, no_wait=True, fingerprint=fp))[1]
            except errors.RequestIdReused:
                earlier = self.ctl.requests.lookup(req.tenant, rid)
                log(logger, logging.INFO, "replica's earlier allocation was for another spec: releasing it",
                    request_id=rid, allocation=earlier)
                if earlier and not self.ctl.released(earlier):
                    await self.ctl.release(earlier, wait=False, message=f"made for an earlier spec of replica "
                                                                         f"{request_id} (its request id)")
            except errors.FailedPrecondition:
                earlier = self.ctl.requests.lookup(req.tenant, rid)
                if not earlier or not self.ctl.released(earlier):
                    raise
                log(logger, logging.INFO, "replica's earlier allocation was released: placing it anew",
                    request_id=rid, allocation=earlier)
        raise errors.FailedPrecondition(f"replica {request_id}: its last {MAX_SPENT_IDS} request ids are spent "
                                        f"(allocations released or made for other specs)")

    async def run(self, r: D.Replica, spec: D.DeploymentSpec, variant: M.Variant) -> D.Replica:
        s = self.ctl.fleet.slices[r.slice_id]
        backend = deployspec.serving_backend(spec, variant, s.memory_bytes, self.ctl.fleet.gpu_memory_of(s),
                                             s.isolation)
        # the server requires this replica's own key (made once per replica, durable before it starts)
        backend.api_key = await self.store.keys.ensure(r.deployment, r.id)
        labels = dict(spec.labels)
        labels.update({deployspec.LABEL_DEPLOYMENT: spec.name, deployspec.LABEL_REPLICA: r.id})
        w = await self._run(workload_service_pb2.RunWorkloadRequest(
            slice_id=s.id, backend=backend, labels=labels, request_id=f"{r.id}.after-{r.workload_id or 'none'}"),
            s.tenant)
        if w.state == types_pb2.WORKLOAD_STATE_FAILED:
            # not FAILED yet: the next pass records the crash (restarts + 1, its backoff, the log's tail); a FAILED
            # replica restarted here stayed FAILED past its backoff and was restarted again at once, every pass
            n = self._copy(r, workload_id=w.id, state=D.REPLICA_STATE_PENDING,
                           message=f"backend did not start: {w.message}")
        else:
            n = self._copy(r, workload_id=w.id, endpoint=w.endpoint, endpoint_certificate=w.endpoint_certificate,
                           state=D.REPLICA_STATE_STARTING,
                           message="backend started; waiting for a completion")
        n.template = deployspec.template(spec, variant)
        n.ClearField("ready_at")
        await self.store.put_replica(n)
        log(logger, logging.INFO, "replica backend started", deployment=r.deployment, replica=r.id, workload=w.id,
            endpoint=w.endpoint, state=types_pb2.WorkloadState.Name(w.state))
        return n

    async def _run(self, req: workload_service_pb2.RunWorkloadRequest, tenant: str) -> types_pb2.Workload:
        """Run the replica's backend under a request id of this start (the replica and the workload it replaces):
        a retry after a crash between the workload's record and the replica's (the replica does not name it
        yet) gets the first call's workload instead of starting a second server on the slice. An id an earlier
        call used with other settings (the deployment changed in between) names a workload no replica
        records: it is stopped, and this one runs under an id of its own (the same on a retry)."""
        try:
            return await self.workloads.run(req)
        except errors.RequestIdReused:
            earlier = self.workloads.requests.lookup(tenant, req.request_id)
            w = self.workloads.workloads.get(earlier) if earlier else None
            if w is not None and w.state not in (types_pb2.WORKLOAD_STATE_SUCCEEDED, types_pb2.WORKLOAD_STATE_FAILED,
                                                 types_pb2.WORKLOAD_STATE_STOPPED):
                log(logger, logging.INFO, "replica's earlier backend was for another spec: stopping it",
                    request_id=req.request_id, workload=w.id)
                await self.workloads.stop_workload(w.id, wait=False)
        fp = requestids.fingerprint(req)
        req.request_id = f"{req.request_id}.{fp.removeprefix('sha256:')[:12]}"
        return await self.workloads.run(req)

    # -- readiness ----------------------------------------------------------------------------

    async def probe(self, endpoint: str, served_name: str, complete: bool = True,
                    kind: str = "", api_key: str = "", certificate: str = "") -> tuple[bool, str]:
        """(ready, why not): the backend's health endpoint (HEALTH_PATHS) answers, and (`complete`) a
        one-token completion succeeds, both with the replica's `api_key` (replicakeys.py), over HTTPS verified
        against exactly the server's `certificate` when it has one (mesh/replicatls.py). A READY replica
        is re-checked with the health endpoint only: llama-cpp-python's server runs one request at a time,
        and a completion every few seconds would queue behind the users' requests."""
        if not endpoint:
            return False, "no endpoint yet"
        try:
            import httpx
        except ImportError:
            return False, "the control plane cannot probe: httpx is not installed (pip install 'gpumesh[serving]')"
        from mesh import replicahttp, replicatls
        if self._http is None:
            self._pools = replicahttp.PinnedTransport()
            self._http = replicahttp.client(self.probe_timeout, transport=self._pools)
        base = replicatls.base_url(endpoint, certificate)
        pin = replicahttp.request_extensions(certificate)
        health = HEALTH_PATHS.get(kind, "/v1/models")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            resp = await self._http.get(base + health, headers=headers, extensions=pin)
            if resp.status_code != 200:
                return False, f"GET {health} answered {resp.status_code}"
            if not complete:
                return True, ""
            resp = await self._http.post(base + "/v1/completions", json={
                "model": served_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}, headers=headers,
                extensions=pin)
            if resp.status_code != 200:
                return False, f"a one-token completion answered {resp.status_code}: {resp.text[:200]}"
            if not resp.json().get("choices"):
                return False, "a one-token completion came back without choices"
        except (httpx.HTTPError, ValueError) as e:
            return False, f"{type(e).__name__}: {e}"[:300]
        return True, ""

    # -- crashes ------------------------------------------------------------------------------

    async def last_log(self, workload_id: str, lines: int = LOG_LINES) -> str:
        if not workload_id or workload_id not in self.workloads.workloads:
            return ""
        data = b""
        try:
            async for chunk in self.workloads.logs(workload_id, lines, False):
                data += chunk.data
        except errors.MeshError as e:
            return f"(log unavailable: {e})"
        text = data.decode("utf-8", "replace").strip()
        return text if len(text) <= LOG_CHARS else "..." + text[-LOG_CHARS:]

    async def failed(self, r: D.Replica, next_start: float) -> D.Replica:
        w = self.workloads.workloads.get(r.workload_id)
        why = w.message if w is not None else "its workload record is gone"
        tail = await self.last_log(r.workload_id)
        n = self._copy(r, state=D.REPLICA_STATE_FAILED, restarts=r.restarts + 1,
                       message=f"backend ended: {why}" + (f"; last log lines:\n{tail}" if tail else ""))
        n.last_crash_at.CopyFrom(now())
        n.next_start_at.CopyFrom(ts(next_start))
        n.ClearField("ready_at")
        await self.store.put_replica(n)
        log(logger, logging.WARNING, "replica backend ended", deployment=r.deployment, replica=r.id,
            restarts=n.restarts, why=why, retry_in=round(next_start - time.time(), 1))
        return n

    # -- removal ------------------------------------------------------------------------------

    async def remove(self, r: D.Replica, why: str) -> None:
        if r.state != D.REPLICA_STATE_TERMINATING:
            r = self._copy(r, state=D.REPLICA_STATE_TERMINATING, message=why)
            await self.store.put_replica(r)
        w = self.workloads.workloads.get(r.workload_id)
        if w is not None and w.state not in (types_pb2.WORKLOAD_STATE_SUCCEEDED, types_pb2.WORKLOAD_STATE_FAILED,
                                             types_pb2.WORKLOAD_STATE_STOPPED):
            node = self.ctl.fleet.nodes.get(w.node)
            await self.workloads.stop_workload(w.id, wait=bool(node and node.ready))
        for ident in (r.allocation_id, r.slice_id):
            if ident and (ident in self.ctl.fleet.slices or self.ctl.fleet.slices_of(ident)):
                node = self.ctl.fleet.nodes.get(r.node)
                await self.ctl.release(ident, wait=bool(node and node.ready),
                                       message=f"replica {r.id} of deployment {r.deployment}: {why}")
                break
        # an allocation the record does not name (a crash between Allocate and the replica's write; an allocation
        # under another of its request ids): its slices carry the replica's label, and nothing else releases them
        await self._release_unrecorded(r, r.allocation_id, why)
        await self.store.delete_replica(r)
        log(logger, logging.INFO, "replica removed", deployment=r.deployment, replica=r.id, why=why)
