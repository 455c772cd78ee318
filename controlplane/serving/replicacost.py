"""What one replica of a deployment costs per hour: its slice's share of the GPU-hour price.

A running replica's slice is priced as it is (mesh.cost.slice_cost_per_hour). Before one runs, the slice it
would get is the one the deployment controller asks for (controlplane/serving/deployspec.py slice_request):
the variant's VRAM need with the deployment's isolation; UNSPECIFIED takes the smallest MIG profile that
holds the need on a MIG GPU, else an MPS share of that memory (mesh/models/vram.py slice_for). The estimate
per GPU model of the fleet uses that slice, and the autoscaler's ceiling and the policy check use the
cheapest GPU model a replica fits (the least a replica can cost: a ceiling below it admits none).
"""

from __future__ import annotations

from mesh import gpumodels
from mesh.cost import PriceTable, slice_cost_per_hour, slice_share
from mesh.models import vram

MIG, MPS, TIMESHARE = 1, 2, 3        # gpumesh.v1.Isolation


def estimate(need_bytes: int, isolation: int, gpu_model: gpumodels.GpuModel, prices: PriceTable) -> float | None:
    """Dollars per hour of a replica needing `need_bytes` on `gpu_model` at `isolation`; None when it does not
    fit that GPU model at that isolation."""
    fit = vram.slice_for(need_bytes, gpu_model)
    price = prices.gpu_hour(gpu_model.name)
    if isolation in (0, MIG) and fit.mig_profile:
        return slice_share(MIG, gpu_model.name, profile=fit.mig_profile) * price
    if isolation == MIG or not fit.mps_memory_bytes:
        return None
    kind = TIMESHARE if isolation == TIMESHARE else MPS
    return slice_share(kind, gpu_model.name, memory_bytes=need_bytes) * price


def cheapest(need_bytes: int, isolation: int, gpu_models, prices: PriceTable) -> float | None:
    """The least one replica costs on any of `gpu_models` (None: fits none, or no GPU model known)."""
    costs = [c for g in gpu_models if (c := estimate(need_bytes, isolation, g, prices)) is not None]
    return min(costs) if costs else None


def of_replicas(slices, prices: PriceTable) -> list[float]:
    """Dollars per hour of each of these slices (gpumesh.v1.Slice records of running replicas)."""
    return [slice_cost_per_hour(s, prices) for s in slices]
