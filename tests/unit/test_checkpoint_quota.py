"""The per-tenant checkpoint quota (checkpoint_quota_bytes, a tenant's max_checkpoint_bytes): the control
plane refuses a Checkpoint up front when the tenant's checkpoints already hold its limit, and tells the
agent what is left; the agent's store receiver refuses the entry that would pass it and keeps nothing.
Before, a tenant's SDK could write checkpoints until the shared store's disk was full."""

from __future__ import annotations

import asyncio
import os

import pytest

from controlplane.api import auth, tenantsfile
from controlplane.controllers.checkpoint_quota import CheckpointQuota
from controlplane.controllers.migration_phases import StepFailed
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.config import ConfigError
from tests.unit.test_checkpoint_repeat_safe import _partials, _send, cmd, drive, running_agent
from tests.unit.test_migration_durability import WID, Etcd, manager

R = M.MigrationReport


# -- the agent: the store's receiver stops a checkpoint past what is left -------------------------------------------

def quota_cmd(max_bytes: int) -> M.MigrationCommand:
    c = cmd()
    c.max_bytes = max_bytes
    return c


def test_a_checkpoint_past_what_is_left_fails_naming_the_quota_and_leaves_nothing(tmp_path):
    out = asyncio.run(drive(running_agent(tmp_path, lambda req: _send(req, commit=True)), quota_cmd(2999)))
    assert [r.event for r in out] == [R.FAILED], out
    assert "checkpoint_quota_bytes" in out[0].message and "2999" in out[0].message and "3000" in out[0].message
    assert not (tmp_path / "t" / "w-1" / "ck-1").exists() and _partials(tmp_path) == []
    assert os.listdir(tmp_path / "t" / "w-1") == []


def test_a_checkpoint_within_what_is_left_is_stored(tmp_path):
    out = asyncio.run(drive(running_agent(tmp_path, lambda req: _send(req, commit=True)), quota_cmd(3000)))
    assert [r.event for r in out] == [R.CHECKPOINTED] and out[0].bytes == 3000
    assert (tmp_path / "t" / "w-1" / "ck-1" / "manifest.json").exists()


def _send_huge_declared(req) -> dict:
    """A hostile SDK: declares a tensor entry of a terabyte (the plain store would make it a sparse file of that
    size) and sends until it is stopped."""
    import itertools
    from mesh.checkpoint.format import EntryMeta
    from mesh.checkpoint.transfer import OutEntry, TransferClient
    meta = EntryMeta(name="w", kind="tensor", nbytes=1 << 40, dtype="uint8", shape=[1 << 40])
    chunk = memoryview(b"\x01" * 65536)
    with TransferClient(req["target"], req["session"], secret=bytes.fromhex(req["secret"]), retries=0) as c:
        c.send([OutEntry(meta, lambda start: itertools.repeat(chunk))], commit=None)
    return {}


def test_a_declared_size_past_what_is_left_is_refused_before_anything_is_written(tmp_path):
    out = asyncio.run(drive(running_agent(tmp_path, _send_huge_declared), quota_cmd(1 << 20)))
    assert [r.event for r in out] == [R.FAILED] and "checkpoint_quota_bytes" in out[0].message, out
    assert os.listdir(tmp_path / "t" / "w-1") == []


def test_data_entries_count_at_the_commit(tmp_path):
    """A data entry is held in memory until the commit: the commit counts it with the tensors."""
    from mesh.checkpoint.format import EntryMeta, Manifest
    from mesh.checkpoint.store import StoreFull, StoreSink
    sink = StoreSink(str(tmp_path / "t" / "w" / "ck"), "w", key=b"k" * 32, tenant="t", checkpoint_id="ck",
                     key_kind="checkpoint", max_bytes=150)
    sink.open_entry(EntryMeta(name="t", kind="tensor", nbytes=100))
    with pytest.raises(StoreFull, match="checkpoint would hold 160 bytes"):
        sink.commit(Manifest(workload_id="w", step=1, entries=[EntryMeta(name="t", kind="tensor", nbytes=100),
                                                                EntryMeta(name="d", kind="data", nbytes=60)]),
                    {"d": b"x" * 60})
    assert not (tmp_path / "t" / "w" / "ck").exists()


# -- the control plane: refused up front, the remainder passed on -------------------------------------------------

def limited(limit: int = 1000, tenant: str = "a"):
    w = types_pb2.Workload(id=WID, node="nA", slice_id="s-a", tenant=tenant, state=types_pb2.WORKLOAD_STATE_RUNNING)
    mm, sessions, wm = manager(Etcd(), w)
    wm.get = lambda wid: wm.workloads[wid]
    sessions["nA"] = object()
    mm.checkpoint_quota = CheckpointQuota(limit)
    asked: list[M.MigrationCommand] = []

    async def ask(mid, node, c, want, timeout, **kw):
        asked.append(c)
        await asyncio.sleep(0)
        return R(migration_id=mid, event=R.CHECKPOINTED, path=c.path, step=1,
                 bytes=min(mm.next_bytes, c.max_bytes or mm.next_bytes))     # an agent holds to max_bytes
    mm._ask = ask
    mm.next_bytes = 100
    return mm, asked


def held(mm, ck_id: str, tenant: str, nbytes: int) -> None:
    mm.checkpoints[ck_id] = M.CheckpointInfo(id=ck_id, workload_id="w-old", tenant=tenant, bytes=nbytes)


