"""The operations and preconditions of one etcd transaction (`EtcdStore.commit`, the group-commit `Writer`), and
a snapshot of a prefix as `EtcdStore.load` reads it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Put:
    key: bytes
    value: bytes
    lease: int | None = None


@dataclasses.dataclass
class Delete:
    key: bytes


@dataclasses.dataclass
class Absent:
    """Precondition: the key does not exist."""
    key: bytes


@dataclasses.dataclass
class Present:
    """Precondition: the key exists."""
    key: bytes


@dataclasses.dataclass
class Revision:
    """Precondition: the key's mod revision is `mod_revision` (0: the key does not exist), i.e. nothing wrote it
    since it was read or written at that revision. A record changed by read-modify-write carries it, so a write
    computed from an older copy (a node's late status report) fails instead of undoing a newer one."""
    key: bytes
    mod_revision: int


@dataclasses.dataclass
class Snapshot:
    revision: int
    kvs: dict[bytes, tuple[bytes, int, int]]  # key -> (value, mod_revision, lease)
