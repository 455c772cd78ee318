"""`python -m nodeagent.nvml.simctl`: drive a simulated GPU host from outside.

Changes go into the host's state file, so a running agent's simulated NVML
sees them on its next call::

    python -m nodeagent.nvml.simctl --state S --host-file H xid --gpu 0 --code 79
    ... lose --gpu 1                      # falls off the bus (logs XID 79 first)
    ... heat --gpu 0 --celsius 88         # pin the temperature
    ... heat --gpu 0 --extra-c 25         # poor cooling: heats up with the time constant
    ... heat --gpu 0 --power-w 650        # pin the power draw
    ... load --gpu 0 --util 90 --memory-used 60GiB
    ... ecc --gpu 0 --uncorrected 1
    ... reset --gpu 0                     # nvidia-smi --gpu-reset: refused while processes run
    ... reboot                            # the host reboots: lost GPUs back, repairs applied
    ... clear --gpu 0                     # run-time faults, load and pins gone
    ... show [-o json]

Exit status 2 with a message on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

from mesh.units import format_size, parse_size

COMMANDS = ("xid", "lose", "heat", "load", "ecc", "reset", "reboot", "clear", "show")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simctl", description="Drive a simulated GPU host (its state file) from outside.")
    p.add_argument("--state", required=True, metavar="FILE", help="the simulated host's state file")
    p.add_argument("--host-file", required=True, metavar="FILE", help="the host file it simulates")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str, gpu: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        if gpu:
            c.add_argument("--gpu", type=int, required=True, metavar="INDEX", help="GPU index")
        return c

    c = cmd("xid", "log an XID error on a GPU (delivered through NVML's event API)")
    c.add_argument("--code", type=int, required=True, help="XID code, e.g. 79 (fallen off the bus), 48 (DBE ECC)")
    c.add_argument("--gi", type=int, default=None, help="GPU instance the XID is on (MIG)")
    c.add_argument("--ci", type=int, default=None, help="compute instance the XID is on (MIG)")
    c = cmd("lose", "the GPU falls off the bus: its NVML calls fail with GPU_IS_LOST")
    c.add_argument("--no-xid", action="store_true", help="do not log XID 79 first")
    c = cmd("heat", "pin the temperature or power, or add heat (poor cooling)")
    c.add_argument("--celsius", type=float, help="pin the temperature (immediate)")
    c.add_argument("--extra-c", type=float, help="add to the steady temperature (reached with the time constant)")
    c.add_argument("--power-w", type=float, help="pin the power draw in watts")
    c = cmd("load", "declare load not tied to a process (replaces the previous one)")
    c.add_argument("--util", type=float, default=None, help="utilization percent 0..100")
    c.add_argument("--memory-used", default=None, help="memory in use, e.g. 60GiB or a number of bytes")
    c = cmd("ecc", "count ECC errors (and log their events)")
    c.add_argument("--corrected", type=int, default=0)
    c.add_argument("--uncorrected", type=int, default=0)
    cmd("reset", "reset the GPU as nvidia-smi --gpu-reset does (refused while processes use it)")
    cmd("reboot", "the host reboots: processes end, lost GPUs return, pending memory repairs apply", gpu=False)
    cmd("clear", "take the GPU's run-time faults, declared load and pins away")
    c = cmd("show", "print every GPU's telemetry as the simulated NVML reports it now", gpu=False)
    c.add_argument("-o", "--output", choices=("table", "json"), default="table")
    return p


def _table(rows: list[dict]) -> str:
    head = ("GPU", "MODEL", "STATE", "UTIL", "MEMORY", "TEMP", "POWER", "SM MHZ", "THROTTLE", "XIDS", "ECC(C/U)")
    lines = [head]
    for r in rows:
        lines.append((str(r["index"]), r["model"], "lost" if r["lost"] else "ok", f"{r['utilization_pct']:.0f}%",
                      f"{format_size(r['memory_used_bytes'])}/{format_size(r['memory_total_bytes'])}",
                      f"{r['temperature_c']:.1f}C", f"{r['power_w']:.0f}/{r['power_limit_w']:.0f}W",
                      str(r["sm_clock_mhz"]), ",".join(r["throttle_reasons"]) or "-",
                      ",".join(map(str, r["xids"][-5:])) or "-", f"{r['ecc_corrected']}/{r['ecc_uncorrected']}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def run(args: argparse.Namespace, out=sys.stdout) -> None:
    from nodeagent.nvml.sim import SimNvml

    nvml = SimNvml(args.host_file, args.state)
    c = args.command
    if c == "xid":
        nvml.sim_inject_xid(args.gpu, args.code, args.gi, args.ci)
    elif c == "lose":
        nvml.sim_lose_gpu(args.gpu, xid=not args.no_xid)
    elif c == "heat":
        pins = {"temperature_c": args.celsius, "extra_heat_c": args.extra_c, "power_w": args.power_w}
        pins = {k: v for k, v in pins.items() if v is not None}
        if not pins:
            raise ValueError("heat: give --celsius, --extra-c or --power-w")
        nvml._gpu_index(args.gpu)
        nvml.sim_set_telemetry(args.gpu, **pins)
    elif c == "load":
        memory = parse_size(args.memory_used) if args.memory_used is not None else None
        nvml.sim_set_load(args.gpu, args.util, memory)
    elif c == "ecc":
        nvml.sim_inject_ecc(args.gpu, args.corrected, args.uncorrected)
    elif c == "reset":
        try:
            nvml.sim_reset_gpu(args.gpu)
        except nvml.NVMLError as e:
            raise ValueError(f"GPU {args.gpu} was not reset: {e}") from None
    elif c == "reboot":
        nvml.sim_reboot()
    elif c == "clear":
        nvml.sim_clear(args.gpu)
    elif c == "show":
        rows = nvml.sim_readings()
        print(json.dumps(rows, indent=2) if args.output == "json" else _table(rows), file=out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        print(f"simctl: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
