"""Fuzzing the API: generated requests, valid and hostile, against a running secured cluster.

Requests for every unary and server-streaming method of every gpumesh service are
built from the protobuf descriptors (huge and negative numbers, NaN and infinities,
unicode, empty and oversized strings, unknown enum values, missing fields, and real
IDs of both tenants), sent as two tenants, a viewer, an admin, an agent and callers
without or with bad credentials. Every answer must be OK or a proper status (never
INTERNAL or UNKNOWN), the server must stay healthy, and no answer to a tenant may
carry another tenant's objects. The figures (examples, codes) are printed and written
to fuzz-summary.json in the test's tmp dir.
"""

from __future__ import annotations

import collections
import json
import math
import shutil
import time

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpumesh.v1 import (admin_service_pb2, cost_service_pb2, deployment_service_pb2, mesh_service_pb2,
                        migration_service_pb2, model_service_pb2, node_service_pb2, pool_service_pb2,
                        slice_service_pb2, workload_service_pb2)
from mesh import tls
from tests.integration.conftest import HOSTS, wait_for
from tests.integration.secure import TOKENS, agent_channel, client, start

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 2000
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# Calls that wait for agents (or stream) may run into the client's deadline; nothing else may.
WAITING = {"Allocate", "Run", "Stop", "Connect", "Disconnect", "Release", "Logs", "Watch", "DrainNode", "DeleteNode",
           "Migrate", "Checkpoint", "Restore", "Resize"}
CALLERS = ("admin", "team-a", "team-a", "team-b", "team-b", "viewer-a", None, "bad-token", "agent")
SERVICES = (slice_service_pb2, workload_service_pb2, mesh_service_pb2, migration_service_pb2, admin_service_pb2,
            node_service_pb2, model_service_pb2, deployment_service_pb2, pool_service_pb2, cost_service_pb2)

INT_RANGES = {FD.TYPE_INT32: (-2**31, 2**31 - 1), FD.TYPE_SINT32: (-2**31, 2**31 - 1), FD.TYPE_SFIXED32: (-2**31, 2**31 - 1),
              FD.TYPE_INT64: (-2**63, 2**63 - 1), FD.TYPE_SINT64: (-2**63, 2**63 - 1), FD.TYPE_SFIXED64: (-2**63, 2**63 - 1),
              FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
              FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1)}
HOSTILE_TEXT = ["", " ", "\x00", "a\x00b", "../../etc/passwd", "💥🚀", "ñ" * 300, "x" * 70_000, "s-", "a-", "w-",
                "m-", "team-a", "team-b", "gpu-a", "gpu-b", "GPU-A", "1g.10gb", "7g.80gb", "H100-80GB", "%s%n",
                "'; DROP TABLE slices; --", "\u202e", "\ud7ff", "-1", "NaN"]


def methods():
    out = []
    for module in SERVICES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                if m.client_streaming:      # NodeService.Sync: covered by test_security
                    continue
                out.append((service.full_name, m))
    return out


def message_strategy(desc, ids: list[str], depth: int = 0):
    """Any message of type `desc`: each field unset or drawn from its type's hostile and valid values."""
    fields = {}
    for f in desc.fields:
        fields[f.name] = st.none() | field_strategy(f, ids, depth)

    @st.composite
    def build(draw):
        msg = {}
        for name, strat in fields.items():
            value = draw(strat)
            if value is not None:
                msg[name] = value
        return msg
    return build()


def scalar_strategy(f, ids: list[str], depth: int):
    t = f.type
    if t == FD.TYPE_STRING:
        return st.sampled_from(HOSTILE_TEXT + ids) | st.text(max_size=40)
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if t == FD.TYPE_DOUBLE else 32) | \
            st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e308, math.nan, math.inf])
    if t == FD.TYPE_ENUM:
        return st.integers(-5, 40) | st.sampled_from([v.number for v in f.enum_type.values]) | \
            st.sampled_from([-2**31, 2**31 - 1])
    if t in INT_RANGES:
        lo, hi = INT_RANGES[t]
        return st.integers(lo, hi) | st.sampled_from([v for v in (0, 1, 2, 7, 8, -1, lo, hi, 10 << 30, 80 << 30)
                                                      if lo <= v <= hi])
    if t == FD.TYPE_MESSAGE:
        if depth >= 2:
            return st.just({})
        return message_strategy(f.message_type, ids, depth + 1)
    raise AssertionError(f"no strategy for field type {t} ({f.full_name})")


def field_strategy(f, ids: list[str], depth: int):
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return st.dictionaries(scalar_strategy(key, ids, depth), scalar_strategy(value, ids, depth), max_size=3)
    if f.is_repeated:
        return st.lists(scalar_strategy(f, ids, depth), max_size=4)
    return scalar_strategy(f, ids, depth)


