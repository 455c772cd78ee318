"""The SDK a workload imports to be checkpointed and migrated cooperatively.

    import mesh.checkpoint as mc
    ckpt = mc.connect(workload_id="resnet-7")      # offline no-op when no agent is there
    ckpt.register_module("model", model)
    ckpt.register_optimizer("adam", opt)
    ckpt.register_rng()
    ckpt.restore_if_requested()                  # from $GPUMESH_RESTORE_FROM, if set
    for step in range(ckpt.step, total_steps):
        train_one_step(step)
        ckpt.safe_point(step + 1)                # the agent may checkpoint / pause / stop here

`connect()` reads `GPUMESH_CHECKPOINT_SOCKET`; when set, the SDK serves the agent's
commands on that Unix socket from a daemon thread (see `mesh.checkpoint.agent_link`).
`safe_point()` costs one attribute check unless the agent asked for a pause.

`GPUMESH_RESTORE_FROM` is either a checkpoint directory, or
`receive:SESSION@ADDRESS`: listen for a transfer session on ADDRESS (`host:port`, port 0
picks one and `status` reports it; or `unix:/path`) and restore what a migrating source
sends there. Only a sender that proves the session's secret is heard: the agent writes it to
the 0600 file named by `GPUMESH_TRANSFER_SECRET_FILE`, which is read and removed here
(mesh/checkpoint/transfer_auth.py); the agent hands the sender the same secret over its
control socket (`secret` of `precopy_begin` and `checkpoint`). The state's bytes land directly in the registered tensors. With
`GPUMESH_RESTORE_HOLD=1` (set by the agent for a migration target) the restored workload
then holds in `restore_if_requested()` until the agent sends `resume` (the control plane
made the migration's commit durable) or `stop`: a target never trains before the commit.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch

from mesh.checkpoint.agent_link import HOLD_ENV, RESTORE_ENV, SOCKET_ENV, ControlServer
from mesh.checkpoint.format import CHUNK_BYTES, CheckpointError, EntryMeta, Manifest
from mesh.checkpoint.state import Track, WorkloadState, tensor_chunks
from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV, TransferAuthError, read_secret_file
from mesh.checkpoint.transfer import (BufferTarget, EntryTarget, OutEntry, SendStats, TransferClient,
                                      TransferServer)


MESH_ENV = "GPUMESH_TRANSFER_MESH"
"""0: a receiving workload offers no mesh buffer (every byte on the gRPC stream)."""


class WorkloadStopped(SystemExit):
    """Raised by `safe_point()` in the training thread when the agent stops the workload
    (after it migrated away). Exits the process with status 0 unless caught."""

    def __init__(self) -> None:
        super().__init__(0)


class NotPaused(CheckpointError):
    """A command that needs the workload paused at a safe point came while it ran."""


class StateSink:
    """A transfer sink that writes straight into a WorkloadState and applies it on commit."""

    def __init__(self, state: WorkloadState, on_commit: Any = None) -> None:
        self.state = state
        self.on_commit = on_commit

    def open_entry(self, meta: EntryMeta) -> EntryTarget:
        return BufferTarget(self.state.writable(meta))

    def commit(self, manifest: Manifest, data: dict[str, bytes]) -> dict[str, Any]:
        self.state.apply(data, [e.name for e in manifest.entries if e.kind == "tensor"])
        if self.on_commit:
            self.on_commit(manifest)
        return {"step": self.state.step}


class _Sender:
    """Pre-copy rounds from the source: remembers each entry's token and checksum as last sent."""

    def __init__(self, state: WorkloadState, client: TransferClient, chunk_bytes: int) -> None:
        self.state = state
        self.client = client
        self.chunk_bytes = chunk_bytes
        self.tokens: dict[str, Any] = {}
        self.checksums: dict[str, str] = {}
        self.metas: dict[str, EntryMeta] = {}
        self.round = -1

    def dirty(self) -> tuple[list[str], int]:
        tensors = self.state.tensors()
        names = self.state.changed(self.tokens)
        return names, sum(tensors[n].numel() * tensors[n].element_size() for n in names)

    def send(self, names: list[str] | None, final: bool) -> dict[str, Any]:
        self.round += 1
        tensors = self.state.tensors()
        if names is None:
            names = list(tensors) if self.round == 0 else self.state.changed(self.tokens)
        out: list[OutEntry] = []
        pending: dict[str, Any] = {}
        for n in names:
            t = tensors[n]
            pending[n] = self.state.token(n, t)  # taken before the bytes are read
            meta = self.state.tensor_meta(n, t)
            self.metas[n] = meta
            out.append(OutEntry(meta, lambda start, t=t: tensor_chunks(t, self.chunk_bytes, start), gen=self.round))
        data = self.state.data_entries() if final else {}
        for n, blob in data.items():
            out.append(OutEntry(EntryMeta(name=n, kind="data", nbytes=len(blob)),
                                lambda start, b=blob: [memoryview(b)[start:]], gen=self.round))

        def manifest(stats: SendStats) -> Manifest:
            self.checksums.update(stats.checksums)
            entries = [EntryMeta(**{**self.metas[n].to_json(), "checksum": self.checksums[n]}) for n in tensors]
            entries += [EntryMeta(name=n, kind="data", nbytes=len(b), checksum=self.checksums[n])
                        for n, b in data.items()]
            return Manifest(workload_id=self.state.workload_id, step=self.state.step, entries=entries,
                            checksum=self.client.algo)

        t0 = time.perf_counter()
        stats = self.client.send(out, commit=manifest if final else None)
        self.checksums.update(stats.checksums)
        for n, tok in pending.items():
            self.tokens[n] = tok if tok is not None else ("h", self.checksums[n])
        return {"round": self.round, "entries": len(names), "bytes": stats.bytes, "seconds": time.perf_counter() - t0,
                "mb_per_s": stats.mb_per_s, "attempts": stats.attempts, "committed": stats.committed,
                "transport": stats.transport, "transport_note": stats.transport_note}


