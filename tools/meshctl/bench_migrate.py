"""`meshctl bench migrate`: live migration (pre-copy) against stop-and-copy, on real processes.

Starts a workload process with `--state-mb` of tensor state registered with the
checkpoint SDK; each step it rewrites `--dirty-pct` of the state (whole tensors, chosen
at random, updated in place) and takes `--step-ms` in all. A second process of the same
program waits to receive it. The bench migrates the running workload with pre-copy, then
does the same with a fresh pair by stop-and-copy, and measures the raw speed of the channel
the migration used with a transfer of the same size (no checksums) to a discarding
receiver, before and after the migrations (the faster of the two counts). `--transport`
picks the channel for the chunk payloads: `grpc` (the transfer stream, as between hosts;
the default), `shm` (the mesh: the target's shared-memory ring, same host), `auto` (the
mesh when it is faster, as the agents do).

Reports downtime (source paused at a safe point until the target runs), total time,
bytes sent, and the stop-and-copy downtime. Progress goes to stderr.

Every transfer is authenticated and sealed with a per-session secret, as the agents' are
(mesh/checkpoint/transfer_auth.py). `--tls` also measures the raw stream over mTLS (a fresh
CA and two agent certificates, as agent-to-agent transfers in a secured cluster use):
`link_tls_mb_per_s` against `link_mb_per_s`. `--relay` also measures the raw stream through the agent's
relay for workloads without network (a Unix socket piped to the receiver's TCP port, as a
`gpumesh.io/network=none` workload's checkpoint and migration take, nodeagent/isolation/netrelay.py):
`link_relay_mb_per_s` against `link_mb_per_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

EPILOG = """\
examples:
  meshctl bench migrate --state-mb 1024 --dirty-pct 2 -o json
  meshctl bench migrate --state-mb 256 --dirty-pct 10 --step-ms 50
  meshctl bench migrate --state-mb 1024 --dirty-pct 2 --transport auto -o json
  python -m tools.meshctl.bench_migrate --state-mb 1024 --dirty-pct 2 -o json
  meshctl bench migrate --state-mb 512 --relay --no-stop-and-copy -o json   # + the none workloads' relay

