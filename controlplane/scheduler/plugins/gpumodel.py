"""GpuModel: a request that names a GPU model (or, from the trace, a set of models) only goes to
GPUs of that model."""

from __future__ import annotations

from controlplane.state.fleet import GpuState
from mesh.slicespec import SliceRequest

NAME = "GpuModel"


class Plugin:
    NAME = NAME

    def __init__(self) -> None:
        pass

    def filter_gpu(self, req: SliceRequest, gpu: GpuState) -> str | None:
        if req.gpu_model and gpu.model.name != req.gpu_model:
            return f"model is not {req.gpu_model}"
        if req.gpu_models and gpu.model.name not in req.gpu_models:
            return f"model is not one of {'|'.join(req.gpu_models)}"
        return None