def fill(msg, values: dict) -> None:
    for name, value in values.items():
        f = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if f.message_type.fields_by_name["value"].message_type is not None:
                    fill(target[k], v)
                else:
                    target[k] = v
        elif f.is_repeated:
            for v in value:
                fill(target.add(), v) if f.message_type is not None else target.append(v)
        elif f.message_type is not None:
            target.SetInParent()
            fill(target, value)
        else:
            setattr(msg, name, value)


def tenants_in(msg, out: set) -> set:
    """Every tenant named by an object in a response (Slice/Workload/MeshConnection.tenant, grants)."""
    for f, value in msg.ListFields():
        if f.name in ("tenant", "from_tenant", "to_tenant") and f.type == FD.TYPE_STRING and value:
            out.add(value)
        elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for v in (value if f.is_repeated else [value]):
                tenants_in(v, out)
    return out


ID_FIELDS = ("id", "slice_id", "allocation_id", "slice_a", "slice_b", "buffer_id")


def ids_in(msg, out: set) -> set:
    """The object IDs a response carries in its ID fields (labels and env are the caller's own free text)."""
    for f, value in msg.ListFields():
        if f.name in ID_FIELDS and f.type == FD.TYPE_STRING:
            out.update(value if f.is_repeated else [value])
        elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for v in (value if f.is_repeated else [value]):
                ids_in(v, out)
    return out


@pytest.fixture(scope="module")
def fc(tmp_path_factory):
    c = start(tmp_path_factory.mktemp("fuzz"), HOSTS)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def world(fc):
    """Objects of both tenants to aim at: slices, an allocation, workloads, a mesh connection."""
    with client(fc, "team-a") as a, client(fc, "team-b") as b:
        alloc_a = a.allocate(mig_profile="1g.10gb", gpu_model="H100-80GB", count=2)
        alloc_b = b.allocate(mig_profile="1g.5gb", gpu_model="A100-40GB", count=2)
        wa = a.run_workload(alloc_a.slices[0].id, ["sleep", "600"])
        wb = b.run_workload(alloc_b.slices[0].id, ["sleep", "600"])
        ca = a.mesh_connect(alloc_a.slices[0].id, alloc_a.slices[1].id, 4096)
        cb = b.mesh_connect(alloc_b.slices[0].id, alloc_b.slices[1].id, 4096)
    own = {"team-a": {alloc_a.allocation_id, wa.id, ca.id, *(s.id for s in alloc_a.slices)},
           "team-b": {alloc_b.allocation_id, wb.id, cb.id, *(s.id for s in alloc_b.slices)}}
    return own


class Fuzzer:
    def __init__(self, cluster, world, tmp_path) -> None:
        ca = str(cluster.tls_dir / "ca.crt")
        self.cluster = cluster
        self.world = world
        self.ids = sorted(world["team-a"] | world["team-b"])
        creds = tls.channel_credentials(ca)
        self.channels = {"tls": grpc.secure_channel(cluster.endpoint, creds,
                                                    options=[("grpc.max_send_message_length", 64 << 20)]),
                         "agent": agent_channel(cluster, "gpu-a")}
        self.seen = collections.Counter()
        self.by_method = collections.defaultdict(collections.Counter)
        self.examples = 0
        self.leaks: list[str] = []
        self.granted: set[frozenset] = set()     # tenant pairs an admin grant ever joined (mesh connections span them)
        self.bad: list[str] = []

    def metadata(self, who):
        if who in TOKENS:
            return [("authorization", f"Bearer {TOKENS[who]}")]
        if who == "bad-token":
            return [("authorization", "Bearer forged-0123456789abcdef")]
        return []

    def call(self, service: str, method, values: dict, who) -> None:
        req = getattr(self._module(method), method.input_type.name)()
        fill(req, values)
        if method.name == "Run" and req.command and shutil.which(req.command[0].strip() or "-"):
            req.command[0] = "true"      # never run a real program the generator happened to name
        out_type = getattr(self._module(method, output=True), method.output_type.name)
        ch = self.channels["agent" if who == "agent" else "tls"]
        path = f"/{service}/{method.name}"
        kw = dict(request_serializer=type(req).SerializeToString, response_deserializer=out_type.FromString)
        meta = self.metadata(who)
        responses = []
        try:
            if method.server_streaming:
                call = ch.unary_stream(path, **kw)(req, timeout=2, metadata=meta)
                for i, r in enumerate(call):
                    responses.append(r)
                    if i >= 20 or (method.name == "Watch" and r.type == slice_service_pb2.SliceEvent.SYNCED):
                        call.cancel()
                        break
            else:
                responses.append(ch.unary_unary(path, **kw)(req, timeout=8, metadata=meta))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.CANCELLED and responses:
                code = grpc.StatusCode.OK
            elif code not in ALLOWED or (code == grpc.StatusCode.DEADLINE_EXCEEDED and method.name not in WAITING):
                self.bad.append(f"{path} as {who}: {code.name} {details[:300]} request={str(req)[:300]!r}")
            else:
                self._check_leak(path, who, details, req)
        self.examples += 1
        self.seen[code.name] += 1
        self.by_method[path][code.name] += 1
        if path.endswith("/Grant") and code == grpc.StatusCode.OK and not req.revoke:
            self.granted.add(frozenset((req.from_tenant, req.to_tenant)))
        for r in responses:
            self._check_response(path, who, r, req)

    def _module(self, method, output=False):
        desc = method.output_type if output else method.input_type
        for m in (*SERVICES, __import__("gpumesh.v1.types_pb2", fromlist=["x"])):
            if m.DESCRIPTOR.name == desc.file.name:
                return m
        raise AssertionError(desc.file.name)

    def _check_response(self, path, who, r, req=None) -> None:
        if who not in ("team-a", "team-b", "viewer-a"):
            return
        mine = "team-b" if who == "team-b" else "team-a"
        other = "team-a" if mine == "team-b" else "team-b"
        foreign = tenants_in(r, set()) - {mine}
        if ".MeshService/" in path and frozenset((mine, other)) in self.granted:
            return                       # a granted connection names both tenants' slices, as it should
        grants_ok = path.endswith("/ListGrants")
        if foreign and not grants_ok:
            self.leaks.append(f"{path} as {who}: objects of {sorted(foreign)}")
        for oid in ids_in(r, set()) & self.world[other]:
            self.leaks.append(f"{path} as {who}: {other}'s {oid} (request {str(req)[:200]!r})")

    def _check_leak(self, path, who, details: str, req) -> None:
        if who not in ("team-a", "team-b", "viewer-a"):
            return
        other = "team-a" if who == "team-b" else "team-b"
        asked = req.SerializeToString()
        for secret in self.world[other] | {other}:
            if secret in details and secret.encode() not in asked:
                self.leaks.append(f"{path} as {who}: error names {secret}: {details[:200]}")


