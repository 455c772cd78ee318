"""Checks of an OpenAI request body: each problem a 400 naming the field and what is allowed."""

from __future__ import annotations

import json
import math

from controlplane.gateway.apierror import APIError, invalid

ROLES = ("system", "user", "assistant", "tool", "developer")
PRIORITIES = ("critical", "standard", "sheddable")
MAX_TOKENS = 2 ** 31 - 1      # a generation length (int32 in llama.cpp and vLLM); a context, when known, bounds it lower


def parse(raw: bytes) -> dict:
    if not raw:
        raise APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}",
                       code="invalid_json")
    if b"\\u" in raw and b"\\ud" in raw.lower():        # a \uD800-\uDFFF escape: is it a lone surrogate?
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff not in "
                                "a pair): not valid Unicode text", code="invalid_json") from None
    return body


def model_not_found(model) -> APIError:
    """The answer to a request for a model the caller cannot use (none by that name, or deleted while it waited)."""
    return APIError(404, f"model: {show(model)} is not a model you can use (GET /v1/models lists yours)",
                    param="model", code="model_not_found")


def show(v) -> str:
    """A client's value as an error message quotes it: its repr, cut to 40 characters (a 100 KB string or a
    400-digit integer is not sent back whole)."""
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:32]}... ({len(text)} characters)"


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(name, f"{show(v)} is not an integer")
    return v


def _num(body: dict, name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise invalid(name, f"{show(v)} is not a number")
    if not lo <= v <= hi:                   # exact for an integer of any size (no float conversion before)
        raise invalid(name, f"{show(v)} is out of range", f"{lo:g} to {hi:g}")
    return float(v)


def _content(i: int, c) -> None:
    if c is None or isinstance(c, str):
        return
    if isinstance(c, list):
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}].content[{j}]", "must be {\"type\": \"text\", \"text\": string}",
                              "text parts")
        return
    raise invalid(f"messages[{i}].content", f"{type(c).__name__} is not a string or a list of text parts")


COMMON = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
          "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k", "min_p", "repeat_penalty")
CHAT_ONLY = ("messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format")
COMPLETION_ONLY = ("prompt", "logprobs", "echo", "suffix")


def _known(body: dict, chat: bool) -> None:
    """Only the parameters the gateway checks reach a backend (a backend may answer a malformed one with a 500,
    which would count against a healthy replica); null means absent and is dropped."""
    allowed = COMMON + (CHAT_ONLY if chat else COMPLETION_ONLY)
    for k in list(body):
        if k not in allowed:
            raise invalid(str(k)[:64], "is not a supported parameter", ", ".join(sorted(allowed)))
        if body[k] is None:
            del body[k]


