"""What the workload runner does to confine a workload before and just after its launch: the isolation
plan written for the shim (nodeagent/isolation/plan.py, read by confine.py), the MPS daemon's limits for the
tenant, a migration target's transfer secret moved into the workload's own directory, and an isolated
workload's network interface (nodeagent/isolation/bridge.py)."""

from __future__ import annotations

import json
import os
import time

SECRET_FILE_NAME = ".transfer-secret"   # a migration target's secret, in its own directory


def confinement_plan(runner, w, st):
    """The isolation plan of `w` (nodeagent/isolation/plan.py), written for the shim as `<id>.confine.json`;
    on an MPS slice the daemon gets the tenant's limits first. `runner`: the WorkloadRunner."""
    s = runner.agent.desired.get(w.slice_id)
    mig = getattr(runner.agent.slicer, "mig", {}).get(w.slice_id)
    gpu_index = s.gpu_index if s is not None else -1
    mps_pipe = st.env.get("CUDA_MPS_PIPE_DIRECTORY", "")
    plan = runner.isolator.plan(w, s, gpu_index=gpu_index, gi_id=mig.gi_id if mig else None,
                                ci_id=mig.ci_id if mig else None, workdir=runner.path(w.id, "d"), mps_pipe=mps_pipe)
    if mps_pipe and runner.mps is not None and s is not None:
        runner.mps.set_limits(mps_pipe, plan.uid, s.memory_bytes, max(1, round(s.compute_share * 100)))
    fd = os.open(runner.path(w.id, "confine.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(plan.spec, f)
    return plan


def hand_over_secret(env: dict, plan) -> None:
    """A migration target's transfer secret file (written by the agent, 0600) moves into the
    workload's own directory, owned by the workload's uid, and the environment names it as the
    workload sees it; nothing else can read it there."""
    from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV
    src = env.get(SECRET_FILE_ENV)
    if not src or not os.path.exists(src):
        return
    dst = os.path.join(plan.workdir, SECRET_FILE_NAME)
    os.replace(src, dst)
    os.chown(dst, plan.uid, plan.gid)
    env[SECRET_FILE_ENV] = os.path.join(plan.spec["workdir"], SECRET_FILE_NAME)


def plug_network(bridge, pid: int, timeout: float = 30.0) -> str:
    """An isolated workload (gpumesh.io/network=isolated): once its init (`pid`) is in its own network
    namespace, its veth pair and bridge address (`bridge`: nodeagent/isolation/bridge.py); its init waits
    for them. The namespace is pinned once, as a descriptor that must name the namespace seen here (not the
    host's), and every step uses it: a pid reused since cannot receive the pair. The address."""
    host_ns = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + timeout
    while (seen := os.readlink(f"/proc/{pid}/ns/net")) == host_ns:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workload's init did not make its network namespace within {timeout:g} s")
        time.sleep(0.005)
    fd = bridge.pin(pid, expect=seen)
    try:
        return bridge.attach(pid, ns_fd=fd)
    finally:
        os.close(fd)
