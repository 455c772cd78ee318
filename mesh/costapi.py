"""The cost part of the SDK (CostService): costs by tenant, deployment, model, node or slice, and
consolidation recommendations.

    with MeshClient(endpoint) as mesh:
        resp = mesh.get_cost(by="model", since_seconds=86400)
        for line in resp.lines: print(line.key, line.dollars, line.dollars_per_1k_tokens)
        mesh.recommend()                     # what could cost less
        mesh.recommend(apply=True, kinds=["resize"])   # admin: carry them out, one at a time
        mesh.recommend(apply=True, ids=[r.id])         # admin: exactly this listed one, or FailedPrecondition

Mixed into `mesh.client.MeshClient`; errors are the typed `mesh.errors` ones.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from gpumesh.v1 import cost_service_pb2 as C
from gpumesh.v1 import cost_service_pb2_grpc


def _converting(fn):
    from mesh.client import _converting as conv
    return conv(fn)


def to_dict(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class CostApi:
    _channel: Any
    timeout: float

    @property
    def _costsvc(self) -> cost_service_pb2_grpc.CostServiceStub:
        stub = self.__dict__.get("_cost_stub")
        if stub is None:
            stub = self.__dict__["_cost_stub"] = cost_service_pb2_grpc.CostServiceStub(self._channel)
        return stub

    def get_cost(self, by: str = "tenant", since_seconds: float = 0.0) -> C.GetCostResponse:
        return _converting(self._costsvc.GetCost)(C.GetCostRequest(by=by, since_seconds=since_seconds),
                                                  timeout=self.timeout)

    def recommend(self, apply: bool = False, limit: int = 0, kinds: list[str] | None = None,
                  timeout: float | None = None, slice_id: str = "", ids: list[str] | None = None
                  ) -> C.RecommendResponse:
        """Recommendations; with `apply` (admin) carried out one at a time, stopping at the first failure
        (a resize by migration can take minutes: give a `timeout`). `ids` (the `id`s of an earlier answer):
        only those, and with `apply` exactly those; one that no longer holds raises FailedPrecondition
        naming what changed (when nothing was carried out before it in the call)."""
        req = C.RecommendRequest(apply=apply, limit=limit, kinds=kinds or [], slice_id=slice_id, ids=ids or [])
        return _converting(self._costsvc.Recommend)(req, timeout=timeout or self.timeout)
