"""Following a standby's leader hint: the leader names every endpoint it serves; callers take theirs."""

from __future__ import annotations

import grpc

from mesh.failover import FailoverChannel, pick_leader


class Refused(grpc.RpcError):
    def __init__(self, leader: str) -> None:
        self._md = (("gpumesh-leader", leader), ("gpumesh-standby", "1"))

    def trailing_metadata(self):
        return self._md


class NullChannel:
    def close(self) -> None:
        pass


def test_pick_leader_takes_the_endpoint_in_the_callers_list():
    mtls = ["cp1:7443", "cp2:7443", "cp3:7443"]
    tokens = ["cp1:50051", "cp2:50051", "cp3:50051"]
    hint = "cp3:50051,cp3:7443"          # what a standby names when the leader serves both
    assert pick_leader(hint, mtls) == 2
    assert pick_leader(hint, tokens) == 2
    assert pick_leader("cp3:50051", mtls) == -1   # an older leader naming one port: no jump
    assert pick_leader("", tokens) == -1


def test_a_refused_call_moves_to_the_named_leader_else_to_the_next():
    ch = FailoverChannel(["cp1:7443", "cp2:7443", "cp3:7443"], lambda e: NullChannel())
    ch.moved(0, Refused("cp3:50051,cp3:7443"))
    assert ch.current == 2
    ch.moved(2, Refused("cp9:50051"))            # a leader not in the list: round robin
    assert ch.current == 0


class RefusedWithDetails(grpc.RpcError):
    """A standby's refusal as the wire carries it when the server aborts with rich status details: a
    `grpc-status-details-bin` entry whose protobuf bytes are not UTF-8 (a message of 137 bytes makes
    its length varint 0x89 0x01, the byte the CI run tripped on)."""

    def __init__(self, leader: str) -> None:
        details = b"\x08\x0e\x12\x89\x01" + b"x" * 137
        self._md = (("grpc-status-details-bin", details), ("gpumesh-leader", leader), ("gpumesh-standby", "1"))

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def trailing_metadata(self):
        return self._md


def test_binary_status_details_do_not_break_the_leader_hint():
    ch = FailoverChannel(["cp1:7443", "cp2:7443", "cp3:7443"], lambda e: NullChannel())
    err = RefusedWithDetails("cp2:7443")
    ch.moved(0, err)
    assert ch.current == 1
    call = ch.unary_unary("/gpumesh.v1.MeshService/Allocate")
    assert call._retryable(err)
