"""`meshctl config ...` and the global --context: every command on a temporary config file, the precedence
(--endpoint > $MESH_ENDPOINT > --context > $MESH_CONTEXT > current-context; credentials per key), redaction,
errors, the file's mode, and two real in-process gRPC control planes that show which one a command reached
and with which token."""

import json
import stat
from concurrent import futures

import grpc
import pytest
import yaml

from gpumesh.v1 import admin_service_pb2, admin_service_pb2_grpc, types_pb2
from mesh import meshconfig
from mesh.client import MeshClient
from mesh.context import UnknownContextError, resolve_auth, resolve_endpoint
from tools.meshctl.main import build_parser, main

ENV = ("MESH_ENDPOINT", "MESH_CONTEXT", "MESHCONFIG", "MESH_TOKEN", "MESH_CA", "MESH_CERT", "MESH_KEY",
       "XDG_CONFIG_HOME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPUMESH_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


class Admin(admin_service_pb2_grpc.AdminServiceServicer):
    """A control plane whose one node is named after it; records the bearer token of each call."""

    def __init__(self, name):
        self.name, self.tokens = name, []

    def ListNodes(self, request, context):
        md = dict(context.invocation_metadata())
        self.tokens.append(md.get("authorization", ""))
        return admin_service_pb2.ListNodesResponse(nodes=[types_pb2.Node(name=f"node-of-{self.name}")])


@pytest.fixture(scope="module")
def planes():
    out = {}
    for name in ("staging", "production"):
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        admin = Admin(name)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(admin, srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        srv.start()
        out[name] = (f"127.0.0.1:{port}", admin, srv)
    yield {k: v[:2] for k, v in out.items()}
    for _, _, srv in out.values():
        srv.stop(0)


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def nodes_reached(capsys, *argv):
    code, out, err = run(capsys, *argv, "get", "nodes", "-o", "json")
    assert code == 0, err
    return [n["name"] for n in json.loads(out)["items"]]


@pytest.fixture
def two(planes, capsys, tmp_path):
    """staging (a token file) and production (a token), production current."""
    tok = tmp_path / "staging.token"
    tok.write_text("staging-token\n")
    assert run(capsys, "config", "set-context", "staging", "--endpoint", planes["staging"][0],
               "--token-file", str(tok))[0] == 0
    assert run(capsys, "config", "set-context", "production", "--endpoint", planes["production"][0],
               "--token", "prod-token")[0] == 0
    assert run(capsys, "config", "use-context", "production")[0] == 0
    for _, admin in planes.values():
        admin.tokens.clear()
    return planes


def test_the_current_context_is_used_and_use_context_switches(two, capsys):
    assert nodes_reached(capsys) == ["node-of-production"]
    assert two["production"][1].tokens == ["Bearer prod-token"]
    code, out, _ = run(capsys, "config", "use-context", "staging")
    assert code == 0 and out == 'Switched to context "staging".\n'
    assert nodes_reached(capsys) == ["node-of-staging"]
    assert two["staging"][1].tokens == ["Bearer staging-token"]          # read from the token file
    assert run(capsys, "config", "current-context")[1] == "staging\n"


def test_context_flag_beats_environment_beats_current(two, capsys, monkeypatch):
    monkeypatch.setenv("MESH_CONTEXT", "staging")
    assert nodes_reached(capsys) == ["node-of-staging"]
    assert nodes_reached(capsys, "--context", "production") == ["node-of-production"]
    code, out, _ = run(capsys, "get", "nodes", "--context", "production", "-o", "json")   # after the command too
    assert code == 0 and "node-of-production" in out
    assert two["production"][1].tokens[-1] == "Bearer prod-token"


def test_endpoint_flag_and_environment_beat_the_context(two, capsys, monkeypatch):
    staging, production = two["staging"][0], two["production"][0]
    assert nodes_reached(capsys, "--endpoint", staging) == ["node-of-staging"]
    monkeypatch.setenv("MESH_ENDPOINT", staging)
    code, out, err = run(capsys, "--context", "production", "get", "nodes", "-o", "json")
    assert code == 0 and "node-of-staging" in out
    assert "$MESH_ENDPOINT" in err and "overrides the endpoint of context 'production'" in err
    assert nodes_reached(capsys, "--endpoint", production) == ["node-of-production"]


def test_credentials_flag_and_environment_beat_the_context(two, capsys, monkeypatch):
    nodes_reached(capsys, "--token", "flag-token")
    monkeypatch.setenv("MESH_TOKEN", "env-token")
    nodes_reached(capsys)
    nodes_reached(capsys, "--token", "flag-token-2")
    assert two["production"][1].tokens == ["Bearer flag-token", "Bearer env-token", "Bearer flag-token-2"]


def test_unknown_context_is_an_error_naming_it_and_the_known_ones(two, capsys, monkeypatch):
    code, _, err = run(capsys, "--context", "prod", "get", "nodes")
    assert code == 1
    assert "context 'prod' (from --context) does not exist" in err and "known contexts: staging, production" in err
    monkeypatch.setenv("MESH_CONTEXT", "stage")
    code, _, err = run(capsys, "get", "nodes")
    assert code == 1 and "'stage' (from $MESH_CONTEXT)" in err
    monkeypatch.setenv("MESH_ENDPOINT", two["staging"][0])       # even when the endpoint comes from elsewhere
    assert run(capsys, "get", "nodes")[0] == 1
    code, _, err = run(capsys, "config", "use-context", "prod")
    assert code == 1 and "known contexts: staging, production" in err


def test_library_precedence_and_sdk_from_context(two, monkeypatch):
    assert resolve_endpoint(None) == two["production"][0]
    assert resolve_endpoint(None, context="staging") == two["staging"][0]
    assert resolve_auth(context="staging") == {"token": "staging-token"}
    with MeshClient.from_context("staging", timeout=30) as mesh:
        assert [n.name for n in mesh.list_nodes()] == ["node-of-staging"]
    with MeshClient.from_context(timeout=30, token="sdk-token") as mesh:
        assert [n.name for n in mesh.list_nodes()] == ["node-of-production"]
    assert two["production"][1].tokens[-1] == "Bearer sdk-token"
    with pytest.raises(UnknownContextError, match="known contexts: staging, production"):
        MeshClient.from_context("nope")


def test_get_contexts_table_name_json_yaml(two, capsys):
    code, out, _ = run(capsys, "config", "get-contexts")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["CURRENT", "NAME", "ENDPOINT", "TLS", "AUTH"]
    assert lines[1].split() == ["staging", two["staging"][0], "no", "token-file"]
    assert lines[2].split() == ["*", "production", two["production"][0], "no", "token"]
    assert run(capsys, "config", "get-contexts", "-o", "name")[1] == "staging\nproduction\n"
    doc = json.loads(run(capsys, "config", "get-contexts", "-o", "json")[1])
    assert doc["current-context"] == "production"
    assert doc["contexts"][1] == {"name": "production", "endpoint": two["production"][0], "token": "REDACTED"}
    doc = yaml.safe_load(run(capsys, "config", "get-contexts", "staging", "-o", "yaml")[1])
    assert [c["name"] for c in doc["contexts"]] == ["staging"]
    code, _, err = run(capsys, "config", "get-contexts", "nope")
    assert code == 1 and "known contexts" in err


def test_view_redacts_unless_raw_and_minify_keeps_the_one_in_use(two, capsys):
    text = run(capsys, "config", "view")[1]
    assert "prod-token" not in text and "token: REDACTED" in text
    assert yaml.safe_load(text)["current-context"] == "production"
    raw = json.loads(run(capsys, "config", "view", "--raw", "-o", "json")[1])
    assert raw["contexts"][1]["token"] == "prod-token"
    mini = yaml.safe_load(run(capsys, "config", "view", "--minify", "--context", "staging")[1])
    assert [c["name"] for c in mini["contexts"]] == ["staging"]
    assert meshconfig.parse(raw, meshconfig.config_path()).contexts == meshconfig.load().contexts  # a valid file


def test_set_context_updates_only_the_fields_given(two, capsys, tmp_path):
    (tmp_path / "ca.crt").write_text("x")
    code, out, _ = run(capsys, "config", "set-context", "production", "--ca", str(tmp_path / "ca.crt"))
    assert code == 0 and out == 'Context "production" modified.\n'
    prod = meshconfig.load().contexts["production"]
    assert prod.ca == str(tmp_path / "ca.crt") and prod.token == "prod-token" and prod.endpoint == two["production"][0]
    run(capsys, "config", "set-context", "production", "--token-file", str(tmp_path / "staging.token"))
    prod = meshconfig.load().contexts["production"]
    assert prod.token == "" and prod.token_file == str(tmp_path / "staging.token")   # one replaces the other
    run(capsys, "config", "set-context", "production", "--ca", "")                      # an empty value removes
    assert meshconfig.load().contexts["production"].ca == ""


def test_set_context_paths_become_absolute(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(capsys, "config", "set-context", "lab", "--endpoint", "lab:1", "--cert", "pki/o.crt", "--key", "pki/o.key")
    lab = meshconfig.load().contexts["lab"]
    assert lab.cert == str(tmp_path / "pki" / "o.crt") and lab.key == str(tmp_path / "pki" / "o.key")


def test_set_context_without_name_keeps_the_old_single_context_usage(capsys):
    code, out, _ = run(capsys, "config", "set-context", "--endpoint", "cp.example:50051", "--token", "t")
    assert code == 0 and out == 'Context "default" created.\n'
    cfg = meshconfig.load()
    assert cfg.current == "default" and cfg.contexts["default"].endpoint == "cp.example:50051"
    run(capsys, "config", "set-context", "--endpoint", "cp2.example:50051")             # changes the current one
    assert meshconfig.load().contexts["default"].endpoint == "cp2.example:50051"
    assert resolve_endpoint(None) == "cp2.example:50051"


def test_set_context_without_name_works_on_the_chosen_context(capsys, monkeypatch):
    """`--context` / $MESH_CONTEXT choose the context set-context without NAME changes, as every command's."""
    run(capsys, "config", "set-context", "local", "--endpoint", "127.0.0.1:1")
    run(capsys, "config", "set-context", "prod", "--endpoint", "prod:1")
    monkeypatch.setenv("MESH_CONTEXT", "prod")
    code, out, _ = run(capsys, "config", "set-context", "--endpoint", "prod:2")
    assert code == 0 and out == 'Context "prod" modified.\n'
    monkeypatch.delenv("MESH_CONTEXT")
    run(capsys, "--context", "prod", "config", "set-context", "--endpoint", "prod:3")
    cfg = meshconfig.load()
    assert cfg.contexts["prod"].endpoint == "prod:3" and cfg.contexts["local"].endpoint == "127.0.0.1:1"


def test_the_first_context_becomes_current_later_ones_do_not(capsys):
    run(capsys, "config", "set-context", "a", "--endpoint", "a:1")
    run(capsys, "config", "set-context", "b", "--endpoint", "b:1")
    assert meshconfig.load().current == "a"


@pytest.mark.parametrize("argv, words", [
    (["config", "set-context", "new"], "--endpoint HOST:PORT is required to create it"),
    (["config", "set-context", "bad name", "--endpoint", "x:1"], "not a valid context name"),
    (["config", "set-context", "x", "--endpoint", "x:1", "--token", "t", "--token-file", "/f"], "exclusive"),
    (["config", "set-context", "x", "--endpoint", "x:1", "--cert", "/c"], "--key: cert and key go together"),
])
def test_set_context_errors(capsys, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == 1 and words in err
    assert not meshconfig.config_path().exists()


def test_delete_context_removes_only_it_and_unsets_current(two, capsys):
    code, out, _ = run(capsys, "config", "delete-context", "staging")
    assert code == 0 and out.startswith("deleted context staging from ")
    cfg = meshconfig.load()
    assert list(cfg.contexts) == ["production"] and cfg.current == "production"
    code, _, err = run(capsys, "config", "delete-context", "production")
    assert code == 0 and "removed the current context" in err
    assert meshconfig.load().current == ""
    code, _, err = run(capsys, "config", "current-context")
    assert code == 1 and "current-context is not set" in err
    code, _, err = run(capsys, "get", "nodes")
    assert code == 1 and "no control plane endpoint" in err
    assert run(capsys, "config", "delete-context", "production")[0] == 1


def test_rename_context_keeps_it_current(two, capsys):
    code, out, _ = run(capsys, "config", "rename-context", "production", "prod")
    assert code == 0 and out == 'Context "production" renamed to "prod".\n'
    cfg = meshconfig.load()
    assert list(cfg.contexts) == ["staging", "prod"] and cfg.current == "prod"
    assert cfg.contexts["prod"].name == "prod"
    assert nodes_reached(capsys) == ["node-of-production"]
    code, _, err = run(capsys, "config", "rename-context", "prod", "staging")
    assert code == 1 and "already exists" in err
    assert run(capsys, "config", "rename-context", "nope", "x")[0] == 1
    assert run(capsys, "config", "rename-context", "prod", "has space")[0] == 1


def test_the_file_stays_private(two, capsys, tmp_path):
    path = meshconfig.config_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "prod-token" in path.read_text()


def test_meshconfig_names_the_file(capsys, tmp_path, monkeypatch, planes):
    path = tmp_path / "ops" / "mesh.yaml"
    monkeypatch.setenv("MESHCONFIG", str(path))
    run(capsys, "config", "set-context", "staging", "--endpoint", planes["staging"][0])
    assert path.exists() and not (tmp_path / "cfg" / "config.yaml").exists()
    assert nodes_reached(capsys) == ["node-of-staging"]


def test_a_bad_file_is_a_clear_cli_error(capsys):
    path = meshconfig.config_path()
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"contexts": [{"name": "a", "endpoint": "a:1", "server": "x"}]}))
    for argv in (["get", "nodes"], ["config", "get-contexts"], ["config", "use-context", "a"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and err.startswith(f"error: {path}: contexts[0].server: unknown field"), err


def test_legacy_single_context_file_keeps_working(capsys, tmp_path, planes):
    legacy = tmp_path / "cfg" / "context.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"endpoint": planes["staging"][0], "token": "old-token"}))
    assert nodes_reached(capsys) == ["node-of-staging"]
    assert planes["staging"][1].tokens[-1] == "Bearer old-token"
    assert run(capsys, "config", "get-contexts", "-o", "name")[1] == "default\n"
    run(capsys, "config", "rename-context", "default", "staging")
    assert not legacy.exists() and meshconfig.load().current == "staging"


def test_commands_with_their_own_context_flag_take_the_global_one_before_their_name(capsys):
    args = build_parser().parse_args(["--context", "prod", "deploy", "m", "--context", "4096", "--replicas", "1"])
    assert args.mesh_context == "prod" and args.context == 4096
    with pytest.raises(SystemExit):
        build_parser().parse_args(["deploy", "m", "--context", "prod"])
    assert "put it before the command: meshctl --context NAME deploy" in capsys.readouterr().err


def test_every_config_command_has_help_with_examples(capsys):
    for cmd in ("get-contexts", "current-context", "use-context", "set-context", "delete-context",
                "rename-context", "view"):
        with pytest.raises(SystemExit) as exit_:
            main(["config", cmd, "--help"])
        assert exit_.value.code == 0
        assert "example" in capsys.readouterr().out


def test_up_refuses_to_take_over_a_remote_context_before_starting_anything(capsys, tmp_path):
    run(capsys, "config", "set-context", "prod", "--endpoint", "prod.example:50051", "--token", "t")
    code, _, err = run(capsys, "up", "--context-name", "prod", "--state-dir", str(tmp_path / "cluster"))
    assert code != 0 and "context 'prod' exists and is not a local cluster's" in err, err
    assert meshconfig.load().contexts["prod"].endpoint == "prod.example:50051"
    assert not (tmp_path / "cluster" / "etcd").exists()                 # nothing was started
