import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_LLAMA_CPP: _ClassVar[Backend]
    BACKEND_VLLM: _ClassVar[Backend]

class ArtifactFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_FORMAT_UNSPECIFIED: _ClassVar[ArtifactFormat]
    ARTIFACT_FORMAT_GGUF_FILE: _ClassVar[ArtifactFormat]
    ARTIFACT_FORMAT_HF_DIRECTORY: _ClassVar[ArtifactFormat]
BACKEND_UNSPECIFIED: Backend
BACKEND_LLAMA_CPP: Backend
BACKEND_VLLM: Backend
ARTIFACT_FORMAT_UNSPECIFIED: ArtifactFormat
ARTIFACT_FORMAT_GGUF_FILE: ArtifactFormat
ARTIFACT_FORMAT_HF_DIRECTORY: ArtifactFormat

class Architecture(_message.Message):
    __slots__ = ("name", "block_count", "embedding_length", "head_count", "head_count_kv", "key_length", "value_length", "vocab_size", "parameter_count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_COUNT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HEAD_COUNT_FIELD_NUMBER: _ClassVar[int]
    HEAD_COUNT_KV_FIELD_NUMBER: _ClassVar[int]
    KEY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VALUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    vocab_size: int
    parameter_count: int
    def __init__(self, name: _Optional[str] = ..., block_count: _Optional[int] = ..., embedding_length: _Optional[int] = ..., head_count: _Optional[int] = ..., head_count_kv: _Optional[int] = ..., key_length: _Optional[int] = ..., value_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., parameter_count: _Optional[int] = ...) -> None: ...

class Measurement(_message.Message):
    __slots__ = ("tokens_per_second", "ttft_seconds", "load_seconds", "measured_at", "context", "concurrency", "note", "requests", "prompt_tokens", "max_tokens", "ttft_p95_seconds", "prompt_tokens_per_second", "backend")
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P95_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    tokens_per_second: float
    ttft_seconds: float
    load_seconds: float
    measured_at: _timestamp_pb2.Timestamp
    context: int
    concurrency: int
    note: str
    requests: int
    prompt_tokens: int
    max_tokens: int
    ttft_p95_seconds: float
    prompt_tokens_per_second: float
    backend: str
    def __init__(self, tokens_per_second: _Optional[float] = ..., ttft_seconds: _Optional[float] = ..., load_seconds: _Optional[float] = ..., measured_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., context: _Optional[int] = ..., concurrency: _Optional[int] = ..., note: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., ttft_p95_seconds: _Optional[float] = ..., prompt_tokens_per_second: _Optional[float] = ..., backend: _Optional[str] = ...) -> None: ...

class SliceFit(_message.Message):
    __slots__ = ("gpu_model", "mig_profile", "mig_memory_bytes", "mps_memory_bytes", "mps_compute_share", "gpu_memory_bytes", "fits")
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    MIG_PROFILE_FIELD_NUMBER: _ClassVar[int]
    MIG_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MPS_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MPS_COMPUTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    gpu_model: str
    mig_profile: str
    mig_memory_bytes: int
    mps_memory_bytes: int
    mps_compute_share: float
    gpu_memory_bytes: int
    fits: bool
    def __init__(self, gpu_model: _Optional[str] = ..., mig_profile: _Optional[str] = ..., mig_memory_bytes: _Optional[int] = ..., mps_memory_bytes: _Optional[int] = ..., mps_compute_share: _Optional[float] = ..., gpu_memory_bytes: _Optional[int] = ..., fits: _Optional[bool] = ...) -> None: ...

class VramEstimate(_message.Message):
    __slots__ = ("context", "concurrency", "weight_bytes", "kv_cache_bytes", "overhead_bytes", "total_bytes", "slices")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    context: int
    concurrency: int
    weight_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int
    slices: _containers.RepeatedCompositeFieldContainer[SliceFit]
    def __init__(self, context: _Optional[int] = ..., concurrency: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., overhead_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[SliceFit, _Mapping]]] = ...) -> None: ...

class Variant(_message.Message):
    __slots__ = ("name", "backend", "artifact", "artifact_format", "quantization", "architecture", "weight_bytes", "kv_bytes_per_token", "kv_cache_type", "max_context", "fallback_rank", "measured", "context", "concurrency", "vram", "artifact_sha256")
    class MeasuredEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Measurement
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Measurement, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_RANK_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    VRAM_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    backend: Backend
    artifact: str
    artifact_format: ArtifactFormat
    quantization: str
    architecture: Architecture
    weight_bytes: int
    kv_bytes_per_token: int
    kv_cache_type: str
    max_context: int
    fallback_rank: int
    measured: _containers.MessageMap[str, Measurement]
    context: int
    concurrency: int
    vram: VramEstimate
    artifact_sha256: str
    def __init__(self, name: _Optional[str] = ..., backend: _Optional[_Union[Backend, str]] = ..., artifact: _Optional[str] = ..., artifact_format: _Optional[_Union[ArtifactFormat, str]] = ..., quantization: _Optional[str] = ..., architecture: _Optional[_Union[Architecture, _Mapping]] = ..., weight_bytes: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., kv_cache_type: _Optional[str] = ..., max_context: _Optional[int] = ..., fallback_rank: _Optional[int] = ..., measured: _Optional[_Mapping[str, Measurement]] = ..., context: _Optional[int] = ..., concurrency: _Optional[int] = ..., vram: _Optional[_Union[VramEstimate, _Mapping]] = ..., artifact_sha256: _Optional[str] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "family", "description", "labels", "variants", "created_at", "updated_at", "generation")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    description: str
    labels: _containers.ScalarMap[str, str]
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    generation: int
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., generation: _Optional[int] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("family", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    family: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, family: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class UpdateModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
