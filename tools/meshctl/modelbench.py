"""`meshctl model bench MODEL`: measure a variant on its real backend and store the figures in the registry
(mesh/models/bench.py; docs/serving.md, "Benchmarking a variant")."""

from __future__ import annotations

import argparse
import os
import sys

from tools.meshctl.common import CliError, client, info, out, positive_int, subcommand

EPILOG = """\
examples:
  meshctl model bench smollm2                       # the first variant in fallback order, 5 requests
  meshctl model bench smollm2 --variant bf16 --requests 10 --prompt-tokens 256 --max-tokens 128
  meshctl model bench smollm2 --backend vllm -o json
  meshctl model bench smollm2 --no-store            # measure and print only
  meshctl model describe smollm2                    # the stored figures, per GPU model

The variant's backend is started directly as a process on this host, with the command line the agent
uses (llama.cpp: llama-cpp-python's server; vLLM: its OpenAI server), so the figures are the backend's
own, without a cluster in the way. Load time is the cold start (process start to the first completion);
after one warm-up request, --requests streaming completions are timed one at a time: time to first token,
generation tokens/s (decode), prompt tokens/s. The medians are stored in the registry on the variant,
keyed by this host's GPU model (--gpu-model; "cpu" without a GPU), where `model describe` shows them and
cost per 1k tokens derives from them. Settings of the backend come from the environment as for the agent
(e.g. N_THREADS, N_BATCH for llama.cpp). Storing needs the admin role.
"""


def register(cmds: argparse._SubParsersAction) -> None:
    p = subcommand(cmds, "bench", help="measure a variant on its backend (load, TTFT, tokens/s) and store it",
                   epilog=EPILOG)
    p.add_argument("name", metavar="MODEL")
    p.add_argument("--variant", default="", metavar="V", help="default: the first of --backend's variants in "
                   "fallback order")
    p.add_argument("--backend", choices=("llama.cpp", "vllm"), default="", help="pick the variant by backend")
    p.add_argument("--requests", type=positive_int, default=5, metavar="N", help="measured requests (default 5)")
    p.add_argument("--prompt-tokens", type=positive_int, default=128, metavar="N", help="prompt tokens (default 128)")
    p.add_argument("--max-tokens", type=positive_int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--context", type=positive_int, default=None, metavar="TOKENS",
                   help="the backend's context (default: the variant's, at most 2048)")
    p.add_argument("--gpu-model", default="", metavar="NAME", help="key of the figures (default: this host's "
                   "first GPU by NVML, else cpu)")
    p.add_argument("--ready-timeout", type=float, default=600.0, metavar="SECONDS")
    p.add_argument("--no-store", action="store_true", help="do not write the figures to the registry")
    p.set_defaults(func=run_bench)


def pick_variant(model, variant: str, backend: str):
    from gpumesh.v1 import model_service_pb2 as M
    kinds = {M.BACKEND_LLAMA_CPP: "llama.cpp", M.BACKEND_VLLM: "vllm"}
    vs = sorted(model.variants, key=lambda v: v.fallback_rank)
    if variant:
        vs = [v for v in vs if v.name == variant]
        if not vs:
            raise CliError(f"model {model.name!r} has no variant {variant!r} (has: "
                           f"{', '.join(v.name for v in model.variants)})")
    if backend:
        vs = [v for v in vs if kinds.get(v.backend) == backend]
        if not vs:
            raise CliError(f"model {model.name!r} has no {backend} variant{' ' + variant if variant else ''}")
    v = vs[0]
    return v, kinds.get(v.backend, "")


def run_bench(args: argparse.Namespace) -> int:
    from mesh.models import bench
    from tools.meshctl.output import dump
    with client(args) as mesh:
        model = mesh.get_model(args.name)
        v, kind = pick_variant(model, args.variant, args.backend)
        artifact = v.artifact[len("file://"):] if v.artifact.startswith("file://") else v.artifact
        context = args.context or min(v.context or v.max_context or 2048, 2048)
        gpu = args.gpu_model or bench.local_gpu_model()
        if gpu != "cpu":
            from mesh import gpumodels
            try:
                gpu = gpumodels.get_model(gpu).name
            except KeyError as e:
                raise CliError(str(e).strip('"')) from None
        tty = sys.stderr.isatty()
        progress = info if tty else (lambda _m: None)
        try:
            r = bench.run(model.name, v.name, kind, artifact, gpu_model=gpu, context=context,
                          requests=args.requests, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                          ready_timeout=args.ready_timeout, progress=progress)
        except bench.BenchError as e:
            raise CliError(f"bench of {model.name}/{v.name} ({kind}) failed: {e}") from None
        stored = False
        if not args.no_store:
            note = f"meshctl model bench on {os.uname().nodename}: {kind} started as a process"
            mesh.record_measurement(args.name, v.name, gpu, bench.measurement(r, note))
            stored = True
            if tty:
                info(f"stored on {args.name}/{v.name} under {gpu!r}")
    doc = {**r.to_dict(), "stored": stored}
    if args.output in ("json", "yaml"):
        out(dump(doc, args.output))
        return 0
    from tools.meshctl.output import render_table
    head = ["MODEL", "VARIANT", "BACKEND", "GPU", "LOAD", "TTFT", "TTFT P95", "GEN TOK/S", "PROMPT TOK/S"]
    row = [r.model, r.variant, r.backend, r.gpu_model, f"{r.load_seconds:.2f}s", f"{r.ttft_seconds * 1000:.0f}ms",
           f"{r.ttft_p95_seconds * 1000:.0f}ms", f"{r.tokens_per_second:.1f}", f"{r.prompt_tokens_per_second:.0f}"]
    if args.output == "wide":
        head += ["REQUESTS", "PROMPT", "MAX TOKENS", "CONTEXT", "STORED"]
        row += [r.requests, r.prompt_tokens, r.max_tokens, r.context, "yes" if stored else "no"]
    out(render_table(head, [row]))
    return 0
