"""The gpumesh release this code is, and the API it speaks: what `meshctl version`, the control plane's
AdminService.GetVersion and the agents' registrations report, so an operator sees version skew (HA control planes
and agents are upgraded one by one)."""

from __future__ import annotations

import importlib.metadata
import sys

API = "gpumesh.v1"


def _release() -> str:
    try:
        return importlib.metadata.version("gpumesh")
    except importlib.metadata.PackageNotFoundError:     # a source tree on PYTHONPATH, not installed
        return "0+unknown"


VERSION = _release()


def runtime() -> dict[str, str]:
    """Python, grpcio and protobuf versions of this process."""
    import grpc
    import google.protobuf
    return {"python": ".".join(map(str, sys.version_info[:3])), "grpcio": grpc.__version__,
            "protobuf": google.protobuf.__version__}


def minor(version: str) -> str:
    """'0.1' of '0.1.0' (what a skew warning compares: patch releases mix freely)."""
    return ".".join(version.split("+")[0].split(".")[:2])
