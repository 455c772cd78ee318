"""Validation of a Model for the registry, and the facts derived from it.

`validate(model, gpu_models)` returns a normalized copy (artifact format from the backend,
kv_bytes_per_token derived from the architecture when 0, measured figures keyed by canonical GPU
model, the VRAM estimate and smallest slice per GPU model) or raises:

- InvalidArgument naming the field (`model.variants[1].backend`) and what is allowed: bad names,
  unknown backend or KV cache type, negative sizes, a missing or unreadable artifact, an artifact that
  is not what the backend loads, facts that contradict each other or the artifact;
- FailedPrecondition when a variant fits no slice of any GPU model given (the fleet's), naming its
  need and the largest slice.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

from gpumesh.v1 import model_service_pb2 as M
from mesh import errors, gpumodels, labels
from mesh.models import artifact, digest, vram
from mesh.slicespec import MAX_LABELS
from mesh.units import format_size

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NAME_RULE = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_VARIANTS = 16
MAX_CONCURRENCY = 4096
MAX_TEXT = 1024
MAX_PATH = 4096
MAX_MEASURED = 64
CPU = "cpu"       # the measurements' key for runs without a GPU

BACKENDS = {M.BACKEND_LLAMA_CPP: "llama.cpp", M.BACKEND_VLLM: "vllm"}
BACKEND_FORMAT = {M.BACKEND_LLAMA_CPP: M.ARTIFACT_FORMAT_GGUF_FILE, M.BACKEND_VLLM: M.ARTIFACT_FORMAT_HF_DIRECTORY}
FORMAT_NAMES = {M.ARTIFACT_FORMAT_GGUF_FILE: "a GGUF file", M.ARTIFACT_FORMAT_HF_DIRECTORY: "a Hugging Face directory"}
# The architecture's numbers and their upper bounds (far beyond any model; they keep the derived sizes in int64).
ARCH_LIMITS = {"block_count": 4096, "embedding_length": 1 << 20, "head_count": 1 << 16, "head_count_kv": 1 << 16,
               "key_length": 1 << 16, "value_length": 1 << 16, "vocab_size": 1 << 24, "parameter_count": 1 << 50}


def _bad(path: str, problem: str, allowed: str = "") -> errors.InvalidArgument:
    return errors.InvalidArgument.of(path, problem, allowed)


def check_name(value: str, path: str) -> str:
    if not value:
        raise _bad(path, "is required", NAME_RULE)
    if not NAME_RE.match(value):
        raise _bad(path, f"{value!r} is not a valid name", NAME_RULE)
    return value


def _text(value: str, path: str, limit: int) -> None:
    if len(value) > limit or not value.isprintable():
        raise _bad(path, "is not valid text", f"printable, at most {limit} characters")


def _not_negative(value: int, path: str, allowed: str) -> None:
    if value < 0:
        raise _bad(path, f"{value} is negative", allowed)


def validate(model: M.Model, gpu_models: Iterable[gpumodels.GpuModel], check_artifacts: bool = True) -> M.Model:
    """The normalized model with its derived facts; InvalidArgument / FailedPrecondition as above."""
    m = M.Model()
    m.CopyFrom(model)
    check_name(m.name, "model.name")
    _text(m.family, "model.family", 63)
    _text(m.description, "model.description", MAX_TEXT)
    labels.check(m.labels, "model.labels", MAX_LABELS)
    if not m.variants:
        raise _bad("model.variants", "is empty", "at least one variant")
    if len(m.variants) > MAX_VARIANTS:
        raise _bad("model.variants", f"{len(m.variants)} variants", f"at most {MAX_VARIANTS}")
    fleet = list(gpu_models) or list(gpumodels.MODELS.values())
    names: dict[str, int] = {}
    ranks: dict[tuple[int, str], int] = {}
    for i, v in enumerate(m.variants):
        path = f"model.variants[{i}]"
        _variant(v, path, fleet, check_artifacts)
        if v.name in names:
            raise _bad(f"{path}.name", f"{v.name!r} is also variants[{names[v.name]}]'s name",
                       "a name unique within the model")
        names[v.name] = i
        # variants of one rank are equals the gateway pools (e.g. the same weights on llama.cpp and on vLLM);
        # two of one rank on the same backend would be the same thing twice
        same = ranks.setdefault((v.fallback_rank, v.backend), i)
        if same != i:
            raise _bad(f"{path}.fallback_rank", f"{v.fallback_rank} is also variants[{same}]'s rank on the "
                       f"same backend {M.Backend.Name(v.backend)}", "distinct ranks per backend (0 first, larger later; "
                       "variants of one rank on different backends are served as one pool)")
    return m


def _variant(v: M.Variant, path: str, fleet: list[gpumodels.GpuModel], check_artifacts: bool) -> None:
    check_name(v.name, f"{path}.name")
    if v.backend not in BACKENDS:
        raise _bad(f"{path}.backend", f"unknown backend {v.backend}" if v.backend else "is required",
                   ", ".join(BACKENDS.values()))
    backend = BACKENDS[v.backend]
    want = BACKEND_FORMAT[v.backend]
    if v.artifact_format == M.ARTIFACT_FORMAT_UNSPECIFIED:
        v.artifact_format = want
    elif v.artifact_format != want:
        got = FORMAT_NAMES.get(v.artifact_format, f"format {v.artifact_format}")
        raise _bad(f"{path}.artifact_format", f"{backend} does not load {got}", f"{FORMAT_NAMES[want]} for {backend}")
    if not v.artifact:
        raise _bad(f"{path}.artifact", "is required",
                   f"{FORMAT_NAMES[want]} for {backend}: an absolute path or file:// URI")
    _text(v.artifact, f"{path}.artifact", MAX_PATH)
    _text(v.quantization, f"{path}.quantization", 32)
    try:
        vram.kv_type_bytes(v.kv_cache_type)
    except ValueError:
        raise _bad(f"{path}.kv_cache_type", f"unknown KV cache type {v.kv_cache_type!r}",
                   ", ".join(vram.KV_TYPE_BYTES)) from None
    v.kv_cache_type = (v.kv_cache_type or vram.DEFAULT_KV_TYPE).lower()
    a = v.architecture
    _text(a.name, f"{path}.architecture.name", 63)
    for f, limit in ARCH_LIMITS.items():
        if not 0 <= getattr(a, f) <= limit:
            raise _bad(f"{path}.architecture.{f}", f"{getattr(a, f)} is " + ("negative" if getattr(a, f) < 0 else
                       "out of range"), f"0 (unknown) to {limit}")
    if v.weight_bytes <= 0:
        raise _bad(f"{path}.weight_bytes", f"{v.weight_bytes} is negative" if v.weight_bytes else "is required",
                   "the weights' bytes as loaded, > 0 (meshctl model import reads them from the artifact)")
    _not_negative(v.kv_bytes_per_token, f"{path}.kv_bytes_per_token", "0 (derive from the architecture) or more")
    if v.max_context <= 0:
        raise _bad(f"{path}.max_context", f"{v.max_context} is negative" if v.max_context else "is required",
                   "the longest context the model supports, in tokens, > 0")
    if not 0 <= v.context <= v.max_context:
        raise _bad(f"{path}.context", f"{v.context} is out of range", f"0 (max_context) to {v.max_context}")
    if not 0 <= v.concurrency <= MAX_CONCURRENCY:
        raise _bad(f"{path}.concurrency", f"{v.concurrency} is out of range", f"0 (1) to {MAX_CONCURRENCY}")
    _not_negative(v.fallback_rank, f"{path}.fallback_rank", "0 (first) or more")
    _kv(v, path)
    _measured(v, path)
    v.artifact_sha256 = v.artifact_sha256.lower()
    if v.artifact_sha256 and not digest.HEX_RE.match(v.artifact_sha256):
        raise _bad(f"{path}.artifact_sha256", f"{v.artifact_sha256[:80]!r} is not a SHA-256",
                   "64 hex digits (sha256sum's output), or empty to have the registry compute it")
    if check_artifacts:
        _artifact(v, path, backend)
    _estimate(v, path, backend, fleet)


def _kv(v: M.Variant, path: str) -> None:
    a = v.architecture
    derived = 0
    if a.block_count and (a.head_count_kv or a.head_count) and (
            (a.key_length and a.value_length) or (a.head_count and a.embedding_length)):
        derived = vram.kv_bytes_of(a, v.kv_cache_type)
    if v.kv_bytes_per_token == 0:
        if not derived:
            raise _bad(f"{path}.kv_bytes_per_token", "is 0 and the architecture lacks block_count, head_count and "
                       "embedding_length (or key_length/value_length)",
                       "kv_bytes_per_token > 0, or the architecture (meshctl model import reads it from the GGUF)")
        v.kv_bytes_per_token = derived
    elif derived and derived != v.kv_bytes_per_token:
        raise _bad(f"{path}.kv_bytes_per_token", f"{v.kv_bytes_per_token} contradicts the architecture, which gives "
                   f"{derived} at a {v.kv_cache_type} cache", f"{derived}, or 0 to derive it")


def _measured(v: M.Variant, path: str) -> None:
    if len(v.measured) > MAX_MEASURED:
        raise _bad(f"{path}.measured", f"{len(v.measured)} entries", f"at most {MAX_MEASURED}")
    fixed = {}
    for key, fig in v.measured.items():
        where = f"{path}.measured[{key!r}]"
        if key.lower() == CPU:
            name = CPU
        else:
            try:
                name = gpumodels.get_model(key).name
            except KeyError:
                raise _bad(where, f"unknown GPU model {key!r}", ", ".join(gpumodels.model_names() + [CPU])) from None
        for f in ("tokens_per_second", "ttft_seconds", "load_seconds", "ttft_p95_seconds", "prompt_tokens_per_second"):
            x = getattr(fig, f)
            if math.isnan(x) or math.isinf(x) or x < 0:
                raise _bad(f"{where}.{f}", f"{x} is not a measurement", "a finite number >= 0")
        for f in ("context", "concurrency", "requests", "prompt_tokens", "max_tokens"):
            _not_negative(getattr(fig, f), f"{where}.{f}", "0 or more")
        _text(fig.note, f"{where}.note", MAX_TEXT)
        if fig.backend and fig.backend not in ("llama.cpp", "vllm"):
            raise _bad(f"{where}.backend", f"unknown backend {fig.backend!r}", "llama.cpp, vllm")
        fixed[name] = fig
    if list(fixed) != list(v.measured):
        copies = {k: M.Measurement() for k in fixed}
        for k, fig in fixed.items():
            copies[k].CopyFrom(fig)
        v.ClearField("measured")
        for k, fig in copies.items():
            v.measured[k].CopyFrom(fig)


def _artifact(v: M.Variant, path: str, backend: str) -> None:
    where = f"{path}.artifact"
    try:
        p = artifact.resolve(v.artifact)
        if v.artifact_format == M.ARTIFACT_FORMAT_GGUF_FILE:
            artifact.check_gguf(p)
        else:
            artifact.check_hf_dir(p)
        on_disk = artifact.size_on_disk(p)
    except artifact.ArtifactError as e:
        allowed = f"{FORMAT_NAMES[v.artifact_format]} that {backend} loads, as an absolute path or file:// URI"
        raise _bad(where, str(e), allowed) from None
    except OSError as e:
        raise _bad(where, f"cannot be read: {e.strerror}", "a readable path") from None
    except ValueError as e:     # a URI that does not parse ("file://[x"), a NUL in the path ("file:///m%00")
        raise _bad(where, f"is not a usable path or file:// URI: {e}", "an absolute path or file:// URI") from None
    if v.weight_bytes > on_disk:
        raise _bad(f"{path}.weight_bytes", f"{v.weight_bytes} is more than the artifact holds ({on_disk} bytes of "
                   f"weights on disk)", f"at most {on_disk}")


def pin_digests(m: M.Model) -> M.Model:
    """Each variant's artifact_sha256 set from its artifact (read whole: run it off the event loop, after
    `validate`); a digest given that the file does not have is FailedPrecondition."""
    for i, v in enumerate(m.variants):
        path = f"model.variants[{i}]"
        try:
            p = artifact.resolve(v.artifact)
            sha = digest.DIGESTS.of(p)
        except artifact.ArtifactError as e:
            raise _bad(f"{path}.artifact", str(e), "an absolute path or file:// URI") from None
        except OSError as e:
            raise _bad(f"{path}.artifact", f"cannot be read: {e.strerror}", "a readable path") from None
        except digest.DigestMismatch as e:
            raise _bad(f"{path}.artifact", str(e), "a GGUF file or a Hugging Face directory") from None
        except ValueError as e:     # (after DigestMismatch, a ValueError) a URI that does not parse, a NUL in it
            raise _bad(f"{path}.artifact", f"is not a usable path or file:// URI: {e}",
                       "an absolute path or file:// URI") from None
        if v.artifact_sha256 and v.artifact_sha256 != sha:
            raise errors.FailedPrecondition(
                f"{path}.artifact_sha256: the artifact {p} has SHA-256 {sha}, not {v.artifact_sha256} (the file "
                "is not the one meant; give its digest to accept it, or leave artifact_sha256 empty on Register)")
        v.artifact_sha256 = sha
    return m


def _estimate(v: M.Variant, path: str, backend: str, fleet: list[gpumodels.GpuModel]) -> None:
    need = vram.vram(backend, v.weight_bytes, v.kv_bytes_per_token, v.context or v.max_context, v.concurrency or 1)
    fits = vram.slices_for(need.total_bytes, fleet)
    if not any(f.fits for f in fits):
        biggest = max(fleet, key=vram.largest_slice_bytes)
        raise errors.FailedPrecondition(
            f"{path} ({v.name}) needs {format_size(need.total_bytes)} of GPU memory at context {need.context} x "
            f"{need.concurrency} (weights {format_size(need.weight_bytes)} + KV cache "
            f"{format_size(need.kv_cache_bytes)} + {backend} overhead {format_size(need.overhead_bytes)}), more "
            f"than the largest slice of any GPU model in the fleet: {format_size(vram.largest_slice_bytes(biggest))} "
            f"({biggest.name}); lower context or concurrency, or pick a smaller quantization")
    v.vram.CopyFrom(M.VramEstimate(
        context=need.context, concurrency=need.concurrency, weight_bytes=need.weight_bytes,
        kv_cache_bytes=need.kv_cache_bytes, overhead_bytes=need.overhead_bytes, total_bytes=need.total_bytes,
        slices=slice_fits(fits)))


def slice_fits(fits: list[vram.SliceFit]) -> list[M.SliceFit]:
    """vram.SliceFit values as the API's messages."""
    return [M.SliceFit(gpu_model=f.gpu_model, mig_profile=f.mig_profile, mig_memory_bytes=f.mig_memory_bytes,
                       mps_memory_bytes=f.mps_memory_bytes, mps_compute_share=f.mps_compute_share,
                       gpu_memory_bytes=f.gpu_memory_bytes, fits=f.fits) for f in fits]
