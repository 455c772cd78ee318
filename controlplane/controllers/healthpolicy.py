"""The GPU health policy: what an XID does to a GPU, by the class NVIDIA's XID catalog gives it.

NVIDIA's XID catalog (docs.nvidia.com/deploy/xid-errors, "Resolution Bucket") sorts the errors by
the action they need. The default policy follows those buckets:

* ``application`` (RESTART_APP, the fault is the application's: 13 graphics engine exception,
  31 MMU fault, 43 GPU stopped processing, 45 preemptive cleanup, 68 video decoder, 109 context
  switch timeout): the GPU is fine. An event is recorded, nothing is marked.
* ``reset`` (RESET_GPU: 48 double-bit ECC, 63 row remapping pending, 74 NVLink error, 92 high
  single-bit ECC rate, 94 contained / 95 uncontained ECC, 119/120 GSP errors, 140 unrecovered ECC,
  154 recovery action changed): the GPU is marked unhealthy, its movable workloads are migrated
  away, nothing new is placed there, and once it is idle the agent resets it (``nvidia-smi -r``
  semantics: refused while processes use it). It returns to service when a reading after the reset
  is clean (no rows pending remap, no pages pending retirement, no remap failure, no volatile
  uncorrected ECC errors).
* ``reboot`` (RESTART_BM / the GPU left the bus: 64 row remap failure, 79 fallen off the bus): as
  ``reset``, but no reset is tried; the GPU returns when the node brings it back clean (reboot).
* ``quarantine`` (an action, not a default class): marked and kept out until an operator clears it.

Codes not in the table take ``unknown_action`` (default ``reset``: an unknown error is treated as
one that needs the GPU reset). A GPU whose fatal incidents recur — more than ``max_recurrences``
incidents within ``window_seconds`` — is quarantined: it takes no slices until an operator clears
it (``meshctl gpu clear NODE INDEX``). Errors that arrive while the GPU is already out of service
belong to the same incident (XIDs come in bursts: 48 then 63 then 94 within milliseconds).

The policy is configuration (``health_policy`` of the control plane, a YAML file)::

    window_seconds: 86400      # the recurrence window
    max_recurrences: 2         # incidents allowed in the window; one more quarantines the GPU
    recovery: true             # reset idle GPUs of the reset class automatically
    migrate: true              # live-migrate the movable workloads off a GPU that is marked
    reset_retry_seconds: 10    # ask again after a refused (in use) or unanswered reset
    max_reset_attempts: 3      # failed resets before the GPU is quarantined
    unknown_action: reset
    classes:                   # replace a class's codes (the others keep the catalog's)
      application: [13, 31, 43, 45, 68, 109]
    xids:                      # per-code overrides: ignore | reset | reboot | quarantine
      74: quarantine
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mesh.config import ConfigError

IGNORE, RESET, REBOOT, QUARANTINE = "ignore", "reset", "reboot", "quarantine"
ACTIONS = (IGNORE, RESET, REBOOT, QUARANTINE)
CLASS_ACTION = {"application": IGNORE, "reset": RESET, "reboot": REBOOT}

# The XID catalog's classes (Ampere and newer); the default of ``classes``.
CATALOG: dict[str, tuple[int, ...]] = {
    "application": (13, 31, 43, 45, 68, 109),
    "reset": (48, 63, 74, 92, 94, 95, 119, 120, 140, 154),
    "reboot": (64, 79),
}
_KEYS = {"window_seconds", "max_recurrences", "recovery", "migrate", "reset_retry_seconds", "max_reset_attempts",
         "unknown_action", "classes", "xids"}


@dataclass(frozen=True)
class Decision:
    """What one XID means: the action, and the class it came from (for events)."""
    code: int
    action: str
    cls: str

    @property
    def fatal(self) -> bool:
        return self.action != IGNORE


@dataclass(frozen=True)
class HealthPolicy:
    window_seconds: float = 86400.0
    max_recurrences: int = 2
    recovery: bool = True
    migrate: bool = True
    reset_retry_seconds: float = 10.0
    max_reset_attempts: int = 3
    unknown_action: str = RESET
    classes: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(CATALOG))
    xids: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.window_seconds, (int, float)) and not isinstance(self.window_seconds, bool)
                and math.isfinite(self.window_seconds) and 0 < self.window_seconds <= 365 * 86400):
            raise ConfigError(f"health_policy.window_seconds: expected seconds in (0, 31536000], "
                              f"got {self.window_seconds!r}")
        for name, lo, hi in (("max_recurrences", 0, 1000), ("max_reset_attempts", 1, 100)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ConfigError(f"health_policy.{name}: expected an integer {lo}..{hi}, got {v!r}")
        if not (isinstance(self.reset_retry_seconds, (int, float)) and not isinstance(self.reset_retry_seconds, bool)
                and 0.1 <= self.reset_retry_seconds <= 3600):
            raise ConfigError(f"health_policy.reset_retry_seconds: expected seconds 0.1..3600, "
                              f"got {self.reset_retry_seconds!r}")
        for name in ("recovery", "migrate"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"health_policy.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.unknown_action not in ACTIONS:
            raise ConfigError(f"health_policy.unknown_action: {self.unknown_action!r} is not one of "
                              f"{', '.join(ACTIONS)}")
        seen: dict[int, str] = {}
        for cls, codes in self.classes.items():
            if cls not in CLASS_ACTION:
                raise ConfigError(f"health_policy.classes: unknown class {cls!r}; allowed: "
                                  f"{', '.join(CLASS_ACTION)}")
            for c in codes:
                _check_code(c, f"health_policy.classes.{cls}")
                if c in seen:
                    raise ConfigError(f"health_policy.classes: XID {c} is in both {seen[c]} and {cls}")
                seen[c] = cls
        for c, action in self.xids.items():
            _check_code(c, "health_policy.xids")
            if action not in ACTIONS:
                raise ConfigError(f"health_policy.xids.{c}: {action!r} is not one of {', '.join(ACTIONS)}")

    def decide(self, code: int) -> Decision:
        """The action for XID ``code``: a per-code override, else its class's, else unknown_action."""
        if code in self.xids:
            return Decision(code, self.xids[code], "override")
        for cls, codes in self.classes.items():
            if code in codes:
                return Decision(code, CLASS_ACTION[cls], cls)
        return Decision(code, self.unknown_action, "unknown")

    def recurring(self, incidents: list[float], now: float) -> list[float]:
        """The incidents still inside the window at ``now`` (oldest first)."""
        return [t for t in incidents if now - t < self.window_seconds]

    def quarantines(self, incidents: list[float], now: float) -> bool:
        """True when the incidents in the window (the new one included) exceed max_recurrences + 1."""
        return len(self.recurring(incidents, now)) > self.max_recurrences + 1


