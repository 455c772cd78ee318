"""`meshctl run`, `meshctl stop` and `meshctl logs`: processes on slices.

`meshctl get workloads` and `meshctl describe workload` use the table and
document helpers at the end of this module.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from tools.meshctl.common import CliError, client, key_value, nonneg_int, out, subcommand

RUN_EPILOG = """\
examples:
  meshctl run --slice s-7f3a9c1e2b4d -- python train.py --epochs 3
  meshctl run --slice s-7f3a9c1e2b4d --env NCCL_DEBUG=INFO --label job=train-42 -- ./serve
  meshctl run --slice s-7f3a9c1e2b4d -f -- nvidia-smi -L     # follow its output, exit with its status
  meshctl run --slice s-7f3a9c1e2b4d --request-id job-42 -- ./train   # a retry with job-42 runs nothing twice
  meshctl run --slice s-7f3a9c1e2b4d --network none -- torchrun --nproc-per-node 2 train.py   # loopback only
  meshctl run --slice s-7f3a9c1e2b4d --backend llama.cpp --artifact /models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --context 512 --served-name smollm2                   # a model server; prints its ENDPOINT
  meshctl run --slice s-7f3a9c1e2b4d --backend vllm --artifact /models/smollm2-bf16 --device cpu -o json
  meshctl run --slice s-7f3a9c1e2b4d --backend vllm --artifact /models/smollm2-bf16 \
      --gpu-memory-utilization 0.2 --api-key-file ~/.gpumesh/server.key   # less than its quarter-GPU MPS slice

The process gets the slice's environment (CUDA_VISIBLE_DEVICES = the slice's
device UUID, MPS limits on MPS slices) plus --env. With --backend the agent
starts that model server on the slice (no COMMAND: it builds the command line,
picks a port and reports the OpenAI-compatible ENDPOINT); a deployment does this
for each replica (meshctl deploy).

