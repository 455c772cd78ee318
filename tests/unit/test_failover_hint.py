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
