"""meshctl output: table, wide, json and yaml shapes from protobuf objects."""

import json
import re
from datetime import datetime, timezone

import pytest
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from gpumesh.v1 import slice_service_pb2, types_pb2
from mesh.client import gpu_status_to_dict, node_to_dict, slice_to_dict
from tools.meshctl import describe, output

GiB = 1 << 30
NOW = datetime(2025, 1, 2, 12, 0, 0, tzinfo=timezone.utc)


def ts(text):
    t = Timestamp()
    t.FromJsonString(text)
    return t


def mig_slice(**kw):
    s = types_pb2.Slice(
        id="s-0001", allocation_id="a-0001", tenant="team-a", node="sim-node-01", gpu_uuid="GPU-aaaa",
        gpu_index=3, gpu_model="H100-80GB", isolation=types_pb2.ISOLATION_MIG, profile="3g.40gb",
        placement=types_pb2.Placement(start=4, size=4), memory_bytes=40 * GiB, compute_share=3 / 7,
        state=types_pb2.SLICE_STATE_READY, device_uuid="MIG-bbbb", env={"CUDA_VISIBLE_DEVICES": "MIG-bbbb"},
        priority=5, labels={"job": "train"}, created_at=ts("2025-01-02T11:55:00Z"),
        gpu_instance_id=2, compute_instance_id=0)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def mps_slice():
    return types_pb2.Slice(id="s-0002", allocation_id="a-0002", tenant="team-b", node="sim-node-02",
                           gpu_uuid="GPU-cccc", gpu_index=0, gpu_model="H100-80GB",
                           isolation=types_pb2.ISOLATION_MPS, memory_bytes=int(9.5 * GiB),
                           compute_share=0.25, state=types_pb2.SLICE_STATE_PENDING)


def node(name="sim-node-01", ready=True, cordoned=False):
    gpus = [types_pb2.Gpu(index=i, uuid=f"GPU-{i}", model="H100-80GB", memory_bytes=80 * GiB,
                          mig_enabled=True, mig_pending=False, nvlink_domain=0) for i in range(8)]
    inv = types_pb2.NodeInventory(hostname=name, gpus=gpus, driver_version="550.54.15", cuda_version="12.4",
                                  gpu_backend="sim", nvlink_domains=[types_pb2.NvlinkDomain(gpus=range(8))],
                                  nics=[types_pb2.Nic(name="mlx5_0", kind="infiniband", rate_gbps=400, gpus=[0, 1])])
    return types_pb2.Node(name=name, cordoned=cordoned, inventory=inv, slices=2, ready_slices=1,
                          state=types_pb2.NODE_STATE_READY if ready else types_pb2.NODE_STATE_NOT_READY,
                          registered_at=ts("2025-01-01T12:00:00Z"), agent_version="0.1.0")


def gpu_status(mig_enabled=True, mig_pending=False):
    gpu = types_pb2.Gpu(index=3, uuid="GPU-aaaa", model="H100-80GB", memory_bytes=80 * GiB,
                        mig_enabled=mig_enabled, mig_pending=mig_pending)
    return types_pb2.GpuStatus(node="sim-node-01", gpu=gpu, allocated_memory_bytes=50 * GiB,
                               allocated_compute_share=4 / 7, slices=2, mig_layout=["3g.40gb@4", "1g.10gb@0"],
                               sharing=types_pb2.ISOLATION_MIG, node_ready=True, node_cordoned=False)


def test_slice_to_dict_names_and_shapes():
    d = slice_to_dict(mig_slice())
    assert d["isolation"] == "mig" and d["state"] == "ready" and d["profile"] == "3g.40gb"
    assert d["placement"] == {"start": 4, "size": 4}
    assert d["created_at"] == "2025-01-02T11:55:00Z" and d["updated_at"] is None
    assert d["env"] == {"CUDA_VISIBLE_DEVICES": "MIG-bbbb"} and d["labels"] == {"job": "train"}
    for key in ("id", "allocation_id", "tenant", "node", "gpu_uuid", "gpu_index", "gpu_model", "memory_bytes",
                "compute_share", "device_uuid", "message", "priority"):
        assert key in d
    m = slice_to_dict(mps_slice())
    assert m["profile"] is None and m["placement"] is None and m["isolation"] == "mps"
    assert m["state"] == "pending" and m["created_at"] is None
    assert slice_to_dict(types_pb2.Slice(isolation=types_pb2.ISOLATION_TIMESHARE))["isolation"] == "timeshare"
    json.dumps(d)  # plain JSON types only