def _check_code(c: Any, where: str) -> None:
    if not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= 1000:
        raise ConfigError(f"{where}: expected XID codes 1..1000, got {c!r}")


def from_mapping(raw: Any, where: str = "health_policy") -> HealthPolicy:
    """A policy from parsed YAML (a mapping; None or empty: the catalog's defaults)."""
    if raw is None:
        return HealthPolicy()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}")
    kw = {k: v for k, v in raw.items() if k not in ("classes", "xids")}
    if "window_seconds" in kw and isinstance(kw["window_seconds"], int) and not isinstance(kw["window_seconds"], bool):
        kw["window_seconds"] = float(kw["window_seconds"])
    classes = dict(CATALOG)
    raw_classes = raw.get("classes") or {}
    if not isinstance(raw_classes, dict):
        raise ConfigError(f"{where}.classes: expected a mapping of class to a list of XID codes")
    for cls, codes in raw_classes.items():
        if not isinstance(codes, list):
            raise ConfigError(f"{where}.classes.{cls}: expected a list of XID codes, got {codes!r}")
        classes[str(cls)] = tuple(codes)
    # A code moved into a class by the file leaves the class the catalog had it in.
    for cls in list(classes):
        if cls not in raw_classes:
            moved = {c for k, v in raw_classes.items() for c in (v or ())}
            classes[cls] = tuple(c for c in classes[cls] if c not in moved)
    raw_xids = raw.get("xids") or {}
    if not isinstance(raw_xids, dict):
        raise ConfigError(f"{where}.xids: expected a mapping of XID code to an action")
    xids = {}
    for k, v in raw_xids.items():
        try:
            code = int(k)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.xids: {k!r} is not an XID code") from None
        xids[code] = v
    try:
        return HealthPolicy(classes=classes, xids=xids, **kw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def load(path: str) -> HealthPolicy:
    """The policy in the YAML file ``path`` (empty: the catalog's defaults)."""
    if not path:
        return HealthPolicy()
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"health_policy: cannot read {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"health_policy: {path!r} is not valid YAML: {e}") from None
    return from_mapping(raw, f"health_policy ({path})")
