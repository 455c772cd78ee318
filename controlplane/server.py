"""Assemble and run the control plane: etcd, store, controller, gRPC server."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import pathlib
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, start_http_server

from controlplane.api import auth, metrics, rpc
from controlplane.api.interceptor import AuthInterceptor
from controlplane.api.tenantsfile import apply_quotas, load_tenants
from controlplane.config import ControlPlaneConfig
from controlplane.controllers.slices import Controller
from controlplane.state.etcdserver import EtcdServer
from controlplane.api.meshsvc import MeshManager, MeshService
from controlplane.controllers.nodes import NodeManager
from controlplane.api.services import AdminService, NodeService, SliceService
from controlplane.controllers.standby import Switch
from controlplane.state.leadership import new_identity
from controlplane.state.store import EtcdStore
from mesh.fsmodes import private_dir
from controlplane.controllers.workloads import WorkloadManager, WorkloadService
from controlplane.controllers.telemetry import Policy, TelemetryManager
from gpumesh.v1 import (admin_service_pb2, admin_service_pb2_grpc, node_service_pb2, node_service_pb2_grpc,
                        slice_service_pb2, slice_service_pb2_grpc, types_pb2, workload_service_pb2,
                        workload_service_pb2_grpc)
from gpumesh.v1 import mesh_service_pb2, mesh_service_pb2_grpc, model_service_pb2, model_service_pb2_grpc
from gpumesh.v1 import deployment_service_pb2, deployment_service_pb2_grpc
from gpumesh.v1 import event_service_pb2, event_service_pb2_grpc
from gpumesh.v1 import servingview_service_pb2, servingview_service_pb2_grpc
from gpumesh.v1 import forecast_service_pb2, forecast_service_pb2_grpc
from gpumesh.v1 import cost_service_pb2, cost_service_pb2_grpc, pool_service_pb2, pool_service_pb2_grpc
from mesh import errors, tls
from mesh.config import parse_hostport
from mesh.logs import log

logger = logging.getLogger(__name__)
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 5000)]


class ControlPlane:
    def __init__(self, cfg: ControlPlaneConfig) -> None:
        self.cfg = cfg
        self.state_dir = pathlib.Path(cfg.state_dir)
        self.etcd: EtcdServer | None = None
        self.store: EtcdStore | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self.web = None
        self.web_port = 0
        self._collector = None

    def identity(self) -> str:
        path = self.state_dir / "identity"
        if path.exists():
            return path.read_text().strip()
        ident = f"{os.uname().nodename}-{new_identity()}"
        path.write_text(ident)
        return ident

    async def _check_etcd_versions(self) -> None:
        """A WARNING naming each etcd member of 3.5.0-3.5.2, which may lose committed writes when killed under
        load (etcd-io/etcd#13766): the operator's to upgrade (3.5.3 or later, or 3.4.x)."""
        from controlplane.state.etcdserver import unsafe_version
        for endpoint, version in (await self.store.member_versions()).items():
            if unsafe_version(version):
                logger.warning("this etcd member's version may lose committed writes when a member is killed under "
                            "load (etcd-io/etcd#13766): upgrade it to 3.5.3 or later", extra={"fields": {
                                "endpoint": endpoint, "version": version}})

    async def start(self) -> None:
        private_dir(self.state_dir)     # 0700: every tenant's costs (history.db), etcd's data, the identity
        endpoints = list(self.cfg.etcd_endpoints)
        if not endpoints:
            self.etcd = EtcdServer(self.state_dir / "etcd", log_file=self.state_dir / "etcd.log",
                                   compaction_retention=self.cfg.etcd_compaction_retention)
            self.etcd.start()   # in the main thread: the child's death signal follows this thread
            endpoints = [self.etcd.endpoint]
        creds = None
        if self.cfg.etcd_ca or self.cfg.etcd_cert or any(e.startswith("https://") for e in endpoints):
            from controlplane.state.etcdtls import credentials
            creds = credentials(self.cfg.etcd_ca, self.cfg.etcd_cert, self.cfg.etcd_key)
        self.store = EtcdStore(endpoints, credentials=creds, username=self.cfg.etcd_username,
                               password=self.cfg.etcd_password)
        await self.store.connect()
        await self._check_etcd_versions()
        self.tenants = load_tenants(self.cfg.tenants_file) if self.cfg.tenants_file else None
        # DecodeGuard first: request bytes that do not parse are INVALID_ARGUMENT, never UNKNOWN (rpc.py)
        self.authenticator = auth.Authenticator(self.tenants, insecure=self.cfg.insecure)
        self.server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[
            rpc.DecodeGuard(), AuthInterceptor(self.authenticator)])
        from gpumesh.v1 import migration_service_pb2, migration_service_pb2_grpc
        # Every service is a Switch (controlplane/controllers/standby.py): UNAVAILABLE naming the leader until this
        # process wins the election, then the real servicer (built in _lead over the loaded fleet).
        self.switches = {}
        for pb2, grpc_mod, name in SERVICES(migration_service_pb2, migration_service_pb2_grpc):
            sw = Switch(pb2.DESCRIPTOR.services_by_name[name], self._leader_endpoint)
            getattr(grpc_mod, f"add_{name}Servicer_to_server")(sw, self.server)
            self.switches[name] = sw
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [d.services_by_name[n].full_name for d, n in (
            (slice_service_pb2.DESCRIPTOR, "SliceService"), (node_service_pb2.DESCRIPTOR, "NodeService"),
            (admin_service_pb2.DESCRIPTOR, "AdminService"), (workload_service_pb2.DESCRIPTOR, "WorkloadService"),
            (mesh_service_pb2.DESCRIPTOR, "MeshService"), (migration_service_pb2.DESCRIPTOR, "MigrationService"),
            (model_service_pb2.DESCRIPTOR, "ModelService"),
            (deployment_service_pb2.DESCRIPTOR, "DeploymentService"),
            (event_service_pb2.DESCRIPTOR, "EventService"),
            (servingview_service_pb2.DESCRIPTOR, "ServingViewService"),
            (forecast_service_pb2.DESCRIPTOR, "ForecastService"),
            (pool_service_pb2.DESCRIPTOR, "PoolService"), (cost_service_pb2.DESCRIPTOR, "CostService"))]
        reflection.enable_server_reflection(names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                     reflection.SERVICE_NAME], self.server)
        host, port = parse_hostport(self.cfg.listen, "listen")
        if self.cfg.insecure:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        else:
            # Without mtls_listen and with tls_client_ca, listen itself requires client certificates.
            self.port = self.server.add_secure_port(f"{host}:{port}", tls.server_credentials(
                self.cfg.tls_cert, self.cfg.tls_key, "" if self.cfg.mtls_listen else self.cfg.tls_client_ca,
                require_client_auth=bool(self.cfg.tls_client_ca and not self.cfg.mtls_listen)))
        mtls_endpoint = ""
        if self.cfg.mtls_listen:
            mhost_, mport_ = parse_hostport(self.cfg.mtls_listen, "mtls_listen")
            self.mtls_port = self.server.add_secure_port(f"{mhost_}:{mport_}", tls.server_credentials(
                self.cfg.tls_cert, self.cfg.tls_key, self.cfg.tls_client_ca, require_client_auth=True))
            mtls_endpoint = f"{mhost_}:{self.mtls_port}"
        endpoint = f"{host}:{self.port}"
        self.advertise = self.cfg.advertise or endpoint
        if self.cfg.mtls_listen:
            # the mTLS port on the advertised host: standbys name both, so agents (which dial the
            # mTLS port) and token clients (the other) each find the leader in their own list
            self.advertise += f",{self.advertise.rpartition(':')[0]}:{self.mtls_port}"
        self._names = names
        # One quick attempt (a restart of the same identity takes over at once); otherwise serve as a
        # standby and campaign in the background.
        try:
            await self.store.become_leader(self.identity(), ttl=self.cfg.leader_ttl, wait=0,
                                           endpoint=self.advertise)
            leading = True
        except errors.Unavailable:
            leading = False
        if leading:
            await self._lead()
        else:
            for n in names + [""]:
                await _set_health(self.health, n, health_pb2.HealthCheckResponse.NOT_SERVING)
            # Standing by: serve the reads from a read-only fleet that follows etcd (controlplane/state/follower.py).
            from controlplane.state.follower import Follower
            self.follower = Follower(self.store, lease_ttl=self.cfg.lease_ttl)
            from controlplane.controllers.checkpoint_quota import CheckpointQuota     # the limits ListCheckpoints shows
            self.follower.migrations.checkpoint_quota = CheckpointQuota(self.cfg.checkpoint_quota_bytes, self.tenants)
            self.follower.ctl.events.max_queue = self.cfg.watch_queue_limit
            self.follower.event_log.max_queue = self.cfg.watch_queue_limit
            self.follower.start()
            for sw in self.switches.values():
                sw.reader = self.follower.reader
            self.campaign = asyncio.create_task(self._campaign(), name="leader-campaign")
        await self.server.start()
        if self.cfg.metrics_listen:
            mhost, mport = parse_hostport(self.cfg.metrics_listen, "metrics_listen")
            httpd, _ = start_http_server(mport, addr=mhost)
            self.metrics_port = httpd.server_port
        web = await self._start_web()
        if self.cfg.port_file:
            tmp = self.cfg.port_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"endpoint": endpoint, "metrics": f"{host}:{self.metrics_port}" if self.metrics_port
                           else "", "mtls_endpoint": mtls_endpoint, "web": web, "pid": os.getpid()}, f)
            os.replace(tmp, self.cfg.port_file)
        log(logger, logging.INFO, "control plane serving", endpoint=endpoint, metrics_port=self.metrics_port, web=web,
            etcd=",".join(endpoints), embedded_etcd=self.etcd is not None, tls=not self.cfg.insecure,
            mtls_endpoint=mtls_endpoint, authorization=self.tenants is not None or not self.cfg.insecure,
            role="leader" if leading else "standby", advertise=self.advertise)

    async def _start_web(self) -> str:
        """The web view (controlplane/web) when web_listen is set: its URL, else ""."""
        if not self.cfg.web_listen:
            return ""
        from controlplane.web.server import WebView, ssl_context

        def hub():
            ctl = getattr(self, "ctl", None) or getattr(getattr(self, "follower", None), "ctl", None)
            return ctl.events if ctl is not None else None
        self.web = WebView(self.switches, self.authenticator, hub, refresh=self.cfg.web_refresh_seconds,
                           ssl_context=ssl_context(self.cfg.tls_cert, self.cfg.tls_key))
        whost, wport = parse_hostport(self.cfg.web_listen, "web_listen")
        self.web_port = await self.web.start(whost, wport)
        return f"{'https' if self.cfg.tls_cert else 'http'}://{whost}:{self.web_port}/"

    async def _leader_endpoint(self) -> str:
        return (await self.store.leader())[1]

    async def _campaign(self) -> None:
        from controlplane.state.etcdconn import ETCD_ERRORS
        while True:
            try:
                await self.store.become_leader(self.identity(), ttl=self.cfg.leader_ttl, wait=None,
                                               endpoint=self.advertise)
                break
            except ETCD_ERRORS as e:
                log(logger, logging.WARNING, "leader campaign: etcd unreachable; retrying", error=str(e))
                await asyncio.sleep(0.5)
        log(logger, logging.INFO, "elected leader: taking over from etcd", advertise=self.advertise)
        await self._lead()

    async def _lead(self) -> None:
        """Leader mode: load the fleet from etcd, start the writer, then switch every service on."""
        follower = getattr(self, "follower", None)
        if follower is not None:
            # Stop following; its (frozen) fleet keeps answering reads until the real servicers are on.
            await follower.stop()
        self.ctl = Controller(self.store, ready_timeout=self.cfg.ready_timeout)
        self.ctl.events.max_queue = self.cfg.watch_queue_limit
        self.ctl.request_ttl = self.cfg.request_id_retention_seconds
        self.ctl.sessions.outbox_limit = self.cfg.agent_outbox_limit
        self.ctl.writer.on_fatal.append(self._writer_failed)
        self.ctl.scheduler = __import__("controlplane.scheduler", fromlist=["load"]).load(self.cfg.scheduler_config, self.cfg.scheduler_profile)
        self.ctl.writer.start()
        from controlplane.events import EventLog, Recorder
        self.event_log = EventLog(max_queue=self.cfg.watch_queue_limit)
        self.ctl.recorder = Recorder(self.ctl.writer, self.event_log, source=self.identity(),
                                     coalesce_seconds=self.cfg.events_coalesce_seconds)
        await self.ctl.recorder.load(self.store)
        self.ctl.recorder.start()
        self.nodes = NodeManager(self.ctl, lease_ttl=self.cfg.lease_ttl)
        await self.nodes.load()
        self.workloads = WorkloadManager(self.ctl)
        await self.workloads.load()
        self.telemetry = TelemetryManager(self.ctl, Policy(
            pressure_pct=tuple(float(v) for v in self.cfg.memory_pressure_thresholds),
            thermal_c=tuple(float(v) for v in self.cfg.thermal_thresholds),
            health=__import__("controlplane.controllers.healthpolicy", fromlist=["load"]).load(self.cfg.health_policy),
            events_kept=self.cfg.node_events_kept))
        await self.telemetry.load()
        self.mesh = MeshManager(self.ctl)
        await self.mesh.load()
        from controlplane.controllers.migrations import MigrationManager
        from controlplane.api.migrationsvc import MigrationService
        self.migrations = MigrationManager(self.ctl, self.workloads, self.cfg.migration_pause_at)
        await self.migrations.load()
        from controlplane.controllers.checkpoint_quota import CheckpointQuota
        self.migrations.checkpoint_quota = CheckpointQuota(self.cfg.checkpoint_quota_bytes, self.tenants)
        from controlplane.serving.registry import ModelRegistry, ModelService
        self.models = ModelRegistry(self.ctl)
        await self.models.load()
        from controlplane.controllers.retention import Retention
        self.retention = Retention(self.ctl, self.workloads, self.migrations, self.cfg.retention_seconds,
                                   self.cfg.checkpoints_kept, self.cfg.retention_interval_seconds,
                                   events=self.event_log, events_retention_s=self.cfg.events_retention_seconds,
                                   events_kept=self.cfg.events_kept)
        self.retention.start()
        from controlplane.pools.store import PoolStore
        self.pools = PoolStore(self.ctl, self.cfg.price_table())
        await self.pools.load()
        from controlplane.serving.deployments import DeploymentManager
        from controlplane.serving.deploysvc import DeploymentService
        from controlplane.events.service import EventService
        from controlplane.serving.viewsvc import ServingViewService
        from controlplane.pools.service import PoolService
        from controlplane.cost.service import CostService
        self.deployments = DeploymentManager(self.ctl, self.workloads, self.models, self.cfg.deployment_policy(),
                                             interval=self.cfg.deployment_interval_seconds,
                                             node_lost_seconds=self.cfg.deployment_node_lost_seconds)
        await self.deployments.load()
        self.deployments.prices = self.cfg.price_table()
        from controlplane.controllers.nodedelete import NodeDeleter
        self.node_deleter = NodeDeleter(self.ctl, self.nodes, self.workloads, self.mesh)
        await self.node_deleter.resume()        # deletions a stopped control plane had begun
        self.pools.deployments = self.deployments
        self.history = self._start_history()
        self.orchestrator = self._start_orchestrator()
        if self.orchestrator is None or self.orchestrator.pool is None:
            from controlplane.controllers.warmslices import release_when_off
            await release_when_off(self.ctl, "orchestrator_warm_slices is false")
        self.cost, self.recommender = await self._start_cost()
        from controlplane.controllers.autoscaler import AutoscalerController
        self.autoscaler = AutoscalerController(self.deployments, self.models, history=self.history,
                                               interval=self.cfg.autoscaler_interval_seconds,
                                               default_cold_start=self.cfg.autoscaler_cold_start_seconds,
                                               forecast_every=self.cfg.autoscaler_forecast_seconds,
                                               load_max_age=self.cfg.autoscaler_load_max_age_seconds)
        self.autoscaler.start()
        # The fleet is long-lived and large; keep the collector off it and collect young objects
        # less often (the request path allocates many short-lived protobufs).
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)

        apply_quotas(self.ctl.scheduler, self.tenants)
        real = {"SliceService": SliceService(self.ctl),
                "NodeService": NodeService(self.ctl, self.nodes, heartbeat_interval=max(0.5, self.cfg.lease_ttl / 3)),
                "AdminService": AdminService(self.ctl, self.nodes, self.node_deleter, leading=True),
                "WorkloadService": WorkloadService(self.workloads),
                "MeshService": MeshService(self.mesh),
                "MigrationService": MigrationService(self.migrations),
                "ModelService": ModelService(self.models),
                "DeploymentService": DeploymentService(self.deployments),
                "EventService": EventService(self.event_log),
                "ServingViewService": ServingViewService(self.ctl, self.deployments, self.models),
                "ForecastService": _forecast_service(self.history, self.cfg.prometheus_url, self.deployments),
                "PoolService": PoolService(self.pools),
                "CostService": CostService(self.cost, self.recommender)}
        for name, sw in self.switches.items():
            sw.target = real[name]
            sw.reader = None
        self.follower = None
        if self.cfg.metrics_listen and self._collector is None:
            # collected from a snapshot taken on this loop, never from the scrape thread (metrics.py)
            self._collector = metrics.FleetCollector(asyncio.get_running_loop(), lambda: metrics.snapshot(
                self.ctl, self.workloads, self.migrations, self.history))
            REGISTRY.register(self._collector)
        for n in self._names + [""]:
            await _set_health(self.health, n, health_pb2.HealthCheckResponse.SERVING)
        metrics.LEADER.set(1)
        metrics.ELECTIONS.inc()
        log(logger, logging.INFO, "leading", advertise=self.advertise)

    async def _start_cost(self):
        """The cost accountant (controlplane/cost/) with its ledger in history.db, and the recommender."""
        from controlplane.cost.accountant import CostAccountant
        from controlplane.cost.ledger import CostLedger
        from controlplane.cost.recommender import Recommender
        ledger = CostLedger(str(self.state_dir / "history.db"), keep=self.cfg.cost_retention_days * 86400.0)
        acc = CostAccountant(self.ctl, self.deployments, ledger, self.cfg.price_table(),
                             interval=self.cfg.cost_interval_seconds, history=self.history)
        await acc.load()
        acc.start()
        return acc, Recommender(self.ctl, self.deployments, self.migrations, acc,
                                min_observed=self.cfg.cost_recommend_observe_seconds)

    def _start_history(self):
        """The history recorder (controlplane/forecast/) fed by telemetry, deployments and Allocate; None when off."""
        if not self.cfg.history_enabled:
            return None
        from controlplane.forecast.history import HistoryStore, parse_tiers
        from controlplane.forecast.recorder import HistoryRecorder
        store = HistoryStore(str(self.state_dir / "history.db"), parse_tiers(self.cfg.history_tiers))
        rec = HistoryRecorder(store, flush_seconds=self.cfg.history_flush_seconds,
                              sample_seconds=self.cfg.history_sample_seconds,
                              load_max_age=self.cfg.autoscaler_load_max_age_seconds)
        rec.attach(self.telemetry, self.ctl, self.deployments, workloads=self.workloads)
        rec.start()
        return rec

    def _start_orchestrator(self):
        """The live orchestrator (controlplane/controllers/orchestrator.py) when a rule is on; None when all are off."""
        from controlplane.controllers.orchestrator import Orchestrator, Settings
        settings = Settings.from_config(self.cfg)
        if not settings.enabled:
            return None
        orch = Orchestrator(self.ctl, settings, telemetry=self.telemetry, workloads=self.workloads,
                            migrations=self.migrations, deployments=self.deployments,
                            thresholds=(self.telemetry.policy.pressure_pct, self.telemetry.policy.thermal_c),
                            history=self.history)
        orch.attach()
        orch.start()
        log(logger, logging.INFO, "orchestrator started", warm_slices=settings.warm, moves=settings.moves,
            resize=settings.resize, interval_s=settings.interval_s)
        return orch

    async def _writer_failed(self, why: str) -> None:
        """The etcd writer cannot be restarted: stop serving and give the leadership up (a standby, or
        this process restarted by its supervisor, takes over from etcd)."""
        log(logger, logging.CRITICAL, "etcd writer failed for good: NOT_SERVING, stepping down", why=why)
        for n in self._names + [""]:
            await _set_health(self.health, n, health_pb2.HealthCheckResponse.NOT_SERVING)
        metrics.LEADER.set(0)
        await self.store.step_down(f"the etcd writer failed: {why}")

    async def stop(self) -> None:
        metrics.LEADER.set(0)
        if getattr(self, "campaign", None) is not None and not self.campaign.done():
            self.campaign.cancel()
        if getattr(self, "follower", None) is not None:
            await self.follower.stop()
        if self.web is not None:
            await self.web.stop()
        if self.server is not None:
            await _set_health(self.health, "", health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.server.stop(self.cfg.grace_seconds)
        if getattr(self, "orchestrator", None) is not None:
            await self.orchestrator.stop()         # before the actuators it drives
        if getattr(self, "nodes", None) is not None:
            if getattr(self, "node_deleter", None) is not None:
                await self.node_deleter.stop()
            await self.nodes.stop()
            if getattr(self, "mesh", None) is not None:
                await self.mesh.stop()
            if getattr(self, "migrations", None) is not None:
                await self.migrations.stop()
            if getattr(self, "retention", None) is not None:
                await self.retention.stop()
            if getattr(self, "autoscaler", None) is not None:
                await self.autoscaler.stop()
            if getattr(self, "deployments", None) is not None:
                await self.deployments.stop()
            if getattr(self, "workloads", None) is not None:
                await self.workloads.stop()
            if getattr(self, "cost", None) is not None:
                await self.cost.stop()             # the last interval is charged and written
            if getattr(self, "history", None) is not None:
                await self.history.stop()          # what is recorded is flushed to history.db
            if hasattr(self.ctl.recorder, "stop"):
                await self.ctl.recorder.stop()      # what is pending is written before the writer stops
            await self.ctl.writer.stop()
        if self.store is not None:
            await self.store.close()
        if self.etcd is not None:
            await asyncio.to_thread(self.etcd.stop)
        log(logger, logging.INFO, "control plane stopped")

    async def run_until_signal(self) -> None:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        lost = asyncio.create_task(self.store.lost_leadership.wait())
        waiter = asyncio.create_task(stop.wait())
        watched = {lost, waiter}
        campaign = getattr(self, "campaign", None)
        if campaign is not None:
            watched.add(campaign)
        while True:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if campaign in done:
                watched.discard(campaign)
                if campaign.exception() is None:
                    continue        # promoted: now lead until a signal or the loss of the lease
                log(logger, logging.ERROR, "leader campaign failed", error=repr(campaign.exception()))
            break
        if lost in done:
            log(logger, logging.ERROR, "lost leadership: stopping so a supervisor restarts this control plane")
        await self.stop()


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


async def _set_health(servicer, name: str, status) -> None:
    res = servicer.set(name, status)
    if asyncio.iscoroutine(res):
        await res
