"""One streamed OpenAI completion, timed.

`stream_completion` POSTs `/v1/completions` with `stream: true` (httpx, asyncio) and reads the server-sent
events as an OpenAI client does: `data: {json}` chunks, `data: [DONE]` at the end, an `error` object in a
chunk when the stream breaks. It records the time to the first token (the first chunk with text), the end
to end time, the output tokens (the usage the server reports, else the chunks with text: llama.cpp and vLLM
send one token per chunk), the HTTP status and the gateway's headers (`x-gpumesh-served-by`,
`x-gpumesh-degraded`, `x-gpumesh-retries`). It never raises: a refused connection or a timeout is status 0.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    """What one request got."""

    index: int
    target: str = ""
    status: int = 0                 # HTTP status; 0: no answer (connection refused, reset, timeout)
    ok: bool = False                # 2xx and the stream finished without an error event
    error: str = ""
    sent_s: float = 0.0             # when it left, seconds from the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    served_by: str = ""
    degraded: str = ""
    retries: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def answered(self) -> bool:
        return self.status != 0

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _headers(r: Result, resp: httpx.Response) -> None:
    r.status = resp.status_code
    r.served_by = resp.headers.get("x-gpumesh-served-by", "")
    r.degraded = resp.headers.get("x-gpumesh-degraded", "")
    try:
        r.retries = int(resp.headers.get("x-gpumesh-retries", "0") or 0)
    except ValueError:
        r.retries = 0


def _error_text(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        return (err.get("message") if isinstance(err, dict) else str(err)) or body[:200].decode("utf-8", "replace")
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


async def stream_completion(client: httpx.AsyncClient, base_url: str, body: dict, index: int = 0,
                            headers: dict | None = None, started: float | None = None) -> Result:
    """POST `{base_url}/v1/completions` streamed; `started` is the run's start (time.perf_counter())."""
    r = Result(index=index, target=base_url)
    t0 = time.perf_counter()
    r.sent_s = t0 - started if started is not None else 0.0
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=dict(body, stream=True),
                                 headers=headers) as resp:
            _headers(r, resp)
            if resp.status_code // 100 != 2:
                r.error = _error_text(await resp.aread())
                r.e2e_s = time.perf_counter() - t0
                return r
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    r.error = f"a chunk that is not JSON: {data[:80]!r}"
                    break
                if event.get("error"):
                    r.error = _error_text(data.encode())
                    break
                usage = event.get("usage") or usage
                if any((c.get("text") or "") for c in event.get("choices") or []):
                    chunks += 1
                    if r.ttft_s is None:
                        r.ttft_s = time.perf_counter() - t0
            r.e2e_s = time.perf_counter() - t0
            r.output_tokens = int(usage.get("completion_tokens") or chunks) if usage else chunks
            if done and not r.error:
                r.ok = True
                if r.ttft_s is None:            # finished without text (EOS at once): first token = the end
                    r.ttft_s = r.e2e_s
            elif not r.error:
                r.error = "the stream ended without [DONE]"
    except (httpx.HTTPError, OSError) as e:
        r.error = f"{type(e).__name__}: {e}"[:300]
        r.e2e_s = time.perf_counter() - t0
    return r


async def timed_completion(client: httpx.AsyncClient, base_url: str, body: dict,
                           headers: dict | None = None) -> tuple[float, httpx.Response]:
    """A plain (not streamed) completion: its end-to-end seconds and the response."""
    t0 = time.perf_counter()
    resp = await client.post(f"{base_url}/v1/completions", json=body, headers=headers)
    await resp.aread()
    return time.perf_counter() - t0, resp