def _extras(body: dict, chat: bool) -> None:
    _int_range(body, "top_k", 0, 1000)
    _num(body, "min_p", 0, 1)
    _num(body, "repeat_penalty", 0, 10)
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict) or len(lb) > 300:
            raise invalid("logit_bias", "must be an object of at most 300 token ids to numbers")
        for k, v in lb.items():
            if not (k.isascii() and k.isdigit() and len(k) <= 9) or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise invalid(f"logit_bias[{k[:20]!r}]", "must map a token id (1-9 digits 0-9) to a number",
                              "-100 to 100")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise invalid("user", "must be a string of at most 256 characters")
    if chat:
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise invalid("logprobs", f"{show(lp)} is not a boolean")
        _int_range(body, "top_logprobs", 0, 20)
        rf = body.get("response_format")
        if rf is not None and (not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema")):
            raise invalid("response_format", "must be an object with type", "text, json_object, json_schema")
    else:
        _int_range(body, "logprobs", 0, 5)
        echo = body.get("echo")
        if echo is not None and not isinstance(echo, bool):
            raise invalid("echo", f"{show(echo)} is not a boolean")
        suffix = body.get("suffix")
        if suffix is not None and not isinstance(suffix, str):
            raise invalid("suffix", "must be a string")
    so = body.get("stream_options")
    if so is not None and (set(so) - {"include_usage"} or not isinstance(so.get("include_usage", False), bool)):
        raise invalid("stream_options", "may only hold include_usage (a boolean)")


def _int_range(body: dict, name: str, lo: int, hi: int) -> None:
    v = _int(body, name)
    if v is not None and not lo <= v <= hi:
        raise invalid(name, f"{show(v)} is out of range", f"{lo} to {hi}")


def request(body: dict, chat: bool) -> dict:
    """Check every parameter (unknown ones refused, nulls dropped); return {model, max_tokens, stream}."""
    _known(body, chat)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "is required: a model name from GET /v1/models" if model is None
                      else f"{show(model)} is not a model name (a non-empty string)")
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise invalid("messages", "is required: a non-empty list of {role, content}" if msgs is None
                          else "must be a non-empty list of {role, content}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise invalid(f"messages[{i}]", "must be an object {role, content}")
            if m.get("role") not in ROLES:
                raise invalid(f"messages[{i}].role", f"{show(m.get('role'))} is not a role", ", ".join(ROLES))
            _content(i, m.get("content"))
    else:
        p = body.get("prompt")
        if p is None:
            raise invalid("prompt", "is required: a string")
        if not isinstance(p, str) and not (isinstance(p, list) and len(p) == 1 and isinstance(p[0], str)):
            raise invalid("prompt", f"{type(p).__name__} is not a string (or a list of one string)")
    names = ("max_tokens", "max_completion_tokens")
    max_tokens = None
    for n in names:
        v = _int(body, n)
        if v is not None:
            if not 1 <= v <= MAX_TOKENS:
                raise invalid(n, f"{show(v)} is out of range", f"1 to {MAX_TOKENS} (and below the model's context)")
            max_tokens = v
    _num(body, "temperature", 0, 2)
    _num(body, "top_p", 0, 1)
    _num(body, "presence_penalty", -2, 2)
    _num(body, "frequency_penalty", -2, 2)
    n = _int(body, "n")
    if n is not None and n != 1:
        raise invalid("n", f"{show(n)} is not supported", "1")
    seed = _int(body, "seed")
    if seed is not None and not -1 <= seed < 2 ** 32:
        raise invalid("seed", f"{show(seed)} is out of range", "-1 (random) to 4294967295")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream", f"{show(stream)} is not a boolean")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise invalid("stream_options", "must be an object")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise invalid("stop", "must be a string or a list of at most 4 strings")
    _extras(body, chat)
    return {"model": model, "max_tokens": max_tokens, "stream": bool(stream)}


def check_context(max_tokens: int | None, context: int, field: str = "max_tokens") -> None:
    if max_tokens is not None and context and max_tokens >= context:
        raise invalid(field, f"{max_tokens} is beyond the model's context of {context} tokens",
                      f"1 to {context - 1}")


def priority(header: str | None, default: str, field: str = "x-gpumesh-priority") -> str:
    """The priority class a request names (`field`: the header, or gRPC's `priority`), else `default`."""
    if header is None or header == "":
        return default
    p = header.strip().lower()
    if p not in PRIORITIES:
        raise invalid(field, f"{header[:40]!r} is not a priority class", ", ".join(PRIORITIES))
    return p


def deadline_ms(header: str | None) -> float | None:
    if header is None or header == "":
        return None
    try:
        v = float(header)
    except ValueError:
        v = -1
    if not math.isfinite(v) or v <= 0 or v > 3_600_000:
        raise invalid("x-gpumesh-deadline-ms", f"{show(header)} is not a number of milliseconds", "1 to 3600000")
    return v


def flag(header: str | None, name: str) -> bool | None:
    if header is None or header == "":
        return None
    h = header.strip().lower()
    if h in ("1", "true", "yes", "on"):
        return True
    if h in ("0", "false", "no", "off"):
        return False
    raise invalid(name, f"{show(header)} is not a boolean", "true, false")
