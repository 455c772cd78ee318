"""Simulated host files: the GPUs, NVLink domains and NICs of one host.

The simulated NVML (``nodeagent.nvml.sim``) serves the host a file describes.
YAML shape (every key but ``gpus`` is optional; unknown keys are errors)::

    node: gpu-node-01              # node name; GPU UUIDs derive from it
    driver_version: "550.54.15"    # default 550.54.15
    cuda_version: "12.4"           # default 12.4
    gpus:                          # GPU indexes must end up 0..N-1
      - {model: H100-80GB, count: 8, mig: true}    # a run of identical GPUs
      - {index: 8, model: L4, serial: "1324021012345"}   # or one GPU
    nvlink_domains: [[0, 1, 2, 3, 4, 5, 6, 7]]     # GPUs joined by NVLink
    nics:
      - {name: mlx5_0, kind: infiniband, rate_gbps: 400, gpus: [0, 1],
         port_guid: "0x0c42a10300a1b2c3"}           # port_guid optional
    cpus: 128                      # host CPUs, for GPU CPU affinity; default 64
    labels: {tier: serving}        # node labels of this host (pools select by them),
                                   # added to the agent's node_labels setting

Every GPU entry may also say, for the simulated telemetry and faults::

      - model: H100-80GB
        count: 4
        numa_node: 1               # default: GPUs split evenly over two NUMA nodes
        thermal:                   # the telemetry model (all keys optional)
          ambient_c: 30            # temperature of an unpowered GPU
          full_load_c: 70          # steady temperature at full power (TDP)
          time_constant_s: 30      # first-order lag of temperature behind power
          throttle_c: 83           # SW thermal slowdown from here (clocks drop)
          slowdown_c: 88           # HW slowdown from here (clocks halve)
          shutdown_c: 92           # reported shutdown threshold
          idle_power_w: 70         # default: 10% of TDP
          power_limit_w: 700       # enforced power limit; default: TDP
        faults:                    # conditions for tests and demos (all optional)
          lost: true               # fallen off the bus from the start
          extra_heat_c: 20         # poor cooling: added to the steady temperature
          xids: [79, {code: 31, after_s: 10}]   # raised that long after the simulator starts
          ecc_corrected: 0         # starting ECC error counts
          ecc_uncorrected: 0

``model`` accepts any name ``mesh.gpumodels.get_model`` knows; ``mig``
defaults to true on MIG-capable models and must be false on the others.
``count`` entries take the indexes after the highest one so far. A NIC's
``gpus`` are the GPUs sharing its PCIe switch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import yaml

from mesh.gpumodels import get_model, model_names

NIC_KINDS = ("infiniband", "ethernet")
DEFAULT_DRIVER_VERSION = "550.54.15"
DEFAULT_CUDA_VERSION = "12.4"
DEFAULT_CPUS = 64
_NIC_RATE = {"A100-40GB": 200, "A100-80GB": 200, "H100-80GB": 400, "H200-141GB": 400, "V100-32GB": 100}


@dataclass(frozen=True)
class ThermalSpec:
    """The simulated telemetry model of one GPU (see ``nodeagent.nvml.simtelemetry``)."""

    ambient_c: float = 30.0
    full_load_c: float = 70.0
    time_constant_s: float = 30.0
    throttle_c: float = 83.0
    slowdown_c: float = 88.0
    shutdown_c: float = 92.0
    idle_power_w: float | None = None  # None: 10% of the model's TDP
    power_limit_w: float | None = None  # None: the model's TDP


@dataclass(frozen=True)
class FaultSpec:
    """Faults a GPU has by description (run-time faults live in the state file)."""

    lost: bool = False
    extra_heat_c: float = 0.0
    xids: tuple[tuple[int, float], ...] = ()  # (XID code, seconds after the simulator starts)
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0


THERMAL_KEYS = tuple(ThermalSpec.__dataclass_fields__)
FAULT_KEYS = tuple(FaultSpec.__dataclass_fields__)


@dataclass(frozen=True)
class GpuSpec:
    index: int
    model: str  # canonical model name
    mig_enabled: bool
    serial: str | None = None  # None: the simulator derives one
    numa_node: int | None = None  # None: the simulator splits the GPUs over two NUMA nodes
    thermal: ThermalSpec = ThermalSpec()
    faults: FaultSpec = FaultSpec()


@dataclass(frozen=True)
class NicSpec:
    name: str
    kind: str  # "infiniband" | "ethernet"
    rate_gbps: int
    port_guid: str
    gpus: tuple[int, ...]  # PCIe affinity


@dataclass(frozen=True)
class HostSpec:
    node: str | None
    gpus: tuple[GpuSpec, ...]
    nvlink_domains: tuple[tuple[int, ...], ...]
    nics: tuple[NicSpec, ...]
    driver_version: str = DEFAULT_DRIVER_VERSION
    cuda_version: str = DEFAULT_CUDA_VERSION
    cpus: int = DEFAULT_CPUS
    labels: tuple[tuple[str, str], ...] = ()    # (key, value) pairs, checked as the agent's node_labels


def load_host_file(path: str | os.PathLike) -> HostSpec:
    """Read and validate a host file; ValueError naming file and field."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"{source}: cannot read host file: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not valid YAML: {e}") from e
    return parse_host(data, source)


