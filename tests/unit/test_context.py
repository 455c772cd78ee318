"""mesh.context: where meshctl finds the control plane."""

import pytest
import yaml

from mesh import context


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ("MESH_ENDPOINT", "MESH_CONTEXT", "MESHCONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("GPUMESH_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_flag_wins_over_everything(monkeypatch, tmp_path):
    monkeypatch.setenv("MESH_ENDPOINT", "env:1")
    context.save_context("ctx:1", tmp_path / "state")
    assert context.resolve_endpoint("flag:1") == "flag:1"


def test_environment_wins_over_the_context_file(monkeypatch, tmp_path):
    context.save_context("ctx:1", tmp_path / "state")
    monkeypatch.setenv("MESH_ENDPOINT", "env:1")
    assert context.resolve_endpoint(None) == "env:1"


def test_context_file_is_used_last(tmp_path):
    context.save_context("127.0.0.1:5000", tmp_path / "state")
    assert context.resolve_endpoint(None) == "127.0.0.1:5000"
    assert context.resolve_endpoint("") == "127.0.0.1:5000"


def test_no_endpoint_tells_the_user_what_to_do():
    with pytest.raises(context.NoEndpointError) as info:
        context.resolve_endpoint(None)
    text = str(info.value)
    assert "meshctl up" in text and "--endpoint" in text and "MESH_ENDPOINT" in text


def test_config_dir_precedence(monkeypatch, tmp_path):
    assert context.config_dir() == tmp_path / "xdg" / "gpumesh"
    monkeypatch.setenv("GPUMESH_CONFIG_DIR", str(tmp_path / "explicit"))
    assert context.config_dir() == tmp_path / "explicit"
    monkeypatch.delenv("GPUMESH_CONFIG_DIR")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert context.config_dir() == tmp_path / "home" / ".config" / "gpumesh"


def test_save_writes_the_documented_yaml(tmp_path):
    path = context.save_context("127.0.0.1:5000", tmp_path / "state")
    assert path == tmp_path / "xdg" / "gpumesh" / "config.yaml"
    data = yaml.safe_load(path.read_text())
    assert data == {"apiVersion": "gpumesh/v1", "kind": "Config", "current-context": "local",
                    "contexts": [{"name": "local", "endpoint": "127.0.0.1:5000",
                                  "state-dir": str((tmp_path / "state").resolve())}]}
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == ["config.yaml"]  # no temp file


def test_clear_only_removes_a_context_of_that_state_dir(tmp_path):
    context.save_context("127.0.0.1:5000", tmp_path / "a")
    assert context.clear_context(tmp_path / "b") is False
    assert context.load_context()["endpoint"] == "127.0.0.1:5000"
    assert context.clear_context(tmp_path / "a") is True
    assert context.load_context() is None
    assert context.clear_context(tmp_path / "a") is False


def test_clear_matches_relative_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    context.save_context("127.0.0.1:5000", ".mesh")
    assert context.clear_context(tmp_path / ".mesh") is True


def test_a_broken_context_file_is_a_clear_error(tmp_path):
    path = context.context_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(context.NoEndpointError, match=f"{path}: not valid YAML"):
        context.resolve_endpoint(None)
    assert context.clear_context(tmp_path) is False
