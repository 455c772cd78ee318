"""The workload record across a migration (controlplane/controllers/migration_records.py): the spec the target agent
starts from and the record written at the commit keep everything that is still true (a model server's `backend` with
its replica key and pinned artifact, its `endpoint`, labels, tenant, env, command, created_at) and change only what
belongs to the source's process or placement; a model server is refused in any mode but transparent. On the agent,
a transparently restored target's runner record keeps them, across an agent restart too, so the load scraper reads
it (nodeagent/backends/loadscraper.py)."""

from __future__ import annotations

import asyncio
import os
import sys
import types

import pytest

from controlplane.controllers.migration_records import check_mode, committed_record, target_spec
from controlplane.controllers.migrations import MigrationManager
from controlplane.state.fleet import Fleet
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as t
from mesh import errors
from nodeagent.backends.loadscraper import LoadScraper

KEY = "k" * 43
SHA = "ab" * 32
CERT = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"


def replica_workload(**more) -> t.Workload:
    """A deployment replica's model server as the control plane records it once it ran on node a."""
    w = t.Workload(id="w-1", slice_id="s-src", node="a", tenant="acme", state=t.WORKLOAD_STATE_RUNNING, pid=4242,
                   command=["python", "-m", "llama_cpp.server", "--port", "40001"],
                   env={"FOO": "bar", "GPUMESH_RESTORE_FROM": "receive:x@h:0", "GPUMESH_RESTORE_HOLD": "1",
                        "GPUMESH_TRANSFER_SECRET_FILE": "/x/transfer-secret"},
                   labels={"gpumesh.io/deployment": "chat", "gpumesh.io/replica": "r-1",
                           "gpumesh.io/isolation": "criu"},
                   endpoint="127.0.0.1:40001", endpoint_certificate=CERT, message="", **more)
    w.backend.CopyFrom(t.ServingBackend(kind="llama.cpp", artifact="/models/smol.gguf", served_name="smol", context=512,
                                       concurrency=2, gpu_layers=-1, api_key=KEY, artifact_sha256=SHA))
    w.created_at.FromSeconds(1000)
    w.started_at.FromSeconds(1001)
    return w


def migration(mode=M.MIGRATION_MODE_TRANSPARENT, **more) -> M.Migration:
    fields = dict(id="m-1", workload_id="w-1", tenant="acme", mode=mode, source_node="a", source_slice="s-src",
                  target_node="b", target_slice="s-dst")
    return M.Migration(**{**fields, **more})


NO_SLICES = types.SimpleNamespace(ctl=types.SimpleNamespace(fleet=Fleet()))   # a manager whose fleet knows no slice


def test_the_target_spec_keeps_the_backend_key_endpoint_and_labels():
    """What START_TARGET carries (the manager's `_target_spec`, the path every migration kind takes)."""
    w = replica_workload()
    spec = MigrationManager._target_spec(NO_SLICES, migration(), w)
    assert spec.HasField("backend") and spec.backend == w.backend          # kind, artifact, ..., key, sha256
    assert spec.backend.api_key == KEY and spec.backend.artifact_sha256 == SHA
    assert spec.endpoint == w.endpoint and list(spec.command) == list(w.command)
    assert spec.endpoint_certificate == CERT                                # a transparent target serves the same
    assert dict(spec.labels) == dict(w.labels) and spec.tenant == "acme" and spec.created_at == w.created_at
    assert dict(spec.env) == {"FOO": "bar"}                                 # an earlier restore's variables go
    assert (spec.id, spec.node, spec.slice_id, spec.state) == ("w-1", "b", "s-dst", t.WORKLOAD_STATE_PENDING)
    assert spec.pid == 0 and not spec.HasField("started_at") and not spec.HasField("finished_at")
    assert w.env["GPUMESH_RESTORE_HOLD"] == "1" and w.node == "a"           # the record itself is untouched


def test_a_same_node_target_runs_under_its_alias_with_everything_else():
    m = migration(mode=M.MIGRATION_MODE_PRECOPY, target_node="a")
    w = t.Workload(id="w-1", slice_id="s-src", node="a", tenant="acme", command=["train"], labels={"x": "y"})
    spec = MigrationManager._target_spec(NO_SLICES, m, w)
    assert spec.id == "w-1~m-1" and spec.node == "a" and dict(spec.labels) == {"x": "y"}
    assert target_spec(w, "w-1", "s-dst", "b").command == ["train"]


def test_the_committed_record_of_a_transparent_move_keeps_pid_endpoint_and_backend():
    w = replica_workload()
    n = committed_record(w, migration(), step=0)
    assert (n.node, n.slice_id, n.state, n.exit_code) == ("b", "s-dst", t.WORKLOAD_STATE_RUNNING, 0)
    assert n.backend == w.backend and n.endpoint == w.endpoint and n.pid == 4242   # CRIU: same PID, same socket
    assert n.endpoint_certificate == CERT           # ... and the same TLS key, in the restored server's memory
    assert dict(n.labels) == dict(w.labels) and n.tenant == "acme" and list(n.command) == list(w.command)
    assert n.created_at == w.created_at and "migrated from a" in n.message and not n.HasField("finished_at")