def parse_host(data: Any, source: str = "<host>") -> HostSpec:
    """Validate a host-file mapping into a HostSpec."""

    def fail(field: str, msg: str) -> ValueError:
        return ValueError(f"{source}: {field}: {msg}")

    def keys(obj: Any, field: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(obj, dict):
            raise fail(field, f"expected a mapping with keys {', '.join(allowed)}, got {type(obj).__name__}")
        for k in obj:
            if k not in allowed:
                raise fail(f"{field}.{k}" if field else str(k), f"unknown key; allowed: {', '.join(allowed)}")
        for k in required:
            if k not in obj:
                raise fail(f"{field}.{k}" if field else k, "required")
        return obj

    def typed(obj: dict, key: str, field: str, kind: type, default: Any = None) -> Any:
        value = obj.get(key, default)
        if value is default and key not in obj:
            return value
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise fail(field, f"expected {names}, got {value!r}")
        return value

    def index_list(value: Any, field: str, n: int) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise fail(field, f"expected a list of GPU indexes 0..{n - 1}, got {value!r}")
        for i, g in enumerate(value):
            if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < n:
                raise fail(f"{field}[{i}]", f"expected a GPU index 0..{n - 1}, got {g!r}")
        if len(set(value)) != len(value):
            raise fail(field, f"GPU indexes repeat: {value}")
        return tuple(value)

    def number(obj: dict, key: str, field: str, low: float | None = None, high: float | None = None) -> float:
        value = typed(obj, key, field, (int, float))
        if isinstance(value, bool) or (low is not None and value < low) or (high is not None and value > high):
            bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            raise fail(field, f"expected a number in {bounds}, got {value!r}")
        return float(value)

    def thermal_spec(raw: Any, field: str) -> ThermalSpec:
        e = keys(raw, field, THERMAL_KEYS)
        values = {}
        for k in e:
            low = 1e-3 if k in ("time_constant_s", "power_limit_w") else 0.0 if k == "idle_power_w" else -50.0
            values[k] = number(e, k, f"{field}.{k}", low, 10_000 if k.endswith("_w") else 200)
        t = ThermalSpec(**values)
        if not t.throttle_c <= t.slowdown_c <= t.shutdown_c:
            raise fail(field, f"expected throttle_c <= slowdown_c <= shutdown_c, got "
                              f"{t.throttle_c}, {t.slowdown_c}, {t.shutdown_c}")
        if t.full_load_c < t.ambient_c:
            raise fail(f"{field}.full_load_c", f"expected at least ambient_c ({t.ambient_c}), got {t.full_load_c}")
        return t

    def fault_spec(raw: Any, field: str) -> FaultSpec:
        e = keys(raw, field, FAULT_KEYS)
        xids = []
        raw_xids = e.get("xids", [])
        if not isinstance(raw_xids, list):
            raise fail(f"{field}.xids", f"expected a list of XID codes or {{code, after_s}} mappings, got {raw_xids!r}")
        for k, x in enumerate(raw_xids):
            xf = f"{field}.xids[{k}]"
            if isinstance(x, dict):
                x = keys(x, xf, ("code", "after_s"), ("code",))
                code = typed(x, "code", f"{xf}.code", int)
                after = number(x, "after_s", f"{xf}.after_s", 0.0) if "after_s" in x else 0.0
            else:
                code, after = typed({"code": x}, "code", xf, int), 0.0
            if not 1 <= code <= 1000:
                raise fail(xf, f"expected an XID code 1..1000, got {code}")
            xids.append((code, after))
        counts = {}
        for k in ("ecc_corrected", "ecc_uncorrected"):
            counts[k] = typed(e, k, f"{field}.{k}", int, 0)
            if counts[k] < 0:
                raise fail(f"{field}.{k}", f"expected an integer >= 0, got {counts[k]}")
        heat = number(e, "extra_heat_c", f"{field}.extra_heat_c", -100.0, 200.0) if "extra_heat_c" in e else 0.0
        return FaultSpec(typed(e, "lost", f"{field}.lost", bool, False), heat, tuple(xids), **counts)

    top = keys(data, "", ("node", "driver_version", "cuda_version", "gpus", "nvlink_domains", "nics", "cpus",
                          "labels"), ("gpus",))
    node = typed(top, "node", "node", str)
    driver = str(typed(top, "driver_version", "driver_version", (str, int, float), DEFAULT_DRIVER_VERSION))
    cuda = str(typed(top, "cuda_version", "cuda_version", (str, int, float), DEFAULT_CUDA_VERSION))
    if len(cuda.split(".")) != 2 or not all(p.isdigit() for p in cuda.split(".")):
        raise fail("cuda_version", f"expected MAJOR.MINOR such as 12.4, got {cuda!r}")
    cpus = typed(top, "cpus", "cpus", int, DEFAULT_CPUS)
    if not 1 <= cpus <= 65536:
        raise fail("cpus", f"expected an integer 1..65536, got {cpus}")
    raw_labels = top.get("labels") or {}
    if not isinstance(raw_labels, dict) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                   for v in raw_labels.values()):
        raise fail("labels", f"expected a mapping of label keys to text values, got {raw_labels!r}")
    from nodeagent.config import ConfigError, check_node_labels
    try:
        host_labels = check_node_labels({str(k): str(v) for k, v in raw_labels.items()}, "labels")
    except ConfigError as e:
        raise ValueError(f"{source}: {e}") from None
    entries = top["gpus"]
    if not isinstance(entries, list) or not entries:
        raise fail("gpus", "expected a non-empty list of GPU entries")

    gpus: dict[int, GpuSpec] = {}
    for i, entry in enumerate(entries):
        field = f"gpus[{i}]"
        e = keys(entry, field, ("index", "model", "count", "mig", "serial", "numa_node", "thermal", "faults"),
                 ("model",))
        try:
            model = get_model(typed(e, "model", f"{field}.model", str))
        except KeyError:
            raise fail(f"{field}.model", f"unknown GPU model {e['model']!r}; allowed: {', '.join(model_names())}") from None
        mig = typed(e, "mig", f"{field}.mig", bool, model.mig_capable)
        if mig and not model.mig_capable:
            mig_models = ", ".join(n for n in model_names() if get_model(n).mig_capable)
            raise fail(f"{field}.mig", f"{model.name} is not MIG-capable; MIG-capable models: {mig_models}")
        serial = typed(e, "serial", f"{field}.serial", str)
        numa = typed(e, "numa_node", f"{field}.numa_node", int)
        if numa is not None and not 0 <= numa < 64:
            raise fail(f"{field}.numa_node", f"expected a NUMA node 0..63, got {numa}")
        thermal = thermal_spec(e["thermal"], f"{field}.thermal") if "thermal" in e else ThermalSpec()
        faults = fault_spec(e["faults"], f"{field}.faults") if "faults" in e else FaultSpec()
        if "index" in e and "count" in e:
            raise fail(field, "give either index (one GPU) or count (a run), not both")
        if "count" in e:
            count = typed(e, "count", f"{field}.count", int)
            if count < 1:
                raise fail(f"{field}.count", f"expected an integer >= 1, got {count}")
            if serial is not None and count > 1:
                raise fail(f"{field}.serial", "only allowed on an entry for one GPU")
            first = max(gpus, default=-1) + 1
            indexes = list(range(first, first + count))
        else:
            indexes = [typed(e, "index", f"{field}.index", int, max(gpus, default=-1) + 1)]
        for idx in indexes:
            if idx in gpus:
                raise fail(field, f"GPU index {idx} is given twice")
            gpus[idx] = GpuSpec(idx, model.name, mig, serial, numa, thermal, faults)
    n = len(gpus)
    if sorted(gpus) != list(range(n)):
        raise fail("gpus", f"GPU indexes must be 0..{n - 1} without gaps, got {sorted(gpus)}")

    domains = []
    seen: dict[int, int] = {}
    raw_domains = top.get("nvlink_domains") or []
    if not isinstance(raw_domains, list):
        raise fail("nvlink_domains", f"expected a list of GPU index lists, got {raw_domains!r}")
    for d, raw in enumerate(raw_domains):
        members = index_list(raw, f"nvlink_domains[{d}]", n)
        for g in members:
            if g in seen:
                raise fail(f"nvlink_domains[{d}]", f"GPU {g} is already in nvlink_domains[{seen[g]}]")
            if not get_model(gpus[g].model).nvlink_links:
                nvl = ", ".join(m for m in model_names() if get_model(m).nvlink_links)
                raise fail(f"nvlink_domains[{d}]", f"GPU {g} is a {gpus[g].model}, which has no NVLink; NVLink models: {nvl}")
            seen[g] = d
        domains.append(members)

    nics = []
    raw_nics = top.get("nics") or []
    if not isinstance(raw_nics, list):
        raise fail("nics", f"expected a list of NIC entries, got {raw_nics!r}")
    for j, raw in enumerate(raw_nics):
        field = f"nics[{j}]"
        e = keys(raw, field, ("name", "kind", "rate_gbps", "port_guid", "gpus"), ("name", "kind", "rate_gbps"))
        name = typed(e, "name", f"{field}.name", str)
        if any(nic.name == name for nic in nics):
            raise fail(f"{field}.name", f"NIC name {name!r} is given twice")
        kind = e["kind"]
        if kind not in NIC_KINDS:
            raise fail(f"{field}.kind", f"got {kind!r}; allowed: {', '.join(NIC_KINDS)}")
        rate = typed(e, "rate_gbps", f"{field}.rate_gbps", int)
        if rate <= 0:
            raise fail(f"{field}.rate_gbps", f"expected a positive integer, got {rate}")
        guid = typed(e, "port_guid", f"{field}.port_guid", str, None) or _port_guid(node, name)
        nics.append(NicSpec(name, kind, rate, guid, index_list(e.get("gpus", []), f"{field}.gpus", n)))

    return HostSpec(node, tuple(gpus[i] for i in range(n)), tuple(domains), tuple(nics), driver, cuda, cpus,
                    tuple(sorted(host_labels.items())))


