"""Serving models on slices (docs/serving.md): the model registry (`registry`, `validate`); deployments,
the autoscaler and cost build on it."""
