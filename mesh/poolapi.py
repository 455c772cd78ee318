"""The resource-pool part of the SDK (PoolService): create, get, list, update, delete pools.

    with MeshClient(endpoint) as mesh:
        mesh.create_pool(pool_from_dict({"name": "inference-a", "selector": {"gpu_models": ["H100-80GB"],
                                         "isolations": ["mps"]}, "quota": {"max_slices": 4}}))
        mesh.get_pool("inference-a").usage.available_slices

`pool_to_dict` is what `meshctl get pool -o json|yaml` prints and `pool_from_dict` reads it back (isolations
as "mig"/"mps"/"timeshare"/"exclusive"). Mixed into `mesh.client.MeshClient`; errors are the typed
`mesh.errors` ones.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from gpumesh.v1 import pool_service_pb2 as P
from gpumesh.v1 import pool_service_pb2_grpc
from mesh import errors, pools


def _converting(fn):
    from mesh.client import _converting as conv
    return conv(fn)


def pool_to_dict(p: P.Pool) -> dict:
    d = json_format.MessageToDict(p, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for part in ("selector", "quota", "usage"):
        d.setdefault(part, {})
    d["selector"]["isolations"] = [pools.ISOLATIONS.get(i, str(i)) for i in p.selector.isolations]
    for k in ("memory_bytes", "capacity_memory_bytes", "available_memory_bytes"):
        d["usage"][k] = int(d["usage"].get(k, 0))
    d["quota"]["max_memory_bytes"] = int(d["quota"].get("max_memory_bytes", 0))
    d["generation"] = int(d.get("generation", 0))
    return d


def pool_from_dict(d: dict) -> P.Pool:
    """A Pool from a mapping (a pool.yaml); InvalidArgument naming the field when it is not one."""
    if not isinstance(d, dict):
        raise errors.InvalidArgument.of("pool", "must be a mapping", "name, description, selector, quota")
    d = {k: v for k, v in d.items() if k not in ("usage", "created_at", "updated_at")}
    sel = dict(d.get("selector") or {})
    isos = sel.get("isolations") or []
    if not isinstance(isos, list):
        raise errors.InvalidArgument.of("pool.selector.isolations", "must be a list", "mig, mps, timeshare, exclusive")
    sel["isolations"] = [pools.parse_isolation(str(x), f"pool.selector.isolations[{i}]") for i, x in enumerate(isos)]
    d["selector"] = sel
    quota = d.get("quota")
    if isinstance(quota, dict):       # what protobuf's JSON parser refuses with its own words, named here
        for k, v in quota.items():
            if k in pools.QUOTAS and isinstance(v, (int, float)) and not isinstance(v, bool):
                pools.check_quota(k, v)
    try:
        return json_format.ParseDict(d, P.Pool())
    except json_format.ParseError as e:
        raise errors.InvalidArgument.of("pool", str(e), "name, description, selector {gpu_models, isolations, "
                                        "node_labels}, quota {max_gpus, max_slices, max_memory_bytes, "
                                        "max_dollars_per_hour}") from None


class PoolApi:
    _channel: Any
    timeout: float

    @property
    def _poolsvc(self) -> pool_service_pb2_grpc.PoolServiceStub:
        stub = self.__dict__.get("_pool_stub")
        if stub is None:
            stub = self.__dict__["_pool_stub"] = pool_service_pb2_grpc.PoolServiceStub(self._channel)
        return stub

    def create_pool(self, pool: P.Pool | dict) -> P.Pool:
        """Add a pool (admin)."""
        if isinstance(pool, dict):
            pool = pool_from_dict(pool)
        return _converting(self._poolsvc.Create)(P.CreatePoolRequest(pool=pool), timeout=self.timeout)

    def get_pool(self, name: str) -> P.Pool:
        """One pool with its usage now (what an autoscaler reads to know its room)."""
        return _converting(self._poolsvc.Get)(P.GetPoolRequest(name=name), timeout=self.timeout)

    def list_pools(self) -> list[P.Pool]:
        return list(_converting(self._poolsvc.List)(P.ListPoolsRequest(), timeout=self.timeout).pools)

    def update_pool(self, pool: P.Pool | dict) -> P.Pool:
        if isinstance(pool, dict):
            pool = pool_from_dict(pool)
        return _converting(self._poolsvc.Update)(P.UpdatePoolRequest(pool=pool), timeout=self.timeout)

    def delete_pool(self, name: str) -> P.Pool:
        return _converting(self._poolsvc.Delete)(P.DeletePoolRequest(name=name), timeout=self.timeout)