@pytest.mark.parametrize("enabled, pending, want", [  # mig_pending: the mode flips at the next reset
    (True, False, "enabled"), (False, False, "disabled"),
    (True, True, "enabled (pending disable)"), (False, True, "disabled (pending enable)"),
])
def test_gpu_status_mig_mode(enabled, pending, want):
    d = gpu_status_to_dict(gpu_status(enabled, pending))
    assert d["mig_mode"] == want
    assert d["sharing"] == "mig" and d["memory_total_bytes"] == 80 * GiB and d["cordoned"] is False
    assert d["mig_layout"] == ["3g.40gb@4", "1g.10gb@0"] and d["index"] == 3 and d["uuid"] == "GPU-aaaa"


def test_node_to_dict():
    d = node_to_dict(node(ready=False, cordoned=True))
    assert d["state"] == "not_ready" and d["cordoned"] is True and d["gpus"] == 8
    assert d["gpu_models"] == ["H100-80GB"] and d["inventory"]["nvlink_domains"] == [list(range(8))]
    assert output.node_status(d) == "NotReady,SchedulingDisabled"
    assert output.node_status(dict(d, draining=True)) == "NotReady,SchedulingDisabled,Draining"


def table_lines(text):
    lines = text.rstrip("\n").split("\n")
    return lines, [line.split() for line in lines]


def test_slice_table_columns_are_aligned():
    text = output.format_list("slices", [mig_slice(), mps_slice()], "table", now=NOW)
    lines, cells = table_lines(text)
    assert cells[0] == ["ID", "TENANT", "NODE", "GPU", "ISOLATION", "PROFILE", "MEMORY", "COMPUTE", "STATE", "AGE"]
    assert cells[1] == ["s-0001", "team-a", "sim-node-01", "3", "mig", "3g.40gb", "40GiB", "0.43", "Ready", "5m"]
    assert cells[2] == ["s-0002", "team-b", "sim-node-02", "0", "mps", "-", "9.5GiB", "0.25", "Pending", "<unknown>"]
    for header in ("TENANT", "STATE", "AGE"):  # every column starts at the same offset on every line
        col = lines[0].index(header)
        assert all(line[col - 1] == " " and line[col] != " " for line in lines)


def test_wide_adds_columns():
    narrow = output.format_list("slices", [mig_slice()], "table", now=NOW)
    wide = output.format_list("slices", [mig_slice()], "wide", now=NOW)
    head = wide.split("\n")[0].split()
    assert head[:10] == narrow.split("\n")[0].split()
    assert {"ALLOCATION", "DEVICE", "PLACEMENT", "PRIORITY"} <= set(head)
    assert "MIG-bbbb" in wide and "4+4" in wide and "a-0001" in wide


def test_node_and_gpu_tables():
    text = output.format_list("nodes", [node(), node("sim-node-02", cordoned=True)], "table", now=NOW)
    _, cells = table_lines(text)
    assert cells[0] == ["NAME", "STATUS", "GPUS", "MODEL", "SLICES", "AGE"]
    assert cells[1] == ["sim-node-01", "Ready", "8", "H100-80GB", "2", "24h"]
    assert cells[2][1] == "Ready,SchedulingDisabled"
    gpus = output.format_list("gpus", [gpu_status(True, True)], "table", now=NOW)
    lines, cells = table_lines(gpus)
    assert cells[0] == ["NODE", "INDEX", "MODEL", "MIG", "MEMORY", "COMPUTE", "SLICES", "SHARING", "HEALTH"]
    assert re.split(r"\s{3,}", lines[1])[3] == "enabled (pending disable)"
    assert "50GiB/80GiB" in lines[1] and "0.57" in lines[1]
    assert "3g.40gb@4,1g.10gb@0" in output.format_list("gpus", [gpu_status()], "wide")


def test_gpu_telemetry_in_json_and_wide():
    from gpumesh.v1 import types_pb2
    g = gpu_status()
    g.telemetry.CopyFrom(types_pb2.GpuTelemetry(
        index=0, utilization_pct=87.5, memory_used_bytes=60 << 30, memory_total_bytes=80 << 30, temperature_c=83,
        power_w=612, throttle_reasons=["sw_thermal"], memory_pressure=types_pb2.MEMORY_PRESSURE_CRITICAL,
        thermal_state=types_pb2.THERMAL_STATE_THROTTLING, health=types_pb2.GPU_HEALTH_HEALTHY))
    g.telemetry.at.FromSeconds(1_800_000_000)
    item = json.loads(output.format_list("gpus", [g], "json"))["items"][0]
    for key in ("node", "index", "uuid", "model", "mig_mode", "utilization", "memory_used_bytes",
                "memory_total_bytes", "temperature_c", "power_w", "memory_pressure", "thermal_state", "health"):
        assert key in item, key
    assert (item["memory_pressure"], item["thermal_state"], item["health"]) == ("critical", "throttling", "healthy")
    assert item["utilization"] == 87.5 and item["memory_used_bytes"] == 60 << 30
    wide = output.format_list("gpus", [g], "wide")
    assert "88%" in wide and "83C" in wide and "612W" in wide and "sw_thermal" in wide and "critical" in wide
    empty = json.loads(output.format_list("gpus", [gpu_status()], "json"))["items"][0]
    assert empty["utilization"] is None and empty["health"] is None