@pytest.fixture(scope="module")
def fuzzer(fc, world, tmp_path_factory):
    f = Fuzzer(fc, world, tmp_path_factory.mktemp("fuzz-out"))
    yield f
    for ch in f.channels.values():
        ch.close()


METHODS = methods()


def templates(world) -> dict:
    """Valid requests per method name, aimed at team-a's objects (or team-b's, for the other tenant)."""
    a = sorted(i for i in world["team-a"] if i.startswith("s-"))
    b = sorted(i for i in world["team-b"] if i.startswith("s-"))
    w = sorted(i for i in world["team-a"] | world["team-b"] if i.startswith("w-"))
    return {
        "Allocate": {"spec": {"mig_profile": "1g.10gb", "gpu_model": "H100-80GB", "count": 1}, "no_wait": True},
        "Get": {"id": a[0]}, "Release": {"id": b[-1]}, "List": {}, "Watch": {"send_initial": True},
        "Run": {"slice_id": a[-1], "command": ["true"]}, "Stop": {"id": w[0], "grace_seconds": 1},
        "Logs": {"id": w[-1], "tail_lines": 5},
        "Connect": {"slice_a": a[0], "slice_b": b[0], "size_bytes": 4096},
        "GetNode": {"name": "gpu-a"}, "ListGpus": {"node": "gpu-b"}, "CordonNode": {"name": "gpu-b"},
        "UncordonNode": {"name": "gpu-b"}, "DrainNode": {"name": "gpu-b", "dry_run": True},
        "Heartbeat": {"node_name": "gpu-a"}, "Grant": {"from_tenant": "team-a", "to_tenant": "team-b"},
    }


