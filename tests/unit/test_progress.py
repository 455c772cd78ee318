"""tools/meshctl/progress.py: live on a terminal, plain lines in a log, nothing with -o json|yaml."""

from __future__ import annotations

import io

import pytest

from tools.meshctl.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_machine_output_is_quiet_even_on_a_terminal(output):
    stream = Tty()
    p = Progress(output, stream)
    p.step("control plane ready")
    with p.waiting("allocating 8 slices") as update:
        update("still allocating")
    assert p.mode == "quiet" and stream.getvalue() == ""


def test_terminal_gets_steps_and_a_spinner():
    stream = Tty()
    p = Progress("table", stream)
    assert p.mode == "live"
    with p.waiting("allocating 8 slices") as update:
        p.step("2/2 nodes Ready")
        update("allocating: 4/8")
    text = stream.getvalue()
    assert "2/2 nodes Ready" in text
    assert "allocating" in text and "\x1b[" in text          # drawn with terminal control sequences


def test_a_log_gets_plain_lines():
    stream = io.StringIO()
    p = Progress("table", stream)
    assert p.mode == "lines"
    with p.waiting("deployment/chat: 0/2 replicas ready") as update:
        update("deployment/chat: 0/2 replicas ready")           # unchanged: not repeated
        update("deployment/chat: 1/2 replicas ready")
        p.step("created")
    assert stream.getvalue() == "deployment/chat: 1/2 replicas ready\ncreated\n"
