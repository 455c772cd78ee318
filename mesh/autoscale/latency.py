"""A serving replica's latency model, fitted to a real backend's measured figures (the calibration that
`meshctl bench autoscale --calibrate-out FILE` writes and `--calibration FILE` reads).

    m = fit(measurements)              # from mesh/autoscale/calibrate.py's real runs, or a stored JSON
    m.ttft_s(prompt_tokens)            # time to first token of a request that found a free slot
    m.service_s(prompt_tokens, tokens) # how long it holds its slot
    m.cold_start_s                     # slice creation + model load

The model: a replica runs ``slots`` requests at once (llama-cpp-python's server decodes one at a time: 1),
a request that waits for a slot waits in the gateway's queue; once on a slot its first token comes after
``prefill_base_s + prefill_per_token_s * prompt_tokens`` and each further token after ``decode_per_token_s``.
The prefill line is a least-squares fit over requests of several prompt lengths; decode is the ratio of
summed decode time to summed tokens; the load and slice-creation times are medians of measured cold starts.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_CALIBRATION = DATA_DIR / "calibration-smollm2-llamacpp-cpu.json"


@dataclass(frozen=True)
class LatencyModel:
    prefill_base_s: float          # TTFT of a zero-token prompt on a free slot
    prefill_per_token_s: float     # TTFT added per prompt token
    decode_per_token_s: float      # time per generated token after the first
    load_s: float                  # model load: backend process start to its first completion
    slice_create_s: float          # slice creation: allocate to READY
    slots: int = 1                 # requests a replica serves at once
    prompt_tokens: int = 128       # the request shape the bench sends (the calibration's)
    max_tokens: int = 64
    source: dict = field(default_factory=dict)   # how it was measured: backend, model, host, counts, fit error

    @property
    def cold_start_s(self) -> float:
        return self.slice_create_s + self.load_s

    def ttft_s(self, prompt_tokens: int | None = None) -> float:
        n = self.prompt_tokens if prompt_tokens is None else prompt_tokens
        return self.prefill_base_s + self.prefill_per_token_s * n

    def service_s(self, prompt_tokens: int | None = None, tokens: int | None = None) -> float:
        k = self.max_tokens if tokens is None else tokens
        return self.ttft_s(prompt_tokens) + max(0, k - 1) * self.decode_per_token_s

    def to_dict(self) -> dict:
        return {**asdict(self), "cold_start_s": self.cold_start_s, "service_s": self.service_s()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LatencyModel":
        """From a calibration JSON; ValueError naming the file and the missing or bad field."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"calibration {path}: cannot read it: {e}") from None
        kwargs = {}
        for name, kind in (("prefill_base_s", float), ("prefill_per_token_s", float),
                           ("decode_per_token_s", float), ("load_s", float), ("slice_create_s", float),
                           ("slots", int), ("prompt_tokens", int), ("max_tokens", int)):
            if name not in doc:
                raise ValueError(f"calibration {path}: field {name!r} is missing")
            try:
                kwargs[name] = kind(doc[name])
            except (TypeError, ValueError):
                raise ValueError(f"calibration {path}: field {name!r} is not a number: {doc[name]!r}") from None
            if kwargs[name] < 0 or (name == "slots" and kwargs[name] < 1):
                raise ValueError(f"calibration {path}: field {name!r} must be >= {1 if name == 'slots' else 0}")
        return cls(**kwargs, source=dict(doc.get("source") or {}))


@dataclass(frozen=True)
class Measurement:
    """One measured request on a free slot: its prompt, TTFT, tokens and decode time."""

    prompt_tokens: int
    ttft_s: float
    tokens: int
    decode_s: float


def fit(requests: list[Measurement], load_s: list[float], slice_create_s: list[float], *, slots: int = 1,
        prompt_tokens: int = 128, max_tokens: int = 64, source: dict | None = None) -> LatencyModel:
    """The latency model that fits measured requests (on free slots) and measured cold starts."""
    if len(requests) < 2:
        raise ValueError("calibration: at least 2 measured requests are needed")
    if not load_s or not slice_create_s:
        raise ValueError("calibration: measured load and slice-creation times are needed")
    x = np.array([r.prompt_tokens for r in requests], dtype=float)
    y = np.array([r.ttft_s for r in requests], dtype=float)
    if np.ptp(x) > 0:
        slope, base = np.polyfit(x, y, 1)
    else:
        slope, base = 0.0, float(np.mean(y))
    slope, base = max(0.0, float(slope)), float(base)
    if base < 0:                                  # keep the line through the data with a non-negative base
        base = 0.0
        slope = float(np.sum(x * y) / np.sum(x * x))
    predicted = base + slope * x
    decode_tokens = sum(max(0, r.tokens - 1) for r in requests)
    decode = sum(r.decode_s for r in requests) / decode_tokens if decode_tokens else 0.0
    fit_info = {"requests": len(requests), "ttft_mean_abs_error_s": round(float(np.mean(np.abs(y - predicted))), 6),
                "ttft_r2": round(float(1 - np.sum((y - predicted) ** 2) / np.sum((y - np.mean(y)) ** 2)), 4)
                if np.ptp(y) > 0 else 1.0,
                "load_runs": len(load_s), "slice_create_runs": len(slice_create_s)}
    return LatencyModel(prefill_base_s=base, prefill_per_token_s=slope, decode_per_token_s=decode,
                        load_s=float(statistics.median(load_s)), slice_create_s=float(statistics.median(slice_create_s)),
                        slots=slots, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                        source={**(source or {}), "fit": fit_info})


def default_model() -> LatencyModel:
    return LatencyModel.load(DEFAULT_CALIBRATION)
