"""Figures of a replay: percentiles, output tokens/s and goodput.

- Percentiles interpolate linearly between the closest ranks (numpy's default), in milliseconds.
- A request is `failed` unless it got a 2xx and its stream ended with `[DONE]` and no error event;
  `unanswered` are those that got no HTTP answer at all (refused, reset, timed out).
- TTFT and time per output token are over the successful requests. Time per output token is
  (end to end - TTFT) / (output tokens - 1), for requests with two or more tokens.
- `output_tokens_per_s` and `goodput_rps` divide by the run's wall time (first send to last answer).
  Goodput counts the successful requests whose TTFT met the SLO (`slo_ttft_ms`).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from mesh.loadgen.client import Result


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q: expected 0..100, got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def summarize(results: Iterable[Result], wall_s: float, slo_ttft_ms: float) -> dict:
    """The per-policy figures of the bench's JSON."""
    rs = list(results)
    ok = [r for r in rs if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [t for t in (r.tpot_s for r in ok) if t is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    tokens = sum(r.output_tokens for r in ok)
    good = sum(1 for r in ok if r.ttft_s is not None and r.ttft_s * 1000 <= slo_ttft_ms)
    by_status: dict[str, int] = {}
    for r in rs:
        key = str(r.status) if r.status else "no-answer"
        by_status[key] = by_status.get(key, 0) + 1
    wall = max(wall_s, 1e-9)
    return {
        "requests": len(rs),
        "succeeded": len(ok),
        "failed": len(rs) - len(ok),
        "unanswered": sum(1 for r in rs if not r.answered),
        "by_status": dict(sorted(by_status.items())),
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "tpot_p50_ms": _ms(percentile(tpot, 50)),
        "e2e_p50_ms": _ms(percentile(e2e, 50)),
        "e2e_p99_ms": _ms(percentile(e2e, 99)),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2),
        "goodput_requests": good,
        "goodput_rps": round(good / wall, 4),
        "retries": sum(r.retries for r in rs),
        "fallbacks": sum(1 for r in rs if r.degraded == "fallback"),
        "queued": sum(1 for r in rs if r.degraded == "queued"),
        "wall_s": round(wall_s, 2),
    }


def overhead(pairs: Iterable[tuple[float, float]]) -> dict:
    """Gateway overhead from (through the gateway, direct) seconds of the same request to the same replica."""
    diffs = [(g - d) for g, d in pairs]
    return {"p50": _ms(percentile(diffs, 50)), "p99": _ms(percentile(diffs, 99)), "pairs": len(diffs)}