def test_empty_list_says_so():
    assert output.format_list("slices", [], "table") == "No slices found.\n"


@pytest.mark.parametrize("fmt, load", [("json", json.loads), ("yaml", yaml.safe_load)])
def test_get_prints_items(fmt, load):
    doc = load(output.format_list("slices", [mig_slice(), mps_slice()], fmt))
    assert list(doc) == ["items"] and [s["id"] for s in doc["items"]] == ["s-0001", "s-0002"]
    assert doc["items"][0] == slice_to_dict(mig_slice())
    nodes = load(output.format_list("nodes", [node()], fmt))
    assert nodes["items"][0]["name"] == "sim-node-01"
    assert load(output.format_list("gpus", [], fmt)) == {"items": []}


@pytest.mark.parametrize("fmt, load", [("json", json.loads), ("yaml", yaml.safe_load)])
def test_alloc_prints_id_and_slices(fmt, load):
    resp = slice_service_pb2.AllocateResponse(allocation_id="a-0001", slices=[mig_slice(), mig_slice(id="s-0003")])
    doc = load(output.format_allocation(resp, fmt))
    assert doc["id"] == "a-0001" and [s["id"] for s in doc["slices"]] == ["s-0001", "s-0003"]
    text = output.format_allocation(resp, "table", now=NOW)
    assert text.startswith("allocation/a-0001 (2 slices)\n") and "s-0003" in text


def test_describe_node_document_and_text():
    doc = describe.node_document(node(), [gpu_status()], [mig_slice()])
    assert doc["gpu_status"][0]["mig_layout"] == ["3g.40gb@4", "1g.10gb@0"]
    assert doc["slice_list"][0]["id"] == "s-0001"
    text = describe.format_node(doc)
    assert "Name:" in text and "sim-node-01" in text and "Ready" in text
    assert "GPUs:" in text and "3g.40gb@4,1g.10gb@0" in text and "s-0001" in text
    assert "mlx5_0" in text and "[0,1,2,3,4,5,6,7]" in text
    json.loads(output.dump(doc, "json"))


def test_describe_slice_text():
    text = describe.format_slice(slice_to_dict(mig_slice()))
    assert "Placement:" in text and "start 4, size 4" in text and "40GiB" in text
    assert "CUDA_VISIBLE_DEVICES=MIG-bbbb" in text and "GI 2, CI 0" in text


@pytest.mark.parametrize("secs, want", [(5, "5s"), (119, "119s"), (600, "10m"), (3 * 3600, "3h"),
                                        (47 * 3600, "47h"), (3 * 86400, "3d")])
def test_age(secs, want):
    then = datetime.fromtimestamp(NOW.timestamp() - secs, timezone.utc).isoformat()
    assert output.age(then, NOW) == want


# -- events (tools/meshctl/events.py) -------------------------------------------------------------

def _event(reason, count=1, first=0, last=0, **kw):
    from gpumesh.v1 import event_service_pb2 as E
    ev = E.Event(id=f"ev-{reason}", kind=kw.get("kind", "Node"), name=kw.get("name", "gpu-a"),
                 type=kw.get("type", "Normal"), reason=reason, message=kw.get("message", "m"), count=count, source="node-controller", node="gpu-a")
    ev.first_timestamp.FromSeconds(first)
    ev.last_timestamp.FromSeconds(last)
    return ev


def test_get_events_table_has_kubectl_columns():
    from tools.meshctl import events
    now = datetime.fromtimestamp(1000, timezone.utc)
    text = events.format_events([_event("Cordoned", 3, 100, 940), _event("NodeNotReady", type="Warning", last=990)],
                                "table", now)
    lines = text.splitlines()
    assert lines[0].split() == ["TYPE", "REASON", "OBJECT", "MESSAGE", "COUNT", "AGE"]
    assert lines[1].split() == ["Normal", "Cordoned", "node/gpu-a", "m", "3", "60s"]
    assert lines[2].split()[:2] == ["Warning", "NodeNotReady"]
    wide = events.format_events([_event("Cordoned", 3, 100, 940)], "wide", now).splitlines()
    assert wide[0].split()[-5:] == ["FIRST", "SEEN", "SOURCE", "NODE", "TENANT"]
    assert events.format_events([], "table") == "No events found.\n"
    doc = json.loads(events.format_events([_event("Cordoned", 2)], "json"))
    assert doc["items"][0]["reason"] == "Cordoned" and doc["items"][0]["count"] == 2


