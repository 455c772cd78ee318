"""Same-host shared memory: registered buffers are POSIX shared memory segments.

It stands in for NVLink peer access between slices of one host: a peer maps
the owner's segment and reads and writes it with plain memory copies. The
segment starts with a 64-byte header (magic, rkey, state, length, owner pid,
secret tag, owner tag);
attaching checks the magic and the rkey, and every operation re-checks the
state word and the owner, so a deregistered buffer (state REVOKED, key
zeroed, segment unlinked) or a dead owner fails with a typed error. Bounds
are checked before every copy: nothing is written outside the region.

A buffer registered for a mesh connection also carries a 16-byte tag derived
from the connection's secret (HMAC-SHA256 of the segment name): attaching it
needs that secret, not only the rkey that viewers of the connection can see.
The tag is not the secret; what keeps a process from mapping the segment file
raw is the file's mode (0600, the agent's user) and the workload's private
/dev/shm, into which only its own slice's segments are bound.

Two-sided send/recv go through the owner's TCP data plane (`endpoint`), the
one-sided path never does.

A segment outlives the process that created it (the agent): it is not left to
Python's resource tracker, which would unlink it when the agent dies, and it
is only unlinked on revocation. A restarted agent re-adopts it
(`ShmRegion.reopen`: same bytes, same key, its own pid in the header) and
peers that had it mapped go on: the owner pid is re-read on every operation.

An agent's segment also names its owner in its last 8 header bytes: a tag of
the agent's node and state directory (`owner_tag`). A segment's name says
which connection and slice it serves, not which agent made it, and several
agents may share a host (a local cluster); the tag is what lets a starting
agent find the segments a killed run of its own left behind that no record
names (nodeagent/meshsweep.py) and leave every other agent's alone.

The segment is its tenant's file (linked into the slice's private /dev/shm),
so it can be shrunk or its header overwritten under anyone who maps it. The
owner's side (`ShmRegion`, the agent) never loads or stores through its
mapping: the header goes through the segment's descriptor (`pread`/`pwrite`)
and the data plane copies with system calls (mesh.transport.segment), so a
shrunk segment is a `BufferDamaged` error on that buffer, never a SIGBUS in the
agent. A peer (`ShmConnection`) re-reads the header with `pread` and checks the
file's size before every copy, then copies through its mapping (memcpy speed):
a shrink before the operation is a typed error; one that races the copy can
still fault the peer's own process. With workload isolation only the slice's
own processes map its segment (docs/security.md), so that is the tenant's own
process.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import secrets
import struct
import threading
import _posixshmem
from multiprocessing import resource_tracker, shared_memory

from mesh.procs import pid_alive
from mesh.transport.base import (BufferDamaged, BufferDescriptor, InvalidKey, NotAuthorized, PeerGone, Revoked,
                                 TransportError, Unsupported, check_bounds, new_key)
from mesh.transport.segment import HEADER_BYTES, Segment

MAGIC = b"GPUMESH1"
HEADER = struct.Struct("<8sQQQQ")      # magic, rkey, state, length, owner pid
TAG = struct.Struct("<16s")            # at offset HEADER.size: the secret's tag (zero: no secret)
NO_TAG = bytes(16)
HEAD = HEADER.size + TAG.size          # the header bytes read back by peers
OWNER = struct.Struct("<8s")           # at offset HEAD: the owning agent's tag (owner_tag; zero: none)
NO_OWNER = bytes(8)
PID_MAX = 1 << 22                      # the kernel's largest pid_max
ACTIVE, REVOKED = 1, 2
PREFIX = "gpumesh-"
_OWNED: set[str] = set()      # segments this process owns (created or re-adopted)


def secret_tag(secret: bytes, name: str) -> bytes:
    return hmac.new(secret, b"gpumesh-shm-v1|" + name.encode(), hashlib.sha256).digest()[:16]


def owner_tag(node: str, state_dir: str = "") -> bytes:
    """The 8 bytes that say which agent a segment belongs to: its node and the directory of its buffer
    records (resolved: two spellings of one directory are one owner). Not a secret: it tells a starting agent
    its own leftovers from another agent's segments on the same host."""
    where = os.path.realpath(state_dir) if state_dir else ""
    return hashlib.sha256(f"gpumesh-shm-owner-v1|{node}|{where}".encode()).digest()[:8]


