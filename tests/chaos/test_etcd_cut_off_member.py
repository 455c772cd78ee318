"""An etcd member cut off from the quorum (the two others frozen): a watch through it ends with "no leader"
instead of staying open and silent, so a standby's follower reloads (elsewhere) rather than serving reads that
grow staler for as long as the cut lasts."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from controlplane.state.store import EtcdStore
from tools.etcdcluster import EtcdCluster


def test_a_watch_through_a_member_without_leader_ends(tmp_path, figures):
    async def scenario(cluster: EtcdCluster) -> float:
        st = EtcdStore([cluster.endpoints[0]], timeout=3)
        await st.connect()
        snap = await st.load()
        watch = await st.watch_prefix("/gpumesh/v1/", snap.revision + 1)
        for m in cluster.members[1:]:
            os.kill(m.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            with pytest.raises(Exception, match="no leader"):
                async with asyncio.timeout(20):       # before: TimeoutError, the watch open and silent
                    async for _ in watch:
                        pass
            return time.monotonic() - t0
        finally:
            for m in cluster.members[1:]:
                os.kill(m.proc.pid, signal.SIGCONT)
            await st.close()

    with EtcdCluster(tmp_path / "etcd", members=3) as cluster:
        took = asyncio.run(scenario(cluster))
    figures["etcd_member_cut_off_watch"] = {"faults": 1, "watch_ended_after_seconds": round(took, 2)}
