"""The checkpoint quota end to end: a control plane with checkpoint_quota_bytes smaller than a training
workload's checkpoint; the real SDK pushes it, the agent's store receiver refuses the entry past the limit, the
Checkpoint call fails with RESOURCE_EXHAUSTED naming the quota, nothing stays in the store and the workload runs
on (before, the store took every checkpoint whatever its tenant's total)."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

from gpumesh.v1 import types_pb2 as t  # noqa: E402
from mesh import errors  # noqa: E402
from tests.integration.conftest import client_for_test, json_lines, wait_for, workload_cluster  # noqa: E402
from tests.unit._checkpoint_util import ROOT  # noqa: E402

pytestmark = pytest.mark.integration
HOSTS = [{"node": "cq-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
TRAIN = [sys.executable, "-m", "tools.examples.train_mnist_like", "--steps", "3000", "--sleep-ms", "20",
         "--print-every", "5"]


def test_a_checkpoint_past_the_tenants_quota_is_refused_and_leaves_nothing(tmp_path):
    store = tmp_path / "store"
    with workload_cluster(tmp_path / "c", HOSTS, controlplane_args=["--checkpoint-quota-bytes", "1000"],
                          agent_args=["--workload-stop-grace-seconds", "2", "--checkpoint-dir", str(store)]) as cluster:
        with client_for_test(cluster, stop_workloads=True) as mesh:
            s = mesh.allocate(tenant="small", mig_profile="1g.10gb").slices[0]
            w = mesh.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)})
            assert w.state == t.WORKLOAD_STATE_RUNNING
            wait_for(lambda: max((d.get("step", 0) for d in json_lines(mesh, w.id)), default=0) >= 10, 60,
                     "training to reach step 10")
            with pytest.raises(errors.ResourceExhausted) as e:
                mesh.checkpoint(w.id, timeout=300)
            msg = str(e.value)
            assert "'small'" in msg and "checkpoint_quota_bytes" in msg and "meshctl get checkpoints" in msg, msg
            assert mesh.list_checkpoints(workload_id=w.id) == []
            left = [p for p in (store / "small" / w.id).iterdir()] if (store / "small" / w.id).exists() else []
            assert left == [], left
            got = mesh.get_workload(w.id)
            assert got.state == t.WORKLOAD_STATE_RUNNING and got.pid == w.pid      # it trains on
            _, usage = mesh.list_checkpoints_usage(tenant="small")
            assert [(u.tenant, u.bytes, u.limit_bytes) for u in usage] == [("small", 0, 1000)]
