"""The scheduler: a framework of small plugins over the in-memory fleet (see docs/scheduler.md)."""

from controlplane.scheduler.framework import Choice, Code, Decision, Framework, Status  # noqa: F401
from controlplane.scheduler.profiles import build, load  # noqa: F401
