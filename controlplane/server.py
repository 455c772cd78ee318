"""Assemble and run the control plane: etcd, store, the gRPC server (controlplane/api/grpcserver.py), the
election, and the leader's controllers once elected (controlplane/leader.py); a standby follows etcd meanwhile."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import pathlib
import signal

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import REGISTRY, start_http_server

from controlplane.api import auth, grpcserver, metrics
from controlplane.api.grpcserver import set_health
from controlplane.api.tenantsfile import apply_quotas, load_tenants
from controlplane.config import ControlPlaneConfig
from controlplane.leader import LeaderControllers
from controlplane.state.etcdserver import EtcdServer
from controlplane.state.leadership import new_identity
from controlplane.state.store import EtcdStore
from mesh import errors
from mesh.config import parse_hostport
from mesh.fsmodes import private_dir
from mesh.logs import log

logger = logging.getLogger(__name__)


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
        self.leader: LeaderControllers | None = None

    @property
    def ctl(self):
        """The leader's Controller (None until this process leads)."""
        return self.leader.ctl if self.leader is not None else None

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
        self.authenticator = auth.Authenticator(self.tenants, insecure=self.cfg.insecure)
        self.server = grpcserver.new_server(self.authenticator)
        self.switches, names = grpcserver.add_services(self.server, self.health, self._leader_endpoint)
        host, self.port, self.mtls_port, mtls_endpoint = grpcserver.listen(self.server, self.cfg)
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
            await set_health(self.health, names + [""], health_pb2.HealthCheckResponse.NOT_SERVING)
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
            ctl = self.ctl or getattr(getattr(self, "follower", None), "ctl", None)
            return ctl.events if ctl is not None else None
        self.web = WebView(self.switches, self.authenticator, hub, refresh=self.cfg.web_refresh_seconds,
                           ssl_context=ssl_context(self.cfg.tls_cert, self.cfg.tls_key),
                           snapshot_per_second=self.cfg.web_snapshot_per_second,
                           snapshot_cache_seconds=self.cfg.web_snapshot_cache_seconds)
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
        self.leader = LeaderControllers(self.cfg, self.store, self.tenants, self.identity(), self.state_dir)
        await self.leader.start(self._writer_failed)
        # The fleet is long-lived and large; keep the collector off it and collect young objects
        # less often (the request path allocates many short-lived protobufs).
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)

        apply_quotas(self.ctl.scheduler, self.tenants)
        real = grpcserver.leader_servicers(self.leader, self.cfg)
        for name, sw in self.switches.items():
            sw.target = real[name]
            sw.reader = None
        self.follower = None
        if self.cfg.metrics_listen and self._collector is None:
            # collected from a snapshot taken on this loop, never from the scrape thread (metrics.py)
            self._collector = metrics.FleetCollector(asyncio.get_running_loop(), lambda: metrics.snapshot(
                self.leader.ctl, self.leader.workloads, self.leader.migrations, self.leader.history))
            REGISTRY.register(self._collector)
        await set_health(self.health, self._names + [""], health_pb2.HealthCheckResponse.SERVING)
        metrics.LEADER.set(1)
        metrics.ELECTIONS.inc()
        log(logger, logging.INFO, "leading", advertise=self.advertise)

    async def _writer_failed(self, why: str) -> None:
        """The etcd writer cannot be restarted: stop serving and give the leadership up (a standby, or
        this process restarted by its supervisor, takes over from etcd)."""
        log(logger, logging.CRITICAL, "etcd writer failed for good: NOT_SERVING, stepping down", why=why)
        await set_health(self.health, self._names + [""], health_pb2.HealthCheckResponse.NOT_SERVING)
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
            await set_health(self.health, [""], health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.server.stop(self.cfg.grace_seconds)
        if self.leader is not None:
            await self.leader.stop()
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

