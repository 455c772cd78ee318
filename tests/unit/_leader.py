"""A slice Controller that is the leader over a real etcd, with its real group-commit writer running: the setup
that the tests of writes racing each other (slices, warm claims, releases, workloads, migrations) share. The
fixture adds its own nodes, slices and managers inside the `async with`, and stops those managers before it ends,
since they write through the writer that is stopped here."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from controlplane.controllers.slices import Controller
from controlplane.state.store import EtcdStore


class NullRecorder:
    """Events are not what these tests look at: emitting one does nothing."""

    def emit(self, *args, **kw) -> None:
        pass


@asynccontextmanager
async def leader_controller(etcd_server, identity: str, recorder=None,
                            **controller_kwargs) -> AsyncIterator[Controller]:
    """A Controller(store, **controller_kwargs) holding leadership as `identity` (TTL 30 s) with its writer
    started; `recorder` replaces the NullRecorder. On exit the writer is stopped, the session lease revoked (the
    next test's leader need not wait out the TTL) and the store closed."""
    store = EtcdStore([etcd_server.endpoint])
    await store.connect()
    await store.become_leader(identity, ttl=30)
    ctl = Controller(store, **controller_kwargs)
    ctl.recorder = recorder if recorder is not None else NullRecorder()
    ctl.writer.start()
    try:
        yield ctl
    finally:
        await ctl.writer.stop()
        await store.revoke_lease(store.session_lease)
        await store.close()
