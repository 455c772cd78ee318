"""Loading the Alibaba cluster-trace-gpu-v2023 (`openb`) node and pod lists, and turning them into
the control plane's own objects: a `Fleet` of nodes and GPUs, and `SliceRequest`s."""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass

from controlplane.state.fleet import MIB, Fleet, GpuState, NodeEntry
from gpumesh.v1 import types_pb2
from mesh import gpumodels
from mesh.slicespec import SliceRequest

TRACE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "traces", "alibaba-gpu-v2023")
GPU_MIB = 16000          # trace GPUs get a size where one milli-GPU is exactly 16 MiB
MILLI_BYTES = GPU_MIB * MIB // 1000


@dataclass(frozen=True)
class TraceNode:
    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    model: str


@dataclass(frozen=True)
class TracePod:
    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_spec: tuple[str, ...] = ()
    creation_time: int = 0
    deletion_time: int = 0

    @property
    def gpu_request(self) -> float:
        """GPUs asked for: a share for a GPU-sharing pod, whole GPUs otherwise."""
        if self.num_gpu == 1:
            return self.gpu_milli / 1000
        return float(self.num_gpu)


def trace_path(name: str, trace_dir: str = "", kind: str = "") -> str:
    """A trace file by path, file name or short name (`gpu_node`, `default`, `gpushare40`); `kind`
    ("node" or "pod") resolves short names that could be either."""
    if os.path.sep in name or os.path.exists(name):
        return name
    base = trace_dir or os.environ.get("MESH_TRACE_DIR") or TRACE_DIR
    full = os.path.join(base, name if name.endswith(".csv") else name + ".csv")
    if not os.path.exists(full) and not name.startswith("openb_"):
        kind = kind or ("node" if name.endswith("_node") else "pod")
        full = os.path.join(base, f"openb_{kind}_list_{name}.csv")
    return os.path.normpath(full)


class TraceError(ValueError):
    """A trace file that cannot be read: the message names the file, the row or column, and the problem."""


NODE_COLUMNS = ("sn", "gpu")
POD_COLUMNS = ("name", "num_gpu")


def _int(row: dict, key: str, path: str = "", line: int = 0) -> int:
    v = row.get(key) or "0"
    try:
        return int(float(v))
    except ValueError:
        raise TraceError(f"{path} row {line}: column {key} is not a number: {v!r}") from None


def _rows(path: str, required: tuple[str, ...]) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            cols = reader.fieldnames or []
    except OSError as e:
        raise TraceError(f"cannot read {path}: {e.strerror}") from None
    missing = [c for c in required if c not in cols]
    if missing:
        raise TraceError(f"{path} lacks the column(s) {', '.join(missing)} (has: {', '.join(cols) or 'none'})")
    return rows


def load_nodes(path: str) -> list[TraceNode]:
    return [TraceNode(r["sn"], _int(r, "cpu_milli", path, i + 2), _int(r, "memory_mib", path, i + 2),
                      _int(r, "gpu", path, i + 2), r.get("model") or "")
            for i, r in enumerate(_rows(path, NODE_COLUMNS))]


def load_pods(path: str, require: tuple[str, ...] = ()) -> list[TracePod]:
    """`require`: columns needed beyond name and num_gpu (the replay needs creation_time)."""
    out = []
    for i, r in enumerate(_rows(path, POD_COLUMNS + tuple(require))):
        spec = tuple(s for s in (r.get("gpu_spec") or "").split("|") if s)
        num = _int(r, "num_gpu", path, i + 2)
        milli = _int(r, "gpu_milli", path, i + 2) if num else 0
        if num > 1 or (num == 1 and milli <= 0):
            milli = 1000
        out.append(TracePod(r["name"], _int(r, "cpu_milli", path, i + 2), _int(r, "memory_mib", path, i + 2), num,
                            milli, spec, _int(r, "creation_time", path, i + 2), _int(r, "deletion_time", path, i + 2)))
    return out


@functools.lru_cache(maxsize=None)
def trace_model(name: str) -> gpumodels.GpuModel:
    """A non-MIG model for a trace GPU type (V100M16, G2, T4, ...), shared by milli-GPU; not registered
    in gpumodels.MODELS."""
    return gpumodels.GpuModel(name=name, product_name=f"trace {name}", memory_mib=GPU_MIB, multiprocessors=0,
                              tdp_w=0, mig_profiles=(), isolations=frozenset({"mps", "timeshare", "exclusive"}))


def build_fleet(nodes: list[TraceNode]) -> Fleet:
    fleet = Fleet()
    for n in nodes:
        inv = types_pb2.NodeInventory(hostname=n.name, cpu_milli=n.cpu_milli, memory_bytes=n.memory_mib * MIB)
        gpus = [GpuState(node=n.name, index=i, uuid=f"GPU-{n.name}-{i}", model=trace_model(n.model or "none"),
                         mig_enabled=False, memory_bytes=GPU_MIB * MIB, nvlink_domain=-1) for i in range(n.gpus)]
        entry = NodeEntry(record=types_pb2.Node(name=n.name, inventory=inv), gpus=gpus, ready=True)
        fleet.nodes[n.name] = entry
        for g in gpus:
            fleet.index.add(g)
    return fleet


def request_of(pod: TracePod) -> SliceRequest:
    """CPU-only pods take host resources only; a GPU-sharing pod is an MPS slice of its share; a
    pod of whole GPUs is a same-node gang of exclusive slices (host resources split evenly)."""
    common = dict(tenant="trace", compute_share=0.0, gpu_model=None, mig_profile=None, priority=0,
                  gpu_models=pod.gpu_spec)
    if pod.num_gpu == 0:
        return SliceRequest(memory_bytes=0, isolation="host", count=1, topology="any", cpu_milli=pod.cpu_milli,
                            host_memory_bytes=pod.memory_mib * MIB, **common)
    if pod.num_gpu == 1 and pod.gpu_milli < 1000:
        common["compute_share"] = pod.gpu_milli / 1000
        return SliceRequest(memory_bytes=pod.gpu_milli * MILLI_BYTES, isolation="mps", count=1, topology="any",
                            cpu_milli=pod.cpu_milli, host_memory_bytes=pod.memory_mib * MIB, **common)
    k = pod.num_gpu
    return SliceRequest(memory_bytes=GPU_MIB * MIB, isolation="exclusive", count=k,
                        topology="same-node" if k > 1 else "any", cpu_milli=-(-pod.cpu_milli // k),
                        host_memory_bytes=-(-pod.memory_mib * MIB // k), **common)
