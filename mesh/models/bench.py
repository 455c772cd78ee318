"""Measure a model variant on its real backend (`meshctl model bench`, docs/serving.md "Benchmarking a
variant"): cold start, time to first token, prompt and generation speed.

The backend is started directly as a process on this host (not on a cluster slice), with the command line
and environment the agent would give it (nodeagent/backends `prepare`, so every backend the agent runs can
be measured: llama.cpp, and vLLM through the same function). That measures the backend itself: no scheduler, agent,
shim or isolation in the path, and no cluster needed to run it; on a GPU host the device is the one
`CUDA_VISIBLE_DEVICES` names, as it would be on a slice.

- **Load time** (cold start): from starting the process until it answers `GET /v1/models` with 200 and a
  one-token completion (the control plane's readiness test).
- One **warm-up** request (non-streaming, not measured) that also calibrates the synthetic prompt to
  `prompt_tokens` tokens by the server's own count (`usage.prompt_tokens`).
- `requests` **measured** requests, one at a time, streaming (`stream: true`, server-sent events), each with
  a distinct prompt start so no prefix cache serves it: **TTFT** from sending the request to the first
  chunk carrying text; **generation tokens/s** = (chunks with text - 1) / (last chunk - first chunk), one
  chunk per token as both servers stream; **prompt tokens/s** = prompt tokens / TTFT. The figures are the
  medians over the requests (TTFT also its 95th percentile).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

WORDS = ("river mountain history science music garden winter summer island city market letter window "
         "journey forest ocean planet library engine bridge village harvest thunder lantern meadow").split()


@dataclass
class RequestFigures:
    ttft_seconds: float
    tokens: int
    decode_seconds: float
    tokens_per_second: float
    prompt_tokens_per_second: float


@dataclass
class BenchResult:
    model: str
    variant: str
    backend: str
    gpu_model: str
    artifact: str
    context: int
    requests: int
    prompt_tokens: int
    max_tokens: int
    load_seconds: float
    ttft_seconds: float
    ttft_p95_seconds: float
    tokens_per_second: float
    prompt_tokens_per_second: float
    runs: list[RequestFigures] = field(default_factory=list)
    command: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class BenchError(RuntimeError):
    """The backend could not be started or measured (the message says why, with its last log lines)."""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    xs = sorted(values)
    if not xs:
        return 0.0
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def synthetic_prompt(i: int, words: int) -> str:
    """A prompt of about `words` words whose start differs per request `i` (no prefix-cache reuse)."""
    body = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(max(1, words)))
    return f"Request {i}. Write a long story that uses these words: {body}. Once upon a time"


class Backend:
    """One backend process on this host, built by the agent's command builder for its kind."""

    def __init__(self, kind: str, artifact: str, served_name: str, context: int, concurrency: int = 1,
                 gpu_layers: int = 0, host: str = "127.0.0.1", log_path: str = "", env: dict | None = None) -> None:
        from gpumesh.v1 import types_pb2
        from nodeagent import backends
        # the agent's own preparation of a backend workload: command line, the backend's environment, port
        w = types_pb2.Workload(id="bench", backend=types_pb2.ServingBackend(
            kind=kind, artifact=artifact, served_name=served_name, context=context, concurrency=concurrency,
            gpu_layers=gpu_layers))
        try:
            backends.prepare(w, host, sys.executable)
        except (ValueError, OSError) as e:
            raise BenchError(f"cannot start backend {kind!r} here: {e}") from None
        self.endpoint = w.endpoint
        self.served_name = served_name
        self.argv = list(w.command)
        self.log_path = log_path or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                 f"gpumesh-bench-{w.endpoint.rsplit(':', 1)[1]}.log")
        self.env = {**(env if env is not None else os.environ), **dict(w.env)}
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        self.log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> float:
        """Seconds from start until /v1/models answers and a one-token completion succeeds."""
        import httpx
        deadline = self.started + timeout
        with httpx.Client(timeout=30, trust_env=False) as c:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(f"the backend exited with status {self.proc.returncode} before it was ready; "
                                     f"last log lines:\n{self.tail()}")
                try:
                    if c.get(f"http://{self.endpoint}/v1/models").status_code == 200:
                        r = c.post(f"http://{self.endpoint}/v1/completions",
                                   json={"model": self.served_name, "prompt": "Hello", "max_tokens": 1})
                        if r.status_code == 200 and r.json().get("choices"):
                            return time.monotonic() - self.started
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"the backend was not ready after {timeout:g}s; last log lines:\n{self.tail()}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()


def complete(endpoint: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One non-streaming completion's JSON."""
    import httpx
    r = httpx.post(f"http://{endpoint}/v1/completions", timeout=600, trust_env=False,
                   json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                         "seed": 1})
    if r.status_code != 200:
        raise BenchError(f"completion answered {r.status_code}: {r.text[:300]}")
    return r.json()


