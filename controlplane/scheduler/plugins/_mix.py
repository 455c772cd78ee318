"""The request mix FragmentationGradient weighs fragmentation by: request types, the most frequent
ones, and `MixLearner`, which learns them online from the requests the scheduler sees.

A type is (GPUs, milli-GPUs each, host CPU, GPU models); a mix is a list of `MixType` with weights.
The live control plane has no trace to read the mix from: it learns it from a sliding window of the
last `window` requests, recomputed every `refresh` requests. While the window is still filling
(`warm`), the mix is also recomputed, and handed over whatever its drift, each time the number of
requests seen doubles (1, 2, 4, ..., and when the window fills): an early mix drawn from a handful of requests is
replaced as soon as twice as many have arrived, instead of standing until it drifts past the
plugin's tolerance. Once the window is full only drift past the tolerance changes the mix (a new
mix re-scores every node).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from mesh.slicespec import SliceRequest


@dataclass(frozen=True)
class MixType:
    """One request type of the mix: `gpus` GPUs of `milli` milli-GPUs each, `cpu_milli` host CPU."""

    gpus: int
    milli: int
    cpu_milli: int = 0
    models: frozenset = frozenset()
    weight: float = 1.0
    memory: float = 0   # host memory the type takes (bytes; 0: not considered)


def type_of(req: SliceRequest) -> tuple[int, int, int, frozenset] | None:
    """The mix key of a request, None for one that takes no GPU."""
    if req.isolation == "host":
        return None
    models = frozenset(req.gpu_models or ((req.gpu_model,) if req.gpu_model else ()))
    if req.isolation == "exclusive":
        gpus, milli = (req.count if req.topology != "any" else 1), 1000
    else:
        gpus = 1
        milli = int(round(req.compute_share * 1000)) if req.compute_share else 0
        if not milli and req.memory_bytes:
            milli = min(1000, max(1, req.memory_bytes * 1000 // (80 << 30)))
        milli = milli or 1000
    return gpus, milli, req.cpu_milli * gpus, models


def top_types(counts: Counter, coverage: float, normalize: bool = False) -> list[MixType]:
    """The most frequent types that together make up `coverage` of `counts`, weighted by their
    share of all requests (the paper's metric), or with `normalize` by their share of the kept
    types (weights summing to 1, as the artifact's scheduler does)."""
    total = sum(counts.values())
    out, seen = [], 0
    for key, n in counts.most_common():
        if total and seen / total >= coverage:
            break
        seen += n
        out.append(MixType(key[0], key[1], key[2], key[3], n / total))
    if normalize and seen:
        out = [MixType(m.gpus, m.milli, m.cpu_milli, m.models, m.weight * total / seen, m.memory) for m in out]
    return out


@dataclass(frozen=True)
class Learned:
    """A mix the learner recomputed; `force`: hand it over whatever its drift (a warm-start step)."""

    mix: list[MixType]
    force: bool


class MixLearner:
    """The request mix learned from a sliding window of request-type keys (see the module's doc)."""

    def __init__(self, window: int = 2000, refresh: int = 200, coverage: float = 0.95,
                 normalize: bool = False, host_memory: bool = False, warm: bool = True) -> None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be a positive integer, not {window!r}")
        if not isinstance(refresh, int) or isinstance(refresh, bool) or refresh < 1:
            raise ValueError(f"refresh must be a positive integer, not {refresh!r}")
        if not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
            raise ValueError(f"coverage must be in (0, 1], not {coverage!r}")
        if not isinstance(warm, bool):
            raise ValueError(f"warm must be true or false, not {warm!r}")
        self.window, self.refresh, self.coverage = window, refresh, float(coverage)
        self.normalize, self.host_memory, self.warm = normalize, host_memory, warm
        self.recent: deque = deque(maxlen=window)
        self.counts: Counter = Counter()          # the window's keys, kept in step with `recent`
        self.seen = 0
        self._next_warm = 1
        self._memories: dict = {}   # type key -> Counter of host memory asked (the mode is the type's)

    def add(self, key: tuple, memory: int = 0) -> Learned | None:
        """Count one request of type `key` (taking `memory` bytes of host memory); a recomputed mix
        when one is due, else None."""
        if len(self.recent) == self.window:
            old = self.recent[0]
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
        self.recent.append(key)
        self.counts[key] += 1
        self.seen += 1
        if self.host_memory:
            self._memories.setdefault(key, Counter())[memory] += 1
            if len(self._memories) > 4 * self.window:
                self._memories.clear()
        force = self.warm and self.seen == self._next_warm
        if force and self.seen < self.window:   # the last warm step: the window just filled
            self._next_warm = min(2 * self.seen, self.window)
        if not (force or self.seen == 1 or self.seen % self.refresh == 0):
            return None
        return Learned(self.mix(), force)

    def mix(self) -> list[MixType]:
        """The window's mix now (types making up `coverage`, with their usual host memory)."""
        mix = top_types(self.counts, self.coverage, self.normalize)
        if self.host_memory:
            mix = [MixType(m.gpus, m.milli, m.cpu_milli, m.models, m.weight, self.memory_of(m)) for m in mix]
        return mix

    def memory_of(self, m: MixType) -> int:
        c = self._memories.get((m.gpus, m.milli, m.cpu_milli, m.models))
        return c.most_common(1)[0][0] if c else 0
