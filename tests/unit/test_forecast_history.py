"""The embedded history store (controlplane/forecast/history.py) and its recorder: tiers validated,
samples downsampled as they age (weighted means), bounded retention, and nothing flushed lost on restart."""

from __future__ import annotations

import asyncio
import types

import pytest

from controlplane.forecast.history import HistoryStore, Tier, parse_tiers
from controlplane.forecast.recorder import HistoryRecorder
from gpumesh.v1 import types_pb2
from mesh.config import ConfigError

TIERS = parse_tiers(["raw:10m", "1m:1h", "10m:1d"])


def test_tiers_parsed_and_validated():
    assert TIERS == (Tier(0, 600), Tier(60, 3600), Tier(600, 86400))
    for bad, says in ((["1m:1h"], "raw"), (["raw:1h", "10m:1d", "1m:30d"], "larger multiple"),
                      (["raw:1h", "1m:1d", "90s:2d"], "larger multiple"), (["raw:1h", "1h:30m"], "less than one"),
                      (["raw"], "RESOLUTION:KEEP"), (["raw:forever"], "not a duration"), ([], "at least one")):
        with pytest.raises(ConfigError, match=says) as e:
            parse_tiers(bad)
        assert "history_tiers" in str(e.value)


def test_downsampling_keeps_weighted_means_and_retention_bounds_the_file(tmp_path):
    s = HistoryStore(str(tmp_path / "h.db"), TIERS)
    s.write([("gpu", "n/0", "memory_used", "", float(t), float(t)) for t in range(0, 1200)])     # 20 minutes, 1 Hz
    s.compact(now=1200.0)
    counts = s.tier_counts()
    assert counts[0] == 600                 # the last 10 minutes stay raw
    assert counts[1] == 10                  # the 10 minutes before: one mean per minute
    rows = s.read("gpu", "n/0", "memory_used")
    assert rows[0] == (0.0, 29.5) and rows[9] == (540.0, 569.5)
    assert rows[10] == (600.0, 600.0)       # raw from there on
    # an hour later the raw samples have moved to minutes, and the minutes older than an hour to 10 minutes
    s.compact(now=1200.0 + 3600 + 600)
    rows = s.read("gpu", "n/0", "memory_used")
    assert rows[0] == (0.0, 299.5)          # one 10-minute bucket: the mean of 0..599, whatever tier it went through
    assert all(t % 60 == 0 for t, _ in rows)
    # a day and more later nothing is left: the series itself is gone
    s.compact(now=1200.0 + 86400 + 3 * 3600)
    assert s.read("gpu", "n/0", "memory_used") == [] and s.list() == []


def test_bucket_split_by_the_cutoff_merges_into_one_mean(tmp_path):
    s = HistoryStore(str(tmp_path / "h.db"), parse_tiers(["raw:1m", "1m:1h"]))
    s.write([("fleet", "allocate", "requests", "", float(t), 1.0) for t in range(0, 30)])
    s.compact(now=120.0)
    s.write([("fleet", "allocate", "requests", "", float(t), 4.0) for t in range(30, 60)])
    s.compact(now=180.0)
    assert s.read("fleet", "allocate", "requests") == [(0.0, 2.5)]


def test_list_and_find_carry_the_tenant(tmp_path):
    s = HistoryStore(str(tmp_path / "h.db"), TIERS)
    s.write([("deployment", "chat", "requests_running", "acme", 10.0, 1.0),
             ("deployment", "chat", "requests_running", "acme", 20.0, 3.0),
             ("gpu", "n/0", "utilization", "", 10.0, 5.0)])
    assert s.find("deployment", "chat", "requests_running")[1] == "acme"
    assert s.find("gpu", "n/1", "utilization") is None
    infos = s.list(tenant="acme")
    assert [(i.name, i.count, i.first, i.last) for i in infos] == [("chat", 2, 10.0, 20.0)]
    assert len(s.list()) == 2 and [i.kind for i in s.list(kind="gpu")] == ["gpu"]


