"""Load signals of a real llama.cpp server (llama-cpp-python's, through gpumesh's wrapper that adds /metrics,
loading the real SmolLM2-135M GGUF), read over HTTP by the agent's reader (nodeagent/backends/loadscraper.py)
exactly as the agent reads it: with three requests sent at once, one runs and the others wait; afterwards the
token counters, their rates and the time to first token are those of the requests."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading

import pytest

from gpumesh.v1 import types_pb2
from nodeagent.backends import llamacpp
from nodeagent.backends.loadscraper import LoadScraper
from tests.integration.conftest import wait_for
from tests.models_util import smollm2_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] is not installed (gpumesh[serving])")
    httpx = pytest.importorskip("httpx", reason="httpx is not installed (gpumesh[serving])")
    b = types_pb2.ServingBackend(kind="llama.cpp", artifact=str(smollm2_gguf()), served_name="smollm2", context=512)
    # one thread (a small shared machine); N_BATCH=1: see tests/integration/serving.py llama_env (AMX)
    env = dict(os.environ, N_THREADS="1", N_THREADS_BATCH="1", N_BATCH="1")
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    log = open(log_path, "wb")
    # the port is picked here and bound by the server seconds later: one taken meanwhile by another process
    # makes the server exit ("address already in use"), and another port is tried
    for _ in range(5):
        port = _free_port()
        p = subprocess.Popen(llamacpp.command(b, "127.0.0.1", port, sys.executable), env=env, stdout=log,
                             stderr=subprocess.STDOUT)
        endpoint = f"127.0.0.1:{port}"

        def up():
            if p.poll() is not None:
                return "exited"
            try:
                return httpx.get(f"http://{endpoint}/v1/models", timeout=5).status_code == 200 and "up"
            except httpx.HTTPError:
                return None
        if wait_for(up, 240, "the llama.cpp server to answer (or exit)", interval=0.3) == "up":
            break
        if "address already in use" not in log_path.read_text(errors="replace").lower():
            raise AssertionError(f"the server exited with {p.returncode}: {log_path.read_text(errors='replace')}")
    else:
        raise AssertionError("the llama.cpp server found no free port in 5 tries")
    try:
        yield endpoint
    finally:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()


def _reader(endpoint: str) -> LoadScraper:
    w = types_pb2.Workload(id="w-test", state=types_pb2.WORKLOAD_STATE_RUNNING, endpoint=endpoint,
                           backend=types_pb2.ServingBackend(kind="llama.cpp"))
    return LoadScraper(lambda: [w], timeout=30)


def _read(reader: LoadScraper) -> types_pb2.BackendLoad:
    (load,) = asyncio.run(reader.read())
    return load


def test_llamacpp_load_signals(server):
    import httpx
    reader = _reader(server)
    idle = _read(reader)
    assert idle.scraped, idle.error
    assert idle.requests_running == 0 and idle.requests_waiting == 0 and idle.workload_id == "w-test"

    results: list = []

    def ask():
        r = httpx.post(f"http://{server}/v1/completions", timeout=300,
                       json={"prompt": "Once upon a time, in a small village by the sea,", "max_tokens": 48,
                             "temperature": 0})
        results.append(r.json()["usage"] if r.status_code == 200 else r.text)
    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()

    def queued():
        # the running request's tokens are in the context once its prompt is evaluated, a moment after it took
        # the model (a reading in between has it running with the context still empty): wait for both
        load = _read(reader)
        return load.scraped and load.requests_running == 1 and load.requests_waiting >= 1 and \
            load.kv_cache_usage > 0
    wait_for(queued, 120, "one request running (its tokens in the context) and others waiting", interval=0.05)
    for t in threads:
        t.join(300)
    assert len(results) == 3 and all(isinstance(u, dict) for u in results), results

    # the server counts a request out (its middleware's `finally`, the model lock's release) after the response's
    # last bytes are sent, so a read right after the answers arrived may still count one: wait for idle

    def idle_again():
        load = _read(reader)
        return load if load.requests_running == 0 and load.requests_waiting == 0 else None
    after = wait_for(idle_again, 30, "the server to count every request out")
    generated = sum(u["completion_tokens"] for u in results)
    prompt = sum(u["prompt_tokens"] for u in results)
    # the counters hold these requests' tokens (nothing else ran here); a request that ended on the
    # end-of-text token counts it too (as vLLM does), which the server's usage does not
    assert generated > 0
    assert generated <= after.generation_tokens_total - idle.generation_tokens_total <= generated + 3
    assert after.prompt_tokens_total - idle.prompt_tokens_total == prompt
    assert after.requests_total - idle.requests_total == 3
    assert after.generation_tokens_per_second > 0 and after.ttft_seconds > 0


def test_unreachable_backend_is_reported(server):
    port = _free_port()          # nothing listens there
    load = _read(_reader(f"127.0.0.1:{port}"))
    assert not load.scraped and "ConnectError" in load.error
