"""Progress of a long command, on stderr: live on a terminal, plain lines in a log, nothing with -o json|yaml.

    p = Progress(args.output)
    p.step("control plane ready")                 # a line that stays
    with p.waiting("allocating 8 slices") as update:
        ...                                       # a spinner while the call runs (update("...") changes it)

The three modes: `live` (stderr is a terminal and the output is a table: rich's spinner and lines),
`lines` (stderr is not a terminal: each step, and each change of a wait's message, as a plain line; the
start of a wait prints nothing, so a script's stderr is what it was before), and
`quiet` (-o json or yaml: stdout is for machines, and stderr stays empty unless something fails).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, TextIO


class Progress:
    def __init__(self, output: str = "table", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        if output in ("json", "yaml"):
            self.mode = "quiet"
        else:
            isatty = getattr(self.stream, "isatty", None)
            self.mode = "live" if isatty is not None and isatty() else "lines"
        self._console = None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console
            self._console = Console(file=self.stream, force_terminal=True, highlight=False)
        return self._console

    def step(self, message: str) -> None:
        if self.mode == "quiet":
            return
        if self.mode == "live":
            self.console.print(message, markup=False)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    @contextlib.contextmanager
    def waiting(self, message: str) -> Iterator[Callable[[str], None]]:
        """A spinner with `message` while the body runs; yields a function that changes the message."""
        if self.mode == "live":
            with self.console.status(message) as status:
                yield lambda text: status.update(text)
            return
        last = [message]                         # a log gets no line for the wait itself, only for changes

        def update(text: str) -> None:
            if text != last[0]:
                last[0] = text
                self.step(text)
        yield update if self.mode == "lines" else (lambda _text: None)


def for_args(args) -> Progress:
    return Progress(getattr(args, "output", "table"))
