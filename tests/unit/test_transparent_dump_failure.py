"""A transparent migration whose CRIU dump fails while the workload runs on (CRIU let it go) leaves no images
behind: the source's images directory (`<runner dir>/<id>.criu-<migration>`, partial pages of the process's
memory) is removed with the failure; no later step knows it (the record's `criu_images` mark goes), so it
stayed on the node's disk for good."""

from __future__ import annotations

import os
import types

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from mesh.checkpoint.transfer_auth import new_secret
from nodeagent import workloads as wl
from nodeagent.migrate import MigrationAgent
from nodeagent.migrate_base import Job
from tests.unit._shims import kill_shims


class FailingCriu:
    def dump(self, pid, images, **kw):
        os.makedirs(images, mode=0o700, exist_ok=True)
        with open(os.path.join(images, "pages-1.img"), "wb") as f:
            f.write(b"\0" * 4096)          # what CRIU had written of the process's memory
        raise RuntimeError("criu dump of pid failed (status 1)")


def test_a_failed_dump_of_a_workload_that_runs_on_leaves_no_images(tmp_path, monkeypatch):
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()))
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY, device_uuid="GPU-x")}
    r = wl.WorkloadRunner(a, str(tmp_path / "w"))
    try:
        w = r.start(t.Workload(id="w-1", slice_id="s-1", command=["sleep", "60"]))
        assert w.state == t.WORKLOAD_STATE_RUNNING and w.pid
        m = MigrationAgent(a, r)
        monkeypatch.setattr(m, "_criu", lambda wid: FailingCriu())
        cmd = M.MigrationCommand(migration_id="m-1", action=M.MigrationCommand.SEND, workload_id="w-1",
                                 mode=M.MIGRATION_MODE_TRANSPARENT, address="127.0.0.1:1", session="s",
                                 secret=new_secret())
        job = Job("m-1", "w-1")
        m._run_send_transparent(job, cmd, lambda *a, **k: None)
        assert job.final.event == M.MigrationReport.FAILED and "criu dump" in job.final.message
        assert not r.meta["w-1"].get("frozen") and r.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING
        assert not os.path.exists(r.path("w-1", "criu-m-1")), os.listdir(r.path("w-1", "criu-m-1"))
    finally:
        kill_shims(r)
