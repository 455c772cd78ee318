"""A hand-started vLLM's GPU memory share follows its slice (docs/serving.md "Hand-started backends").

vLLM preallocates its `--gpu-memory-utilization` of the whole device it sees at start (an MPS or time-share slice
sees the whole GPU). A backend a tenant starts by hand (`meshctl run --backend vllm`) gets the share of its slice
at Run (workloadspec.py `backend_share`); here it follows the slice afterwards:

* An in-place resize (resize.py `_resize_in_place`) writes the share derived from the new size into the
  workload's record and sends the record to the agent, which restarts the server in place with it
  (nodeagent/workload_renewal.py, the restart step of a certificate renewal). A shrink does so, and waits for the
  restarted server, BEFORE the slice's smaller size is written: until then the slice keeps the room the old server
  holds, so the scheduler gives none of it to anyone else. A shrink whose server cannot be restarted now (its
  node's agent not connected, the server still starting, the restart not answered) is refused with
  FAILED_PRECONDITION, the slice unchanged. A growth writes the slice first, then the share: the server never
  holds more than its slice.
* A migration's target is started, and the workload's record committed, with the share derived from the target
  slice (migrations.py `_target_spec`, migration_steps.py): a later restart there (a certificate renewal, an
  in-place resize) takes the share of the GPU it runs on, not of the source's.

Only a hand-started vLLM: a deployment's replica (label gpumesh.replica) is replaced by its controller when its
slice changes, and llama.cpp takes no share of the GPU (it loads its layers, it does not preallocate a fraction).
"""

from __future__ import annotations

import logging

from controlplane.serving import deployspec
from gpumesh.v1 import node_service_pb2, types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger("controlplane.controllers.migrations")
W = types_pb2
RESTART_WAIT = 300.0        # seconds a shrink waits for the agent to restart the server (stop grace, kill, start)
Facts = tuple[int, int, int]    # (slice memory, GPU memory, isolation)


def follow_slice(b: types_pb2.ServingBackend, old: Facts, new: Facts) -> float:
    """The share of backend `b` once its slice is `new` rather than `old`: the slice's share (deployspec) when it
    had the slice's share; a share the tenant gave (under the slice's) is kept while the slice holds it, and is the
    slice's largest once it does not. Other backends than vLLM: unchanged (llama.cpp has none)."""
    u = b.gpu_memory_utilization
    if b.kind != "vllm" or not u:
        return u
    if u == deployspec.gpu_memory_utilization(*old):
        return deployspec.gpu_memory_utilization(*new)
    most = deployspec.max_gpu_memory_utilization(*new)
    return u if most is None else min(u, most)


def hand_started_vllm(w: types_pb2.Workload) -> bool:
    return w.HasField("backend") and w.backend.kind == "vllm" and deployspec.LABEL_REPLICA not in w.labels


def facts(fleet, s: types_pb2.Slice, memory_bytes: int = 0) -> Facts:
    return (memory_bytes or s.memory_bytes, fleet.gpu_memory_of(s), s.isolation)


def moved(fleet, w: types_pb2.Workload, source_slice: str, target_slice: str) -> types_pb2.Workload:
    """`w` (a migration's target spec or committed record) with the share of `target_slice`, in place."""
    src, dst = fleet.slices.get(source_slice), fleet.slices.get(target_slice)
    if src is not None and dst is not None and hand_started_vllm(w):
        w.backend.gpu_memory_utilization = follow_slice(w.backend, facts(fleet, src), facts(fleet, dst))
    return w


def planned(wm, fleet, s: types_pb2.Slice, memory_bytes: int) -> dict[str, float]:
    """The new share of each hand-started vLLM on slice `s` whose share changes when `s` holds `memory_bytes`."""
    out = {}
    for w in sorted(wm.workloads.values(), key=lambda x: x.id):
        if w.slice_id != s.id or w.state not in (W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING) \
                or not hand_started_vllm(w):
            continue
        u = follow_slice(w.backend, facts(fleet, s), facts(fleet, s, memory_bytes))
        if u != w.backend.gpu_memory_utilization:
            out[w.id] = u
    return out


