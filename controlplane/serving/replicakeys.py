"""The replicas' model-server API keys: one random key per replica, kept in etcd, never returned to tenants.

A replica's model server (llama-cpp-python's or vLLM's OpenAI server, run as a workload on its slice)
listens on `backend_host:port`; without a key anyone who reaches that address could send completions and
bypass the gateway's tenant scoping. So every replica gets its own key:

- made here, by the deployment controller, the first time the replica's backend is started
  (`ensure`: `secrets.token_urlsafe(32)`, 256 random bits), and written to
  `/gpumesh/v1/replica-keys/<deployment>/<replica-id>` (controlplane/state/keys.py) before the backend
  starts; a new leader loads every key (`load`), so a restart of the control plane loses none;
- the same key for the replica's whole life (a crashed backend restarts with it; it is not rotated); a
  new replica, whether a scale-up, a rolling update or a replacement, gets a new one; the key is deleted
  in the same transaction as the replica record (controlplane/serving/deploystore.py);
- delivered to the replica's agent inside the workload (`ServingBackend.api_key`), which hands it to the
  server in its environment only (nodeagent/backends/__init__.py `secret_environment`);
- given to the gateway, an admin, through the serving view (controlplane/serving/viewsvc.py), and used
  by the control plane's own readiness probes (controlplane/serving/actuator.py);
- cleared from every workload the API returns (`redacted`, the one place: WorkloadService Run, Stop,
  Get, List); Replica records never hold it.
"""

from __future__ import annotations

import secrets

from controlplane.state import keys
from controlplane.state.store import Present, Put
from gpumesh.v1 import types_pb2

KEY_BYTES = 32          # secrets.token_urlsafe(32): 43 URL-safe characters


def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


class ReplicaKeys:
    """replica id -> its key, in memory on the leader and durable in etcd (`ctl.store`, `ctl.writer`)."""

    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.keys: dict[str, str] = {}

    async def load(self) -> None:
        snap = await self.ctl.store.load(keys.REPLICA_KEYS)
        for key, (value, _rev, _lease) in snap.kvs.items():
            self.keys[keys.name_of(key, keys.REPLICA_KEYS).rsplit("/", 1)[-1]] = value.decode()

    def get(self, replica_id: str) -> str:
        """The replica's key ("" when it has none yet: its backend never started)."""
        return self.keys.get(replica_id, "")

    async def ensure(self, deployment: str, replica_id: str) -> str:
        """The replica's key, made and written to etcd first when it has none (errors.Aborted when the
        replica's record is gone meanwhile)."""
        key = self.keys.get(replica_id)
        if key:
            return key
        key = new_key()
        # only while the replica's record exists: a key written after the replica's delete would stay forever
        await self.ctl.writer.write([Put(keys.replica_key(deployment, replica_id), key.encode())],
                                    [Present(keys.replica(deployment, replica_id))])
        self.keys[replica_id] = key
        return key

    def forget(self, replica_id: str) -> None:
        """Drop the memory copy (the etcd key goes in the replica's own delete transaction)."""
        self.keys.pop(replica_id, None)

    def of(self, replica_ids) -> dict[str, str]:
        """replica id -> key, for those of `replica_ids` that have one (the serving view's map)."""
        return {rid: self.keys[rid] for rid in replica_ids if rid in self.keys}


def redacted(w: types_pb2.Workload) -> types_pb2.Workload:
    """`w` as the API returns it: a copy without its backend's key (the original is untouched)."""
    if not w.HasField("backend") or not w.backend.api_key:
        return w
    out = types_pb2.Workload()
    out.CopyFrom(w)
    out.backend.ClearField("api_key")
    return out
