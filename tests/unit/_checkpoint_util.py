"""Helpers for the checkpoint tests: run the example training loop as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = [sys.executable, "-m", "tools.examples.train_mnist_like"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUMESH_")}
    env.update(extra)
    return env


def run_example(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> list[dict]:
    r = subprocess.run(EXAMPLE + list(args), env=env or clean_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def start_example(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(EXAMPLE + list(args), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, timeout: float = 60) -> list[dict]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"workload exited early: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no control socket at {path}")
        time.sleep(0.02)


def wait_for_step(link, step: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        s = link.call("status")["step"]
        if s >= step:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"workload stuck at step {s}")
        time.sleep(0.02)


def assert_same_state(a: str, b: str) -> None:
    """Every tensor of checkpoint `a` equals (bit for bit) the one of checkpoint `b`."""
    import torch

    from mesh.checkpoint.format import read_manifest
    from mesh.checkpoint.state import load_tensors
    ta, tb = load_tensors(a), load_tensors(b)
    ma, mb = read_manifest(a), read_manifest(b)
    assert sorted(ta) == sorted(tb)
    assert any(n.startswith("optim/") for n in ta), "optimizer state is part of the comparison"
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), f"{name} differs"
        assert ma.entry(name).checksum == mb.entry(name).checksum, f"{name}: bytes differ"
    assert ma.step == mb.step
