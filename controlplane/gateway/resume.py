"""Resuming a stream that broke after tokens were sent: what the client has seen so far (`Progress`), the
request that continues it on another replica (`continuation`), and the continuation's events rewritten so
that the client reads one stream (`Rewriter`). No I/O here; `relay.py` does the streaming.

A completion (`/v1/completions`) continues as the same request with the generated text appended to the
prompt and `max_tokens` reduced by the tokens already sent; every backend can do that. A chat completion
continues only on a backend that can continue the final assistant message: vLLM's
`continue_final_message: true, add_generation_prompt: false`. llama-cpp-python's server (0.3.x) has no such
option (its chat handler always adds the generation prompt), so a chat stream on llama.cpp keeps today's
error event. Tokens are counted as the events that carried text (llama.cpp and vLLM send one token per
event); the continuation's prompt is re-tokenized, so the total can differ from an unbroken answer's by a
token at the seam."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

DEFAULT_COMPLETION_TOKENS = 16          # OpenAI's (and llama.cpp's, vLLM's) max_tokens for /v1/completions
CONTINUE_BACKENDS = {"vllm"}            # backends whose chat API continues the final assistant message


@dataclass
class Progress:
    """What the client has read of the stream: the fields it saw, the text, the text-bearing events."""
    id: str | None = None
    created: int | None = None
    model: str | None = None
    object: str | None = None
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int | None = None      # from a usage the first part sent (vLLM's continuous usage)
    finished: bool = False                # a choice carried finish_reason: the answer is complete

    def see(self, doc: dict) -> None:
        """Take one event of the first part (already sent to the client)."""
        if self.id is None:
            self.id, self.created = doc.get("id"), doc.get("created")
            self.model, self.object = doc.get("model"), doc.get("object")
        u = doc.get("usage")
        if isinstance(u, dict) and u.get("prompt_tokens") is not None:
            self.prompt_tokens = _int(u.get("prompt_tokens"))
        for ch in doc.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            piece = text_of(ch)
            if piece:
                self.text.append(piece)
                self.tokens += 1
            if ch.get("finish_reason"):
                self.finished = True


def text_of(ch: dict) -> str:
    if isinstance(ch.get("text"), str):
        return ch["text"]
    delta = ch.get("delta")
    if isinstance(delta, dict) and isinstance(delta.get("content"), str):
        return delta["content"]
    return ""


def _int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def why_not(chat: bool, body: dict, backends: set[str]) -> str:
    """Why this request cannot be continued on any of `backends` ('' when it can)."""
    if chat:
        if not backends & CONTINUE_BACKENDS:
            return (f"a chat stream continues only on {', '.join(sorted(CONTINUE_BACKENDS))} "
                    f"(continue_final_message); the model's replicas run {', '.join(sorted(backends))}")
        if body.get("continue_final_message") or body.get("echo"):
            return "the request already continues a message"
        return ""
    if not isinstance(body.get("prompt"), str):
        return "only a text prompt can be continued (not token ids or a list of prompts)"
    if body.get("echo"):
        return "echo: the continuation would echo the generated text again"
    if body.get("suffix"):
        return "suffix: an insertion cannot be continued"
    return ""


def continuation(body: dict, chat: bool, p: Progress) -> dict | None:
    """The request that generates the rest of the answer (None: nothing is left to generate)."""
    generated = "".join(p.text)
    out = dict(body)
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    limit = body.get(key)
    if limit is None and not chat:
        limit = DEFAULT_COMPLETION_TOKENS
    if limit is not None:
        left = int(limit) - p.tokens
        if left < 1:
            return None
        out[key] = left
    if chat:
        out["messages"] = list(body["messages"]) + [{"role": "assistant", "content": generated}]
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
    else:
        out["prompt"] = body["prompt"] + generated
    return out


def finish_event(p: Progress, chat: bool) -> bytes:
    """The closing event of an answer cut exactly at its token limit (nothing left to continue)."""
    choice = ({"index": 0, "delta": {}, "finish_reason": "length"} if chat
              else {"index": 0, "text": "", "finish_reason": "length"})
    doc = {"id": p.id, "object": p.object or ("chat.completion.chunk" if chat else "text_completion"),
           "created": p.created, "model": p.model, "choices": [choice]}
    return json.dumps(doc, separators=(",", ":")).encode()


class Rewriter:
    """The continuation's events as parts of the stream the client is reading: its id, created and model;
    no second role delta; usage counting the whole answer (the original prompt, every generated token)."""

    def __init__(self, p: Progress) -> None:
        self.p = p
        self.before = p.tokens
        self.prompt = p.prompt_tokens

    def __call__(self, doc: dict) -> bytes | None:
        """The event to send, or None when nothing is left in it to send."""
        p = self.p
        for k in ("id", "created", "model", "object"):
            if getattr(p, k) is not None and k in doc:
                doc[k] = getattr(p, k)
        keep = False
        for ch in doc.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            delta = ch.get("delta")
            if isinstance(delta, dict):
                delta.pop("role", None)
            if text_of(ch) or ch.get("finish_reason") or ch.get("logprobs"):
                keep = True
        u = doc.get("usage")
        if isinstance(u, dict):
            keep = True
            completion = self.before + _int(u.get("completion_tokens"))
            prompt = self.prompt if self.prompt is not None else max(
                _int(u.get("prompt_tokens")) - self.before, 0)
            doc["usage"] = dict(u, prompt_tokens=prompt, completion_tokens=completion,
                                total_tokens=prompt + completion)
        if not keep:
            return None
        return json.dumps(doc, separators=(",", ":")).encode()
