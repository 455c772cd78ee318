"""The SDK's plain views of API messages: what `meshctl -o json|yaml` prints and what scripts get from
`mesh.client` (re-exported there): enum values by their short lowercase names, timestamps as ISO 8601."""

from __future__ import annotations

from typing import Any

from gpumesh.v1 import slice_service_pb2, types_pb2


def enum_name(enum_type: Any, value: int, prefix: str) -> str:
    """`SLICE_STATE_READY` -> "ready"; unknown numbers read as "unknown(N)"."""
    try:
        name = enum_type.Name(value)
    except ValueError:
        return f"unknown({value})"
    if name.startswith(prefix):
        name = name[len(prefix):]
    return name.lower()


def isolation_name(value: int) -> str:
    return enum_name(types_pb2.Isolation, value, "ISOLATION_")


def slice_state_name(value: int) -> str:
    return enum_name(types_pb2.SliceState, value, "SLICE_STATE_")


def node_state_name(value: int) -> str:
    return enum_name(types_pb2.NodeState, value, "NODE_STATE_")


def timestamp(msg: Any, field: str) -> str | None:
    """An RFC 3339 string for a set Timestamp field, else None."""
    if not msg.HasField(field):
        return None
    return getattr(msg, field).ToJsonString()


def slice_to_dict(s: types_pb2.Slice) -> dict[str, Any]:
    return {
        "id": s.id, "allocation_id": s.allocation_id, "tenant": s.tenant, "node": s.node,
        "gpu_uuid": s.gpu_uuid, "gpu_index": s.gpu_index, "gpu_model": s.gpu_model,
        "isolation": isolation_name(s.isolation), "profile": s.profile or None,
        "placement": ({"start": s.placement.start, "size": s.placement.size}
                      if s.HasField("placement") else None),
        "memory_bytes": s.memory_bytes, "compute_share": s.compute_share,
        "state": slice_state_name(s.state), "device_uuid": s.device_uuid, "env": dict(s.env),
        "message": s.message, "priority": s.priority, "labels": dict(s.labels),
        "created_at": timestamp(s, "created_at"), "updated_at": timestamp(s, "updated_at"),
        "gpu_instance_id": s.gpu_instance_id, "compute_instance_id": s.compute_instance_id,
    }


def workload_state_name(value: int) -> str:
    return enum_name(types_pb2.WorkloadState, value, "WORKLOAD_STATE_")


def workload_to_dict(w: types_pb2.Workload) -> dict[str, Any]:
    return {
        "id": w.id, "slice_id": w.slice_id, "node": w.node, "tenant": w.tenant, "command": list(w.command),
        "env": dict(w.env), "state": workload_state_name(w.state), "pid": w.pid, "exit_code": w.exit_code,
        "created_at": timestamp(w, "created_at"), "started_at": timestamp(w, "started_at"),
        "finished_at": timestamp(w, "finished_at"), "message": w.message, "labels": dict(w.labels),
        "endpoint": w.endpoint, "endpoint_certificate": w.endpoint_certificate,
        "network_address": w.network_address,
        "backend": {"kind": w.backend.kind, "artifact": w.backend.artifact, "served_name": w.backend.served_name,
                    "context": w.backend.context, "concurrency": w.backend.concurrency,
                    "gpu_layers": w.backend.gpu_layers, "device": w.backend.device}
        if w.HasField("backend") else None,
    }


def mig_mode(gpu: types_pb2.Gpu) -> str:
    """"enabled", "disabled", or with a pending change "enabled (pending disable)".

    `mig_pending` is read as the agent sets it: true when the mode flips at the next GPU reset.
    """
    now = "enabled" if gpu.mig_enabled else "disabled"
    if gpu.mig_pending:
        return f"{now} (pending {'disable' if gpu.mig_enabled else 'enable'})"
    return now


def gpu_to_dict(g: types_pb2.Gpu) -> dict[str, Any]:
    return {"index": g.index, "uuid": g.uuid, "model": g.model, "product_name": g.product_name,
            "memory_bytes": g.memory_bytes, "mig_mode": mig_mode(g),
            "nvlink_domain": g.nvlink_domain, "pci_bus_id": g.pci_bus_id, "serial": g.serial}


