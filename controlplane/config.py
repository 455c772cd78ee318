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

    def check(self) -> None:
        parse_hostport(self.listen, "listen")
        if self.metrics_listen:
            parse_hostport(self.metrics_listen, "metrics_listen")
        for url in self.etcd_endpoints:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"etcd_endpoints: {url!r} must start with http:// or https://")
        parent = os.path.dirname(os.path.abspath(self.state_dir))
        if not os.path.isdir(parent):
            raise ConfigError(f"state_dir: the parent directory of {self.state_dir!r} does not exist")
