"""Who is calling, and may they: the principal of an RPC, the rule of each method, the tenant scoping.

A caller is resolved once per RPC (by the `Authenticator`, which controlplane/api/interceptor.py asks for every
call) to a `Principal`:

* an **agent**: a verified client certificate with OU=agent; its name (CN) is
  the only node it may speak for;
* a **client**: a verified client certificate with OU=admin|tenant|viewer and
  the tenant in O, or a bearer token (`authorization: Bearer <token>`) that the
  tenants file (controlplane/api/tenantsfile.py) maps to a name, a tenant and a role.

Each method has one rule (`RULES`; methods not listed need admin). The
principal is then in a context variable for the servicers, which keep tenants to
their own objects with one call: `scope_tenant` for list filters and creation
requests (another tenant's name: PERMISSION_DENIED), `visible`/`check_visible` for
objects (another tenant's ID reads as NOT_FOUND, so existence does not leak).

With `insecure` and no tenants file nothing is checked (the local demo).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from mesh import errors, tls

if TYPE_CHECKING:
    from controlplane.api.tenantsfile import Tenants

ROLES = ("viewer", "tenant", "admin")          # in increasing power


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


# -- the caller ------------------------------------------------------------------------------------

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
                raise errors.Unauthenticated("authorization must be 'Bearer <token>': the word Bearer, a space, "
                                             "a token from the tenants file")
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


__all__ = ["Principal", "Authenticator", "current", "visible", "check_visible", "scope_tenant", "check_node", "RULES",
           "rule_for", "denial", "UNRESTRICTED"]
