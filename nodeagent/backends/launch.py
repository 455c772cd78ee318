"""`python -m nodeagent.backends.launch -- ARGV...`: start a model server with its caches in the workload's
own directory.

A backend runs as a workload: as the tenant's unprivileged uid, in its own directory (the working
directory the shim gives it: its private /tmp inside a mount namespace, `<runner>/<id>.d` without one),
with the agent's environment, whose HOME and caches belong to the agent. vLLM, torch and the Hugging
Face libraries write caches (compiled kernels, model info, the tokenizer's files, usage stats) under
HOME or XDG_CACHE_HOME: this points each of them into `<working directory>/.cache`, which the workload
may write and nobody else reads, then replaces itself with ARGV (no process stays between the shim and
the server, so signals and the exit status are the server's).
"""

from __future__ import annotations

import os
import sys

CACHE_DIR = ".cache"
# each variable and its place under the cache directory
CACHE_VARS = {
    "HOME": "home",
    "XDG_CACHE_HOME": "",
    "XDG_CONFIG_HOME": "config",
    "HF_HOME": "huggingface",
    "VLLM_CACHE_ROOT": "vllm",
    "VLLM_CONFIG_ROOT": "vllm-config",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
    "NUMBA_CACHE_DIR": "numba",
    "OUTLINES_CACHE_DIR": "outlines",
    "CUDA_CACHE_PATH": "nv",
}


def cache_environment(workdir: str) -> dict[str, str]:
    """The cache variables for a workload whose own directory is `workdir`."""
    root = os.path.join(workdir, CACHE_DIR)
    return {var: os.path.join(root, sub) if sub else root for var, sub in CACHE_VARS.items()}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m nodeagent.backends.launch -- PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.update(cache_environment(os.getcwd()))
    for path in {env[v] for v in CACHE_VARS}:
        os.makedirs(path, mode=0o700, exist_ok=True)
    os.execvpe(args[0], args, env)
    return 127   # not reached


if __name__ == "__main__":
    sys.exit(main())