def _reading(used: int, at: float) -> types_pb2.GpuTelemetry:
    r = types_pb2.GpuTelemetry(index=0, utilization_pct=50, memory_used_bytes=used, memory_total_bytes=80 << 30,
                               temperature_c=60, power_w=300, memory_pressure=types_pb2.MEMORY_PRESSURE_HIGH)
    r.at.FromNanoseconds(int(at * 1e9))
    return r


def test_restart_loses_nothing_flushed(tmp_path):
    path = str(tmp_path / "h.db")
    clock = [1000.0]

    async def run():
        rec = HistoryRecorder(HistoryStore(path, TIERS), flush_seconds=60, clock=lambda: clock[0])
        g = types.SimpleNamespace(node="n", index=0, memory_bytes=80 << 30)
        for i in range(5):
            rec.on_gpu(g, _reading(i << 30, 1000.0 + i))
        assert await rec.flush() == 5 * 7
        rec.on_gpu(g, _reading(9 << 30, 1010.0))
        await rec.stop()                    # a clean stop flushes the rest
    asyncio.run(run())
    s = HistoryStore(path, TIERS)           # the restarted control plane opens the same file
    rows = s.read("gpu", "n/0", "memory_used")
    assert [v for _, v in rows] == [float(i << 30) for i in (0, 1, 2, 3, 4, 9)]
    assert s.read("gpu", "n/0", "memory_pressure")[0][1] == 2.0        # high = level 2 of 0-3


def test_unflushed_samples_are_the_only_loss_of_a_crash(tmp_path):
    path = str(tmp_path / "h.db")

    async def run():
        rec = HistoryRecorder(HistoryStore(path, TIERS), flush_seconds=60)
        rec.add("fleet", "allocate", "requests", 3, at=60.0)
        await rec.flush()
        rec.add("fleet", "allocate", "requests", 4, at=120.0)     # never flushed: the process dies here
    asyncio.run(run())
    assert HistoryStore(path, TIERS).read("fleet", "allocate", "requests") == [(60.0, 3.0)]


def test_allocate_requests_are_counted_per_minute_with_quiet_minutes_as_zero(tmp_path):
    clock = [600.0]
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "h.db"), TIERS), clock=lambda: clock[0])
    req = types.SimpleNamespace(tenant="acme", mig_profile="1g.10gb", memory_bytes=0, gpu_model="H100-80GB", count=2)
    rec.on_request(req)
    rec.on_request(req)
    clock[0] = 600.0 + 3 * 60 + 5           # three minutes later
    rec._roll()
    # (the minute the recorder started in is added to what is stored: pending_counts)
    got = {(k, n, t): v for k, n, m, tn, t, v in [*rec.pending_counts, *rec.pending]}
    assert got[("fleet", "allocate", 600.0)] == 4
    assert got[("fleet", "allocate", 660.0)] == 0 and got[("fleet", "allocate", 720.0)] == 0
    assert got[("tenant", "acme", 600.0)] == 4
    assert got[("fleet", "profile/1g.10gb", 600.0)] == 4 and got[("fleet", "gpu_model/H100-80GB", 600.0)] == 4
    assert ("fleet", "allocate", 780.0) not in got          # the current minute is still counting


