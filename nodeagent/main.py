"""`mesh-agent`: the gpumesh node agent.

On a GPU host it runs one agent over the real NVML. With `--gpu-backend sim`
it runs one agent per `--sim-host-file`, each a separate node with its own
connection and its own simulated device state (DIR/sim/<node>.state.json).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from mesh import config, fsmodes, logs
from nodeagent.config import AgentConfig


def node_labels(cfg: AgentConfig, host=None) -> dict[str, str]:
    """The labels an agent reports for its node: the `node_labels` setting, then a simulated host file's own
    `labels:` over them."""
    out = cfg.node_label_map()
    if host is not None:
        out.update(host.labels)
    return out


def build_agents(cfg: AgentConfig):
    from nodeagent.agent import NodeAgent
    from nodeagent.gpu import NvmlGpus
    from nodeagent.hostfile import load_host_file
    from nodeagent.infiniband import write_sysfs
    from nodeagent.nvml import load_nvml

    agents = []
    mps_root = os.path.join(cfg.state_dir, "mps")
    if cfg.gpu_backend == "nvml":
        nvml = load_nvml("real")
        agents.append(NodeAgent(cfg.default_node_name(), cfg.control_plane, NvmlGpus(nvml), mps_root=mps_root,
                                backend="nvml", reconnect_max=cfg.reconnect_max_seconds,
                                telemetry_interval=cfg.telemetry_interval_seconds))
        agents[-1].labels.update(node_labels(cfg))
        check_certificate_node(cfg, [a.node for a in agents])
        return install_components(agents, cfg)
    os.makedirs(os.path.join(cfg.state_dir, "sim"), exist_ok=True)
    names = set()
    for path in cfg.sim_host_file:
        host = load_host_file(path)
        node = host.node or (cfg.default_node_name() if len(cfg.sim_host_file) == 1 else None)
        if not node:
            raise config.ConfigError(f"sim_host_file: {path} has no `node:` name (needed with several host files)")
        if node in names:
            raise config.ConfigError(f"sim_host_file: node {node!r} appears in two host files")
        names.add(node)
        state = os.path.join(cfg.state_dir, "sim", f"{node}.state.json")
        nvml = load_nvml("sim", host_file=path, state_file=state)
        ib_root = os.path.join(cfg.state_dir, "sim", node, "infiniband")  # the host file's IB NICs, as sysfs shows them
        write_sysfs(ib_root, host.nics)
        agents.append(NodeAgent(node, cfg.control_plane, NvmlGpus(nvml), mps_root=os.path.join(mps_root, node),
                                topology=host.nvlink_domains, nics=host.nics, backend="sim",
                                driver_version=host.driver_version, cuda_version=host.cuda_version,
                                reconnect_max=cfg.reconnect_max_seconds,
                                telemetry_interval=cfg.telemetry_interval_seconds, ib_root=ib_root))
        agents[-1].labels.update(node_labels(cfg, host))
    check_certificate_node(cfg, [a.node for a in agents])
    return install_components(agents, cfg)


def check_certificate_node(cfg: AgentConfig, nodes: list[str]) -> None:
    """The control plane lets an agent certificate (OU=agent, CN=node) speak for its own node only: another's
    is a configuration error at start, not a refusal on every reconnect."""
    if not cfg.tls_cert:
        return
    from mesh import tls
    subject = tls.subject_of(tls.read(cfg.tls_cert, "tls_cert"))
    fix = "meshctl certs issue --kind agent --name " + (nodes[0] if len(nodes) == 1 else "NODE")
    if subject.kind != "agent":
        raise config.ConfigError(f"tls_cert: {cfg.tls_cert} is not an agent certificate (OU=agent, CN=the node "
                                 f"name); the control plane refuses it from an agent: `{fix}`")
    other = [n for n in nodes if n != subject.name]
    if other:
        where = "its host file's node:" if cfg.gpu_backend == "sim" else "node_name, or the host name"
        raise config.ConfigError(
            f"tls_cert: {cfg.tls_cert} is the certificate of node {subject.name!r} and this agent is node "
            f"{', '.join(map(repr, other))} ({where}); the control plane lets a node's certificate speak for "
            f"that node only: `{fix}`")


def install_components(agents, cfg: AgentConfig):
    """MIG mode and declared layouts, the MPS daemons, the workload runner and GPU resets, per agent."""
    from nodeagent import mps
    from nodeagent.gpureset import GpuResetter
    from nodeagent.layout import NodeMig
    from nodeagent.workloads import WorkloadRunner

    from nodeagent.isolation.setup import egress_guard, isolator_for, isolation_host
    host = isolation_host(cfg)
    egress = egress_guard(cfg, host)
    for agent in agents:
        agent.labels["gpumesh.io/workload-egress"] = egress
        daemon = mps.for_backend(cfg.gpu_backend)
        agent.slicer.mps = daemon
        NodeMig(agent, cfg.mig_mode, cfg.mig_layout).install()
        wdir = os.path.join(cfg.state_dir, "workloads", *([agent.node] if cfg.gpu_backend == "sim" else []))
        fsmodes.passage(cfg.state_dir, wdir)       # tenants pass through to their own directories, list nothing
        fsmodes.passage(cfg.state_dir, agent.slicer.mps_root)   # to the MPS pipe directories (mps.py)
        agent.backend_host, agent.backend_tls = cfg.backend_host, cfg.backend_tls
        agent.vllm_python, agent.vllm_cpu_kvcache_max_gib = cfg.vllm_python, cfg.vllm_cpu_kvcache_max_gib
        WorkloadRunner(agent, wdir, mps=daemon, stop_grace=cfg.workload_stop_grace_seconds,
                       isolator=isolator_for(agent, cfg, host, wdir),
                       log_max_bytes=cfg.workload_log_max_bytes,
                       renew_before=cfg.backend_tls_renew_before_seconds).install()
        GpuResetter(agent).install()        # the health policy's GPU reset (controlplane/controllers/health.py)
    __import__("nodeagent.migrate").migrate.install(agents, cfg)      # migration, checkpoint and restore steps
    return agents


def start_metrics(cfg: AgentConfig) -> None:
    """Serve /metrics before anything else, so that the port it got (with port 0) is known to the
    workloads' egress guard; `cfg.metrics_listen` then names that port."""
    if cfg.metrics_listen:
        from prometheus_client import start_http_server
        host, port = config.parse_hostport(cfg.metrics_listen, "metrics_listen")
        httpd, _ = start_http_server(port, addr=host)
        cfg.metrics_listen = f"[{host}]:{httpd.server_port}" if ":" in host else f"{host}:{httpd.server_port}"