def check_shrink(wm, ctl, s: types_pb2.Slice, shares: dict[str, float]) -> None:
    """Refuse (FAILED_PRECONDITION, before anything is written) a shrink whose servers cannot be restarted now."""
    for wid in shares:
        what = f"slice {s.id} runs the hand-started vLLM server {wid}, which holds its GPU memory share"
        if wm.workloads[wid].state != W.WORKLOAD_STATE_RUNNING:
            raise errors.FailedPrecondition(f"{what} and is still starting: shrink the slice once it runs; the "
                                            f"slice is unchanged")
        if ctl.sessions.get(s.node) is None:
            raise errors.FailedPrecondition(
                f"{what} until it is restarted with the smaller share, and node {s.node} is not connected to "
                f"restart it: shrink the slice once the node is back, or stop the workload, resize and run it "
                f"again; the slice is unchanged")


async def restart(wm, ctl, s: types_pb2.Slice, shares: dict[str, float], wait: bool) -> None:
    """Write each workload's new share and send its record to the agent, which restarts the server with it.
    `wait`: until each server was restarted (a new start reported) or ended, else FAILED_PRECONDITION."""
    if not shares:
        return
    before = {wid: (wm.workloads[wid].pid, wm.workloads[wid].started_at.ToNanoseconds()) for wid in shares}

    def reshared(w: types_pb2.Workload) -> types_pb2.Workload | None:
        if w.id not in shares or not hand_started_vllm(w) or w.state not in (
                W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING):
            return None
        n = types_pb2.Workload()
        n.CopyFrom(w)
        n.backend.gpu_memory_utilization = shares[w.id]
        return n

    written = await wm.update(list(shares), reshared, f"the backend share after a resize of slice {s.id}")
    for w in written:
        log(logger, logging.INFO, "hand-started vLLM gets the share of its resized slice: its agent restarts it",
            workload=w.id, slice=s.id, node=s.node, share=w.backend.gpu_memory_utilization)
    session = ctl.sessions.get(s.node)
    if session is not None and written:     # else the agent's next full command carries the new share
        session.send(node_service_pb2.ControllerMessage(workloads=node_service_pb2.WorkloadCommand(start=written)))
    if not wait:
        return
    for w in written:
        def done(x: types_pb2.Workload, was=before[w.id]) -> bool:
            return x.state not in (W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING) or (
                x.state == W.WORKLOAD_STATE_RUNNING and (x.pid, x.started_at.ToNanoseconds()) != was)
        got = await wm._wait_until(w.id, done, RESTART_WAIT)
        if not done(got):
            raise errors.FailedPrecondition(
                f"slice {s.id}: its vLLM server {w.id} was not restarted with the smaller share "
                f"({w.backend.gpu_memory_utilization:.4f}) within {RESTART_WAIT:.0f} s; the slice is unchanged (its "
                f"agent restarts the server when it can): resize it again once the workload runs")


async def before_in_place(wm, ctl, s: types_pb2.Slice, memory_bytes: int) -> tuple[types_pb2.Slice, dict]:
    """Before an in-place resize of `s` to `memory_bytes` is written: the new shares of its hand-started vLLMs; a
    shrink's are applied now (the servers restarted with them, waited for) or the shrink refused. Returns the
    slice's record as it is then, and the shares."""
    shares = planned(wm, ctl.fleet, s, memory_bytes)
    if not shares or memory_bytes >= s.memory_bytes:
        return s, shares
    check_shrink(wm, ctl, s, shares)
    await restart(wm, ctl, s, shares, wait=True)
    now = ctl.fleet.slices.get(s.id)        # the restart took a while: the slice as it is now
    if now is None or now.state != W.SLICE_STATE_READY or \
            (now.memory_bytes, now.compute_share) != (s.memory_bytes, s.compute_share):
        raise errors.FailedPrecondition(f"slice {s.id} changed while its vLLM server was restarted with the "
                                        f"smaller share: resize it again")
    if planned(wm, ctl.fleet, now, memory_bytes) or wm.new_on(s.id)[0]:
        raise errors.FailedPrecondition(f"a workload was started on slice {s.id} while its vLLM server was "
                                        f"restarted with the smaller share: resize it again; the slice is unchanged")
    return now, shares


async def after_in_place(wm, ctl, old: types_pb2.Slice, new: types_pb2.Slice, shares: dict[str, float]) -> None:
    """After the resize of `old` to `new` is written: a growth's larger shares (`restart`, not waited for). A write
    that fails leaves the servers on their smaller shares (within the slice), logged: the resize itself is done."""
    if not shares or new.memory_bytes < old.memory_bytes:
        return
    try:
        await restart(wm, ctl, new, shares, wait=False)
    except errors.MeshError as e:
        log(logger, logging.WARNING, "slice grown in place; its vLLM keeps its smaller share (the record's write "
            "failed): resize again to apply it", slice=new.id, workloads=sorted(shares), error=str(e))
