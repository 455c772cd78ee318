"""`meshctl alloc` and `meshctl release`: ask for slices and give them back."""

from __future__ import annotations

import argparse

from tools.meshctl.common import client, out, positive_int, subcommand

ALLOC_EPILOG = """\
examples:
  meshctl alloc --tenant team-a --profile 3g.40gb
  meshctl alloc --tenant team-a --profile 1g.10gb --count 4 --topology same-node
  meshctl alloc --tenant team-a --memory 8GiB --compute 0.25 --isolation mps
  meshctl alloc --tenant team-a --memory 80G --isolation exclusive --model H100-80GB
  meshctl alloc --tenant team-a --profile 1g.10gb --label job=train-42 --no-wait -o json
  meshctl alloc --tenant team-a --memory 8GiB --cpu 2 --host-memory 16GiB    # reserve host CPU and RAM too
  meshctl alloc --tenant team-a --profile 1g.10gb --priority 500 --preempt   # may evict lower priorities
  meshctl alloc --tenant team-a --profile 1g.10gb --label app=db --anti-affinity app=db   # one per node
  meshctl --context alice alloc --profile 3g.40gb     # a tenant's credentials: its own tenant

-o json|yaml prints {"id": <allocation id>, "slices": [...]}.
"""

RELEASE_EPILOG = """\
examples:
  meshctl release s-7f3a9c1e2b4d      # one slice
  meshctl release a-2b4d7f3a9c1e      # every slice of an allocation
"""


def size_arg(text: str) -> int:
    from mesh.units import parse_size
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def share_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid compute share {text!r} (allowed: a number in (0, 1])") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"compute share {text} out of range (allowed: (0, 1])")
    return value


def label_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid label {text!r} (allowed: KEY=VALUE)")
    return key, value


def cpu_arg(text: str) -> int:
    """`--cpu 2`, `0.5` or `500m` -> milli-CPUs (> 0)."""
    try:
        value = int(text[:-1]) if text.endswith("m") else round(float(text) * 1000)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid CPU amount {text!r} (allowed: CPUs like 2 or 0.5, "
                                         "or milli-CPUs like 500m)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "alloc", aliases=("allocate",), help="allocate slices for a tenant",
                   description="Place --count slices all or nothing and wait until they are "
                               "READY (unless --no-wait).", epilog=ALLOC_EPILOG)
    p.add_argument("--tenant", default="",
                   help="owner of the slices (default: the caller's tenant; an admin names one)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", default="", help="a MIG profile, e.g. 1g.10gb or 3g.40gb (implies --isolation mig)")
    what.add_argument("--memory", type=size_arg, metavar="SIZE", help="GPU memory per slice, e.g. 8GiB, 40G")
    p.add_argument("--compute", type=share_arg, default=0.0, metavar="SHARE",
                   help="compute share per slice in (0, 1] (default: derived by the control plane)")
    p.add_argument("--isolation", choices=("mig", "mps", "timeshare", "exclusive"), default=None,
                   help="isolation level (default: MIG where a profile fits, else time-share)")
    p.add_argument("--model", default="", help="GPU model, e.g. H100-80GB (default: any)")
    p.add_argument("--count", type=positive_int, default=1, help="number of slices, all or nothing (default: 1)")
    p.add_argument("--topology", choices=("any", "same-node", "same-nvlink"), default="any",
                   help="where the slices of the gang sit (default: any)")
    p.add_argument("--priority", type=int, default=0, help="-1000..1000 (default: 0)")
    p.add_argument("--label", type=label_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="a label kept with the slices (repeatable)")
    p.add_argument("--cpu", type=cpu_arg, default=0, metavar="CPUS",
                   help="host CPU reserved per slice: 2, 0.5 or 500m (default: none)")
    p.add_argument("--host-memory", type=size_arg, default=0, metavar="SIZE",
                   help="host memory reserved per slice, e.g. 16GiB (default: none)")
    p.add_argument("--preempt", action="store_true",
                   help="may evict lower-priority slices when nothing else fits (if the scheduler allows it)")
    p.add_argument("--anti-affinity", type=label_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="not on a node holding a slice with this label (repeatable; spreads replicas)")
    p.add_argument("--request-id", default="",
                   help="idempotency key: a retry with the same arguments returns the first allocation; the key "
                        "with other arguments is refused")
    p.add_argument("--no-wait", action="store_true", help="answer once placed (state PENDING)")
    p.add_argument("--wait-timeout", type=float, default=0, metavar="SECONDS",
                   help="how long the control plane waits for READY (default: its own, 30 s)")
    p.set_defaults(func=run_alloc)

    r = subcommand(sub, "release", help="release a slice or a whole allocation",
                   description="Release one slice (s-...) or every slice of an allocation (a-...).",
                   epilog=RELEASE_EPILOG)
    r.add_argument("id", metavar="ID", help="slice ID or allocation ID")
    r.set_defaults(func=run_release)


def run_alloc(args: argparse.Namespace) -> int:
    from tools.meshctl.output import format_allocation
    from tools.meshctl.progress import for_args
    what = f"{args.count} slices" if args.count > 1 else "a slice"
    with client(args) as mesh, for_args(args).waiting(
            f"allocating {what}" + ("" if args.no_wait else " and waiting until READY")):
        resp = mesh.allocate(
            tenant=args.tenant, memory_bytes=args.memory or 0, compute_share=args.compute,
            isolation=args.isolation, gpu_model=args.model, mig_profile=args.profile,
            count=args.count, topology=args.topology, priority=args.priority,
            labels=dict(args.label), request_id=args.request_id, no_wait=args.no_wait,
            timeout_seconds=args.wait_timeout, cpu_milli=args.cpu, host_memory_bytes=args.host_memory,
            preempt=args.preempt, anti_affinity=dict(args.anti_affinity))
    out(format_allocation(resp, args.output))
    return 0


def run_release(args: argparse.Namespace) -> int:
    from mesh.client import slice_to_dict
    from tools.meshctl.output import dump
    with client(args) as mesh:
        resp = mesh.release(args.id)
    released = [slice_to_dict(s) for s in resp.slices]
    if args.output in ("json", "yaml"):
        out(dump({"id": args.id, "slices": released}, args.output))
    else:
        ids = ", ".join(s["id"] for s in released) or "nothing"
        out(f"released {args.id}: {ids}\n")
    return 0
