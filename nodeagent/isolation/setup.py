"""Wiring: one host probe and tenant-id table per agent process, one `Isolator` per node."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

from mesh import fsmodes
from mesh.config import parse_hostport
from mesh.logs import log

from nodeagent.isolation import cgroups as cg
from nodeagent.isolation.diskquota import DiskQuotas
from nodeagent.isolation.devices import NvidiaDevices, make_sim_nodes
from nodeagent.isolation.plan import Isolator, IsolationSettings
from nodeagent.isolation.probe import HostFeatures, probe
from nodeagent.isolation.users import TenantUsers, parse_map, parse_range

logger = logging.getLogger(__name__)


@dataclass
class IsolationHost:
    features: HostFeatures
    users: TenantUsers
    settings: IsolationSettings


def isolation_host(cfg) -> IsolationHost:
    features = probe(probe_name=f"{cfg.cgroup_base}-probe-{os.getpid()}")
    users = TenantUsers(parse_range(cfg.workload_uid_range), parse_map(cfg.workload_uid_map),
                        os.path.join(cfg.state_dir, "isolation", "tenant-ids.json"))
    quotas = DiskQuotas(cfg.state_dir, cfg.disk_quota_bytes(), cfg.workload_disk_quota_inodes)
    quotas.check()                  # ConfigError: on, and the state directory's filesystem has no user quota
    quotas.sync({i.uid for i in users.known().values()})
    if quotas.on:
        users.quotas = quotas
        from nodeagent import metrics
        metrics.TENANT_DISK.source = lambda: ((t, quotas.usage(i.uid)) for t, i in users.known().items())
        log(logger, logging.INFO, "tenants' disk quotas set", device=quotas.ctl().device,
            bytes=quotas.max_bytes, inodes=quotas.max_inodes)
    home = os.path.expanduser("~")
    mask = [cfg.state_dir, cfg.checkpoint_dir, cfg.checkpoint_keys_file, cfg.tls_key, *cfg.workload_hide,
            *([home] if home not in ("/", "") else [])]
    # the Python the agent runs (and the workloads of the demo and tests) may live in the agent's home
    # and its virtual environment and the agent's own code (the SDK a workload imports) may be under /tmp,
    # which a workload replaces with its own directory; state under them stays masked (confine.py)
    code_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__ + "/..")))
    expose = [os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), code_root, *cfg.workload_expose]
    # files a workload without a mount namespace (gpumesh.io/isolation=criu) would see: they must be private
    secret_files = [cfg.checkpoint_keys_file, cfg.tls_key, *cfg.workload_hide]
    settings = IsolationSettings(
        mode=cfg.workload_isolation,
        namespaces=tuple(n.strip() for n in cfg.workload_namespaces.split(",") if n.strip()),
        default_memory_bytes=cfg.workload_memory_default_bytes, default_pids=cfg.workload_pids_max,
        seccomp=cfg.workload_seccomp, network=cfg.workload_network, bridge_cidr=cfg.workload_bridge_cidr,
        mask=[os.path.realpath(p) for p in mask if p], expose=[os.path.realpath(p) for p in expose if p],
        secret_files=[os.path.realpath(p) for p in secret_files if p])
    # nothing of the agent's readable through plain paths: the state directory only lets tenants pass through
    # to their own workload directories; nobody but the agent enters the checkpoint store
    fsmodes.passage(cfg.state_dir, cfg.state_dir)
    if cfg.checkpoint_dir:
        fsmodes.private_dir(cfg.checkpoint_dir)
        if fsmodes.others_may_read(cfg.checkpoint_dir):      # not this user's: its owner decides
            log(logger, logging.WARNING, "the checkpoint store is open to other users and not the agent's to "
                "close: tenants' workloads may read its checkpoints", path=cfg.checkpoint_dir,
                mode=oct(os.stat(cfg.checkpoint_dir).st_mode & 0o7777))
    return IsolationHost(features, users, settings)


def isolator_for(agent, cfg, host: IsolationHost, scope: str) -> Isolator:
    driver = cg.for_host(host.features.cgroup_version, cfg.cgroup_base) if host.features.cgroup_controllers else None
    if cfg.gpu_backend == "sim":
        dev_dir = os.path.join(cfg.state_dir, "sim", agent.node, "dev")
        devices = NvidiaDevices(dev_dir, os.path.join(dev_dir, "mig-minors"))
        # the stand-in nodes, once the simulated NVML says how many GPUs the host has
        agent.start_hooks.append(lambda: make_sim_nodes(dev_dir, max(agent.gpus.uuids, default=-1) + 1))
    else:
        devices = NvidiaDevices()
    iso = Isolator(host.settings, host.features, host.users, driver, devices, node=agent.node, scope=scope)
    from nodeagent.isolation import bridge
    iso.bridge = bridge.shared(cfg.state_dir, host.settings.bridge_cidr)     # made at the first isolated workload
    if not iso.bridge.problem():
        iso.bridge.check_overlap()        # CidrOverlapError (a ConfigError): the agent does not start
    agent.isolator = iso
    agent.labels.update(inventory_labels(host))
    agent.desired_hooks.append(lambda d: iso.forget_slices({s.id for s in d.upserts}, full=d.full,
                                                           removed=set(d.removals)))
    return iso


def denied_endpoints(cfg) -> list:
    """`workload_egress_deny`, plus the agent's metrics port (bound by then: nodeagent/main.start_metrics)
    unless the list is empty (the guard off)."""
    from nodeagent.isolation import egress
    endpoints = egress.parse(cfg.workload_egress_deny)
    if endpoints and cfg.metrics_listen:
        port = parse_hostport(cfg.metrics_listen, "metrics_listen")[1]
        if port:
            endpoints.append(egress.Endpoint("local", (port, port)))
    return endpoints


def egress_guard(cfg, host: IsolationHost) -> str:
    """Install the workloads' egress guard of this agent process (egress.py); the node label's value:
    guarded, off (nothing denied) or unguarded (nftables unusable here: logged)."""
    from nodeagent.isolation import egress
    endpoints = denied_endpoints(cfg)
    if not endpoints:
        egress.remove(cfg.state_dir)
        return "off"
    users = host.users
    uids = [(users.lo, users.hi), *((i.uid, i.uid) for i in users.mapping.values())]
    try:
        table = egress.install(cfg.state_dir, uids, endpoints)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(logger, logging.WARNING, "workloads' egress guard not installed: they can reach every port of this "
                                     "host", reason=str(e))
        return "unguarded"
    from nodeagent.isolation.nftkeeper import KEEPER
    KEEPER.watch(table, lambda: egress.ruleset(table, uids, endpoints, cfg.state_dir))  # applied again when it goes
    for orphan, state_dir in egress.sweep_orphans():
        log(logger, logging.WARNING, "deleted the egress guard of an agent whose state directory is gone",
            table=orphan, state_dir=state_dir)
    log(logger, logging.INFO, "workloads' egress guard installed", table=table,
        denied=",".join(f"{e.address}:{e.port_text()}" for e in endpoints))
    return "guarded"


def inventory_labels(host: IsolationHost) -> dict[str, str]:
    """What `meshctl describe node` shows of the workload confinement this node gives."""
    f = host.features
    return {
        "gpumesh.io/workload-isolation": host.settings.mode if not f.missing() else f"{host.settings.mode}-incomplete",
        "gpumesh.io/workload-namespaces": "+".join(n for n in host.settings.namespaces if n in f.namespaces) or "none",
        "gpumesh.io/workload-cgroup": f"v{f.cgroup_version}" if f.cgroup_controllers else "none",
        "gpumesh.io/workload-seccomp": "on" if f.seccomp and host.settings.seccomp else "off",
        # the default network of workloads (gpumesh.io/network), and whether `none` is possible here
        "gpumesh.io/workload-network": host.settings.network + ("" if "net" in f.namespaces else "-no-netns"),
        # MPS GPU memory: kernel-enforced partitioning needs the cgroup v2 dmem controller (r615+ drivers);
        # without it the limits are the MPS daemon's (set per tenant server)
        "gpumesh.io/mps-memory-limits": "dmem-available" if f.dmem else "mps-daemon",
    }
