"""Relaying a backend's stream to the client, and resuming it on another replica when it breaks after tokens
were sent (controlplane/gateway/resume.py has the continuation; docs/gateway.md "Resuming a broken stream").

The stream is relayed event by event. When the backend's connection is cut or the stream ends without
[DONE], and both the gateway (`resume_broken_streams`) and its routing policy (`resumes_streams`) allow it,
the request is re-issued on another replica with the text generated so far and the continuation's events are
sent on in the same SSE stream, rewritten to the id, created and model the client already saw. A stream is
resumed at most once: a second break, or a continuation that cannot start, ends it with an error event as
before. Each resume is counted (`gpumesh_gateway_resumed_total`) and named in the request's log line."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import weakref
from dataclasses import dataclass

from controlplane.gateway import metrics as M
from controlplane.gateway import proxy, resume
from controlplane.gateway.admission import Rejected, Slot
from controlplane.gateway.apierror import APIError
from controlplane.gateway.breaker import STATE_VALUE
from controlplane.gateway.policy import RouteContext
from controlplane.gateway.sse import DONE, frame
from mesh.logs import log

logger = logging.getLogger("gateway.requests")


@dataclass
class Plan:
    """What re-issuing the request needs: the request as the client sent it and where it may go."""
    path: str
    body: dict
    chat: bool
    deps: list                  # DeploymentInfo of the pool the request was routed in
    ctx: RouteContext
    prio: str
    allowed: bool               # the gateway and its policy resume broken streams


@dataclass
class Segment:
    """One backend stream of the answer (the first, or the continuation)."""
    stream: proxy.OpenStream
    slot: Slot
    started: float              # when the request to this backend was sent


class StreamRelay:
    def __init__(self, gw, seg: Segment, t, plan: Plan) -> None:
        self.gw, self.t, self.plan = gw, t, plan
        self.first = seg

    async def run(self):
        gw, t = self.gw, self.t
        progress = resume.Progress()
        rewrite = None                       # set once the stream was resumed
        seg = self.first
        first_at = time.monotonic()          # the first event was read when the stream was opened
        events = 0
        while True:
            c, seg_first = seg.slot.candidate, time.monotonic()
            done, broken, cut, n = False, None, False, 0
            try:
                pending = seg.stream.first
                while True:
                    for data in pending:
                        if data == DONE:
                            done = True
                            break
                        out, has_text = _event(data, progress, rewrite, t)
                        n += has_text
                        if out is not None:
                            yield frame(out)
                    if done:
                        break
                    waited = time.monotonic()
                    try:
                        chunk = await seg.stream.chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        t.backend_s += time.monotonic() - waited
                    pending = seg.stream.reader.feed(chunk)
                if not done:
                    broken = "the model server ended the stream without [DONE]"
            except (proxy.httpx.HTTPError, OSError) as e:
                broken = f"{type(e).__name__}: {e}"
                cut = isinstance(e, (proxy.UNREACHABLE, OSError))
            finally:
                # the verdict before the slot is freed (freeing it hands the replica to a waiting request at
                # once, Admission.kick, which must see the circuit this break opened), and all the accounting
                # before the one await: a stream cancelled by its client's disconnect (an anyio cancel scope)
                # is cancelled again at every await, and nothing after it would run
                if broken is None and done:
                    c.stats.ok(c.risk_state)
                elif broken is not None:
                    c.stats.failed(cut, c.risk_state)
                    M.BACKEND_ERRORS.labels(c.replica.deployment, c.key).inc()
                else:                                # the client went away: logged as 499
                    t.status, t.error = 499, "the client closed the stream"
                    M.REQUESTS.labels(t.model, "499").inc()
                    gw._log(t)
                # frees the half-open probe only if this stream took it (not another request's probe)
                seg.slot.release()
                M.CIRCUIT.labels(c.key).set(STATE_VALUE[c.stats.breaker.state])
                await seg.stream.close()
            events += n
            if done:
                tpot = (time.monotonic() - seg_first) / (n - 1) if n > 1 else None
                c.stats.observe(seg_first - seg.started if rewrite else first_at - seg.started, tpot)
                break
            log(logger, logging.WARNING, "stream broke", replica=c.key, endpoint=c.replica.endpoint,
                error=broken, tokens_sent=progress.tokens, circuit=c.stats.breaker.state)
            nxt, why = ((None, "the stream was resumed once already") if rewrite is not None
                        else await self._resume(progress, c.key))
            if nxt is None and why == "complete":
                if not progress.finished:    # cut exactly at the token limit: close the answer as the backend would
                    yield frame(resume.finish_event(progress, self.plan.chat))
                break
            if nxt is None:
                t.status, t.error = 502, broken + (f" (not resumed: {why})" if why else "")
                yield APIError(502, f"the stream broke after tokens were sent: {broken}"
                               + (f"; not resumed: {why}" if why else ""), code="stream_broken").sse()
                break
            seg, rewrite = nxt, resume.Rewriter(progress)
        yield frame(DONE)
        tokens = max(t.tokens_out, events)
        t.tokens_out = tokens
        e2e = time.monotonic() - self.first.started
        tpot = (time.monotonic() - first_at) / (tokens - 1) if tokens > 1 else None
        gw._measure(t, seg.slot.candidate, e2e, first_at - self.first.started, tpot)
        M.REQUESTS.labels(t.model, str(t.status)).inc()
        gw._log(t)

    async def _resume(self, p: resume.Progress, broken_key: str) -> tuple[Segment | None, str]:
        """The continuation's stream on another replica, or (None, why not); (None, 'complete') when the client
        already has the whole answer (the break came after the last token)."""
        gw, t, plan = self.gw, self.t, self.plan
        if not plan.allowed:
            return None, ""
        if p.finished:
            return None, "complete"
        deps = plan.deps
        if plan.chat:
            deps = [d for d in deps if d.backend in resume.CONTINUE_BACKENDS]
        why = resume.why_not(plan.chat, plan.body, {d.backend for d in plan.deps})
        if why:
            M.RESUMED.labels(t.model, "refused").inc()
            return None, why
        body = resume.continuation(plan.body, plan.chat, p)
        if body is None:
            return None, "complete"
        exclude = {broken_key}
        for attempt in range(2):            # a continuation that fails before its first event is retried once
            ctx = dataclasses.replace(plan.ctx, model=",".join(sorted(d.name for d in deps)),
                                      exclude=plan.ctx.exclude | frozenset(exclude))
            if not any(c.key not in ctx.exclude and c.replica.ready for c in gw.candidates(deps)):
                M.RESUMED.labels(t.model, "failed").inc()
                return None, "no other replica to continue on"
            try:
                # the continuation goes before the requests of its class waiting now: it was admitted first,
                # and its client is already reading the answer
                slot = await gw.admission.acquire(lambda: gw.candidates(deps), ctx, plan.prio,
                                                  gw.cfg.queue_timeout_seconds, first_in_class=True,
                                                  live=lambda: gw.serves(deps))
            except Rejected as e:
                M.RESUMED.labels(t.model, "failed").inc()
                return None, f"no replica took the continuation: {e}"
            c = slot.candidate
            dep = next((d for d in deps if d.name == c.replica.deployment), deps[0])
            data = json.dumps(dict(body, model=gw.view.deployments.get(dep.name, dep).model)).encode()
            started = time.monotonic()
            try:
                s = await proxy.open_stream(gw.http, c.replica.endpoint, plan.path, data, c.replica.api_key,
                                            c.replica.certificate)
            except proxy.BackendFailed as e:
                gw._failed(slot, e)
                exclude.add(c.key)
                continue
            except APIError as e:
                slot.release()              # frees its own half-open probe, if it took one
                M.RESUMED.labels(t.model, "failed").inc()
                return None, f"{c.key} refused the continuation: {e.message}"
            except BaseException:
                slot.release()              # frees its own half-open probe, if it took one
                raise
            M.RESUMED.labels(t.model, "resumed").inc()
            t.resumed = c.key
            t.replica = f"{t.replica}->{c.key}"
            t.why = f"{t.why}; resumed on {c.key} after {p.tokens} tokens ({slot.why})"
            log(logger, logging.INFO, "stream resumed", model=t.model, replica=c.key, tokens_sent=p.tokens,
                queued_ms=round(slot.waited * 1000, 1), why=slot.why)
            return Segment(s, slot, started), ""
        M.RESUMED.labels(t.model, "failed").inc()
        return None, "the continuation failed before its first token twice"


_closing: set = set()       # closes of abandoned backend streams (the loop holds a task only weakly)


def release_if_never_started(relay, seg: Segment) -> None:
    """A stream the server never starts (its client left between the answer and its first read) never runs its
    finally: when the generator is dropped, its slot is released and the backend's response closed. Left
    open, that connection stayed taken for good (max_connections) and the backend kept generating into it,
    its slot busy, until the socket's buffers filled and it blocked."""
    weakref.finalize(relay, _abandoned, seg.slot, seg.stream).atexit = False


