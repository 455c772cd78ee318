"""`meshctl migrate|checkpoint|restore|resize`: move workloads, checkpoint them to the store,
restore them, resize slices (MigrationService through the SDK)."""

from __future__ import annotations

import argparse

from tools.meshctl.common import CliError, client, out, subcommand

EPILOG = """\
examples:
  meshctl migrate w-3f9a2c1d7e6b                     # wherever the scheduler places a slice of the same spec
  meshctl migrate w-3f9a2c1d7e6b --to gpu-b          # a node, or a READY slice (s-...)
  meshctl migrate w-3f9a2c1d7e6b --mode stop-and-copy --no-wait -o json
"""


def register(sub: argparse._SubParsersAction) -> None:
    m = subcommand(sub, "migrate", help="live-migrate a workload to another slice",
                   description="Move a RUNNING workload (same ID) to another node by pre-copy; prints each "
                               "phase and pre-copy round until it is done or rolled back.", epilog=EPILOG)
    m.add_argument("id", metavar="WORKLOAD", help="workload ID (w-...)")
    m.add_argument("--to", default="", metavar="NODE|SLICE", help="target node name or slice ID (s-...)")
    m.add_argument("--mode", default="precopy", choices=("precopy", "stop-and-copy", "transparent"),
                   help="(default: precopy); transparent: CRIU dump/restore of a process without the SDK "
                        "(needs CRIU 4.0+ on both nodes)")
    m.add_argument("--no-wait", action="store_true", help="return once the migration is planned")
    m.set_defaults(func=run_migrate)

    c = subcommand(sub, "checkpoint", help="checkpoint a workload into the store",
                   description="A consistent checkpoint of a running workload (at a safe point) into the agents' "
                               "checkpoint_dir, encrypted with the tenant's key when one is configured.",
                   epilog="example:\n  meshctl checkpoint w-3f9a2c1d7e6b\n")
    c.add_argument("id", metavar="WORKLOAD", help="workload ID (w-...)")
    c.set_defaults(func=run_checkpoint)

    r = subcommand(sub, "restore", help="restore a workload from a checkpoint",
                   description="Start the checkpointed workload again (same ID) from its checkpoint's step.",
                   epilog="examples:\n  meshctl restore ck-1a2b3c4d5e6f\n  meshctl restore ck-1a2b3c4d5e6f --to s-7f3a9c1e2b4d\n")
    r.add_argument("id", metavar="CHECKPOINT", help="checkpoint ID (ck-...)")
    r.add_argument("--to", default="", metavar="NODE|SLICE", help="target node or slice (default: a slice of the same spec)")
    r.add_argument("--no-wait", action="store_true", help="return once the restore is planned")
    r.set_defaults(func=run_restore)

    z = subcommand(sub, "resize", help="change a slice's size (keeps its ID; in place or by migration)",
                   description="Change a slice's size; the slice keeps its ID. MPS and time-share slices change in "
                               "place when their GPU has room; otherwise (MIG, or no room) a slice of the new size "
                               "is reserved (same node allowed) and the slice's running workload is migrated into "
                               "it (pre-copy), then the placements are swapped. A failed resize leaves the slice "
                               "and its workload as they were.",
                   epilog="examples:\n  meshctl resize s-7f3a9c1e2b4d --memory 8GiB --compute 0.5\n"
                          "  meshctl resize s-7f3a9c1e2b4d --profile 3g.40gb\n")
    z.add_argument("id", metavar="SLICE", help="slice ID (s-...)")
    z.add_argument("--memory", default="", help="new GPU memory (e.g. 8GiB)")
    z.add_argument("--compute", type=float, default=0.0, help="new compute share in (0, 1]")
    z.add_argument("--profile", default="", help="MIG: the new profile (default: the smallest that holds "
                                                 "--memory and --compute)")
    z.set_defaults(func=run_resize)


def _target(to: str) -> dict:
    return {"to_slice": to} if to.startswith("s-") else {"to_node": to} if to else {}


