"""The shared state of the agent's migration steps: the per-migration `Job`, reporting to the control plane
(`MigrationReport` on the agent's stream, from the loop or from worker threads) and the helpers every step uses
(the workload's control socket, the transfer host and credentials, the migration's secret, the tenant's key and
the checkpoint store's paths).

`MigrationBase` holds them; the steps are mixins on it (nodeagent/migrate_source.py, migrate_target.py,
migrate_checkpoint.py, migrate_slices.py), put together as `MigrationAgent` in nodeagent/migrate.py.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2, types_pb2
from mesh.checkpoint.agent_link import DEFAULT_TIMEOUT, AgentLink
from nodeagent.isolation.plan import INSIDE_SOCKET

CHECKPOINT_TIMEOUT_S = 86400.0 - 600
"""The default of the agent's `checkpoint_timeout_seconds`: ten minutes under the control plane's default ceiling
(`copy_timeout_seconds`, 24 h), so by default the agent gives up first, with its own message. Whichever gives up
first, nothing is left: the agent answers FAILED and removes its partial checkpoint, or the control plane stops
asking for it (and sends DELETE_CHECKPOINT) and the agent gives it up (migrate_checkpoint.py UNASKED_S)."""


class Cancelled(Exception):
    """The control plane rolled the migration back while the send ran."""


@dataclass
class Job:
    migration_id: str
    workload_id: str
    cancelled: bool = False
    done: bool = False
    final: Any = None                  # the last report (RESTORED or FAILED), re-sent on a repeated step
    committed: dict = field(default_factory=dict)
    thread: threading.Thread | None = None
    bytes_sent: int = 0
    state_bytes: int = 0
    address: str = ""
    server: Any = None                 # transparent mode: the target's transfer server for the images
    images: str = ""                   # transparent mode: where the target receives them
    relay: Any = None                  # a target without network: the TCP port that leads to its socket
    live: Any = None                   # a running step's bytes so far (a callable): answered to each repeat
    asked: float = field(default_factory=time.monotonic)   # when the control plane last asked for the step


class MigrationBase:
    """The agent's migration state and the helpers its steps share (see the module's docstring)."""

    def __init__(self, agent, runner, checkpoint_dir: str = "", keys_file: str = "", transfer_host: str = "",
                 tls: tuple[str, str, str] | None = None, transfer_idle_timeout: float | None = None,
                 checkpoint_timeout: float | None = None) -> None:
        self.agent = agent
        self.runner = runner
        self.checkpoint_dir = checkpoint_dir
        self.keys_file = keys_file
        self.transfer_host = transfer_host
        self.transfer_idle_timeout = transfer_idle_timeout
        """the agent's transfer receivers give up a stream that sends nothing this long (None: the default,
        mesh/checkpoint/transfer_recv.py IDLE_TIMEOUT_S); a checkpoint's step then fails."""
        self.checkpoint_timeout = CHECKPOINT_TIMEOUT_S if checkpoint_timeout is None else checkpoint_timeout
        """the longest a checkpoint into the store may take in all, however its push progresses"""
        self.tls = tls
        """(ca, cert, key) of this agent's certificate when the agent is secured: agent-to-agent
        transfers speak mTLS with it."""
        self.jobs: dict[tuple[str, str], Job] = {}      # (migration id, role) -> job
        self.outbox: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- reporting (from the loop or from worker threads) ---------------------------------

    def _asked_again(self, key) -> bool:
        """True when the step `key` already has a job (the control plane asked again: a retry or a new
        leader); its final report, if it has one, is sent again, else its progress if it tells any (`live`)."""
        job = self.jobs.get(key)
        if job is None:
            return False
        job.asked = time.monotonic()
        if job.done and job.final is not None:
            self._send(job.final)
        elif not job.done and job.live is not None:
            # still running: its progress, by which the control plane keeps waiting (controllers/copy_wait.py)
            self._send(M.MigrationReport(migration_id=job.migration_id, event=M.MigrationReport.PROGRESS,
                                         bytes=int(job.live())))
        return True

    def _send(self, rep: M.MigrationReport) -> None:
        msg = node_service_pb2.AgentMessage(migration=rep)
        outbox, loop = self.outbox, self.loop
        if outbox is None or loop is None:
            return
        try:
            if threading.current_thread() is threading.main_thread():
                outbox.put_nowait(msg)
            else:
                loop.call_soon_threadsafe(outbox.put_nowait, msg)
        except RuntimeError:
            pass    # the loop is closing

    def _reporter(self, mid: str):
        def report(event: int, **fields: Any) -> M.MigrationReport:
            rep = M.MigrationReport(migration_id=mid, event=event, **fields)
            self._send(rep)
            return rep
        return report

    # -- helpers ------------------------------------------------------------------------

    def _socket(self, wid: str) -> str:
        return self.runner.socket_path(wid)

    def _link(self, wid: str, timeout: float = DEFAULT_TIMEOUT, reply_timeout: float | None = None) -> AgentLink:
        """A link to `wid`'s control socket that reaches only the workload's own SDK: a socket (never a link)
        owned by and served by the workload's uid (mesh/ownedsock.py), the agent's own for a workload run
        unconfined. The socket lies in the tenant's directory; a link there to another tenant's socket
        would hand that workload this one's checkpoint secret, `stop` or `pause`."""
        meta = self.runner.meta.get(wid, {})
        path = self._socket(wid)
        if meta.get("socket"):      # confined with its own /tmp: the socket in its directory, not the short link to it
            path = os.path.join(self.runner.path(wid, "d"), os.path.basename(INSIDE_SOCKET))
        uid = int(meta["uid"]) if "uid" in meta else os.geteuid()
        return AgentLink(path, timeout=timeout, uid=uid, reply_timeout=reply_timeout)

    def _running(self, wid: str) -> bool:
        w = self.runner.workloads.get(wid)
        return w is not None and w.state == types_pb2.WORKLOAD_STATE_RUNNING

    def _no_network(self, wid: str) -> bool:
        """`wid` runs in a network namespace of its own (gpumesh.io/network=none): its transfers pass
        through relays (nodeagent/isolation/netrelay.py)."""
        return "net" in self.runner.meta.get(wid, {}).get("namespaces", [])

    def _outbound(self, wid: str, target: str):
        """For a workload without network: a relay from a Unix socket in its directory to `target`
        (HOST:PORT), whose `.address` it dials instead; None for any other workload."""
        if not self._no_network(wid):
            return None
        from nodeagent.isolation import netrelay
        meta = self.runner.meta[wid]
        return netrelay.outbound(self.runner.path(wid, "d"), int(meta["uid"]), int(meta["gid"]), target)

    def _advertise_host(self) -> str:
        from nodeagent.registrar import route_source
        return route_source(self.agent.endpoint)

    def _listen_host(self) -> str:
        """Where transfer receivers listen: `transfer_host`, else the address peers reach us at."""
        return self.transfer_host or self._advertise_host()

    def _dial_host(self) -> str:
        host = self._listen_host()
        return self._advertise_host() if host in ("0.0.0.0", "::", "[::]") else host

    def _server_credentials(self):
        if self.tls is None:
            return None
        from mesh import tls
        ca, cert, key = self.tls
        return tls.server_credentials(cert, key, client_ca=ca, require_client_auth=True)

    def _channel_credentials(self):
        if self.tls is None:
            return None
        from mesh import tls
        ca, cert, key = self.tls
        return tls.channel_credentials(ca, cert, key)

    @staticmethod
    def _secret(cmd: M.MigrationCommand) -> bytes:
        from mesh.checkpoint.transfer_auth import check_secret
        if not cmd.secret:
            raise RuntimeError("the control plane sent no transfer secret for this migration (an older control "
                               "plane?): refused")
        return check_secret(cmd.secret, "MigrationCommand.secret")

    def _key(self, tenant: str) -> bytes | None:
        if not self.keys_file:
            return None
        from mesh.checkpoint.store import load_keys
        return load_keys(self.keys_file).get(tenant)

    def _store_path(self, rel: str) -> str:
        if not self.checkpoint_dir:
            raise RuntimeError(f"node {self.agent.node} has no checkpoint store: set checkpoint_dir")
        path = os.path.normpath(os.path.join(self.checkpoint_dir, rel))
        if not path.startswith(os.path.normpath(self.checkpoint_dir) + os.sep):
            raise RuntimeError(f"checkpoint path {rel!r} leaves the store")
        return path
