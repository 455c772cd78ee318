"""Cost across a leader change on a real cluster: two control planes (each with its own state dir, so its own cost
ledger) over one etcd and a simulated host. A slice is charged by the leader; the leader is killed; the standby
takes over and charges the slice from the old leader's last accounting, not from its creation again: the two
ledgers added together are the slice's life once (the new leader charged the old one's seconds a second time)."""

from __future__ import annotations

import time

import pytest

from controlplane.cost.ledger import CostLedger
from mesh.client import MeshClient
from tests.integration.conftest import wait_for
from tools.localcluster import LocalCluster, sim_hosts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
INTERVAL = 1.0


def _ts(t) -> float:
    return t.seconds + t.nanos / 1e9


def _charged(ledger_path, sid: str) -> float:
    led = CostLedger(str(ledger_path))
    try:
        return sum(ln.slice_seconds for ln in led.query("slice", 0.0) if ln.key == sid)
    finally:
        led.close()


def test_a_new_leader_does_not_charge_the_old_leaders_seconds_again(tmp_path):
    cluster = LocalCluster(tmp_path, sim_hosts(1, 1), lease_ttl=3, agents_per_process=1, controlplanes=2,
                           etcd_members=1, log_level="warning",
                           controlplane_args=["--leader-ttl", "10", "--cost-interval-seconds", str(INTERVAL)])
    try:
        cluster.start(timeout=60)
        old = cluster.leader_index()
        new = 1 - old
        with MeshClient(cluster.cp_endpoints[old], timeout=10) as lead:
            s = lead.allocate(tenant="team-ha", mig_profile="1g.10gb").slices[0]

            def charged_on_old(least: float):
                got = lead.get_cost(by="slice", since_seconds=3600)
                line = next((ln for ln in got.lines if ln.key == s.id), None)
                return line if line is not None and line.slice_seconds >= least else None
            wait_for(lambda: charged_on_old(4.0), 60, "the leader to charge the slice 4 s")
        cluster.kill_controlplane(index=old)
        assert cluster.leader_index(timeout=60) == new
        old_seconds = _charged(tmp_path / cluster._cp_name(old) / "history.db", s.id)
        assert old_seconds >= 4.0
        with MeshClient(cluster.cp_endpoints[new], timeout=10) as lead:
            def charged_on_new():
                got = lead.get_cost(by="slice", since_seconds=3600)
                line = next((ln for ln in got.lines if ln.key == s.id), None)
                return line if line is not None and line.slice_seconds > 0 else None
            wait_for(charged_on_new, 60, "the new leader to charge the slice")
            lead.release(s.allocation_id)
            wait_for(lambda: not lead.list_slices(tenant="team-ha"), 60, "the slice released")
            released = time.time()
            ran = released - _ts(s.created_at)
            new_path = tmp_path / cluster._cp_name(new) / "history.db"
            # the new leader's ledger, written after its release: the slice's whole charge there
            total = wait_for(lambda: (lambda t: t if t >= ran - 2 * INTERVAL else None)(
                old_seconds + _charged(new_path, s.id)), 60, "the release charged on the new leader")
        # each second of the slice's life once, in one ledger or the other: at most the one accounting the old
        # leader wrote to its ledger but not yet to etcd, when it was killed in between, is charged twice
        assert total <= ran + INTERVAL + 0.5, (old_seconds, total, ran)
    finally:
        cluster.stop(grace=5)