def _port_guid(node: str | None, nic: str) -> str:
    digest = hashlib.sha256(f"{node or ''}/{nic}".encode()).hexdigest()
    return "0x" + digest[:16]


def make_host(node: str, gpus: int, model: str, mig: bool = True) -> HostSpec:
    """A host of ``gpus`` identical GPUs, as ``meshctl up --sim-hosts`` builds.

    NVLink models get one NVLink domain of all GPUs and one InfiniBand NIC
    per two GPUs; PCIe-only models get neither. ``mig`` is ignored on
    models that are not MIG-capable.
    """
    m = get_model(model)
    if gpus < 1:
        raise ValueError(f"gpus: expected an integer >= 1, got {gpus}")
    specs = tuple(GpuSpec(i, m.name, mig and m.mig_capable, None) for i in range(gpus))
    domains: tuple[tuple[int, ...], ...] = ()
    nics: tuple[NicSpec, ...] = ()
    if m.nvlink_links:
        domains = (tuple(range(gpus)),)
        nics = tuple(
            NicSpec(f"mlx5_{k}", "infiniband", _NIC_RATE[m.name], _port_guid(node, f"mlx5_{k}"),
                    tuple(range(2 * k, min(2 * k + 2, gpus))))
            for k in range((gpus + 1) // 2)
        )
    return HostSpec(node, specs, domains, nics)


def dump_host(spec: HostSpec) -> dict:
    """The host-file mapping of ``spec``; ``parse_host(dump_host(s)) == s``."""
    out: dict[str, Any] = {}
    if spec.node is not None:
        out["node"] = spec.node
    out["driver_version"] = spec.driver_version
    out["cuda_version"] = spec.cuda_version
    if spec.cpus != DEFAULT_CPUS:
        out["cpus"] = spec.cpus
    if spec.labels:
        out["labels"] = dict(spec.labels)
    entries: list[dict[str, Any]] = []
    prev: GpuSpec | None = None
    for g in spec.gpus:
        last = entries[-1] if entries else None
        extra = _gpu_extras(g)
        if (g.serial is None and last is not None and "count" in last and prev is not None
                and last["model"] == g.model and last["mig"] == g.mig_enabled and extra == _gpu_extras(prev)):
            last["count"] += 1
        elif g.serial is None:
            entries.append({"model": g.model, "count": 1, "mig": g.mig_enabled, **extra})
        else:
            entries.append({"index": g.index, "model": g.model, "mig": g.mig_enabled, "serial": g.serial, **extra})
        prev = g
    out["gpus"] = entries
    out["nvlink_domains"] = [list(d) for d in spec.nvlink_domains]
    out["nics"] = [
        {"name": n.name, "kind": n.kind, "rate_gbps": n.rate_gbps, "port_guid": n.port_guid, "gpus": list(n.gpus)}
        for n in spec.nics
    ]
    return out


def _gpu_extras(g: GpuSpec) -> dict[str, Any]:
    """The optional keys of a GPU entry that differ from their defaults."""
    out: dict[str, Any] = {}
    if g.numa_node is not None:
        out["numa_node"] = g.numa_node
    thermal = {k: v for k, v in vars(g.thermal).items() if v != getattr(ThermalSpec(), k)}
    if thermal:
        out["thermal"] = thermal
    faults: dict[str, Any] = {}
    for k, v in vars(g.faults).items():
        if v != getattr(FaultSpec(), k):
            faults[k] = [{"code": c, "after_s": a} for c, a in v] if k == "xids" else v
    if faults:
        out["faults"] = faults
    return out