def test_the_committed_record_of_a_restarted_process_waits_for_its_new_pid_and_port():
    w = replica_workload()
    n = committed_record(w, migration(mode=M.MIGRATION_MODE_PRECOPY), step=7)
    assert n.pid == 0 and n.endpoint == ""          # the target agent reports its own (a new port)
    assert n.endpoint_certificate == ""             # ... and its server's new certificate
    assert n.backend == w.backend and "at step 7" in n.message
    plain = t.Workload(id="w-2", node="a", slice_id="s", pid=9, endpoint="", command=["x"])
    assert committed_record(plain, migration(mode=M.MIGRATION_MODE_STOP_AND_COPY, resize_slice="s"), 1).slice_id == "s"
    ck = committed_record(plain, migration(mode=M.MIGRATION_MODE_STOP_AND_COPY, checkpoint_id="ck-1"), 3)
    assert ck.pid == 0 and "restored from checkpoint ck-1 at step 3" in ck.message


def test_a_model_server_moves_only_transparently():
    w = replica_workload()
    for mode in (M.MIGRATION_MODE_PRECOPY, M.MIGRATION_MODE_STOP_AND_COPY):
        with pytest.raises(errors.FailedPrecondition, match="mode transparent"):
            check_mode(w, mode)
    check_mode(w, M.MIGRATION_MODE_TRANSPARENT)
    check_mode(t.Workload(id="w-2", command=["train"]), M.MIGRATION_MODE_PRECOPY)


# -- the target agent's record ------------------------------------------------------------------------------------


def _agent(state_dir, tmp_path):
    from nodeagent.agent import NodeAgent
    from nodeagent.gpu import NvmlGpus
    from nodeagent.hostfile import make_host
    from nodeagent.nvml import load_nvml
    from nodeagent.workloads import WorkloadRunner
    nvml = load_nvml("sim", make_host("b", 1, "H100-80GB"), state_dir / "state.json")
    gpus = NvmlGpus(nvml)
    gpus.init()
    agent = NodeAgent("b", "127.0.0.1:1", gpus, mps_root=str(tmp_path / "mps"), ib_root=None)
    return agent, gpus, WorkloadRunner(agent, str(tmp_path / "wl"), stop_grace=1.0, poll_interval=0.05).install()


async def test_a_restored_targets_runner_record_keeps_backend_and_endpoint(state_dir, tmp_path):
    """The target agent's side of a transparent move: the shim adopts the restored process (here a detached
    `sleep` that a stand-in for `criu restore --restore-detached --pidfile` starts) and the runner's record is the
    control plane's spec: backend, key and endpoint included, so the load scraper reads that replica; a restarted
    agent loads the same record."""
    from gpumesh.v1 import node_service_pb2
    agent, gpus, runner = _agent(state_dir, tmp_path)
    inv = gpus.inventory()[0]
    s = t.Slice(id="s-dst", node="b", gpu_index=0, gpu_uuid=inv.uuid, isolation=t.ISOLATION_MIG, profile="1g.10gb",
                memory_bytes=10 << 30)
    await agent._apply(node_service_pb2.DesiredSlices(full=True, upserts=[s]), asyncio.Queue())
    spec = target_spec(replica_workload(), "w-1", "s-dst", "b")
    pidfile = tmp_path / "restored.pid"
    restore = [sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen(['sleep', '30'], "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, "
               "start_new_session=True); open(sys.argv[1], 'w').write(str(p.pid))", str(pidfile)]
    w = await asyncio.to_thread(runner.start, spec, (restore, str(pidfile)))
    try:
        assert w.state == t.WORKLOAD_STATE_RUNNING, w.message
        assert w.backend.api_key == KEY and w.backend.artifact_sha256 == SHA and w.endpoint == "127.0.0.1:40001"
        assert list(w.command) == list(spec.command)           # not rebuilt: the restored process is the same
        for _ in range(600):
            runner.check_all(report=False)
            if runner.workloads["w-1"].pid:
                break
            await asyncio.sleep(0.05)
        assert runner.workloads["w-1"].pid > 0, runner.workloads["w-1"].message
        targets = LoadScraper(lambda: runner.workloads.values()).targets()
        assert targets == [("w-1", "llama.cpp", "127.0.0.1:40001", KEY, CERT)]     # CRIU kept its TLS key too
        from nodeagent.workloads import WorkloadRunner
        reloaded = WorkloadRunner(agent, str(tmp_path / "wl"))
        assert reloaded.workloads["w-1"].backend == spec.backend and reloaded.workloads["w-1"].endpoint == w.endpoint
        assert LoadScraper(lambda: reloaded.workloads.values()).targets() == targets
    finally:
        pid = runner.workloads["w-1"].pid
        if pid:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        runner.stop("w-1")


def test_the_agents_load_scraper_leaves_dumped_and_held_processes_alone():
    """A scrape's connection open at the dump would make CRIU refuse the process (an established TCP socket); a
    restored target held stopped would not answer: the agent's scraper reads neither, and reads the target once
    it runs (RESUME_TARGET drops `criu_hold`)."""
    from types import SimpleNamespace

    from nodeagent.agent import NodeAgent

    def server(wid: str) -> t.Workload:
        return t.Workload(id=wid, state=t.WORKLOAD_STATE_RUNNING, endpoint=f"127.0.0.1:{len(wid)}",
                          backend=t.ServingBackend(kind="llama.cpp", api_key=KEY))
    runner = SimpleNamespace(workloads={w: server(w) for w in ("w-a", "w-bb", "w-ccc")},
                             meta={"w-a": {"frozen": "m-1"}, "w-bb": {"criu_hold": True, "migration": "m-2"},
                                   "w-ccc": {}})
    agent = SimpleNamespace(workload_runner=runner)
    scraper = NodeAgent.backend_loads(agent)
    assert [x[0] for x in scraper.targets()] == ["w-ccc"]
    del runner.meta["w-bb"]["criu_hold"]
    assert [x[0] for x in scraper.targets()] == ["w-bb", "w-ccc"]
