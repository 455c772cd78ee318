"""Hostile requests against a running mesh-gateway (issue 12, "Bad input"): thousands of generated requests,
each answered with a clean OpenAI-style 4xx (or 2xx for the valid ones), never a 5xx; the gateway healthy
afterwards, no replica slot left taken, and a valid request still served.

Real components: a TLS control plane with a tenants file, one simulated H100 host, a real llama.cpp server
(SmolLM2-135M) deployed by team A, and the gateway process in front (LocalCluster's). Hypothesis generates
the requests (derandomized: the same ones every run, no example database): malformed JSON and raw bytes,
wrong types and out-of-range numbers in every field the gateway reads, unknown models, missing, malformed
and foreign tokens, oversized bodies (declared and chunked), wrong paths and methods, bad gateway headers;
then streams that disconnect after the first token and connections that close mid-request. Each generated
request carries at least one defect, so each must get a 4xx: a 2xx would be an invalid request accepted.
The figures (requests by status) are printed at the end (`pytest -s`).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import socket

import pytest

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from tests.integration.conftest import wait_for
from tests.integration.gatewayhttp import auth
from tests.integration.secure import TOKENS, write_tenants
from tests.models_util import smollm2_gguf
from tools.localcluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]
HOST = {"node": "fz-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}
CONTEXT = 256
MAX_BODY = 65536
MODEL = "fuzzchat"
SLOW = 300
FIGURES: collections.Counter = collections.Counter()     # "<kind> <status>" -> count
TOTAL: collections.Counter = collections.Counter()        # status -> count


def _need():
    for mod in ("llama_cpp", "uvicorn", "httpx", "hypothesis", "starlette"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install 'gpumesh[serving,dev]')")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _need()
    gguf = smollm2_gguf()
    d = tmp_path_factory.mktemp("gwfuzz")
    env = dict(os.environ, N_THREADS="1", N_THREADS_BATCH="1", N_BATCH="1")
    tls_dir = d / "tls"
    c = LocalCluster(d / "cluster", [HOST], lease_ttl=3, agents_per_process=1, env=env, tls_dir=tls_dir,
                     tenants_file=str(write_tenants(d / "tenants.yaml")),
                     client_auth={"token": TOKENS["admin"], "ca": str(tls_dir / "ca.crt")},
                     gateway=True, gateway_args=["--max-body-bytes", str(MAX_BODY), "--queue-size", "4",
                                                 "--queue-timeout-seconds", "120", "--cache-entries", "0"])
    c.start(timeout=120)
    try:
        from mesh.client import MeshClient
        from mesh.models import importer
        v, _ = importer.variant_from_artifact(str(gguf), context=CONTEXT)
        with MeshClient(c.endpoint, token=TOKENS["admin"], ca=str(tls_dir / "ca.crt"), timeout=60) as admin, \
                MeshClient(c.endpoint, token=TOKENS["team-a"], ca=str(tls_dir / "ca.crt"), timeout=60) as a:
            admin.register_model(M.Model(name="smollm2", family="smollm2", variants=[v]))
            a.deploy("smollm2", name=MODEL, replicas=1, context=CONTEXT)
            a.wait_deployment(MODEL, lambda x: len(x.replicas) == 1 and x.replicas[0].state == D.REPLICA_STATE_READY,
                              timeout=SLOW)
        wait_for(lambda: _valid(c).status_code == 200, SLOW, "a valid completion through the gateway", interval=1)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def http(cluster):
    import httpx
    with httpx.Client(base_url=cluster.gateway_url, timeout=120) as h:
        yield h


def _valid(cluster, **kw):
    import httpx
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0, **kw}
    return httpx.post(f"{cluster.gateway_url}/v1/completions", json=body, headers=auth("team-a"), timeout=300)


def check(resp, kind: str, want_error: bool = True) -> None:
    """The invariants of every answer: no 5xx; a 4xx is OpenAI's error JSON with a message; a defective
    request never gets a 2xx."""
    FIGURES[f"{kind} {resp.status_code}"] += 1
    TOTAL[resp.status_code] += 1
    assert resp.status_code < 500, (kind, resp.status_code, resp.text[:500])
    if want_error:
        assert 400 <= resp.status_code < 500, (kind, resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["message"], resp.text
        assert isinstance(err["type"], str) and err["type"], resp.text
        if resp.status_code == 429:
            assert resp.headers.get("retry-after"), resp.headers


# -- generated requests ------------------------------------------------------------------------------------

def _strategies():
    from hypothesis import strategies as st
    scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
    anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                            max_leaves=12)
    not_str = anything.filter(lambda x: not isinstance(x, str))
    not_int = anything.filter(lambda x: not (isinstance(x, int) and not isinstance(x, bool)))
    not_num = anything.filter(lambda x: isinstance(x, bool) or not isinstance(x, (int, float)))
    unknown_model = st.text(min_size=1, max_size=300).filter(lambda s: s not in (MODEL, "smollm2"))
    bad_max_tokens = st.one_of(st.integers(max_value=0), st.integers(min_value=CONTEXT, max_value=2 ** 70),
                               not_int.filter(lambda x: x is not None))
    bad_temperature = st.one_of(st.floats(max_value=-1e-9, allow_nan=False), st.floats(min_value=2.0001),
                                not_num.filter(lambda x: x is not None))
    bad_top_p = st.one_of(st.floats(max_value=-1e-9, allow_nan=False), st.floats(min_value=1.0001),
                          not_num.filter(lambda x: x is not None))
    bad_n = st.one_of(st.integers().filter(lambda n: n != 1), not_int.filter(lambda x: x is not None))
    bad_stream = anything.filter(lambda x: x is not None and not isinstance(x, bool))
    bad_stop = st.one_of(st.lists(st.text(max_size=5), min_size=5, max_size=8),
                         anything.filter(lambda x: x is not None and not isinstance(x, (str, list))))
    bad_prompt = anything.filter(lambda x: not isinstance(x, str) and not (
        isinstance(x, list) and len(x) == 1 and isinstance(x[0], str)))
    role = st.text(max_size=12).filter(lambda r: r not in ("system", "user", "assistant", "tool", "developer"))
    bad_messages = st.one_of(
        st.just([]), not_str.filter(lambda x: not isinstance(x, list)),
        st.lists(st.one_of(anything.filter(lambda x: not isinstance(x, dict)),
                           st.fixed_dictionaries({"role": role, "content": st.text(max_size=20)})),
                 min_size=1, max_size=3))
    # a completion body with one or more fields made wrong (each choice below is a defect)
    defects = {
        "model": st.one_of(not_str, st.just(""), unknown_model),
        "max_tokens": bad_max_tokens, "temperature": bad_temperature, "top_p": bad_top_p, "n": bad_n,
        "stream": bad_stream, "stop": bad_stop, "prompt": bad_prompt,
    }
    return st, anything, defects, bad_messages


def test_fuzz_completion_bodies(cluster, http):
    from hypothesis import HealthCheck, given, settings
    st, anything, defects, _ = _strategies()
    base = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}

    @settings(max_examples=900, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(sorted(defects)), st.none(), min_size=1, max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: defects[k] for k in keys})),
           st.booleans())
    def run(bad, drop_instead):
        body = dict(base)
        for k, v in bad.items():
            if drop_instead and k in ("model", "prompt"):
                body.pop(k)                       # a required field missing is a defect too
            else:
                body[k] = v
        raw = json.dumps(body, allow_nan=True).encode()
        check(http.post("/v1/completions", content=raw, headers={**auth("team-a"),
                                                                 "content-type": "application/json"}), "body")
    run()


def test_fuzz_chat_bodies(cluster, http):
    from hypothesis import HealthCheck, given, settings
    st, anything, defects, bad_messages = _strategies()

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bad_messages, st.sampled_from(["max_tokens", "model", "temperature", None]), st.data())
    def run(messages, other, data):
        body = {"model": MODEL, "messages": messages, "max_tokens": 2}
        if other is not None and data.draw(st.booleans()):
            body[other] = data.draw(defects[other])
        check(http.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True).encode(),
                        headers=auth("team-a")), "chat")
    run()


def test_fuzz_malformed_json_and_arbitrary_documents(cluster, http):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    _, anything, _, _ = _strategies()
    valid = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    raw = st.one_of(st.binary(max_size=300),
                    st.integers(min_value=1, max_value=len(valid) - 1).map(lambda n: valid[:n]),   # cut short
                    st.text(max_size=200).map(lambda s: s.encode("utf-8", "replace")),
                    anything.filter(lambda x: not isinstance(x, dict) or "model" not in x)
                    .map(lambda x: json.dumps(x, allow_nan=True).encode()))

    @settings(max_examples=500, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(raw, st.sampled_from(["/v1/completions", "/v1/chat/completions", "/predict"]))
    def run(payload, path):
        check(http.post(path, content=payload, headers=auth("team-a")), "raw")
    run()


@pytest.mark.parametrize("payload", [b"[" * 60000, b'{"a":' * 12000, b'{"model": "x", "prompt": ' + b"[" * 20000],
                         ids=["arrays", "objects", "prompt"])
def test_deeply_nested_json_is_a_clean_400(cluster, http, payload):
    """JSON nested deeper than the parser's recursion limit (inside the body limit) is malformed input too."""
    resp = http.post("/v1/completions", content=payload, headers=auth("team-a"))
    check(resp, "nested")
    assert resp.status_code == 400, resp.text


