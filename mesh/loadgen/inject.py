"""The `--inject` fault plan: what goes wrong, under which replica, when.

Grammar (comma-separated items; R is a replica's index in the bench's replica list, T seconds from the
start of each policy's run):

    hot=R[@T]               the simulated GPU under replica R reports a throttling temperature
    pressure=R:LEVEL[@T]    its memory use puts it at LEVEL (high | critical)
    kill=R@T                the backend process of replica R is SIGKILLed at T seconds
    standard                one hot, one under critical memory pressure, one killed a third of the way in
                            (replicas 0, 1 and 2; needs the duration)

`hot` and `pressure` start at T (default 0: from the start) and last to the end of the run; the bench takes
them away (and waits for a killed replica to be back) before the next policy, so every policy meets the
same conditions at the same times. `parse` checks the grammar and the replica indices.

What each fault does to the backend (the same for every policy; the gateway is not told):

- hot: the GPU reports a throttling temperature and computes at the SM clock ratio it reports under load
  (the bench slows the backend process to that ratio).
- pressure=R:critical: `OomModel`. A GPU above 95 % memory use fails allocations: the model server's next
  allocation (activations, KV blocks, cuBLAS workspace) gets CUDA out-of-memory, and both backends die of
  it. llama.cpp's CUDA backend aborts the process on a CUDA error (ggml-org/llama.cpp#8117, "Crash with GGML
  CUDA error when inferencing on llama-server"; TheTom/llama-cpp-turboquant#72, llama-server "core dumped"
  on `CUDA error: out of memory` during a request; oobabooga/textgen#3119, an OOM in a llama.cpp CUDA
  model crashes the server); vLLM's engine dies on an OOM in a forward pass and every later request fails
  until the process restarts (vllm-project/vllm#5173, AsyncEngineDeadError after CUDA OOM;
  vllm-project/vllm#13582, OOM and the service shutting down). An allocation happens only while the
  backend computes, so the model is a hazard per second of compute: while the pressure lasts, each second
  the backend spends computing (its CPU time here) ends in an OOM crash with probability
  1 - exp(-rate x busy seconds) (`oom_rate`, default 0.1 per busy second); the crash is a SIGKILL of the
  backend's process tree (what an abort looks like from outside: streams cut mid-way, connections refused
  until the deployment restarts it after its backoff). An idle backend does not crash. The draws come from
  a generator seeded per replica, so every policy meets the same sequence; how often a backend crashes
  depends on how much work the policy sends it, which is the point. A GPU at `high` pressure keeps working.
- kill: the backend process is SIGKILLed at T; the deployment restarts it after its backoff.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from mesh.errors import InvalidArgument

KINDS = ("hot", "pressure", "kill")
LEVELS = ("high", "critical")
# What the simulated GPU is made to report: a throttling temperature (the control plane: 80-85 C is
# "throttling"; the simulated H100 slows its SM clock from 83 C) and memory use of the pressure levels.
HOT_CELSIUS = 85.0
PRESSURE_FRACTION = {"high": 0.90, "critical": 0.97}   # high: 85-95 % (seed 003), critical: above 95 %
GRAMMAR = "hot=R[@T], pressure=R:high|critical[@T], kill=R@T, or standard"
OOM_RATE = 0.1             # OOM crashes per second of compute on a GPU at critical memory pressure


@dataclass
class OomModel:
    """A backend on a GPU at critical memory pressure: each second it computes may end in a CUDA
    out-of-memory crash (see the module's docstring for the sources). `step(busy_s)` is called with the
    compute seconds since the last call and says whether the backend crashes now."""

    rate: float = OOM_RATE          # crashes per busy second
    seed: int = 0
    busy_floor_s: float = 0.02      # less compute than this in a step is idle (an HTTP server's housekeeping)

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise InvalidArgument.of("oom_rate", f"{self.rate} is negative", ">= 0 crashes per busy second")
        self.rng = random.Random(self.seed)
        self.busy_total_s = 0.0

    def probability(self, busy_s: float) -> float:
        """The chance that `busy_s` seconds of compute end in an OOM."""
        if busy_s < self.busy_floor_s or self.rate <= 0:
            return 0.0
        return 1.0 - math.exp(-self.rate * busy_s)

    def step(self, busy_s: float) -> bool:
        busy_s = max(0.0, busy_s)
        p = self.probability(busy_s)
        if p <= 0.0:
            return False
        self.busy_total_s += busy_s
        return self.rng.random() < p


@dataclass(frozen=True)
class Injection:
    kind: str              # hot | pressure | kill
    replica: int
    at_s: float = 0.0
    level: str = ""        # pressure only

    def describe(self) -> dict:
        d = {"kind": self.kind, "replica": self.replica, "at_s": round(self.at_s, 2)}
        if self.level:
            d["level"] = self.level
        return d


def _number(text: str, what: str, item: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise InvalidArgument.of("inject", f"{item!r}: {what} {text!r} is not a number", GRAMMAR) from None
    if v < 0:
        raise InvalidArgument.of("inject", f"{item!r}: {what} {text!r} is negative", GRAMMAR)
    return v


def _replica(text: str, item: str, replicas: int) -> int:
    if not text.isdigit():
        raise InvalidArgument.of("inject", f"{item!r}: replica {text!r} is not an index", GRAMMAR)
    r = int(text)
    if r >= replicas:
        raise InvalidArgument.of("inject", f"{item!r}: replica {r} does not exist", f"0..{replicas - 1}")
    return r


def standard(replicas: int, duration_s: float) -> list[Injection]:
    """One hot, one under critical memory pressure, one killed a third of the way in."""
    if replicas < 3:
        raise InvalidArgument.of("inject", f"standard needs 3 replicas, the bench has {replicas}", ">= 3 replicas")
    return [Injection("hot", 0), Injection("pressure", 1, level="critical"),
            Injection("kill", 2, at_s=round(duration_s / 3, 2))]


def parse(spec: str, replicas: int, duration_s: float) -> list[Injection]:
    """The injections of `spec` (empty: none), checked against `replicas` replicas and the run's duration."""
    out: list[Injection] = []
    for item in (s.strip() for s in (spec or "").split(",")):
        if not item:
            continue
        if item == "standard":
            out.extend(standard(replicas, duration_s))
            continue
        kind, eq, rest = item.partition("=")
        if not eq or kind not in KINDS:
            raise InvalidArgument.of("inject", f"{item!r} is not an injection", GRAMMAR)
        target, at_sign, when = rest.partition("@")
        at = _number(when, "time", item) if at_sign else None
        if kind == "kill" and at is None:
            raise InvalidArgument.of("inject", f"{item!r}: kill needs a time", "kill=R@T (seconds)")
        if at is not None and at > duration_s:
            raise InvalidArgument.of("inject", f"{item!r}: {at:g} s is after the run's end ({duration_s:g} s)",
                                     f"0..{duration_s:g}")
        level = ""
        if kind == "pressure":
            target, colon, level = target.partition(":")
            if not colon or level not in LEVELS:
                raise InvalidArgument.of("inject", f"{item!r}: pressure needs a level", "pressure=R:high|critical")
        out.append(Injection(kind, _replica(target, item, replicas), at or 0.0, level))
    keys = [(i.kind, i.replica) for i in out]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise InvalidArgument.of("inject", f"{dup[0]} on replica {dup[1]} is given twice", "each once per replica")
    return sorted(out, key=lambda i: (i.at_s, i.kind, i.replica))