def node_to_dict(n: types_pb2.Node) -> dict[str, Any]:
    inv = n.inventory
    return {
        "name": n.name, "state": node_state_name(n.state), "cordoned": n.cordoned, "draining": n.draining,
        "deleting": n.deleting,
        "gpus": len(inv.gpus), "gpu_models": sorted({g.model for g in inv.gpus}),
        "slices": n.slices, "ready_slices": n.ready_slices,
        "registered_at": timestamp(n, "registered_at"),
        "agent_registered_at": timestamp(n, "agent_registered_at"),
        "last_heartbeat": timestamp(n, "last_heartbeat"),
        "agent_version": n.agent_version, "message": n.message,
        "inventory": {
            "hostname": inv.hostname, "driver_version": inv.driver_version,
            "cuda_version": inv.cuda_version, "gpu_backend": inv.gpu_backend,
            "labels": dict(inv.labels), "gpus": [gpu_to_dict(g) for g in inv.gpus],
            "nvlink_domains": [list(d.gpus) for d in inv.nvlink_domains],
            "nics": [{"name": c.name, "kind": c.kind, "rate_gbps": c.rate_gbps,
                      "port_guid": c.port_guid, "gpus": list(c.gpus)} for c in inv.nics],
        },
        "events": [{"at": timestamp(e, "at"), "type": e.type, "reason": e.reason, "message": e.message,
                    "gpu": e.gpu_index if e.gpu_index >= 0 else None} for e in n.events],
        "ib_ports": [{"device": p.device, "port": p.port, "state": p.state, "rate_gbps": p.rate_gbps,
                      "port_guid": p.port_guid, "link_layer": p.link_layer} for p in n.ib_ports],
    }


def gpu_status_to_dict(g: types_pb2.GpuStatus) -> dict[str, Any]:
    return {
        "node": g.node, "index": g.gpu.index, "uuid": g.gpu.uuid, "model": g.gpu.model,
        "mig_mode": mig_mode(g.gpu), "memory_total_bytes": g.gpu.memory_bytes,
        "allocated_memory_bytes": g.allocated_memory_bytes,
        "allocated_compute_share": g.allocated_compute_share, "slices": g.slices,
        "mig_layout": list(g.mig_layout),
        "sharing": isolation_name(g.sharing) if g.sharing else None,
        "node_ready": g.node_ready, "cordoned": g.node_cordoned,
        **telemetry_to_dict(g.telemetry if g.HasField("telemetry") else None),
    }


def telemetry_to_dict(t: types_pb2.GpuTelemetry | None) -> dict[str, Any]:
    """The GPU's latest reading and the states the control plane derived (None before any reading)."""
    def state(enum_type, value, prefix):
        return enum_name(enum_type, value, prefix) if value else None
    if t is None:
        t = types_pb2.GpuTelemetry()
    seen = t.HasField("at")
    return {
        "utilization": t.utilization_pct if seen else None,
        "memory_used_bytes": t.memory_used_bytes if seen else None,
        "temperature_c": t.temperature_c if seen else None,
        "power_w": t.power_w if seen else None,
        "power_limit_w": t.power_limit_w if seen else None,
        "sm_clock_mhz": t.sm_clock_mhz if seen else None,
        "throttle_reasons": list(t.throttle_reasons),
        "ecc_uncorrected": t.ecc_uncorrected if seen else None,
        "nvlinks_active": sum(1 for link in t.nvlinks if link.active) if t.nvlinks else None,
        "numa_node": t.numa_node if seen else None,
        "memory_pressure": state(types_pb2.MemoryPressure, t.memory_pressure, "MEMORY_PRESSURE_"),
        "thermal_state": state(types_pb2.ThermalState, t.thermal_state, "THERMAL_STATE_"),
        "health": state(types_pb2.GpuHealth, t.health, "GPU_HEALTH_"),
        "health_reason": t.health_reason or None,
        "telemetry_at": timestamp(t, "at") if seen else None,
    }


def allocation_to_dict(resp: slice_service_pb2.AllocateResponse) -> dict[str, Any]:
    return {"id": resp.allocation_id, "slices": [slice_to_dict(s) for s in resp.slices]}
