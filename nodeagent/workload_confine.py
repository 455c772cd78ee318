"""What the workload runner does to confine a workload before and just after its launch: the environments
of its root supervisor (the agent's) and of the workload (handed over in a memfd), the isolation
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
    try:
        if mps_pipe and runner.mps is not None and s is not None:
            runner.mps.set_limits(mps_pipe, plan.uid, s.memory_bytes, max(1, round(s.compute_share * 100)))
        fd = os.open(runner.path(w.id, "confine.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(plan.spec, f)
    except BaseException:
        runner.isolator.release(plan.cgroup)        # the plan made it; the workload does not start
        raise
    return plan


def agent_env_names() -> tuple[str, ...]:
    """Variables only the agent sets in a workload's environment because it acts on them (the
    migration target's secret file, which it moves as root): a tenant's value is never taken. The
    control plane refuses them in Run (controlplane/controllers/workloadspec.py RESERVED_ENV)."""
    from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV
    return (SECRET_FILE_ENV,)


def hand_over_secret(env: dict, plan, secret_file: str) -> None:
    """A migration target's transfer secret file (written by the agent, 0600, in the runner's own
    root-only directory: `secret_file`, never a path from the workload's environment) moves into the
    workload's own directory, owned by the workload's uid, and the environment names it as the
    workload sees it; nothing else can read it there.

    The workload's directory belongs to the tenant, so nothing here follows a name in it: the
    directory is opened without following links, a name left there (a link to a root-only file)
    is removed, the file is created new (O_EXCL|O_NOFOLLOW) and chowned by its descriptor."""
    from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV
    if not secret_file:
        return
    try:
        src = os.open(secret_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        with open(src, "rb", closefd=False) as f:
            secret = f.read(1 << 16)
    finally:
        os.close(src)
    dfd = os.open(plan.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            os.unlink(SECRET_FILE_NAME, dir_fd=dfd)
        except FileNotFoundError:
            pass
        fd = os.open(SECRET_FILE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
        try:
            os.fchown(fd, plan.uid, plan.gid)
            os.fchmod(fd, 0o600)
            view = memoryview(secret)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    os.unlink(secret_file)
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


def supervisor_environment() -> dict[str, str]:
    """The environment of a workload's supervisor (shim.py, and through it confine.py and `criu restore`):
    the agent's own, never the workload's, for they run as root."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MESH_AGENT_", "GPUMESH_SIM_"))}


def environment_fd(env: dict[str, str]) -> int:
    """A memfd holding `env` as JSON, read back from the start (shim.py --env-fd): no file on disk holds
    it (a model server's API key is in it), and no size bound of a pipe holds the agent back."""
    fd = os.memfd_create("gpumesh-workload-env", os.MFD_CLOEXEC)
    data = memoryview(json.dumps(env).encode())
    while data:
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