Prints {"downtime_ms", "total_ms", "bytes_sent", "stop_and_copy_downtime_ms",
"link_mb_per_s", "downtime_ratio", "total_vs_link", "rounds", ...}.
"""


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _pct(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 100:
        raise argparse.ArgumentTypeError(f"must be within [0, 100], got {text}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-mb", type=_positive_float, default=1024.0, metavar="MB",
                   help="workload state in MiB (default: 1024)")
    p.add_argument("--dirty-pct", type=_pct, default=2.0, metavar="PCT",
                   help="percent of the state rewritten per step (default: 2)")
    p.add_argument("--step-ms", type=_positive_float, default=100.0, metavar="MS",
                   help="length of a training step, compute included (default: 100)")
    p.add_argument("--tensor-mb", type=_positive_float, default=4.0, metavar="MB",
                   help="size of each state tensor in MiB (default: 4)")
    p.add_argument("--max-rounds", type=int, default=8, metavar="N", help="pre-copy rounds after the first (default: 8)")
    p.add_argument("--stop-mb", type=float, default=None, metavar="MB",
                   help="stop pre-copy once the changed set is this small (default: one step's worth)")
    p.add_argument("--no-stop-and-copy", dest="stop_and_copy", action="store_false",
                   help="skip the stop-and-copy comparison")
    p.add_argument("--transport", choices=("auto", "grpc", "shm"), default="grpc",
                   help="channel for the state's bytes: grpc (the transfer stream, as between hosts; default), "
                        "shm (the mesh: the target's shared-memory ring, same host), auto (the mesh when faster)")
    p.add_argument("--relay", action="store_true",
                   help="also measure the raw stream through the relay of workloads without network "
                        "(link_relay_mb_per_s)")
    p.add_argument("--tls", action="store_true",
                   help="also measure the raw stream over mTLS with agent certificates (link_tls_mb_per_s)")


def add_migrate_bench(subparsers: Any) -> argparse.ArgumentParser:
    """Registers `migrate` under `meshctl bench` (`subparsers` is bench's subparsers object)."""
    from tools.meshctl.common import subcommand
    p = subcommand(subparsers, "migrate", help="live migration downtime against stop-and-copy",
                   description=__doc__.split("\n\n", 1)[1], epilog=EPILOG, skip=("timeout",))
    add_arguments(p)
    p.set_defaults(func=run_migrate_bench)
    return p


def info(msg: str) -> None:
    sys.stderr.write(f"{msg}\n")
    sys.stderr.flush()


# --- the workload process -------------------------------------------------------------------

def worker_main(argv: list[str]) -> int:
    """The bench's workload: `--state-mb` of tensors, `--dirty-pct` of them rewritten per step."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-mb", type=float)
    ap.add_argument("--dirty-pct", type=float)
    ap.add_argument("--step-ms", type=float)
    ap.add_argument("--tensor-mb", type=float)
    a = ap.parse_args(argv)
    import random

    import torch

    import mesh.checkpoint as mc
    torch.set_num_threads(1)
    numel = max(1, int(a.tensor_mb * (1 << 20)) // 4)
    count = max(1, round(a.state_mb / a.tensor_mb))
    ckpt = mc.connect(workload_id="bench-migrate")
    tensors = [torch.full((numel,), float(i), dtype=torch.float32) for i in range(count)]
    for i, t in enumerate(tensors):
        ckpt.register_tensor(f"t{i:05d}", t)
    ckpt.register_rng()
    ckpt.restore_if_requested()
    rng = random.Random(1234 + ckpt.step)
    per_step = max(1, round(count * a.dirty_pct / 100)) if a.dirty_pct > 0 else 0
    step = ckpt.step
    next_t = time.perf_counter()
    while True:
        for i in rng.sample(range(count), per_step):
            tensors[i].add_(1.0)
        step += 1
        next_t += a.step_ms / 1e3
        delay = next_t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.perf_counter()
        ckpt.safe_point(step)


def sink_main(argv: list[str]) -> int:
    """A receiver that discards: for the channel's raw speed (`--tls DIR`: mTLS with DIR/sink.crt)."""
    from mesh.checkpoint.transfer import NullSink, TransferServer
    from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV, read_secret_file
    creds = None
    if argv[:1] == ["--tls"]:
        from mesh import tls
        d = argv[1]
        creds = tls.server_credentials(f"{d}/sink.crt", f"{d}/sink.key", client_ca=f"{d}/ca.crt",
                                       require_client_auth=True)
    server = TransferServer("127.0.0.1:0", max_workers=2, credentials=creds).start()
    server.expect("raw", NullSink(), allow_unchecked=True, mesh=True,
                  secret=read_secret_file(os.environ[SECRET_FILE_ENV]))
    print(server.address, flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    server.stop(0)
    return 0


# --- the bench ------------------------------------------------------------------------------

def _python() -> list[str]:
    return [sys.executable, "-m", "tools.meshctl.bench_migrate"]


def _start_pair(args: argparse.Namespace, workdir: str, tag: str) -> tuple[subprocess.Popen, subprocess.Popen,
                                                                           str, str, bytes]:
    from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV, new_secret, write_secret_file
    secret = new_secret()
    secret_file = write_secret_file(os.path.join(workdir, f"{tag}.secret"), secret)
    wargs = ["--role", "worker", "--state-mb", str(args.state_mb), "--dirty-pct", str(args.dirty_pct),
             "--step-ms", str(args.step_ms), "--tensor-mb", str(args.tensor_mb)]
    src_sock, dst_sock = os.path.join(workdir, f"{tag}-src.sock"), os.path.join(workdir, f"{tag}-dst.sock")
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUMESH_")}
    src = subprocess.Popen(_python() + wargs, env={**base, "GPUMESH_CHECKPOINT_SOCKET": src_sock})
    dst = subprocess.Popen(_python() + wargs, env={**base, "GPUMESH_CHECKPOINT_SOCKET": dst_sock,
                                                    "GPUMESH_RESTORE_FROM": f"receive:{tag}@127.0.0.1:0",
                                                    SECRET_FILE_ENV: secret_file})
    return src, dst, src_sock, dst_sock, secret


def _wait_ready(src: subprocess.Popen, dst: subprocess.Popen, src_sock: str, dst_sock: str,
                timeout: float = 300.0) -> None:
    from mesh.checkpoint.agent_link import AgentLink
    deadline = time.monotonic() + timeout
    ready = {"src": False, "dst": False}
    while not all(ready.values()):
        for p in (src, dst):
            if p.poll() is not None:
                raise RuntimeError(f"a bench workload exited early (status {p.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError("bench workloads did not start in time")
        try:
            if not ready["src"] and os.path.exists(src_sock):
                with AgentLink(src_sock) as s:
                    ready["src"] = s.call("status")["step"] >= 3
            if not ready["dst"] and os.path.exists(dst_sock):
                with AgentLink(dst_sock) as d:
                    ready["dst"] = bool(d.call("status").get("receive_address"))
        except (OSError, ConnectionError):
            pass
        time.sleep(0.05)


def _finish(src: subprocess.Popen, dst: subprocess.Popen, dst_sock: str) -> None:
    from mesh.checkpoint.agent_link import AgentLink
    try:
        with AgentLink(dst_sock) as d:
            d.call("stop")
    except (OSError, ConnectionError):
        pass
    for p in (src, dst):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _migrate(args: argparse.Namespace, workdir: str, tag: str, precopy: bool) -> Any:
    from mesh.checkpoint.precopy import PrecopyMigration, PrecopyPolicy, stop_and_copy
    src, dst, src_sock, dst_sock, secret = _start_pair(args, workdir, tag)
    try:
        info(f"{tag}: starting two workloads with {args.state_mb:g} MiB of state each")
        _wait_ready(src, dst, src_sock, dst_sock)
        step_bytes = args.state_mb * (1 << 20) * args.dirty_pct / 100
        stop = int(args.stop_mb * (1 << 20)) if args.stop_mb is not None else int(max(step_bytes, 1 << 20))
        policy = PrecopyPolicy(max_rounds=args.max_rounds, stop_bytes=stop)
        progress = (lambda m: info(f"{tag}: {m}"))
        policy.mesh = args.transport
        if precopy:
            result = PrecopyMigration(src_sock, dst_sock, secret=secret, policy=policy, progress=progress).run()
        else:
            result = stop_and_copy(src_sock, dst_sock, secret=secret, policy=policy, progress=progress)
        src.wait(timeout=30)
        if src.returncode != 0:
            raise RuntimeError(f"the migrated source exited with status {src.returncode}")
        return result
    finally:
        _finish(src, dst, dst_sock)


def _certs(d: str) -> str:
    """A CA and two agent certificates (sink, source) in `d`, for the mTLS measurement."""
    from mesh import tls
    tls.write_ca(d)
    tls.issue(d, "agent", "sink", hosts=("127.0.0.1",))
    tls.issue(d, "agent", "source")
    return d


def _link_speed(nbytes: int, transport: str = "grpc", tls_dir: str = "",
                relay: bool = False) -> tuple[float, float]:
    """The raw speed of a channel: `nbytes` unchecked to a discarding receiver in another process
    (sealed with a session secret as always; over mTLS with `tls_dir`; with `relay`, through the agent's
    Unix-socket relay of a workload without network, nodeagent/isolation/netrelay.py)."""
    from mesh.checkpoint.transfer import TransferClient, raw_entries
    from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV, new_secret, write_secret_file
    secret = new_secret()
    with tempfile.TemporaryDirectory(prefix="gpumesh-bench-sink-") as d:
        env = {**os.environ, SECRET_FILE_ENV: write_secret_file(os.path.join(d, "secret"), secret)}
        sink = subprocess.Popen(_python() + ["--role", "sink"] + (["--tls", tls_dir] if tls_dir else []),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        address = sink.stdout.readline().strip()
    pipe = relay_dir = None
    if relay:
        from nodeagent.isolation import netrelay
        relay_dir = tempfile.TemporaryDirectory(prefix="gpumesh-bench-relay-")
        pipe = netrelay.outbound(relay_dir.name, os.getuid(), os.getgid(), address)
        address = f"unix:{pipe.host_path}"
    creds = None
    if tls_dir:
        from mesh import tls
        creds = tls.channel_credentials(f"{tls_dir}/ca.crt", f"{tls_dir}/source.crt", f"{tls_dir}/source.key")
    try:
        with TransferClient(address, "raw", verify=False, mesh=transport, secret=secret, credentials=creds,
                            server_name="sink" if tls_dir else "") as c:
            c.send(raw_entries(64 << 20, gen=1))  # warm-up
            stats = c.send(raw_entries(nbytes, gen=2))
        if stats.transport != transport:
            raise RuntimeError(f"the raw {transport} channel could not be measured ({stats.transport_note})")
        return stats.mb_per_s, stats.seconds
    finally:
        if pipe is not None:
            pipe.stop()
            relay_dir.cleanup()
        sink.stdin.close()
        sink.wait(timeout=30)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    state_bytes = int(args.state_mb * (1 << 20))
    speeds: dict[str, list[float]] = {"grpc": [], "shm": []}

    tls_speeds: list[float] = []
    relay_speeds: list[float] = []
    tls_tmp = tempfile.TemporaryDirectory(prefix="gpumesh-bench-tls-") if args.tls else None

    def link(when: str) -> None:
        for kind in speeds:
            if kind == "shm" and args.transport == "grpc":
                continue
            mb_s, _ = _link_speed(state_bytes, kind)
            speeds[kind].append(mb_s)
            info(f"link ({when}): raw {state_bytes / 1e6:.0f} MB over {kind}: {mb_s:.0f} MB/s")
        if args.relay:
            mb_s, _ = _link_speed(state_bytes, "grpc", relay=True)
            relay_speeds.append(mb_s)
            info(f"link ({when}): raw {state_bytes / 1e6:.0f} MB over grpc through the relay: {mb_s:.0f} MB/s")
        if tls_tmp is not None:
            mb_s, _ = _link_speed(state_bytes, "grpc", tls_dir=tls_tmp.name)
            tls_speeds.append(mb_s)
            info(f"link ({when}): raw {state_bytes / 1e6:.0f} MB over grpc with mTLS: {mb_s:.0f} MB/s")
    if tls_tmp is not None:
        _certs(tls_tmp.name)
    link("before")
    with tempfile.TemporaryDirectory(prefix="gpumesh-bench-migrate-") as workdir:
        pre = _migrate(args, workdir, "precopy", precopy=True)
        snc = _migrate(args, workdir, "stopcopy", precopy=False) if args.stop_and_copy else None
    link("after")
    if tls_tmp is not None:
        tls_tmp.cleanup()
    # the channel the migration used, at the faster of its two measurements (the stricter figure)
    link_mb_per_s = max(speeds[pre.transport])
    ideal_ms = pre.state_bytes / 1e6 / link_mb_per_s * 1e3
    out: dict[str, Any] = {
        "downtime_ms": round(pre.downtime_ms, 1),
        "total_ms": round(pre.total_ms, 1),
        "bytes_sent": pre.bytes_sent,
        "stop_and_copy_downtime_ms": round(snc.downtime_ms, 1) if snc else None,
        "link_mb_per_s": round(link_mb_per_s, 1),
        "transport": pre.transport,
        "link_runs_mb_per_s": {k: [round(x, 1) for x in v] for k, v in speeds.items() if v},
        "downtime_ratio": round(pre.downtime_ms / snc.downtime_ms, 4) if snc else None,
        "total_vs_link": round(pre.total_ms / ideal_ms, 3),
        "state_bytes": pre.state_bytes,
        "dirty_pct": args.dirty_pct,
        "step_ms": args.step_ms,
        "rounds": len([r for r in pre.rounds if not r.paused]),
        "final_bytes": pre.final_bytes,
        "pause_wait_ms": round(pre.pause_wait_ms, 1),
        "final_ms": round(pre.final_ms, 1),
        "stop_and_copy_total_ms": round(snc.total_ms, 1) if snc else None,
        "stop_and_copy_bytes_sent": snc.bytes_sent if snc else None,
        "link_tls_mb_per_s": round(max(tls_speeds), 1) if tls_speeds else None,
        "link_tls_runs_mb_per_s": [round(x, 1) for x in tls_speeds] or None,
        "link_relay_mb_per_s": round(max(relay_speeds), 1) if relay_speeds else None,
        "link_relay_runs_mb_per_s": [round(x, 1) for x in relay_speeds] or None,
        "round_detail": [{"round": r.round, "entries": r.entries, "bytes": r.bytes, "seconds": round(r.seconds, 3),
                          "paused": r.paused} for r in pre.rounds],
    }
    return out


def run_migrate_bench(args: argparse.Namespace) -> int:
    out = measure(args)
    if getattr(args, "output", "table") in ("json", "yaml"):
        if args.output == "yaml":
            import yaml
            sys.stdout.write(yaml.safe_dump(out, sort_keys=False))
        else:
            sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        keys = ["downtime_ms", "stop_and_copy_downtime_ms", "downtime_ratio", "total_ms", "total_vs_link",
                "bytes_sent", "link_mb_per_s", "transport", "rounds", "final_bytes"]
        for k in keys:
            sys.stdout.write(f"{k:28} {out[k]}\n")
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["--role", "worker"]:
        return worker_main(argv[2:])
    if argv[:2] == ["--role", "sink"]:
        return sink_main(argv[2:])
    p = argparse.ArgumentParser(prog="python -m tools.meshctl.bench_migrate", description=__doc__,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    return run_migrate_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
