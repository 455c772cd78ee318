"""Connected agents: one Sync stream per node, fed desired-slice changes."""

from __future__ import annotations

import asyncio

from gpumesh.v1 import node_service_pb2, types_pb2
from mesh.outbox import DEFAULT_LIMIT, Outbox


class NodeSession:
    def __init__(self, node: str, limit: int = DEFAULT_LIMIT) -> None:
        self.node = node
        # Bounded (mesh/outbox.py): an agent that stops reading has its stream ended; its reconnect is
        # sent the full desired state, so nothing is lost and nothing piles up here.
        self.outbox: Outbox = Outbox(limit)
        self.synced = asyncio.Event()   # the agent sent its first full report

    def send_upserts(self, slices: list[types_pb2.Slice], revision: int) -> None:
        self.outbox.put_nowait(node_service_pb2.ControllerMessage(
            desired=node_service_pb2.DesiredSlices(upserts=slices, revision=revision)))

    def send_removals(self, ids: list[str], revision: int) -> None:
        self.outbox.put_nowait(node_service_pb2.ControllerMessage(
            desired=node_service_pb2.DesiredSlices(removals=ids, revision=revision)))

    def send_full(self, slices: list[types_pb2.Slice], revision: int) -> None:
        self.outbox.put_nowait(node_service_pb2.ControllerMessage(
            desired=node_service_pb2.DesiredSlices(full=True, upserts=slices, revision=revision)))

    def send(self, msg: node_service_pb2.ControllerMessage) -> None:
        """Any other controller message (workload commands, log requests)."""
        self.outbox.put_nowait(msg)

    def close(self) -> None:
        self.outbox.put_nowait(None)


class Sessions:
    def __init__(self, outbox_limit: int = DEFAULT_LIMIT) -> None:
        self.by_node: dict[str, NodeSession] = {}
        self.outbox_limit = outbox_limit

    def open(self, node: str) -> NodeSession:
        old = self.by_node.get(node)
        if old is not None:
            old.close()   # a newer stream from the same node replaces the old one
        s = NodeSession(node, self.outbox_limit)
        self.by_node[node] = s
        return s

    def close(self, s: NodeSession) -> None:
        if self.by_node.get(s.node) is s:
            del self.by_node[s.node]
        s.close()

    def get(self, node: str) -> NodeSession | None:
        return self.by_node.get(node)
