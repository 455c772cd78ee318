"""`WorkloadState`: the registry of what a workload's checkpoint holds, flattened to entries.

A workload registers its modules, optimizers, loose tensors, RNG states, a step
counter and extras (data: JSON types, tuples, bytes, numpy arrays; see datafmt.py). The registry flattens them to named entries:

| entry | kind | what |
| --- | --- | --- |
| `module/<m>/<key>` | tensor | every tensor of `m.state_dict()` (parameters and buffers) |
| `optim/<o>/state/<i>/<key>` | tensor | optimizer state tensors (`exp_avg`, `exp_avg_sq`, `step`, ...) of parameter `i` |
| `optim/<o>/meta` | data | param groups (hyper-parameters) and non-tensor optimizer state |
| `tensor/<name>` | tensor | a registered tensor |
| `rng` | data | torch (and CUDA), numpy and Python `random` generator states |
| `meta` | data | the step counter and `extras` |

Data entries are tagged JSON (mesh/checkpoint/datafmt.py), never pickle: they arrive over
the network, and unpickling them would run whatever code they name.

Loading writes tensor bytes in place into the registered tensors (optimizer state is
staged and handed to `load_state_dict`, which keeps tensors that already match), so
the restored workload is bit-identical.

Dirty tracking for pre-copy: a tensor's *token* is `(tensor._version, data_ptr, shape,
dtype)`; torch bumps `_version` on every in-place write through autograd-visible
views (optimizers, `add_`, `copy_` under `no_grad`). Writes through `.data` or numpy
views do not bump it, and inference-mode tensors have no counter: register those with
`track="hash"` (or they fall back to it), and their token is the checksum of the bytes.
Module buffers are always hashed: native kernels update some of them without a bump
(batch norm's running statistics), and they are small.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mesh.checkpoint import datafmt
from mesh.checkpoint.format import (CHUNK_BYTES, CheckpointError, CheckpointWriter, EntryMeta, Manifest,
                                    iter_entry_chunks, new_hasher, read_manifest)

Track = Literal["version", "hash"]
Token = tuple[Any, ...]

META = "meta"
RNG = "rng"


class StateMismatch(CheckpointError):
    """A checkpoint does not fit the registered state (unknown entry, other shape or dtype)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise StateMismatch(f"unknown dtype {name!r}")
    return dt


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_chunks(t: torch.Tensor, chunk_bytes: int = CHUNK_BYTES, start: int = 0) -> Iterator[memoryview]:
    """A tensor's bytes in chunks from byte offset `start` (device tensors copied a chunk at a time)."""
    if t.device.type == "cpu" and t.is_contiguous():
        mv = byte_view(t)
        for off in range(start, len(mv), chunk_bytes):
            yield mv[off:off + chunk_bytes]
        return
    flat = t.detach().reshape(-1).contiguous().view(torch.uint8)
    for off in range(start, flat.numel(), chunk_bytes):
        yield byte_view(flat[off:off + chunk_bytes].cpu())


@dataclass
class _Registered:
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    hash_tracked: set[str] = field(default_factory=set)
    rng: bool = False


