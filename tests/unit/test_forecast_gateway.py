"""The gateway's /v1/gpu/memory-forecast answers from a real ForecastService (gRPC over a socket, over a
real history store) where it can forecast, and falls back to the current use, saying why, where it cannot."""

from __future__ import annotations

import math
import time

import grpc

from controlplane.forecast.history import HistoryStore, parse_tiers
from controlplane.forecast.recorder import HistoryRecorder
from controlplane.forecast.service import ForecastService
from controlplane.gateway import gpuapi
from controlplane.gateway.clients import ANONYMOUS
from controlplane.gateway.view import GpuInfo
from gpumesh.v1 import forecast_service_pb2_grpc
from tests.unit.test_gateway_routing import cfg

GIB = 1 << 30


async def test_memory_forecast_from_the_forecast_service(tmp_path):
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "h.db"), parse_tiers(["raw:1d"])))
    now = time.time()
    for i in range(600):        # GPU n/0: memory climbing 10 MiB a second with a wave, the last 10 minutes
        rec.add("gpu", "n/0", "memory_used", 20 * GIB + i * (10 << 20) + (1 << 28) * math.sin(i / 9), at=now - 600 + i)
    await rec.flush()
    server = grpc.aio.server()
    forecast_service_pb2_grpc.add_ForecastServiceServicer_to_server(ForecastService(rec), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        from controlplane.gateway.service import Gateway
        gw = Gateway(cfg(control_plane=f"127.0.0.1:{port}"))
        gw.view.gpus = {("n", 0): GpuInfo("n", 0, 26 * GIB, 80 * GIB, 50, 60, 300, False, True, True),
                        ("n", 1): GpuInfo("n", 1, 5 * GIB, 80 * GIB, 10, 40, 100, False, True, True)}
        got = await gpuapi.memory_forecast(gw, ANONYMOUS, "0.01")         # 36 s ahead
        await gw.http.aclose()
    finally:
        await server.stop(0)
        await rec.stop()
    by = {g["index"]: g for g in got["gpus"]}
    assert got["source"] == "mixed" and "some GPUs" in got["note"]
    g0 = by[0]
    assert g0["source"] == "forecast" and g0["model"] and g0["history_points"] > 200
    # the history climbed to ~25.8 GiB: the forecast goes on from there (not the view's 26 GiB reading)
    assert 25 * GIB < g0["projected_used_bytes"] != 26 * GIB
    assert g0["projected_high_bytes"] >= g0["projected_used_bytes"]
    assert abs(g0["headroom_bytes"] - (80 * GIB - g0["projected_high_bytes"])) <= 1
    g1 = by[1]                                              # no history: the current use, and why
    assert g1["source"] == "current-use" and g1["projected_used_bytes"] == 5 * GIB
    assert "NOT_FOUND" in g1["forecast_error"] and "gpu/n/1 memory_used" in g1["forecast_error"]


async def test_memory_forecast_without_a_control_plane_is_the_current_use():
    from controlplane.gateway.service import Gateway
    gw = Gateway(cfg(control_plane="127.0.0.1:1"))          # nothing listens there
    gw.view.gpus = {("n", 0): GpuInfo("n", 0, 26 * GIB, 80 * GIB, 50, 60, 300, False, True, True)}
    got = await gpuapi.memory_forecast(gw, ANONYMOUS, "2")
    await gw.http.aclose()
    assert got["source"] == "current-use" and got["gpus"][0]["projected_used_bytes"] == 26 * GIB
    assert "UNAVAILABLE" in got["note"]
