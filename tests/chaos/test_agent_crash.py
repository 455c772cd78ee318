"""Scenario 4: SIGKILL an agent while it creates a MIG instance; after a restart the slice is
adopted (READY) or cleaned, and no half-made or orphan instance is left in the device state."""

from __future__ import annotations

import json
import os
import time

from gpumesh.v1 import types_pb2
from tests.chaos import invariants
from tests.chaos.conftest import wait_for
from tools.localcluster import LocalCluster, sim_hosts

TENANT = "chaos"


def instances(state_file) -> list[tuple[int, int, int]]:
    """(gpu index, start, compute instances) of every GPU instance in the simulated device state."""
    state = json.loads(state_file.read_text())
    return [(i, gi["start"], len(gi.get("cis", []))) for i, g in enumerate(state["gpus"]) for gi in g.get("gis", [])]


def test_agent_killed_during_instance_creation(tmp_path, figures):
    env = dict(os.environ, GPUMESH_SIM_CREATE_DELAY="4")
    cluster = LocalCluster(tmp_path, sim_hosts(1, 2), lease_ttl=3, agents_per_process=1, etcd_members=1,
                           env=env, log_level="warning")
    node = cluster.nodes[0]
    state_file = cluster.state_dir / "agents" / cluster.agent_for(node) / "sim" / f"{node}.state.json"
    try:
        cluster.start(timeout=60)
        t0 = time.monotonic()
        with cluster.client(timeout=30) as mesh:
            resp = mesh.allocate(tenant=TENANT, mig_profile="3g.40gb", request_id="crash-1", no_wait=True)
            # The agent made the GPU instance and sleeps before the compute instance: kill it there.
            wait_for(lambda: any(ci == 0 for _, _, ci in instances(state_file)), 15, "a half-made GPU instance")
            cluster.kill_agent(node)
            half_made = [x for x in instances(state_file) if x[2] == 0]
            assert half_made, "the kill should leave a GPU instance without its compute instance"
            cluster.env = dict(os.environ)          # the restarted agent runs at full speed
            cluster.start_agent(node)
            cluster.wait_ready(timeout=30)

            def settled():
                got = {s.id: s for s in mesh.list_slices(tenant=TENANT)}
                return all(s.state == types_pb2.SLICE_STATE_READY for s in got.values()) and got

            slices = wait_for(settled, 30, "the slice adopted (READY) or cleaned")
        seconds = time.monotonic() - t0
        live = instances(state_file)
        # Every GPU instance is complete and belongs to a slice; every READY slice has its instance.
        assert all(ci >= 1 for _, _, ci in live), f"half-made instances left: {live}"
        assert sorted((s.gpu_index, s.placement.start) for s in slices.values()) == sorted((i, st) for i, st, _ in live)
        rep = invariants.check(cluster.etcd_endpoints, tenant=TENANT, acked={"crash-1": resp.allocation_id})
        assert rep.ok, str(rep)
        figures["4-agent-kill-mid-create"] = {"allocations": 1, "faults": 1, "half_made_instances": len(half_made),
                                              "outcome": "adopted" if slices else "cleaned",
                                              "seconds": round(seconds, 2), "lost": len(rep.lost),
                                              "duplicated": len(rep.duplicated), "violations": len(rep.violations)}
    finally:
        cluster.stop(grace=5)