Labels gpumesh reads (docs/operations.md, Workload isolation):
  gpumesh.io/network=host|none|isolated
                                 none: its own network namespace with only
                                 loopback (reaches nothing of the host);
                                 isolated: also an address on the node's
                                 workload bridge that the host reaches (Address
                                 in meshctl describe workload); same as
                                 --network; default: the slice's label, else
                                 the agent's workload_network (host)
  gpumesh.io/memory-bytes=N      host memory limit (at most the slice's)
  gpumesh.io/cpu-milli=N         CPU limit in milli-CPUs (at most the slice's)
  gpumesh.io/pids=N              process/thread limit
  gpumesh.io/isolation=criu      no namespaces, transparently migratable (CRIU)
"""

LOGS_EPILOG = """\
examples:
  meshctl logs w-3f9a2c1d7e6b
  meshctl logs w-3f9a2c1d7e6b --tail 20 -f
"""


def register(sub: argparse._SubParsersAction) -> None:
    r = subcommand(sub, "run", help="run a process on a slice",
                   description="Start COMMAND on a READY slice through its node's agent.", epilog=RUN_EPILOG)
    r.add_argument("--slice", required=True, metavar="ID", help="the slice to run on (s-...)")
    r.add_argument("--env", type=key_value("environment variable"), action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment (repeatable)")
    r.add_argument("--label", type=key_value("label"), action="append", default=[], metavar="KEY=VALUE",
                   help="a label kept with the workload (repeatable)")
    r.add_argument("--network", choices=("host", "none", "isolated"), default="",
                   help="host: the host's network; none: its own network namespace with only loopback; isolated: "
                        "also an address on the node's workload bridge that the host reaches (the label "
                        "gpumesh.io/network; default: the slice's label, else the agent's workload_network)")
    r.add_argument("--request-id", default="", metavar="KEY",
                   help="idempotency key: running the same command again with the same key (a retry after a "
                        "timeout) returns the first workload instead of starting a second one; the key with "
                        "other arguments is refused")
    r.add_argument("-f", "--follow", action="store_true",
                   help="print its output until it ends, then exit with its exit status")
    b = r.add_argument_group("model server (instead of a COMMAND)")
    b.add_argument("--backend", choices=("llama.cpp", "vllm"), default="", help="the server the agent starts")
    b.add_argument("--artifact", default="", metavar="PATH",
                   help="the model on the node: a GGUF file (llama.cpp) or a Hugging Face directory (vllm)")
    b.add_argument("--served-name", default="", metavar="NAME", help="the name it answers to in /v1/models")
    b.add_argument("--context", type=nonneg_int, default=0, metavar="TOKENS", help="context per sequence")
    b.add_argument("--concurrency", type=nonneg_int, default=0, metavar="N", help="vllm: sequences at once")
    b.add_argument("--gpu-layers", type=nonneg_int, default=0, metavar="N", help="llama.cpp: layers on the GPU (0: all)")
    b.add_argument("--device", choices=("cuda", "cpu"), default="", help="vllm: pin the build (default: the agent's)")
    b.add_argument("--dtype", default="", help="vllm: bfloat16, float16, float32 (default: the checkpoint's)")
    b.add_argument("--gpu-memory-utilization", type=memory_share, default=0.0, metavar="SHARE",
                   help="vllm: the share of the device's memory it may take, in (0, 1]; on an MPS or time-share "
                        "slice the device is the whole GPU, and a share over the slice's memory over the GPU's "
                        "is refused (default: the slice's share, as a deployment's replica gets; 0.9 on MIG)")
    b.add_argument("--artifact-sha256", type=sha256_hex, default="", metavar="HEX",
                   help="the artifact's SHA-256: the agent checks the weights against it before the server starts")
    b.add_argument("--api-key-file", default="", metavar="PATH",
                   help="a file holding the key the server requires of every request (Authorization: Bearer KEY); "
                        "default: none, anything that reaches its port may use it")
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the program and its arguments")
    r.set_defaults(func=run_run)

    s = subcommand(sub, "stop", help="stop a workload", description="SIGTERM a workload, SIGKILL after the grace period.",
                   epilog="examples:\n  meshctl stop w-3f9a2c1d7e6b\n  meshctl stop w-3f9a2c1d7e6b --grace 30   "
                          "# SIGKILL only after 30 s\n  meshctl stop w-3f9a2c1d7e6b -o json\n")
    s.add_argument("id", metavar="WORKLOAD", help="workload ID (w-...)")
    s.add_argument("--grace", type=float, default=0.0, metavar="SECONDS", help="grace period (default: the agent's, 10 s)")
    s.set_defaults(func=run_stop)

    lg = subcommand(sub, "logs", help="print a workload's output", description="Print a workload's output "
                    "(stdout and stderr interleaved) as its node has it.", epilog=LOGS_EPILOG)
    lg.add_argument("id", metavar="WORKLOAD", help="workload ID (w-...)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the workload ends")
    lg.add_argument("--tail", type=int, default=0, metavar="N", help="only the last N lines (default: all; at most the log's last 8 MiB either way)")
    lg.set_defaults(func=run_logs)


def _stream(mesh, wid: str, tail: int, follow: bool) -> None:
    for data in mesh.workload_logs(wid, tail_lines=tail, follow=follow):
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


SERVER_FLAGS = ("artifact", "served_name", "context", "concurrency", "gpu_layers", "device", "dtype",
                "gpu_memory_utilization", "artifact_sha256", "api_key_file")


def memory_share(text: str) -> float:
    """An argparse type: a share of a device's memory in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:          # nan too
        raise argparse.ArgumentTypeError(f"{text} is not a share of the device's memory (allowed: (0, 1], e.g. 0.25)")
    return value


def sha256_hex(text: str) -> str:
    """An argparse type: a SHA-256 as 64 hex digits (lower-cased); "" (argparse's default) stays ""."""
    from mesh.models.digest import HEX_RE
    value = text.strip().lower()
    if value and not HEX_RE.match(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SHA-256 (allowed: 64 hex digits, as sha256sum prints)")
    return value


def read_api_key(path: str) -> str:
    """The key in `path` (its first line, surrounding whitespace dropped); CliError naming the flag."""
    from mesh.config import ConfigError, read_token_file
    try:
        return read_token_file(path, "", "--api-key-file", "", "the key")
    except ConfigError as e:
        raise CliError(str(e)) from None


def run_run(args: argparse.Namespace) -> int:
    if args.network:
        args.label = [*args.label, ("gpumesh.io/network", args.network)]
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    server = {k: getattr(args, k) for k in SERVER_FLAGS}
    if args.backend:
        if command:
            raise CliError("--backend starts a model server: give no COMMAND (the agent builds it)")
        if not args.artifact:
            raise CliError("--artifact is required with --backend (the model's path on the node)")
        key_file = server.pop("api_key_file")
        server["api_key"] = read_api_key(key_file) if key_file else ""
    elif any(server.values()):
        given = ", ".join("--" + k.replace("_", "-") for k, v in server.items() if v)
        raise CliError(f"{given}: model-server flags need --backend llama.cpp|vllm")
    elif not command:
        raise CliError("no command given (meshctl run --slice ID -- COMMAND ..., or --backend with --artifact)")
    from tools.meshctl.output import dump
    with client(args) as mesh:
        if args.backend:
            w = mesh.run_workload(args.slice, env=dict(args.env), labels=dict(args.label), backend=args.backend,
                                  request_id=args.request_id, **server)
        else:
            w = mesh.run_workload(args.slice, command, env=dict(args.env), labels=dict(args.label),
                                  request_id=args.request_id)
        if args.follow:
            _stream(mesh, w.id, 0, True)
            w = mesh.get_workload(w.id)
            return w.exit_code if w.exit_code or w.state != 4 else 1
    from mesh.client import workload_to_dict
    doc = workload_to_dict(w)
    if args.output in ("json", "yaml"):
        out(dump(doc, args.output))
    else:
        out(f"workload/{doc['id']} {doc['state']} on {doc['node']} (slice {doc['slice_id']}, pid {doc['pid'] or '-'})"
            + (f", {doc['backend']['kind']} at {doc['endpoint'] or '(starting)'}" if doc["backend"] else "")
            + (f": {doc['message']}" if doc["message"] else "") + "\n")
    return 1 if doc["state"] == "failed" else 0


def run_stop(args: argparse.Namespace) -> int:
    from mesh.client import workload_to_dict
    from tools.meshctl.output import dump
    with client(args) as mesh:
        doc = workload_to_dict(mesh.stop_workload(args.id, args.grace))
    if args.output in ("json", "yaml"):
        out(dump(doc, args.output))
    else:
        out(f"workload/{doc['id']} {doc['state']}" + (f": {doc['message']}" if doc["message"] else "") + "\n")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    from tools.meshctl.common import text_only
    text_only(args, "logs", "the workload's output as it wrote it")
    if args.tail < 0:
        raise CliError("--tail must be >= 0")
    with client(args) as mesh:
        _stream(mesh, args.id, args.tail, args.follow)
    return 0


# -- get / describe ----------------------------------------------------------------------

def workload_columns(now: datetime | None = None) -> list:
    from tools.meshctl.output import _title, age
    return [
        ("ID", lambda d: d["id"], False),
        ("SLICE", lambda d: d["slice_id"], False),
        ("NODE", lambda d: d["node"], False),
        ("STATE", lambda d: _title(d["state"]), False),
        ("EXIT", lambda d: d["exit_code"] if d["finished_at"] else "-", False),
        ("AGE", lambda d: age(d["created_at"], now), False),
        ("COMMAND", lambda d: " ".join(d["command"])[:60], False),
        ("TENANT", lambda d: d["tenant"], True),
        ("PID", lambda d: d["pid"] or "-", True),
        ("MESSAGE", lambda d: d["message"], True),
    ]


def fetch(args: argparse.Namespace) -> list:
    if getattr(args, "state", None):
        raise CliError("--state does not filter workloads")
    with client(args) as mesh:
        items = mesh.list_workloads(tenant=args.tenant, node=args.node, slice_id=getattr(args, "slice", "") or "")
    from tools.meshctl.get import has_labels
    return [w for w in items if (not args.names or w.id in args.names)
            and has_labels(w.labels, getattr(args, "selector", None) or [])]


def format_workload(d: dict[str, Any]) -> str:
    from tools.meshctl.describe import _fields
    text = _fields([
        ("ID", d["id"]), ("State", d["state"]), ("Message", d["message"]),
        ("Slice", d["slice_id"]), ("Node", d["node"]), ("Tenant", d["tenant"]),
        ("Command", " ".join(d["command"])), ("PID", d["pid"] or None),
        ("Exit code", d["exit_code"] if d["finished_at"] else None),
        ("Created", d["created_at"]), ("Started", d["started_at"]), ("Finished", d["finished_at"]),
        ("Labels", ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))),
        ("Network", d["labels"].get("gpumesh.io/network") or None),
        ("Address", d.get("network_address") or None),
    ])
    text += "Environment (besides the slice's):\n"
    text += "".join(f"  {k}={v}\n" for k, v in sorted(d["env"].items())) or "  <none>\n"
    return text


def format_list(items: list, fmt: str, now: datetime | None = None) -> str:
    from mesh.client import workload_to_dict
    from tools.meshctl.output import dump, table_of
    dicts = [workload_to_dict(w) for w in items]
    if fmt in ("json", "yaml"):
        return dump({"items": dicts}, fmt)
    if not dicts:
        return "No workloads found.\n"
    return table_of(dicts, workload_columns(now), wide=(fmt == "wide"))