def test_fuzz_the_api(fc, fuzzer, tmp_path):
    t0 = time.monotonic()
    ids = fuzzer.ids
    by_method = {(s, m.full_name): (s, m, message_strategy(m.input_type, ids)) for s, m in METHODS}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data):
        service, method, strat = data.draw(st.sampled_from(sorted(by_method.values(), key=lambda v: v[1].full_name)))
        who = data.draw(st.sampled_from(CALLERS))
        if who == "agent" and service != "gpumesh.v1.NodeService":
            who = data.draw(st.sampled_from(CALLERS[:6]))
        values = data.draw(strat)
        base = templates(fuzzer.world).get(method.name)
        if base is not None and not set(base) <= set(method.input_type.fields_by_name):
            base = None             # a template for a same-named method of another service
        if base is not None and data.draw(st.booleans()):
            # a valid request with a few fields replaced by generated ones
            keep = data.draw(st.sets(st.sampled_from(sorted(values)), max_size=2)) if values else set()
            values = {**base, **{k: values[k] for k in keep}}
        if who == "agent" and values.get("node_name") == "gpu-a":
            values["node_name"] = "gpu-b"        # never let the fuzz re-register the real agent's node
        fuzzer.call(service, method, values, who)

    one()
    # the server stayed up and answers as before
    with client(fc, "admin") as admin:
        assert admin.health() == "serving"
        assert fc.controlplane.running()
        wait_for(lambda: {n.name for n in admin.list_nodes()} >= {"gpu-a", "gpu-b"}, 30, "nodes listed")
    summary = {"examples": fuzzer.examples, "seconds": round(time.monotonic() - t0, 1),
               "methods": len(METHODS), "codes": dict(sorted(fuzzer.seen.items())),
               "by_method": {k: dict(v) for k, v in sorted(fuzzer.by_method.items())},
               "bad": fuzzer.bad[:20], "leaks": fuzzer.leaks[:20]}
    out = tmp_path / "fuzz-summary.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nfuzz summary ({out}): {fuzzer.examples} examples over {len(METHODS)} methods in "
          f"{summary['seconds']}s; codes: {summary['codes']}")
    assert not fuzzer.bad, "\n".join(fuzzer.bad[:20])
    assert not fuzzer.leaks, "\n".join(fuzzer.leaks[:20])
    assert fuzzer.examples >= MAX_EXAMPLES // 2


# -- raw bytes that are not a valid message ------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _nested(depth: int) -> bytes:
    """Field 1, length-delimited, `depth` levels deep (past protobuf's recursion limit of 100)."""
    inner = b""
    for _ in range(depth):
        inner = b"\x0a" + _varint(len(inner)) + inner
    return inner


def malformed_payloads(seed: int = 10) -> list[tuple[str, bytes]]:
    import random
    rnd = random.Random(seed)
    return [
        ("random", bytes(rnd.getrandbits(8) for _ in range(64))),
        ("random-long", bytes(rnd.getrandbits(8) for _ in range(4096))),
        ("absurd-length-prefix", b"\x0a" + _varint(2 ** 31 - 1) + b"abc"),
        ("absurd-length-prefix-64", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01xyz"),
        ("truncated-varint", b"\x08\xff\xff\xff"),
        ("invalid-wire-type", b"\x0f\x01\x02"),
        ("field-number-zero", b"\x00\x01"),
        ("deep-nesting", _nested(300)),
        ("oversized-invalid-utf8-string", b"\x0a" + _varint(1 << 20) + b"\xff" * (1 << 20)),
        ("end-group-without-start", b"\x0c"),
    ]


def all_methods():
    out = []
    for module in SERVICES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out.append((service.full_name, m))
    return out


def test_malformed_bytes_get_invalid_argument_on_every_method_and_port(fc, fuzzer):
    """Request bytes that do not parse: INVALID_ARGUMENT naming the method, never UNKNOWN ("Unexpected
    <class 'google.protobuf.message.DecodeError'>") or INTERNAL, on unary and streaming methods, on the
    token port and on the mTLS port; the server stays up."""
    ports = {"token": (fuzzer.channels["tls"], [("authorization", f"Bearer {TOKENS['admin']}")]),
             "mtls": (fuzzer.channels["agent"], [])}
    codes, bad, named = collections.Counter(), [], 0
    for port, (ch, meta) in ports.items():
        for service, m in all_methods():
            path = f"/{service}/{m.name}"
            for label, payload in malformed_payloads():
                try:
                    if m.client_streaming:
                        call = ch.stream_stream(path)(iter([payload]), timeout=5, metadata=meta)
                        for _ in call:
                            pass
                    elif m.server_streaming:
                        call = ch.unary_stream(path)(payload, timeout=3, metadata=meta)
                        for i, _ in enumerate(call):
                            if i >= 2:
                                call.cancel()
                                break
                    else:
                        ch.unary_unary(path)(payload, timeout=5, metadata=meta)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as e:
                    code, details = e.code(), e.details() or ""
                    if code == grpc.StatusCode.CANCELLED:
                        code = grpc.StatusCode.OK
                codes[code.name] += 1
                if code == grpc.StatusCode.INVALID_ARGUMENT and path in details and "could not be parsed" in details:
                    named += 1
                if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) or code not in ALLOWED or (
                        code == grpc.StatusCode.DEADLINE_EXCEEDED and m.name not in WAITING):
                    bad.append(f"{port} {path} {label}: {code.name} {details[:200]}")
    print(f"\nmalformed bytes: {sum(codes.values())} calls; codes {dict(codes)}; {named} INVALID_ARGUMENT naming "
          f"the method")
    assert not bad, "\n".join(bad[:20])
    assert named >= len(all_methods()), "unparseable requests were not refused as such"
    with client(fc, "admin") as admin:
        assert admin.health() == "serving"
        assert fc.controlplane.running()
