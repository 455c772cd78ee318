"""The tenants file (docs/security.md): the bearer tokens it maps to principals (by their SHA-256), and each
tenant's quotas, which go to the scheduler's TenantQuota plugin and the checkpoint store.

`load_tenants` reads and checks it (ConfigError names the entry at fault); `Tenants.lookup` is the token check
the Authenticator (controlplane/api/auth.py) asks.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field

from controlplane.api.auth import ROLES, Principal
from mesh.config import ConfigError
from mesh.logs import log

logger = logging.getLogger("controlplane.api.auth")

QUOTA_KEYS = ("max_slices", "max_memory_bytes", "max_gpus", "max_priority", "max_checkpoint_bytes")
STORE_QUOTA_KEYS = ("max_checkpoint_bytes",)    # the checkpoint store's (controllers/checkpoint_quota.py), not the scheduler's


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
