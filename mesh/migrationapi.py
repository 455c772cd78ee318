"""The migration part of the SDK (MigrationService): migrate, checkpoint, restore, resize.

    with MeshClient(endpoint) as mesh:
        m = mesh.migrate("w-3f9a2c1d7e6b", to_node="gpu-b")
        for m in mesh.watch_migration(m.id):       # every phase change and pre-copy round
            print(migration_phase(m), m.round, m.bytes_sent)
        ck = mesh.checkpoint("w-3f9a2c1d7e6b")
        mesh.restore(ck.id, to_slice="s-...")

Mixed into `mesh.client.MeshClient`; errors are the typed `mesh.errors` ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import migration_service_pb2_grpc

MODES = {"": 0, "precopy": M.MIGRATION_MODE_PRECOPY, "pre-copy": M.MIGRATION_MODE_PRECOPY,
         "stop-and-copy": M.MIGRATION_MODE_STOP_AND_COPY, "stop_and_copy": M.MIGRATION_MODE_STOP_AND_COPY,
         "transparent": M.MIGRATION_MODE_TRANSPARENT}
FINISHED = (M.MIGRATION_PHASE_DONE, M.MIGRATION_PHASE_ABORTED)


def _converting(fn):
    from mesh.client import _converting as conv
    return conv(fn)


class MigrationApi:
    _channel: Any
    timeout: float

    @property
    def _migrations(self) -> migration_service_pb2_grpc.MigrationServiceStub:
        stub = self.__dict__.get("_migration_stub")
        if stub is None:
            stub = self.__dict__["_migration_stub"] = migration_service_pb2_grpc.MigrationServiceStub(self._channel)
        return stub

    def migrate(self, workload_id: str, to_node: str = "", to_slice: str = "", mode: str | int = "") -> M.Migration:
        """Start moving a running workload; returns the PLANNED migration (follow it with watch_migration)."""
        from mesh import errors
        if isinstance(mode, str):
            if mode.lower() not in MODES:
                raise errors.InvalidArgument.of("mode", f"unknown mode {mode!r}", "precopy, stop-and-copy, transparent")
            mode = MODES[mode.lower()]
        req = M.MigrateRequest(workload_id=workload_id, mode=mode)
        if to_slice:
            req.to_slice = to_slice
        elif to_node:
            req.to_node = to_node
        return _converting(self._migrations.Migrate)(req, timeout=self.timeout)

    def get_migration(self, id: str) -> M.Migration:
        return _converting(self._migrations.Get)(M.GetMigrationRequest(id=id), timeout=self.timeout)

    def list_migrations(self, workload_id: str = "", tenant: str = "") -> list[M.Migration]:
        return list(_converting(self._migrations.List)(
            M.ListMigrationsRequest(workload_id=workload_id, tenant=tenant), timeout=self.timeout).migrations)

    def watch_migration(self, id: str, timeout: float | None = None) -> Iterator[M.Migration]:
        """The migration now and after every change, until DONE or ABORTED."""
        from mesh import richstatus
        import grpc
        call = self._migrations.Watch(M.GetMigrationRequest(id=id), timeout=timeout)
        try:
            for m in call:
                yield m
        except grpc.RpcError as exc:
            raise richstatus.from_rpc_error(exc) from None
        finally:
            call.cancel()

    def wait_migration(self, id: str, timeout: float = 300.0) -> M.Migration:
        last = None
        for last in self.watch_migration(id, timeout=timeout):
            if last.phase in FINISHED:
                break
        return last

    def checkpoint(self, workload_id: str, timeout: float | None = None) -> M.CheckpointInfo:
        """A checkpoint into the store; waits for it without a deadline of its own unless `timeout` is given: the
        control plane waits while the agent reports progress and bounds the wait (copy_idle_timeout_seconds,
        copy_timeout_seconds), and a call cut short gives the checkpoint up."""
        return _converting(self._migrations.Checkpoint)(M.CheckpointRequest(workload_id=workload_id),
                                                        timeout=timeout)

    def restore(self, checkpoint_id: str, to_node: str = "", to_slice: str = "") -> M.Migration:
        req = M.RestoreRequest(checkpoint_id=checkpoint_id)
        if to_slice:
            req.to_slice = to_slice
        elif to_node:
            req.to_node = to_node
        return _converting(self._migrations.Restore)(req, timeout=self.timeout)

    def list_checkpoints(self, workload_id: str = "", tenant: str = "") -> list[M.CheckpointInfo]:
        return self.list_checkpoints_usage(workload_id, tenant)[0]

    def list_checkpoints_usage(self, workload_id: str = "", tenant: str = "") -> tuple[list, list]:
        """The checkpoints, and what each listed tenant's hold against its checkpoint quota (CheckpointUsage)."""
        r = _converting(self._migrations.ListCheckpoints)(
            M.ListCheckpointsRequest(workload_id=workload_id, tenant=tenant), timeout=self.timeout)
        return list(r.checkpoints), list(r.usage)

    def resize(self, slice_id: str, memory_bytes: int = 0, compute_share: float = 0.0, mig_profile: str = "",
               timeout: float | None = None):
        """Change a slice's size, keeping its ID: in place (MPS, time-share) or by migrating its
        workload into a slice of the new size (MIG, or no room on the GPU); returns the slice once
        done. RESOURCE_EXHAUSTED when the new size fits nowhere (the slice is unchanged)."""
        return _converting(self._migrations.Resize)(M.ResizeRequest(
            slice_id=slice_id, memory_bytes=memory_bytes, compute_share=compute_share, mig_profile=mig_profile),
            timeout=timeout or max(self.timeout, 600))


def migration_phase(m: M.Migration) -> str:
    return M.MigrationPhase.Name(m.phase).removeprefix("MIGRATION_PHASE_").lower()


def migration_to_dict(m: M.Migration) -> dict[str, Any]:
    from google.protobuf import json_format
    d = json_format.MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    d["phase"] = migration_phase(m)
    d["mode"] = M.MigrationMode.Name(m.mode).removeprefix("MIGRATION_MODE_").lower()
    return d


def checkpoint_to_dict(c: M.CheckpointInfo) -> dict[str, Any]:
    from google.protobuf import json_format
    return json_format.MessageToDict(c, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
