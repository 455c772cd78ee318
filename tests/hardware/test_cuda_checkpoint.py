"""The checkpoint SDK with the training state on a GPU: saved at a step in one process, restored
in a fresh one, the run continues bit-identically to one that never stopped (CUDA generators and
device tensors included). Skips with the reason where torch sees no CUDA device."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.unit._checkpoint_util import clean_env, run_example  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

STEPS, AT = 60, 25


def test_a_gpu_run_restored_in_a_fresh_process_continues_bit_identically(tmp_path):
    common = ["--device", "cuda", "--print-every", "5", "--hidden", "256"]
    reference = run_example("--steps", str(STEPS), *common, timeout=300)
    first = run_example("--steps", str(AT), "--final-dir", str(tmp_path / "ckpt"), *common, timeout=300)
    assert first[-1]["step"] == AT
    resumed = run_example("--steps", str(STEPS), *common, env=clean_env(GPUMESH_RESTORE_FROM=str(tmp_path / "ckpt")),
                          timeout=300)
    assert resumed[0]["started_at"] == AT
    ref_by_step = {r["step"]: r["checksum"] for r in reference if "loss" in r}
    got_by_step = {r["step"]: r["checksum"] for r in resumed if "loss" in r}
    assert got_by_step and all(ref_by_step[s] == c for s, c in got_by_step.items())
    assert resumed[-1]["checksum"] == reference[-1]["checksum"]
    # and the state really was on the GPU: a CPU run of the same seed differs
    cpu = run_example("--steps", str(STEPS), "--print-every", "5", "--hidden", "256", timeout=300)
    assert cpu[-1]["checksum"] != reference[-1]["checksum"]
