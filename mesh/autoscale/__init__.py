"""Deployment autoscaling: Knative-like stable and panic windows, predictive warm-up, scale to zero and a
cost ceiling, as pure functions of observed samples (see ``types``)."""

from mesh.autoscale.autoscaler import Autoscaler, choose_variant
from mesh.autoscale.types import METRICS, SIZINGS, Decision, Sample, ScalingPolicy

__all__ = ["METRICS", "SIZINGS", "Autoscaler", "Decision", "Sample", "ScalingPolicy", "choose_variant"]