class ShmRegion:
    """The owner's side of one segment."""

    def __init__(self, buffer_id: str, length: int, rkey: int, secret: bytes = b"", *,
                 outlive_process: bool = False, owner: bytes = b"") -> None:
        """`outlive_process`: the segment stays when this process dies (an agent's mesh buffers: a restarted
        agent re-adopts them); else Python's resource tracker unlinks it when this process ends. `owner`: the
        agent's `owner_tag`, written into the header (what finds the segment if the agent dies unrecorded)."""
        self.buffer_id = buffer_id
        self.length = length
        self.rkey = rkey
        self.name = PREFIX + buffer_id
        self.shm = shared_memory.SharedMemory(name=self.name, create=True, size=HEADER_BYTES + max(1, length))
        self._tracked = not outlive_process
        if outlive_process:
            _untrack(self.shm)      # only revoke() unlinks it
        _OWNED.add(self.name)
        self.segment = Segment(self.shm._fd, buffer_id, length)       # noqa: SLF001
        self.tag = secret_tag(secret, self.name) if secret else NO_TAG      # what peers check (and the agent's audit)
        self.segment.write_header(HEADER.pack(MAGIC, rkey, ACTIVE, length, os.getpid()) + TAG.pack(self.tag)
                                  + OWNER.pack(owner or NO_OWNER))
        self.data = self.shm.buf[HEADER_BYTES:HEADER_BYTES + length]

    @classmethod
    def reopen(cls, buffer_id: str, length: int, secret: bytes = b"", owner: bytes = b"") -> "ShmRegion":
        """Adopt the segment a previous owner (this agent before a restart) registered: its bytes and its key
        are kept, the header names this process as the owner (and `owner` as the owning agent, when given).
        Revoked when the segment is missing (unlinked) or revoked: that buffer's memory is gone; BufferDamaged
        when it was shrunk or its header overwritten (of another length, not a gpumesh buffer, made for another
        secret) by a process that maps it."""
        name = PREFIX + buffer_id
        try:
            shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise Revoked(f"buffer {buffer_id}: segment {name} no longer exists (its memory is gone)",
                          op="recover", buffer_id=buffer_id) from None
        except ValueError:          # an empty file cannot be mapped: shrunk to nothing
            raise BufferDamaged(f"buffer {buffer_id}: segment {name} was shrunk to 0 bytes", op="recover",
                                buffer_id=buffer_id, size=0, expected=HEADER_BYTES + max(1, length),
                                reason="shrunk") from None
        _untrack(shm)
        seg = Segment(shm._fd, buffer_id, length)           # noqa: SLF001
        try:
            seg.check("recover")
            head = seg.read_header(HEADER_BYTES)
            magic, rkey, state, size, _ = HEADER.unpack_from(head)
            (tag,) = TAG.unpack_from(head, HEADER.size)
            data = shm.buf[HEADER_BYTES:HEADER_BYTES + length]
            if data.nbytes < length:                # shrunk between the check and the mapping
                data.release()
                raise seg.shrunk("recover")
        except BufferDamaged as e:
            _close_quietly(shm)
            raise BufferDamaged(f"buffer {buffer_id}: segment {name} {e.message}", op="recover",
                                buffer_id=buffer_id, size=e.size, expected=e.expected, reason=e.reason) from None
        why = ("is not a gpumesh buffer" if magic != MAGIC
               else f"holds {size} bytes, not {length}" if size != length
               else "belongs to another connection" if tag != (secret_tag(secret, name) if secret else NO_TAG)
               else "")
        if why or state != ACTIVE:
            data.release()
            _close_quietly(shm)
            if not why:
                raise Revoked(f"buffer {buffer_id}: segment {name} was revoked", op="recover", buffer_id=buffer_id)
            raise BufferDamaged(f"buffer {buffer_id}: segment {name} {why} (its header was overwritten)",
                                op="recover", buffer_id=buffer_id, size=seg.size(), expected=seg.needed,
                                reason="header")
        self = cls.__new__(cls)
        self.buffer_id, self.length, self.rkey, self.name, self.shm = buffer_id, length, rkey, name, shm
        self._tracked = False
        self.segment, self.tag = seg, tag
        _OWNED.add(name)
        seg.write_header(HEADER.pack(MAGIC, rkey, ACTIVE, length, os.getpid()) + head[HEADER.size:HEAD]
                         + (OWNER.pack(owner) if owner else head[HEAD:]))
        self.data = data
        return self

    def set_key(self, rkey: int) -> None:
        """Take another key (a verbs MR's rkey, once the MR over this segment exists)."""
        self.rkey = rkey
        self.segment.write_header(HEADER.pack(MAGIC, rkey, ACTIVE, self.length, os.getpid()))

    def detach(self) -> None:
        """Close this process's mapping and leave the segment (its bytes, its key) for a later owner."""
        if self.shm is None:
            return
        self.data.release()
        self.segment = None            # its descriptor closes when operations in flight are done with it
        if self._tracked:
            _untrack(self.shm)
        _OWNED.discard(self.name)
        _close_quietly(self.shm)
        self.shm = None

    def revoke(self) -> None:
        """Kill the keys (attached peers see REVOKED on their next operation) and free the segment."""
        if self.shm is None:
            return
        self.segment.write_header(HEADER.pack(MAGIC, 0, REVOKED, self.length, os.getpid()))   # not if shrunk
        self.segment = None
        self.data.release()
        unlink_segment(self.name)
        if self._tracked:
            _untrack(self.shm)
        _OWNED.discard(self.name)
        _close_quietly(self.shm)
        self.shm = None


