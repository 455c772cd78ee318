"""The GPU health policy (controlplane/controllers/healthpolicy.py): NVIDIA's XID catalog classes as the default,
per-class and per-XID overrides, the recurrence window, and validation that names the field."""

from __future__ import annotations

import pytest

from controlplane.controllers.healthpolicy import CATALOG, HealthPolicy, from_mapping, load
from mesh.config import ConfigError


@pytest.mark.parametrize("code, action, cls", [
    # application faults (the catalog's RESTART_APP): nothing is marked
    (13, "ignore", "application"), (31, "ignore", "application"), (43, "ignore", "application"),
    (45, "ignore", "application"), (68, "ignore", "application"), (109, "ignore", "application"),
    # errors that need a GPU reset
    (48, "reset", "reset"), (63, "reset", "reset"), (74, "reset", "reset"), (92, "reset", "reset"),
    (94, "reset", "reset"), (95, "reset", "reset"), (119, "reset", "reset"), (154, "reset", "reset"),
    # errors that need the node (the GPU left the bus, or its memory cannot be repaired)
    (64, "reboot", "reboot"), (79, "reboot", "reboot"),
    # not in the table: unknown_action
    (999, "reset", "unknown"), (1, "reset", "unknown"),
])
def test_default_policy_follows_the_catalog_classes(code, action, cls):
    d = HealthPolicy().decide(code)
    assert (d.action, d.cls) == (action, cls)
    assert d.fatal == (action != "ignore")


@pytest.mark.parametrize("raw, code, action", [
    ({"xids": {74: "quarantine"}}, 74, "quarantine"),          # a per-XID override
    ({"xids": {"31": "reset"}}, 31, "reset"),                  # YAML keys may be strings
    ({"classes": {"application": [13, 48]}}, 48, "ignore"),     # a class takes a code from another
    ({"unknown_action": "ignore"}, 500, "ignore"),
    ({"unknown_action": "quarantine"}, 500, "quarantine"),
])
def test_overrides(raw, code, action):
    assert from_mapping(raw).decide(code).action == action


def test_a_code_moved_to_another_class_leaves_its_old_one():
    p = from_mapping({"classes": {"application": [13, 48]}})
    assert 48 not in p.classes["reset"] and 48 in p.classes["application"]
    assert p.classes["reboot"] == CATALOG["reboot"]


@pytest.mark.parametrize("max_rec, times, quarantined", [
    # incidents in the window (the new one last); max_recurrences recurrences are allowed
    (2, [0, 10], False),
    (2, [0, 10, 20], False),
    (2, [0, 10, 20, 30], True),
    (0, [0], False),
    (0, [0, 5], True),
    (2, [-5000, -4000, -3700, 30], False),   # the old ones fell out of the 3600 s window
])
def test_recurrence_window(max_rec, times, quarantined):
    p = HealthPolicy(window_seconds=3600.0, max_recurrences=max_rec)
    assert p.quarantines(times, now=30) is quarantined


def test_recurring_keeps_only_the_window():
    assert HealthPolicy(window_seconds=100.0).recurring([0.0, 50.0, 120.0], now=160.0) == [120.0]


@pytest.mark.parametrize("raw, field", [
    ({"window_seconds": 0}, "health_policy.window_seconds"),
    ({"window_seconds": "a day"}, "health_policy.window_seconds"),
    ({"max_recurrences": -1}, "health_policy.max_recurrences"),
    ({"max_recurrences": True}, "health_policy.max_recurrences"),
    ({"max_reset_attempts": 0}, "health_policy.max_reset_attempts"),
    ({"reset_retry_seconds": 0}, "health_policy.reset_retry_seconds"),
    ({"recovery": "yes"}, "health_policy.recovery"),
    ({"unknown_action": "explode"}, "health_policy.unknown_action"),
    ({"xids": {48: "reboot-now"}}, "health_policy.xids.48"),
    ({"xids": {"x": "reset"}}, "health_policy.xids"),
    ({"xids": {0: "reset"}}, "health_policy.xids"),
    ({"classes": {"fatal": [48]}}, "health_policy.classes"),
    ({"classes": {"application": "13"}}, "health_policy.classes.application"),
    ({"classes": {"application": [13], "reset": [13]}}, "health_policy.classes"),
    ({"windows_seconds": 10}, "unknown key(s) windows_seconds"),
    (["not", "a", "mapping"], "expected a mapping"),
])
def test_bad_policies_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        from_mapping(raw)


def test_load_a_yaml_file(tmp_path):
    f = tmp_path / "health.yaml"
    f.write_text("window_seconds: 600\nmax_recurrences: 1\nrecovery: false\nxids:\n  74: quarantine\n")
    p = load(str(f))
    assert (p.window_seconds, p.max_recurrences, p.recovery) == (600.0, 1, False)
    assert p.decide(74).action == "quarantine" and p.decide(48).action == "reset"
    assert load("") == HealthPolicy()
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("xids: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(str(tmp_path / "bad.yaml"))


def test_the_control_plane_config_checks_the_policy_file(tmp_path):
    from controlplane.config import ControlPlaneConfig
    f = tmp_path / "health.yaml"
    f.write_text("max_recurrences: many\n")
    cfg = ControlPlaneConfig(insecure=True, state_dir=str(tmp_path / "cp"), health_policy=str(f))
    with pytest.raises(ConfigError, match="max_recurrences"):
        cfg.check()
