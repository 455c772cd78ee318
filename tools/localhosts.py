"""The hosts of a local cluster (tools/localcluster.py): simulated hosts, their host files under the
cluster's hosts/ directory, and how they are grouped into agent processes."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from mesh import fsmodes
from tools.localprocs import ClusterError

MAX_AGENT_PROCESSES = 8


def default_agents_per_process(hosts: int) -> int:
    """One host per agent process up to 8 hosts; above that, at most 8 processes."""
    return 1 if hosts <= MAX_AGENT_PROCESSES else math.ceil(hosts / MAX_AGENT_PROCESSES)


def sim_hosts(count: int, gpus_per_host: int = 8, gpu_model: str = "H100-80GB", mig: bool = True) -> list:
    """`count` simulated hosts named sim-node-01, sim-node-02, ..."""
    from nodeagent.hostfile import make_host
    width = max(2, len(str(count)))
    return [make_host(f"sim-node-{i:0{width}d}", gpus_per_host, gpu_model, mig=mig)
            for i in range(1, count + 1)]


def write_host_files(hosts, hosts_dir: Path) -> dict[str, Path]:
    """One host file per host (a path to a YAML file, a mapping, or a nodeagent.hostfile host), each
    checked by loading it back; node -> its file."""
    import yaml
    from nodeagent.hostfile import dump_host, load_host_file
    files: dict[str, Path] = {}
    for host in hosts:
        if isinstance(host, (str, os.PathLike)):
            mapping = yaml.safe_load(Path(host).read_text())
        elif isinstance(host, Mapping):
            mapping = dict(host)
        else:
            mapping = dump_host(host)
        node = (mapping or {}).get("node")
        if not node:
            raise ClusterError(f"host {host!r} names no node (a `node:` key)")
        if node in files:
            raise ClusterError(f"node {node!r} is given twice")
        path = hosts_dir / f"{node}.yaml"
        with fsmodes.private_file(path) as f:
            f.write(yaml.safe_dump(mapping, sort_keys=False).encode())
        try:
            load_host_file(path)
        except Exception as exc:
            raise ClusterError(f"host file for {node} is not valid: {exc}") from exc
        files[node] = path
    if not files:
        raise ClusterError("no hosts to start")
    return files


def agent_groups(nodes: list[str], per_process: int = 0) -> dict[str, list[str]]:
    """Agent process name -> the nodes it runs (`per_process` 0: `default_agents_per_process`)."""
    per = per_process or default_agents_per_process(len(nodes))
    if per == 1:
        return {n: [n] for n in nodes}
    chunks = [nodes[i:i + per] for i in range(0, len(nodes), per)]
    return {f"agent-{i + 1:02d}": c for i, c in enumerate(chunks)}
