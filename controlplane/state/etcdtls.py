"""etcd over TLS: an `aetcd.Client` whose channel is a secure one.

aetcd's `connect()` only opens insecure channels. `TlsClient` opens the same
stubs over `grpc.aio.secure_channel` with the CA (and client certificate) given,
and then authenticates with username and password as aetcd does when both are set.
"""

from __future__ import annotations

import asyncio

import aetcd
from aetcd import rpc, watcher
from aetcd.client import _handle_errors

from mesh import tls


def credentials(ca: str = "", cert: str = "", key: str = ""):
    """Channel credentials for etcd: verify it against `ca` (else the system roots); present `cert`/`key`."""
    return tls.channel_credentials(ca, cert, key)


REQUIRE_LEADER = ("hasleader", "true")
"""gRPC metadata etcd's clientv3 sends with `WithRequireLeader`: a member cut off from the quorum then answers
"no leader" (UNAVAILABLE) at once and ends its watch streams so. Without it a watch there stays open and silent
for as long as the cut lasts (a standby's follower served reads ever staler), and calls wait for their deadline."""


class TlsClient(aetcd.Client):
    def __init__(self, *args, credentials=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials
        self.metadata = (REQUIRE_LEADER,)

    async def connect(self) -> None:
        await self._connect()
        if REQUIRE_LEADER not in (self.metadata or ()):     # authentication replaced the metadata with its token
            self.metadata = tuple(self.metadata or ()) + (REQUIRE_LEADER,)
            if self._watcher is not None:
                self._watcher._metadata = self.metadata

    @_handle_errors
    async def _connect(self) -> None:
        if self._credentials is None:
            return await super().connect()
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(target, self._credentials, options=self._options.items())
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False
