"""ForecastService reading GPU and node history from a real Prometheus (Debian's `prometheus` package, as .ci/run
installs it) that scrapes the control plane's /metrics: `prometheus_url` set, `meshctl forecast get` answers
with `source: prometheus` once Prometheus holds enough samples."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.integration.conftest import wait_for
from tools.localcluster import LocalCluster

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="the prometheus server is not installed (apt-get install prometheus)")]
HOST = {"node": "fp-1", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GLOBAL = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"


def start_prometheus(d) -> tuple[subprocess.Popen, int]:
    """Prometheus on a free port, answering /-/ready, with no scrape target yet. The port is picked, then bound
    by Prometheus: one taken meanwhile by another process makes Prometheus exit, and another port is tried."""
    import httpx
    (d / "prometheus.yml").write_text(GLOBAL)
    for _ in range(5):
        port = free_port()
        with open(d / "prometheus.log", "ab") as log:
            prom = subprocess.Popen(["prometheus", f"--config.file={d / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={d / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                    stdout=log, stderr=subprocess.STDOUT)

        def ready_or_exited():
            if prom.poll() is not None:
                return "exited"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=5).status_code == 200 and "ready"
            except httpx.HTTPError:
                return None
        if wait_for(ready_or_exited, 60, "Prometheus to answer /-/ready (or exit)", interval=0.2) == "ready":
            return prom, port
    raise AssertionError(f"Prometheus did not start on a free port in 5 tries: {(d / 'prometheus.log').read_text()}")


def stop(prom: subprocess.Popen) -> None:
    prom.terminate()
    try:
        prom.wait(timeout=30)
    except subprocess.TimeoutExpired:
        prom.kill()
        prom.wait()


@pytest.fixture(scope="module")
def prom_cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp")
    # Prometheus first (so its port is its own before the control plane is told it), then the cluster; then
    # Prometheus reloads its configuration (SIGHUP) with the control plane's /metrics as its target
    prom, port = start_prometheus(d)
    try:
        c = LocalCluster(d, [HOST], lease_ttl=3, controlplane_args=["--prometheus-url", f"http://127.0.0.1:{port}"],
                         agent_args=["--telemetry-interval-seconds", "0.5"])
        c.start(timeout=90)
        try:
            (d / "prometheus.yml").write_text(
                GLOBAL + f"scrape_configs:\n  - job_name: gpumesh-controlplane\n    static_configs:\n"
                         f"      - targets: ['{c.metrics_endpoint}']\n")
            prom.send_signal(signal.SIGHUP)
            yield c
        finally:
            c.stop()
    finally:
        stop(prom)


def test_forecast_from_prometheus(prom_cluster):
    def forecast():
        p = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "--endpoint", prom_cluster.endpoint,
                            "forecast", "get", "gpu/fp-1/0", "temperature", "--horizon", "5s", "--step", "1s",
                            "-o", "json"], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            # while Prometheus starts and fills: unreachable, no samples yet, or too few
            assert any(s in p.stderr for s in ("prometheus_url", "in Prometheus", "needs at least",
                                               "longer than the history")), p.stderr
            return None
        return json.loads(p.stdout)
    f = wait_for(forecast, 300, "a forecast from Prometheus's samples", interval=3)
    assert f["source"] == "prometheus" and len(f["points"]) == 5 and f["step_seconds"] == 1
    assert f["history"]["points"] >= 50 and 0 < f["history"]["last_value"] < 150     # degrees C
    for pt in f["points"]:
        assert pt["at"] and pt["lo"] <= pt["hi"]
    p = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "--endpoint", prom_cluster.endpoint,
                        "forecast", "get", "gpu/fp-9/0", "temperature", "--horizon", "5s"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and "no series gpu/fp-9/0 temperature in Prometheus" in p.stderr, p.stderr

    # the node's series too (gpumesh_node_* gauges, exported from the history's latest node reading)
    p = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "--endpoint", prom_cluster.endpoint,
                        "forecast", "get", "node/fp-1", "temperature", "--horizon", "5s", "--step", "1s", "-o", "json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    node = json.loads(p.stdout)
    assert node["source"] == "prometheus" and 0 < node["history"]["last_value"] < 150