class WorkloadState:
    """What a workload checkpoints. Not thread-safe by itself: the SDK reads it from its
    server thread only while the training thread is paused, or for pre-copy rounds, whose
    torn reads are caught by the version tokens taken before the read."""

    def __init__(self, workload_id: str = "") -> None:
        self.workload_id = workload_id
        self.step = 0
        self.extras: dict[str, Any] = {}
        self._reg = _Registered()
        self._snapshots: dict[int, dict[str, Token]] = {}
        self._snapshot_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._staged: dict[str, torch.Tensor] = {}
        self._buffers: set[str] = set()  # module buffers: kernels such as batch_norm update them unversioned
        self._copy_back: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- registration ---------------------------------------------------------------------

    def register_module(self, name: str, module: torch.nn.Module) -> None:
        self._check_name(name, self._reg.modules)
        self._reg.modules[name] = module

    def register_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        self._check_name(name, self._reg.optimizers)
        self._reg.optimizers[name] = optimizer

    def register_tensor(self, name: str, tensor: torch.Tensor, track: Track = "version") -> None:
        """A loose tensor, restored in place. `track="hash"` when it is written in ways torch's
        version counter does not see (through `.data`, numpy, or in inference mode)."""
        self._check_name(name, self._reg.tensors)
        if track not in ("version", "hash"):
            raise ValueError(f"track: {track!r} (allowed: version, hash)")
        self._reg.tensors[name] = tensor
        if track == "hash":
            self._reg.hash_tracked.add(f"tensor/{name}")

    def register_rng(self) -> None:
        """Checkpoint torch's (and CUDA's), numpy's and Python's global RNG states."""
        self._reg.rng = True

    @staticmethod
    def _check_name(name: str, where: dict[str, Any]) -> None:
        if not name or "/" in name:
            raise ValueError(f"name {name!r}: must be non-empty and contain no '/'")
        if name in where:
            raise ValueError(f"name {name!r} is already registered")

    # --- flattening -----------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor entry by name, in a stable order (live tensors, not copies)."""
        for _ in range(10):
            try:
                return self._tensors()
            except RuntimeError:  # an optimizer added state while a pre-copy round looked at it
                time.sleep(0.001)
        return self._tensors()

    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m, module in self._reg.modules.items():
            params = {id(p) for p in module.parameters()}
            for key, t in module.state_dict(keep_vars=True).items():
                if isinstance(t, torch.Tensor):
                    out[f"module/{m}/{key}"] = t
                    if id(t) not in params:
                        self._buffers.add(f"module/{m}/{key}")
        for o, opt in self._reg.optimizers.items():
            for i, p in enumerate(_params(opt)):
                for key, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        out[f"optim/{o}/state/{i}/{key}"] = v
        for n, t in self._reg.tensors.items():
            out[f"tensor/{n}"] = t
        return out

    def data_entries(self) -> dict[str, bytes]:
        """The small data entries (tagged JSON), taken now (call at a safe point)."""
        out = {META: datafmt.encode({"step": self.step, "extras": self.extras}, "extras")}
        if self._reg.rng:
            out[RNG] = datafmt.encode(_get_rng(), "rng")
        for o, opt in self._reg.optimizers.items():
            params = _params(opt)
            groups = opt.state_dict()["param_groups"]
            nontensor = {i: {k: v for k, v in opt.state.get(p, {}).items() if not isinstance(v, torch.Tensor)}
                         for i, p in enumerate(params) if p in opt.state}
            out[f"optim/{o}/meta"] = datafmt.encode({"param_groups": groups, "state": nontensor}, f"optimizer {o!r}")
        return out

    @staticmethod
    def tensor_meta(name: str, t: torch.Tensor) -> EntryMeta:
        return EntryMeta(name=name, kind="tensor", nbytes=t.numel() * t.element_size(),
                         dtype=dtype_name(t.dtype), shape=list(t.shape))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # --- dirty tracking -------------------------------------------------------------------

    def token(self, name: str, t: torch.Tensor) -> Token | None:
        """The tensor's change token, or None when only its content hash can tell (then the
        caller uses the checksum of the bytes it sent)."""
        if name in self._reg.hash_tracked or name in self._buffers:
            return None
        try:
            version = t._version
        except RuntimeError:  # inference tensors have no version counter
            return None
        return ("v", version, t.data_ptr(), tuple(t.shape), t.dtype)

    def content_token(self, t: torch.Tensor) -> Token:
        h = new_hasher()
        for chunk in tensor_chunks(t):
            h.update(chunk)
        return ("h", h.hexdigest())

    def current_token(self, name: str, t: torch.Tensor) -> Token:
        return self.token(name, t) or self.content_token(t)

    def changed(self, tokens: dict[str, Token]) -> list[str]:
        """Tensor entries whose token differs from `tokens` (or that are new since)."""
        return [n for n, t in self.tensors().items() if tokens.get(n) != self.current_token(n, t)]

    def snapshot(self) -> int:
        """Remembers every tensor's token; returns an id for `changed_since`."""
        tokens = {n: self.current_token(n, t) for n, t in self.tensors().items()}
        with self._lock:
            sid = next(self._snapshot_ids)
            self._snapshots[sid] = tokens
        return sid

    def changed_since(self, snapshot_id: int) -> list[str]:
        with self._lock:
            tokens = self._snapshots[snapshot_id]
        return self.changed(tokens)

    def drop_snapshot(self, snapshot_id: int) -> None:
        with self._lock:
            self._snapshots.pop(snapshot_id, None)

    # --- loading --------------------------------------------------------------------------

    def writable(self, meta: EntryMeta) -> memoryview:
        """Where an incoming entry's bytes go: the live tensor's memory when it is a contiguous
        CPU tensor of the same dtype and shape, else a staging tensor copied in by `apply`."""
        if meta.kind != "tensor":
            raise StateMismatch(f"checkpoint entry {meta.name!r}: kind {meta.kind!r} is not a tensor")
        dtype = dtype_of(meta.dtype)
        name = meta.name
        numel = math.prod(meta.shape)
        if meta.nbytes != numel * dtype.itemsize:      # checked before a byte is taken, or anything allocated
            raise StateMismatch(f"checkpoint entry {name!r}: {meta.nbytes} bytes declared, {meta.dtype}"
                                f"{list(meta.shape)} is {numel * dtype.itemsize} bytes")
        if name.startswith("optim/"):
            self._check_staged(name, numel)
            staged = torch.empty(meta.shape, dtype=dtype)
            self._staged[name] = staged
            return byte_view(staged)
        live = self.tensors().get(name)
        if live is None:
            raise StateMismatch(f"checkpoint entry {name!r} matches nothing registered in this workload")
        if live.dtype != dtype or list(live.shape) != list(meta.shape):
            raise StateMismatch(f"checkpoint entry {name!r}: {meta.dtype}{meta.shape} in the checkpoint, "
                                f"{dtype_name(live.dtype)}{list(live.shape)} in this workload")
        if live.device.type == "cpu" and live.is_contiguous():
            self._copy_back.pop(name, None)
            return byte_view(live)
        staged = torch.empty(meta.shape, dtype=dtype)
        self._copy_back[name] = (live, staged)
        return byte_view(staged)

    def _check_staged(self, name: str, numel: int) -> None:
        """Optimizer state is staged in a new tensor of the entry's shape: only `optim/<o>/state/<i>/<key>` of a
        registered optimizer `o` with a parameter `i`, and no more elements than all of `o`'s parameters hold
        (Adam's moments are each one parameter's size, L-BFGS's flat history all of them)."""
        parts = name.split("/", 4)
        opt = None
        if len(parts) == 5 and parts[2] == "state" and parts[3].isascii() and parts[3].isdigit():
            opt = self._reg.optimizers.get(parts[1])
        params = _params(opt) if opt is not None else []
        if opt is None or int(parts[3]) >= len(params):
            raise StateMismatch(f"checkpoint entry {name!r} is the state of no parameter of an optimizer "
                                f"registered in this workload")
        most = max(1, sum(p.numel() for p in params))
        if numel > most:
            raise StateMismatch(f"checkpoint entry {name!r}: {numel} elements, more than the {most} of all the "
                                f"parameters of optimizer {parts[1]!r}")

    def apply(self, data: dict[str, bytes], tensor_names: list[str] | None = None) -> None:
        """Finishes a load once every entry's bytes are in: copies staged tensors, installs
        optimizer state, RNG states, the step and extras. `tensor_names` (the manifest's)
        limits the staged optimizer tensors to those of this checkpoint."""
        wanted = set(tensor_names) if tensor_names is not None else None
        with torch.no_grad():
            for name, (live, staged) in self._copy_back.items():
                if wanted is None or name in wanted:
                    live.copy_(staged)
        self._copy_back.clear()
        for o, opt in self._reg.optimizers.items():
            blob = data.get(f"optim/{o}/meta")
            if blob is None:
                continue
            meta = _dict(datafmt.decode(blob, f"optim/{o}/meta"), f"optim/{o}/meta", ("param_groups", "state"))
            state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
            prefix = f"optim/{o}/state/"
            for name, t in self._staged.items():
                if name.startswith(prefix) and (wanted is None or name in wanted):
                    i, key = name[len(prefix):].split("/", 1)
                    state.setdefault(int(i), {})[key] = t
            opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self._staged.clear()
        if RNG in data:
            _set_rng(_dict(datafmt.decode(data[RNG], RNG), RNG, ("torch", "python")))
        if META in data:
            meta = _dict(datafmt.decode(data[META], META), META, ("step", "extras"))
            self.step = int(meta["step"])
            self.extras.clear()
            self.extras.update(meta["extras"])

    # --- whole checkpoints on disk --------------------------------------------------------

    def save(self, path: str, chunk_bytes: int = CHUNK_BYTES) -> Manifest:
        """Writes a full checkpoint directory (call at a safe point)."""
        w = CheckpointWriter(path, self.workload_id)
        try:
            for name, t in self.tensors().items():
                w.write_entry(self.tensor_meta(name, t), tensor_chunks(t, chunk_bytes))
            for name, blob in self.data_entries().items():
                w.write_entry(EntryMeta(name=name, kind="data", nbytes=len(blob)), [blob])
            return w.commit(self.step)
        except BaseException:
            w.abort()
            raise

    def load(self, path: str) -> Manifest:
        """Restores from a checkpoint directory, verifying every entry's checksum."""
        manifest = read_manifest(path)
        data: dict[str, bytes] = {}
        for e in manifest.entries:
            if e.kind == "data":
                data[e.name] = b"".join(iter_entry_chunks(path, manifest, e.name))
                continue
            dst = self.writable(e)
            off = 0
            for chunk in iter_entry_chunks(path, manifest, e.name):
                dst[off:off + len(chunk)] = chunk
                off += len(chunk)
        self.apply(data, [e.name for e in manifest.entries if e.kind == "tensor"])
        return manifest


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _dict(x: Any, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(x, dict) or any(k not in x for k in keys):
        raise StateMismatch(f"checkpoint entry {what!r}: expected an object with {', '.join(keys)}")
    return x


def _get_rng() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": bytes(torch.get_rng_state().numpy()), "python": random.getstate()}
    if torch.cuda.is_initialized():     # never is_available() first: it initializes the driver (~0.2 s)
        out["cuda"] = [bytes(s.numpy()) for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
        out["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return out


def _set_rng(s: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(s["torch"]), dtype=torch.uint8))
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in s["cuda"]])
    if "numpy" in s:
        import numpy as np
        np.random.set_state(s["numpy"])



def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor entry of a checkpoint directory as a new CPU tensor (checksums verified):
    for comparing checkpoints and inspecting them without the workload's code."""
    manifest = read_manifest(path)
    out: dict[str, torch.Tensor] = {}
    for e in manifest.entries:
        if e.kind != "tensor":
            continue
        t = torch.empty(e.shape, dtype=dtype_of(e.dtype))
        dst = byte_view(t)
        off = 0
        for chunk in iter_entry_chunks(path, manifest, e.name):
            dst[off:off + len(chunk)] = chunk
            off += len(chunk)
        out[e.name] = t
    return out
