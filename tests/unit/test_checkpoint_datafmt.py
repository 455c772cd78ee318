"""Data entries are tagged JSON: what the SDK stores round-trips, anything that is not data is refused
when the checkpoint is taken, and the reader builds only data (pickle bytes are not read)."""

from __future__ import annotations

import math
import pickle
import random

import pytest

from mesh.checkpoint import datafmt
from mesh.checkpoint.format import FormatError


def test_values_round_trip():
    np = pytest.importorskip("numpy")
    value = {"step": 3, "extras": {"cursor": (1, 2, [3, "x"]), "blob": b"\x00\xff", "f": 1.5, "n": None,
                                   "inf": math.inf, 7: "int key", (1, 2): True, "$t": "a tag-like key"},
             "numpy": ("MT19937", np.arange(6, dtype=np.uint32).reshape(2, 3), 1, 0, 0.0),
             "python": random.getstate()}
    back = datafmt.decode(datafmt.encode(value))
    assert back["numpy"][1].dtype == np.uint32 and (back["numpy"][1] == value["numpy"][1]).all()
    back["numpy"] = value["numpy"]
    assert back == value and isinstance(back["extras"]["cursor"], tuple)
    random.setstate(back["python"])       # the RNG states go back in as they came out


def test_what_is_not_data_is_refused_when_saved():
    torch = pytest.importorskip("torch")
    with pytest.raises(datafmt.DataError, match=r"extras\['w'\]: a torch.Tensor .*register_tensor"):
        datafmt.encode({"w": torch.zeros(2)}, "extras")
    with pytest.raises(datafmt.DataError, match="builtins.function"):
        datafmt.encode({"f": lambda: 0}, "extras")


class _Payload:
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize("blob", [pickle.dumps({"a": _Payload()}), b"\x80\x05K\x01.", b'{"$nd": {"dtype": "O", '
                                  b'"shape": [1], "b": ""}}', b'{"$d": [[1]]}', b"[" * 5000 + b"]" * 5000])
def test_the_reader_builds_only_data(blob, capsys):
    with pytest.raises(FormatError):
        datafmt.decode(blob, "meta")
    assert "ran" not in capsys.readouterr().out