def _prompt_tokens(answer: dict) -> int:
    """The server's count of the prompt's tokens (0 when it reports no usage)."""
    return int((answer.get("usage") or {}).get("prompt_tokens") or 0)


def stream(endpoint: str, model: str, prompt: str, max_tokens: int, prompt_tokens: int) -> RequestFigures:
    """One streaming completion, timed: TTFT, tokens, decode speed."""
    import httpx
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": 1,
            "stream": True}
    sent = time.monotonic()
    first = last = 0.0
    tokens = 0
    with httpx.stream("POST", f"http://{endpoint}/v1/completions", json=body, timeout=600, trust_env=False) as r:
        if r.status_code != 200:
            raise BenchError(f"streaming completion answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if any(c.get("text") for c in chunk.get("choices", [])):
                now = time.monotonic()
                if not tokens:
                    first = now
                last = now
                tokens += 1
    if not tokens:
        raise BenchError("the streaming completion returned no text")
    ttft = first - sent
    decode = last - first
    return RequestFigures(ttft_seconds=ttft, tokens=tokens, decode_seconds=decode,
                          tokens_per_second=(tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0,
                          prompt_tokens_per_second=prompt_tokens / ttft if ttft > 0 else 0.0)


def run(model: str, variant: str, kind: str, artifact: str, *, gpu_model: str = "cpu", context: int = 2048,
        requests: int = 5, prompt_tokens: int = 128, max_tokens: int = 64, ready_timeout: float = 600.0,
        gpu_layers: int = 0, env: dict | None = None,
        progress: Callable[[str], None] = lambda _m: None) -> BenchResult:
    """Start the backend, measure it, stop it."""
    if requests < 1 or prompt_tokens < 1 or max_tokens < 2:
        raise ValueError("requests and prompt_tokens must be >= 1, max_tokens >= 2")
    b = Backend(kind, artifact, model, context, gpu_layers=gpu_layers, env=env)
    progress(f"starting {kind} on {b.endpoint}: {' '.join(b.argv)}")
    b.start()
    try:
        load = b.wait_ready(ready_timeout)
        progress(f"ready after {load:.2f}s (cold start); warm-up")
        words = max(1, prompt_tokens)
        got = _prompt_tokens(complete(b.endpoint, model, synthetic_prompt(0, words), 2))
        if got:
            words = max(1, round(words * prompt_tokens / got))          # one calibration step
        prompt_tokens_real = _prompt_tokens(complete(b.endpoint, model, synthetic_prompt(1, words), 2)) or prompt_tokens
        runs = []
        for i in range(requests):
            f = stream(b.endpoint, model, synthetic_prompt(i + 2, words), max_tokens, prompt_tokens_real)
            runs.append(f)
            progress(f"request {i + 1}/{requests}: TTFT {f.ttft_seconds * 1000:.0f} ms, {f.tokens} tokens, "
                     f"{f.tokens_per_second:.1f} tokens/s")
    finally:
        b.stop()
    decode = [r.tokens_per_second for r in runs if r.tokens_per_second > 0]
    ttfts = [r.ttft_seconds for r in runs]
    return BenchResult(
        model=model, variant=variant, backend=kind, gpu_model=gpu_model, artifact=artifact, context=context,
        requests=requests, prompt_tokens=prompt_tokens_real, max_tokens=max_tokens, load_seconds=load,
        ttft_seconds=statistics.median(ttfts), ttft_p95_seconds=percentile(ttfts, 95),
        tokens_per_second=statistics.median(decode) if decode else 0.0,
        prompt_tokens_per_second=statistics.median(r.prompt_tokens_per_second for r in runs),
        runs=runs, command=b.argv)


def measurement(r: BenchResult, note: str = ""):
    """The registry's Measurement (model_service.proto) of a result."""
    from google.protobuf import timestamp_pb2
    from gpumesh.v1 import model_service_pb2 as M
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return M.Measurement(tokens_per_second=r.tokens_per_second, ttft_seconds=r.ttft_seconds,
                         load_seconds=r.load_seconds, measured_at=ts, context=r.context, concurrency=1,
                         note=note[:1000], requests=r.requests, prompt_tokens=r.prompt_tokens,
                         max_tokens=r.max_tokens, ttft_p95_seconds=r.ttft_p95_seconds,
                         prompt_tokens_per_second=r.prompt_tokens_per_second, backend=r.backend)


def local_gpu_model() -> str:
    """The canonical GPU model of this host's first GPU (NVML), or "cpu" without one."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
    except Exception:   # noqa: BLE001 - no NVML, no driver, no GPU
        return "cpu"
    from mesh import gpumodels
    try:
        return gpumodels.get_model(name.decode() if isinstance(name, bytes) else name).name
    except KeyError:
        return "cpu"