def _not_a_deadline(text: str) -> bool:
    try:
        v = float(text)
    except ValueError:
        return bool(text)
    return not (0 < v <= 3_600_000)


def test_fuzz_tokens_and_headers(cluster, http):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    printable = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=80)
    bad_auth = st.one_of(
        st.just(None), st.just(""), st.just("Bearer"), st.just("Bearer  x"), printable.map(lambda t: f"Bearer x{t}"),
        printable.filter(bool).map(lambda t: f"Basic {t}"),
        st.just(f"Bearer {TOKENS['viewer-a']}"),                                                # a viewer: no inference
        st.just(f"Bearer {TOKENS['team-b']}"),                                                  # foreign tenant
        st.just("Bearer " + "a" * 4000))
    bad_gateway_header = st.one_of(
        st.tuples(st.just("x-gpumesh-priority"), printable.filter(
            lambda s: s and s.strip().lower() not in ("critical", "standard", "sheddable"))),
        st.tuples(st.just("x-gpumesh-deadline-ms"), st.one_of(st.just("-5"), st.just("1e999"), st.just("nan"),
                                                               st.just("0"), st.just("3600001"),
                                                               printable.filter(_not_a_deadline))),
        st.tuples(st.just("x-gpumesh-allow-fallback"), printable.filter(
            lambda s: s and s.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"))))

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(bad_auth.map(lambda a: ("auth", a)), bad_gateway_header.map(lambda h: ("header", h))))
    def run(case):
        kind, value = case
        if kind == "auth":
            headers = {} if value is None else {"authorization": value}
        else:
            headers = {**auth("team-a"), value[0]: value[1]}
        check(http.post("/v1/completions", content=body, headers=headers), kind)
    run()


def test_fuzz_paths_methods_and_oversized_bodies(cluster, http):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)
    known = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/gpu/status", "/v1/gpu/memory-forecast",
             "/v1/gpu/models-optimal", "/v1/gpu/rebalance", "/models", "/predict", "/policies", "/metrics",
             "/healthz", "/readyz", "/v1/gpu/benchmark-model"}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(segment, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s)).filter(lambda p: p not in known),
           st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    def unknown_paths(path, method):
        check(http.request(method, path, headers=auth("team-a")), "path")
    unknown_paths()
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        for path in ("/v1/completions", "/v1/chat/completions", "/predict"):
            check(http.request(method, path, headers=auth("team-a")), "method")
    # oversized: declared (content-length) and chunked (no length: the gateway counts as it reads)
    for size in (MAX_BODY + 1, MAX_BODY * 4, 8 << 20):
        pad = "x" * size
        body = json.dumps({"model": MODEL, "prompt": pad, "max_tokens": 2}).encode()
        resp = http.post("/v1/completions", content=body, headers=auth("team-a"))
        check(resp, "oversized")
        assert resp.status_code == 413, resp.text

        def chunks(data=body):
            for i in range(0, len(data), 16384):
                yield data[i:i + 16384]
        resp = http.post("/v1/completions", content=chunks(), headers=auth("team-a"))
        check(resp, "oversized-chunked")
        assert resp.status_code == 413, resp.text


