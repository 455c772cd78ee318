"""The agent's side of workload confinement: one `ConfinePlan` per workload.

`Isolator.plan` answers what the shim and `confine.py` need: the tenant's uid/gid, the
namespaces, the cgroup (made here, with the limits), the slice's device nodes, the private
/dev/shm directory, what to hide and what to bind back; or raises `IsolationRefused` naming
why (secure mode on a host without the minimum, a bad resource label, a missing device node).

Inside a mount namespace the workload's own directory (`<runner dir>/<id>.d`, owned by its uid,
mode 0700) is its /tmp and its working directory, whatever the host path above it allows; the
checkpoint control socket lives there (`/tmp/.gpumesh-ctl.sock` inside, the host path outside).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass, field

from gpumesh.v1 import types_pb2
from mesh import netmode
from mesh.fsmodes import others_may_read
from mesh.logs import log
from nodeagent.ids import BadId, check_id
from nodeagent.isolation import cgroups as cg
from nodeagent.isolation.devices import DeviceError, NvidiaDevices
from nodeagent.isolation.probe import HostFeatures
from nodeagent.isolation.users import IdentityError, TenantUsers
from nodeagent.isolation.workdir import make_workdir

logger = logging.getLogger(__name__)
SHM_ROOT = "/dev/shm/gpumesh.slices"
INSIDE_WORKDIR = "/tmp"
INSIDE_SOCKET = "/tmp/.gpumesh-ctl.sock"
INSIDE_MPS_PIPE = "/tmp/nvidia-mps"
LABEL_MEMORY, LABEL_CPU, LABEL_PIDS = "gpumesh.io/memory-bytes", "gpumesh.io/cpu-milli", "gpumesh.io/pids"
# `gpumesh.io/isolation: criu`: the workload may be migrated transparently (CRIU). CRIU here cannot
# dump and restore the PID and mount namespaces with the private /dev bind mounts, so such a workload
# runs without namespaces: its uid, no_new_privs and cgroups (memory, CPU, pids, and the devices
# list, which then alone confines the GPU nodes: cgroup v1 only; refused on v2 in secure mode).
LABEL_ISOLATION = "gpumesh.io/isolation"
DEPLOYMENT_LABEL = "gpumesh.deployment"      # a deployment's replica (controlplane/serving/deployspec.py)


class IsolationRefused(RuntimeError):
    """The workload cannot be started confined (and the mode does not allow it unconfined)."""


@dataclass
class IsolationSettings:
    mode: str = "secure"                  # secure: refuse without the minimum; permissive: use what there is
    namespaces: tuple[str, ...] = ("pid", "ipc", "mount")
    default_memory_bytes: int = 8 << 30
    default_pids: int = 4096
    mask: list[str] = field(default_factory=list)       # host paths hidden from workloads
    expose: list[str] = field(default_factory=list)     # host paths bound read-only at the same path (runtimes)
    shm_root: str = SHM_ROOT
    seccomp: bool = True                  # the syscall filter (syscallfilter.py) where the host can install it
    secret_files: list[str] = field(default_factory=list)   # keys the agent reads: private, or criu is refused
    network: str = "host"                 # workloads without a gpumesh.io/network label (mesh/netmode.py)
    bridge_cidr: str = "10.213.0.0/24"    # isolated workloads' addresses (nodeagent/isolation/bridge.py)


@dataclass
class ConfinePlan:
    uid: int
    gid: int
    workdir: str                 # host path
    socket: str                  # host path of the checkpoint control socket
    cgroup: str                  # name under the driver's base ("" when none)
    spec: dict                   # for confine.py
    env: dict[str, str]          # overrides of the workload's environment inside


def _label_int(w: types_pb2.Workload, key: str) -> int:
    raw = w.labels.get(key, "")
    if not raw:
        return 0
    try:
        v = int(raw)
    except ValueError:
        v = -1
    if v <= 0:
        raise IsolationRefused(f"label {key}: {raw!r} is not a positive integer")
    return v


class Isolator:
    def __init__(self, settings: IsolationSettings, features: HostFeatures, users: TenantUsers,
                 cgroups: cg.CgroupDriver | None, devices: NvidiaDevices, node: str = "", scope: str = "") -> None:
        """`scope`: what tells this agent's slices apart from other agents' on the host (the runner
        directory); the slices' shm directories live under `<shm_root>/<node>-<hash of scope>`."""
        self.settings, self.features, self.users = settings, features, users
        self.shm_root = node_shm_root(node, scope, settings.shm_root)
        self.cgroups, self.devices, self.node = cgroups, devices, node
        self.namespaces = [n for n in settings.namespaces if n in features.namespaces]
        self.bridge = None            # nodeagent/isolation/bridge.WorkloadBridge (isolated workloads), set by setup
        self.missing = [m for m in features.missing() if settings.seccomp or not m.startswith("a seccomp filter")]
        log(logger, logging.INFO if not self.missing else logging.WARNING, "isolation features", node=node,
            mode=settings.mode, setuid=features.setuid, no_new_privs=features.no_new_privs,
            namespaces=",".join(features.namespaces) or "none", cgroup_version=features.cgroup_version,
            cgroup_controllers=",".join(features.cgroup_controllers) or "none", dmem=features.dmem,
            seccomp=features.seccomp and settings.seccomp,
            missing="; ".join(self.missing) or "nothing", problems="; ".join(features.problems))

    # -- limits ---------------------------------------------------------------------------------

    def limits(self, w: types_pb2.Workload, s: types_pb2.Slice | None) -> cg.Limits:
        mem, cpu, pids = _label_int(w, LABEL_MEMORY), _label_int(w, LABEL_CPU), _label_int(w, LABEL_PIDS)
        slice_mem = s.host_memory_bytes if s is not None else 0
        slice_cpu = s.cpu_milli if s is not None else 0
        if mem and slice_mem and mem > slice_mem:
            raise IsolationRefused(f"label {LABEL_MEMORY}: {mem} exceeds the host memory of slice {s.id} "
                                   f"({slice_mem} bytes)")
        if cpu and slice_cpu and cpu > slice_cpu:
            raise IsolationRefused(f"label {LABEL_CPU}: {cpu} exceeds the CPU of slice {s.id} ({slice_cpu} milli)")
        return cg.Limits(memory_bytes=mem or slice_mem or self.settings.default_memory_bytes,
                         cpu_milli=cpu or slice_cpu, pids_max=pids or self.settings.default_pids)

    def network(self, w: types_pb2.Workload, s: types_pb2.Slice | None) -> str:
        """`w`'s network mode (mesh/netmode.py): its label, its slice's, the agent's default; host for a
        model server. A label the API let through but this agent does not know is refused."""
        mode = netmode.resolve(w.labels, s.labels if s is not None else {}, self.settings.network,
                               model_server=w.HasField("backend") or DEPLOYMENT_LABEL in w.labels)
        if mode not in netmode.MODES:
            raise IsolationRefused(f"label {netmode.LABEL_NETWORK}: {mode!r} is not allowed "
                                   f"({', '.join(netmode.MODES)})")
        if mode in netmode.OWN_NAMESPACE and w.labels.get(LABEL_ISOLATION, "") == "criu":
            raise IsolationRefused(f"label {netmode.LABEL_NETWORK}={mode} needs a network namespace, which "
                                   f"{LABEL_ISOLATION}=criu workloads run without")
        return mode

    # -- the plan -------------------------------------------------------------------------------

    def plan(self, w: types_pb2.Workload, s: types_pb2.Slice | None, *, gpu_index: int, gi_id: int | None,
             ci_id: int | None, workdir: str, mps_pipe: str = "") -> ConfinePlan:
        if self.settings.mode == "secure" and self.missing:
            raise IsolationRefused("secure mode: this host lacks " + "; ".join(self.missing))
        try:        # the cgroup (removed with its processes killed) and the shm directory are named after them
            check_id(w.id, "workload.id")
            if w.slice_id:
                check_id(w.slice_id, "workload.slice_id")
        except BadId as e:
            raise IsolationRefused(str(e)) from None
        try:
            ident = self.users.identity(w.tenant)
        except IdentityError as e:
            raise IsolationRefused(str(e)) from None
        limits = self.limits(w, s)
        namespaces = self.namespaces
        flavour = w.labels.get(LABEL_ISOLATION, "")
        if flavour not in ("", "default", "criu"):
            raise IsolationRefused(f"label {LABEL_ISOLATION}: {flavour!r} is not allowed (default, criu)")
        if flavour == "criu":
            namespaces = []
            if self.settings.mode == "secure" and (self.cgroups is None or not self.cgroups.confines_devices):
                raise IsolationRefused(f"label {LABEL_ISOLATION}=criu: without a mount namespace only a devices "
                                       "cgroup (v1) confines the GPU nodes, and this host has none")
            exposed = [p for p in self.settings.secret_files if others_may_read(p)]
            if self.settings.mode == "secure" and exposed:
                raise IsolationRefused(f"label {LABEL_ISOLATION}=criu: without a mount namespace the workload would "
                                       f"read {', '.join(exposed)} (readable by every user): chmod 600 it")
        network = self.network(w, s)
        if network in netmode.OWN_NAMESPACE:
            if "net" not in self.features.namespaces:
                raise IsolationRefused(f"{netmode.LABEL_NETWORK}={network}: this host cannot make network namespaces "
                                       "(unshare(CLONE_NEWNET) failed when the agent started)")
            if network == netmode.ISOLATED and (self.bridge is None or self.bridge.problem()):
                raise IsolationRefused(f"{netmode.LABEL_NETWORK}=isolated: this agent has no workload bridge"
                                       + (f" ({self.bridge.problem()})" if self.bridge is not None else ""))
            if "mount" not in namespaces:
                raise IsolationRefused(f"{netmode.LABEL_NETWORK}={network} needs the mount namespace too (its "
                                       "checkpoint and migration transfers pass through Unix sockets in its own "
                                       "/tmp): add mount to workload_namespaces")
            namespaces = [*namespaces, "net"]
        try:
            limits.devices = self.devices.for_slice(gpu_index, gi_id, ci_id) if gpu_index >= 0 else []
        except DeviceError as e:
            raise IsolationRefused(f"slice devices: {e}") from None
        make_workdir(workdir, ident.uid, ident.gid)
        mount_ns = "mount" in namespaces
        shm_dir = ""
        if mount_ns and w.slice_id:
            shm_dir = self.slice_shm_dir(w.slice_id, ident.uid, ident.gid)
        env = {}
        keep = []
        if mount_ns:
            keep.append(INSIDE_WORKDIR)
            env.update({"GPUMESH_CHECKPOINT_SOCKET": INSIDE_SOCKET, "TMPDIR": INSIDE_WORKDIR})
            if mps_pipe:
                os.makedirs(os.path.join(workdir, "nvidia-mps"), exist_ok=True)
                env["CUDA_MPS_PIPE_DIRECTORY"] = INSIDE_MPS_PIPE
        sock = os.path.join(workdir, os.path.basename(INSIDE_SOCKET)) if mount_ns else ""
        if len(sock) > 100:      # too long for a Unix socket name: the agent dials a short link to it
            import hashlib
            link = f"/tmp/gpumesh-{hashlib.sha256(sock.encode()).hexdigest()[:16]}.sock"
            try:
                os.unlink(link)
            except FileNotFoundError:
                pass
            os.symlink(sock, link)
            sock = link
        cgroup = ""
        procs: list[str] = []
        if self.cgroups is not None:    # made last: nothing after it fails, so a refused plan leaves none
            cgroup = f"{self.node or 'node'}/{w.id}"
            try:
                self.cgroups.remove(cgroup)          # a leftover of an earlier run of this ID
                procs = self.cgroups.create(cgroup, limits)
            except cg.CgroupError as e:
                self.cgroups.remove(cgroup)          # what was made of it before the refusal
                if self.settings.mode == "secure":
                    raise IsolationRefused(f"cgroup: {e}") from None
                cgroup, procs = "", []
        spec = {
            "uid": ident.uid, "gid": ident.gid, "no_new_privs": True, "namespaces": namespaces, "network": network,
            "seccomp": bool(self.settings.seccomp and self.features.seccomp),
            "cgroup_procs": procs, "workdir": INSIDE_WORKDIR if mount_ns else workdir,
            "devices": [{"name": d.name, "source": d.source} for d in limits.devices],
            "shm_dir": shm_dir, "mask": [p for p in self.settings.mask if p and os.path.exists(p)],
            # bound in after the masks: the workload's directory as its /tmp, the MPS pipe inside it
            # the workload's directory first (it becomes /tmp), then the exposed runtimes (which may live
            # under the host's /tmp), then the MPS pipe inside the new /tmp
            "binds": ([{"source": workdir, "target": INSIDE_WORKDIR}] if mount_ns else []) +
                     ([{"source": p, "target": p, "readonly": True}
                       for p in _outermost([*self.settings.expose, *_artifact(w)]) if mount_ns and os.path.exists(p)]) +
                     ([{"source": mps_pipe, "target": INSIDE_MPS_PIPE}] if mount_ns and mps_pipe else []),
        }
        return ConfinePlan(ident.uid, ident.gid, workdir, sock, cgroup, spec, env)

    def release(self, cgroup: str) -> None:
        """Kill what is left in the workload's cgroup and remove it, waiting for its processes to leave: in a
        thread. On the event loop: `begin_release`, then `release_step` until it answers True."""
        if cgroup and self.cgroups is not None:
            self.cgroups.remove(cgroup)

    def begin_release(self, cgroup: str) -> None:
        if cgroup and self.cgroups is not None:
            self.cgroups.begin_remove(cgroup)

    def release_step(self, cgroup: str) -> bool:
        """One attempt at removing the cgroup, never waiting: True once it is gone."""
        return not cgroup or self.cgroups is None or self.cgroups.remove_step(cgroup)

    # -- the slice's shared memory --------------------------------------------------------------

    def slice_shm_dir(self, slice_id: str, uid: int, gid: int) -> str:
        d = os.path.join(self.shm_root, check_id(slice_id, "slice_id"))
        os.makedirs(self.shm_root, mode=0o711, exist_ok=True)
        os.chmod(self.settings.shm_root, 0o711)
        os.chmod(self.shm_root, 0o711)
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chown(d, uid, gid)
        return d

    def share_segment(self, slice_id: str, tenant: str, name: str) -> None:
        """Link the mesh segment /dev/shm/<name> into the slice's private /dev/shm (same name),
        owned by the slice's tenant: its workloads map it, no other tenant's can.

        The slice's directory is the tenant's (its workloads write there), so nothing here follows a name
        in it: whatever stands at the name and is not this segment (a symlink to /etc/passwd, a file) is
        removed, the link is made without following, and the owner and mode are set through the segment's
        own descriptor, never a path."""
        try:
            ident = self.users.identity(tenant)
            d = self.slice_shm_dir(slice_id, ident.uid, ident.gid)
            seg = os.open(os.path.join("/dev/shm", name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            dfd = -1
            try:
                st = os.fstat(seg)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(f"/dev/shm/{name} is not a regular file")
                dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                if not _same_file(dfd, name, st):
                    try:
                        os.unlink(name, dir_fd=dfd)        # a tenant's symlink or file in its place
                    except FileNotFoundError:
                        pass
                    os.link(os.path.join("/dev/shm", name), name, dst_dir_fd=dfd, follow_symlinks=False)
                    if not _same_file(dfd, name, st):      # /dev/shm/<name> changed under us
                        os.unlink(name, dir_fd=dfd)
                        raise OSError(f"/dev/shm/{name} changed while it was linked")
                os.fchown(seg, ident.uid, ident.gid)
                os.fchmod(seg, 0o600)
            finally:
                os.close(seg)
                if dfd >= 0:
                    os.close(dfd)
        except (OSError, IdentityError, BadId) as e:
            log(logger, logging.WARNING, "cannot share a mesh segment into the slice", slice=slice_id,
                segment=name, error=str(e))

    def unshare_segment(self, slice_id: str, name: str) -> None:
        try:
            os.unlink(os.path.join(self.shm_root, slice_id, name))
        except OSError:
            pass

    def forget_slices(self, keep: set[str], full: bool = True, removed: set[str] = frozenset()) -> None:
        """Remove the shm directories of slices no longer on this node."""
        try:
            names = os.listdir(self.shm_root)
        except OSError:
            return
        for sid in names:
            if (sid in removed or (full and sid not in keep)) and sid.startswith("s-"):
                shutil.rmtree(os.path.join(self.shm_root, sid), ignore_errors=True)


def node_shm_root(node: str, scope: str, root: str = SHM_ROOT) -> str:
    """The directory of a node's slices' private /dev/shm directories: `<root>/<node>-<hash of scope>`."""
    import hashlib
    return os.path.join(root, f"{node or 'node'}-{hashlib.sha256(scope.encode()).hexdigest()[:8]}")


def _artifact(w: types_pb2.Workload) -> list[str]:
    """A model server's artifact (its GGUF file or Hugging Face directory), bound read-only into its workload:
    it may lie under /tmp, which the workload replaces with its own directory. Only this path, as the
    registry validated it; the file permissions still apply to the tenant's uid."""
    path = w.backend.artifact if w.HasField("backend") else ""
    if path.startswith("file://"):
        path = path[len("file://"):]
    return [os.path.realpath(path)] if path else []


def _outermost(paths: list[str]) -> list[str]:
    """`paths` without those inside another of them (binding a parent again would cover the child)."""
    real = sorted({os.path.realpath(p) for p in paths if p})
    return [p for p in real if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in real)]


def _same_file(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """Whether `name` in the directory `dir_fd` is (without following a symlink) the file `st` describes."""
    try:
        here = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(here.st_mode) and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino)