async def run(agents) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(a.run(), name=f"agent-{a.node}") for a in agents]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for a in agents:
        a.stopping.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if t is not stopper and t.exception() is not None:
            raise t.exception()
    for a in agents:
        a.gpus.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesh-agent", description="gpumesh node agent: slices this host's GPUs.")
    config.add_arguments(parser, AgentConfig)
    args = parser.parse_args(argv)
    os.umask(fsmodes.PRIVATE_UMASK)     # what the agent writes is its own; shared things get explicit modes
    try:
        cfg = config.load(AgentConfig, args)
        logs.setup("agent", cfg.log_level, cfg.log_format)
        start_metrics(cfg)
        agents = build_agents(cfg)
        creds = cfg.channel_credentials()
        for a in agents:
            a.credentials, a.server_name, a.token = creds, cfg.tls_server_name, cfg.agent_token
        __import__("nodeagent.registrar").registrar.attach_all(agents, cfg)   # the mesh data plane
    except (config.ConfigError, ValueError, OSError) as e:
        print(f"mesh-agent: configuration error: {e}", file=sys.stderr)
        return 2
    from nodeagent.layout import LayoutError
    try:
        asyncio.run(run(agents))
    except KeyboardInterrupt:
        pass
    except LayoutError as e:
        print(f"mesh-agent: configuration error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
