"""The serving view part of the SDK (ServingViewService): what a gateway routes by, as one snapshot or a stream.

    with MeshClient(endpoint) as mesh:
        view = mesh.serving_view()                        # one snapshot: deployments, models, GPUs, costs
        [r.endpoint for d in view.deployments for r in d.replicas]
        for view in mesh.watch_serving_view(interval_ms=1000):   # a fresh snapshot after each change
            ...

The gateway (controlplane/gateway) follows the same stream; the SDK offers it so that an operator or a
custom router sees exactly what the gateway sees. `serving_view_to_dict` is what `meshctl get servingview
-o json|yaml` prints (replica keys redacted unless asked for). Mixed into `mesh.client.MeshClient`; errors
are the typed `mesh.errors` ones (InvalidArgument naming interval_ms or heartbeat_ms, PermissionDenied).
"""

from __future__ import annotations

from typing import Any, Iterator

from gpumesh.v1 import servingview_service_pb2 as V
from gpumesh.v1 import servingview_service_pb2_grpc

REDACTED = "<redacted>"


class ServingViewApi:
    _channel: Any
    timeout: float

    @property
    def _viewsvc(self) -> servingview_service_pb2_grpc.ServingViewServiceStub:
        stub = self.__dict__.get("_view_stub")
        if stub is None:
            stub = self.__dict__["_view_stub"] = servingview_service_pb2_grpc.ServingViewServiceStub(self._channel)
        return stub

    def watch_serving_view(self, interval_ms: int = 0, heartbeat_ms: int = 0,
                           timeout: float | None = None) -> Iterator[V.ServingView]:
        """A snapshot now, then one whenever something in it changed (compared every `interval_ms`; 0: 500,
        else 100..60000) and at least every `heartbeat_ms` (0: 5000, else interval_ms..600000). Runs until
        the caller stops iterating (the stream is cancelled then) or `timeout` passes. Viewers and up; a
        tenant sees its own deployments, and only admins get `replica_api_keys`."""
        from mesh import richstatus
        call = self._viewsvc.Watch(V.WatchServingViewRequest(interval_ms=interval_ms, heartbeat_ms=heartbeat_ms),
                                   timeout=timeout)
        yield from richstatus.stream(call)

    def serving_view(self) -> V.ServingView:
        """One snapshot of the serving view (the first message of Watch; the stream is cancelled after it)."""
        stream = self.watch_serving_view(timeout=self.timeout)
        try:
            return next(stream)
        finally:
            stream.close()


def serving_view_to_dict(view: V.ServingView, show_keys: bool = False) -> dict[str, Any]:
    """A snapshot as a document. Replica keys are secrets (they open a model server to anyone holding
    them): each is shown as "<redacted>" unless `show_keys`, so a pasted `-o yaml` leaks none."""
    from mesh.costapi import to_dict
    from mesh.deployapi import deployment_to_dict
    from mesh.modelapi import model_to_dict
    from mesh.todict import gpu_status_to_dict, timestamp
    return {
        "sequence": view.sequence,
        "at": timestamp(view, "at"),
        "deployments": [deployment_to_dict(d) for d in view.deployments],
        "models": [model_to_dict(m) for m in view.models],
        "gpus": [gpu_status_to_dict(g) for g in view.gpus],
        "model_costs": [to_dict(c) for c in view.model_costs],
        "replica_api_keys": {rid: (key if show_keys else REDACTED) for rid, key in
                             sorted(view.replica_api_keys.items())},
    }
