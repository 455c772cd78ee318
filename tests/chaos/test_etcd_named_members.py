"""etcd members named by host (docs/operations.md: https://etcd-1:2379, ...): with the first one killed, the
store moves on to the others, its leader session stays alive and its writes go on."""

from __future__ import annotations

import asyncio
import time

from controlplane.state.store import EtcdStore, Put
from mesh import errors
from tools.etcdcluster import EtcdCluster


def test_first_named_member_killed_the_store_fails_over(tmp_path, figures):
    async def scenario(cluster: EtcdCluster) -> dict:
        st = EtcdStore([e.replace("127.0.0.1", "localhost") for e in cluster.endpoints], timeout=3)
        await st.connect()
        await st.become_leader("cp-named", ttl=3, wait=5)
        await st.commit([Put(b"/gpumesh/v1/chaos/named", b"0")])
        cluster.kill(0)
        t0, failed = time.monotonic(), 0
        for i in range(20):
            try:
                await st.commit([Put(b"/gpumesh/v1/chaos/named", str(i).encode())])
                break
            except errors.Unavailable:      # the write in flight when the member died: a clean refusal
                failed += 1
                await asyncio.sleep(0.2)
        took = time.monotonic() - t0
        await asyncio.sleep(4)              # past the session's TTL: kept alive through another member
        assert not st.lost_leadership.is_set()
        await st.commit([Put(b"/gpumesh/v1/chaos/named", b"last")])
        await st.close()
        return {"faults": 1, "refused_writes": failed, "failover_seconds": round(took, 2)}

    with EtcdCluster(tmp_path / "etcd", members=3) as cluster:
        got = asyncio.run(scenario(cluster))
    assert got["refused_writes"] <= 3
    figures["etcd_named_member_killed"] = got


def test_first_member_frozen_the_store_moves_on(tmp_path, figures):
    # a hung host (SIGSTOP: connections stay open, nothing answers); IPv4 endpoints, as the chaos cluster has them
    import os
    import signal

    async def scenario(cluster: EtcdCluster) -> dict:
        st = EtcdStore(cluster.endpoints, timeout=2)
        await st.connect()
        await st.become_leader("cp-frozen", ttl=5, wait=5)
        os.kill(cluster.members[0].proc.pid, signal.SIGSTOP)
        try:
            t0, failed = time.monotonic(), 0
            for i in range(10):
                try:
                    await st.commit([Put(b"/gpumesh/v1/chaos/frozen", str(i).encode())])
                    break
                except errors.Unavailable:
                    failed += 1
            took = time.monotonic() - t0
            await asyncio.sleep(6)             # past the session's TTL
            assert not st.lost_leadership.is_set()
            await st.commit([Put(b"/gpumesh/v1/chaos/frozen", b"last")])
        finally:
            os.kill(cluster.members[0].proc.pid, signal.SIGCONT)
            await st.close()
        return {"faults": 1, "refused_writes": failed, "failover_seconds": round(took, 2)}

    with EtcdCluster(tmp_path / "etcd", members=3) as cluster:
        got = asyncio.run(scenario(cluster))
    assert got["refused_writes"] <= 3
    figures["etcd_first_member_frozen"] = got