def _line(m) -> str:
    from mesh.migrationapi import migration_phase
    text = f"migration/{m.id} {migration_phase(m)}"
    if m.target_node:
        text += f" {m.source_node or '-'} -> {m.target_node}"
    if m.rounds:
        r = m.rounds[-1]
        text += (f": round {r.round}{' (paused)' if r.paused else ''} {r.bytes / 1e6:.1f} MB, "
                 f"{m.bytes_sent / 1e6:.1f} MB sent, {m.mb_per_s:.0f} MB/s")
        if m.transfer:
            text += f" over {m.transfer}"
    if m.phase in (5, 6) and m.step:
        text += f"; step {m.step}, downtime {m.downtime_ms:.0f} ms"
    if m.message:
        text += f" ({m.message})"
    return text


def _follow(mesh, m, args) -> int:
    from mesh.migrationapi import FINISHED, migration_to_dict
    from tools.meshctl.output import dump
    if not args.no_wait:
        from tools.meshctl.progress import for_args
        progress = for_args(args)              # each new phase a line; a spinner on a terminal; quiet in json
        last = ""
        with progress.waiting(f"migration/{m.id}"):
            for m in mesh.watch_migration(m.id):
                line = _line(m)
                if line != last:
                    progress.step(line)
                    last = line
                if m.phase in FINISHED:
                    break
    if args.output in ("json", "yaml"):
        out(dump(migration_to_dict(m), args.output))
    else:
        out(_line(m) + "\n")
    return 1 if m.phase == 8 else 0


def run_migrate(args: argparse.Namespace) -> int:
    with client(args) as mesh:
        m = mesh.migrate(args.id, mode=args.mode, **_target(args.to))
        return _follow(mesh, m, args)


def run_restore(args: argparse.Namespace) -> int:
    with client(args) as mesh:
        m = mesh.restore(args.id, **_target(args.to))
        return _follow(mesh, m, args)


def run_checkpoint(args: argparse.Namespace) -> int:
    from mesh.migrationapi import checkpoint_to_dict
    from tools.meshctl.output import dump
    from tools.meshctl.progress import for_args
    # no deadline of its own: the control plane waits while the agent reports progress (copy_idle_timeout_seconds)
    with client(args) as mesh, for_args(args).waiting(f"checkpointing workload/{args.id}"):
        ck = mesh.checkpoint(args.id)
    if args.output in ("json", "yaml"):
        out(dump(checkpoint_to_dict(ck), args.output))
    else:
        out(f"checkpoint/{ck.id} of {ck.workload_id} at step {ck.step}: {ck.bytes / 1e6:.1f} MB in "
            f"{ck.seconds:.2f} s ({ck.mb_per_s:.0f} MB/s){', encrypted' if ck.encrypted else ''} -> {ck.path}\n")
    return 0


def run_resize(args: argparse.Namespace) -> int:
    from mesh.client import slice_to_dict
    from tools.meshctl.output import dump
    memory = 0
    if args.memory:
        from mesh.units import parse_size
        memory = parse_size(args.memory)
    if not memory and not args.compute and not args.profile:
        raise CliError("give --memory, --compute and/or --profile")
    from tools.meshctl.progress import for_args
    with client(args) as mesh, for_args(args).waiting(f"resizing slice/{args.id}"):
        before = mesh.get_slice(args.id)
        s = mesh.resize(args.id, memory_bytes=memory, compute_share=args.compute, mig_profile=args.profile)
    if args.output in ("json", "yaml"):
        out(dump(slice_to_dict(s), args.output))
    else:
        out(resize_summary(before, s))
    return 0


def resize_summary(before, after) -> str:
    """What a resize did, said from the slice before and after: unchanged (the size asked for is the one it has,
    e.g. a MIG slice whose profile already holds --memory), in place (MPS/time-share limits on the same GPU), or
    by migration (MIG and exclusive slices always, a shared one that moved to a GPU with room)."""
    what = f"{after.profile}, " if after.profile else ""
    size = f"{what}{after.memory_bytes / 2**30:.1f} GiB, compute {after.compute_share:.2f} on {after.node}/" \
           f"{after.gpu_index}"
    if (before.profile, before.memory_bytes, round(before.compute_share, 4)) == \
            (after.profile, after.memory_bytes, round(after.compute_share, 4)):
        return f"slice/{after.id} unchanged: already {size} (the size asked for is the one it has)\n"
    from gpumesh.v1 import types_pb2
    shared = after.isolation in (types_pb2.ISOLATION_MPS, types_pb2.ISOLATION_TIMESHARE)
    moved = (before.node, before.gpu_index) != (after.node, after.gpu_index)
    how = "in place" if shared and not moved else "by migration"
    return f"slice/{after.id} resized: {size} ({how})\n"


