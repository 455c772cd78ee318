"""The model-registry part of the SDK (ModelService): register, get, list, update, delete models.

    with MeshClient(endpoint) as mesh:
        m = mesh.register_model(model_from_dict(yaml.safe_load(open("smollm2.yaml"))))
        m.variants[0].vram.total_bytes          # the VRAM need the control plane computed
        mesh.list_models(family="smollm2")
        mesh.delete_model("smollm2-135m")

`model_to_dict` is what `meshctl model get -o json|yaml` prints, and `model_from_dict` reads it back
(so `get -o yaml`, edit, `register -f`/`update` round-trips): enums as "llama.cpp"/"vllm" and
"gguf"/"hf", sizes as integers or strings like "90MiB". Mixed into `mesh.client.MeshClient`; errors
are the typed `mesh.errors` ones.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor as D
from google.protobuf import timestamp_pb2

from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import model_service_pb2_grpc

BACKENDS = {"llama.cpp": M.BACKEND_LLAMA_CPP, "vllm": M.BACKEND_VLLM}
BACKEND_ALIASES = {"": M.BACKEND_UNSPECIFIED, **BACKENDS, "llamacpp": M.BACKEND_LLAMA_CPP,
                   "llama-cpp": M.BACKEND_LLAMA_CPP,
                   "llama_cpp": M.BACKEND_LLAMA_CPP}
FORMATS = {"": M.ARTIFACT_FORMAT_UNSPECIFIED, "gguf": M.ARTIFACT_FORMAT_GGUF_FILE,
           "hf": M.ARTIFACT_FORMAT_HF_DIRECTORY}
BACKEND_NAMES = {v: k for k, v in BACKENDS.items()}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
# Register and Update hash the artifact in the control plane (about a second per GB): a large model outlasts
# the default deadline, and a call cut short by it would still register
DIGEST_TIMEOUT_S = 900.0


def _converting(fn):
    from mesh.client import _converting as conv
    return conv(fn)


class ModelApi:
    _channel: Any
    timeout: float

    @property
    def _modelsvc(self) -> model_service_pb2_grpc.ModelServiceStub:
        stub = self.__dict__.get("_model_stub")
        if stub is None:
            stub = self.__dict__["_model_stub"] = model_service_pb2_grpc.ModelServiceStub(self._channel)
        return stub

    def register_model(self, model: M.Model | dict) -> M.Model:
        """Add a model (admin). Returns it with the derived facts (VRAM need, smallest slices)."""
        if isinstance(model, dict):
            model = model_from_dict(model)
        return _converting(self._modelsvc.Register)(M.RegisterModelRequest(model=model),
                                                    timeout=max(self.timeout, DIGEST_TIMEOUT_S))

    def get_model(self, name: str) -> M.Model:
        return _converting(self._modelsvc.Get)(M.GetModelRequest(name=name), timeout=self.timeout)

    def list_models(self, family: str = "", labels: dict[str, str] | None = None) -> list[M.Model]:
        resp = _converting(self._modelsvc.List)(M.ListModelsRequest(family=family, labels=labels or {}),
                                                timeout=self.timeout)
        return list(resp.models)

    def update_model(self, model: M.Model | dict) -> M.Model:
        """Replace a model (admin); with model.generation set, only if nobody changed it since."""
        if isinstance(model, dict):
            model = model_from_dict(model)
        return _converting(self._modelsvc.Update)(M.UpdateModelRequest(model=model),
                                                  timeout=max(self.timeout, DIGEST_TIMEOUT_S))

    def delete_model(self, name: str) -> M.Model:
        return _converting(self._modelsvc.Delete)(M.DeleteModelRequest(name=name), timeout=self.timeout)

    def record_measurement(self, name: str, variant: str, gpu_model: str, figures: M.Measurement,
                           attempts: int = 3) -> M.Model:
        """Store measured figures (`meshctl model bench`) on a variant under a GPU model's canonical name (or
        "cpu"), replacing that GPU model's earlier figures (admin). Each try reads the model and updates it
        at the generation read; a concurrent change makes it read again (errors.Aborted after `attempts`)."""
        from mesh import errors
        for attempt in range(attempts):
            m = self.get_model(name)
            target = next((v for v in m.variants if v.name == variant), None)
            if target is None:
                raise errors.NotFound(f"model {name!r} has no variant {variant!r}", kind="variant", name=variant)
            target.measured[gpu_model].CopyFrom(figures)
            try:
                return self.update_model(m)
            except errors.Aborted:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")


# -- documents ---------------------------------------------------------------------------------------

def _ts(msg: Any, field: str) -> str | None:
    from mesh.client import timestamp
    return timestamp(msg, field)


def measurement_to_dict(x: M.Measurement) -> dict[str, Any]:
    return {"tokens_per_second": x.tokens_per_second, "ttft_seconds": x.ttft_seconds,
            "load_seconds": x.load_seconds, "measured_at": _ts(x, "measured_at"), "context": x.context,
            "concurrency": x.concurrency, "note": x.note, "requests": x.requests, "prompt_tokens": x.prompt_tokens,
            "max_tokens": x.max_tokens, "ttft_p95_seconds": x.ttft_p95_seconds,
            "prompt_tokens_per_second": x.prompt_tokens_per_second, "backend": x.backend}


def variant_to_dict(v: M.Variant) -> dict[str, Any]:
    a, e = v.architecture, v.vram
    return {
        "name": v.name, "backend": BACKEND_NAMES.get(v.backend, f"unknown({v.backend})" if v.backend else ""),
        "artifact": v.artifact, "artifact_format": FORMAT_NAMES.get(v.artifact_format, ""),
        "quantization": v.quantization, "weight_bytes": v.weight_bytes,
        "kv_bytes_per_token": v.kv_bytes_per_token, "kv_cache_type": v.kv_cache_type,
        "max_context": v.max_context, "context": v.context, "concurrency": v.concurrency,
        "fallback_rank": v.fallback_rank, "artifact_sha256": v.artifact_sha256,
        "architecture": {"name": a.name, "block_count": a.block_count, "embedding_length": a.embedding_length,
                         "head_count": a.head_count, "head_count_kv": a.head_count_kv, "key_length": a.key_length,
                         "value_length": a.value_length, "vocab_size": a.vocab_size,
                         "parameter_count": a.parameter_count},
        "measured": {k: measurement_to_dict(x) for k, x in sorted(v.measured.items())},
        "vram": {"context": e.context, "concurrency": e.concurrency, "weight_bytes": e.weight_bytes,
                 "kv_cache_bytes": e.kv_cache_bytes, "overhead_bytes": e.overhead_bytes,
                 "total_bytes": e.total_bytes,
                 "slices": [{"gpu_model": s.gpu_model, "mig_profile": s.mig_profile,
                             "mig_memory_bytes": s.mig_memory_bytes, "mps_memory_bytes": s.mps_memory_bytes,
                             "mps_compute_share": s.mps_compute_share, "gpu_memory_bytes": s.gpu_memory_bytes,
                             "fits": s.fits} for s in e.slices]},
    }


def model_to_dict(m: M.Model) -> dict[str, Any]:
    return {"name": m.name, "family": m.family, "description": m.description, "labels": dict(m.labels),
            "generation": m.generation, "created_at": _ts(m, "created_at"), "updated_at": _ts(m, "updated_at"),
            "variants": [variant_to_dict(v) for v in m.variants]}


def model_from_dict(doc: dict, path: str = "model") -> M.Model:
    """A Model from a document like `model_to_dict`'s (a YAML file); InvalidArgument naming the key."""
    m = M.Model()
    _fill(m, doc, path)
    return m


