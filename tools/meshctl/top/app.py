"""`meshctl top`: the loop around the feed and the frame.

On a terminal: a full-screen `rich.live.Live` redrawn when the feed changes or a key is pressed, keys
read from stdin in cbreak mode (no Enter needed; restored on exit). Without a terminal on stdout:
the frame printed as plain text every interval (a log of frames). `--once`: one frame and exit.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import termios
import time
import tty

from rich.console import Console

from tools.meshctl.top.feed import Feed, load_once
from tools.meshctl.top.frame import SORTS, VIEWS, View, render



def view_from_args(args: argparse.Namespace, endpoint: str) -> View:
    v = View(view=args.view, tenant=args.tenant or "", node=args.node or "", reverse=args.reverse, endpoint=endpoint)
    if args.sort:
        if args.sort not in SORTS[v.view]:
            from tools.meshctl.common import CliError
            raise CliError(f"--sort: {args.sort!r} is not a sort of the {v.view} view "
                           f"(allowed: {', '.join(SORTS[v.view])})")
        v.sort[v.view] = args.sort
    return v


def handle_key(key: str, view: View, data) -> bool:
    """Apply one key; False when it means quit."""
    if key in ("q", "Q", "\x03"):
        return False
    for v in VIEWS:
        if key == v[0]:
            view.view = v
    if key == "\t":
        view.next_view()
    elif key == "o":
        view.next_sort()
    elif key == "r":
        view.reverse = not view.reverse
    elif key == "t":
        view.next_tenant(data)
    elif key == "n":
        view.next_node(data)
    elif key == "c":
        view.tenant = view.node = ""
    return True


def run_once(client, view: View, console: Console) -> int:
    data = load_once(client)
    console.print(render(data, view, console.width, console.height if console.is_terminal else 10_000))
    return 1 if {"gpus", "slices"} <= set(data.errors) else 0


def run_plain(client, view: View, interval: float, console: Console) -> int:
    """No terminal: a frame every interval, each whole (no cursor movement), until interrupted."""
    while True:
        data = load_once(client)
        console.print(render(data, view, console.width, 10_000))
        console.print()
        time.sleep(interval)


def run_live(client, view: View, interval: float, console: Console) -> int:
    from rich.live import Live
    feed = Feed(client, interval)
    feed.start()
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    try:
        if saved is not None:
            tty.setcbreak(fd)
        with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
            dirty = True
            last = 0.0
            while True:
                if feed.changed.is_set() or dirty or time.monotonic() - last > 1.0:
                    feed.changed.clear()
                    live.update(render(feed.data(), view, console.width, console.height), refresh=True)
                    dirty, last = False, time.monotonic()
                key = _read_key(fd, 0.1) if saved is not None else ""
                if key:
                    if not handle_key(key, view, feed.data()):
                        return 0
                    dirty = True
    finally:
        feed.stop()
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read_key(fd: int, timeout: float) -> str:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return ""
    return os.read(fd, 1).decode(errors="replace")


def run(args: argparse.Namespace) -> int:
    from tools.meshctl.common import client, endpoint
    ep = endpoint(args)
    view = view_from_args(args, ep)
    tty_out = sys.stdout.isatty()
    with client(args) as mesh:
        if args.once:
            console = Console(highlight=False, soft_wrap=False) if tty_out else \
                Console(highlight=False, color_system=None, width=args.width or 80, soft_wrap=False)
            return run_once(mesh, view, console)
        if not tty_out:
            return run_plain(mesh, view, args.interval,
                             Console(highlight=False, color_system=None, width=args.width or 80))
        return run_live(mesh, view, args.interval, Console(highlight=False))
