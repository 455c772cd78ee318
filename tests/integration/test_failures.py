"""Failures are seen and state stays bounded, against a real cluster (issue 10, section 4).

One plaintext cluster with a tenants file (an admin token and an agent token for its one node), a
watcher queue bound of 8, and a retention of 2 seconds: a stalled watcher is cut off with
RESOURCE_EXHAUSTED; anonymous callers cannot act as an agent; finished workloads expire from the API,
etcd and the agent's files."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
import yaml

from controlplane.state import keys
from gpumesh.v1 import node_service_pb2, node_service_pb2_grpc, slice_service_pb2, types_pb2
from tests.integration.conftest import wait_for
from tools.localcluster import LocalCluster

pytestmark = pytest.mark.integration

ADMIN = "admin-token-for-failures-0123456789"
AGENT = "agent-token-gpu-f-0123456789abcdef"
HOSTS = [{"node": "gpu-f", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
LIMIT = 8


@pytest.fixture(scope="module")
def fcl(tmp_path_factory):
    d = tmp_path_factory.mktemp("failures")
    tenants = d / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": {"team-a": {}}, "tokens": [
        {"name": "ops", "role": "admin", "token": ADMIN},
        {"name": "gpu-f", "role": "agent", "token": AGENT}]}))
    c = LocalCluster(d / "cluster", HOSTS, lease_ttl=3, agents_per_process=1, tenants_file=str(tenants),
                     client_auth={"token": ADMIN}, agent_args=["--agent-token", AGENT],
                     controlplane_args=["--watch-queue-limit", str(LIMIT), "--retention-seconds", "2",
                                        "--retention-interval-seconds", "0.5"])
    c.start(timeout=90)
    yield c
    c.stop()


def _meta(token):
    return [("authorization", f"Bearer {token}")] if token else []


@pytest.mark.parametrize("who", [None, ADMIN])
def test_anonymous_or_client_callers_cannot_act_as_an_agent(fcl, who):
    """Insecure mode with a tenants file: before, an anonymous caller passed as any agent."""
    with grpc.insecure_channel(fcl.endpoint) as ch:
        stub = node_service_pb2_grpc.NodeServiceStub(ch)
        for call in (lambda: stub.Register(node_service_pb2.RegisterRequest(node_name="gpu-f"), timeout=10,
                                           metadata=_meta(who)),
                     lambda: stub.Heartbeat(node_service_pb2.HeartbeatRequest(node_name="gpu-f"), timeout=10,
                                            metadata=_meta(who)),
                     lambda: list(stub.Sync(iter([node_service_pb2.AgentMessage(
                         hello=node_service_pb2.SyncHello(node_name="gpu-f"))]), timeout=10, metadata=_meta(who)))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), \
                e.value.details()
            assert "agent" in e.value.details()


def test_agent_token_is_the_identity_of_one_node(fcl):
    fcl.wait_ready(timeout=60)          # the real agent, with its token, registered and syncs
    with grpc.insecure_channel(fcl.endpoint) as ch:
        stub = node_service_pb2_grpc.NodeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Heartbeat(node_service_pb2.HeartbeatRequest(node_name="gpu-other"), timeout=10, metadata=_meta(AGENT))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_stalled_watcher_is_cut_off_with_resource_exhausted(fcl):
    fcl.wait_ready(timeout=60)
    # a small receive window, so a client that stops reading stalls the server's sends quickly
    opts = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(fcl.endpoint, options=opts) as ch, fcl.client(timeout=30) as admin:
        watch = slice_service_pb2_grpc_stub(ch).Watch(slice_service_pb2.WatchSlicesRequest(), metadata=_meta(ADMIN))
        first = next(watch)
        assert first.type == slice_service_pb2.SliceEvent.SYNCED
        # the client stops reading; the fleet changes far more than LIMIT times meanwhile
        for _ in range(12):
            a = admin.allocate(mig_profile="1g.10gb", gpu_model="H100-80GB", tenant="team-a")
            admin.release(a.allocation_id)
        time.sleep(3)                   # past the cut-off grace: the server has ended the call
        got = 0
        with pytest.raises(grpc.RpcError) as e:
            for _ in watch:             # the old server never ended it: this waited forever
                got += 1
                assert got < 10_000
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "SliceService.Watch fell behind by" in e.value.details() and "list again" in e.value.details()
        # the server is fine, and a new watch works
        again = slice_service_pb2_grpc_stub(ch).Watch(slice_service_pb2.WatchSlicesRequest(), metadata=_meta(ADMIN),
                                                      timeout=10)
        assert next(again).type == slice_service_pb2.SliceEvent.SYNCED
        again.cancel()


def slice_service_pb2_grpc_stub(ch):
    from gpumesh.v1 import slice_service_pb2_grpc
    return slice_service_pb2_grpc.SliceServiceStub(ch)


def _etcd_keys(cluster, prefix: str) -> list[str]:
    import aetcd
    ports = json.loads((cluster.etcd_data_dir / "ports.json").read_text())

    async def load():
        client = aetcd.Client(host="127.0.0.1", port=ports["client"], timeout=5)
        try:
            res = await client.get_prefix(prefix.encode())
            return [kv.key.decode() for kv in res.kvs]
        finally:
            await client.close()
    return asyncio.run(load())


def test_finished_workloads_expire_with_their_log_files(fcl):
    fcl.wait_ready(timeout=60)
    with fcl.client(timeout=30) as admin:
        a = admin.allocate(mig_profile="1g.10gb", gpu_model="H100-80GB", tenant="team-a")
        try:
            w = admin.run_workload(a.slices[0].id, ["sh", "-c", "echo hello"])
            wait_for(lambda: admin.get_workload(w.id).state == types_pb2.WORKLOAD_STATE_SUCCEEDED, 30, "the workload")
            logs = list(fcl.state_dir.glob(f"agents/**/{w.id}.log"))
            assert logs, "the agent keeps the workload's log"
            # retention 2 s: gone from the API, from etcd and from the agent's directory
            wait_for(lambda: w.id not in {x.id for x in admin.list_workloads()}, 30, "the workload to expire")
            assert keys.workload(w.id).decode() not in _etcd_keys(fcl, keys.WORKLOADS)
            wait_for(lambda: not any(p.exists() for p in logs) and
                     not list(fcl.state_dir.glob(f"agents/**/{w.id}.*")), 30, "the agent to delete its files")
        finally:
            admin.release(a.allocation_id)
