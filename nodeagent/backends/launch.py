"""`python -m nodeagent.backends.launch [--artifact PATH --sha256 HEX] -- ARGV...`: start a model server with
its caches in the workload's own directory, on the registered weights only.

With `--artifact` and `--sha256` (the replica's `ServingBackend.artifact_sha256`, pinned by the registry),
the launcher first hashes the artifact (mesh/models/digest.py) and exits with status 65 (EX_DATAERR) and a
line on stderr naming both digests when it is not the registered one: the check runs in the workload, as the
tenant's uid and under its confinement, so it reads only what the server could read, costs the agent nothing,
and happens just before the server opens the same files.

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


USAGE = "usage: python -m nodeagent.backends.launch [--artifact PATH --sha256 HEX] -- PROGRAM [ARGS...]"
EX_DATAERR = 65


def split_options(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """(--artifact/--sha256 options, the program's argv after `--`); ValueError for anything else."""
    opts: dict[str, str] = {}
    while args and args[0] != "--":
        if args[0] not in ("--artifact", "--sha256") or len(args) < 2:
            raise ValueError(f"unknown option {args[0]!r}")
        opts[args[0][2:]] = args[1]
        args = args[2:]
    if ("artifact" in opts) != ("sha256" in opts):
        raise ValueError("--artifact and --sha256 go together")
    return opts, args[1:]


def verify(opts: dict[str, str]) -> str:
    """'' when there is nothing to check or the artifact is the registered one, else why not."""
    if not opts:
        return ""
    from mesh.models.digest import ArtifactDigests, DigestMismatch
    try:
        ArtifactDigests().verify(opts["artifact"], opts["sha256"])
    except DigestMismatch as e:
        return str(e)
    except OSError as e:
        return f"artifact {opts['artifact']}: cannot be read: {e.strerror or e}"
    return ""


def main(argv: list[str] | None = None) -> int:
    try:
        opts, args = split_options(list(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        print(f"{USAGE}\n{e}", file=sys.stderr)
        return 2
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    why = verify(opts)
    if why:
        print(f"gpumesh: {why}", file=sys.stderr, flush=True)
        return EX_DATAERR
    env = dict(os.environ)
    env.update(cache_environment(os.getcwd()))
    for path in {env[v] for v in CACHE_VARS}:
        os.makedirs(path, mode=0o700, exist_ok=True)
    os.execvpe(args[0], args, env)
    return 127   # not reached


if __name__ == "__main__":
    sys.exit(main())
