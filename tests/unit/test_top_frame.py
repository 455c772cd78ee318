"""`meshctl top`'s screen (tools/meshctl/top/frame.py) and keys, drawn from fixed data."""

from __future__ import annotations

from rich.console import Console

from tools.meshctl.top.app import handle_key
from tools.meshctl.top.feed import Data
from tools.meshctl.top.frame import View, render


def gpu(node, index, layout=(), util=10.0, temp=40.0, pressure="low", thermal="normal", health="healthy"):
    return {"node": node, "index": index, "model": "H100-80GB", "mig_layout": list(layout), "utilization": util,
            "memory_used_bytes": 8 << 30, "memory_total_bytes": 80 << 30, "temperature_c": temp,
            "memory_pressure": pressure, "thermal_state": thermal, "health": health, "node_ready": True,
            "cordoned": False}


def mig(sid, tenant, profile, start, node="n-01", index=0):
    return {"id": sid, "tenant": tenant, "node": node, "gpu_index": index, "profile": profile, "isolation": "mig",
            "placement": {"start": start, "size": 1}, "memory_bytes": 10 << 30, "compute_share": 1 / 7,
            "state": "ready", "created_at": "2026-01-01T00:00:00Z"}


def data(ngpus=4):
    gpus = [gpu("n-01", 0, ["1g.10gb@0", "3g.40gb@4"], util=90, temp=88, thermal="critical")] + \
        [gpu(f"n-{i // 2 + 1:02d}", i % 2, util=5 * i) for i in range(1, ngpus)]
    slices = {"s-a": mig("s-a", "team-a", "1g.10gb", 0), "s-b": mig("s-b", "team-b", "3g.40gb", 4)}
    deps = [{"name": "chat", "tenant": "team-a", "model": "smollm2", "replicas": 2,
             "status": {"ready_replicas": 1}, "replica_list": [{"state": "READY", "node": "n-01"},
                                                                {"state": "STARTING", "node": "n-02"}]}]
    events = [{"kind": "slice", "name": "s-a", "tenant": "team-a", "node": "n-01", "type": "Normal",
               "reason": "Scheduled", "message": "placed on n-01/gpu0 " + "x" * 80, "count": 1,
               "last_timestamp": "2026-01-01T00:00:00Z"},
              {"kind": "node", "name": "n-02", "tenant": "", "node": "n-02", "type": "Warning",
               "reason": "NodeNotReady", "message": "lease expired", "count": 3,
               "last_timestamp": "2026-01-01T00:00:00Z"}]
    return Data(gpus=gpus, slices=slices, deployments=deps, events=events, at=1.0)


def draw(d, view, width=80, height=24) -> list[str]:
    console = Console(width=width, height=height, record=True, color_system=None, file=open("/dev/null", "w"))
    console.print(render(d, view, width, height))
    return console.export_text().splitlines()


def test_gpu_view_fits_80x24_and_draws_slots():
    lines = draw(data(40), View())
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    row = next(line for line in lines if line.startswith("n-01") and " 0 " in line[:16])
    # team-a (A) holds memory slot 0 and compute slice 0; team-b (B) memory 4-7 and compute 4-6
    assert "A···BBBB A···BBB" in row
    assert "critical" in row                      # the thermal state makes the level critical
    assert any("more rows" in line for line in lines)        # 40 GPUs do not fit: it says so
    assert any("A=team-a" in line and "B=team-b" in line for line in lines)


def test_keys_switch_view_sort_and_filter():
    d, v = data(), View()
    assert handle_key("s", v, d) and v.view == "slices"
    lines = draw(d, v)
    assert any(line.startswith("SLICE") for line in lines) and any("s-b" in line for line in lines)
    handle_key("t", v, d)                          # first tenant: team-a
    assert v.tenant == "team-a"
    lines = draw(d, v)
    assert any("s-a" in line for line in lines) and not any("s-b" in line for line in lines)
    handle_key("\t", v, d)
    assert v.view == "deployments"
    lines = draw(d, v)
    assert any("chat" in line and "1/2" in line for line in lines)
    handle_key("g", v, d)
    handle_key("o", v, d)
    assert v.sort["gpus"] == "util"
    handle_key("c", v, d)
    assert v.tenant == "" and v.node == ""
    assert handle_key("q", v, d) is False


def test_node_filter_and_errors_are_shown():
    d, v = data(6), View()
    handle_key("n", v, d)
    assert v.node == "n-01"
    d.errors["gpus"] = "cannot reach the control plane"
    lines = draw(d, v)
    assert not any(line.startswith("n-02") for line in lines)
    assert any("gpus: cannot reach" in line for line in lines)


def test_events_view_fits_and_filters():
    d, v = data(), View()
    handle_key("e", v, d)
    assert v.view == "events"
    lines = draw(d, v)
    assert all(len(line) <= 80 for line in lines)
    assert any("Scheduled" in line and "slice/s-a" in line for line in lines)
    assert any("NodeNotReady" in line and "(x3)" in line for line in lines)
    v.tenant = "team-a"
    lines = draw(d, v)
    assert not any("NodeNotReady" in line for line in lines)
