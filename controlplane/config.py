"""Control-plane configuration (file, `MESH_CP_*` environment, flags)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mesh.config import ConfigError, option, parse_hostport


@dataclass
class ControlPlaneConfig:
    ENV_PREFIX = "MESH_CP_"

    listen: str = option("127.0.0.1:50051", "gRPC listen address HOST:PORT (port 0 picks a free port)")
    advertise: str = option("", "HOST:PORT that agents and clients should dial to reach this control plane; kept in "
                                "the leader key so standbys can name the leader (with mtls_listen, the mTLS port on the "
                                "same host is named too); empty: the listen address")
    metrics_listen: str = option("127.0.0.1:9401", "Prometheus /metrics address HOST:PORT; empty disables it")
    web_listen: str = option("", "read-only web view (fleet map, slices, workloads, migrations, deployments; "
                                 "docs/views.md) at http(s)://HOST:PORT/, same tokens as gRPC; HTTPS with tls_cert "
                                 "when set; empty disables it")
    web_refresh_seconds: float = option(2.0, "how often the web view re-reads telemetry, deployments and "
                                        "migrations for its open pages (slice changes show at once)",
                                        minimum=0.2, maximum=60)
    web_snapshot_per_second: float = option(5.0, "web view: GET /api/snapshot requests per second per credential "
                                            "(per remote address with no tenants file), in bursts of as many; "
                                            "beyond, 429 with Retry-After (a frame is a List of everything)",
                                            minimum=0.01, maximum=1000)
    web_snapshot_cache_seconds: float = option(0.5, "web view: a frame /api/snapshot built for a credential "
                                               "answers that credential's requests for this long (requests while "
                                               "it is built wait for it); 0: only those", minimum=0, maximum=10)
    state_dir: str = option(".mesh/controlplane", "directory for the control plane's files (embedded etcd data, identity)")
    etcd_endpoints: list = option([], "etcd client URLs (http://HOST:PORT); none starts an embedded etcd under state_dir")
    etcd_compaction_retention: str = option("1h", "embedded etcd only: history kept before etcd's periodic "
                                             "auto-compaction (a duration: 30m, 1h, 24h; empty: never compact)")
    lease_ttl: int = option(10, "seconds a node stays Ready without a heartbeat", minimum=2, maximum=300)
    leader_ttl: int = option(10, "seconds of the control plane's own leader session lease", minimum=2, maximum=300)
    ready_timeout: float = option(30.0, "seconds Allocate waits for READY by default", minimum=0.1, maximum=3600)
    log_level: str = option("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = option("json", "log line format", choices=("json", "text"))
    port_file: str = option("", "write {endpoint, metrics, pid} as JSON here once serving")
    grace_seconds: float = option(5.0, "graceful shutdown period for in-flight RPCs", minimum=0, maximum=300)
    scheduler_profile: str = option("default", "scheduler profile (plugins and weights; see docs/scheduler.md)",
                                    choices=("default", "fgd", "fgd-exact", "bestfit", "packing", "spread", "random"))
    scheduler_config: str = option("", "scheduler configuration YAML (profile, weights, plugin args such as tenant "
                                       "quotas, preemption on/off); empty: the profile's defaults")
    memory_pressure_thresholds: list = option(
        ["50", "70", "85"], "GPU memory used, percent, where pressure turns normal, high, critical")
    thermal_thresholds: list = option(
        ["65", "80", "85"], "GPU temperature, Celsius, where the thermal state turns warning, throttling, critical")
    health_policy: str = option("", "GPU health policy YAML (XID classes and per-XID actions, recurrence window and "
                                    "limit, automatic reset on/off; see docs/operations.md); empty: NVIDIA's XID "
                                    "catalog classes as the defaults")
    node_events_kept: int = option(100, "events kept per node for `meshctl describe node`", minimum=1, maximum=10000)
    migration_pause_at: str = option("", "testing only: stop every migration's state machine once it enters this "
                                         "phase (planned, target_ready, copying, paused, committed), so a test can "
                                         "crash the control plane there", choices=("", "planned", "target_ready",
                                                                                  "copying", "paused", "committed"))
    # bounded state (docs/operations.md, "Retention and bounds")
    watch_queue_limit: int = option(10_000, "events that may wait for one watcher (SliceService.Watch, MigrationService"
                                    ".Watch, Logs, internal followers); one more cuts the watcher off with "
                                    "RESOURCE_EXHAUSTED (it lists and watches again)", minimum=1, maximum=10_000_000)
    agent_outbox_limit: int = option(10_000, "messages that may wait for one agent's Sync stream; one more ends the "
                                     "stream (the agent reconnects and is resent its full state)",
                                     minimum=16, maximum=10_000_000)
    retention_seconds: float = option(7 * 86400.0, "how long finished workloads, finished migrations and "
                                      "checkpoint records (with their log files and checkpoint files) are kept "
                                      "after they end", minimum=1, maximum=10 * 365 * 86400)
    request_id_retention_seconds: float = option(86400.0, "how long an Allocate or Run request_id is remembered (a "
                                                 "retry with it within this time gets the same allocation or "
                                                 "workload)", minimum=10,
                                                 maximum=30 * 86400)
    events_retention_seconds: float = option(86400.0, "how long an event is kept after it last happened "
                                             "(`meshctl get events`)", minimum=1, maximum=365 * 86400)
    events_kept: int = option(10_000, "events kept at most (the oldest, by last occurrence, expire first)",
                              minimum=1, maximum=10_000_000)
    events_coalesce_seconds: float = option(600.0, "a repeat of an event (same object, type, reason and message) "
                                            "within this time of its last occurrence raises its count instead of "
                                            "recording a new event", minimum=0, maximum=86400)
    checkpoints_kept: int = option(10, "checkpoints kept per workload (older ones expire first, whatever their "
                                   "age)", minimum=1, maximum=100_000)
    checkpoint_quota_bytes: int = option(0, "bytes a tenant's checkpoints may hold in the agents' shared checkpoint "
                                         "store (the sum of its checkpoint records' sizes; a tenant's "
                                         "max_checkpoint_bytes quota in tenants_file overrides it); a Checkpoint is "
                                         "refused at the limit, and one that would pass it is stopped while "
                                         "received; 0: no limit", minimum=0, maximum=2**62)
    copy_idle_timeout_seconds: float = option(900.0, "a checkpoint into the store, a restore's push or a migration's "
                                              "copy fails when its agent reports no progress (bytes, a pre-copy "
                                              "round) for this long: a dead agent, a lost node, a stuck workload. "
                                              "Above the agent's own waits without progress (the workload's safe "
                                              "point, up to 600 s; transfer_idle_timeout_seconds), else a live "
                                              "checkpoint is failed here first", minimum=10, maximum=86400)
    copy_timeout_seconds: float = option(86400.0, "the longest such a step may take in all, however it progresses "
                                         "(a checkpoint of tens of GB into a slow store takes hours); at least "
                                         "copy_idle_timeout_seconds", minimum=60, maximum=30 * 86400)
    retention_interval_seconds: float = option(60.0, "how often expired records are looked for", minimum=0.1,
                                               maximum=86400)
    # security (docs/security.md)
    insecure: bool = option(False, "serve plaintext gRPC without TLS (the local demo only); without it the control "
                                   "plane refuses to start unless tls_cert and tls_key are set")
    tls_cert: str = option("", "PEM certificate of the gRPC server (`meshctl certs init` writes controlplane.crt)")
    tls_key: str = option("", "PEM private key of tls_cert")
    tls_client_ca: str = option("", "PEM CA that signs agent and client certificates; with mtls_listen empty, every "
                                    "caller on listen must present one (no bearer-token-only clients)")
    mtls_listen: str = option("", "second gRPC address HOST:PORT where a client certificate signed by tls_client_ca "
                                  "is required (agents connect here); listen then takes bearer tokens without one")
    tenants_file: str = option("", "YAML file of tenants (with quotas) and bearer tokens (name, tenant, role: admin, "
                                   "tenant or viewer); every RPC is then authorized")
    etcd_ca: str = option("", "PEM CA that signed the etcd servers' certificates (https:// endpoints)")
    etcd_cert: str = option("", "PEM client certificate for etcd (client-cert-auth)")
    etcd_key: str = option("", "PEM private key of etcd_cert")
    etcd_username: str = option("", "etcd user (etcd auth enabled); needs etcd_password")
    etcd_password: str = option("", "password of etcd_username (prefer $MESH_CP_ETCD_PASSWORD to the file or a flag)")
    deployment_interval_seconds: float = option(1.0, "how often the deployment controller re-checks every "
                                                "deployment (it also runs at once after each change)",
                                                minimum=0.05, maximum=60)
    deployment_backoff_seconds: float = option(2.0, "wait before the first restart of a crashed backend; doubles "
                                               "with each crash up to deployment_backoff_max_seconds",
                                               minimum=0, maximum=3600)
    deployment_backoff_max_seconds: float = option(60.0, "the cap of the restart backoff", minimum=0, maximum=86400)
    deployment_crashloop_after: int = option(3, "crashes of a replica (without staying ready for "
                                             "deployment_stable_seconds) that put its deployment in CrashLoop",
                                             minimum=1, maximum=1000)
    deployment_node_lost_seconds: float = option(20.0, "a replica whose node stays NotReady this long is replaced "
                                                 "on another (counted from when this leader first saw it so)",
                                                 minimum=0, maximum=86400)
    deployment_stable_seconds: float = option(60.0, "ready this long, a replica's crash count starts over",
                                              minimum=0, maximum=86400)
    # the autoscaler (docs/autoscaling.md)
    autoscaler_interval_seconds: float = option(2.0, "how often the autoscaler samples each deployment with a "
                                                "scaling policy and decides its replicas", minimum=0.1, maximum=600)
    autoscaler_cold_start_seconds: float = option(30.0, "a replica's cold start (slice plus model load) when neither "
                                                  "the deployment's own replicas nor the registry's `model bench` "
                                                  "figures give one: a predictive policy's default lead time",
                                                  minimum=0, maximum=3600)
    autoscaler_forecast_seconds: float = option(30.0, "how often a predictive policy's demand forecast is refitted "
                                                "(in a worker thread, off the event loop)", minimum=1, maximum=3600)
    autoscaler_load_max_age_seconds: float = option(15.0, "a replica's load reading received longer ago than this "
                                                    "is stale: its load is unknown, and the autoscaler makes no "
                                                    "scale-down (nor scale to zero) until it reports again, and the "
                                                    "history writes no deployment load sample meanwhile (keep it "
                                                    "a few agent telemetry intervals; 0: no age bound)",
                                                    minimum=0, maximum=3600)
    # history and forecasts (docs/prediction.md, "History" and "ForecastService")
    history_enabled: bool = option(True, "keep time series of GPU telemetry, deployment load and the slice-request "
                                   "stream in SQLite under state_dir (history.db), for ForecastService")
    history_flush_seconds: float = option(5.0, "how often recorded samples are written to history.db (a crash loses "
                                          "at most this much)", minimum=0.1, maximum=3600)
    history_sample_seconds: float = option(5.0, "how often deployment load is sampled into the history",
                                           minimum=0.5, maximum=3600)
    history_tiers: list = option(["raw:1h", "1m:1d", "10m:30d"],
                                 "downsampling tiers RESOLUTION:KEEP, oldest last: raw samples for the first KEEP, "
                                 "then means over buckets of each RESOLUTION (a larger multiple of the one before); "
                                 "nothing is kept past the last KEEP (units s, m, h, d)")
    prometheus_url: str = option("", "Prometheus base URL (http(s)://HOST:PORT) that scrapes this control plane's "
                                     "/metrics: GPU forecasts then read their history with PromQL from it "
                                     "(gpumesh_gpu_* gauges) instead of history.db; other series stay embedded "
                                     "(docs/prediction.md)")
    # the live orchestrator (docs/prediction.md, "The live orchestrator"); every rule is off by default
    orchestrator_warm_slices: bool = option(False, "keep MIG slices carved ahead (warm) from the forecast of the "
                                            "Allocate request mix; Allocate claims a matching warm slice at once")
    orchestrator_moves: bool = option(False, "live-migrate the lowest-priority movable workload off a GPU whose "
                                      "forecast memory pressure or temperature (the interval's upper edge) reaches "
                                      "critical within orchestrator_load_horizon_seconds")
    orchestrator_resize: bool = option(False, "resize slices labelled gpumesh.io/autoresize=true before their forecast "
                                       "memory use outgrows them, and shrink them back when it falls")
    orchestrator_interval_seconds: float = option(5.0, "how often the orchestrator looks at the fleet and its "
                                                  "forecasts (level-triggered)", minimum=0.2, maximum=3600)
    orchestrator_level: float = option(0.9, "coverage of the prediction intervals the rules judge on",
                                       minimum=0.5, maximum=0.99)
    orchestrator_fit_workers: int = option(1, "worker processes that fit the orchestrator's forecasts (off the "
                                           "event loop; bounds their CPU)", minimum=1, maximum=16)
    orchestrator_load_step_seconds: float = option(1.0, "step of the GPU load forecasts (memory, temperature)",
                                                   minimum=0.1, maximum=3600)
    orchestrator_load_horizon_seconds: float = option(15.0, "how far ahead a hot spot is looked for (seed 000: 5-15 s)",
                                                      minimum=0.1, maximum=86400)
    orchestrator_demand_step_seconds: float = option(60.0, "step of the request-mix forecast (Allocate requests per "
                                                     "step, per MIG profile and GPU model)", minimum=0.1, maximum=86400)
    orchestrator_warm_lead_seconds: float = option(60.0, "how far ahead warm slices must cover the forecast demand's "
                                                   "upper edge (the control period plus the time to carve one)",
                                                   minimum=0.1, maximum=86400)
    orchestrator_warm_release_band: float = option(0.5, "hysteresis: warm slices are given back only above "
                                                   "need * (1 + band) + 1", minimum=0, maximum=10)
    orchestrator_warm_max_per_key: int = option(8, "warm slices of one (profile, GPU model) at most",
                                                minimum=0, maximum=1000)
    orchestrator_warm_max_total: int = option(16, "warm slices in the fleet at most", minimum=0, maximum=100_000)
    orchestrator_warm_burst_quantile: float = option(0.0, "keep at least this quantile of the bursts seen (requests "
                                                     "of one key within one create time, over the arrivals kept) "
                                                     "warm, whatever the step forecast says; e.g. 0.99; 0: off",
                                                     minimum=0, maximum=1)
    orchestrator_warm_create_seconds: float = option(0.0, "the create time the burst floor covers; 0: measured (the "
                                                     "median create-to-ready time of the last warm slices, 10 s "
                                                     "until one is measured)", minimum=0, maximum=3600)
    orchestrator_warm_burst_windows: float = option(2.0, "bursts are counted within this many create times (the "
                                                    "replay's margin: at 2 a burst may exceed the past's by what "
                                                    "arrives in one more create time)", minimum=1, maximum=100)
    orchestrator_move_per_workload_per_hour: int = option(1, "orchestrator migrations of one workload per hour at most",
                                                          minimum=0, maximum=1000)
    orchestrator_move_fleet_per_hour: int = option(60, "orchestrator migrations in the fleet per hour at most",
                                                   minimum=0, maximum=100_000)
    orchestrator_move_cooldown_seconds: float = option(600.0, "after a move off a GPU, no other move off it for this "
                                                       "long", minimum=0, maximum=86400)
    orchestrator_move_downtime_seconds: float = option(0.3, "the migration downtime the cost check assumes until "
                                                       "migrations have been measured (then their mean)",
                                                       minimum=0, maximum=3600)
    orchestrator_resize_headroom: float = option(0.1, "grow to the forecast's upper edge times (1 + headroom)",
                                                 minimum=0, maximum=10)
    orchestrator_resize_shrink_band: float = option(0.3, "shrink only when the grown size times (1 + band) is still "
                                                    "below the slice's size", minimum=0, maximum=10)
    orchestrator_resize_cooldown_seconds: float = option(300.0, "after a resize of a slice, no other resize of it "
                                                         "for this long", minimum=0, maximum=86400)
    # cost (docs/cost.md)
    gpu_prices: list = option(["H100-80GB=2.49", "A100-80GB=1.79", "A100-40GB=1.29"],
                              "dollars per GPU-hour per GPU model, MODEL=PRICE (the defaults are illustrative "
                              "on-demand list prices: set your own); a slice is charged its share (MIG: memory "
                              "slices of 8; MPS: the larger of compute share and memory fraction; time-share: its "
                              "memory fraction; exclusive: the whole GPU)")
    gpu_price_default: float = option(0.0, "dollars per GPU-hour of a GPU model gpu_prices does not name",
                                      minimum=0, maximum=1_000_000)

    cost_interval_seconds: float = option(10.0, "seconds between two cost accountings (each charges every slice "
                                          "for the time since the last and writes the ledger)", minimum=0.5,
                                          maximum=3600)
    cost_retention_days: float = option(400.0, "days the cost ledger keeps (minute rows for a day, then hourly)",
                                        minimum=1, maximum=3650)
    cost_recommend_observe_seconds: float = option(3600.0, "how long a replica's load must be observed before "
                                                   "meshctl recommend sizes it by its measured peak or calls it idle",
                                                   minimum=0, maximum=30 * 86400)

    def price_table(self):
        from mesh.cost import PriceTable
        return PriceTable.parse(self.gpu_prices, self.gpu_price_default)

    def deployment_policy(self):
        from controlplane.serving.reconcile import Policy
        return Policy(backoff_base=self.deployment_backoff_seconds, backoff_max=self.deployment_backoff_max_seconds,
                      crashloop_after=self.deployment_crashloop_after, stable_seconds=self.deployment_stable_seconds)

    def check(self) -> None:
        if self.copy_idle_timeout_seconds > self.copy_timeout_seconds:
            raise ConfigError(f"copy_idle_timeout_seconds: {self.copy_idle_timeout_seconds:g} is longer than "
                              f"copy_timeout_seconds ({self.copy_timeout_seconds:g}), the longest a step may take")
        for name, count, hi in (("memory_pressure_thresholds", 3, 100), ("thermal_thresholds", 3, 200)):
            values = getattr(self, name)
            try:
                nums = [float(v) for v in values]
            except ValueError:
                raise ConfigError(f"{name}: {values!r} are not numbers") from None
            if len(nums) != count or nums != sorted(nums) or not all(0 <= v <= hi for v in nums):
                raise ConfigError(f"{name}: {values!r} must be {count} increasing numbers in 0-{hi}")
        from controlplane.controllers import healthpolicy
        healthpolicy.load(self.health_policy)   # raises ConfigError naming the field
        parse_hostport(self.listen, "listen")
        if self.advertise:
            parse_hostport(self.advertise, "advertise")
        from controlplane.scheduler import profiles
        profiles.load(self.scheduler_config, self.scheduler_profile)   # raises ConfigError naming the problem
        if self.metrics_listen:
            parse_hostport(self.metrics_listen, "metrics_listen")
        if self.web_listen:
            parse_hostport(self.web_listen, "web_listen")
        from controlplane.state.etcdconn import parse_endpoint
        for url in self.etcd_endpoints:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"etcd_endpoints: {url!r} must start with http:// or https://")
            try:    # the store parses them at start: a bad one was a traceback there, naming no option
                parse_endpoint(url)
            except ValueError:
                raise ConfigError(f"etcd_endpoints: {url!r} is not http(s)://HOST:PORT (a port 1-65535 is "
                                  f"needed)") from None
        if len({url.split("://", 1)[0] for url in self.etcd_endpoints}) > 1:
            # one set of channel credentials serves them all: TLS to a plaintext member fails its every call
            raise ConfigError(f"etcd_endpoints: {self.etcd_endpoints!r} mix http:// and https://; use one scheme")
        if self.etcd_compaction_retention and not re.fullmatch(r"(\d+(\.\d+)?(h|m|s))+|\d+",
                                                               self.etcd_compaction_retention):
            raise ConfigError(f"etcd_compaction_retention: {self.etcd_compaction_retention!r} is not a duration "
                              f"(allowed: like 30m, 1h, 2h30m, a whole number of hours, or empty for never)")
        parent = os.path.dirname(os.path.abspath(self.state_dir))
        if not os.path.isdir(parent):
            raise ConfigError(f"state_dir: the parent directory of {self.state_dir!r} does not exist")
        from controlplane.forecast.history import parse_tiers
        parse_tiers(self.history_tiers)      # raises ConfigError naming history_tiers
        try:
            self.price_table()
        except ValueError as e:
            raise ConfigError(f"gpu_prices: {e}") from None
        if self.prometheus_url:
            from urllib.parse import urlparse
            u = urlparse(self.prometheus_url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ConfigError(f"prometheus_url: {self.prometheus_url!r} must be http(s)://HOST[:PORT][/PATH]")
        self.check_security()

    def check_security(self) -> None:
        from mesh import tls
        if self.insecure and (self.tls_cert or self.tls_client_ca or self.mtls_listen):
            raise ConfigError("insecure: plaintext cannot be combined with tls_cert, tls_client_ca or mtls_listen")
        if not self.insecure and not self.tls_cert:
            raise ConfigError("tls_cert: no TLS certificate configured; set tls_cert and tls_key (`meshctl certs "
                              "init`, see docs/security.md), or insecure: true (--insecure) for a plaintext demo")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_key: tls_cert and tls_key go together")
        if self.mtls_listen:
            if not self.tls_client_ca:
                raise ConfigError("mtls_listen: needs tls_client_ca (the CA of the agent and client certificates)")
            parse_hostport(self.mtls_listen, "mtls_listen")
        try:
            for name in ("tls_cert", "tls_key", "tls_client_ca", "etcd_ca", "etcd_cert", "etcd_key"):
                if getattr(self, name):
                    tls.read(getattr(self, name), name)
        except tls.TlsError as e:
            raise ConfigError(str(e)) from None
        if bool(self.etcd_cert) != bool(self.etcd_key):
            raise ConfigError("etcd_key: etcd_cert and etcd_key go together")
        if bool(self.etcd_username) != bool(self.etcd_password):
            raise ConfigError("etcd_password: etcd_username and etcd_password go together")
        if (self.etcd_ca or self.etcd_cert) and not self.etcd_endpoints:
            raise ConfigError("etcd_ca: TLS to etcd needs etcd_endpoints (https://...); the embedded etcd is local")
        for url in self.etcd_endpoints:
            if (self.etcd_ca or self.etcd_cert) and not url.startswith("https://"):
                raise ConfigError(f"etcd_endpoints: {url!r} must be https:// when etcd_ca or etcd_cert is set")
        if self.tenants_file:
            from controlplane.api.tenantsfile import load_tenants
            load_tenants(self.tenants_file)
