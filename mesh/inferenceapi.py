"""The inference part of the SDK: completions from a deployed model through mesh-gateway's gRPC
InferenceService (proto/gpumesh/v1/inference_service.proto; docs/gateway.md), streamed as generated.

    from mesh.inferenceapi import InferenceClient
    with InferenceClient("gateway-host:8090", token=TOKEN) as inf:
        for chunk in inf.generate("chat", prompt="The capital of France is", max_tokens=8):
            print(chunk.text, end="", flush=True)
        # the last chunk carries finish_reason, served_by and the token counts

The gateway routes the request by its policy (docs/gateway.md); `model` is a deployment name or a registry
model name. Errors are the typed `mesh.errors` ones (INVALID_ARGUMENT naming the field, NOT_FOUND,
RESOURCE_EXHAUSTED when the model's queue is full, UNAVAILABLE when no replica answered).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from gpumesh.v1 import inference_service_pb2 as I
from gpumesh.v1 import inference_service_pb2_grpc

PRIORITIES = ("", "critical", "standard", "sheddable")


def generate_request(model: str, *, prompt: str = "", messages: Sequence[tuple[str, str] | dict] | None = None,
                     max_tokens: int = 0, temperature: float = 0.0, seed: int | None = None, priority: str = "",
                     allow_fallback: bool = False) -> I.GenerateRequest:
    """The GenerateRequest, checked here first (InvalidArgument naming the field) so a typo costs no call.
    `messages`: (role, content) pairs or {"role": ..., "content": ...} for a chat completion."""
    from mesh import errors
    if not model:
        raise errors.InvalidArgument.of("model", "is empty", "a deployment or model name")
    if bool(prompt) == bool(messages):
        raise errors.InvalidArgument.of("prompt", "give exactly one of prompt and messages", "a prompt, or messages")
    if max_tokens < 0:
        raise errors.InvalidArgument.of("max_tokens", f"{max_tokens} is negative", "1 up to the context; 0: 16")
    if not 0.0 <= temperature <= 2.0:
        raise errors.InvalidArgument.of("temperature", f"{temperature:g} is outside [0, 2]", "0 to 2")
    if priority not in PRIORITIES:
        raise errors.InvalidArgument.of("priority", f"{priority!r} is not allowed", "critical, standard, sheddable")
    msgs = []
    for i, m in enumerate(messages or []):
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        if role not in ("system", "user", "assistant"):
            raise errors.InvalidArgument.of(f"messages[{i}].role", f"{role!r} is not allowed", "system, user, assistant")
        msgs.append(I.ChatMessage(role=role, content=content))
    return I.GenerateRequest(model=model, prompt=prompt, messages=msgs, max_tokens=max_tokens,
                             temperature=temperature, seed=seed or 0, has_seed=seed is not None, priority=priority,
                             allow_fallback=allow_fallback)


class InferenceClient:
    """A client of one gateway's InferenceService. `token`: a bearer token; `ca`/`cert`/`key`: TLS as for
    MeshClient (TLS when `ca` or `cert` is given)."""

    def __init__(self, gateway: str, *, token: str = "", ca: str = "", cert: str = "", key: str = "",
                 timeout: float | None = 300.0) -> None:
        from mesh.tls import channel_credentials, token_interceptor, warn_plaintext_token
        self.gateway = gateway
        self.timeout = timeout
        if token and not (ca or cert):
            warn_plaintext_token(gateway)
        ch = (grpc.secure_channel(gateway, channel_credentials(ca, cert, key)) if ca or cert
              else grpc.insecure_channel(gateway))
        self._raw = ch
        self._channel = grpc.intercept_channel(ch, token_interceptor(token)) if token else ch
        self._stub = inference_service_pb2_grpc.InferenceServiceStub(self._channel)

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, model: str, **kw: Any) -> Iterator[I.GenerateResponse]:
        """Chunks of the completion as generated (see `generate_request` for the arguments); the last has
        `finish_reason` set. Stopping early (break, close) cancels the request at the gateway."""
        from mesh import richstatus
        call = self._stub.Generate(generate_request(model, **kw), timeout=self.timeout)
        yield from richstatus.stream(call)

    def complete(self, model: str, **kw: Any) -> tuple[str, I.GenerateResponse]:
        """The whole text and the last chunk (finish_reason, served_by, token counts)."""
        text, last = [], I.GenerateResponse()
        for chunk in self.generate(model, **kw):
            text.append(chunk.text)
            last = chunk
        return "".join(text), last


def response_to_dict(text: str, last: I.GenerateResponse) -> dict[str, Any]:
    return {"text": text, "finish_reason": last.finish_reason, "served_by": last.served_by,
            "degraded": last.degraded,
            # None: unknown (a backend that reports no usage in a stream, llama.cpp's)
            "prompt_tokens": last.prompt_tokens if last.HasField("prompt_tokens") else None,
            "completion_tokens": last.completion_tokens}
