"""The replicas' model-server API keys without a cluster: the key store (controlplane/serving/replicakeys.py) over
an in-memory stand-in of the etcd store with the same Put/Delete/load semantics, the one redaction of workloads
the API returns, the agent's hand-over through the environment only, and the gateway's use of the keys. The real
path (etcd, agents, llama.cpp servers that refuse requests without the key) is tests/integration/test_replica_keys.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from controlplane.controllers.workloads import WorkloadService
from controlplane.gateway import proxy
from controlplane.gateway.view import FleetView
from controlplane.serving import replicakeys
from controlplane.serving.deploystore import DeploymentStore
from controlplane.state import keys
from controlplane.state.store import Delete, Present, Put, Snapshot
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import servingview_service_pb2 as V
from gpumesh.v1 import types_pb2, workload_service_pb2
from mesh import errors
from nodeagent import backends


class MemoryEtcd:
    """`ctl.store.load(prefix)` and `ctl.writer.write(ops)` over a dict, as EtcdStore and the Writer do them."""

    def __init__(self) -> None:
        self.kv: dict[bytes, bytes] = {}
        self.revision = 0

    async def load(self, prefix: str) -> Snapshot:
        p = prefix.encode()
        return Snapshot(self.revision, {k: (v, self.revision, 0) for k, v in self.kv.items() if k.startswith(p)})

    async def write(self, ops, conditions=()) -> int:
        for c in conditions:                      # the Writer's transaction: all or nothing
            if isinstance(c, Present) != (c.key in self.kv):
                raise errors.Aborted(f"condition on {c.key!r} failed")
        self.revision += 1
        for op in ops:
            if isinstance(op, Put):
                self.kv[op.key] = op.value
            elif isinstance(op, Delete):
                self.kv.pop(op.key, None)
        return self.revision


def ctl_of(etcd: MemoryEtcd):
    return SimpleNamespace(store=etcd, writer=etcd)


async def test_a_key_is_made_once_per_replica_kept_durably_and_reloaded():
    etcd = MemoryEtcd()
    for rid in ("r-1", "r-2"):
        etcd.kv[keys.replica("chat", rid)] = D.Replica(id=rid, deployment="chat").SerializeToString()
    store = replicakeys.ReplicaKeys(ctl_of(etcd))
    assert store.get("r-1") == ""
    k1 = await store.ensure("chat", "r-1")
    assert await store.ensure("chat", "r-1") == k1               # a restarted backend keeps its replica's key
    assert len(k1) >= 43 and k1.replace("-", "").replace("_", "").isalnum()   # token_urlsafe(32): 256 bits
    k2 = await store.ensure("chat", "r-2")
    assert k2 != k1                                              # one key per replica
    assert etcd.kv[keys.replica_key("chat", "r-1")] == k1.encode()
    assert keys.replica_key("chat", "r-1") == b"/gpumesh/v1/replica-keys/chat/r-1"
    # a new leader (a restarted control plane) reads the same keys
    again = replicakeys.ReplicaKeys(ctl_of(etcd))
    await again.load()
    assert again.get("r-1") == k1 and again.get("r-2") == k2
    assert again.of(["r-2", "r-9"]) == {"r-2": k2}


async def test_a_removed_replica_takes_its_key_with_it():
    etcd = MemoryEtcd()
    store = DeploymentStore(ctl_of(etcd))
    r = D.Replica(id="r-1", deployment="chat")
    await store.put_replica(r)
    key = await store.keys.ensure("chat", "r-1")
    # the key is in neither the replica record nor what Get answers
    assert key.encode() not in etcd.kv[keys.replica("chat", "r-1")]
    store.deployments["chat"] = D.Deployment(spec=D.DeploymentSpec(name="chat"))
    assert key.encode() not in store.full("chat").SerializeToString()
    await store.delete_replica(r)
    assert keys.replica_key("chat", "r-1") not in etcd.kv and store.keys.get("r-1") == ""
    # a start racing the delete writes no key that would outlive the replica
    with pytest.raises(errors.Aborted):
        await store.keys.ensure("chat", "r-1")
    assert keys.replica_key("chat", "r-1") not in etcd.kv and store.keys.get("r-1") == ""
    reloaded = DeploymentStore(ctl_of(etcd))
    await reloaded.load()
    assert reloaded.keys.get("r-1") == ""


def _backend_workload(key: str = "s3cret-key-0123456789") -> types_pb2.Workload:
    return types_pb2.Workload(id="w-1", tenant="team-a", slice_id="s-1", env={"A": "1"},
                              backend=types_pb2.ServingBackend(kind="llama.cpp", artifact="/m/x.gguf", api_key=key))


def test_redacted_clears_the_key_of_a_copy_only():
    w = _backend_workload()
    out = replicakeys.redacted(w)
    assert out is not w and not out.backend.api_key and b"s3cret" not in out.SerializeToString()
    assert out.backend.artifact == "/m/x.gguf" and dict(out.env) == {"A": "1"}
    assert w.backend.api_key == "s3cret-key-0123456789"          # the record itself keeps it (the agent needs it)
    plain = types_pb2.Workload(id="w-2", command=["sleep", "1"])
    assert replicakeys.redacted(plain) is plain


async def test_the_workload_service_never_returns_the_key():
    w = _backend_workload()

    async def run(req):
        return w

    async def stop(wid, grace=0.0):
        return w
    manager = SimpleNamespace(workloads={"w-1": w}, get=lambda wid: w, list=lambda *a: [w], run=run,
                              stop_workload=stop, ctl=SimpleNamespace(fleet=SimpleNamespace(slices={})))
    svc = WorkloadService(manager)
    answers = [
        await WorkloadService.Get.__wrapped__(svc, workload_service_pb2.GetWorkloadRequest(id="w-1"), None),
        await WorkloadService.List.__wrapped__(svc, workload_service_pb2.ListWorkloadsRequest(), None),
        await WorkloadService.Stop.__wrapped__(svc, workload_service_pb2.StopWorkloadRequest(id="w-1"), None),
        await WorkloadService.Run.__wrapped__(svc, workload_service_pb2.RunWorkloadRequest(slice_id="s-1"), None),
    ]
    for a in answers:
        assert b"s3cret" not in a.SerializeToString(), type(a).__name__
    assert answers[1].workloads[0].backend.kind == "llama.cpp"
    assert w.backend.api_key                                     # untouched in the manager's record


def test_the_agent_hands_the_key_over_in_the_environment_only():
    for kind, var in (("llama.cpp", "API_KEY"), ("vllm", "VLLM_API_KEY")):
        w = _backend_workload()
        w.backend.kind = kind
        assert backends.secret_environment(w) == {var: "s3cret-key-0123456789"}
    w = _backend_workload()
    backends.prepare(w, "127.0.0.1", "/venv/bin/python")
    assert "s3cret" not in " ".join(w.command)                  # /proc/<pid>/cmdline is world-readable
    assert "s3cret" not in " ".join(f"{k}={v}" for k, v in w.env.items())   # the record's env is reported
    assert backends.secret_environment(_backend_workload(key="")) == {}
    assert backends.secret_environment(types_pb2.Workload(id="w-3", command=["x"])) == {}


def test_the_gateway_sends_each_replica_its_own_key():
    view = V.ServingView()
    d = view.deployments.add()
    d.spec.name, d.spec.model, d.spec.tenant = "chat", "smol", "team-a"
    for rid, ep in (("r-1", "127.0.0.1:1"), ("r-2", "127.0.0.1:2")):
        d.replicas.add(id=rid, deployment="chat", endpoint=ep, state=D.REPLICA_STATE_READY)
    view.replica_api_keys["r-1"] = "key-one-0123456789"
    fv = FleetView()
    fv.apply(view)
    r1, r2 = fv.deployments["chat"].replicas
    assert (r1.api_key, r2.api_key) == ("key-one-0123456789", "")
    assert "key-one" not in repr(r1)                              # never in a log line that prints a replica
    assert proxy.headers_for(r1.api_key)["authorization"] == "Bearer key-one-0123456789"
    assert "authorization" not in proxy.headers_for(r2.api_key)


def test_the_load_scraper_sends_the_key(tmp_path):
    """vLLM's /metrics is behind the key (nodeagent/backends/vllm.py GUARD_ALL_PATHS): the agent's scraper reads it
    with the workload's key, over a real socket, and a server that refuses says so in the load's error."""
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from nodeagent.backends.loadscraper import LoadScraper
    page = (b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 2.0\n"
            b"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 1.0\n")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):        # noqa: N802 - http.server's name
            ok = self.headers.get("authorization") == "Bearer s3cret-key-0123456789"
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(page if ok else b'{"error": "Unauthorized"}')

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        w = _backend_workload()
        w.backend.kind, w.endpoint, w.state = "vllm", f"127.0.0.1:{server.server_port}", types_pb2.WORKLOAD_STATE_RUNNING
        (load,) = asyncio.run(LoadScraper(lambda: [w], timeout=10).read())
        assert load.scraped and load.requests_running == 2, load.error
        w.backend.api_key = "wrong"
        (load,) = asyncio.run(LoadScraper(lambda: [w], timeout=10).read())
        assert not load.scraped and "401" in load.error
    finally:
        server.shutdown()


@pytest.mark.parametrize("status, failed", [(401, True), (403, True), (500, True), (400, False), (404, False)])
def test_a_backend_refusing_the_gateways_key_fails_the_replica_not_the_client(status, failed):
    """A 401/403 from a model server means the gateway's key for it is missing or stale: the replica failed
    (retried elsewhere, else 502), the client is not told it is unauthenticated; other 4xx are the request's."""
    import asyncio

    import httpx

    from controlplane.gateway import proxy
    from controlplane.gateway.apierror import APIError

    def answer(request):
        return httpx.Response(status, json={"error": {"message": "nope"}})

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            for call in (proxy.complete(client, "r:1", "/v1/completions", b"{}", api_key="k"),
                         proxy.open_stream(client, "r:1", "/v1/completions", b"{}", api_key="k")):
                with pytest.raises(proxy.BackendFailed if failed else APIError) as e:
                    await call
                if status in (401, 403):
                    assert "refused the gateway's key" in str(e.value)
    asyncio.run(main())
