"""The typed client SDK over the generated gpumesh v1 stubs.

    with MeshClient("127.0.0.1:7070") as mesh:
        resp = mesh.allocate(tenant="team-a", mig_profile="1g.10gb")
        mesh.release(resp.allocation_id)

Every failed call raises a `mesh.errors.MeshError` subclass (decoded from the
rich gRPC status), never a bare `grpc.RpcError`. The dict converters
(mesh/todict.py, re-exported here) are what `meshctl -o json|yaml` prints.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Callable, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpumesh.v1 import (admin_service_pb2, admin_service_pb2_grpc, slice_service_pb2,
                        slice_service_pb2_grpc, types_pb2, workload_service_pb2, workload_service_pb2_grpc)
from mesh import errors, richstatus
from mesh.meshapi import MeshApi
from mesh.migrationapi import MigrationApi
from mesh.deployapi import DeploymentApi
from mesh.eventapi import EventApi
from mesh.forecastapi import ForecastApi
from mesh.poolapi import PoolApi
from mesh.servingviewapi import ServingViewApi
from mesh.costapi import CostApi
from mesh.modelapi import ModelApi
# the converters, re-exported: `from mesh.client import slice_to_dict` is the SDK's spelling
from mesh.todict import (allocation_to_dict, enum_name, gpu_status_to_dict, gpu_to_dict,  # noqa: F401
                         isolation_name, mig_mode, node_state_name, node_to_dict, slice_state_name, slice_to_dict,
                         telemetry_to_dict, timestamp, workload_state_name, workload_to_dict)

T = TypeVar("T")

ISOLATIONS = {"mig": types_pb2.ISOLATION_MIG, "mps": types_pb2.ISOLATION_MPS,
              "timeshare": types_pb2.ISOLATION_TIMESHARE, "time-share": types_pb2.ISOLATION_TIMESHARE,
              "exclusive": types_pb2.ISOLATION_EXCLUSIVE}
TOPOLOGIES = {"any": types_pb2.TOPOLOGY_ANY, "same-node": types_pb2.TOPOLOGY_SAME_NODE,
              "same-nvlink": types_pb2.TOPOLOGY_SAME_NVLINK_DOMAIN,
              "same-nvlink-domain": types_pb2.TOPOLOGY_SAME_NVLINK_DOMAIN}
SLICE_STATES = {"pending": types_pb2.SLICE_STATE_PENDING, "ready": types_pb2.SLICE_STATE_READY,
                "releasing": types_pb2.SLICE_STATE_RELEASING, "failed": types_pb2.SLICE_STATE_FAILED,
                "unknown": types_pb2.SLICE_STATE_UNKNOWN}
NODE_STATES = {"ready": types_pb2.NODE_STATE_READY, "not-ready": types_pb2.NODE_STATE_NOT_READY,
               "notready": types_pb2.NODE_STATE_NOT_READY}

# How long past the server's own wait for READY the client's deadline runs.
_ALLOCATE_DEADLINE_SLACK = 10.0
_SERVER_DEFAULT_WAIT = 30.0
DELETE_NODE_TIMEOUT_S = 90.0
"""DeleteNode's deadline at least: the control plane waits up to a minute for the deletion (its migrations)."""


def _enum_value(kind: str, table: Mapping[str, int], value: str | int | None, field: str) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        return value
    key = value.strip().lower().replace("_", "-")
    if key not in table:
        raise errors.InvalidArgument.of(field, f"unknown {kind} {value!r}", ", ".join(table))
    return table[key]


