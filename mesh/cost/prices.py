"""Prices per GPU-hour and a slice's share of its GPU.

A slice pays its GPU's price times its share: a MIG instance its memory slices of eight (NVML's placement
size, which is what it takes from other tenants), an MPS slice the larger of its compute share and its memory
fraction, a time-share slice its memory fraction (time-slicing hands every slice the whole GPU's compute in
turns, and the scheduler gives a memory-sized time-share slice a compute share of 1.0: what it takes from the
others is memory; its compute share only when its memory is not known), an exclusive slice the whole GPU.
No I/O: the control plane's configuration gives
the table, the accounting and the autoscaler's cost ceiling read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh import gpumodels

MIG_MEMORY_SLICES = 8

# Isolation enum values of gpumesh.v1.Isolation (types.proto), kept here so this module needs no stubs.
_MIG, _MPS, _TIMESHARE, _EXCLUSIVE = 1, 2, 3, 4


@dataclass(frozen=True)
class PriceTable:
    """Dollars per GPU-hour by canonical GPU model name (``mesh.gpumodels``), with a default for the rest."""

    per_gpu_hour: dict[str, float] = field(default_factory=dict)
    default: float = 0.0

    @classmethod
    def parse(cls, entries: list[str], default: float = 0.0) -> "PriceTable":
        """From ``["H100-80GB=2.49", ...]``; ValueError naming the entry and what is allowed."""
        prices: dict[str, float] = {}
        for entry in entries:
            name, sep, value = str(entry).partition("=")
            if not sep:
                raise ValueError(f"gpu price {entry!r}: expected MODEL=DOLLARS_PER_GPU_HOUR, e.g. H100-80GB=2.49")
            try:
                canonical = gpumodels.get_model(name.strip()).name
            except KeyError:
                raise ValueError(f"gpu price {entry!r}: unknown GPU model {name.strip()!r}; allowed: "
                                 f"{', '.join(gpumodels.model_names())}") from None
            try:
                price = float(value)
            except ValueError:
                raise ValueError(f"gpu price {entry!r}: {value!r} is not a number") from None
            if not price >= 0 or price == float("inf"):
                raise ValueError(f"gpu price {entry!r}: the price must be a finite number >= 0")
            prices[canonical] = price
        if not default >= 0 or default == float("inf"):
            raise ValueError(f"default gpu price {default!r}: must be a finite number >= 0")
        return cls(prices, float(default))

    def gpu_hour(self, gpu_model: str) -> float:
        """The price of one whole GPU of ``gpu_model`` for an hour (the default for a model not listed)."""
        try:
            name = gpumodels.get_model(gpu_model).name
        except KeyError:
            name = gpu_model
        return self.per_gpu_hour.get(name, self.default)


def slice_share(isolation: int, gpu_model: str, *, profile: str = "", memory_bytes: int = 0,
                compute_share: float = 0.0) -> float:
    """The fraction of its GPU a slice is charged for, in [0, 1]."""
    if isolation == _EXCLUSIVE:
        return 1.0
    try:
        model = gpumodels.get_model(gpu_model)
    except KeyError:
        model = None
    if isolation == _MIG:
        if model is not None and profile:
            try:
                return model.profile(profile).memory_slices / MIG_MEMORY_SLICES
            except KeyError:
                pass
    memory_fraction = 0.0
    if model is not None and memory_bytes > 0:
        memory_fraction = memory_bytes / (model.memory_mib * 2**20)
    if isolation == _TIMESHARE and memory_fraction > 0:
        return max(0.0, min(1.0, memory_fraction))
    return max(0.0, min(1.0, max(float(compute_share), memory_fraction)))


def slice_cost_per_hour(slice_msg, prices: PriceTable) -> float:
    """Dollars per hour of a ``gpumesh.v1.Slice`` (or anything with its fields)."""
    share = slice_share(int(slice_msg.isolation), slice_msg.gpu_model, profile=slice_msg.profile,
                        memory_bytes=int(slice_msg.memory_bytes), compute_share=float(slice_msg.compute_share))
    return share * prices.gpu_hour(slice_msg.gpu_model)
