"""mesh.meshconfig: meshctl's config file of named contexts - validation that names the file and the field,
migration of the single-context context.json, private atomic writes, locking, redaction."""

import json
import os
import stat
import threading

import pytest
import yaml

from mesh import meshconfig
from mesh.meshconfig import ConfigFileError, Context, UnknownContextError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ("MESHCONFIG", "MESH_CONTEXT", "MESH_ENDPOINT", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPUMESH_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def test_path_is_meshconfig_else_config_yaml_in_the_config_dir(monkeypatch, tmp_path):
    assert meshconfig.config_path() == tmp_path / "cfg" / "config.yaml"
    monkeypatch.setenv("MESHCONFIG", str(tmp_path / "elsewhere" / "mesh.yaml"))
    assert meshconfig.config_path() == tmp_path / "elsewhere" / "mesh.yaml"


def test_round_trip_keeps_every_field_and_the_order(tmp_path):
    cfg = meshconfig.MeshConfig(path=meshconfig.config_path(), current="b")
    cfg.contexts["b"] = Context(name="b", endpoint="cp1:1,cp2:1", ca="/pki/ca.crt", cert="/pki/o.crt",
                                key="/pki/o.key", token_file="/t/b.token")
    cfg.contexts["a"] = Context(name="a", endpoint="a:1", token="s3cret", state_dir="/st")
    meshconfig.save(cfg)
    back = meshconfig.load()
    assert back.current == "b" and list(back.contexts) == ["b", "a"]
    assert back.contexts == cfg.contexts
    doc = yaml.safe_load(meshconfig.config_path().read_text())
    assert doc["apiVersion"] == "gpumesh/v1" and doc["kind"] == "Config"
    assert doc["contexts"][0] == {"name": "b", "endpoint": "cp1:1,cp2:1", "ca": "/pki/ca.crt", "cert": "/pki/o.crt",
                                  "key": "/pki/o.key", "token-file": "/t/b.token"}


def test_written_private_and_atomically(tmp_path):
    cfg = meshconfig.MeshConfig(path=meshconfig.config_path(), current="a",
                                contexts={"a": Context(name="a", endpoint="a:1", token="s3cret")})
    path = meshconfig.save(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    os.chmod(path, 0o644)                      # an operator loosened it: the next write makes it private again
    with meshconfig.editing() as c:
        c.current = ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [".config.yaml.lock", "config.yaml"]  # no temp file


def test_a_symlinked_file_is_written_where_it_points(monkeypatch, tmp_path):
    real = write(tmp_path / "dotfiles" / "mesh.yaml", {"contexts": [{"name": "a", "endpoint": "a:1"}]})
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    monkeypatch.setenv("MESHCONFIG", str(link))
    with meshconfig.editing() as cfg:
        cfg.current = "a"
    assert link.is_symlink() and yaml.safe_load(real.read_text())["current-context"] == "a"


def test_editing_writes_nothing_when_the_body_fails_or_changes_nothing():
    path = meshconfig.config_path()
    with pytest.raises(RuntimeError):
        with meshconfig.editing() as cfg:
            cfg.contexts["a"] = Context(name="a", endpoint="a:1")
            raise RuntimeError("boom")
    assert not path.exists()
    with meshconfig.editing():
        pass
    assert not path.exists()


def test_concurrent_edits_lose_nothing():
    def add(i):
        with meshconfig.editing() as cfg:
            cfg.contexts[f"c{i}"] = Context(name=f"c{i}", endpoint=f"h:{i}")
    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(meshconfig.load().contexts) == sorted(f"c{i}" for i in range(8))


@pytest.mark.parametrize("doc, field, words", [
    ("{not yaml", "", "not valid YAML"),
    ("- a\n- b\n", "", "must be a mapping"),
    ({"contexts": [], "users": []}, "users", "unknown field"),
    ({"apiVersion": "v2"}, "apiVersion", "not supported"),
    ({"kind": "Pod"}, "kind", "not supported"),
    ({"current-context": 3}, "current-context", "must be a context name"),
    ({"contexts": {"a": {}}}, "contexts", "must be a list"),
    ({"contexts": ["a"]}, "contexts[0]", "must be a mapping"),
    ({"contexts": [{"endpoint": "a:1"}]}, "contexts[0].name", "not a valid context name"),
    ({"contexts": [{"name": "has space", "endpoint": "a:1"}]}, "contexts[0].name", "allowed:"),
    ({"contexts": [{"name": "a", "endpoint": 5}]}, "contexts[0].endpoint", "must be a string"),
    ({"contexts": [{"name": "a", "server": "a:1"}]}, "contexts[0].server", "unknown field (allowed: name, endpoint"),
    ({"contexts": [{"name": "a"}, {"name": "a"}]}, "contexts[1].name", "appears twice"),
    ({"contexts": [{"name": "a", "token": "t", "token-file": "/f"}]}, "contexts[0].token", "exclusive"),
    ({"contexts": [{"name": "a", "cert": "/c"}]}, "contexts[0].key", "go together"),
])
def test_a_bad_file_names_the_file_and_the_field(doc, field, words):
    path = write(meshconfig.config_path(), doc)
    with pytest.raises(ConfigFileError) as info:
        meshconfig.load()
    assert info.value.path == str(path) and info.value.field == field
    assert str(info.value).startswith(f"{path}: ") and words in str(info.value)


def test_an_empty_file_is_an_empty_config():
    write(meshconfig.config_path(), "")
    cfg = meshconfig.load()
    assert cfg.contexts == {} and cfg.current == ""


def test_unknown_context_lists_the_known_ones():
    write(meshconfig.config_path(), {"contexts": [{"name": "staging", "endpoint": "s:1"},
                                                  {"name": "production", "endpoint": "p:1"}]})
    with pytest.raises(UnknownContextError) as info:
        meshconfig.load().get("prod", "--context")
    text = str(info.value)
    assert "'prod' (from --context)" in text and "known contexts: staging, production" in text
    assert str(meshconfig.config_path()) in text


def test_legacy_context_json_of_meshctl_up_is_read_as_local_then_replaced(tmp_path):
    legacy = tmp_path / "cfg" / "context.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"endpoint": "127.0.0.1:5000", "state_dir": "/st", "token": "t0"}))
    cfg = meshconfig.load()
    assert cfg.current == "local"
    assert cfg.contexts["local"] == Context(name="local", endpoint="127.0.0.1:5000", state_dir="/st", token="t0")
    with meshconfig.editing() as cfg:
        cfg.contexts["b"] = Context(name="b", endpoint="b:1")
    assert not legacy.exists()
    back = meshconfig.load()
    assert list(back.contexts) == ["local", "b"] and back.current == "local"
    assert stat.S_IMODE(meshconfig.config_path().stat().st_mode) == 0o600


def test_legacy_context_json_of_set_context_is_read_as_default(tmp_path):
    legacy = tmp_path / "cfg" / "context.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"endpoint": "cp:1", "ca": "/pki/ca.crt"}))
    cfg = meshconfig.load()
    assert cfg.current == "default" and cfg.contexts["default"].ca == "/pki/ca.crt"


def test_legacy_file_is_ignored_once_config_yaml_exists_or_with_meshconfig(monkeypatch, tmp_path):
    legacy = tmp_path / "cfg" / "context.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"endpoint": "old:1"}))
    monkeypatch.setenv("MESHCONFIG", str(tmp_path / "explicit.yaml"))
    assert meshconfig.load().contexts == {}
    monkeypatch.delenv("MESHCONFIG")
    write(meshconfig.config_path(), {"contexts": [{"name": "new", "endpoint": "new:1"}]})
    assert list(meshconfig.load().contexts) == ["new"]


def test_a_broken_legacy_file_names_it(tmp_path):
    legacy = tmp_path / "cfg" / "context.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text("{not json")
    with pytest.raises(ConfigFileError, match="context.json"):
        meshconfig.load()


def test_to_doc_redacts_tokens_only():
    ctx = Context(name="a", endpoint="a:1", token="s3cret", ca="/ca", cert="/c", key="/k")
    assert ctx.to_doc(redact=True) == {"name": "a", "endpoint": "a:1", "ca": "/ca", "cert": "/c", "key": "/k",
                                       "token": "REDACTED"}
    assert ctx.to_doc()["token"] == "s3cret"


def test_check_name():
    assert meshconfig.check_name("kind-lab.eu/ops@prod:1") == "kind-lab.eu/ops@prod:1"
    for bad in ("", " a", "a b", "-a", "x" * 300, None):
        with pytest.raises(ValueError, match="allowed"):
            meshconfig.check_name(bad)


def test_a_yaml_error_near_a_token_does_not_echo_it(tmp_path):
    """PyYAML's message quotes the offending line: a hand-edited file broken on its token line printed the
    token with every meshctl command."""
    path = tmp_path / "config.yaml"
    path.write_text("contexts:\n- name: a\n  endpoint: h:1\n  token: s3cr3t-token-value: x\n")
    with pytest.raises(meshconfig.ConfigFileError) as e:
        meshconfig.load(path)
    assert "s3cr3t" not in str(e.value) and "not valid YAML at line 4" in str(e.value)
