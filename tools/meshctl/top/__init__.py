"""`meshctl top`: a live terminal view of the fleet (feed.py: the data; frame.py: the screen; app.py: the loop)."""

from __future__ import annotations

import argparse

from tools.meshctl.common import positive_float, positive_int, subcommand

EPILOG = """\
examples:
  meshctl top                          # live; keys: g/s/d/e or Tab view, o sort, r reverse,
                                       #   t tenant filter, n node filter, c clear, q quit
  meshctl top --view slices --tenant team-a
  meshctl top --once                   # one frame and exit (scripts, tests)
  meshctl top --once --view deployments | less -R
  meshctl top > frames.log             # no terminal: a plain frame every --interval

GPU rows draw each GPU's 8 memory slots and 7 compute slices: a tenant's symbol in the
tenant's colour where its slice holds the slot (the legend names them), `·` free, `▒` carved
but held by no slice you can see. MEM is coloured by memory pressure, TEMP by thermal state,
LEVEL is the worse of the two and the GPU's health.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "top", help="live view of nodes, GPUs (MIG slots), slices, deployments and events",
                   description="A live terminal view of the fleet, refreshed from the slice watch and one "
                               "GPU/deployment list per interval. Works in 80x24 over SSH; without a terminal "
                               "it prints a plain frame every interval.", epilog=EPILOG)
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--view", choices=("gpus", "slices", "deployments", "events"), default="gpus",
                   help="view to start in")
    p.add_argument("--sort", metavar="KEY", help="gpus: node|util|memory|temp|level; slices: tenant|node|age|memory; "
                                                 "deployments: name|tenant|ready; events: age|type|object")
    p.add_argument("--reverse", action="store_true", help="reverse the sort")
    p.add_argument("--tenant", metavar="NAME", help="only this tenant's slices (and the GPUs they are on)")
    p.add_argument("--node", metavar="NAME", help="only this node")
    p.add_argument("--interval", type=positive_float, default=2.0, metavar="SECONDS",
                   help="how often GPUs and deployments are re-read (slices change at once; default: 2)")
    p.add_argument("--width", type=positive_int, metavar="COLUMNS", help="width of plain (non-terminal) frames "
                                                                        "(default: 80)")

    def run(args: argparse.Namespace) -> int:
        from tools.meshctl.common import text_only
        from tools.meshctl.top.app import run as run_top
        text_only(args, "top", "terminal frames (`get gpus|slices|deployments|events -o json` has the data)")
        return run_top(args)
    p.set_defaults(func=run)
