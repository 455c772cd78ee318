"""Data entries of a checkpoint: small declared objects as tagged JSON, never pickle.

The step, `extras`, RNG states and an optimizer's hyper-parameters travel on the network and
are read back by the receiving workload, so they are encoded as data that cannot name code:
JSON plus a few tagged types, decoded by a strict reader that builds only these types.

| value | encoded |
| --- | --- |
| None, bool, int, float (also nan/inf), str, list | as JSON |
| dict with str keys | as JSON (a one-key dict whose key is a tag goes as `$d`) |
| tuple | `{"$t": [...]}` |
| bytes, bytearray | `{"$b": "<base64>"}` |
| dict with other keys (int, tuple, ...) | `{"$d": [[key, value], ...]}` |
| numpy array of bool/int/uint/float | `{"$nd": {"dtype": "<u4", "shape": [...], "b": "<base64>"}}` |
| numpy scalar | its Python value |

Anything else (a tensor, a class instance, a function) is refused when the checkpoint is
taken, with `DataError` naming where it is: tensors go through tensor entries.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from mesh.checkpoint.format import CheckpointError, FormatError

TAGS = ("$t", "$b", "$d", "$nd")
MAX_DEPTH = 64


class DataError(CheckpointError):
    """A value cannot be stored as a data entry; the message names where it is and its type."""


def encode(obj: Any, where: str = "value") -> bytes:
    return json.dumps(_enc(obj, where, 0), separators=(",", ":"), allow_nan=True).encode()


def _enc(x: Any, where: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise DataError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(x)).decode()}
    if isinstance(x, tuple):
        return {"$t": [_enc(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_enc(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(x)]
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x) and not (len(x) == 1 and next(iter(x)) in TAGS):
            return {k: _enc(v, f"{where}[{k!r}]", depth + 1) for k, v in x.items()}
        return {"$d": [[_enc(k, f"{where} key", depth + 1), _enc(v, f"{where}[{k!r}]", depth + 1)]
                       for k, v in x.items()]}
    np = _numpy()
    if np is not None:
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biuf" or x.dtype.hasobject:
                raise DataError(f"{where}: a numpy array of dtype {x.dtype} (allowed: bool, int, uint, float)")
            a = np.ascontiguousarray(x)
            return {"$nd": {"dtype": a.dtype.str, "shape": list(a.shape), "b": base64.b64encode(a.tobytes()).decode()}}
        if isinstance(x, np.generic) and x.dtype.kind in "biuf":
            return _enc(x.item(), where, depth)
    kind = type(x).__module__ + "." + type(x).__qualname__
    hint = " (register tensors with register_tensor)" if kind.startswith("torch.") else ""
    raise DataError(f"{where}: a {kind} cannot be stored in a checkpoint's data{hint}; allowed: None, bool, int, "
                    f"float, str, bytes, list, tuple, dict, numpy arrays of numbers")


def decode(blob: bytes | bytearray | memoryview, what: str = "data entry") -> Any:
    """The value of an `encode`d blob; FormatError for anything else."""
    try:
        doc = json.loads(bytes(blob).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{what}: not a tagged JSON data entry: {exc}") from None
    return _dec(doc, what, 0)


def _dec(x: Any, what: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise FormatError(f"{what}: nested deeper than {MAX_DEPTH} levels")
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if not math.isnan(x) else math.nan
    if isinstance(x, list):
        return [_dec(v, what, depth + 1) for v in x]
    if not isinstance(x, dict):
        raise FormatError(f"{what}: unexpected JSON value {type(x).__name__}")
    if len(x) == 1 and next(iter(x)) in TAGS:
        tag, v = next(iter(x.items()))
        try:
            if tag == "$t":
                return tuple(_dec(e, what, depth + 1) for e in _list(v, what))
            if tag == "$b":
                return base64.b64decode(str(v), validate=True)
            if tag == "$d":
                out = {}
                for pair in _list(v, what):
                    k, val = _list(pair, what)
                    key = _dec(k, what, depth + 1)
                    hash(key)
                    out[key] = _dec(val, what, depth + 1)
                return out
            return _ndarray(v, what)
        except (ValueError, TypeError, KeyError) as exc:
            raise FormatError(f"{what}: bad {tag} value: {exc}") from None
    return {k: _dec(v, what, depth + 1) for k, v in x.items()}


def _list(v: Any, what: str) -> list:
    if not isinstance(v, list):
        raise FormatError(f"{what}: expected a list, got {type(v).__name__}")
    return v


def _ndarray(v: Any, what: str) -> Any:
    np = _numpy()
    if np is None:
        raise FormatError(f"{what}: holds a numpy array and numpy is not installed")
    if not isinstance(v, dict):
        raise FormatError(f"{what}: bad $nd value")
    dtype = np.dtype(str(v["dtype"]))
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise FormatError(f"{what}: numpy dtype {dtype} is not allowed (bool, int, uint, float)")
    shape = [int(n) for n in _list(v["shape"], what)]
    raw = base64.b64decode(str(v["b"]), validate=True)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy
