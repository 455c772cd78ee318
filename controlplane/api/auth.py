"""Who is calling, and may they: authentication and authorization of every RPC.

A caller is resolved once per RPC (by `AuthInterceptor`) to a `Principal`:

* an **agent**: a verified client certificate with OU=agent; its name (CN) is
  the only node it may speak for;
* a **client**: a verified client certificate with OU=admin|tenant|viewer and
  the tenant in O, or a bearer token (`authorization: Bearer <token>`) that the
  tenants file maps to a name, a tenant and a role.

Each method has one rule (`RULES`; methods not listed need admin). The
principal is then in a context variable for the servicers, which keep tenants to
their own objects with one call: `scope_tenant` for list filters and creation
requests (another tenant's name: PERMISSION_DENIED), `visible`/`check_visible` for
objects (another tenant's ID reads as NOT_FOUND, so existence does not leak).

With `insecure` and no tenants file nothing is checked (the local demo).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import logging
from dataclasses import dataclass, field
from functools import lru_cache

import grpc

from mesh import errors, tls
from mesh.config import ConfigError
from mesh.logs import log

logger = logging.getLogger(__name__)

ROLES = ("viewer", "tenant", "admin")          # in increasing power
QUOTA_KEYS = ("max_slices", "max_memory_bytes", "max_gpus", "max_priority", "max_checkpoint_bytes")
STORE_QUOTA_KEYS = ("max_checkpoint_bytes",)    # the checkpoint store's (controllers/checkpoint_quota.py), not the scheduler's


@dataclass(frozen=True)
class Principal:
    kind: str                 # agent | client | anonymous
    name: str
    tenant: str = ""
    role: str = ""            # clients: viewer | tenant | admin
    unrestricted: bool = False

    @property
    def admin(self) -> bool:
        return self.unrestricted or self.role == "admin"

    def __str__(self) -> str:
        if self.kind == "agent":
            return f"agent {self.name}"
        if self.kind == "client":
            return f"{self.role} {self.name}" + (f" (tenant {self.tenant})" if self.tenant else "")
        return self.name


# Servicers called outside the interceptor (unit tests) act as this.
UNRESTRICTED = Principal("anonymous", "unrestricted", role="admin", unrestricted=True)
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("gpumesh_principal", default=UNRESTRICTED)


def current() -> Principal:
    return _current.get()


# -- the tenants file ------------------------------------------------------------------------

@dataclass
class Tenants:
    """tokens (by SHA-256 of the token) -> principal, and per-tenant quotas."""

    tokens: dict[str, Principal] = field(default_factory=dict)
    quotas: dict[str, dict] = field(default_factory=dict)     # tenant -> {max_slices, ...} (may be empty)
    default_quota: dict = field(default_factory=dict)

    def lookup(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        for known, p in self.tokens.items():        # constant-time per entry
            if hmac.compare_digest(known, digest):
                return p
        return None


def _quota(where: str, q) -> dict:
    from mesh.units import parse_size
    if q is None:
        return {}
    if not isinstance(q, dict):
        raise ConfigError(f"{where}: must be a mapping of {', '.join(QUOTA_KEYS)}")
    out = {}
    for k, v in q.items():
        if k not in QUOTA_KEYS:
            raise ConfigError(f"{where}: unknown quota {k!r} (allowed: {', '.join(QUOTA_KEYS)})")
        try:
            if k in ("max_memory_bytes", "max_checkpoint_bytes"):
                out[k] = parse_size(v)
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{v!r} is not a number >= 0")
            else:
                out[k] = v
        except ValueError as e:
            raise ConfigError(f"{where}.{k}: {e}") from None
    return out


def load_tenants(path: str) -> Tenants:
    """Read and check a tenants file (see docs/security.md); ConfigError names the entry at fault."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"tenants_file: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"tenants_file: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"tenants_file: {path} must hold a mapping (tenants, tokens, default_quota)")
    unknown = set(data) - {"tenants", "tokens", "default_quota"}
    if unknown:
        raise ConfigError(f"tenants_file: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                          f"(allowed: tenants, tokens, default_quota)")
    out = Tenants(default_quota=_quota("tenants_file: default_quota", data.get("default_quota")))
    tenants = data.get("tenants") or {}
    if not isinstance(tenants, dict):
        raise ConfigError("tenants_file: tenants must map tenant names to {quota: {...}}")
    for name, entry in tenants.items():
        if not isinstance(name, str) or not name or len(name) > 128 or "/" in name or not name.isprintable():
            raise ConfigError(f"tenants_file: tenant {name!r} is not a valid name (1-128 printable, no '/')")
        entry = entry or {}
        if not isinstance(entry, dict) or set(entry) - {"quota"}:
            raise ConfigError(f"tenants_file: tenants.{name} may only hold quota")
        out.quotas[name] = _quota(f"tenants_file: tenants.{name}.quota", entry.get("quota"))
    tokens = data.get("tokens") or []
    if not isinstance(tokens, list):
        raise ConfigError("tenants_file: tokens must be a list of {name, role, tenant, token | token_sha256}")
    for i, t in enumerate(tokens):
        where = f"tenants_file: tokens[{i}]"
        if not isinstance(t, dict):
            raise ConfigError(f"{where}: must be a mapping")
        extra = set(t) - {"name", "role", "tenant", "token", "token_sha256"}
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))}")
        name, role, tenant = str(t.get("name") or ""), t.get("role", "tenant"), str(t.get("tenant") or "")
        if not name:
            raise ConfigError(f"{where}: name is required")
        if role not in ROLES + ("agent",):
            raise ConfigError(f"{where} ({name}): role {role!r} is not one of {', '.join(ROLES + ('agent',))}")
        if role == "agent":
            # an agent token: its name is the one node it may speak for (like an agent certificate's CN)
            if tenant:
                raise ConfigError(f"{where} ({name}): an agent token has no tenant")
        elif role != "admin" and tenant not in out.quotas:
            raise ConfigError(f"{where} ({name}): tenant {tenant!r} is not under tenants "
                              f"(known: {', '.join(sorted(out.quotas)) or 'none'})")
        if ("token" in t) == ("token_sha256" in t):
            raise ConfigError(f"{where} ({name}): give exactly one of token, token_sha256")
        if "token" in t:
            token = str(t["token"])
            if len(token) < 16:
                raise ConfigError(f"{where} ({name}): token is shorter than 16 characters")
            digest = hashlib.sha256(token.encode()).hexdigest()
        else:
            digest = str(t["token_sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{where} ({name}): token_sha256 must be 64 hex digits")
        if digest in out.tokens:
            raise ConfigError(f"{where} ({name}): the same token as {out.tokens[digest].name}")
        out.tokens[digest] = Principal("agent", name) if role == "agent" else Principal("client", name, tenant, role)
    return out


def apply_quotas(framework, tenants: Tenants | None) -> None:
    """Hand the tenants file's quotas to the scheduler's TenantQuota plugin (the one place they are enforced)."""
    if tenants is None:
        return
    for plugin in getattr(getattr(framework, "profile", None), "plugins", []):
        if getattr(plugin, "NAME", "") == "TenantQuota":
            sched = {t: {k: v for k, v in q.items() if k not in STORE_QUOTA_KEYS} for t, q in tenants.quotas.items()}
            plugin.tenants.update({t: q for t, q in sched.items() if q})
            default = {k: v for k, v in (tenants.default_quota or {}).items() if k not in STORE_QUOTA_KEYS}
            if default:
                plugin.default = default
            return
    if any(k not in STORE_QUOTA_KEYS for q in [*tenants.quotas.values(), tenants.default_quota or {}] for k in q):
        log(logger, logging.WARNING, "the scheduler profile has no TenantQuota plugin: tenant quotas not enforced")


# -- rules ------------------------------------------------------------------------------------

PUBLIC, AGENT, VIEWER, TENANT, ADMIN = "public", "agent", "viewer", "tenant", "admin"
RULES: dict[str, str] = {
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,
    "/gpumesh.v1.NodeService/Register": AGENT,
    "/gpumesh.v1.NodeService/Heartbeat": AGENT,
    "/gpumesh.v1.NodeService/Sync": AGENT,
    "/gpumesh.v1.SliceService/Allocate": TENANT,
    "/gpumesh.v1.SliceService/Release": TENANT,
    "/gpumesh.v1.SliceService/Get": VIEWER,
    "/gpumesh.v1.SliceService/List": VIEWER,
    "/gpumesh.v1.SliceService/Watch": VIEWER,
    "/gpumesh.v1.WorkloadService/Run": TENANT,
    "/gpumesh.v1.WorkloadService/Stop": TENANT,
    "/gpumesh.v1.WorkloadService/Get": VIEWER,
    "/gpumesh.v1.WorkloadService/List": VIEWER,
    "/gpumesh.v1.WorkloadService/Logs": VIEWER,
    "/gpumesh.v1.MeshService/Connect": TENANT,
    "/gpumesh.v1.MeshService/Get": VIEWER,
    "/gpumesh.v1.MeshService/List": VIEWER,
    "/gpumesh.v1.MeshService/Disconnect": TENANT,
    "/gpumesh.v1.MeshService/Grant": ADMIN,
    "/gpumesh.v1.MeshService/ListGrants": VIEWER,
    "/gpumesh.v1.MigrationService/Migrate": TENANT,
    "/gpumesh.v1.MigrationService/Get": VIEWER,
    "/gpumesh.v1.MigrationService/List": VIEWER,
    "/gpumesh.v1.MigrationService/Watch": VIEWER,
    "/gpumesh.v1.MigrationService/Checkpoint": TENANT,
    "/gpumesh.v1.MigrationService/Restore": TENANT,
    "/gpumesh.v1.MigrationService/ListCheckpoints": VIEWER,
    "/gpumesh.v1.MigrationService/Resize": TENANT,
    "/gpumesh.v1.ModelService/Register": ADMIN,
    "/gpumesh.v1.ModelService/Update": ADMIN,
    "/gpumesh.v1.ModelService/Delete": ADMIN,
    "/gpumesh.v1.ModelService/Get": VIEWER,
    "/gpumesh.v1.ModelService/List": VIEWER,
    "/gpumesh.v1.DeploymentService/Create": TENANT,
    "/gpumesh.v1.DeploymentService/Scale": TENANT,
    "/gpumesh.v1.DeploymentService/Update": TENANT,
    "/gpumesh.v1.DeploymentService/Delete": TENANT,
    "/gpumesh.v1.DeploymentService/SetScaling": TENANT,
    "/gpumesh.v1.DeploymentService/Wake": TENANT,        # the gateway, waking a deployment scaled to zero
    "/gpumesh.v1.DeploymentService/Get": VIEWER,
    "/gpumesh.v1.DeploymentService/List": VIEWER,
    "/gpumesh.v1.DeploymentService/Watch": VIEWER,
    "/gpumesh.v1.EventService/List": VIEWER,
    "/gpumesh.v1.EventService/Watch": VIEWER,
    "/gpumesh.v1.ServingViewService/Watch": VIEWER,
    "/gpumesh.v1.ForecastService/GetForecast": VIEWER,       # a tenant reads only its own series (service.py)
    "/gpumesh.v1.ForecastService/ListSeries": VIEWER,
    "/gpumesh.v1.ForecastService/ListInteractions": VIEWER,  # scoped to the caller's tenant (service.py)
    "/gpumesh.v1.PoolService/Create": ADMIN,
    "/gpumesh.v1.PoolService/Update": ADMIN,
    "/gpumesh.v1.PoolService/Delete": ADMIN,
    "/gpumesh.v1.PoolService/Get": VIEWER,
    "/gpumesh.v1.PoolService/List": VIEWER,
    "/gpumesh.v1.CostService/GetCost": VIEWER,               # a tenant reads only its own tenant's (service.py)
    "/gpumesh.v1.CostService/Recommend": VIEWER,             # apply needs admin (service.py)
    "/gpumesh.v1.AdminService/ListNodes": VIEWER,
    "/gpumesh.v1.AdminService/GetNode": VIEWER,
    "/gpumesh.v1.AdminService/ListGpus": VIEWER,
    "/gpumesh.v1.AdminService/CordonNode": ADMIN,
    "/gpumesh.v1.AdminService/UncordonNode": ADMIN,
    "/gpumesh.v1.AdminService/DrainNode": ADMIN,
    "/gpumesh.v1.AdminService/DeleteNode": ADMIN,
    "/gpumesh.v1.AdminService/GetVersion": VIEWER,         # etcd members for admins only (services.py)
}


def rule_for(method: str) -> str:
    """The rule of a full method name; methods nobody listed need admin (deny by default)."""
    return RULES.get(method, ADMIN)


def denial(rule: str, p: Principal, method: str) -> str | None:
    """Why `p` may not call a method with `rule`, or None when it may."""
    short = method.rsplit("/", 1)[-1]
    if p.unrestricted or rule == PUBLIC:
        return None
    if p.kind == "anonymous":
        # no credentials at all (a plaintext listener with a tenants file): the caller is unidentified, which
        # _admit answers UNAUTHENTICATED, never a missing role
        who = "an agent token or certificate" if rule == AGENT else "a token from the tenants file"
        return (f"{short} needs credentials: send 'authorization: Bearer <token>' ({who}) or connect with a "
                f"client certificate")
    if rule == AGENT:
        # An agent's identity is its certificate (OU=agent, CN=node) or an agent token from the tenants
        # file: never the absence of credentials, which would let anyone speak for any node.
        if p.kind == "agent":
            return None
        return (f"{short} is for node agents (a client certificate with OU=agent, or an agent token from the "
                f"tenants file); {p} is not an agent")
    if p.kind != "client":
        return f"{short} is for clients; {p} may call only NodeService"
    if ROLES.index(p.role) < ROLES.index(rule):
        return f"{short} needs the {rule} role; {p} has {p.role}"
    return None


# -- helpers for the servicers -------------------------------------------------------------------

def visible(tenant: str) -> bool:
    p = current()
    return p.admin or tenant == p.tenant


def check_visible(tenant: str, kind: str, name: str) -> None:
    """NOT_FOUND (same as for an unknown ID) unless the caller may see an object of `tenant`."""
    if not visible(tenant):
        raise errors.NotFound(f"no {kind} {name!r}", kind=kind, name=name)


def scope_tenant(requested: str, field_path: str = "tenant") -> str:
    """The tenant a request acts on: admins get what they asked for (empty: all); others their own,
    and PERMISSION_DENIED when they name another."""
    p = current()
    if p.admin:
        return requested
    if requested and requested != p.tenant:
        raise errors.PermissionDenied(f"{field_path}: {p} may not act on tenant {requested!r}")
    return p.tenant


def check_node(node: str) -> None:
    """An agent speaks only for the node its certificate names."""
    p = current()
    if p.kind == "agent" and node != p.name:
        raise errors.PermissionDenied(f"agent certificate {p.name!r} may not speak for node {node!r}")


# -- the interceptor -------------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def _subject(pem: bytes) -> tls.Subject:
    return tls.subject_of(pem)


class Authenticator:
    """Resolves the caller of an RPC from its verified certificate or its bearer token."""

    def __init__(self, tenants: Tenants | None, insecure: bool) -> None:
        self.tenants = tenants
        self.insecure = insecure
        self.enforce = not (insecure and tenants is None)

    def principal(self, context) -> Principal:
        if not self.enforce:
            return UNRESTRICTED
        pems = context.auth_context().get("x509_pem_cert")
        if pems:
            s = _subject(pems[0])
            if s.kind == "agent":
                return Principal("agent", s.name)
            if s.kind == "client":
                if s.role != "admin" and not s.tenant:
                    # a tenant or viewer certificate without its tenant (O) would be scoped to "", which every
                    # List reads as all tenants; tls.issue never makes one, another issuer of the CA might
                    raise errors.Unauthenticated(f"client certificate {s.name!r}: role {s.role!r} without a tenant "
                                                 f"(the subject's O)")
                if s.role != "admin" and self.tenants is not None and s.tenant not in self.tenants.quotas:
                    raise errors.Unauthenticated(f"client certificate {s.name!r}: tenant {s.tenant!r} is not "
                                                 f"in the tenants file")
                return Principal("client", s.name, s.tenant, s.role)
            raise errors.Unauthenticated(f"certificate {s.name!r} is not an agent or client certificate")
        auth = ""
        for k, v in context.invocation_metadata() or ():
            if k == "authorization":
                auth = v if isinstance(v, str) else v.decode(errors="replace")
        return self.from_authorization(auth)

    def from_authorization(self, auth: str) -> Principal:
        """The caller named by an `authorization` value ("Bearer <token>"; "" for none), with no
        certificate: gRPC metadata, or the web view's HTTP header."""
        if not self.enforce:
            return UNRESTRICTED
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise errors.Unauthenticated("authorization metadata must be 'Bearer <token>'")
            p = self.tenants.lookup(token.strip()) if self.tenants is not None else None
            if p is None:
                raise errors.Unauthenticated("invalid bearer token")
            return p
        if self.insecure:
            # plaintext without a token: may call only the public methods (health, reflection); an
            # agent needs its agent token (denial() refuses anonymous callers everything else)
            return Principal("anonymous", "anonymous (plaintext)")
        raise errors.Unauthenticated("no credentials: send 'authorization: Bearer <token>' or connect with a "
                                     "client certificate")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every RPC before its servicer runs; sets `current()` for it."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.auth = authenticator

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        rule = rule_for(method)
        if handler is None or rule == PUBLIC or not self.auth.enforce:
            return handler
        admit = self._admit

        def wrap_request_iterator(it, context):
            async def checked():
                async for msg in it:
                    hello = getattr(msg, "hello", None) if msg.WhichOneof("kind") == "hello" else None
                    if hello is not None:
                        try:
                            check_node(hello.node_name)
                        except errors.PermissionDenied as e:
                            _count(method, e.code)
                            await context.abort(e.code, e.message)
                    yield msg
            return checked()

        def unary_in(behavior, streaming_out):
            if streaming_out:
                async def gen(request, context):
                    token = _current.set(await admit(method, request, context))
                    try:
                        async for item in behavior(request, context):
                            yield item
                    finally:
                        _current.reset(token)
                return gen

            async def call(request, context):
                token = _current.set(await admit(method, request, context))
                try:
                    return await behavior(request, context)
                finally:
                    _current.reset(token)
            return call

        def stream_in(behavior, streaming_out):
            if streaming_out and inspect.isasyncgenfunction(behavior):
                async def gen(it, context):
                    token = _current.set(await admit(method, None, context))
                    try:
                        async for item in behavior(wrap_request_iterator(it, context), context):
                            yield item
                    finally:
                        _current.reset(token)
                return gen

            async def call(it, context):
                token = _current.set(await admit(method, None, context))
                try:
                    return await behavior(wrap_request_iterator(it, context), context)
                finally:
                    _current.reset(token)
            return call

        kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_in(handler.unary_unary, False), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(unary_in(handler.unary_stream, True), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(stream_in(handler.stream_unary, False), **kw)
        return grpc.stream_stream_rpc_method_handler(stream_in(handler.stream_stream, True), **kw)

    async def _admit(self, method: str, request, context) -> Principal:
        try:
            p = self.auth.principal(context)
        except errors.Unauthenticated as e:
            _count(method, e.code)
            await context.abort(e.code, e.message)
        why = denial(rule_for(method), p, method)
        if why is None and p.kind == "agent" and request is not None and hasattr(request, "node_name"):
            if request.node_name != p.name:
                why = f"agent certificate {p.name!r} may not speak for node {request.node_name!r}"
        if why is not None:
            code = grpc.StatusCode.UNAUTHENTICATED if p.kind == "anonymous" else grpc.StatusCode.PERMISSION_DENIED
            _count(method, code)
            log(logger, logging.WARNING, "unauthenticated" if p.kind == "anonymous" else "permission denied",
                method=method, principal=str(p), reason=why)
            await context.abort(code, why)
        return p


def _count(method: str, code: grpc.StatusCode) -> None:
    from controlplane.api.rpc import count
    count(method, code.name)


__all__ = ["Principal", "Tenants", "load_tenants", "apply_quotas", "Authenticator", "AuthInterceptor", "current",
           "visible", "check_visible", "scope_tenant", "check_node", "RULES", "rule_for", "UNRESTRICTED"]
