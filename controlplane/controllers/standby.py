"""Standby control planes: serve at once, switch to the leader's services when elected.

A control plane that does not hold the leader key still listens: its gRPC
services are `Switch` proxies registered before the server starts. Until the
process wins the election (controlplane.server promotes it), every call
answers UNAVAILABLE, naming the leader's advertised endpoint in the message
and in the trailing metadata `gpumesh-leader`, so agents and clients (which
hold several endpoints) move to it. Once promoted, each proxy forwards to the
real servicer built over the freshly loaded fleet.

Reads are the exception: the methods in `READS` are answered, while standing
by, by `reader(service)` (controlplane/state/follower.py: a read-only fleet kept
current from etcd) once it has loaded; writes and agent streams keep
answering UNAVAILABLE with the leader hint.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import grpc

LEADER_METADATA = "gpumesh-leader"
STANDBY_METADATA = "gpumesh-standby"
# What a standby answers itself (from its follower's fleet), by service.
READS = {"SliceService": frozenset({"Get", "List", "Watch"}),
         "AdminService": frozenset({"ListNodes", "GetNode", "ListGpus", "GetVersion"}),
         "WorkloadService": frozenset({"Get", "List"}),
         "MeshService": frozenset({"Get", "List", "ListGrants"}),
         "MigrationService": frozenset({"Get", "List", "ListCheckpoints"}),
         "ModelService": frozenset({"Get", "List"}),
         "EventService": frozenset({"List", "Watch"}),
         "DeploymentService": frozenset({"Get", "List", "Watch"})}


class Switch:
    """Holds the real servicer of one service once this control plane leads."""

    def __init__(self, service_descriptor, leader_hint: Callable[[], Awaitable[str]]) -> None:
        self.descriptor = service_descriptor
        self.leader_hint = leader_hint
        self.target = None
        # service name -> read-only servicer or None (the standby's follower); used only while target is None
        self.reader: Callable[[str], object] | None = None
        self.reads = READS.get(service_descriptor.name, frozenset())
        for m in service_descriptor.methods:
            setattr(self, m.name, self._method(m.name, m.server_streaming))

    async def _refuse(self, context) -> None:
        try:
            leader = await self.leader_hint()
        except Exception:   # etcd unreachable: no hint, still a clean UNAVAILABLE
            leader = ""
        where = f"; the leader is at {leader}" if leader else "; no leader is elected yet, retry shortly"
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"this control plane is a standby (not the leader){where}",
                            trailing_metadata=((LEADER_METADATA, leader), (STANDBY_METADATA, "1")))

    def _pick(self, name: str):
        target = self.target
        if target is None and name in self.reads and self.reader is not None:
            target = self.reader(self.descriptor.name)
        return target

    def _method(self, name: str, server_streaming: bool):
        if server_streaming:
            async def stream(request, context):
                target = self._pick(name)
                if target is None:
                    await self._refuse(context)
                    return
                res = getattr(target, name)(request, context)
                if inspect.isasyncgen(res):
                    async for item in res:
                        yield item
                else:
                    await res
            stream.__name__ = name
            return stream

        async def unary(request, context):
            target = self._pick(name)
            if target is None:
                await self._refuse(context)
                return None
            return await getattr(target, name)(request, context)
        unary.__name__ = name
        return unary
