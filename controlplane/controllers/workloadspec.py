"""What a RunWorkloadRequest may hold (WorkloadService.Run, controllers/workloads.py): the slice, a command or a
model-server backend, environment and labels, each refused with INVALID_ARGUMENT naming the field and what is
allowed."""

from __future__ import annotations

import re

from controlplane.serving import deployspec
from gpumesh.v1 import workload_service_pb2
from mesh import errors, labels, netmode
from mesh.models import digest

MAX_ARGS = 256
MAX_ARG_LEN = 32 << 10
MAX_ENV = 256           # variables a Run may set (each is in the record, the agent's state and the exec)
MAX_LABELS = 64         # labels of a workload (the record, events, every List filter)
MAX_ID = 128
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_API_KEY = 256
API_KEY = re.compile(r"^[!-~]{1,%d}$" % MAX_API_KEY)      # what an Authorization header carries as one token
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "GPUMESH_SLICE_ID", "GPUMESH_WORKLOAD_ID",
                "GPUMESH_MEMORY_LIMIT_BYTES", "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY",
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
                # set by the agent; the secret file's it moves as root into the workload's directory
                "GPUMESH_CHECKPOINT_SOCKET", "GPUMESH_TRANSFER_SECRET_FILE")

def _check_id(value: str, field: str, what: str) -> str:
    if not value:
        raise errors.InvalidArgument.of(field, "is required", what)
    if len(value) > MAX_ID or not value.isprintable():
        raise errors.InvalidArgument.of(field, "is not a valid ID", f"printable, at most {MAX_ID} characters")
    return value


def validate_run(req: workload_service_pb2.RunWorkloadRequest) -> None:
    _check_id(req.slice_id, "slice_id", "the ID of a READY slice (s-...)")
    if req.request_id:
        _check_id(req.request_id, "request_id", "an idempotency key")
    if req.HasField("backend"):
        if req.command:
            raise errors.InvalidArgument.of("command", "is set with a backend", "either a command or a backend")
        if req.backend.kind not in ("llama.cpp", "vllm") or not req.backend.artifact:
            raise errors.InvalidArgument.of("backend", "needs a kind and an artifact",
                                            "kind llama.cpp or vllm, and the artifact's path")
        validate_backend_inputs(req.backend)
        return validate_env_labels(req)
    if not req.command:
        raise errors.InvalidArgument.of("command", "is required", "argv, the program first")
    if len(req.command) > MAX_ARGS:
        raise errors.InvalidArgument.of("command", f"has {len(req.command)} arguments", f"at most {MAX_ARGS}")
    if not req.command[0]:
        raise errors.InvalidArgument.of("command[0]", "is empty", "the program to run")
    for i, arg in enumerate(req.command):
        if "\0" in arg or len(arg) > MAX_ARG_LEN:
            raise errors.InvalidArgument.of(f"command[{i}]", "is not a valid argument",
                                            f"no NUL bytes, at most {MAX_ARG_LEN} characters")
    validate_env_labels(req)


def validate_backend_inputs(b) -> None:
    """The ServingBackend inputs the agent would meet only when it starts the server (a FAILED workload, or
    vLLM refusing a share over 1) or never (a key no client can send in an Authorization header)."""
    u = b.gpu_memory_utilization
    if u and not 0 < u <= 1:            # nan is neither
        raise errors.InvalidArgument.of("backend.gpu_memory_utilization", f"{u!r} is not a share",
                                        "0 (the backend's default) or a number in (0, 1]")
    if b.artifact_sha256 and not digest.HEX_RE.match(b.artifact_sha256):
        raise errors.InvalidArgument.of("backend.artifact_sha256", "is not a SHA-256", "64 lower-case hex digits")
    if b.api_key and not API_KEY.match(b.api_key):
        raise errors.InvalidArgument.of("backend.api_key", "is not a usable key",
                                        f"1-{MAX_API_KEY} printable ASCII characters without spaces")


def backend_share(b, slice_memory: int, gpu_memory: int, isolation: int) -> float:
    """The share of the device's memory vLLM on this slice takes (b.gpu_memory_utilization): a share left at 0 is
    the slice's, as a deployment's replica gets (an MPS or time-share slice sees the whole GPU, where vLLM's own
    default is 0.9 of all of it); one over the slice's part of the GPU is refused. Other backends: as given."""
    u = b.gpu_memory_utilization
    if b.kind != "vllm":
        return u
    if not u:
        return deployspec.gpu_memory_utilization(slice_memory, gpu_memory, isolation)
    most = deployspec.max_gpu_memory_utilization(slice_memory, gpu_memory, isolation)
    if most is not None and u > most:
        raise errors.InvalidArgument.of(
            "backend.gpu_memory_utilization", f"{u!r} is more than the slice's part of its GPU "
            f"({slice_memory / 2**30:.4g} GiB of {gpu_memory / 2**30:.4g} GiB)",
            f"at most {most}, or 0 for the slice's share")
    return u


def validate_env_labels(req: workload_service_pb2.RunWorkloadRequest) -> None:
    if len(req.env) > MAX_ENV:
        raise errors.InvalidArgument.of("env", f"has {len(req.env)} variables", f"at most {MAX_ENV}")
    for k, v in req.env.items():
        if not ENV_KEY.match(k):
            raise errors.InvalidArgument.of(f"env[{k}]", "is not a valid variable name",
                                            "letters, digits and '_', not starting with a digit")
        if k in RESERVED_ENV:
            raise errors.InvalidArgument.of(f"env[{k}]", "is set by the slice or the agent", "any name but " + ", ".join(RESERVED_ENV))
        if "\0" in v or len(v) > MAX_ARG_LEN:
            raise errors.InvalidArgument.of(f"env[{k}]", "is not a valid value", f"no NUL bytes, at most {MAX_ARG_LEN} characters")
    labels.check(req.labels, "labels", MAX_LABELS)
    if req.HasField("backend"):         # a model server: the gateway must reach its port
        netmode.check_model_server(req.labels, "labels")
    else:
        netmode.check_labels(req.labels, "labels")
