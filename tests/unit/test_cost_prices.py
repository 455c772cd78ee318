"""Prices per GPU-hour and a slice's share of its GPU."""

from types import SimpleNamespace

import pytest

from mesh.cost import PriceTable, slice_cost_per_hour, slice_share


def test_parse_canonicalises_models_and_names_bad_entries():
    table = PriceTable.parse(["H100-80GB=2.5", "a100-40gb=1.2"], default=0.5)
    assert table.gpu_hour("H100-80GB") == 2.5
    assert table.gpu_hour("A100-40GB") == 1.2
    assert table.gpu_hour("A100-80GB") == 0.5
    for bad, words in (("H100-80GB", "MODEL=DOLLARS"), ("X9=1", "unknown GPU model"),
                       ("H100-80GB=abc", "not a number"), ("H100-80GB=-1", ">= 0")):
        with pytest.raises(ValueError, match=words):
            PriceTable.parse([bad])


def test_mig_share_is_memory_slices_of_eight():
    assert slice_share(1, "H100-80GB", profile="1g.10gb") == pytest.approx(1 / 8)
    assert slice_share(1, "H100-80GB", profile="3g.40gb") == pytest.approx(4 / 8)
    assert slice_share(1, "H100-80GB", profile="7g.80gb") == 1.0


def test_mps_share_is_the_larger_of_compute_and_memory():
    gib = 2**30
    assert slice_share(2, "H100-80GB", memory_bytes=8 * gib, compute_share=0.5) == pytest.approx(0.5)
    share = slice_share(2, "H100-80GB", memory_bytes=40 * gib, compute_share=0.1)
    assert 0.49 < share < 0.51
    assert slice_share(4, "H100-80GB") == 1.0


def test_slice_cost_per_hour():
    table = PriceTable.parse(["H100-80GB=4.0"])
    sl = SimpleNamespace(isolation=1, gpu_model="H100-80GB", profile="2g.20gb", memory_bytes=0, compute_share=0)
    assert slice_cost_per_hour(sl, table) == pytest.approx(1.0)
