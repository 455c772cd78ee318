"""The per-tenant limit on the bytes a tenant's checkpoints hold in the shared store (the agents'
`checkpoint_dir`): `checkpoint_quota_bytes` for every tenant, `max_checkpoint_bytes` in a tenant's quota in
the tenants file (controlplane/api/tenantsfile.py) for one; 0 is no limit.

Usage is the sum of the tenant's checkpoint records' `bytes` (`/gpumesh/v1/checkpoints/<id>`, what the agent's
receiver stored). `Checkpoint` is refused up front (RESOURCE_EXHAUSTED) when the tenant is at or past its limit;
otherwise the agent is told what is left (MigrationCommand.max_bytes) and its receiver refuses the entry that would
pass it, keeping nothing (mesh/checkpoint/store.py StoreSink). A limited tenant's checkpoints are taken one at a
time (`lock`), so two of them never both get the same remainder.
"""

from __future__ import annotations

import asyncio

from mesh import errors

HINT = ("see its checkpoints with `meshctl get checkpoints`; older ones expire with retention (checkpoints_kept, "
        "retention_seconds), or raise the tenant's max_checkpoint_bytes / checkpoint_quota_bytes")


class CheckpointQuota:
    def __init__(self, default_bytes: int = 0, tenants=None) -> None:
        if isinstance(default_bytes, bool) or not isinstance(default_bytes, int) or default_bytes < 0:
            raise ValueError(f"checkpoint_quota_bytes: {default_bytes!r} (allowed: 0, no limit, or more bytes)")
        self.default = default_bytes
        self.tenants = {t: q["max_checkpoint_bytes"] for t, q in (tenants.quotas if tenants else {}).items()
                        if q and "max_checkpoint_bytes" in q}
        if tenants is not None and "max_checkpoint_bytes" in (tenants.default_quota or {}):
            self.default = tenants.default_quota["max_checkpoint_bytes"]
        self._locks: dict[str, asyncio.Lock] = {}

    def limit(self, tenant: str) -> int:
        return int(self.tenants.get(tenant, self.default))

    @staticmethod
    def usage(checkpoints, tenant: str) -> int:
        return sum(max(0, ck.bytes) for ck in checkpoints.values() if ck.tenant == tenant)

    def lock(self, tenant: str) -> asyncio.Lock | None:
        """One checkpoint at a time for a limited tenant (None: unlimited, no waiting)."""
        if not self.limit(tenant):
            return None
        return self._locks.setdefault(tenant, asyncio.Lock())

    def remaining(self, checkpoints, tenant: str) -> int:
        """What the tenant's next checkpoint may hold (0: no limit); ResourceExhausted when nothing is left."""
        limit = self.limit(tenant)
        if not limit:
            return 0
        used = self.usage(checkpoints, tenant)
        if used >= limit:
            raise errors.ResourceExhausted(
                f"tenant {tenant or 'default'!r}: its checkpoints hold {used} bytes of its {limit}-byte checkpoint "
                f"quota: no room for another checkpoint; {HINT}")
        return limit - used

    def refused(self, tenant: str, message: str) -> errors.ResourceExhausted:
        """The agent's receiver refused the checkpoint past what was left: RESOURCE_EXHAUSTED saying so."""
        return errors.ResourceExhausted(f"tenant {tenant or 'default'!r}, checkpoint quota {self.limit(tenant)} "
                                        f"bytes: {message}; {HINT}")