def checkpoint_columns(now=None) -> list:
    from tools.meshctl.output import age
    return [
        ("ID", lambda c: c["id"], False),
        ("WORKLOAD", lambda c: c["workload_id"], False),
        ("STEP", lambda c: str(c["step"]), False),
        ("SIZE", lambda c: f"{int(c['bytes']) / 1e6:.1f}MB", False),
        ("ENCRYPTED", lambda c: "yes" if c["encrypted"] else "no", False),
        ("PATH", lambda c: c["path"], False),
        ("TENANT", lambda c: c["tenant"] or "-", True),
        ("NODE", lambda c: c["node"] or "-", True),
        ("SECONDS", lambda c: f"{c['seconds']:.2f}", True),
        ("MB/S", lambda c: f"{c['mb_per_s']:.1f}", True),
        ("AGE", lambda c: age(c.get("created_at"), now), True),
    ]


def migration_columns(now=None) -> list:
    from tools.meshctl.output import age
    return [
        ("ID", lambda m: m["id"], False),
        ("WORKLOAD", lambda m: m["workload_id"], False),
        ("PHASE", lambda m: m["phase"], False),
        ("FROM", lambda m: m["source_node"] or "-", False),
        ("TO", lambda m: m["target_node"] or "-", False),
        ("STEP", lambda m: str(m["step"]), False),
        ("REASON", lambda m: m["reason"], False),
        ("MODE", lambda m: m["mode"], True),
        ("TENANT", lambda m: m["tenant"] or "-", True),
        ("ROUND", lambda m: m["round"], True),
        ("SENT", lambda m: f"{int(m['bytes_sent']) / 1e6:.1f}MB", True),
        ("MB/S", lambda m: f"{m['mb_per_s']:.1f}", True),
        ("DOWNTIME", lambda m: f"{m['downtime_ms']:.0f}ms" if m["downtime_ms"] else "-", True),
        ("TOTAL", lambda m: f"{m['total_ms']:.0f}ms" if m["total_ms"] else "-", True),
        ("CHECKPOINT", lambda m: m["checkpoint_id"] or "-", True),
        ("AGE", lambda m: age(m.get("created_at"), now), True),
        ("MESSAGE", lambda m: (m["message"] or "-").split("\n")[0][:80], True),
    ]


def format_checkpoints(items: list, fmt: str, now=None, usage=()) -> str:
    """`usage`: CheckpointUsage of the tenants listed (their store usage against the checkpoint quota)."""
    from mesh.migrationapi import checkpoint_to_dict
    from mesh.units import format_size
    from tools.meshctl.output import dump, table_of
    dicts = [checkpoint_to_dict(c) for c in items]
    if fmt in ("json", "yaml"):
        return dump({"items": dicts, **({"usage": [checkpoint_to_dict(u) for u in usage]} if usage else {})}, fmt)
    text = table_of(dicts, checkpoint_columns(now), wide=(fmt == "wide")) if dicts else "No checkpoints found.\n"
    for u in usage:
        limit = f"of its {format_size(u.limit_bytes)} checkpoint quota" if u.limit_bytes else "(no checkpoint quota)"
        text += f"tenant {u.tenant or 'default'}: checkpoints hold {format_size(u.bytes)} {limit}\n"
    return text


def format_migrations(items: list, fmt: str, now=None) -> str:
    from mesh.migrationapi import migration_to_dict
    from tools.meshctl.output import dump, table_of
    dicts = [migration_to_dict(m) for m in items]
    if fmt in ("json", "yaml"):
        return dump({"items": dicts}, fmt)
    if not dicts:
        return "No migrations found.\n"
    return table_of(dicts, migration_columns(now), wide=(fmt == "wide"))
