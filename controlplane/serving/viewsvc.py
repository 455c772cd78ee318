"""The v1 ServingViewService: a stream of snapshots of what a gateway routes by (docs/gateway.md).

Each snapshot holds the deployments the caller may see (with their replicas), the registry models they
serve and the status and telemetry of every GPU under a replica. The stream is level-triggered: the
servicer compares a fresh snapshot with the last one sent every `interval_ms` and sends it when anything
changed (a replica became READY, an endpoint moved, a GPU's memory or temperature reading changed), and
at least every `heartbeat_ms`. A gateway thus follows the fleet without a control-plane call per request.
An admin's snapshot (the gateway's) also carries each replica's model-server API key
(`replica_api_keys`, controlplane/serving/replicakeys.py) and the per-model costs (`model_costs`, every
tenant's); a tenant's or viewer's never does.
"""

from __future__ import annotations

import asyncio
import time

from google.protobuf import timestamp_pb2

from controlplane.api import auth
from controlplane.api.rpc import streaming
from controlplane.api.services import AdminService
from controlplane.serving.deployments import DeploymentManager
from controlplane.serving.registry import ModelRegistry
from gpumesh.v1 import servingview_service_pb2 as V
from gpumesh.v1 import servingview_service_pb2_grpc
from mesh import errors

DEFAULT_INTERVAL_MS = 500
DEFAULT_HEARTBEAT_MS = 5000


def snapshot(ctl, deployments: DeploymentManager, models: ModelRegistry) -> V.ServingView:
    """The view as the current caller may see it (a tenant: its own tenant's deployments)."""
    view = V.ServingView()
    served, gpus = set(), set()
    for name, d in sorted(deployments.store.deployments.items()):
        if not auth.visible(d.spec.tenant):
            continue
        full = deployments.store.full(name)
        view.deployments.append(full)
        served.add(d.spec.model)
        gpus.update((r.node, r.gpu_index) for r in full.replicas if r.node)
        if auth.current().admin:
            # the replicas' API keys, for the gateway (an admin identity) only: never a tenant's or viewer's
            view.replica_api_keys.update(deployments.store.keys.of(r.id for r in full.replicas))
    for name in sorted(served):
        m = models.models.get(name)
        if m is not None:
            view.models.append(m)
    cost = getattr(ctl, "cost", None)
    if cost is not None and view.models and auth.current().admin:
        # per-model cost (controlplane/cost/accountant.py): the gateway's /metrics carries it. The figures are the
        # whole fleet's (every tenant's deployments of the model): an admin's only, as CostService answers a
        # tenant or viewer its own tenant's costs only
        view.model_costs.extend(cost.model_costs([m.name for m in view.models]))
    for node, index in sorted(gpus):
        entry = ctl.fleet.nodes.get(node)
        if entry is None:
            continue
        inv = next((g for g in entry.record.inventory.gpus if g.index == index), None)
        if inv is not None:
            # the GPU as AdminService.ListGpus shows it (one way to build a GpuStatus)
            view.gpus.append(AdminService._gpu_status(None, node, entry, inv))
    return view


def _fingerprint(view: V.ServingView) -> bytes:
    """What must differ for a snapshot to be sent early: everything but the times of the readings."""
    probe = V.ServingView()
    probe.CopyFrom(view)
    for g in probe.gpus:
        g.telemetry.ClearField("at")
    for d in probe.deployments:
        for r in d.replicas:
            if r.HasField("load"):
                r.load.ClearField("at")
    return probe.SerializeToString(deterministic=True)


class ServingViewService(servingview_service_pb2_grpc.ServingViewServiceServicer):
    def __init__(self, ctl, deployments: DeploymentManager, models: ModelRegistry) -> None:
        self.ctl = ctl
        self.deployments = deployments
        self.models = models

    @streaming
    async def Watch(self, request, context):
        interval = request.interval_ms or DEFAULT_INTERVAL_MS
        heartbeat = request.heartbeat_ms or DEFAULT_HEARTBEAT_MS
        if not 100 <= interval <= 60000:
            raise errors.InvalidArgument(f"interval_ms: {interval} is outside 100..60000 (0 means "
                                         f"{DEFAULT_INTERVAL_MS})", field="interval_ms")
        if not interval <= heartbeat <= 600000:
            raise errors.InvalidArgument(f"heartbeat_ms: {heartbeat} must be at least interval_ms ({interval}) and at "
                                         f"most 600000 (0 means {DEFAULT_HEARTBEAT_MS})", field="heartbeat_ms")
        last, sent_at, seq = b"", 0.0, 0
        while True:
            view = snapshot(self.ctl, self.deployments, self.models)
            fp = _fingerprint(view)
            now = time.monotonic()
            if fp != last or now - sent_at >= heartbeat / 1000:
                seq += 1
                view.sequence = seq
                ts = timestamp_pb2.Timestamp()
                ts.GetCurrentTime()
                view.at.CopyFrom(ts)
                last, sent_at = fp, now
                yield view
            await asyncio.sleep(interval / 1000)