def test_quiet_minute_keys_are_dropped_after_the_stores_retention(tmp_path):
    """Every tenant, MIG profile and GPU model ever asked for got a zero each quiet minute for good: with tenants
    coming and going the keys (and the writes) grew for ever. A key quiet for longer than the store keeps
    anything (here 1 h) is dropped; a key asked for within it keeps its zero every quiet minute."""
    clock = [0.0]
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "h.db"), parse_tiers(["raw:10m", "1m:1h"])),
                          clock=lambda: clock[0])

    def ask(tenant):
        rec.on_request(types.SimpleNamespace(tenant=tenant, mig_profile="1g.10gb", memory_bytes=0,
                                             gpu_model="H100-80GB", count=1))
    steady = []                                    # minutes of tenant `steady` recorded, zero or not
    for minute in range(300):                      # five hours, a new tenant each minute, `steady` every 50
        clock[0] = minute * 60.0 + 1
        ask(f"churn-{minute}")
        if minute % 50 == 0:
            ask("steady")
        steady += [(t, v) for k, n, _m, _tn, t, v in [*rec.pending_counts, *rec.pending]
                   if (k, n) == ("tenant", "steady")]
        rec.pending.clear()
        rec.pending_counts.clear()
        assert len(rec.counted) <= 3 + 1 + 61      # the fleet's 3 keys, steady, the last hour's tenants
    assert [t for t, _ in steady] == [m * 60.0 for m in range(299)]      # no quiet minute left out
    assert [t for t, v in steady if v] == [m * 60.0 for m in range(0, 299, 50)]
    assert ("tenant", "churn-238", "requests", "churn-238") not in rec.counted
    assert ("tenant", "churn-239", "requests", "churn-239") in rec.counted
    clock[0] = 301 * 60.0                          # churn-239 asked at minute 239: its zeros run to minute 299
    rec._roll()
    got = [(n, t) for k, n, _m, _tn, t, v in rec.pending if k == "tenant"]
    assert ("churn-239", 299 * 60.0) in got and ("churn-239", 300 * 60.0) not in got
    assert ("churn-238", 299 * 60.0) not in got


def test_a_quiet_key_is_kept_as_long_as_the_longest_tier_keeps_samples(tmp_path):
    """The tiers' retentions need not grow with their resolution: the key stays as long as any tier keeps it."""
    clock = [1.0]
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "h.db"), parse_tiers(["raw:2h", "1m:1h"])),
                          clock=lambda: clock[0])
    rec.on_request(types.SimpleNamespace(tenant="once", mig_profile="", memory_bytes=0, gpu_model="", count=1))
    clock[0] = 100 * 60.0 + 1                     # 100 quiet minutes: the raw tier still holds its first ones
    rec._roll()
    zeros = [t for k, n, _m, _tn, t, v in rec.pending if (k, n) == ("tenant", "once") and not v]
    assert zeros == [m * 60.0 for m in range(1, 60)]      # (an hour of quiet zeros per roll at most)
    assert ("tenant", "once", "requests", "once") in rec.counted


def test_control_plane_config_checks_history_and_prometheus_options(tmp_path):
    from controlplane.config import ControlPlaneConfig
    ok = dict(insecure=True, state_dir=str(tmp_path / "cp"))
    ControlPlaneConfig(**ok, history_tiers=["raw:30m", "5m:7d"], prometheus_url="http://prom:9090").check()
    with pytest.raises(ConfigError, match="history_tiers"):
        ControlPlaneConfig(**ok, history_tiers=["5m:7d"]).check()
    for url in ("prom:9090", "ftp://prom", "http://"):
        with pytest.raises(ConfigError, match="prometheus_url"):
            ControlPlaneConfig(**ok, prometheus_url=url).check()


def test_history_off_means_the_service_says_so():
    from controlplane.forecast.service import DisabledForecastService
    from gpumesh.v1 import forecast_service_pb2 as F
    from mesh import errors

    svc = DisabledForecastService()
    for method in (svc.GetForecast, svc.ListSeries):           # unwrapped from the rpc status mapping
        with pytest.raises(errors.FailedPrecondition, match="history_enabled: false"):
            asyncio.run(method.__wrapped__(svc, F.GetForecastRequest(), None))


def test_deployment_load_is_summed_over_its_replicas(tmp_path):
    from gpumesh.v1 import deployment_service_pb2 as D
    d = D.Deployment(spec=D.DeploymentSpec(name="chat", tenant="acme"))
    reps = {f"r{i}": D.Replica(id=f"r{i}", deployment="chat", state=D.REPLICA_STATE_READY, workload_id=f"w{i}")
            for i in (1, 2)}
    loads = {"r1": types_pb2.BackendLoad(workload_id="w1", scraped=True, requests_running=3, requests_waiting=1,
                                         generation_tokens_per_second=40),
             "r2": types_pb2.BackendLoad(workload_id="w2", scraped=True, requests_running=2,
                                         generation_tokens_per_second=10)}
    store = types.SimpleNamespace(deployments={"chat": d}, replicas={"chat": reps}, loads=loads)
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "h.db"), TIERS), clock=lambda: 100.0)
    rec.deployments = types.SimpleNamespace(store=store)
    rec.sample_deployments()
    got = {m: (v, tn) for k, n, m, tn, t, v in rec.pending}
    assert got["replicas"] == (2, "acme") and got["requests_running"] == (5, "acme")
    assert got["requests_waiting"] == (1, "acme") and got["generation_tokens_per_second"] == (50, "acme")


