"""Named profiles (which plugins, which weights) and building one from configuration.

A scheduler configuration file (YAML; `scheduler_config` in the control plane's settings):

    profile: default            # one of PROFILES
    preemption: true            # let requests with spec.preempt evict lower priorities
    weights:                    # score weights, by plugin NAME (0 turns a score off)
      Topology: 2.0
    args:                       # constructor arguments, by plugin NAME
      NodeHealth: {max_memory_pressure: high}
      TenantQuota:
        tenants: {team-a: {max_slices: 64, max_gpus: 8}}
        default: {max_slices: 256}
"""

from __future__ import annotations

import math
from typing import Any

from controlplane.scheduler.framework import Framework, Profile
from mesh import config as mesh_config
from controlplane.scheduler.plugins import REGISTRY

FILTERS = ["NodeHealth", "GpuModel", "NodeResourcesFit", "TenantQuota", "Pool", "AntiAffinity", "Preemption"]

# name -> (score plugins with weights, extra constructor args)
PROFILES: dict[str, tuple[dict[str, float], dict[str, dict]]] = {
    # fragmentation gradient scored in whole points as the artifact does (near-ties go to the
    # smallest node name, which packs: about 40 milli-GPUs of fragmentation per point near
    # zero), host memory in the request types (GPUs stranded by a node's full memory are fragment),
    # host-only requests in the mix, the GPU inside the node by the exact gradient; topology
    # (10 points, about 0.4 GPU) and pressure (1 point a level) preferences
    "default": ({"FragmentationGradient": 1.0, "Topology": 10.0, "Pressure": 1.0},
                {"FragmentationGradient": {"integer": True, "normalize": True, "cpu_types": True,
                                           "host_memory": True, "gpu_choice": "exact"}}),
    # the FGD paper's artifact: integer scores (near-ties to node order), host-only pod types in
    # the mix, weights normalized over the kept types, the fullest GPU among equal choices
    "fgd": ({"FragmentationGradient": 1.0}, {"FragmentationGradient": {
        "integer": True, "cpu_types": True, "normalize": True, "gpu_choice": "fullest"}}),
    "fgd-exact": ({"FragmentationGradient": 1.0}, {}),
    # the artifact's BestFit and GPU-packing baselines (integer scores, near-ties to node order)
    "bestfit": ({"BestFit": 1.0, "Topology": 0.1}, {"BestFit": {"integer": True}}),
    "packing": ({"Packing": 1.0, "Topology": 0.1}, {"Packing": {"integer": True}}),
    "spread": ({"Spread": 1.0, "Topology": 0.1}, {}),
    "random": ({"Random": 1.0}, {}),
}


class ConfigError(mesh_config.ConfigError):
    pass


def build(name: str = "default", weights: dict[str, float] | None = None, args: dict[str, dict] | None = None,
          preemption: bool = True) -> Framework:
    """The framework of profile `name`, with weights and plugin arguments overridden."""
    if name not in PROFILES:
        raise ConfigError(f"unknown scheduler profile {name!r}; allowed: {', '.join(PROFILES)}")
    base_weights, base_args = PROFILES[name]
    w = dict(base_weights)
    for k, v in (weights or {}).items():
        if k not in REGISTRY:
            raise ConfigError(f"weights: unknown plugin {k!r}; allowed: {', '.join(sorted(REGISTRY))}")
        if not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ConfigError(f"weights.{k}: {v!r} is not a finite number >= 0")
        w[k] = float(v)
    a: dict[str, dict] = {k: dict(v) for k, v in base_args.items()}
    for k, v in (args or {}).items():
        if k not in REGISTRY:
            raise ConfigError(f"args: unknown plugin {k!r}; allowed: {', '.join(sorted(REGISTRY))}")
        if not isinstance(v, dict):
            raise ConfigError(f"args.{k}: must be a mapping of argument names to values")
        a.setdefault(k, {}).update(v)
    a.setdefault("Preemption", {}).setdefault("enabled", bool(preemption))
    plugins: list[Any] = []
    for pname in FILTERS + [k for k in w if k not in FILTERS]:
        try:
            plugins.append(REGISTRY[pname](**a.get(pname, {})))
        except TypeError as exc:
            raise ConfigError(f"args.{pname}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return Framework(Profile(name, plugins, w))


def from_config(cfg: dict[str, Any] | None, profile: str | None = None) -> Framework:
    cfg = dict(cfg or {})
    unknown = set(cfg) - {"profile", "preemption", "weights", "args"}
    if unknown:
        raise ConfigError(f"scheduler config: unknown key(s) {', '.join(sorted(unknown))}; "
                          "allowed: profile, preemption, weights, args")
    preemption = cfg.get("preemption", True)
    if not isinstance(preemption, bool):
        raise ConfigError(f"scheduler config: preemption must be true or false, not {preemption!r}")
    return build(profile or cfg.get("profile", "default"), cfg.get("weights"), cfg.get("args"), preemption)


def load(path: str = "", profile: str | None = None) -> Framework:
    """The framework from a YAML file (empty path: the defaults)."""
    cfg = None
    if path:
        import yaml
        try:
            with open(path) as f:
                cfg = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"scheduler_config: cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"scheduler_config: {path} is not valid YAML: {exc}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"scheduler_config: {path} must hold a mapping")
    return from_config(cfg, profile if profile != "default" or not cfg else cfg.get("profile", profile))
