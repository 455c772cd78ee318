"""GPU model catalog and MIG placement math (mesh/gpumodels.py)."""

from __future__ import annotations

import functools
import itertools
from dataclasses import replace

import pynvml
import pytest

from mesh.gpumodels import (MIG_COMPUTE_SLICES, MIG_MEMORY_SLOTS, MODELS, GpuModel, enumerate_layouts, free_starts,
                            get_model, model_names, placement_conflict)

MIG_MODELS = ["A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB"]
PLAIN_MODELS = ["L4", "A10", "T4", "V100-32GB"]

# DESIGN.md "MIG facts to model", by the A100-80GB/H100-80GB profile name:
# (memory slices, compute slices, max instances, starts)
DESIGN_TABLE = {
    "1g.10gb": (1, 1, 7, (0, 1, 2, 3, 4, 5, 6)),
    "1g.10gb+me": (1, 1, 1, (0, 1, 2, 3, 4, 5, 6)),
    "1g.20gb": (2, 1, 4, (0, 2, 4, 6)),
    "2g.20gb": (2, 2, 3, (0, 2, 4)),
    "3g.40gb": (4, 3, 2, (0, 4)),
    "4g.40gb": (4, 4, 1, (0,)),
    "7g.80gb": (8, 7, 1, (0,)),
}
NAMES = {
    "A100-40GB": ["1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"],
    "A100-80GB": list(DESIGN_TABLE),
    "H100-80GB": list(DESIGN_TABLE),
    "H200-141GB": ["1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"],
}
GI_IDS = [19, 20, 15, 14, 9, 5, 0]
GI_ENUMS = [pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1,
            pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE,
            pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE, pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE,
            pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE]
CI_ENUMS = {1: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE, 2: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE,
            3: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE, 4: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE,
            7: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE}
SMS = {"A100": {1: 14, 2: 28, 3: 42, 4: 56, 7: 98},
       # read from NVML on an H100 80GB HBM3 (tests/hardware): the 1g profile with two memory slices has 26 SMs
       "H": {1: 16, (1, 2): 26, 2: 32, 3: 60, 4: 64, 7: 132}}


def test_catalog_names():
    assert model_names() == MIG_MODELS + PLAIN_MODELS
    assert set(MODELS) == set(model_names())


@pytest.mark.parametrize("name", MIG_MODELS)
def test_mig_profile_tables_match_design(name):
    m = get_model(name)
    assert m.mig_capable and m.isolations == {"mig", "mps", "timeshare", "exclusive"}
    assert [p.name for p in m.mig_profiles] == NAMES[name]
    sms = SMS["A100" if name.startswith("A100") else "H"]
    for p, design_name, gi_id, gi_enum in zip(m.mig_profiles, DESIGN_TABLE, GI_IDS, GI_ENUMS):
        assert (p.memory_slices, p.compute_slices, p.max_instances, p.starts) == DESIGN_TABLE[design_name]
        assert (p.gi_profile_id, p.nvml_profile) == (gi_id, gi_enum)
        assert p.ci_profile == CI_ENUMS[p.compute_slices]
        assert p.media_extensions == p.name.endswith("+me")
        assert p.multiprocessors == sms.get((p.compute_slices, p.memory_slices), sms[p.compute_slices])
        share = m.memory_mib * p.memory_slices / MIG_MEMORY_SLOTS
        assert 0.9 * share <= p.memory_mib <= share, p
        assert m.profile(p.name) is p and m.profile_by_id(p.gi_profile_id) is p
    assert m.mig_profiles[-1].multiprocessors <= m.multiprocessors


@pytest.mark.parametrize("name", PLAIN_MODELS)
def test_plain_models(name):
    m = get_model(name)
    assert not m.mig_capable and m.mig_profiles == ()
    assert m.isolations == {"mps", "timeshare", "exclusive"}
    assert m.smallest_profile_for(1, 0.1) is None
    assert enumerate_layouts(m) == []
    with pytest.raises(KeyError, match="not MIG-capable"):
        m.profile("1g.10gb")


