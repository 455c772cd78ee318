"""The control plane's gRPC server: the interceptors, every v1 service behind its standby `Switch`
(controlplane/controllers/standby.py), health and reflection, the listen and mTLS ports; and the servicers a
leader switches the services to.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.api import rpc
from controlplane.api.interceptor import AuthInterceptor
from controlplane.config import ControlPlaneConfig
from controlplane.controllers.standby import Switch
from gpumesh.v1 import (admin_service_pb2, admin_service_pb2_grpc, node_service_pb2, node_service_pb2_grpc,
                        slice_service_pb2, slice_service_pb2_grpc, workload_service_pb2,
                        workload_service_pb2_grpc)
from gpumesh.v1 import mesh_service_pb2, mesh_service_pb2_grpc, model_service_pb2, model_service_pb2_grpc
from gpumesh.v1 import deployment_service_pb2, deployment_service_pb2_grpc
from gpumesh.v1 import event_service_pb2, event_service_pb2_grpc
from gpumesh.v1 import servingview_service_pb2, servingview_service_pb2_grpc
from gpumesh.v1 import forecast_service_pb2, forecast_service_pb2_grpc
from gpumesh.v1 import cost_service_pb2, cost_service_pb2_grpc, pool_service_pb2, pool_service_pb2_grpc
from mesh import tls
from mesh.config import parse_hostport

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 5000)]


def new_server(authenticator) -> grpc.aio.Server:
    """A server whose every call passes DecodeGuard first (request bytes that do not parse are INVALID_ARGUMENT,
    never UNKNOWN: rpc.py), then the AuthInterceptor."""
    return grpc.aio.server(options=GRPC_OPTIONS, interceptors=[
        rpc.DecodeGuard(), AuthInterceptor(authenticator)])


def add_services(server: grpc.aio.Server, health, leader_endpoint) -> tuple[dict[str, Switch], list[str]]:
    """Every service as a Switch: UNAVAILABLE naming the leader (`leader_endpoint()`) until this process wins the
    election, then the real servicer (`leader_servicers`); health and reflection. The switches by service name,
    and the services' full names (what health reports on)."""
    from gpumesh.v1 import migration_service_pb2, migration_service_pb2_grpc
    switches = {}
    names = []
    for pb2, grpc_mod, name in SERVICES(migration_service_pb2, migration_service_pb2_grpc):
        sw = Switch(pb2.DESCRIPTOR.services_by_name[name], leader_endpoint)
        getattr(grpc_mod, f"add_{name}Servicer_to_server")(sw, server)
        switches[name] = sw
        names.append(pb2.DESCRIPTOR.services_by_name[name].full_name)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                 reflection.SERVICE_NAME], server)
    return switches, names


def listen(server: grpc.aio.Server, cfg: ControlPlaneConfig) -> tuple[str, int, int, str]:
    """Add the listen port (and the mTLS port with mtls_listen): (host, port, mTLS port, mTLS endpoint), the
    last two 0 and "" without mtls_listen."""
    host, port = parse_hostport(cfg.listen, "listen")
    if cfg.insecure:
        port = server.add_insecure_port(f"{host}:{port}")
    else:
        # Without mtls_listen and with tls_client_ca, listen itself requires client certificates.
        port = server.add_secure_port(f"{host}:{port}", tls.server_credentials(
            cfg.tls_cert, cfg.tls_key, "" if cfg.mtls_listen else cfg.tls_client_ca,
            require_client_auth=bool(cfg.tls_client_ca and not cfg.mtls_listen)))
    mtls_port, mtls_endpoint = 0, ""
    if cfg.mtls_listen:
        mhost_, mport_ = parse_hostport(cfg.mtls_listen, "mtls_listen")
        mtls_port = server.add_secure_port(f"{mhost_}:{mport_}", tls.server_credentials(
            cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, require_client_auth=True))
        mtls_endpoint = f"{mhost_}:{mtls_port}"
    return host, port, mtls_port, mtls_endpoint


def leader_servicers(leader, cfg: ControlPlaneConfig) -> dict[str, object]:
    """The real servicer of each service, over the leader's controllers (controlplane/leader.py)."""
    from controlplane.api.meshsvc import MeshService
    from controlplane.api.migrationsvc import MigrationService
    from controlplane.api.services import AdminService, NodeService, SliceService
    from controlplane.controllers.workloads import WorkloadService
    from controlplane.cost.service import CostService
    from controlplane.events.service import EventService
    from controlplane.pools.service import PoolService
    from controlplane.serving.deploysvc import DeploymentService
    from controlplane.serving.registry import ModelService
    from controlplane.serving.viewsvc import ServingViewService
    return {"SliceService": SliceService(leader.ctl),
            "NodeService": NodeService(leader.ctl, leader.nodes, heartbeat_interval=max(0.5, cfg.lease_ttl / 3)),
            "AdminService": AdminService(leader.ctl, leader.nodes, leader.node_deleter, leading=True),
            "WorkloadService": WorkloadService(leader.workloads),
            "MeshService": MeshService(leader.mesh),
            "MigrationService": MigrationService(leader.migrations),
            "ModelService": ModelService(leader.models),
            "DeploymentService": DeploymentService(leader.deployments),
            "EventService": EventService(leader.event_log),
            "ServingViewService": ServingViewService(leader.ctl, leader.deployments, leader.models),
            "ForecastService": _forecast_service(leader.history, cfg.prometheus_url, leader.deployments),
            "PoolService": PoolService(leader.pools),
            "CostService": CostService(leader.cost, leader.recommender)}


async def set_health(servicer, names: list[str], status) -> None:
    """Report `status` for each of `names` on the health servicer."""
    for name in names:
        res = servicer.set(name, status)
        if asyncio.iscoroutine(res):
            await res


def SERVICES(migration_service_pb2, migration_service_pb2_grpc):
    return ((slice_service_pb2, slice_service_pb2_grpc, "SliceService"),
            (node_service_pb2, node_service_pb2_grpc, "NodeService"),
            (admin_service_pb2, admin_service_pb2_grpc, "AdminService"),
            (workload_service_pb2, workload_service_pb2_grpc, "WorkloadService"),
            (mesh_service_pb2, mesh_service_pb2_grpc, "MeshService"),
            (migration_service_pb2, migration_service_pb2_grpc, "MigrationService"),
            (model_service_pb2, model_service_pb2_grpc, "ModelService"),
            (deployment_service_pb2, deployment_service_pb2_grpc, "DeploymentService"),
            (event_service_pb2, event_service_pb2_grpc, "EventService"),
            (servingview_service_pb2, servingview_service_pb2_grpc, "ServingViewService"),
            (forecast_service_pb2, forecast_service_pb2_grpc, "ForecastService"),
            (pool_service_pb2, pool_service_pb2_grpc, "PoolService"),
            (cost_service_pb2, cost_service_pb2_grpc, "CostService"))


def _forecast_service(history, prometheus_url: str = "", deployments=None):
    from controlplane.forecast.service import DisabledForecastService, ForecastService
    if history is None:
        return DisabledForecastService()
    prom = None
    if prometheus_url:
        from controlplane.forecast.prometheus import PrometheusHistory
        prom = PrometheusHistory(prometheus_url)
    return ForecastService(history, prometheus=prom, deployments=deployments)
