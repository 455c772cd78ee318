"""Request ids (idempotency keys) the control plane remembers: (tenant, request id) -> what the first call
created (an allocation for Allocate, a workload for Run), with the fingerprint of that call's arguments. Each
is kept for the configured retention (`request_id_retention_seconds`); the durable copy is an etcd key under a
lease that expires with it (`RequestKeyLease`, below).

A retry with the same id and the same fingerprint gets the first call's result; the same id with another
fingerprint is refused (errors.RequestIdReused): an idempotency key names one request, and answering another
request's result would hand the caller something it did not ask for. Keys are per tenant, so one tenant's
id never reaches another tenant's call (and the refusal names neither the earlier arguments nor its result).

The fingerprint is the SHA-256 of the request message's deterministic serialization with the fields that
may legitimately differ on a retry cleared (`fingerprint`): the request id itself and how the caller waits
(Allocate's `no_wait` and `timeout_seconds`: a retry after a timeout may wait longer), never what the call
creates. Proto3 leaves fields at their defaults out of the bytes, so a field added to the message later does
not change the fingerprint of a request that does not set it. Deterministic serialization (fields in number
order, map entries sorted by key) is not promised canonical across protobuf implementations; only the control
plane computes fingerprints, and it compares them with its own.

Durable values: `{"id": ..., "fingerprint": "sha256:..."}` (JSON). A value written before fingerprints were
kept is the bare id; it is accepted as before (a retry gets its result whatever its arguments).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from typing import Callable

from google.protobuf.message import Message

from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)


def fingerprint(msg: Message, *retry_fields: str) -> str:
    """'sha256:<hex>' of `msg` without its `request_id` and `retry_fields` (fields a retry may change)."""
    m = type(msg)()
    m.CopyFrom(msg)
    for name in ("request_id",) + retry_fields:
        m.ClearField(name)
    return "sha256:" + hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()


ALLOCATE_RETRY_FIELDS = ("no_wait", "timeout_seconds")
"""AllocateRequest fields a retry may change: how the caller waits, not what is allocated."""


def allocate_fingerprint(request: Message) -> str:
    """The fingerprint of an AllocateRequest (the SliceService's and the serving actuator's alike, so one
    tenant's ids compare whichever made them); its spec's tenant must be the one the call acts on."""
    return fingerprint(request, *ALLOCATE_RETRY_FIELDS)


def encode(value: str, fp: str) -> bytes:
    """The durable value of a remembered id: the bare id when there is no fingerprint (as before)."""
    return json.dumps({"id": value, "fingerprint": fp}).encode() if fp else value.encode()


def decode(raw: bytes) -> tuple[str, str]:
    """(id, fingerprint) of a durable value; a bare id (written before fingerprints were kept) has none."""
    if raw[:1] == b"{":
        try:
            d = json.loads(raw)
            return str(d["id"]), str(d.get("fingerprint", ""))
        except (ValueError, KeyError, TypeError):
            pass
    return raw.decode(), ""


class RequestIds(dict):
    """A dict of (tenant, request id) -> value whose entries older than `ttl()` seconds are dropped,
    oldest first, whenever one is remembered or looked up; `fingerprints` keeps each entry's fingerprint
    ("" when unknown: an entry read back from a value of the old format)."""

    def __init__(self, ttl: Callable[[], float], call: str = "") -> None:
        super().__init__()
        self.ttl = ttl
        self.call = call                                        # the RPC's name, for the refusal's message
        self.fingerprints: dict[tuple[str, str], str] = {}
        self._times: collections.deque = collections.deque()     # (monotonic time, key), oldest first
        self._at: dict[tuple[str, str], float] = {}             # key -> when it was remembered last

    def _prune(self, now: float) -> None:
        while self._times and now - self._times[0][0] > self.ttl():
            at, key = self._times.popleft()
            if self._at.get(key) == at:          # an older entry of an id remembered again since is not its end
                self.pop(key, None)

    def pop(self, key, *default):
        self.fingerprints.pop(key, None)
        self._at.pop(key, None)
        return super().pop(key, *default)

    def __delitem__(self, key) -> None:
        self.fingerprints.pop(key, None)
        self._at.pop(key, None)
        super().__delitem__(key)

    def clear(self) -> None:
        self.fingerprints.clear()
        self._at.clear()
        self._times.clear()
        super().clear()

    def remember(self, tenant: str, request_id: str, value: str, fp: str = "") -> None:
        now = time.monotonic()
        self[(tenant, request_id)] = value
        self.fingerprints[(tenant, request_id)] = fp
        self._at[(tenant, request_id)] = now
        self._times.append((now, (tenant, request_id)))
        self._prune(now)

    def load(self, tenant: str, request_id: str, raw: bytes) -> None:
        """Remember an id from its durable value (a restart's load, a standby following etcd)."""
        value, fp = decode(raw)
        self.remember(tenant, request_id, value, fp)

    def lookup(self, tenant: str, request_id: str) -> str | None:
        self._prune(time.monotonic())
        return self.get((tenant, request_id))

    def check(self, tenant: str, request_id: str, fp: str) -> str | None:
        """What the id's first call created (None: an unknown id); RequestIdReused when that call's
        fingerprint differs from `fp` (an entry or a call without a fingerprint is not compared)."""
        value = self.lookup(tenant, request_id)
        if value is None:
            return None
        first = self.fingerprints.get((tenant, request_id), "")
        if first and fp and first != fp:
            log(logger, logging.WARNING, "request id reused with other arguments: refused", call=self.call,
                tenant=tenant, request_id=request_id, first_result=value)
            raise errors.RequestIdReused.of(request_id, self.call or "call")
        return value

    def answers(self, tenant: str, request_id: str, fp: str) -> str | None:
        """What a retry of the id with fingerprint `fp` would be answered (its first call's result), without
        refusing or logging: None for an unknown id, or one whose first call had another fingerprint."""
        value = self.lookup(tenant, request_id)
        first = self.fingerprints.get((tenant, request_id), "")
        return None if value is None or (first and fp and first != fp) else value

    def forget(self, tenant: str, request_id: str, value: str) -> None:
        """Drop a failed call's id, unless a concurrent call with the same id owns it now."""
        if request_id and self.get((tenant, request_id)) == value:
            del self[(tenant, request_id)]


LEASE_ROTATE_S = 3600
"""How long one etcd lease serves new request keys before the next is granted (at most a quarter of the TTL)."""


class RequestKeyLease:
    """The etcd lease request keys are written with: granted for the TTL + the rotation and used for the
    rotation, so each key lives between the two (etcd deletes it). One lease per rotation, not one per request.
    `store` and `ttl` are read at each call (the controller's store and its configured retention)."""

    def __init__(self, store: Callable[[], object], ttl: Callable[[], float]) -> None:
        self.store, self.ttl = store, ttl
        self._lease: tuple[int, float] | None = None     # (lease id, when granted: monotonic)

    async def get(self) -> int:
        now = time.monotonic()
        ttl = self.ttl()
        rotate = min(LEASE_ROTATE_S, max(1.0, ttl / 4))
        if self._lease is None or now - self._lease[1] >= rotate:
            try:
                lease = await self.store().grant_lease(int(ttl + rotate))
            except Exception as e:  # noqa: BLE001 - the etcd client's errors
                raise errors.Unavailable(f"etcd: cannot grant the lease for request keys: {e}") from e
            self._lease = (lease, now)
        return self._lease[0]
