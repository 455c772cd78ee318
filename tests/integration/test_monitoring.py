"""The Grafana dashboard, the Prometheus scrape configuration and the alert rules in docs/monitoring/:
every metric their PromQL names is served on the running daemons' /metrics (a real local cluster: the
control plane and an agent process), the rules load in promtool (Debian's prometheus package), and the
dashboard has the shape Grafana imports."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import HOSTS, LEASE_TTL, wait_for
from tools.localcluster import LocalCluster

MONITORING = Path(__file__).resolve().parents[2] / "docs" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "gpumesh-fleet.json"
RULES = MONITORING / "alerts.yml"
SCRAPE = MONITORING / "prometheus.yml"
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$node": ".*"}
GATEWAY_PREFIX = "gpumesh_gateway_"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
            "unknown": ("",), "untyped": ("",), "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, from PromQL's own parser."""
    import promql_parser
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    names: set[str] = set()

    def walk(node) -> None:
        for attr in ("lhs", "rhs", "expr", "param", "args", "vector_selector"):
            child = getattr(node, attr, None)
            for c in (child if isinstance(child, (list, tuple)) else [child]):
                if c is not None:
                    walk(c)
        if type(node).__name__ == "VectorSelector" and node.name:
            names.add(node.name)
    walk(promql_parser.parse(expr))
    return names


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict) and q.get("query", "").startswith("label_values("):
            exprs.append(q["query"][len("label_values("):].split(",")[0])     # label_values(METRIC, label)
    return exprs


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def served(text: str) -> set[str]:
    """Every series name a /metrics page can carry (families with their type's suffixes)."""
    from prometheus_client.parser import text_string_to_metric_families
    out = set()
    for fam in text_string_to_metric_families(text):
        out.update(fam.name + s for s in SUFFIXES.get(fam.type, ("",)))
        out.add(fam.name)
    return out


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on: its sockets (/proc/PID/fd) in the LISTEN state (/proc/PID/net)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:         # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The /metrics text of the control plane and of the (one) agent process of a running cluster. The agent
    serves /metrics on a port of its own choosing (LocalCluster's `--metrics-listen 127.0.0.1:0`), found among its
    listening sockets: a port picked here and bound later by the agent could be taken meanwhile."""
    c = LocalCluster(tmp_path_factory.mktemp("monitoring"), HOSTS, lease_ttl=LEASE_TTL,
                     agents_per_process=len(HOSTS))
    c.start(timeout=90)
    try:
        c.wait_ready(timeout=60)
        with c.client() as mesh:       # some traffic, so the request metrics have samples too
            mesh.allocate(tenant="team-a", mig_profile="1g.10gb", gpu_model="H100-80GB")

        def get(addr: str) -> str:
            with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
                return r.read().decode()
        cp = wait_for(lambda: get(c.metrics_endpoint), 30, "the control plane's /metrics")
        (agent_proc,) = c.agents.values()

        def agent_page():
            for port in sorted(listening_ports(agent_proc.pid)):
                page = _try(get, f"127.0.0.1:{port}")
                if page and "gpumesh_agent_" in page:
                    return page
            return None
        agent = wait_for(agent_page, 60, "the agent's /metrics")
        yield {"controlplane": cp, "agent": agent}
    finally:
        c.stop()


def _try(fn, *a):
    try:
        return fn(*a)
    except (OSError, ValueError, http.client.HTTPException):    # refused, or not HTTP (another of its listeners)
        return None


def test_the_name_extraction_is_promql_s_own():
    assert metric_names('sum by (le) (rate(a_bucket{x="b_total"}[$__rate_interval])) / on(node) c') == \
        {"a_bucket", "c"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(d_bucket[5m]))) > bool 1") == {"d_bucket"}


def test_every_metric_the_dashboard_and_the_rules_name_is_served(pages):
    names = served(pages["controlplane"]) | served(pages["agent"])
    assert "gpumesh_gpu_healthy" in served(pages["controlplane"])
    assert "gpumesh_agent_slice_operations_total" in served(pages["agent"])
    wanted = {}
    for source, exprs in (("dashboard", dashboard_exprs(json.loads(DASHBOARD.read_text()))),
                          ("alert rules", rule_exprs())):
        for e in exprs:
            for n in metric_names(e):
                wanted.setdefault(n, (source, e))
    daemon = {n: w for n, w in wanted.items() if not n.startswith(GATEWAY_PREFIX)}
    assert len(daemon) > 30
    missing = {n: w for n, w in daemon.items() if n not in names}
    assert not missing, f"named but not on any daemon's /metrics: {missing}"
    assert "gpumesh_no_such_metric" not in names          # the check above can fail


def test_the_gateway_panels_name_the_gateway_metrics():
    dash = json.loads(DASHBOARD.read_text())
    wanted = {n for e in dashboard_exprs(dash) for n in metric_names(e) if n.startswith(GATEWAY_PREFIX)}
    assert wanted, "the dashboard has serving panels"
    try:
        from controlplane.gateway import metrics as gw
    except ImportError:
        pytest.skip("controlplane.gateway is not in this tree: its metric names are not checked")
    from prometheus_client import generate_latest
    missing = wanted - served(generate_latest(gw.REGISTRY).decode())
    assert not missing, f"serving panels name metrics the gateway does not serve: {sorted(missing)}"


def test_the_rules_and_the_scrape_configuration_load_in_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(SCRAPE)]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=MONITORING, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    rules = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {r["alert"] for g in rules for r in g["rules"]}
    assert {"GpumeshNodeNotReady", "GpumeshGpuUnhealthy", "GpumeshLeaderChangingOften", "GpumeshEtcdWriteErrors",
            "GpumeshMigrationFailing", "GpumeshMemoryPressureCritical"} <= alerts


def test_the_dashboard_has_the_shape_grafana_imports():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "node"}
    titles = {p["title"] for p in dash["panels"]}
    assert {"GPUs by health", "Slices by tenant (ready)", "Allocation latency", "GPUs by memory pressure",
            "GPU temperature", "Migrations by phase", "Replicas by state"} <= titles
