"""NVML backends: the real ``pynvml`` or the simulated one, same API."""

from __future__ import annotations

import os
from typing import Any

from nodeagent.hostfile import HostSpec

BACKENDS = ("real", "sim")


def load_nvml(backend: str, host_file: str | os.PathLike | HostSpec | None = None,
              state_file: str | os.PathLike | None = None) -> Any:
    """The NVML module to use.

    "real": the ``pynvml`` module. "sim" with ``host_file`` and ``state_file``:
    a new ``sim.SimNvml`` for that host, which has every attribute of the
    pynvml module, so several simulated hosts can live in one process. "sim"
    without them: the ``nodeagent.nvml.sim`` module itself, as configured by
    ``sim.configure`` or GPUMESH_SIM_HOST_FILE/GPUMESH_SIM_STATE_FILE.
    """
    if backend == "real":
        import pynvml

        return pynvml
    if backend == "sim":
        from nodeagent.nvml import sim

        if host_file is None and state_file is None:
            return sim
        if host_file is None or state_file is None:
            raise ValueError("the sim NVML backend needs both host_file and state_file")
        return sim.SimNvml(host_file, state_file)
    raise ValueError(f"unknown NVML backend {backend!r}; allowed: {', '.join(BACKENDS)}")