class Checkpointer:
    """A workload's handle on the agent. Build it with `connect()`."""

    def __init__(self, socket_path: str | None = None, workload_id: str = "",
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.state = WorkloadState(workload_id)
        self.chunk_bytes = chunk_bytes
        self.socket_path = socket_path
        self._cv = threading.Condition()
        self._want_pause = False
        self._paused = False
        self._stop = False
        self._sender: _Sender | None = None
        self._restored = threading.Event()
        self._held = False
        self.restored_at: float | None = None
        self.restored_step: int | None = None      # the step the restore applied (training goes on after it)
        self.receive_address: str | None = None
        self.receive_session: str | None = None
        self._server = ControlServer(socket_path, self._handle) if socket_path else None

    # --- what the workload calls ----------------------------------------------------------

    @property
    def online(self) -> bool:
        return self._server is not None

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def extras(self) -> dict[str, Any]:
        return self.state.extras

    def register_module(self, name: str, module: torch.nn.Module) -> None:
        self.state.register_module(name, module)

    def register_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        self.state.register_optimizer(name, optimizer)

    def register_tensor(self, name: str, tensor: torch.Tensor, track: Track = "version") -> None:
        self.state.register_tensor(name, tensor, track)

    def register_rng(self) -> None:
        self.state.register_rng()

    def safe_point(self, step: int | None = None) -> None:
        """Call once per loop iteration, where the state is consistent. `step` (if given) is the
        number of steps done. Blocks while the agent holds the workload paused; raises
        `WorkloadStopped` when the agent stopped it."""
        if step is not None:
            self.state.step = step
        if not (self._want_pause or self._stop):
            return
        with self._cv:
            if self._want_pause and not self._stop:
                self._paused = True
                self._cv.notify_all()
                while self._want_pause and not self._stop:
                    self._cv.wait()
                self._paused = False
                self._cv.notify_all()
            if self._stop:
                raise WorkloadStopped()

    def save(self, path: str) -> Manifest:
        """A full checkpoint to a directory, from the training thread (at a safe point)."""
        return self.state.save(path, self.chunk_bytes)

    def restore_if_requested(self, source: str | None = None) -> bool:
        """Restores from `source` or `$GPUMESH_RESTORE_FROM` when set; call after registering."""
        source = source if source is not None else os.environ.get(RESTORE_ENV, "")
        if not source:
            return False
        # Held from before the restore: the agent's `resume` may come as soon as the commit is
        # answered, before this thread gets here again; set afterwards, the hold would swallow it.
        with self._cv:
            self._held = os.environ.get(HOLD_ENV, "") not in ("", "0")
        if source.startswith("receive:"):
            self._receive(source.removeprefix("receive:"))
        else:
            self.state.load(source)
        self.restored_at = time.time()
        self.restored_step = self.state.step
        with self._cv:
            self._restored.set()
            while self._held and not self._stop:
                self._cv.wait()
            if self._stop:
                raise WorkloadStopped()
        return True

    def _receive(self, spec: str) -> None:
        session, sep, address = spec.partition("@")
        if not sep or not session or not address:
            raise ValueError(f"{RESTORE_ENV}=receive:{spec}: expected receive:SESSION@ADDRESS")
        path = os.environ.get(SECRET_FILE_ENV, "")
        if not path:
            raise TransferAuthError(f"{RESTORE_ENV}=receive:...: set {SECRET_FILE_ENV} to the file that holds the "
                                    f"session's secret (the agent does)")
        secret = read_secret_file(path)
        server = TransferServer(address).start()
        # a same-host source writes the bytes into a shared-memory ring (the mesh) instead of the stream
        sess = server.expect(session, StateSink(self.state), mesh=os.environ.get(MESH_ENV, "1") != "0",
                             secret=secret)
        self.receive_address, self.receive_session = server.address, session
        sess.committed_event.wait()
        self.receive_address = self.receive_session = None
        threading.Thread(target=server.stop, args=(1.0,), daemon=True).start()

    def close(self) -> None:
        if self._server:
            self._server.close()
            self._server = None
        if self._sender:
            self._sender.client.close()
            self._sender = None

    # --- the agent's commands (server threads) --------------------------------------------

    def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd", "")
        fn = getattr(self, f"_cmd_{cmd}", None)
        if fn is None:
            raise ValueError(f"unknown command {cmd!r}")
        return fn(req)

    def _cmd_status(self, req: dict[str, Any]) -> dict[str, Any]:
        tensors = self.state.tensors()
        return {"step": self.state.step, "paused": self._paused, "restored": self._restored.is_set(),
                "receive_address": self.receive_address, "receive_session": self.receive_session,
                "workload_id": self.state.workload_id,
                "entries": len(tensors), "state_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                "pid": os.getpid(), "held": self._held, "precopy_round": self._sender.round if self._sender else None}

    def _pause(self, timeout: float | None) -> bool:
        """Pauses at the next safe point; False when it was paused already."""
        with self._cv:
            if self._paused:
                return False
            self._want_pause = True
            if not self._cv.wait_for(lambda: self._paused or self._stop, timeout):
                self._want_pause = False
                raise TimeoutError(f"the workload reached no safe point within {timeout:g} s")
        return True

    def _resume(self) -> None:
        with self._cv:
            self._want_pause = False
            self._held = False
            self._cv.notify_all()

    def _cmd_pause(self, req: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._pause(req.get("timeout", 300.0))
        return {"step": self.state.step, "wait_s": time.perf_counter() - t0}

    def _cmd_resume(self, req: dict[str, Any]) -> dict[str, Any]:
        self._resume()
        return {"step": self.state.step}

    def _cmd_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        return {"step": self.state.step}

    def _cmd_checkpoint(self, req: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        paused_here = self._pause(req.get("timeout", 300.0))
        try:
            if req.get("path"):
                m = self.state.save(req["path"], self.chunk_bytes)
                info = {"path": req["path"], "step": m.step, "bytes": m.nbytes}
            else:
                with TransferClient(req["target"], req["session"], chunk_bytes=self.chunk_bytes,
                                    mesh=req.get("mesh") or "auto", secret=_secret(req)) as client:
                    info = _Sender(self.state, client, self.chunk_bytes).send(None, final=True)
                    info["step"] = self.state.step
        finally:
            if paused_here:
                self._resume()
        info["seconds"] = time.perf_counter() - t0
        return info

    def _cmd_precopy_begin(self, req: dict[str, Any]) -> dict[str, Any]:
        if self._sender:
            self._sender.client.close()
        chunk = int(req.get("chunk_bytes") or self.chunk_bytes)
        client = TransferClient(req["target"], req["session"], chunk_bytes=chunk,
                                connect_timeout=float(req.get("connect_timeout", 30.0)), mesh=req.get("mesh") or "auto",
                                secret=_secret(req))
        self._sender = _Sender(self.state, client, chunk)
        return self._sender.send(None, final=False)

    def _need_sender(self) -> _Sender:
        if self._sender is None:
            raise CheckpointError("no pre-copy session: send precopy_begin first")
        return self._sender

    def _cmd_precopy_round(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._need_sender().send(None, final=False)

    def _cmd_dirty(self, req: dict[str, Any]) -> dict[str, Any]:
        names, nbytes = self._need_sender().dirty()
        return {"entries": len(names), "bytes": nbytes}

    def _cmd_final(self, req: dict[str, Any]) -> dict[str, Any]:
        sender = self._need_sender()
        if not self._paused:
            raise NotPaused("final needs the workload paused at a safe point (send pause first)")
        info = sender.send(None, final=True)
        info["step"] = self.state.step
        return info

    def _cmd_precopy_abort(self, req: dict[str, Any]) -> dict[str, Any]:
        if self._sender:
            self._sender.client.close()
            self._sender = None
        return {}

    def _cmd_wait_restored(self, req: dict[str, Any]) -> dict[str, Any]:
        if not self._restored.wait(req.get("timeout", 300.0)):
            raise TimeoutError("no restore was applied in time")
        # the step the restore applied, not the current one: an unheld workload trains on at once, and the
        # migration compares this step with the one the source paused at
        return {"step": self.restored_step, "now_step": self.state.step, "restored_at": self.restored_at}


def _secret(req: dict[str, Any]) -> bytes:
    """The transfer session's secret the agent sent with a command (hex)."""
    try:
        return bytes.fromhex(str(req.get("secret", "")))
    except ValueError:
        raise TransferAuthError("secret: not hex") from None


def connect(workload_id: str | None = None, socket_path: str | None = None) -> Checkpointer:
    """The workload's Checkpointer: served on `socket_path` or `$GPUMESH_CHECKPOINT_SOCKET`,
    offline (every call a cheap no-op except save/restore) when neither is set."""
    path = socket_path if socket_path is not None else os.environ.get(SOCKET_ENV) or None
    wid = workload_id if workload_id is not None else os.environ.get("GPUMESH_WORKLOAD_ID", "")
    return Checkpointer(path, wid)
