"""Per-tenant disk quotas: user quotas on the filesystem of the agent's state directory.

Every tenant runs under its own uid (users.py), so a user quota on that uid bounds everything the tenant
writes on that filesystem: its workloads' directories (`<runner dir>/<id>.d`, their /tmp), and what it
writes through paths the filesystem also holds (/var/tmp when it is there), deleted-but-open files included.
The agent sets the limits (`workload_disk_quota`, `workload_disk_quota_inodes`) when it gives a tenant its
identity, and at every start for all the identities it has; the uids it set limits on are remembered in
STATE_DIR/isolation/disk-quotas.json, so limits of identities it no longer has (a tenant dropped from
`workload_uid_map`), or all of them when the option is turned off, are cleared at the next start.

With the option set the agent does not start on a filesystem without user quota (`check`): a tenant
could otherwise fill the disk every other tenant and the agent write to.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from mesh.config import ConfigError
from mesh.logs import log
from nodeagent.isolation.quotactl import QuotaError, Quotactl, Usage, device_of

logger = logging.getLogger(__name__)


class DiskQuotas:
    def __init__(self, state_dir: str, max_bytes: int, max_inodes: int = 0, ctl: Quotactl | None = None) -> None:
        self.state_dir = state_dir
        self.max_bytes, self.max_inodes = max_bytes, max_inodes
        self.record_file = os.path.join(state_dir, "isolation", "disk-quotas.json")
        self._ctl = ctl
        self._lock = threading.Lock()
        self._applied: set[int] = set()

    @property
    def on(self) -> bool:
        return bool(self.max_bytes or self.max_inodes)

    def ctl(self) -> Quotactl:
        if self._ctl is None:
            os.makedirs(self.state_dir, exist_ok=True)
            self._ctl = Quotactl(device_of(self.state_dir)[0])
        return self._ctl

    def check(self) -> None:
        """ConfigError (the agent does not start) when quotas are on and the state directory's filesystem has
        no user quota enabled, naming the mount option."""
        if not self.on:
            return
        try:
            self.ctl().info()
        except (QuotaError, OSError) as e:
            raise ConfigError(f"workload_disk_quota: the state directory {self.state_dir} cannot hold per-tenant "
                              f"quotas: {e}") from None

    def _recorded(self) -> set[int]:
        try:
            with open(self.record_file, encoding="utf-8") as f:
                return {int(u) for u in json.load(f)}
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, TypeError) as e:
            log(logger, logging.WARNING, "unreadable record of the tenants' disk quotas: only the known "
                "identities' limits are set", path=self.record_file, reason=str(e))
            return set()

    def _save(self, uids: set[int]) -> None:
        os.makedirs(os.path.dirname(self.record_file), mode=0o700, exist_ok=True)
        tmp = self.record_file + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(sorted(uids), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.record_file)

    def apply(self, uid: int) -> None:
        """Set the limits of `uid` (once per agent process; recorded before they are set, so a crash in
        between leaves a limit the next start clears, never an unrecorded one). QuotaError when it fails."""
        if not self.on or uid in self._applied:
            return
        with self._lock:
            if uid in self._applied:
                return
            recorded = self._recorded()
            if uid not in recorded:
                self._save(recorded | {uid})
            self.ctl().set_limits(uid, self.max_bytes, self.max_inodes)
            self._applied.add(uid)

    def sync(self, uids: set[int]) -> None:
        """At start: the limits of every identity the agent has (`uids`) set, those of recorded uids it no longer
        has cleared (all of them when the option is off). A limit that cannot be cleared stays recorded."""
        recorded = self._recorded()
        stale = recorded - (uids if self.on else set())
        keep = set()
        for uid in sorted(stale):
            try:
                self.ctl().set_limits(uid, 0, 0)
                self._applied.discard(uid)
                log(logger, logging.INFO, "cleared the disk quota of an identity the agent no longer gives", uid=uid)
            except (QuotaError, OSError) as e:
                log(logger, logging.WARNING, "could not clear a tenant uid's disk quota", uid=uid, reason=str(e))
                keep.add(uid)
        if self.on:
            for uid in sorted(uids):
                self.apply(uid)       # QuotaError: the agent does not start
        remaining = self._applied | keep
        if remaining:
            self._save(remaining)
        elif os.path.exists(self.record_file):
            os.unlink(self.record_file)

    def usage(self, uid: int) -> Usage:
        return self.ctl().usage(uid)
