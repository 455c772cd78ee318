"""A model server started by hand (WorkloadService.Run with a backend, `meshctl run --backend vllm`) on a slice
that holds part of a GPU gets the slice's share of its memory, as a deployment's replica does.

vLLM takes --gpu-memory-utilization of the memory of the device it sees (0.9 when not given). An MPS or
time-share slice sees the whole GPU: a Run whose share was left at 0 started vLLM with 0.9 of all of it, taking
the other tenants' memory on a time-share slice and failing to start under MPS's pinned limit. Now the control
plane derives the share from the slice (deployspec.gpu_memory_utilization, the deployments' function) and
refuses an explicit share over the slice's part of the GPU; a MIG slice is a device of its own, so any share
of it is the slice's."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.workloads import WorkloadManager
from controlplane.serving import deployspec
from gpumesh.v1 import types_pb2 as T
from gpumesh.v1 import workload_service_pb2 as WS
from mesh import errors
from tests.unit.test_resize_swap_reports import _controller, _slice

GIB = 1 << 30


def _run(isolation: int, share: float = 0.0, kind: str = "vllm", slice_gib: int = 20):
    """Run a backend on a slice of `slice_gib` of an A100-80GB's 80 GiB; the workload's record."""
    async def main():
        ctl = _controller({"nA": ["GPU-0"]})
        s = _slice("s-1", "nA", 0, "GPU-0", slice_gib)
        s.isolation = isolation
        ctl.fleet.put_slice(s)
        wm = WorkloadManager(ctl)
        wm.save_created = _saved     # the record as it would be written (its write is another test's)
        return await wm.run(WS.RunWorkloadRequest(slice_id="s-1", backend=T.ServingBackend(
            kind=kind, artifact="/m", gpu_memory_utilization=share)))
    return asyncio.run(main())


async def _saved(w, extra, conds):
    raise _Saved(w)


class _Saved(Exception):
    def __init__(self, w):
        super().__init__("saved")
        self.w = w


def _record(*a, **k) -> T.Workload:
    with pytest.raises(_Saved) as e:
        _run(*a, **k)
    return e.value.w


@pytest.mark.parametrize("isolation", [T.ISOLATION_TIMESHARE, T.ISOLATION_MPS])
def test_vllm_left_at_zero_on_a_part_of_a_gpu_gets_the_slices_share(isolation):
    w = _record(isolation)
    assert w.backend.gpu_memory_utilization == pytest.approx(0.25)
    assert w.backend.gpu_memory_utilization == deployspec.gpu_memory_utilization(20 * GIB, 80 * GIB, isolation)


def test_vllm_on_a_mig_slice_gets_the_deployments_share_of_its_own_device():
    w = _record(T.ISOLATION_MIG)
    assert w.backend.gpu_memory_utilization == deployspec.MIG_UTILIZATION


def test_an_explicit_share_within_the_slice_is_kept():
    assert _record(T.ISOLATION_TIMESHARE, 0.2).backend.gpu_memory_utilization == pytest.approx(0.2)
    assert _record(T.ISOLATION_MPS, 0.25).backend.gpu_memory_utilization == pytest.approx(0.25)
    assert _record(T.ISOLATION_MIG, 0.95).backend.gpu_memory_utilization == pytest.approx(0.95)


@pytest.mark.parametrize("isolation", [T.ISOLATION_TIMESHARE, T.ISOLATION_MPS])
def test_an_explicit_share_over_the_slices_part_of_the_gpu_is_refused(isolation):
    with pytest.raises(errors.InvalidArgument) as e:
        _run(isolation, 0.9)
    assert e.value.field == "backend.gpu_memory_utilization"
    assert "0.25" in str(e.value)


def test_a_whole_gpu_time_share_slice_may_take_all_of_it():
    assert _record(T.ISOLATION_TIMESHARE, 1.0, slice_gib=80).backend.gpu_memory_utilization == 1.0


def test_llama_cpp_is_left_alone():
    assert _record(T.ISOLATION_TIMESHARE, kind="llama.cpp").backend.gpu_memory_utilization == 0


def test_the_share_is_rounded_down_to_what_the_agent_passes():
    """The agent passes 4 decimals (nodeagent/backends/vllm.py): two thirds of the GPU is 0.6666, never 0.6667
    (a hair over the slice: under MPS its pinned limit, which vLLM then fails to fit)."""
    assert deployspec.gpu_memory_utilization(2 * GIB, 3 * GIB, T.ISOLATION_MPS) == 0.6666
    assert deployspec.max_gpu_memory_utilization(2 * GIB, 3 * GIB, T.ISOLATION_MPS) == 0.6666
