"""The etcd key layout (every key under one versioned prefix).

| key | value | written by |
| --- | --- | --- |
| `/gpumesh/v1/leader` | leader identity; bound to the leader's session lease | leader election |
| `/gpumesh/v1/barrier` | empty (a fenced write whose answer settles an earlier lost one, state/fencedcommit.py `_barrier`) | the leader's etcd store |
| `/gpumesh/v1/nodes/<node>` | `gpumesh.v1.Node` (inventory, cordon, draining, deleting, registration) | Register, cordon, drain, DeleteNode (its marker; deleted last) |
| `/gpumesh/v1/alive/<node>` | agent session id; bound to the node's lease | Register (lease kept by Heartbeat) |
| `/gpumesh/v1/slices/<slice-id>` | `gpumesh.v1.Slice` (spec, placement, state) | Allocate, agent status, Release |
| `/gpumesh/v1/requests/<tenant>/<request-id>` | `{"id": allocation id, "fingerprint": "sha256:..."}`, or a bare allocation id from earlier versions (idempotency of Allocate: state/requestids.py; expires after 24-25 h through a lease) | Allocate |
| `/gpumesh/v1/workloads/<workload-id>` | `gpumesh.v1.Workload` (command, slice, state, exit code; a replica's backend with its API key, which every API answer clears) | Run, Stop, agent workload reports |
| `/gpumesh/v1/gpuhealth/<node>/<index>` | `gpumesh.v1.GpuTelemetry` (health, reason, since, recovery, incidents) | health changes (controlplane/controllers/health.py) |
| `/gpumesh/v1/mesh/<connection-id>` | `gpumesh.v1.MeshConnection` (slices, transport, both buffer descriptors, state) | MeshService Connect/Disconnect, slice release, agent restart |
| `/gpumesh/v1/meshgrants/<from-tenant>/<to-tenant>` | `gpumesh.v1.MeshGrant` (admin: cross-tenant connections allowed) | MeshService Grant |
| `/gpumesh/v1/migrations/<migration-id>` | `gpumesh.v1.Migration` (phase of the state machine, source, target, progress) | MigrationService, agent migration reports, recovery at start |
| `/gpumesh/v1/checkpoints/<checkpoint-id>` | `gpumesh.v1.CheckpointInfo` (workload, store path, step, size) | MigrationService Checkpoint |
| `/gpumesh/v1/models/<model-name>` | `gpumesh.v1.Model` (family, labels, variants with backend, artifact, facts, VRAM need, measurements) | ModelService Register/Update/Delete (admin) |
| `/gpumesh/v1/checkpoint-keys/<checkpoint-id>` | 32 random bytes: the key a stored checkpoint of a tenant without a `checkpoint_keys_file` key is sealed with (control plane only; sent to the agents that write and restore it) | MigrationService Checkpoint |
| `/gpumesh/v1/migration-secrets/<migration-id>` | 32 random bytes: the migration's transfer secret (control plane only; sent to the two agents; deleted when the migration ends) | migration planning |
| `/gpumesh/v1/replica-keys/<deployment>/<replica-id>` | the replica's model-server API key (text, `secrets.token_urlsafe(32)`; control plane only; sent to the replica's agent in its workload and to admins' serving view, never in a Replica or Workload the API returns; deleted with the replica) | the deployment controller (controlplane/serving/replicakeys.py) |
| `/gpumesh/v1/deployments/<name>` | `gpumesh.v1.Deployment` (spec, generation, conditions; replicas empty) | DeploymentService, the deployment controller |
| `/gpumesh/v1/replicas/<deployment>/<replica-id>` | `gpumesh.v1.Replica` (slice, workload, endpoint, state, restarts) | the deployment controller |
| `/gpumesh/v1/pools/<name>` | `gpumesh.v1.Pool` (selector, quota, generation; usage empty) | PoolService Create/Update/Delete (admin) |
| `/gpumesh/v1/cost/accounted` | `{"t": seconds}`: the time up to which the leader's cost accountant has charged every live slice into its ledger (a new leader, whose host's ledger may not know them, charges none before it: controlplane/cost/accountant.py) | the cost accountant, after each accounting written to its ledger |
| `/gpumesh/v1/events/<event-id>` | `gpumesh.v1.Event` (object kind and name, tenant, type, reason, message, count, first and last time); expires after `events_retention_seconds`, at most `events_kept` of them | the leader's event recorder (controlplane/events/recorder.py), rewritten when the event repeats; deleted by the retention sweep |

Values are serialized protobuf messages of the v1 API. Every write is one
transaction guarded by the leader key's create revision (fencing) plus
per-key preconditions (create: the key is absent; update: the key exists).
"""

