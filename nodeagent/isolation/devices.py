"""The device nodes a slice may open.

A slice's workload gets `/dev/nvidia<minor>` of its GPU, `/dev/nvidiactl`, `/dev/nvidia-uvm`,
and for a MIG slice the `/dev/nvidia-caps/nvidia-cap<N>` entries of its GPU instance and compute
instance (N from the driver's `/proc/driver/nvidia-caps/mig-minors`: `gpu<G>/gi<I>/access N`,
`gpu<G>/gi<I>/ci<C>/access N`). Nothing else of the GPU driver is visible inside, so
`CUDA_VISIBLE_DEVICES` changed inside the workload cannot widen what it can open.

Simulated hosts have no driver, so `make_sim_nodes` creates faithful stand-ins (`mknod`,
numbered like the real driver: `nvidia<i>` = char 195:i, `nvidiactl` = 195:255, `nvidia-uvm`,
`nvidia-caps/nvidia-cap<N>` with the real mig-minors numbering, and a `mig-minors` file in the
driver's format) in a directory per simulated host. The same `NvidiaDevices` reads either, so
the bind mounts and the devices cgroup are the same code on a simulated and a real host. Opening
a stand-in node gives ENXIO (no driver behind it), as a real node does on a host whose driver is
not loaded; the tests check what the workload can *reach*, not what the GPU answers.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

NVIDIA_MAJOR = 195
CTL_MINOR = 255
# The real driver allocates these majors dynamically (see /proc/devices); the stand-ins use
# numbers from the kernel's "local/experimental" range so they never alias a real device.
SIM_UVM_MAJOR = 240
SIM_CAPS_MAJOR = 241
MAX_GI, MAX_CI = 15, 8


@dataclass(frozen=True)
class DeviceNode:
    name: str          # path under /dev inside the workload, e.g. "nvidia0", "nvidia-caps/nvidia-cap12"
    source: str        # the node on the host
    major: int
    minor: int


def mig_minors_text(gpu_count: int) -> str:
    """The driver's mig-minors table (config 1, monitor 2, then per GPU 15 GIs of 1 + 8 CIs)."""
    lines, minor = ["config 1", "monitor 2"], 3
    for g in range(gpu_count):
        for gi in range(MAX_GI):
            lines.append(f"gpu{g}/gi{gi}/access {minor}")
            minor += 1
            for ci in range(MAX_CI):
                lines.append(f"gpu{g}/gi{gi}/ci{ci}/access {minor}")
                minor += 1
    return "\n".join(lines) + "\n"


def parse_mig_minors(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _mknod(path: str, major: int, minor: int) -> None:
    try:
        st = os.stat(path)
        if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == major and os.minor(st.st_rdev) == minor:
            os.chmod(path, 0o666)
            return
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    os.chmod(path, 0o666)        # as the driver makes them: access is decided by what is visible, and the cgroup


def make_sim_nodes(directory: str, gpu_count: int) -> str:
    """Create the stand-in nodes of a simulated host with `gpu_count` GPUs under `directory`;
    answer `directory` (the dev root for `NvidiaDevices`)."""
    os.makedirs(os.path.join(directory, "nvidia-caps"), mode=0o755, exist_ok=True)
    for i in range(gpu_count):
        _mknod(os.path.join(directory, f"nvidia{i}"), NVIDIA_MAJOR, i)
    _mknod(os.path.join(directory, "nvidiactl"), NVIDIA_MAJOR, CTL_MINOR)
    _mknod(os.path.join(directory, "nvidia-uvm"), SIM_UVM_MAJOR, 0)
    text = mig_minors_text(gpu_count)
    for minor in parse_mig_minors(text).values():
        _mknod(os.path.join(directory, "nvidia-caps", f"nvidia-cap{minor}"), SIM_CAPS_MAJOR, minor)
    with open(os.path.join(directory, "mig-minors"), "w", encoding="ascii") as f:
        f.write(text)
    return directory


class DeviceError(RuntimeError):
    """A slice's device node is missing on the host."""


class NvidiaDevices:
    """The GPU device nodes of slices, from a dev root (`/dev`, or a simulated host's directory)."""

    def __init__(self, dev_root: str = "/dev", caps_file: str = "/proc/driver/nvidia-caps/mig-minors") -> None:
        self.dev_root = dev_root
        self.caps_file = caps_file

    def _node(self, name: str) -> DeviceNode:
        path = os.path.join(self.dev_root, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DeviceError(f"device node {path} does not exist on this host") from None
        if not stat.S_ISCHR(st.st_mode):
            raise DeviceError(f"{path} is not a character device")
        return DeviceNode(name, path, os.major(st.st_rdev), os.minor(st.st_rdev))

    def _caps(self) -> dict[str, int]:
        try:
            with open(self.caps_file, encoding="ascii") as f:
                return parse_mig_minors(f.read())
        except FileNotFoundError:
            return {}

    def for_slice(self, gpu_minor: int, gi_id: int | None = None, ci_id: int | None = None) -> list[DeviceNode]:
        nodes = [self._node(f"nvidia{gpu_minor}"), self._node("nvidiactl")]
        if os.path.exists(os.path.join(self.dev_root, "nvidia-uvm")):
            nodes.append(self._node("nvidia-uvm"))
        if gi_id is not None:
            caps = self._caps()
            keys = [f"gpu{gpu_minor}/gi{gi_id}/access"] + ([f"gpu{gpu_minor}/gi{gi_id}/ci{ci_id}/access"]
                                                          if ci_id is not None else [])
            for key in keys:
                if key not in caps:
                    raise DeviceError(f"{self.caps_file} has no entry {key} (MIG instance of GPU {gpu_minor})")
                nodes.append(self._node(f"nvidia-caps/nvidia-cap{caps[key]}"))
        return nodes