@pytest.mark.parametrize("alias,canonical", [
    ("h100", "H100-80GB"), ("H100-SXM", "H100-80GB"), ("NVIDIA H100 80GB HBM3", "H100-80GB"),
    ("A100", "A100-40GB"), ("a100-40gb", "A100-40GB"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("a100_80gb", "A100-80GB"), ("h200", "H200-141GB"), ("NVIDIA H200", "H200-141GB"),
    ("l4", "L4"), ("Tesla T4", "T4"), ("a10", "A10"), ("V100", "V100-32GB"), ("Tesla V100-SXM2-32GB", "V100-32GB"),
])
def test_aliases(alias, canonical):
    assert get_model(alias).name == canonical


def test_unknown_model_and_profile_messages():
    with pytest.raises(KeyError, match="allowed: A100-40GB, A100-80GB, H100-80GB"):
        get_model("B200")
    with pytest.raises(KeyError, match=r"allowed: 1g\.10gb, 1g\.10gb\+me, 1g\.20gb"):
        get_model("H100").profile("1g.5gb")
    with pytest.raises(KeyError, match="19 \\(1g.10gb\\)"):
        get_model("H100").profile_by_id(42)


@pytest.mark.parametrize("model,mem_gib,share,want", [
    ("H100-80GB", 1, 0.0, "1g.10gb"),
    ("H100-80GB", 9, 1 / 7, "1g.10gb"),
    ("H100-80GB", 11, 0.1, "1g.20gb"),
    ("H100-80GB", 11, 0.2, "2g.20gb"),
    ("H100-80GB", 1, 0.3, "3g.40gb"),
    ("H100-80GB", 30, 0.5, "4g.40gb"),
    ("H100-80GB", 70, 0.0, "7g.80gb"),
    ("H100-80GB", 80, 0.0, None),
    ("A100-40GB", 4, 0.1, "1g.5gb"),
    ("A100-40GB", 6, 0.1, "1g.10gb"),
    ("H200-141GB", 100, 0.0, "7g.141gb"),
])
def test_smallest_profile_for(model, mem_gib, share, want):
    p = get_model(model).smallest_profile_for(mem_gib * 2**30, share)
    assert (p.name if p else None) == want


H100 = get_model("H100-80GB")


@pytest.mark.parametrize("occupied,profile,start,reason", [
    ([], "1g.10gb", 7, "cannot start at memory slot 7"),
    ([], "3g.40gb", 2, "valid starts: 0, 4"),
    ([], "1g.20gb", 1, "valid starts: 0, 2, 4, 6"),
    ([("3g.40gb", 0)], "2g.20gb", 2, "overlaps 3g.40gb@0"),
    ([("7g.80gb", 0)], "1g.10gb", 6, "overlaps 7g.80gb@0"),
    ([("1g.20gb", 6)], "1g.10gb", 6, "overlaps 1g.20gb@6"),
    ([("4g.40gb", 0)], "1g.20gb", 4, None),
    ([("4g.40gb", 0), ("1g.10gb", 4), ("1g.10gb", 5), ("1g.10gb", 6)], "1g.20gb", 6, "overlaps"),
    ([("1g.20gb", 0), ("1g.20gb", 2), ("3g.40gb", 4)], "1g.10gb", 6, "overlaps"),
    ([("2g.20gb", 0), ("2g.20gb", 2), ("2g.20gb", 4)], "1g.20gb", 6, None),
    ([("2g.20gb", 0), ("2g.20gb", 2), ("2g.20gb", 4)], "1g.10gb", 6, None),
    ([("1g.10gb+me", 0)], "1g.10gb+me", 1, "1g.10gb+me allows at most 1 instance"),
    ([("3g.40gb", 0)], "4g.40gb", 0, "overlaps"),
    ([("3g.40gb", 4)], "4g.40gb", 0, None),
    ([("4g.40gb", 0)], "3g.40gb", 4, None),
])
def test_placement_conflict(occupied, profile, start, reason):
    got = placement_conflict(H100, occupied, profile, start)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got, got


def test_placement_conflict_compute_limit():
    # Real start slots never let compute exceed 7 before memory runs out, so
    # check the compute rule on a synthetic profile that may start at slot 7.
    loose = replace(H100.profile("1g.10gb"), starts=tuple(range(8)), max_instances=8)
    fake = replace(H100, mig_profiles=(loose,))
    eight = [("1g.10gb", s) for s in range(7)]
    assert placement_conflict(fake, eight, "1g.10gb", 7) == "compute slices would total 8, more than the 7 of H100-80GB"


def test_placement_conflict_instance_limit_message():
    msg = placement_conflict(H100, [("1g.10gb+me", 0)], "1g.10gb+me", 1)
    assert msg == "1g.10gb+me allows at most 1 instance(s) per GPU"


def test_free_starts():
    assert free_starts(H100, [], "1g.10gb") == [0, 1, 2, 3, 4, 5, 6]
    assert free_starts(H100, [("3g.40gb", 0)], "1g.10gb") == [4, 5, 6]
    assert free_starts(H100, [("3g.40gb", 0)], "3g.40gb") == [4]
    assert free_starts(H100, [("2g.20gb", 2)], "2g.20gb") == [0, 4]
    assert free_starts(H100, [("7g.80gb", 0)], "1g.10gb") == []


@functools.lru_cache(maxsize=None)
def brute_force(shape: tuple) -> tuple[frozenset, frozenset]:
    """All valid and all maximal layouts, as sets of (profile index, start),
    over every subset of placements, checked with bitmasks: independent of
    mesh.gpumodels' search. ``shape`` holds (memory, compute, max, starts)."""
    cands = [(i, s, ((1 << mem) - 1) << s, comp) for i, (mem, comp, _, starts) in enumerate(shape) for s in starts]
    valid = set()
    for k in range(MIG_COMPUTE_SLICES + 1):  # every profile takes >= 1 compute slice
        for combo in itertools.combinations(cands, k):
            mask = comp = 0
            counts = [0] * len(shape)
            for i, s, m, c in combo:
                if mask & m or m >> MIG_MEMORY_SLOTS:
                    break
                mask |= m
                comp += c
                counts[i] += 1
            else:
                if comp <= MIG_COMPUTE_SLICES and all(n <= shape[i][2] for i, n in enumerate(counts)):
                    valid.add(frozenset((i, s) for i, s, _, _ in combo))
    every = {(i, s) for i, s, _, _ in cands}
    maximal = {lay for lay in valid if all(lay | {c} not in valid for c in every - lay)}
    return frozenset(valid), frozenset(maximal)


def by_index(m: GpuModel, layouts) -> set[frozenset]:
    index = {p.name: i for i, p in enumerate(m.mig_profiles)}
    return {frozenset((index[n], s) for n, s in lay) for lay in layouts}


@pytest.mark.parametrize("name", MIG_MODELS)
def test_enumerate_layouts_matches_brute_force(name):
    m = get_model(name)
    valid, maximal = brute_force(tuple((p.memory_slices, p.compute_slices, p.max_instances, p.starts)
                                       for p in m.mig_profiles))
    layouts = enumerate_layouts(m)
    assert len(layouts) == len(set(layouts)) == len(valid)
    assert by_index(m, layouts) == valid
    assert all(list(lay) == sorted(lay) for lay in layouts)
    assert () in layouts
    max_layouts = enumerate_layouts(m, maximal_only=True)
    assert by_index(m, max_layouts) == maximal and len(max_layouts) == len(maximal)
    assert () not in max_layouts


def test_h100_spot_checks():
    layouts = set(enumerate_layouts(H100))
    maximal = set(enumerate_layouts(H100, maximal_only=True))
    seven = tuple(("1g.10gb", s) for s in range(7))
    assert seven in layouts and seven in maximal
    assert (("3g.40gb", 4), ("4g.40gb", 0)) in layouts
    assert (("1g.10gb", 6), ("2g.20gb", 0), ("2g.20gb", 2), ("2g.20gb", 4)) in maximal
    assert not any(("1g.10gb", 7) in lay for lay in layouts)
    assert not any(sum(n == "1g.10gb+me" for n, _ in lay) > 1 for lay in layouts)
    assert placement_conflict(H100, [("1g.10gb+me", 0)], "1g.10gb+me", 3) is not None
    assert (("7g.80gb", 0),) in maximal