def _close_quietly(shm: shared_memory.SharedMemory) -> None:
    """Close a mapping; if a view of it is still alive (an operation in flight), the mapping goes
    when that view does, and SharedMemory's destructor must not complain about it later."""
    try:
        shm.close()
    except BufferError:
        shm.close = lambda: None


def unlink_segment(name: str) -> bool:
    """Remove the segment `name` from /dev/shm (mappings that exist stay valid until closed); False if absent."""
    try:
        _posixshmem.shm_unlink("/" + name)
        return True
    except FileNotFoundError:
        return False


def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/dev/shm", name))


def buffer_segments() -> list[str]:
    """The names of the mesh buffers' segments in /dev/shm (PREFIX + a buffer id "b-..."), of every agent."""
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(PREFIX + "b-"))
    except OSError:
        return []


def segment_owner(name: str) -> tuple[int, bytes] | None:
    """(owner pid, owner tag) from the header of the segment `name`; None when it is not a regular file
    holding a gpumesh header (a symlink, a shrunk or foreign file, one still being created). Read with pread
    on a descriptor of its own: nothing is mapped."""
    try:
        fd = os.open(os.path.join("/dev/shm", name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, HEADER_BYTES, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
        return None
    pid = HEADER.unpack_from(head)[4]
    (owner,) = OWNER.unpack_from(head, HEAD)
    return pid, owner


def _untrack(shm: shared_memory.SharedMemory) -> None:
    """Python 3.11 registers created and attached segments with its resource tracker, which unlinks them
    when this process exits (or is killed): a segment must outlive its owner's process and its peers'."""
    try:
        resource_tracker.unregister(shm._name, "shared_memory")   # noqa: SLF001
    except Exception:
        pass


def _attach(name: str) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name)
    if name not in _OWNED:       # (this process's own tracked segment stays with the tracker)
        _untrack(shm)
    return shm


_owner_alive = pid_alive


class ShmConnection:
    """A peer's mapping of an owner's segment (`secret`: the mesh connection's, when it has one)."""

    def __init__(self, descriptor: BufferDescriptor, secret: bytes = b"") -> None:
        self.descriptor = descriptor
        bid = descriptor.buffer_id
        if not descriptor.shm_name:
            raise Unsupported(f"buffer {bid} has no shared memory segment", op="connect", buffer_id=bid,
                              transport="shm")
        try:
            self._shm = _attach(descriptor.shm_name)
        except FileNotFoundError:
            raise Revoked(f"buffer {bid}: segment {descriptor.shm_name} is gone (revoked, or not on this host)",
                          op="connect", buffer_id=bid) from None
        except ValueError:          # an empty file cannot be mapped
            raise BufferDamaged(f"buffer {bid}: segment {descriptor.shm_name} was shrunk to 0 bytes", op="connect",
                                buffer_id=bid, size=0, expected=HEADER_BYTES + 1, reason="shrunk") from None
        self._seg = Segment(self._shm._fd, bid, descriptor.length)      # noqa: SLF001
        try:
            head = self._seg.read_header(HEAD)
        except BufferDamaged as e:
            self._shm.close()
            raise BufferDamaged(f"buffer {bid}: {e.message}", op="connect", buffer_id=bid, size=e.size,
                                expected=HEAD, reason="shrunk") from None
        magic, rkey, state, length, self._owner = HEADER.unpack_from(head)
        if magic != MAGIC:
            self._shm.close()
            raise TransportError(f"{descriptor.shm_name} is not a gpumesh buffer", op="connect", buffer_id=bid)
        if state == REVOKED:
            self._shm.close()
            raise Revoked(f"buffer {bid} was deregistered", op="connect", buffer_id=bid)
        if rkey != descriptor.rkey or not descriptor.rkey:
            self._shm.close()
            raise InvalidKey(f"wrong key for buffer {bid}", op="connect", buffer_id=bid, rkey=descriptor.rkey)
        (tag,) = TAG.unpack_from(head, HEADER.size)
        if tag != NO_TAG and not (secret and hmac.compare_digest(tag, secret_tag(secret, descriptor.shm_name))):
            self._shm.close()
            raise NotAuthorized(f"buffer {bid} belongs to a mesh connection: attaching it needs the connection's "
                                f"secret ({'a wrong one was given' if secret else 'none was given'})",
                                op="connect", buffer_id=bid)
        self._seg.expect(length)
        self._data = self._shm.buf[HEADER_BYTES:HEADER_BYTES + length]
        if self._data.nbytes < length or self._seg.damage("connect") is not None:
            e = self._seg.shrunk("connect")
            self._data.release()
            self._shm.close()
            raise e
        self._secret = secret
        self.length = length
        self._tcp = None
        self._lock = threading.Lock()

    def _check(self, op: str, offset: int, length: int) -> None:
        """The header (by pread: never a load from the mapping) and the file's size, before every copy."""
        bid = self.descriptor.buffer_id
        if self._data is None:
            raise TransportError(f"connection to {bid} is closed", op=op, buffer_id=bid)
        magic, rkey, state, size, owner = HEADER.unpack_from(self._seg.read_header(HEADER.size))
        if state == REVOKED and magic == MAGIC:
            raise Revoked(f"buffer {bid} was deregistered", op=op, buffer_id=bid)
        if magic != MAGIC or state != ACTIVE or size != self.length or not 0 < owner < PID_MAX:
            raise BufferDamaged(f"{op} on buffer {bid}: its segment's header was overwritten (magic {magic!r}, state "
                                f"{state}, length {size}, owner pid {owner}) by a process that maps it; the buffer "
                                f"is unusable: disconnect and connect again", op=op, buffer_id=bid,
                                size=self._seg.size(), expected=self._seg.needed, reason="header")
        if rkey != self.descriptor.rkey:
            raise Revoked(f"buffer {bid} was deregistered", op=op, buffer_id=bid)
        self._owner = owner          # a restarted agent re-adopts the segment under its new pid
        if not _owner_alive(self._owner):
            raise PeerGone(f"the owner of buffer {bid} (pid {self._owner}) is gone", op=op, buffer_id=bid)
        check_bounds(op, bid, offset, length, self.length)
        self._seg.check(op)

    def write(self, offset: int, data) -> int:
        n = memoryview(data).nbytes
        self._check("write", offset, n)
        self._data[offset:offset + n] = memoryview(data).cast("B")
        return n

    def read(self, offset: int, length: int, into=None):
        self._check("read", offset, length)
        if into is not None:
            memoryview(into).cast("B")[:length] = self._data[offset:offset + length]
            return into
        return bytes(self._data[offset:offset + length])

    def _control(self):
        if self._tcp is None:
            if not self.descriptor.endpoint:
                raise Unsupported("send/recv need the owner's data plane endpoint", op="send",
                                  buffer_id=self.descriptor.buffer_id, transport="shm")
            from mesh.transport.tcp import TcpConnection
            self._tcp = TcpConnection(self.descriptor, secret=self._secret)
        return self._tcp

    def send(self, data) -> int:
        return self._control().send(data)

    def recv(self, timeout: float = 0.0) -> bytes | None:
        return self._control().recv(timeout)

    def close(self) -> None:
        if self._data is not None:
            self._data.release()
            self._data = None
            self._seg = None
            _close_quietly(self._shm)
        if self._tcp is not None:
            self._tcp.close()

    def __enter__(self) -> "ShmConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShmTransport:
    """Owner side: registers segments on this host; `connect` maps a peer's segment."""

    name = "shm"

    def __init__(self, node: str = "", endpoint: str = "") -> None:
        self.node = node
        self.endpoint = endpoint
        self.regions: dict[str, ShmRegion] = {}

    def register(self, slice_id: str, size: int = 0, buffer=None, buffer_id: str = "",
                 rkey: int = 0) -> BufferDescriptor:
        if buffer is not None:
            raise Unsupported("shm registers its own segment; expose an existing host buffer with tcp",
                              op="register", transport="shm")
        bid = buffer_id or f"b-{secrets.token_hex(6)}"
        region = ShmRegion(bid, size, rkey or new_key())
        self.regions[bid] = region
        return BufferDescriptor(buffer_id=bid, slice_id=slice_id, node=self.node, transport="shm",
                                address=0, length=size, rkey=region.rkey, endpoint=self.endpoint,
                                shm_name=region.name)

    def view(self, buffer_id: str) -> memoryview:
        """The owner's own view of a registered buffer's bytes."""
        return self.regions[buffer_id].data

    def deregister(self, buffer_id: str) -> None:
        region = self.regions.pop(buffer_id, None)
        if region is not None:
            region.revoke()

    def connect(self, descriptor: BufferDescriptor, secret: bytes = b"") -> ShmConnection:
        return ShmConnection(descriptor, secret)

    def close(self) -> None:
        for bid in list(self.regions):
            self.deregister(bid)