def test_a_flush_cancelled_by_stop_while_its_write_waits_its_turn_loses_nothing(tmp_path):
    """stop() cancels the loop's pass where it waits; a pass waiting for its write behind a store read (a long
    GetForecast) had taken the batch from `pending`, and the cancel dropped the queued write with it: a clean
    stop lost up to `flush_seconds` of samples. The write goes on; stop()'s own flush is queued after it."""
    import threading
    path = str(tmp_path / "h.db")

    async def run():
        rec = HistoryRecorder(HistoryStore(path, TIERS), flush_seconds=60)
        gate = threading.Event()
        rec.pool.submit(gate.wait, 30)               # the history thread is busy with a read
        rec.add("fleet", "allocate", "requests", 3, at=60.0)
        flush = asyncio.create_task(rec.flush())
        deadline = asyncio.get_running_loop().time() + 10
        while rec.pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert not rec.pending                        # taken, its write queued behind the read
        flush.cancel()                                # stop() cancelling the pass
        with pytest.raises(asyncio.CancelledError):
            await flush
        rec.add("fleet", "allocate", "requests", 4, at=120.0)
        gate.set()
        await rec.stop()
    asyncio.run(run())
    assert HistoryStore(path, TIERS).read("fleet", "allocate", "requests") == [(60.0, 3.0), (120.0, 4.0)]


def test_a_restart_keeps_the_allocate_count_of_the_minute_it_stopped_in(tmp_path):
    """The current minute's Allocate count is written when the minute ends: a clean stop lost it (up to a
    minute of requests per restart), and a control plane back within the same minute wrote only its own part of
    it over what was there. Now stop() writes the partial minute and a restart adds to it."""
    path = str(tmp_path / "h.db")
    clock = [600.0 + 10]
    req = types.SimpleNamespace(tenant="acme", mig_profile="", memory_bytes=0, gpu_model="", count=1)

    async def life(n_requests, until):
        rec = HistoryRecorder(HistoryStore(path, TIERS), flush_seconds=60, clock=lambda: clock[0])
        rec.start()
        for _ in range(n_requests):
            rec.on_request(req)
        clock[0] = until
        await rec.stop()
    asyncio.run(life(3, 600.0 + 30))          # stopped half-way through minute 10
    asyncio.run(life(2, 600.0 + 50))          # back within it: two more
    assert HistoryStore(path, TIERS).read("fleet", "allocate", "requests") == [(600.0, 5.0)]
    assert HistoryStore(path, TIERS).read("tenant", "acme", "requests") == [(600.0, 5.0)]


def test_a_failed_flush_past_the_pending_limit_drops_the_oldest_samples(tmp_path):
    """Samples wait in memory up to a limit while the disk refuses writes, "the oldest go first"; a failed
    flush put its batch back in front of what arrived meanwhile, and the bounded deque dropped from the other
    end: the newest samples went, the oldest were kept."""
    import collections
    import sqlite3
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "h.db"), TIERS), flush_seconds=60)
    rec.pending = collections.deque(maxlen=4)
    for t in (1.0, 2.0, 3.0):
        rec.add("fleet", "allocate", "requests", t, at=t)

    def refuse(batch):
        rec.add("fleet", "allocate", "requests", 4.0, at=4.0)        # arrived while the write was refused
        rec.add("fleet", "allocate", "requests", 5.0, at=5.0)
        raise sqlite3.OperationalError("database is locked")
    rec.store.write = refuse

    async def run():
        with pytest.raises(sqlite3.OperationalError):
            await rec.flush()
        rec.pool.shutdown(wait=True)
    asyncio.run(run())
    assert [s[4] for s in rec.pending] == [2.0, 3.0, 4.0, 5.0]
