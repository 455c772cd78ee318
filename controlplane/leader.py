"""What the leader runs: its controllers, loaded from etcd and started in the order they depend on each other
(the writer first, the autoscaler last); stopped once the gRPC server has stopped, the orchestrator first and the
etcd writer last.

A standby builds none of this (it serves reads from controlplane/state/follower.py); controlplane/server.py
builds it on election and switches the services to the servicers over it (api/grpcserver.py
`leader_servicers`).
"""

from __future__ import annotations

import asyncio
import logging

from controlplane.api.meshsvc import MeshManager
from controlplane.config import ControlPlaneConfig
from controlplane.controllers.nodes import NodeManager
from controlplane.controllers.slices import Controller
from controlplane.controllers.telemetry import Policy, TelemetryManager
from controlplane.controllers.workloads import WorkloadManager
from controlplane.state.store import EtcdStore
from mesh.logs import log

logger = logging.getLogger("controlplane.server")


class LeaderControllers:
    """The leader's controllers; each attribute None until started (`stop` stops what a failed start began)."""

    def __init__(self, cfg: ControlPlaneConfig, store: EtcdStore, tenants, identity: str, state_dir) -> None:
        self.cfg, self.store, self.tenants, self.identity, self.state_dir = cfg, store, tenants, identity, state_dir
        self.ctl = self.event_log = self.nodes = self.workloads = self.telemetry = self.mesh = None
        self.migrations = self.models = self.retention = self.pools = self.deployments = None
        self.node_deleter = self.history = self.orchestrator = self.cost = self.recommender = None
        self.autoscaler = None

    async def start(self, on_writer_failed) -> None:
        """Load the fleet from etcd and start every controller; `on_writer_failed(why)` when the etcd writer
        cannot be restarted."""
        cfg = self.cfg
        self.ctl = Controller(self.store, ready_timeout=cfg.ready_timeout)
        self.ctl.events.max_queue = cfg.watch_queue_limit
        self.ctl.request_ttl = cfg.request_id_retention_seconds
        self.ctl.sessions.outbox_limit = cfg.agent_outbox_limit
        self.ctl.writer.on_fatal.append(on_writer_failed)
        self.ctl.scheduler = __import__("controlplane.scheduler", fromlist=["load"]).load(cfg.scheduler_config, cfg.scheduler_profile)
        self.ctl.writer.start()
        from controlplane.events import EventLog, Recorder
        self.event_log = EventLog(max_queue=cfg.watch_queue_limit)
        self.ctl.recorder = Recorder(self.ctl.writer, self.event_log, source=self.identity,
                                     coalesce_seconds=cfg.events_coalesce_seconds)
        await self.ctl.recorder.load(self.store)
        self.ctl.recorder.start()
        self.nodes = NodeManager(self.ctl, lease_ttl=cfg.lease_ttl)
        await self.nodes.load()
        self.workloads = WorkloadManager(self.ctl)
        await self.workloads.load()
        self.telemetry = TelemetryManager(self.ctl, Policy(
            pressure_pct=tuple(float(v) for v in cfg.memory_pressure_thresholds),
            thermal_c=tuple(float(v) for v in cfg.thermal_thresholds),
            health=__import__("controlplane.controllers.healthpolicy", fromlist=["load"]).load(cfg.health_policy),
            events_kept=cfg.node_events_kept))
        await self.telemetry.load()
        self.mesh = MeshManager(self.ctl)
        await self.mesh.load()
        from controlplane.controllers.migrations import MigrationManager
        self.migrations = MigrationManager(self.ctl, self.workloads, cfg.migration_pause_at)
        self.migrations.copy_idle_timeout = cfg.copy_idle_timeout_seconds
        self.migrations.copy_timeout = cfg.copy_timeout_seconds
        await self.migrations.load()
        from controlplane.controllers.checkpoint_quota import CheckpointQuota
        self.migrations.checkpoint_quota = CheckpointQuota(cfg.checkpoint_quota_bytes, self.tenants)
        from controlplane.serving.registry import ModelRegistry
        self.models = ModelRegistry(self.ctl)
        await self.models.load()
        from controlplane.controllers.retention import Retention
        self.retention = Retention(self.ctl, self.workloads, self.migrations, cfg.retention_seconds,
                                   cfg.checkpoints_kept, cfg.retention_interval_seconds,
                                   events=self.event_log, events_retention_s=cfg.events_retention_seconds,
                                   events_kept=cfg.events_kept)
        self.retention.start()
        from controlplane.pools.store import PoolStore
        self.pools = PoolStore(self.ctl, cfg.price_table())
        await self.pools.load()
        from controlplane.serving.deployments import DeploymentManager
        self.deployments = DeploymentManager(self.ctl, self.workloads, self.models, cfg.deployment_policy(),
                                             interval=cfg.deployment_interval_seconds,
                                             node_lost_seconds=cfg.deployment_node_lost_seconds)
        await self.deployments.load()
        self.deployments.prices = cfg.price_table()
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
                                               interval=cfg.autoscaler_interval_seconds,
                                               default_cold_start=cfg.autoscaler_cold_start_seconds,
                                               forecast_every=cfg.autoscaler_forecast_seconds,
                                               load_max_age=cfg.autoscaler_load_max_age_seconds)
        self.autoscaler.start()

    async def _start_cost(self):
        """The cost accountant (controlplane/cost/) with its ledger in history.db, and the recommender."""
        from controlplane.cost.accountant import CostAccountant
        from controlplane.cost.ledger import CostLedger
        from controlplane.cost.recommender import Recommender
        # off the event loop: opening a ledger of an earlier release builds its tenant index (once)
        ledger = await asyncio.to_thread(CostLedger, str(self.state_dir / "history.db"),
                                         keep=self.cfg.cost_retention_days * 86400.0)
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

    async def stop(self) -> None:
        """Stop the controllers (the orchestrator before the actuators it drives); what is pending is written
        before the writer stops."""
        if self.orchestrator is not None:
            await self.orchestrator.stop()
        if self.nodes is None:
            return
        if self.node_deleter is not None:
            await self.node_deleter.stop()
        await self.nodes.stop()
        for part in (self.mesh, self.migrations, self.retention, self.autoscaler, self.deployments, self.workloads,
                     self.cost,             # the last interval is charged and written
                     self.history):         # what is recorded is flushed to history.db
            if part is not None:
                await part.stop()
        if hasattr(self.ctl.recorder, "stop"):
            await self.ctl.recorder.stop()      # what is pending is written before the writer stops
        await self.ctl.writer.stop()
