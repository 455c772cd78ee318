"""How the simulated NVML takes pynvml's ctypes arguments and fills its out-parameters.

Out-parameters (placement and instance arrays, counts) must be passed the way
the C library needs them: an array or ``byref``/``pointer`` for arrays,
``byref``/``pointer`` of a ``c_uint`` for counts, ``byref``/``pointer`` of a
placement struct; anything else is a TypeError. ``err`` makes the
``NVMLError`` (pynvml's own class) the simulator raises.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pynvml as _n


def err(code: int) -> _n.NVMLError:
    return _n.NVMLError(code)


def uint_out(ref: Any) -> ctypes.c_uint:
    """The c_uint behind byref()/pointer(); TypeError otherwise."""
    obj = getattr(ref, "_obj", None)
    if isinstance(obj, ctypes.c_uint):
        return obj
    if isinstance(ref, ctypes._Pointer) and isinstance(ref.contents, ctypes.c_uint):
        return ref.contents
    raise TypeError(f"count must be ctypes.byref(c_uint) or ctypes.pointer(c_uint), got {ref!r}")


def array_out(ref: Any) -> Any:
    """An indexable view of an out-array: ctypes array, byref(array or struct) or pointer."""
    obj = getattr(ref, "_obj", ref)
    if isinstance(obj, (ctypes.Array, ctypes._Pointer)):
        return obj
    if isinstance(obj, ctypes.Structure):
        return ctypes.pointer(obj)
    raise TypeError(f"expected a ctypes array or pointer for the output buffer, got {ref!r}")


def placement_in(ref: Any) -> tuple[int, int]:
    """(start, size) of a placement passed as byref()/pointer()."""
    obj = getattr(ref, "_obj", None)
    if obj is None and isinstance(ref, ctypes._Pointer):
        obj = ref.contents
    if not isinstance(obj, (_n.c_nvmlGpuInstancePlacement_t, _n.c_nvmlComputeInstancePlacement_t)):
        raise TypeError(f"placement must be ctypes.byref(placement struct) or ctypes.pointer(...), got {ref!r}")
    return obj.start, obj.size


def fill_placements(placementsRef: Any, count: ctypes.c_uint, starts: tuple[int, ...], size: int) -> int:
    """Fill a placements out-array (start, size each) and its count; with no array, only the count."""
    if placementsRef is None:
        count.value = len(starts)
        return _n.NVML_SUCCESS
    if count.value < len(starts):
        count.value = len(starts)
        raise err(_n.NVML_ERROR_INSUFFICIENT_SIZE)
    out = array_out(placementsRef)
    for i, s in enumerate(starts):
        out[i].start, out[i].size = s, size
    count.value = len(starts)
    return _n.NVML_SUCCESS
