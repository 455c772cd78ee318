"""Compatibility front of the scheduler (`controlplane.scheduler`): `place(fleet, req)` returns
where each slice of the gang goes, or raises ResourceExhausted with the reasons per GPU model."""

from __future__ import annotations

from controlplane.state.fleet import Fleet
from controlplane.scheduler import profiles
from controlplane.scheduler.framework import Choice, Decision, Framework
from mesh import errors
from mesh.slicespec import SliceRequest

__all__ = ["Choice", "place", "exhausted", "default_framework"]

_default: Framework | None = None


def default_framework() -> Framework:
    global _default
    if _default is None:
        _default = profiles.build("default")
    return _default


def exhausted(req: SliceRequest, d: Decision) -> errors.ResourceExhausted:
    reasons = d.reasons or {"fleet": "no GPU nodes registered"}
    what = req.mig_profile or f"{req.memory_bytes} bytes ({req.isolation or 'any isolation'})"
    text = f"cannot place {req.count} slice(s) of {what}: " + " | ".join(
        f"{cls}: {r}" for cls, r in sorted(reasons.items()))
    return errors.ResourceExhausted(text, reasons=reasons)


def place(fleet: Fleet, req: SliceRequest, framework: Framework | None = None) -> list[Choice]:
    """Where each of the `req.count` slices goes; all or nothing (no preemption here)."""
    d = (framework or default_framework()).schedule(req, fleet, allow_preemption=False)
    if not d.ok:
        raise exhausted(req, d)
    return d.choices
