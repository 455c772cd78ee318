"""The model registry on a real local cluster (etcd, the control plane, agents of H100, A100-40GB and L4
hosts), with tokens: register, get, list, update, delete through the SDK and meshctl; models survive a
restart of the control plane; a variant too large for every slice of the fleet is refused; tenants and
viewers read but cannot write."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import yaml

from gpumesh.v1 import model_service_pb2 as M
from mesh import errors
from tests.integration.conftest import HOSTS
from tests.integration.secure import TOKENS, client, start
from tests.models_util import TINY_KV_F16, TINY_WEIGHT_BYTES, smollm2_gguf, write_tiny_gguf

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    c = start(tmp_path_factory.mktemp("models"), HOSTS)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("artifacts") / "tiny.gguf")


@pytest.fixture
def admin(sc):
    with client(sc, "admin") as c:
        yield c
        for m in c.list_models():
            c.delete_model(m.name)


def meshctl(sc, *argv: str, who: str = "admin") -> tuple[int, str, str]:
    from tools.meshctl.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*argv, "--endpoint", sc.endpoint, "--token", TOKENS[who], "--ca", str(sc.tls_dir / "ca.crt")])
    return rc, out.getvalue(), err.getvalue()


def tiny_model(path, name="tiny", **kw) -> M.Model:
    v = M.Variant(name="f16", backend=M.BACKEND_LLAMA_CPP, artifact=str(path), weight_bytes=TINY_WEIGHT_BYTES,
                  max_context=256, architecture=M.Architecture(name="llama", block_count=2, embedding_length=64,
                                                               head_count=4, head_count_kv=2))
    for k, val in kw.items():
        setattr(v, k, val)
    return M.Model(name=name, family="tiny", labels={"tier": "test"}, variants=[v])


def test_register_get_list_update_delete(admin, tiny):
    m = admin.register_model(tiny_model(tiny))
    assert m.generation == 1 and m.HasField("created_at")
    v = m.variants[0]
    assert v.kv_bytes_per_token == TINY_KV_F16                 # derived from the architecture
    # the smallest slice on each GPU model of this fleet (H100, A100-40GB, L4), not the whole catalog
    assert [(s.gpu_model, s.mig_profile) for s in v.vram.slices] == [("A100-40GB", "1g.5gb"),
                                                                      ("H100-80GB", "1g.10gb"), ("L4", "")]
    assert admin.get_model("tiny") == m
    assert [x.name for x in admin.list_models()] == ["tiny"]
    assert [x.name for x in admin.list_models(family="other")] == []
    assert [x.name for x in admin.list_models(labels={"tier": "test"})] == ["tiny"]
    with pytest.raises(errors.AlreadyExists):
        admin.register_model(tiny_model(tiny))
    # update: a second variant (a longer serving context, 4 sequences), guarded by the generation
    m2 = admin.get_model("tiny")
    m2.variants.add().CopyFrom(tiny_model(tiny, concurrency=4, fallback_rank=1).variants[0])
    m2.variants[1].name = "f16-x4"
    got = admin.update_model(m2)
    assert got.generation == 2 and got.created_at == m.created_at
    assert got.variants[1].vram.kv_cache_bytes == TINY_KV_F16 * 256 * 4
    with pytest.raises(errors.Aborted, match="generation 2, not 1"):
        admin.update_model(m2)                                # m2 still says generation 1
    with pytest.raises(errors.NotFound):
        admin.update_model(tiny_model(tiny, name="nobody"))
    assert admin.delete_model("tiny").generation == 2
    with pytest.raises(errors.NotFound):
        admin.get_model("tiny")
    with pytest.raises(errors.NotFound):
        admin.delete_model("tiny")


def test_bad_input_is_refused_naming_the_field(admin, tiny, tmp_path):
    with pytest.raises(errors.InvalidArgument) as e:
        admin.register_model(tiny_model(tiny, backend=9))
    assert e.value.field == "model.variants[0].backend" and "llama.cpp, vllm" in e.value.message
    with pytest.raises(errors.InvalidArgument) as e:
        admin.register_model(tiny_model(tmp_path / "missing.gguf"))
    assert e.value.field == "model.variants[0].artifact" and "does not exist" in e.value.message
    with pytest.raises(errors.InvalidArgument) as e:
        admin.register_model(tiny_model(tiny, backend=M.BACKEND_VLLM))
    assert "not a Hugging Face-format directory" in e.value.message
    with pytest.raises(errors.InvalidArgument) as e:
        admin.register_model(tiny_model(tiny, weight_bytes=-1))
    assert e.value.field == "model.variants[0].weight_bytes" and "negative" in e.value.message
    assert admin.list_models() == []


def test_a_variant_too_large_for_the_fleet_is_refused(admin, tmp_path):
    """90 GiB of weights: more than the largest slice here (an H100's 79.6 GiB); 60 GiB fits only the H100."""
    path = write_tiny_gguf(tmp_path / "big.gguf")
    os.truncate(path, 91 << 30)                               # sparse: the header is real, the rest holes
    with pytest.raises(errors.FailedPrecondition) as e:
        admin.register_model(tiny_model(path, name="big", weight_bytes=90 << 30))
    assert "needs 91GiB" in e.value.message and "largest slice of any GPU model in the fleet: 79.6GiB (H100-80GB)" \
        in e.value.message
    m = admin.register_model(tiny_model(path, name="big", weight_bytes=60 << 30))
    assert [(s.gpu_model, s.mig_profile) for s in m.variants[0].vram.slices if s.fits] == [("H100-80GB", "7g.80gb")]


def test_tenants_and_viewers_read_but_cannot_write(sc, admin, tiny):
    admin.register_model(tiny_model(tiny))
    for who in ("team-a", "viewer-a"):
        with client(sc, who) as c:
            assert [m.name for m in c.list_models()] == ["tiny"]
            assert c.get_model("tiny").variants[0].name == "f16"
            for write in (lambda: c.register_model(tiny_model(tiny, name="mine")),
                          lambda: c.update_model(tiny_model(tiny)), lambda: c.delete_model("tiny")):
                with pytest.raises(errors.PermissionDenied, match="needs the admin role"):
                    write()
    assert [m.name for m in admin.list_models()] == ["tiny"]
    rc, _, err = meshctl(sc, "model", "delete", "tiny", who="team-a")
    assert rc == 1 and "needs the admin role" in err


def test_models_survive_a_control_plane_restart(sc, admin, tiny):
    before = admin.register_model(tiny_model(tiny))
    sc.restart_controlplane(kill=True)
    with client(sc, "admin", timeout=30) as c:
        assert c.get_model("tiny") == before
        assert c.update_model(c.get_model("tiny")).generation == 2     # and the new leader writes it


def test_meshctl_import_get_describe_register_delete(sc, admin, tiny, tmp_path):
    rc, out, err = meshctl(sc, "model", "import", str(tiny), "--name", "tiny", "-o", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["variants"][0]["name"] == "f16" and doc["variants"][0]["kv_bytes_per_token"] == TINY_KV_F16
    # a second variant of the same file: added to the model, after the first in the fallback order
    rc, out, err = meshctl(sc, "model", "import", str(tiny), "--name", "tiny", "--variant", "f16-long",
                           "--concurrency", "8", "-o", "json")
    assert rc == 0, err
    assert [(v["name"], v["fallback_rank"]) for v in json.loads(out)["variants"]] == [("f16", 0), ("f16-long", 1)]
    rc, out, _ = meshctl(sc, "model", "get")
    assert out.splitlines()[0].split()[:4] == ["MODEL", "VARIANT", "BACKEND", "QUANT"]
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["f16", "f16-long"]
    rc, out, _ = meshctl(sc, "get", "models", "-o", "wide")
    assert "SMALLEST SLICES" in out and "H100-80GB:1g.10gb" in out
    rc, out, _ = meshctl(sc, "model", "describe", "tiny", "--context", "128", "--concurrency", "2")
    assert rc == 0 and "Smallest slice per GPU model:" in out and "At 128 tokens x 2" in out
    # get -o yaml, edit, update -f: round trip
    rc, out, _ = meshctl(sc, "model", "get", "tiny", "-o", "yaml")
    doc = yaml.safe_load(out)
    doc["description"] = "edited"
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(doc))
    rc, out, err = meshctl(sc, "model", "update", "-f", str(f), "-o", "json")
    assert rc == 0, err
    assert json.loads(out)["description"] == "edited" and json.loads(out)["generation"] == 3
    rc, out, err = meshctl(sc, "model", "register", "-f", str(f))
    assert rc == 1 and "already exists" in err
    rc, out, _ = meshctl(sc, "model", "delete", "tiny")
    assert rc == 0 and out == "model/tiny deleted\n"
    rc, out, _ = meshctl(sc, "model", "get")
    assert out == "No models found.\n"


def test_meshctl_import_of_the_real_smollm2(sc, admin):
    path = smollm2_gguf()
    rc, out, err = meshctl(sc, "model", "import", str(path), "--name", "smollm2-135m", "-o", "json")
    assert rc == 0, err
    v = json.loads(out)["variants"][0]
    assert (v["backend"], v["quantization"], v["max_context"], v["kv_bytes_per_token"]) == \
        ("llama.cpp", "Q4_1", 8192, 23040)
    assert v["vram"]["kv_cache_bytes"] == 23040 * 8192
    assert {s["gpu_model"]: s["mig_profile"] for s in v["vram"]["slices"]}["H100-80GB"] == "1g.10gb"