def _bad(path: str, problem: str, allowed: str = ""):
    from mesh import errors
    return errors.InvalidArgument.of(path, problem, allowed)


def _scalar(f: D.FieldDescriptor, value: Any, path: str) -> Any:
    if f.type == D.FieldDescriptor.TYPE_ENUM:
        table = BACKEND_ALIASES if f.enum_type.name == "Backend" else FORMATS
        key = str(value or "").strip().lower()
        if key not in table:
            raise _bad(path, f"unknown {f.name} {value!r}", ", ".join(k for k in table if k) or "")
        return table[key]
    if f.type == D.FieldDescriptor.TYPE_STRING:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise _bad(path, f"{value!r} is not text", "a string")
        return str(value)
    if f.type == D.FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise _bad(path, f"{value!r} is not true or false", "true, false")
        return value
    if f.type in (D.FieldDescriptor.TYPE_DOUBLE, D.FieldDescriptor.TYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(path, f"{value!r} is not a number", "a number")
        return float(value)
    if isinstance(value, str) and f.name.endswith("_bytes"):
        from mesh.units import ALLOWED_FORMS, parse_size
        try:
            size = parse_size(value)
        except ValueError:
            raise _bad(path, f"{value!r} is not a size", ALLOWED_FORMS) from None
        return _in_range(f, size, path)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(path, f"{value!r} is not an integer", "an integer" + (" or a size like 90MiB"
                                                                            if f.name.endswith("_bytes") else ""))
    return _in_range(f, value, path)


_INT_RANGES = {D.FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
               D.FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
               D.FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
               D.FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
               D.FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1),
               D.FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
               D.FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1)}


def _in_range(f: D.FieldDescriptor, value: int, path: str) -> int:
    """`value` if the field's protobuf type holds it, else InvalidArgument naming the range."""
    lo, hi = _INT_RANGES.get(f.type, (-(1 << 63), (1 << 63) - 1))
    if not lo <= value <= hi:
        raise _bad(path, f"{value} is out of range", f"{lo} to {hi}")
    return value


def _fill(msg: Any, doc: Any, path: str) -> None:
    if isinstance(msg, timestamp_pb2.Timestamp):
        try:
            msg.FromJsonString(str(doc))
        except ValueError:
            raise _bad(path, f"{doc!r} is not a time", "RFC 3339, e.g. 2026-12-05T10:00:00Z") from None
        return
    if not isinstance(doc, dict):
        raise _bad(path, "is not a mapping", "KEY: VALUE pairs")
    fields = msg.DESCRIPTOR.fields_by_name
    for key, value in doc.items():
        where = f"{path}.{key}"
        f = fields.get(key)
        if f is None:
            raise _bad(where, "unknown key", ", ".join(fields))
        if value is None:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise _bad(where, "is not a mapping", "KEY: VALUE pairs")
            target = getattr(msg, key)
            value_field = f.message_type.fields_by_name["value"]
            for k, v in value.items():
                if value_field.message_type is not None:
                    _fill(target[str(k)], v, f"{where}[{k!r}]")
                else:
                    target[str(k)] = _scalar(value_field, v, f"{where}[{k!r}]")
        elif f.is_repeated:
            if not isinstance(value, list):
                raise _bad(where, "is not a list", "a list")
            target = getattr(msg, key)
            for i, item in enumerate(value):
                if f.message_type is not None:
                    _fill(target.add(), item, f"{where}[{i}]")
                else:
                    target.append(_scalar(f, item, f"{where}[{i}]"))
        elif f.message_type is not None:
            _fill(getattr(msg, key), value, where)
        else:
            setattr(msg, key, _scalar(f, value, where))
