"""An open-loop replayer: each request leaves at its arrival time, whether or not the earlier ones finished
(a closed loop would slow down with the server and hide its queueing).

`replay` takes the arrivals, their prompts, and a `pick` function that names the base URL for each request
(one gateway URL, or the direct replicas in turn), and returns one `Result` per arrival. `extra_body` goes into
every request (the bench's `logit_bias` that keeps the end-of-text tokens away, so each request generates
the trace's token count). Timed events
(`at`: seconds -> callable, e.g. a fault injection) run at their times on the same clock. A request still
running `drain_s` seconds after the last arrival is cut and counted as unanswered (status 0).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Awaitable, Callable, Sequence

import httpx

from mesh.loadgen.client import Result, stream_completion
from mesh.loadgen.trace import Arrival

Progress = Callable[[int, int, int, float], None]     # sent, finished, failed, elapsed seconds


def round_robin(urls: Sequence[str]) -> Callable[[Arrival], str]:
    """Client-side round robin over `urls` (the `direct` policy)."""
    cycle = itertools.cycle(list(urls))
    return lambda _a: next(cycle)


async def replay(arrivals: Sequence[Arrival], prompts: Sequence[str], pick: Callable[[Arrival], str], *,
                 model: str, headers: dict | Callable[[str], dict] | None = None,
                 events: Sequence[tuple[float, Callable[[], Awaitable[None]]]] = (),
                 progress: Progress | None = None, drain_s: float = 300.0, request_timeout_s: float = 600.0,
                 temperature: float = 0.0, extra_body: dict | None = None,
                 pins: dict[str, str] | None = None) -> tuple[list[Result], float]:
    """Replay; returns the results (in arrival order) and the wall time from the start to the last answer.
    `headers`: sent with every request, or a function of the picked URL giving them (the `direct` policy: each
    replica's own API key). `pins`: endpoint -> certificate of the replicas sent to directly over TLS
    (mesh/replicahttp.py)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)
    results: list[Result | None] = [None] * len(arrivals)
    finished = failed = 0
    start = time.perf_counter()

    if pins:
        from mesh import replicahttp
        http = replicahttp.client(timeout, limits, pins=pins)
    else:
        http = httpx.AsyncClient(limits=limits, timeout=timeout)
    async with http as client:
        async def one(a: Arrival, prompt: str) -> None:
            nonlocal finished, failed
            body = {"model": model, "prompt": prompt, "max_tokens": a.generated_tokens, "temperature": temperature,
                    **(extra_body or {})}
            url = pick(a)
            r = await stream_completion(client, url, body, index=a.index,
                                        headers=headers(url) if callable(headers) else headers, started=start)
            results[a.index] = r
            finished += 1
            failed += 0 if r.ok else 1

        async def timed(at: float, fn: Callable[[], Awaitable[None]]) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            await fn()

        async def ticker() -> None:
            while True:
                await asyncio.sleep(1.0)
                if progress:
                    progress(sent, finished, failed, time.perf_counter() - start)

        side = [asyncio.create_task(timed(at, fn)) for at, fn in events]
        tick = asyncio.create_task(ticker())
        tasks = []
        sent = 0
        for a, prompt in zip(arrivals, prompts):
            await asyncio.sleep(max(0.0, start + a.at_s - time.perf_counter()))
            tasks.append(asyncio.create_task(one(a, prompt)))
            sent += 1
        done, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
        for t in side:
            if not t.done():
                t.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        tick.cancel()
        if progress:
            progress(sent, finished, failed, wall)
    out = []
    for a, r in zip(arrivals, results):
        out.append(r if r is not None else Result(index=a.index, error=f"no answer within {drain_s:.0f} s of the "
                                                                        "last arrival"))
    return out, wall
