"""Reaching a model server (a deployment's replica) over TLS pinned to its own certificate.

The agent that starts a replica's server makes a fresh self-signed certificate for it (nodeagent/backends/
servertls.py) and reports it with the endpoint (`Workload.endpoint_certificate`, then
`Replica.endpoint_certificate`). Every client of a replica (the gateway, the control plane's readiness probes,
the agent's load scraper, the benches) verifies the server against exactly that certificate: it is the only
trust anchor of the `ssl.SSLContext` (no system roots, no CA of the cluster), and the host name or IP address
of the endpoint must be in its subjectAltName. A host on the path can neither read the traffic (prompts,
answers, the replica's API key) nor answer in the replica's place. An empty certificate means the server
speaks plain HTTP (the agent's `backend_tls` is off: TLS is terminated elsewhere).

Contexts are cached per certificate (loading a PEM and building a context costs about a millisecond, a
handshake needs one): a client's connection pool to a replica stays warm across requests.
"""

from __future__ import annotations

import functools
import ssl
import time

from mesh.tls import TlsError

CONTEXTS_CACHED = 4096
# a replica whose certificate ends within this is rolled (replaced by a new replica, whose server gets a fresh
# one: controlplane/serving/deployments.py), well before clients would refuse it (mesh/tls.py SELF_SIGNED_DAYS)
RENEW_BEFORE_SECONDS = 7 * 86400


def scheme(certificate: str) -> str:
    """The scheme a replica serves: https with a certificate, http without one."""
    return "https" if certificate else "http"


def base_url(endpoint: str, certificate: str) -> str:
    """`scheme://host:port` of a replica's server (`endpoint` as the agent reported it)."""
    return f"{scheme(certificate)}://{endpoint}"


@functools.lru_cache(maxsize=CONTEXTS_CACHED)
def context(certificate: str) -> ssl.SSLContext:
    """A client context that trusts only `certificate` (PEM) and checks the host name or IP address against
    its subjectAltName; cached per certificate. TlsError when it is not a PEM certificate."""
    if "-----BEGIN CERTIFICATE-----" not in certificate:
        raise TlsError("endpoint_certificate: not a PEM certificate (expected '-----BEGIN CERTIFICATE-----')")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=certificate)
    except (ssl.SSLError, ValueError) as e:
        raise TlsError(f"endpoint_certificate: cannot be loaded as a trust anchor: {e}") from None
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def verify(certificate: str) -> ssl.SSLContext | bool:
    """httpx's `verify=` for a replica: its pinned context, or True (unused: plain HTTP) without a certificate."""
    return context(certificate) if certificate else True


@functools.lru_cache(maxsize=CONTEXTS_CACHED)
def expires_at(certificate: str) -> float:
    """When `certificate` (PEM) stops being valid, in seconds since the epoch; 0 when it cannot be read."""
    try:
        from cryptography import x509
        return x509.load_pem_x509_certificate(certificate.encode()).not_valid_after_utc.timestamp()
    except (ValueError, TypeError):
        return 0.0


def expiring(certificate: str, now: float | None = None, within: float = RENEW_BEFORE_SECONDS) -> bool:
    """Whether a replica's `certificate` ends within `within` seconds (or cannot be read): time to replace it.
    False without one (plain HTTP)."""
    if not certificate:
        return False
    return expires_at(certificate) - (time.time() if now is None else now) < within