def _converting(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn grpc.RpcError raised by `fn` into the typed MeshError."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            raise richstatus.from_rpc_error(exc) from None
    return wrapper


class SliceWatch:
    """An open Watch stream: iterate it for SliceEvents; `close()` ends it."""

    def __init__(self, call) -> None:
        self.call = call
        self.initial: list = []

    def _next(self):
        try:
            return next(self.call)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise richstatus.from_rpc_error(exc) from None

    def until_synced(self) -> list:
        """The initial events, up to the SYNCED marker."""
        out = []
        while True:
            ev = self._next()
            if ev.type == slice_service_pb2.SliceEvent.SYNCED:
                return out
            out.append(ev)

    def __iter__(self) -> "SliceWatch":
        return self

    def __next__(self):
        while True:
            ev = self._next()
            if ev.type != slice_service_pb2.SliceEvent.SYNCED:
                return ev

    def close(self) -> None:
        self.call.cancel()

    def __enter__(self) -> "SliceWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MeshClient(MeshApi, MigrationApi, ModelApi, DeploymentApi, EventApi, ForecastApi, PoolApi, CostApi,
                 ServingViewApi):
    """A synchronous client of one control plane. Thread-safe; share one per process."""

    def __init__(self, endpoint: str, *, timeout: float = 30.0,
                 options: list[tuple[str, Any]] | None = None, token: str = "", ca: str = "", cert: str = "",
                 key: str = "", tls: bool | None = None) -> None:
        """`endpoint`: HOST:PORT, or several comma-separated (or a list) for HA control planes: calls that
        a standby refuses, and safe calls that find an endpoint down, go on to the next (mesh/failover.py).
        `token`: a bearer token (sent as `authorization: Bearer ...`); `ca`: the CA of the control plane's
        certificate; `cert`/`key`: a client certificate. TLS when `ca` or `cert` is given (or `tls=True`, with
        the system's roots); plaintext otherwise."""
        from mesh.failover import FailoverChannel, split_endpoints
        self.endpoints = split_endpoints(endpoint)
        self.endpoint = ",".join(self.endpoints)
        self.timeout = timeout
        from mesh.tls import channel_credentials, token_interceptor, warn_plaintext_token

        def make(target: str) -> grpc.Channel:
            if tls or (tls is None and (ca or cert)):
                ch = grpc.secure_channel(target, channel_credentials(ca, cert, key), options=options or [])
            else:
                if token:
                    warn_plaintext_token(target)
                ch = grpc.insecure_channel(target, options=options or [])
            return grpc.intercept_channel(ch, token_interceptor(token)) if token else ch

        if len(self.endpoints) == 1:
            self._channel = make(self.endpoints[0])
        else:
            self._channel = FailoverChannel(self.endpoints, make)
        self._raw_channel = self._channel
        self._slices = slice_service_pb2_grpc.SliceServiceStub(self._channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._workloads = workload_service_pb2_grpc.WorkloadServiceStub(self._channel)

    @classmethod
    def from_context(cls, context: str | None = None, *, endpoint: str | None = None, timeout: float = 30.0,
                     **kwargs: Any) -> "MeshClient":
        """A client of the control plane meshctl would use: `endpoint`, else `$MESH_ENDPOINT`, else the
        context `context` (else `$MESH_CONTEXT`, else the current-context of meshctl's config file), with its
        credentials unless `$MESH_TOKEN`/`$MESH_CA`/... or `token=`/`ca=`/... in `kwargs` are given
        (mesh/context.py). An unknown context raises mesh.context.UnknownContextError listing the known ones."""
        from mesh.context import resolve_auth, resolve_endpoint
        flags = {k: kwargs.pop(k) for k in ("token", "ca", "cert", "key") if k in kwargs}
        return cls(resolve_endpoint(endpoint, context=context), timeout=timeout,
                   **resolve_auth(flags, context=context), **kwargs)

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> "MeshClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- slices ---------------------------------------------------------------

    @_converting
    def allocate(self, spec: types_pb2.SliceSpec | None = None, *, tenant: str = "",
                 memory_bytes: int = 0, compute_share: float = 0.0, isolation: str | int | None = None,
                 gpu_model: str = "", mig_profile: str = "", count: int = 1, topology: str | int = "any",
                 priority: int = 0, labels: Mapping[str, str] | None = None, request_id: str = "",
                 no_wait: bool = False, timeout_seconds: float = 0, cpu_milli: int = 0,
                 host_memory_bytes: int = 0, preempt: bool = False,
                 anti_affinity: Mapping[str, str] | None = None) -> slice_service_pb2.AllocateResponse:
        """Place `count` slices all or nothing and (unless `no_wait`) wait until they are READY.

        Either pass a ready-made `spec` or the keyword fields. Unknown isolation or topology
        names raise InvalidArgument before anything is sent. `cpu_milli` and `host_memory_bytes`
        reserve host CPU (milli-CPUs) and memory per slice; `preempt` lets the scheduler evict
        lower-priority slices when nothing else fits (where the control plane allows preemption);
        `anti_affinity` keeps the slices off nodes holding a slice with any of these label pairs.
        A `request_id` an earlier call of the tenant used with other arguments raises errors.RequestIdReused.
        """
        if spec is None:
            spec = types_pb2.SliceSpec(
                tenant=tenant, memory_bytes=memory_bytes, compute_share=compute_share,
                isolation=_enum_value("isolation", ISOLATIONS, isolation, "spec.isolation"),
                gpu_model=gpu_model, mig_profile=mig_profile, count=count,
                topology=_enum_value("topology", TOPOLOGIES, topology, "spec.topology"),
                priority=priority, labels=dict(labels or {}), cpu_milli=cpu_milli,
                host_memory_bytes=host_memory_bytes, preempt=preempt, anti_affinity=dict(anti_affinity or {}))
        # A request id makes Allocate idempotent on the server, so a retry (on another control plane
        # after a failover) returns what the first attempt allocated instead of allocating again.
        request_id = request_id or f"sdk-{uuid.uuid4().hex}"
        req = slice_service_pb2.AllocateRequest(spec=spec, request_id=request_id, no_wait=no_wait,
                                                timeout_seconds=timeout_seconds)
        deadline = self.timeout
        if not no_wait:
            wait = timeout_seconds or _SERVER_DEFAULT_WAIT
            deadline = max(deadline, wait + _ALLOCATE_DEADLINE_SLACK)
        return self._slices.Allocate(req, timeout=deadline)

    @_converting
    def release(self, id: str) -> slice_service_pb2.ReleaseResponse:
        """Release one slice ("s-...") or a whole allocation ("a-...")."""
        return self._slices.Release(slice_service_pb2.ReleaseRequest(id=id), timeout=self.timeout)

    @_converting
    def get_slice(self, id: str) -> types_pb2.Slice:
        return self._slices.Get(slice_service_pb2.GetSliceRequest(id=id), timeout=self.timeout)

    @_converting
    def list_slices(self, tenant: str = "", node: str = "", state: str | int | None = None,
                    allocation_id: str = "") -> list[types_pb2.Slice]:
        req = slice_service_pb2.ListSlicesRequest(
            tenant=tenant, node=node, allocation_id=allocation_id,
            state=_enum_value("slice state", SLICE_STATES, state, "state"))
        return list(self._slices.List(req, timeout=self.timeout).slices)

    def watch_slices(self, tenant: str = "", node: str = "", send_initial: bool = False,
                     wait_synced: bool = True) -> "SliceWatch":
        """Slice events until closed or the server ends the stream.

        The call starts at once; with `wait_synced` this returns only after the server's
        SYNCED marker, so no change made after it returns is missed (the marker itself
        is not yielded).
        """
        req = slice_service_pb2.WatchSlicesRequest(tenant=tenant, node=node, send_initial=send_initial)
        watch = SliceWatch(self._slices.Watch(req))
        if wait_synced:
            watch.initial = watch.until_synced()
        return watch

    # -- nodes and GPUs -------------------------------------------------------

    @_converting
    def list_nodes(self, state: str | int | None = None) -> list[types_pb2.Node]:
        req = admin_service_pb2.ListNodesRequest(
            state=_enum_value("node state", NODE_STATES, state, "state"))
        return list(self._admin.ListNodes(req, timeout=self.timeout).nodes)

    @_converting
    def get_node(self, name: str) -> types_pb2.Node:
        return self._admin.GetNode(admin_service_pb2.GetNodeRequest(name=name), timeout=self.timeout)

    @_converting
    def cordon(self, name: str) -> types_pb2.Node:
        return self._admin.CordonNode(admin_service_pb2.CordonNodeRequest(name=name),
                                      timeout=self.timeout)

    @_converting
    def clear_gpu_quarantine(self, node: str, gpu_index: int) -> types_pb2.GpuStatus:
        """Take a quarantined (or reboot-awaiting) GPU back through recovery (admin)."""
        return self._admin.ClearGpuQuarantine(admin_service_pb2.ClearGpuQuarantineRequest(
            node=node, gpu_index=gpu_index), timeout=self.timeout)

    @_converting
    def uncordon(self, name: str) -> types_pb2.Node:
        return self._admin.UncordonNode(admin_service_pb2.UncordonNodeRequest(name=name),
                                        timeout=self.timeout)

    @_converting
    def drain(self, name: str, dry_run: bool = False) -> admin_service_pb2.DrainNodeResponse:
        return self._admin.DrainNode(admin_service_pb2.DrainNodeRequest(name=name, dry_run=dry_run),
                                     timeout=self.timeout)

    @_converting
    def delete_node(self, name: str) -> admin_service_pb2.DeleteNodeResponse:
        """Retire a NotReady node for good (admin): what ran on it ends, its records go, and the response
        names what was ended. FailedPrecondition while it is READY (drain it, stop its agent, wait for
        NotReady); NotFound for an unknown node or one deleted already."""
        return self._admin.DeleteNode(admin_service_pb2.DeleteNodeRequest(name=name),
                                      timeout=max(self.timeout, DELETE_NODE_TIMEOUT_S))

    @_converting
    def version(self) -> admin_service_pb2.VersionInfo:
        """The version of the control plane reached (leader or standby); etcd members' for admins."""
        return self._admin.GetVersion(admin_service_pb2.GetVersionRequest(), timeout=self.timeout)

    @_converting
    def list_gpus(self, node: str = "") -> list[types_pb2.GpuStatus]:
        return list(self._admin.ListGpus(admin_service_pb2.ListGpusRequest(node=node),
                                         timeout=self.timeout).gpus)

    # -- workloads ------------------------------------------------------------

    @_converting
    def run_workload(self, slice_id: str, command: list[str] | None = None, env: Mapping[str, str] | None = None,
                     labels: Mapping[str, str] | None = None, *, backend: str = "", artifact: str = "",
                     served_name: str = "", context: int = 0, concurrency: int = 0, gpu_layers: int = 0,
                     device: str = "", dtype: str = "", gpu_memory_utilization: float = 0.0,
                     artifact_sha256: str = "", api_key: str = "", request_id: str = "") -> types_pb2.Workload:
        """Start `command` (argv) on a READY slice with the slice's environment plus `env`.
        Answers once the agent has started it (RUNNING, or FAILED with the reason), or PENDING
        when the node is not connected.

        With `backend` ("llama.cpp" or "vllm") and `artifact` (a GGUF file or a Hugging Face directory on
        the node) instead of a command, the agent starts that model server (nodeagent/backends/) with the
        settings given and reports its address in the workload's `endpoint` (docs/serving.md). vLLM only:
        `gpu_memory_utilization` in (0, 1], the share of the device's memory it takes (an MPS or time-share
        slice's device is the whole GPU: at most the slice's memory over the GPU's; 0: the control plane sets
        the slice's share, as for a deployment's replica). `artifact_sha256`: the agent checks the weights
        against it before the server starts. `api_key`: the server then requires `Authorization: Bearer
        <api_key>` on every request (it reaches the server in its environment only, and no answer returns it).

        `request_id` (idempotency key): a retry with the same key returns the first call's workload instead
        of running it twice; the same key with other arguments raises errors.RequestIdReused."""
        if backend:
            if command:
                raise errors.InvalidArgument.of("command", "is set with a backend", "either a command or a backend")
            if backend not in ("llama.cpp", "vllm"):
                raise errors.InvalidArgument.of("backend", f"{backend!r} is not allowed", "llama.cpp, vllm")
            if not artifact:
                raise errors.InvalidArgument.of("artifact", "is required with a backend",
                                                "the model's path on the node (GGUF file or HF directory)")
            spec = types_pb2.ServingBackend(kind=backend, artifact=artifact, served_name=served_name,
                                            context=context, concurrency=concurrency, gpu_layers=gpu_layers,
                                            device=device, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                                            artifact_sha256=artifact_sha256, api_key=api_key)
            req = workload_service_pb2.RunWorkloadRequest(slice_id=slice_id, backend=spec, env=dict(env or {}),
                                                          labels=dict(labels or {}), request_id=request_id)
            return self._workloads.Run(req, timeout=max(self.timeout, 20.0))
        req = workload_service_pb2.RunWorkloadRequest(slice_id=slice_id, command=list(command or []),
                                                      env=dict(env or {}), labels=dict(labels or {}),
                                                      request_id=request_id)
        return self._workloads.Run(req, timeout=max(self.timeout, 20.0))

    @_converting
    def stop_workload(self, id: str, grace_seconds: float = 0.0) -> types_pb2.Workload:
        """SIGTERM, then SIGKILL after the grace period; answers once the process has ended."""
        req = workload_service_pb2.StopWorkloadRequest(id=id, grace_seconds=grace_seconds)
        return self._workloads.Stop(req, timeout=max(self.timeout, (grace_seconds or 10.0) + 15.0))

    @_converting
    def get_workload(self, id: str) -> types_pb2.Workload:
        return self._workloads.Get(workload_service_pb2.GetWorkloadRequest(id=id), timeout=self.timeout)

    @_converting
    def list_workloads(self, tenant: str = "", node: str = "", slice_id: str = "") -> list[types_pb2.Workload]:
        req = workload_service_pb2.ListWorkloadsRequest(tenant=tenant, node=node, slice_id=slice_id)
        return list(self._workloads.List(req, timeout=self.timeout).workloads)

    def workload_logs(self, id: str, tail_lines: int = 0, follow: bool = False) -> Iterator[bytes]:
        """The workload's output as byte chunks; with `follow`, until it ends (close the iterator
        to stop early). Errors arrive as MeshError while iterating."""
        req = workload_service_pb2.WorkloadLogsRequest(id=id, tail_lines=tail_lines, follow=follow)
        call = self._workloads.Logs(req, timeout=None if follow else self.timeout)
        try:
            for chunk in call:
                if chunk.data:
                    yield chunk.data
                if chunk.eof:
                    return
        except grpc.RpcError as exc:
            raise richstatus.from_rpc_error(exc) from None
        finally:
            call.cancel()

    @_converting
    def health(self) -> str:
        """The overall serving status ("serving", "not_serving", ...) from grpc.health.v1."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status).lower()


__all__ = ["MeshClient", "slice_to_dict", "workload_to_dict", "workload_state_name", "node_to_dict", "gpu_status_to_dict", "gpu_to_dict",
           "allocation_to_dict", "isolation_name", "slice_state_name", "node_state_name",
           "ISOLATIONS", "TOPOLOGIES", "SLICE_STATES", "NODE_STATES"]