def _raw_http(url: str, data: bytes, read: bool) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        if read:
            s.recv(1)


def test_disconnects_then_healthy_and_no_stuck_slot(cluster, http):
    import httpx
    body = {"model": MODEL, "prompt": "Tell me a long story about the sea.", "max_tokens": 40, "stream": True,
            "temperature": 0}
    disconnected = 0
    for _ in range(6):                  # streams the client drops after the first event
        with httpx.stream("POST", f"{cluster.gateway_url}/v1/completions", json=body, headers=auth("team-a"),
                          timeout=300) as resp:
            FIGURES[f"disconnect-stream {resp.status_code}"] += 1
            TOTAL[resp.status_code] += 1
            assert resp.status_code == 200, resp.read()
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    disconnected += 1
                    break               # leaving the block closes the connection mid-stream
    assert disconnected == 6
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKENS['team-a']}\r\n"
            "Content-Type: application/json\r\n").encode()
    full = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    for i in range(30):                 # connections that end mid-request: headers only, part of the body
        partial = head + (f"Content-Length: {len(full)}\r\n\r\n".encode() + full[: i % len(full)] if i % 3 else b"")
        _raw_http(cluster.gateway_url, partial, read=False)
        FIGURES["cut-request (closed)"] += 1
    # the gateway is healthy, nothing is left on the replica or in the queue, and valid requests are served
    assert http.get("/healthz").status_code == 200

    def settled():
        text = http.get("/metrics").text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(("gpumesh_gateway_in_flight{", "gpumesh_gateway_queue_depth{"))]
        return values and all(v == 0 for v in values)
    wait_for(settled, 120, "no request left in flight or queued on the gateway", interval=0.5)
    for _ in range(3):
        r = _valid(cluster)
        check(r, "valid", want_error=False)
        assert r.status_code == 200 and r.json()["choices"], r.text


def test_zz_figures(request):
    """The fuzz figures (runs last in this module): requests by status, and the invariant over all of them.
    The bound on the count is the whole module's: with only some of its tests selected (`-k`), the figures are
    printed and the bound is skipped, saying which tests did not run."""
    total = sum(TOTAL.values())
    print(f"\ngateway fuzz: {total} requests answered; by status: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(TOTAL.items())))
    for k, v in sorted(FIGURES.items()):
        print(f"  {k}: {v}")
    if not total:
        pytest.skip("the fuzz tests did not run (see their skips)")
    every = {name for name in dir(request.module) if name.startswith("test_")} - {request.node.originalname}
    selected = {i.originalname for i in request.session.items if i.module is request.module}
    if every - selected:
        pytest.skip(f"the 2000-request bound is the whole module's; not selected: "
                    f"{', '.join(sorted(every - selected))}")
    assert total >= 2000, total         # each answer's own checks are in the tests above
