"""The request mix learned online (controlplane/scheduler/plugins/_mix.py, as the live scheduler does)
and `meshctl sim --mix trace|online`, on small synthetic inputs."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from controlplane.scheduler.plugins import fgd
from controlplane.scheduler.plugins._mix import MixLearner
from tools.meshctl.main import main
from tools.replay import sim, trace
from tests.unit.test_replay import NODES, PODS

A, B, C = (1, 500, 0, frozenset()), (1, 1000, 0, frozenset()), (2, 1000, 0, frozenset())


def shares(mix) -> dict:
    return {(m.gpus, m.milli): round(m.weight, 3) for m in mix}


def test_window_slides_over_the_last_requests():
    lr = MixLearner(window=4, refresh=1, coverage=1.0, warm=False)
    for k in (A, A, A, A, B, B, B):
        lr.add(k)
    assert lr.counts == Counter({B: 3, A: 1})   # the window holds the last 4
    assert shares(lr.mix()) == {(1, 1000): 0.75, (1, 500): 0.25}


def test_mix_is_recomputed_at_the_first_request_and_every_refresh_without_warm_start():
    lr = MixLearner(window=100, refresh=5, coverage=1.0, warm=False)
    due = [n for n in range(1, 21) if lr.add(A) is not None]
    assert due == [1, 5, 10, 15, 20]


def test_warm_start_hands_over_the_mix_at_every_doubling_until_the_window_fills():
    lr = MixLearner(window=12, refresh=100, coverage=1.0, warm=True)
    forced = []
    for n in range(1, 40):
        got = lr.add(A)
        if got is not None and got.force:
            forced.append(n)
    assert forced == [1, 2, 4, 8, 12]           # then only `refresh` (and drift) change it


def test_coverage_keeps_the_frequent_types_and_normalize_rescales_them():
    lr = MixLearner(window=100, refresh=1, coverage=0.8, normalize=True, warm=False)
    for k in [A] * 6 + [B] * 3 + [C]:
        lr.add(k)
    assert shares(lr.mix()) == {(1, 500): round(6 / 9, 3), (1, 1000): round(3 / 9, 3)}


def test_host_memory_of_a_type_is_its_most_frequent():
    lr = MixLearner(window=10, refresh=1, coverage=1.0, host_memory=True, warm=False)
    for mem in (8, 8, 16):
        lr.add(A, mem)
    assert lr.mix()[0].memory == 8


@pytest.mark.parametrize("kw", [{"window": 0}, {"refresh": 0}, {"coverage": 0}, {"warm": "yes"}])
def test_bad_learner_arguments_are_named(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        MixLearner(**kw)


def test_plugin_takes_a_warm_step_even_below_its_tolerance():
    """A mix from 1 request stands until the next doubling, however little the mix then drifts."""
    from gpumesh.v1 import types_pb2 as t
    from tests.unit.test_scheduler_plugins import GiB, req
    quarter = req(memory_bytes=GiB, isolation=t.ISOLATION_MPS, compute_share=0.25)
    whole = req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE)
    warm = fgd.Plugin(refresh=1000, coverage=1.0, tolerance=1.9, warm=True)
    cold = fgd.Plugin(refresh=1000, coverage=1.0, tolerance=1.9, warm=False)
    for p in (warm, cold):
        for r in (quarter, whole, whole, whole):
            p.observe(r)
    assert shares(warm.mix) == {(1, 250): 0.25, (1, 1000): 0.75}   # taken at request 4 (a doubling)
    assert shares(cold.mix) == {(1, 250): 1.0}   # the first request's: drift 1.5 is under the tolerance


@pytest.fixture
def files(tmp_path):
    (tmp_path / "openb_node_list_small.csv").write_text(NODES)
    (tmp_path / "openb_pod_list_small.csv").write_text(PODS)
    return tmp_path


def _replay(files, mode):
    nodes = trace.load_nodes(str(files / "openb_node_list_small.csv"))
    pods = trace.load_pods(str(files / "openb_pod_list_small.csv"))
    return pods, sim.Replay(nodes, "default", sim.typical_mix(pods), counts=sim.type_counts(pods),
                            memory=sim.type_memory(pods), mix_mode=mode)


def test_trace_mode_fixes_the_traces_mix_up_front(files):
    pods, rp = _replay(files, "trace")
    assert rp.planner.fixed and len(rp.planner.mix) > 1    # every type of the trace before any arrival
    before = list(rp.planner.mix)
    rp.arrive(pods[0])
    assert rp.planner.mix == before


def test_online_mode_learns_the_mix_from_the_arrivals(files):
    pods, rp = _replay(files, "online")
    assert not rp.planner.fixed and shares(rp.planner.mix) == {(1, 1000): 1.0}   # the cold default
    p0 = next(p for p in pods if p.name == "p0")     # 1 GPU at 500 milli
    rp.arrive(p0)
    assert [(m.gpus, m.milli) for m in rp.planner.mix] == [(1, 500)]               # learned from it
    p5 = next(p for p in pods if p.name == "p5")     # 2 whole GPUs
    rp.arrive(p5)                                     # request 2: a warm step
    assert {(m.gpus, m.milli) for m in rp.planner.mix} == {(1, 500), (2, 1000)}


def test_replay_refuses_an_unknown_mix_mode(files):
    with pytest.raises(ValueError, match="mix mode 'nope'"):
        _replay(files, "nope")


@pytest.mark.parametrize("flag,want", [([], "online"), (["--mix", "online"], "online"), (["--mix", "trace"], "trace")])
def test_meshctl_sim_mix_option_reaches_the_replay_and_the_json(files, capsys, flag, want):
    rc = main(["sim", "--trace-dir", str(files), "--nodes", "small", "--pods", "small", "--seeds", "1",
               "--policy", "default,fgd", "--jobs", "1", "--step", "0.1", "-o", "json", *flag])
    assert rc == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["mix"] for d in docs] == [want, want]


def test_meshctl_sim_refuses_an_unknown_mix(files, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sim", "--trace-dir", str(files), "--nodes", "small", "--pods", "small", "--mix", "nope"])
    assert exc.value.code == 2
    assert "--mix" in capsys.readouterr().err
