"""Validation of models for the registry (controlplane/serving/validate.py): every bad input is refused
with an error naming the field and what is allowed; a good one comes back with its derived facts."""

from __future__ import annotations

import asyncio
import os

import pytest

from controlplane.state import keys
from controlplane.state.follower import Follower
from controlplane.serving.validate import validate
from controlplane.controllers.standby import READS
from controlplane.state.store import Snapshot
from gpumesh.v1 import model_service_pb2 as M
from mesh import errors, gpumodels
from tests.models_util import TINY_KV_F16, TINY_WEIGHT_BYTES, write_hf_dir, write_tiny_gguf

FLEET = [gpumodels.get_model("H100-80GB"), gpumodels.get_model("L4")]


@pytest.fixture
def files(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    hf = write_hf_dir(tmp_path / "hf", weights=200 << 20)
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    return {"gguf": str(gguf), "hf": str(hf), "text": str(text), "dir": str(tmp_path)}


def gguf_variant(path: str, **kw) -> M.Variant:
    v = M.Variant(name="f16", backend=M.BACKEND_LLAMA_CPP, artifact=path, quantization="F16",
                  weight_bytes=TINY_WEIGHT_BYTES, max_context=256,
                  architecture=M.Architecture(name="llama", block_count=2, embedding_length=64, head_count=4,
                                              head_count_kv=2))
    for k, val in kw.items():
        setattr(v, k, val)
    return v


def hf_variant(path: str, **kw) -> M.Variant:
    v = M.Variant(name="bf16", backend=M.BACKEND_VLLM, artifact=path, weight_bytes=100 << 20, max_context=8192,
                  kv_bytes_per_token=23040, fallback_rank=1)
    for k, val in kw.items():
        setattr(v, k, val)
    return v


def test_a_good_model_gets_its_derived_facts(files):
    m = validate(M.Model(name="tiny", family="llama", variants=[gguf_variant(files["gguf"]),
                                                                hf_variant("file://" + files["hf"])]), FLEET)
    v, w = m.variants
    assert v.kv_bytes_per_token == TINY_KV_F16 and v.kv_cache_type == "f16"
    assert v.artifact_format == M.ARTIFACT_FORMAT_GGUF_FILE and w.artifact_format == M.ARTIFACT_FORMAT_HF_DIRECTORY
    e = v.vram
    assert (e.context, e.concurrency) == (256, 1)
    assert e.kv_cache_bytes == TINY_KV_F16 * 256 and e.weight_bytes == TINY_WEIGHT_BYTES
    assert e.total_bytes == (1 << 30) + (1 << 20)   # 1 GiB of llama.cpp overhead + 68 KiB, rounded up to a MiB
    assert [(s.gpu_model, s.mig_profile, s.fits) for s in e.slices] == [("H100-80GB", "1g.10gb", True),
                                                                         ("L4", "", True)]
    assert w.vram.overhead_bytes == (512 << 20) + (2 << 30)


def test_no_fleet_means_the_whole_catalog(files):
    m = validate(M.Model(name="tiny", variants=[gguf_variant(files["gguf"])]), [])
    assert [s.gpu_model for s in m.variants[0].vram.slices] == gpumodels.model_names()


BAD = [
    # (case, variant mutation or model mutation, wanted error, field, text in the message)
    ("bad model name", {"model": {"name": "a b"}}, errors.InvalidArgument, "model.name", "letters, digits"),
    ("no variants", {"model": {"variants": []}}, errors.InvalidArgument, "model.variants", "at least one"),
    ("unknown backend", {"backend": 7}, errors.InvalidArgument, "model.variants[0].backend", "llama.cpp, vllm"),
    ("no backend", {"backend": 0}, errors.InvalidArgument, "model.variants[0].backend", "is required"),
    ("missing artifact", {"artifact": "{dir}/missing.gguf"}, errors.InvalidArgument, "model.variants[0].artifact",
     "does not exist"),
    ("no artifact", {"artifact": ""}, errors.InvalidArgument, "model.variants[0].artifact", "is required"),
    ("relative artifact", {"artifact": "tiny.gguf"}, errors.InvalidArgument, "model.variants[0].artifact",
     "not an absolute path"),
    ("remote artifact", {"artifact": "https://example.org/m.gguf"}, errors.InvalidArgument,
     "model.variants[0].artifact", "scheme 'https'"),
    ("NUL in artifact", {"artifact": "/a\0b"}, errors.InvalidArgument, "model.variants[0].artifact", "printable"),
    ("not a GGUF", {"artifact": "{text}"}, errors.InvalidArgument, "model.variants[0].artifact",
     "not a GGUF file"),
    ("llama.cpp with a directory", {"artifact": "{hf}"}, errors.InvalidArgument, "model.variants[0].artifact",
     "is a directory"),
    ("vllm with a GGUF", {"backend": M.BACKEND_VLLM, "kv_bytes_per_token": 0}, errors.InvalidArgument,
     "model.variants[0].artifact", "is a file, not a Hugging Face-format directory"),
    ("format the backend does not load", {"artifact_format": M.ARTIFACT_FORMAT_HF_DIRECTORY},
     errors.InvalidArgument, "model.variants[0].artifact_format", "llama.cpp does not load a Hugging Face"),
    ("negative weights", {"weight_bytes": -5}, errors.InvalidArgument, "model.variants[0].weight_bytes",
     "-5 is negative"),
    ("no weights", {"weight_bytes": 0}, errors.InvalidArgument, "model.variants[0].weight_bytes", "is required"),
    ("weights beyond the file", {"weight_bytes": 10 << 20}, errors.InvalidArgument,
     "model.variants[0].weight_bytes", "more than the artifact holds"),
    ("negative kv", {"kv_bytes_per_token": -1}, errors.InvalidArgument, "model.variants[0].kv_bytes_per_token",
     "-1 is negative"),
    ("kv contradicting the architecture", {"kv_bytes_per_token": 999}, errors.InvalidArgument,
     "model.variants[0].kv_bytes_per_token", f"gives {TINY_KV_F16}"),
    ("negative context", {"max_context": -256}, errors.InvalidArgument, "model.variants[0].max_context",
     "is negative"),
    ("context beyond the maximum", {"context": 512}, errors.InvalidArgument, "model.variants[0].context",
     "0 (max_context) to 256"),
    ("negative concurrency", {"concurrency": -1}, errors.InvalidArgument, "model.variants[0].concurrency",
     "out of range"),
    ("negative layers", {"architecture": M.Architecture(block_count=-2)}, errors.InvalidArgument,
     "model.variants[0].architecture.block_count", "is negative"),
    ("absurd layer count", {"architecture": M.Architecture(block_count=2**31 - 1, head_count=4,
                                                          embedding_length=64)}, errors.InvalidArgument,
     "model.variants[0].architecture.block_count", "0 (unknown) to 4096"),
    ("no architecture, no kv", {"architecture": M.Architecture()}, errors.InvalidArgument,
     "model.variants[0].kv_bytes_per_token", "lacks block_count"),
    ("unknown kv cache type", {"kv_cache_type": "int3"}, errors.InvalidArgument,
     "model.variants[0].kv_cache_type", "f16"),
    ("unknown GPU model measured", {"measured": {"RTX-9999": M.Measurement(tokens_per_second=1)}},
     errors.InvalidArgument, "model.variants[0].measured['RTX-9999']", "H100-80GB"),
    ("negative measurement", {"measured": {"H100": M.Measurement(tokens_per_second=-1)}}, errors.InvalidArgument,
     "model.variants[0].measured['H100'].tokens_per_second", "finite number >= 0"),
    ("NaN TTFT p95", {"measured": {"cpu": M.Measurement(ttft_p95_seconds=float("nan"))}}, errors.InvalidArgument,
     "model.variants[0].measured['cpu'].ttft_p95_seconds", "finite number >= 0"),
    ("negative requests", {"measured": {"cpu": M.Measurement(requests=-2)}}, errors.InvalidArgument,
     "model.variants[0].measured['cpu'].requests", "0 or more"),
    ("unknown measured backend", {"measured": {"cpu": M.Measurement(backend="tgi")}}, errors.InvalidArgument,
     "model.variants[0].measured['cpu'].backend", "llama.cpp, vllm"),
    ("bad variant name", {"name": "-x"}, errors.InvalidArgument, "model.variants[0].name", "letters, digits"),
    # these were ValueErrors, answered INTERNAL
    ("a NUL in a file URI", {"artifact": "file:///tmp/x%00.gguf"}, errors.InvalidArgument,
     "model.variants[0].artifact", "embedded null byte"),
    ("a file URI that does not parse", {"artifact": "file://[x/m.gguf"}, errors.InvalidArgument,
     "model.variants[0].artifact", "Invalid IPv6 URL"),
]


@pytest.mark.parametrize("case,change,err,field,text", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_field(files, case, change, err, field, text):
    m = M.Model(name="tiny", variants=[gguf_variant(files["gguf"])])
    for k, val in change.pop("model", {}).items():
        if k == "variants":
            del m.variants[:]
        else:
            setattr(m, k, val)
    for k, val in change.items():
        v = m.variants[0]
        if k == "measured":
            for key, fig in val.items():
                v.measured[key].CopyFrom(fig)
        elif k == "architecture":
            v.architecture.CopyFrom(val)
        else:
            setattr(v, k, val.format(**files) if isinstance(val, str) else val)
    with pytest.raises(err) as e:
        validate(m, FLEET)
    assert e.value.field == field, e.value.message
    assert text in e.value.message


def test_duplicate_variant_names_and_ranks(files):
    with pytest.raises(errors.InvalidArgument) as e:
        validate(M.Model(name="m", variants=[gguf_variant(files["gguf"]), gguf_variant(files["gguf"],
                                                                                        fallback_rank=1)]), FLEET)
    assert e.value.field == "model.variants[1].name" and "also variants[0]'s name" in e.value.message
    with pytest.raises(errors.InvalidArgument) as e:
        validate(M.Model(name="m", variants=[gguf_variant(files["gguf"]), gguf_variant(files["gguf"], name="b")]),
                 FLEET)
    assert e.value.field == "model.variants[1].fallback_rank" and "distinct ranks per backend" in e.value.message


def test_variants_of_one_rank_on_different_backends_are_one_pool(files):
    """The same weights on llama.cpp and on vLLM at rank 0 are equals (the gateway pools their deployments)."""
    m = validate(M.Model(name="m", variants=[gguf_variant(files["gguf"]), hf_variant(files["hf"], name="hf", fallback_rank=0)]),
                 FLEET)
    assert [v.fallback_rank for v in m.variants] == [0, 0]


def test_measurements_are_keyed_by_canonical_gpu_model(files):
    v = gguf_variant(files["gguf"])
    v.measured["h100"].CopyFrom(M.Measurement(tokens_per_second=95.0, ttft_seconds=0.02, load_seconds=1.1))
    v.measured["CPU"].CopyFrom(M.Measurement(tokens_per_second=40.0))
    m = validate(M.Model(name="m", variants=[v]), FLEET)
    assert sorted(m.variants[0].measured) == ["H100-80GB", "cpu"]
    assert m.variants[0].measured["H100-80GB"].tokens_per_second == 95.0


def test_a_variant_too_large_for_every_slice_is_refused(tmp_path):
    """200 GiB of weights (a sparse file behind a real GGUF header) fit no slice of an H100 or L4 fleet."""
    path = write_tiny_gguf(tmp_path / "huge.gguf")
    os.truncate(path, 201 << 30)
    v = gguf_variant(str(path), weight_bytes=200 << 30)
    with pytest.raises(errors.FailedPrecondition) as e:
        validate(M.Model(name="huge", variants=[v]), FLEET)
    msg = e.value.message
    assert "model.variants[0] (f16) needs 201GiB" in msg and "weights 200GiB" in msg
    assert "largest slice of any GPU model in the fleet: 79.6GiB (H100-80GB)" in msg
    # 130 GiB: an H200 in the fleet holds it (7g.141gb)
    v.weight_bytes = 130 << 30
    m = validate(M.Model(name="huge", variants=[v]), FLEET + [gpumodels.get_model("H200-141GB")])
    assert [s.mig_profile for s in m.variants[0].vram.slices if s.fits] == ["7g.141gb"]


def test_the_registry_is_read_on_standbys():
    """A model record in etcd shows through the standby's ModelService Get/List (controlplane/state/follower.py)."""
    assert READS["ModelService"] == frozenset({"Get", "List"})
    m = M.Model(name="smol", family="smollm2", generation=1, variants=[M.Variant(name="q4_1")])

    class Store:
        async def load(self, prefix=keys.PREFIX):
            return Snapshot(revision=5, kvs={keys.model("smol"): (m.SerializeToString(), 5, 0)})

    async def main():
        f = Follower(Store())
        await f._load()
        svc = f.reader("ModelService")
        assert (await svc.Get(M.GetModelRequest(name="smol"), None)).family == "smollm2"
        f.apply(False, keys.model("other").decode(), M.Model(name="other").SerializeToString(), 6)
        assert [x.name for x in (await svc.List(M.ListModelsRequest(), None)).models] == ["other", "smol"]
        f.apply(True, keys.model("smol").decode(), b"", 7)
        assert [x.name for x in (await svc.List(M.ListModelsRequest(), None)).models] == ["other"]
    asyncio.run(main())


def test_reads_answer_the_smallest_slices_of_the_fleet_as_it_is(files):
    """Stored against an H100 + L4 fleet; read after an H200 node joined and the L4 left."""
    from types import SimpleNamespace

    from controlplane.serving.registry import ModelRegistry
    stored = validate(M.Model(name="tiny", variants=[gguf_variant(files["gguf"])]), FLEET)
    ctl = SimpleNamespace(fleet=SimpleNamespace(nodes={}))
    r = ModelRegistry(ctl)
    assert r.view(stored) is stored                               # no node: as stored
    ctl.fleet.nodes = {"a": SimpleNamespace(gpus=[SimpleNamespace(model=gpumodels.get_model("H100-80GB"))]),
                       "b": SimpleNamespace(gpus=[SimpleNamespace(model=gpumodels.get_model("H200-141GB"))])}
    seen = r.view(stored)
    assert [(s.gpu_model, s.mig_profile) for s in seen.variants[0].vram.slices] == [("H100-80GB", "1g.10gb"),
                                                                                     ("H200-141GB", "1g.18gb")]
    assert [s.gpu_model for s in stored.variants[0].vram.slices] == ["H100-80GB", "L4"]     # the record unchanged
    assert seen.variants[0].vram.total_bytes == stored.variants[0].vram.total_bytes


def test_a_model_or_variant_that_deployments_run_cannot_be_deleted(files):
    """Their replicas would no longer be replaceable (a crash, a lost node, a scale-up): refused, naming them."""
    from types import SimpleNamespace

    from controlplane.serving.registry import ModelRegistry
    from gpumesh.v1 import deployment_service_pb2 as D

    writes = []

    async def write(ops, conds=()):
        writes.append(ops)
        return 1
    deployments = {"chat": D.Deployment(spec=D.DeploymentSpec(name="chat", model="tiny", variant="f16"))}
    ctl = SimpleNamespace(fleet=SimpleNamespace(nodes={}), writer=SimpleNamespace(write=write),
                          deployments=SimpleNamespace(store=SimpleNamespace(deployments=deployments)))
    r = ModelRegistry(ctl, check_artifacts=False)
    r.models["tiny"] = validate(M.Model(name="tiny", generation=1, variants=[gguf_variant(files["gguf"])]), FLEET)

    async def main():
        with pytest.raises(errors.FailedPrecondition, match="in use by deployment.*chat"):
            await r.delete("tiny")
        other = gguf_variant(files["gguf"], name="q8", fallback_rank=1)
        with pytest.raises(errors.FailedPrecondition, match=r"model.variants: .*chat \(f16\)"):
            await r.update(M.Model(name="tiny", variants=[other]))
        assert "tiny" in r.models and not writes                     # nothing changed
        both = await r.update(M.Model(name="tiny", variants=[gguf_variant(files["gguf"]), other]))
        assert [v.name for v in both.variants] == ["f16", "q8"]      # keeping the variant in use is fine
        del deployments["chat"]
        assert (await r.delete("tiny")).name == "tiny" and "tiny" not in r.models
    asyncio.run(main())


def test_an_update_at_a_negative_generation_is_invalid_argument_naming_it(files):
    """It was ABORTED ("is at generation 1, not -1"), read as a conflict to retry, after the artifact was read."""
    from types import SimpleNamespace

    from controlplane.serving.registry import ModelRegistry

    async def write(ops, conds=()):
        raise AssertionError("nothing is written")
    ctl = SimpleNamespace(fleet=SimpleNamespace(nodes={}), writer=SimpleNamespace(write=write))
    r = ModelRegistry(ctl, check_artifacts=False)
    r.models["tiny"] = validate(M.Model(name="tiny", generation=1, variants=[gguf_variant(files["gguf"])]), FLEET)
    with pytest.raises(errors.InvalidArgument) as e:
        asyncio.run(r.update(M.Model(name="tiny", generation=-1, variants=[gguf_variant(files["gguf"])])))
    assert e.value.field == "model.generation"


def test_an_update_that_deployments_settings_no_longer_fit_is_refused(files):
    """Only a dropped variant was refused: a variant updated to a max_context below a deployment's context was
    written, and that deployment's replicas could no longer start (each start refused its settings)."""
    from types import SimpleNamespace

    from controlplane.serving.registry import ModelRegistry
    from gpumesh.v1 import deployment_service_pb2 as D

    writes = []

    async def write(ops, conds=()):
        writes.append(ops)
        return 1
    spec = D.DeploymentSpec(name="chat", model="tiny", variant="f16")
    spec.backend.context = 256
    big = D.DeploymentSpec(name="big", model="tiny", variant="f16")
    big.backend.context = 1000                  # refused before the update already: not the update's doing
    ctl = SimpleNamespace(fleet=SimpleNamespace(nodes={}), writer=SimpleNamespace(write=write),
                          deployments=SimpleNamespace(store=SimpleNamespace(deployments={
                              "chat": D.Deployment(spec=spec), "big": D.Deployment(spec=big)})))
    r = ModelRegistry(ctl, check_artifacts=False)
    r.models["tiny"] = validate(M.Model(name="tiny", generation=1, variants=[gguf_variant(files["gguf"])]), FLEET)

    async def main():
        with pytest.raises(errors.FailedPrecondition, match=r"chat \(f16\): spec.backend.context: 256") as e:
            await r.update(M.Model(name="tiny", variants=[gguf_variant(files["gguf"], max_context=128)]))
        assert "big" not in str(e.value)
        assert not writes and r.models["tiny"].variants[0].max_context == 256
        same = await r.update(M.Model(name="tiny", variants=[gguf_variant(files["gguf"], max_context=512)]))
        assert same.generation == 2 and len(writes) == 1           # one that still fits it is written
    asyncio.run(main())


def test_an_update_naming_a_nul_in_its_artifact_is_invalid_argument(files):
    """Update compared the artifact with the registered one first (realpath): a ValueError, answered INTERNAL."""
    from types import SimpleNamespace

    from controlplane.serving.registry import ModelRegistry
    r = ModelRegistry(SimpleNamespace(fleet=SimpleNamespace(nodes={})))
    r.models["tiny"] = validate(M.Model(name="tiny", generation=1, variants=[gguf_variant(files["gguf"])]), FLEET)
    with pytest.raises(errors.InvalidArgument) as e:
        asyncio.run(r.update(M.Model(name="tiny", variants=[gguf_variant("file:///tmp/x%00.gguf")])))
    assert e.value.field == "model.variants[0].artifact"


def test_a_variant_named_only_in_a_scaling_policy_cannot_be_dropped(files):
    """The in-use check looked at each deployment's own variant only: an update dropping the overflow variant its
    scaling policy names was written, and the autoscaler's companion of that variant could then never start."""
    from types import SimpleNamespace

    from controlplane.serving.registry import ModelRegistry
    from gpumesh.v1 import deployment_service_pb2 as D
    from gpumesh.v1 import scaling_pb2 as S

    writes = []

    async def write(ops, conds=()):
        writes.append(ops)
        return 1
    spec = D.DeploymentSpec(name="chat", model="tiny", variant="f16",
                            scaling=S.ScalingPolicy(max_replicas=4, target=2, variants=["q8"]))
    ctl = SimpleNamespace(fleet=SimpleNamespace(nodes={}), writer=SimpleNamespace(write=write),
                          deployments=SimpleNamespace(store=SimpleNamespace(deployments={
                              "chat": D.Deployment(spec=spec)})))
    r = ModelRegistry(ctl, check_artifacts=False)
    f16 = gguf_variant(files["gguf"])
    q8 = gguf_variant(files["gguf"], name="q8", fallback_rank=1)
    q4 = gguf_variant(files["gguf"], name="q4", fallback_rank=2)
    r.models["tiny"] = validate(M.Model(name="tiny", generation=1, variants=[f16, q8, q4]), FLEET)

    async def main():
        with pytest.raises(errors.FailedPrecondition, match=r"model.variants: .*chat \(q8\).*scaling policy") as e:
            await r.update(M.Model(name="tiny", variants=[f16, q4]))       # q8: named only in chat's policy
        assert e.value.code.name == "FAILED_PRECONDITION" and not writes
        assert [v.name for v in r.models["tiny"].variants] == ["f16", "q8", "q4"]
        kept = await r.update(M.Model(name="tiny", variants=[f16, q8]))    # q4: no deployment can run it
        assert [v.name for v in kept.variants] == ["f16", "q8"] and len(writes) == 1
    asyncio.run(main())
