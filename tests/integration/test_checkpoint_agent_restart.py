"""A Checkpoint call survives the agent restarting in the middle of it: the control plane asks again every
few seconds and the agent's step is repeat-safe by checkpoint id (nodeagent/migrate_checkpoint.py). The agent
SIGKILLs itself on receiving CHECKPOINT (test hook MESH_AGENT_TEST_CRASH_AT=checkpoint); without the re-send
the call would wait for the copy timeout (30 min)."""

from __future__ import annotations

import base64
import os
import sys
import threading

import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

from gpumesh.v1 import types_pb2 as t  # noqa: E402
from tests.integration.conftest import client_for_test, json_lines, wait_for, workload_cluster  # noqa: E402
from tests.unit._checkpoint_util import ROOT  # noqa: E402

pytestmark = pytest.mark.integration
HOSTS = [{"node": "ck-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
TRAIN = [sys.executable, "-m", "tools.examples.train_mnist_like", "--steps", "3000", "--sleep-ms", "20",
         "--print-every", "5"]
KEY = base64.b64encode(bytes(range(32))).decode()


def test_checkpoint_answers_after_the_agent_restarts_mid_call(tmp_path):
    (tmp_path / "keys.yaml").write_text(f"sealed: {KEY}\n")
    hooked = {**os.environ, "MESH_AGENT_TEST_CRASH_AT": "checkpoint"}
    with workload_cluster(tmp_path / "c", HOSTS, env=hooked,
                          agent_args=["--workload-stop-grace-seconds", "2", "--checkpoint-dir", str(tmp_path / "store"),
                                      "--checkpoint-keys-file", str(tmp_path / "keys.yaml")]) as cluster:
        cluster.env = None               # agents started from here on run without the hook
        with client_for_test(cluster, stop_workloads=True) as mesh:
            s = mesh.allocate(tenant="sealed", mig_profile="1g.10gb").slices[0]
            w = mesh.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)})
            assert w.state == t.WORKLOAD_STATE_RUNNING
            wait_for(lambda: max((d.get("step", 0) for d in json_lines(mesh, w.id)), default=0) >= 10, 60,
                     "training to reach step 10")
            agent = cluster.agents[cluster.agent_for("ck-a")]
            result: dict = {}

            def call() -> None:
                try:
                    result["ck"] = mesh.checkpoint(w.id, timeout=300)
                except Exception as e:   # noqa: BLE001 - asserted below
                    result["error"] = e
            th = threading.Thread(target=call, daemon=True)
            th.start()
            wait_for(lambda: not agent.running(), 30, "the agent to die on CHECKPOINT")
            assert "ck" not in result
            cluster.start_agent("ck-a")
            cluster.wait_ready(nodes=["ck-a"], timeout=30)
            wait_for(lambda: not th.is_alive(), 120, "the Checkpoint call to answer")
            assert "error" not in result, result.get("error")
            ck = result["ck"]
            assert ck.workload_id == w.id and ck.step >= 10 and ck.bytes > 0 and ck.encrypted
            assert (tmp_path / "store" / ck.path / "manifest.json").exists()
            assert mesh.get_workload(w.id).pid == w.pid          # the same process, checkpointed, not restarted
            assert [c.id for c in mesh.list_checkpoints(workload_id=w.id)] == [ck.id]