def test_describe_events_section_shows_repeats():
    from tools.meshctl import events
    now = datetime.fromtimestamp(1000, timezone.utc)
    text = events.section([_event("XidError", 4, 400, 970, type="Warning")], now)
    assert text.startswith("Events:\n") and "XidError" in text and "30s (x4 over 10m)" in text
    assert events.section([]) == "Events:  <none>\n"


@pytest.mark.parametrize("text, want", [
    ("node/gpu-a", ("Node", "gpu-a")), ("SLICE/s-1", ("Slice", "s-1")), ("gpu/gpu-a/0", ("Gpu", "gpu-a/0")),
    ("deploy/chat", ("Deployment", "chat")), ("node", ("Node", "")), ("Autoscaler/chat", ("Autoscaler", "chat")),
])
def test_events_for_parses_kind_and_name(text, want):
    from tools.meshctl import events
    assert events.parse_for(text) == want


def test_events_for_and_since_refuse_nonsense():
    from tools.meshctl import events
    from tools.meshctl.common import CliError
    with pytest.raises(CliError, match="unknown kind"):
        events.parse_for("bogus/x")
    with pytest.raises(CliError, match="not a duration"):
        events.parse_since("ten minutes")
    assert events.parse_since("10m") < datetime.now(timezone.utc).timestamp() - 590


def test_describe_migration_text():
    from gpumesh.v1 import migration_service_pb2 as M
    from mesh.migrationapi import migration_to_dict
    m = M.Migration(id="m-1", workload_id="w-1", tenant="team-a", phase=M.MIGRATION_PHASE_COPYING,
                    source_node="gpu-a", source_slice="s-1", target_node="gpu-b", target_slice="s-2", reason="drain")
    text = describe.format_migration(migration_to_dict(m))
    assert re.search(r"^Phase:\s+copying$", text, re.M)
    assert re.search(r"^Source:\s+gpu-a \(slice s-1\)$", text, re.M)
    assert re.search(r"^Target:\s+gpu-b \(slice s-2\)$", text, re.M)


def test_sigterm_unwinds_the_command_so_its_clean_up_runs(tmp_path):
    """A bench holds a local cluster and a state directory: SIGTERM (a CI timeout, `kill`) must run its
    `finally` as Ctrl-C does, and exit 143."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time
    code = textwrap.dedent("""
        import argparse, time
        from tools.meshctl import main as m
        def hold(args):
            try:
                print("holding", flush=True)
                time.sleep(60)
            finally:
                print("cleaned up", flush=True)
        def parser():
            p = argparse.ArgumentParser()
            p.set_defaults(func=hold)
            return p
        m.build_parser = parser
        raise SystemExit(m.main([]))
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding"
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert "cleaned up" in out and "terminated" in err and p.returncode == 143


def test_python_dash_m_tools_meshctl_runs_the_cli():
    """`python -m tools.meshctl` works from a checkout (it answered "'tools.meshctl' is a package and cannot be
    directly executed")."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'proto'}")
    p = subprocess.run([sys.executable, "-m", "tools.meshctl", "get", "--help"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: meshctl get")


def test_every_timeout_flag_says_seconds():
    """A `--...-timeout` flag's metavar is SECONDS in every subcommand's usage (`drain` showed WAIT_TIMEOUT)."""
    import argparse

    from tools.meshctl.main import build_parser

    def walk(p, path):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    yield from walk(sp, path + [name])
            elif any(o.endswith("-timeout") for o in a.option_strings) and a.nargs != 0:
                yield " ".join(path), a.option_strings[-1], a.metavar
    bad = [(cmd, flag, mv) for cmd, flag, mv in walk(build_parser(), ["meshctl"]) if mv != "SECONDS"]
    assert bad == []


def test_forecast_help_names_every_subcommand(capsys):
    """`meshctl forecast --help` described only `backtest`, though `get`, `series` and `interactions` read the
    control plane."""
    from tools.meshctl import main as meshctl
    with pytest.raises(SystemExit):
        meshctl.main(["forecast", "--help"])
    text = capsys.readouterr().out.split("commands:")[0]
    assert all(f"`{c}`" in text for c in ("get", "series", "interactions", "backtest", "concurrency"))


def test_model_import_names_a_missing_file_once(capsys, tmp_path):
    """It said "error: /x.gguf: /x.gguf does not exist"."""
    from tools.meshctl import main as meshctl
    path = str(tmp_path / "missing.gguf")
    assert meshctl.main(["--endpoint", "127.0.0.1:1", "model", "import", path, "--name", "m"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {path} does not exist"
