"""WorkloadState: flatten/restore bit-identically (also into a fresh process), dirty tracking."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402

from mesh.checkpoint.format import EntryMeta  # noqa: E402
from mesh.checkpoint.state import StateMismatch, WorkloadState, load_tensors  # noqa: E402
from tests.unit._checkpoint_util import (assert_same_state, clean_env, finish, run_example,  # noqa: E402
                                         start_example)


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    st = WorkloadState("w")
    st.register_module("model", model)
    st.register_optimizer("adam", opt)
    st.register_rng()
    return model, opt, st


def train(model, opt, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(4, 8)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_save_load_in_place_is_bit_identical(tmp_path):
    model, opt, st = make()
    train(model, opt, 3)
    st.step = 3
    st.extras["cursor"] = {"epoch": 1, "files": ["a", "b"]}
    random.seed(5)
    np.random.seed(5)
    st.save(str(tmp_path / "ck"))
    expect_next = (torch.randn(3), random.random(), np.random.rand())
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ref_opt = {k: v.clone() for k, v in opt.state[next(iter(model.parameters()))].items()}
    train(model, opt, 2)  # move away, then restore into a freshly built set
    model2, opt2, st2 = make(seed=1)
    st2.load(str(tmp_path / "ck"))
    for k, v in model2.state_dict().items():
        assert torch.equal(v, ref[k]), k
    got_opt = opt2.state[next(iter(model2.parameters()))]
    assert set(got_opt) == {"step", "exp_avg", "exp_avg_sq"}
    for k, v in got_opt.items():
        assert torch.equal(v, ref_opt[k]), k
    assert st2.step == 3 and st2.extras == {"cursor": {"epoch": 1, "files": ["a", "b"]}}
    assert torch.equal(torch.randn(3), expect_next[0])
    assert random.random() == expect_next[1] and np.random.rand() == expect_next[2]


def test_entries_are_named_and_typed(tmp_path):
    model, opt, st = make()
    st.register_tensor("emb", torch.zeros(3, 2, dtype=torch.bfloat16))
    train(model, opt, 1)
    names = list(st.tensors())
    assert "module/model/0.weight" in names and "module/model/1.running_mean" in names
    assert "optim/adam/state/0/exp_avg" in names and "tensor/emb" in names
    assert set(st.data_entries()) == {"meta", "rng", "optim/adam/meta"}
    m = st.save(str(tmp_path / "ck"))
    e = m.entry("tensor/emb")
    assert (e.kind, e.dtype, e.shape, e.nbytes) == ("tensor", "bfloat16", [3, 2], 12)
    assert load_tensors(str(tmp_path / "ck"))["tensor/emb"].dtype == torch.bfloat16


def test_shape_mismatch_is_named(tmp_path):
    _, _, st = make()
    st.save(str(tmp_path / "ck"))
    other = WorkloadState()
    other.register_module("model", torch.nn.Sequential(torch.nn.Linear(8, 4)))
    with pytest.raises(StateMismatch, match=r"'module/model/0.weight': float32\[16, 8\].*float32\[4, 8\]"):
        other.load(str(tmp_path / "ck"))


def test_an_entry_must_declare_the_size_of_its_shape():
    """A received entry's size is checked against its dtype and shape before its bytes are taken: one declared
    shorter (0 bytes for a [16, 8] float32 tensor) passed its checksum, and the restore left the live tensor
    as the fresh process had made it, answered as restored."""
    _, _, st = make()
    for nbytes in (0, 511, 513):
        meta = EntryMeta("module/model/0.weight", "tensor", nbytes=nbytes, dtype="float32", shape=[16, 8])
        with pytest.raises(StateMismatch, match=rf"{nbytes} bytes.*float32\[16, 8\] is 512 bytes"):
            st.writable(meta)
    assert len(st.writable(EntryMeta("module/model/0.weight", "tensor", nbytes=512, dtype="float32",
                                     shape=[16, 8]))) == 512


@pytest.mark.parametrize("name,shape", [
    ("optim/sgd/state/0/exp_avg", [16, 8]),             # no optimizer sgd is registered
    ("optim/adam/state/99/exp_avg", [4]),               # adam has no parameter 99
    ("optim/adam/meta/0/exp_avg", [4]),                 # not a state entry
    ("optim/adam/state/x/exp_avg", [4]),                # no parameter index
    ("optim/adam/0/exp_avg", [4]),                      # no state part
    ("optim/adam/state/0/exp_avg", [1 << 40]),          # more elements than all of adam's parameters
])
def test_optimizer_state_is_staged_only_where_a_registered_optimizer_can_hold_it(name, shape):
    """Optimizer state is staged in a new tensor of the declared shape: any name under optim/ and any shape
    was allocated before a byte of it arrived."""
    _, _, st = make()
    meta = EntryMeta(name, "tensor", nbytes=4 * math.prod(shape), dtype="float32", shape=shape)
    with pytest.raises(StateMismatch, match=re.escape(repr(name))):
        st.writable(meta)
    assert st._staged == {}


def test_dirty_tracking_by_version_counter():
    model, opt, st = make()
    train(model, opt, 1)
    snap = st.snapshot()
    assert st.changed_since(snap) == []
    with torch.no_grad():
        model[3].bias.add_(1)
    assert st.changed_since(snap) == ["module/model/3.bias"]
    train(model, opt, 1)  # every parameter, its Adam state and BatchNorm's buffers (updated unversioned)
    changed = set(st.changed_since(snap))
    assert "optim/adam/state/0/exp_avg" in changed and "module/model/1.running_mean" in changed
    assert changed == set(st.tensors())


def test_dirty_tracking_falls_back_to_content_hashes():
    st = WorkloadState()
    plain = torch.zeros(4)
    hashed = torch.zeros(4)
    with torch.inference_mode():
        inf = torch.zeros(4)
    st.register_tensor("plain", plain)
    st.register_tensor("hashed", hashed, track="hash")
    st.register_tensor("inf", inf)
    snap = st.snapshot()
    plain.data.add_(1)  # `.data` bypasses the version counter: not seen, by design
    hashed.data.add_(1)  # seen through the content hash
    with torch.inference_mode():
        inf.add_(1)  # inference tensors have no counter: hashed automatically
    assert sorted(st.changed_since(snap)) == ["tensor/hashed", "tensor/inf"]
    hashed.data.sub_(1)  # back to the snapshot's bytes: unchanged again
    assert st.changed_since(snap) == ["tensor/inf"]


def test_new_optimizer_state_is_dirty():
    model, opt, st = make()
    snap = st.snapshot()
    train(model, opt, 1)
    assert any(n.startswith("optim/adam/state/") for n in st.changed_since(snap))


def test_restore_into_a_fresh_process_continues_bit_identically(tmp_path):
    """Train 30 steps and save; a new process restores and trains to 60; equal to 60 straight."""
    ref_p = start_example("--steps", "60", "--final-dir", str(tmp_path / "ref"), env=clean_env())
    half = run_example("--steps", "30", "--final-dir", str(tmp_path / "half"))
    ref = finish(ref_p)
    assert half[-1]["step"] == 30
    out = run_example("--steps", "60", "--final-dir", str(tmp_path / "resumed"),
                      env=clean_env(GPUMESH_RESTORE_FROM=str(tmp_path / "half")))
    assert out[0]["started_at"] == 30 and out[0]["checksum"] == half[-1]["checksum"]
    assert out[-1]["checksum"] == ref[-1]["checksum"]
    assert_same_state(str(tmp_path / "ref"), str(tmp_path / "resumed"))