def _abandoned(slot: Slot, stream) -> None:
    slot.release()
    if stream.closed:              # the relay ran and closed it (the usual end)
        return
    try:
        task = asyncio.get_running_loop().create_task(stream.close())
    except RuntimeError:           # no running loop: the process is ending, its sockets with it
        return
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _event(data: bytes, p: resume.Progress, rewrite, t) -> tuple[bytes | None, int]:
    """(the event to send or None, 1 when it carries generated text); takes the usage when the backend
    sends it. The first part's events pass unchanged; a continuation's are rewritten."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data, 0
    if not isinstance(doc, dict):
        return data, 0
    if rewrite is None:
        before = p.tokens
        p.see(doc)
        out, has_text = data, int(p.tokens > before)
    else:
        has_text = int(any(resume.text_of(ch) for ch in doc.get("choices") or () if isinstance(ch, dict)))
        out = rewrite(doc)              # rewrites doc in place (its usage counts the whole answer)
    u = doc.get("usage")
    if isinstance(u, dict):
        t.tokens_in = int(u.get("prompt_tokens") or t.tokens_in)
        t.tokens_out = int(u.get("completion_tokens") or t.tokens_out)
    return out, has_text


def count_event(data: bytes, t) -> int:
    """1 when the event carries generated text (takes the usage when the backend sends it)."""
    return _event(data, resume.Progress(), None, t)[1]
