"""Control-plane configuration (file, `MESH_CP_*` environment, flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mesh.config import ConfigError, option, parse_hostport


@dataclass
class ControlPlaneConfig:
    ENV_PREFIX = "MESH_CP_"

    listen: str = option("127.0.0.1:50051", "gRPC listen address HOST:PORT (port 0 picks a free port)")
    metrics_listen: str = option("127.0.0.1:9401", "Prometheus /metrics address HOST:PORT; empty disables it")
    state_dir: str = option(".mesh/controlplane", "directory for the control plane's files (embedded etcd data, identity)")
    etcd_endpoints: list = option([], "etcd client URLs (http://HOST:PORT); none starts an embedded etcd under state_dir")
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
    xid_nonfatal: list = option(
        ["13", "31", "43", "45", "68", "109"], "XID codes that do not make a GPU unhealthy (application errors)")
    gpu_recovery_seconds: float = option(
        300.0, "seconds an unhealthy GPU must stay free of fatal XIDs before it takes slices again",
        minimum=1, maximum=86400)
    node_events_kept: int = option(100, "events kept per node for `meshctl describe node`", minimum=1, maximum=10000)

    def check(self) -> None:
        for name, count, hi in (("memory_pressure_thresholds", 3, 100), ("thermal_thresholds", 3, 200)):
            values = getattr(self, name)
            try:
                nums = [float(v) for v in values]
            except ValueError:
                raise ConfigError(f"{name}: {values!r} are not numbers") from None
            if len(nums) != count or nums != sorted(nums) or not all(0 <= v <= hi for v in nums):
                raise ConfigError(f"{name}: {values!r} must be {count} increasing numbers in 0-{hi}")
        try:
            [int(v) for v in self.xid_nonfatal]
        except ValueError:
            raise ConfigError(f"xid_nonfatal: {self.xid_nonfatal!r} must be integers") from None
        parse_hostport(self.listen, "listen")
        from controlplane.scheduler import profiles
        profiles.load(self.scheduler_config, self.scheduler_profile)   # raises ConfigError naming the problem
        if self.metrics_listen:
            parse_hostport(self.metrics_listen, "metrics_listen")
        for url in self.etcd_endpoints:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"etcd_endpoints: {url!r} must start with http:// or https://")
        parent = os.path.dirname(os.path.abspath(self.state_dir))
        if not os.path.isdir(parent):
            raise ConfigError(f"state_dir: the parent directory of {self.state_dir!r} does not exist")
