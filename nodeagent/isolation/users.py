"""Which unprivileged user and group a tenant's workloads run as.

A configured mapping (`tenant=uid[:gid]`) wins; other tenants get ids allocated from a
configured range, once, and remembered in a file of the agent's state directory (root-only),
so the same tenant keeps its ids across agent restarts. An id is never 0, never the agent's own
uid/gid, and never one the host's user or group database already gives to an account or a group (the
allocated gid is the uid).
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import threading
from dataclasses import dataclass

from mesh.config import ConfigError


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int


def parse_range(text: str, name: str = "workload_uid_range") -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-", 1))
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not FIRST-LAST (e.g. 200000-265535)") from None
    if not 0 < lo <= hi < 2 ** 32 - 1:
        raise ConfigError(f"{name}: {text!r} must be within 1..4294967294 with FIRST <= LAST")
    return lo, hi


def parse_map(text: str, name: str = "workload_uid_map") -> dict[str, Identity]:
    """`tenant=uid[:gid],tenant2=uid2` -> {tenant: Identity}."""
    out: dict[str, Identity] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        tenant, _, ids = part.partition("=")
        uid_s, _, gid_s = ids.partition(":")
        try:
            uid = int(uid_s)
            gid = int(gid_s) if gid_s else uid
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not TENANT=UID[:GID]") from None
        if not tenant or uid <= 0 or gid <= 0:
            raise ConfigError(f"{name}: {part!r}: a tenant name and ids > 0 are needed (never root)")
        out[tenant.strip()] = Identity(uid, gid)
    return out


class IdentityError(RuntimeError):
    """No unprivileged identity can be given to a tenant."""


class TenantUsers:
    def __init__(self, id_range: tuple[int, int], mapping: dict[str, Identity], state_file: str,
                 agent_uid: int | None = None, agent_gid: int | None = None) -> None:
        self.lo, self.hi = id_range
        self.mapping = dict(mapping)
        self.state_file = state_file
        self.agent_ids = {os.getuid() if agent_uid is None else agent_uid,
                          os.getgid() if agent_gid is None else agent_gid, 0}
        self._lock = threading.Lock()
        self.quotas = None          # DiskQuotas (diskquota.py): the limits set on each identity given out
        for tenant, ident in self.mapping.items():
            if {ident.uid, ident.gid} & self.agent_ids:
                raise ConfigError(f"workload_uid_map: tenant {tenant!r} would run as root or as the agent's "
                                  f"own user/group ({ident.uid}:{ident.gid})")

    def _load(self) -> dict[str, int]:
        try:
            with open(self.state_file, encoding="utf-8") as f:
                return {str(k): int(v) for k, v in json.load(f).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise IdentityError(f"cannot read the tenant id allocations {self.state_file}: {e}") from None

    def _save(self, doc: dict[str, int]) -> None:
        os.makedirs(os.path.dirname(self.state_file), mode=0o700, exist_ok=True)
        tmp = self.state_file + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    @staticmethod
    def _taken_by_account(uid: int) -> bool:
        """Whether the host's user database has an account with this uid or its group database a group with
        this gid (an allocated tenant's gid is its uid: it would run in that group, e.g. shadow or docker)."""
        for lookup in (pwd.getpwuid, grp.getgrgid):
            try:
                lookup(uid)
                return True
            except KeyError:
                pass
        return False

    def known(self) -> dict[str, Identity]:
        """Every identity this node has: the mapped ones and those allocated so far."""
        with self._lock:
            doc = self._load()
        return {**{t: Identity(u, u) for t, u in doc.items()}, **self.mapping}

    def identity(self, tenant: str) -> Identity:
        """The tenant's ids (allocated on first use), with the tenants' disk quota set on the uid."""
        ident = self._identity(tenant)
        if self.quotas is not None:
            try:
                self.quotas.apply(ident.uid)
            except OSError as e:
                raise IdentityError(f"tenant {tenant!r}: its disk quota is not set, so it gets no workload: "
                                    f"{e}") from None
        return ident

    def _identity(self, tenant: str) -> Identity:
        if not tenant:
            raise IdentityError("the workload has no tenant: no identity to run it under")
        if tenant in self.mapping:
            return self.mapping[tenant]
        with self._lock:
            doc = self._load()
            if tenant in doc:
                return Identity(doc[tenant], doc[tenant])
            used = set(doc.values()) | {i.uid for i in self.mapping.values()} | self.agent_ids
            # start at a hash of the tenant's name: nodes that allocate on their own usually agree
            # (a transparent migration needs the same uid on both ends; a map guarantees it)
            span = self.hi - self.lo + 1
            first = int.from_bytes(hashlib.sha256(tenant.encode()).digest()[:8], "big") % span
            for k in range(span):
                uid = self.lo + (first + k) % span
                if uid not in used and not self._taken_by_account(uid):
                    doc[tenant] = uid
                    self._save(doc)
                    return Identity(uid, uid)
        raise IdentityError(f"workload_uid_range {self.lo}-{self.hi} is exhausted ({len(doc)} tenants hold ids "
                            "on this node): widen it or map the tenant in workload_uid_map")
