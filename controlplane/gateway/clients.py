"""Who is calling the gateway: a bearer token checked against the control plane's tenants file
(controlplane/api/tenantsfile.py reads it; the same tokens work on both). A tenant's token reaches its tenant's
deployments only; an admin's every tenant's. Without a tenants file nothing is checked (the demo)."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.api.tenantsfile import load_tenants
from controlplane.gateway.apierror import APIError


@dataclass(frozen=True)
class Caller:
    name: str
    tenant: str | None          # None: every tenant (admin, or no authentication)


ANONYMOUS = Caller("anonymous", None)


class Clients:
    def __init__(self, tenants_file: str = "") -> None:
        self.tenants = load_tenants(tenants_file) if tenants_file else None

    @property
    def enforced(self) -> bool:
        return self.tenants is not None

    def caller(self, authorization: str | None) -> Caller:
        if self.tenants is None:
            return ANONYMOUS
        if not authorization:
            raise APIError(401, "authorization: missing; send 'Authorization: Bearer <token>' with a token from "
                                "the tenants file", param="authorization", code="missing_token")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "authorization: expected 'Bearer <token>'", param="authorization",
                           code="invalid_token")
        p = self.tenants.lookup(token.strip())
        if p is None:
            raise APIError(401, "authorization: the token is not known", param="authorization", code="invalid_token")
        if p.kind != "client" or p.role not in ("tenant", "admin"):
            raise APIError(403, f"authorization: role {p.role or p.kind!r} may not run inference (allowed: tenant, "
                                f"admin)", param="authorization", code="forbidden")
        return Caller(p.name, None if p.role == "admin" else p.tenant)