@pytest.mark.asyncio
async def test_a_tenant_at_its_limit_is_refused_before_the_agent_is_asked():
    mm, asked = limited(1000)
    held(mm, "ck-1", "a", 600)
    held(mm, "ck-2", "a", 400)
    held(mm, "ck-3", "b", 10_000)          # another tenant's checkpoints are not this one's
    with pytest.raises(errors.ResourceExhausted) as e:
        await mm.checkpoint(WID)
    msg = str(e.value)
    assert "'a'" in msg and "1000 bytes" in msg and "1000-byte" in msg and "meshctl get checkpoints" in msg, msg
    assert asked == []


@pytest.mark.asyncio
async def test_the_agent_is_told_what_is_left_and_another_tenant_is_not_limited_by_it():
    mm, asked = limited(1000)
    held(mm, "ck-1", "a", 600)
    held(mm, "ck-3", "b", 10_000)
    ck = await mm.checkpoint(WID)
    assert asked[0].max_bytes == 400 and ck.tenant == "a" and ck.bytes == 100
    mm.wm.workloads[WID].tenant = "b"
    mm.checkpoint_quota = CheckpointQuota(1000, _tenants({"b": {"max_checkpoint_bytes": 0}}))
    await mm.checkpoint(WID)                # b: 0 in its own quota is no limit
    assert asked[1].max_bytes == 0


@pytest.mark.asyncio
async def test_checkpoints_at_once_each_get_what_the_others_left():
    mm, asked = limited(1000)
    mm.next_bytes = 600
    got = await asyncio.gather(*(mm.checkpoint(WID) for _ in range(3)), return_exceptions=True)
    assert [type(g) for g in got] == [M.CheckpointInfo, M.CheckpointInfo, errors.ResourceExhausted], got
    assert [c.max_bytes for c in asked] == [1000, 400]


@pytest.mark.asyncio
async def test_the_agents_refusal_is_resource_exhausted():
    mm, asked = limited(1000)

    async def refuse(mid, node, c, want, timeout, **kw):
        raise StepFailed("checkpoint on nA: entry 'w' of 5000 bytes: the checkpoint would hold 5000 bytes, more "
                         "than the 1000 left of tenant 'a''s checkpoint quota (checkpoint_quota_bytes)")
    mm._ask = refuse
    with pytest.raises(errors.ResourceExhausted, match="meshctl get checkpoints"):
        await mm.checkpoint(WID)
    assert mm.checkpoints == {}


# -- configuration -----------------------------------------------------------------------------------------------

def _tenants(quotas: dict, default: dict | None = None) -> tenantsfile.Tenants:
    return tenantsfile.Tenants(quotas=quotas, default_quota=default or {})


def test_the_tenants_file_sets_a_tenants_limit_and_the_scheduler_never_sees_it(tmp_path):
    f = tmp_path / "tenants.yaml"
    f.write_text("default_quota: {max_checkpoint_bytes: 1GiB, max_slices: 4}\n"
                 "tenants:\n  a: {quota: {max_checkpoint_bytes: 2MiB}}\n  b: {}\n")
    t = tenantsfile.load_tenants(str(f))
    q = CheckpointQuota(5, t)
    assert (q.limit("a"), q.limit("b"), q.limit("c")) == (2 << 20, 1 << 30, 1 << 30)
    plugin = type("P", (), {"NAME": "TenantQuota", "tenants": {}, "default": {}})()
    tenantsfile.apply_quotas(type("F", (), {"profile": type("Pr", (), {"plugins": [plugin]})()})(), t)
    assert plugin.tenants == {} and plugin.default == {"max_slices": 4}
    assert CheckpointQuota(5).limit("a") == 5


@pytest.mark.parametrize("bad", ["-1", "lots", "true"])
def test_a_bad_limit_in_the_tenants_file_is_refused_naming_it(tmp_path, bad):
    f = tmp_path / "tenants.yaml"
    f.write_text(f"tenants:\n  a: {{quota: {{max_checkpoint_bytes: {bad}}}}}\n")
    with pytest.raises(ConfigError, match="tenants.a.quota.max_checkpoint_bytes"):
        tenantsfile.load_tenants(str(f))


def test_a_negative_default_is_refused():
    with pytest.raises(ValueError, match="checkpoint_quota_bytes"):
        CheckpointQuota(-1)


# -- what `meshctl get checkpoints` shows -------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_list_checkpoints_shows_each_tenants_usage_against_its_limit_to_those_who_may_see_it():
    from controlplane.api.migrationsvc import MigrationService
    from tools.meshctl import migrate
    mm, _ = limited(1000)
    mm.checkpoint_quota = CheckpointQuota(1000, _tenants({"b": {"max_checkpoint_bytes": 0}}))
    held(mm, "ck-1", "a", 600)
    held(mm, "ck-2", "a", 300)
    held(mm, "ck-3", "b", 10_000)
    svc = MigrationService(mm)
    r = await svc.ListCheckpoints(M.ListCheckpointsRequest(), None)
    assert [(u.tenant, u.bytes, u.limit_bytes) for u in r.usage] == [("a", 900, 1000), ("b", 10_000, 0)]
    token = auth._current.set(auth.Principal("client", "alice", tenant="a", role="tenant"))
    try:
        r = await svc.ListCheckpoints(M.ListCheckpointsRequest(), None)
    finally:
        auth._current.reset(token)
    assert [(u.tenant, u.bytes, u.limit_bytes) for u in r.usage] == [("a", 900, 1000)]     # not b's
    text = migrate.format_checkpoints(list(r.checkpoints), "table", usage=r.usage)
    assert "tenant a: checkpoints hold 900B of its 1000B checkpoint quota" in text
    assert '"limit_bytes": "1000"' in migrate.format_checkpoints([], "json", usage=r.usage)
