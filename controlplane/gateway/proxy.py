"""Talking to a replica's backend over HTTPS (httpx, one pooled async client): a whole answer, or a stream
whose first event is read before the client sees anything (so a failure before the first token can be
retried on another replica). Each request carries the replica's API key (`authorization: Bearer`), which
the gateway has from its serving view, and is pinned to the replica's own certificate (the view's
`endpoint_certificate`): the client's PinnedTransport keeps one connection pool per replica and certificate
(mesh/replicahttp.py), so a server presenting another certificate is refused before anything is sent, and
the pool's connections stay alive between requests as they did over plain HTTP; the pools of replicas that
left the view are closed (Gateway._on_view: `retain`), idle ones swept. A replica without a
certificate (its agent's backend_tls is off) is reached over plain HTTP."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx

from controlplane.gateway.apierror import APIError
from mesh import replicahttp, replicatls
from controlplane.gateway.sse import DONE, EventReader


class BackendFailed(Exception):
    """The replica failed before sending a token (connection refused or cut, 5xx, timeout): retryable.
    `unreachable`: the connection was refused, reset or closed without an answer (the process is gone or
    going): the replica's circuit opens at once."""

    def __init__(self, why: str, unreachable: bool = False) -> None:
        super().__init__(why)
        self.unreachable = unreachable


# connection refused, reset, or closed before an answer: what a killed backend looks like
UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
               httpx.RemoteProtocolError)


def failed(e: httpx.HTTPError) -> BackendFailed:
    return BackendFailed(f"{type(e).__name__}: {e}", isinstance(e, UNREACHABLE))


def _error_of(status: int, body: bytes) -> APIError:
    """A backend's 4xx as an OpenAI error (its own message when it sent OpenAI's shape)."""
    try:
        doc = json.loads(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return APIError(status, str(err["message"]), param=err.get("param"), code=err.get("code"))
        if isinstance(doc, dict) and doc.get("detail"):
            return APIError(status, f"the model server refused the request: {doc['detail']}")
    except ValueError:
        pass
    return APIError(status, f"the model server refused the request ({status}): {body[:300].decode(errors='replace')}")


def _refused(status: int, body: bytes, headers=None) -> Exception:
    """A backend's non-200 answer: 5xx, and a 401/403 (the gateway's key for the replica is missing or stale,
    not the client's fault), fail the replica (retried elsewhere, else 502); another 4xx is the request's (a
    429 with the backend's Retry-After, else 1 s: every 429 the gateway answers says when to come back)."""
    if status == 429:
        e = _error_of(status, body)
        after = (headers or {}).get("retry-after", "")
        e.headers = {**e.headers, "retry-after": after if after.isdigit() else "1"}
        return e
    if status >= 500:
        return BackendFailed(f"HTTP {status}: {body[:200].decode(errors='replace')}")
    if status in (401, 403):
        return BackendFailed(f"HTTP {status}: the model server refused the gateway's key for it (the gateway "
                             "reads replica keys from the serving view, which carries them only to admins)")
    return _error_of(status, body)


LIMITS = httpx.Limits(max_connections=4096, max_keepalive_connections=512)   # all replicas together


def make_transport() -> replicahttp.PinnedTransport:
    """The replicas' pools, which the gateway keeps to close those of replicas that left its view."""
    return replicahttp.PinnedTransport(LIMITS)


def make_client(timeout: float, transport: replicahttp.PinnedTransport | None = None) -> httpx.AsyncClient:
    return replicahttp.client(httpx.Timeout(timeout, connect=5.0), LIMITS, transport=transport)


def headers_for(api_key: str, **more: str) -> dict[str, str]:
    """The request headers to a replica: its API key (controlplane/serving/replicakeys.py), when it has one."""
    out = {"content-type": "application/json", **more}
    if api_key:
        out["authorization"] = f"Bearer {api_key}"
    return out


async def complete(client: httpx.AsyncClient, endpoint: str, path: str, data: bytes, api_key: str = "",
                   certificate: str = "") -> bytes:
    try:
        r = await client.post(replicatls.base_url(endpoint, certificate) + path, content=data,
                              headers=headers_for(api_key), extensions=replicahttp.request_extensions(certificate))
    except httpx.HTTPError as e:
        raise failed(e) from None
    if r.status_code != 200:
        raise _refused(r.status_code, r.content, r.headers)
    return r.content


@dataclass
class OpenStream:
    response: httpx.Response
    chunks: object                      # the byte iterator
    reader: EventReader
    first: list[bytes] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return self.response.is_closed

    async def close(self) -> None:
        await self.response.aclose()


async def open_stream(client: httpx.AsyncClient, endpoint: str, path: str, data: bytes,
                      api_key: str = "", certificate: str = "") -> OpenStream:
    """Send the request and read up to the first event; BackendFailed if it fails before one arrives."""
    req = client.build_request("POST", replicatls.base_url(endpoint, certificate) + path, content=data,
                               headers=headers_for(api_key, accept="text/event-stream"),
                               extensions=replicahttp.request_extensions(certificate))
    try:
        resp = await client.send(req, stream=True)
    except httpx.HTTPError as e:
        raise failed(e) from None
    try:
        if resp.status_code != 200:
            raise _refused(resp.status_code, await resp.aread(), resp.headers)
        s = OpenStream(resp, resp.aiter_raw(), EventReader())
        while not s.first:
            try:
                chunk = await s.chunks.__anext__()
            except StopAsyncIteration:
                raise BackendFailed("the stream ended before its first event") from None
            s.first = s.reader.feed(chunk)
        if s.first[0] == DONE:
            pass
        return s
    except httpx.HTTPError as e:
        await resp.aclose()
        raise failed(e) from None
    except BaseException:
        await resp.aclose()
        raise