PREFIX = "/gpumesh/v1/"
LEADER = PREFIX + "leader"
BARRIER = PREFIX + "barrier"
"""empty; rewritten (fenced) after a write whose answer was lost, before it is judged not applied
(state/fencedcommit.py `_barrier`): everything proposed before it is applied by then."""
NODES = PREFIX + "nodes/"
ALIVE = PREFIX + "alive/"
SLICES = PREFIX + "slices/"
REQUESTS = PREFIX + "requests/"
WORKLOAD_REQUESTS = PREFIX + "workload-requests/"   # Run's request ids, under the same lease as Allocate's
WORKLOADS = PREFIX + "workloads/"
GPU_HEALTH = PREFIX + "gpuhealth/"
MESH = PREFIX + "mesh/"
MESH_GRANTS = PREFIX + "meshgrants/"
MIGRATIONS = PREFIX + "migrations/"
CHECKPOINTS = PREFIX + "checkpoints/"
MODELS = PREFIX + "models/"
CHECKPOINT_KEYS = PREFIX + "checkpoint-keys/"
"""a stored checkpoint's own key (raw bytes) for tenants without a key of their own: read by the control plane
only, sent to the agents that write and restore it; kept as long as the checkpoint record."""
MIGRATION_SECRETS = PREFIX + "migration-secrets/"
"""a migration's transfer secret (raw bytes): read by the control plane only, sent to the two agents
in their MigrationCommands; never part of a record the API returns; deleted when the migration ends."""
REPLICA_KEYS = PREFIX + "replica-keys/"
"""a replica's model-server API key: read by the control plane only, sent to the agent that runs the replica
(in the workload's backend) and to admins' serving view (the gateway); deleted with the replica record."""
DEPLOYMENTS = PREFIX + "deployments/"
REPLICAS = PREFIX + "replicas/"
EVENTS = PREFIX + "events/"
POOLS = PREFIX + "pools/"
COST_ACCOUNTED = PREFIX + "cost/accounted"
"""durable events (controlplane/events/): bounded by age and count, expired by the retention sweep."""


def node(name: str) -> bytes:
    return (NODES + name).encode()


def alive(name: str) -> bytes:
    return (ALIVE + name).encode()


def slice_(slice_id: str) -> bytes:
    return (SLICES + slice_id).encode()


def request(tenant: str, request_id: str) -> bytes:
    return (REQUESTS + tenant + "/" + request_id).encode()


def workload_request(tenant: str, request_id: str) -> bytes:
    return (WORKLOAD_REQUESTS + tenant + "/" + request_id).encode()


def gpu_health(node_name: str, index: int) -> bytes:
    return f"{GPU_HEALTH}{node_name}/{index}".encode()


def workload(workload_id: str) -> bytes:
    return (WORKLOADS + workload_id).encode()


def name_of(key: bytes, prefix: str) -> str:
    return key.decode()[len(prefix):]


def mesh(connection_id: str) -> bytes:
    return (MESH + connection_id).encode()


def mesh_grant(from_tenant: str, to_tenant: str) -> bytes:
    return f"{MESH_GRANTS}{from_tenant}/{to_tenant}".encode()


def migration(migration_id: str) -> bytes:
    return (MIGRATIONS + migration_id).encode()


def checkpoint_key(checkpoint_id: str) -> bytes:
    return (CHECKPOINT_KEYS + checkpoint_id).encode()


def migration_secret(migration_id: str) -> bytes:
    return (MIGRATION_SECRETS + migration_id).encode()


def checkpoint(checkpoint_id: str) -> bytes:
    return (CHECKPOINTS + checkpoint_id).encode()


def model(name: str) -> bytes:
    return (MODELS + name).encode()


def deployment(name: str) -> bytes:
    return (DEPLOYMENTS + name).encode()


def replica(deployment_name: str, replica_id: str) -> bytes:
    return f"{REPLICAS}{deployment_name}/{replica_id}".encode()


def replica_key(deployment_name: str, replica_id: str) -> bytes:
    return f"{REPLICA_KEYS}{deployment_name}/{replica_id}".encode()


def event(event_id: str) -> bytes:
    return (EVENTS + event_id).encode()


def pool(name: str) -> bytes:
    return (POOLS + name).encode()
