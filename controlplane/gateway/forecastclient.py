"""The gateway's calls to the control plane's ForecastService (for `/v1/gpu/memory-forecast`): one channel
per question (it is not on the request path of inference), trying each control plane in turn (a standby
answers UNAVAILABLE), bounded by a deadline. A control plane without the service, or one that cannot
forecast a GPU yet (history too short), leaves that GPU to the caller's fallback with the reason."""

from __future__ import annotations

import asyncio

import grpc

from gpumesh.v1 import forecast_service_pb2 as F
from gpumesh.v1 import forecast_service_pb2_grpc

DEADLINE_S = 20.0


def _channel(cfg, target: str) -> grpc.aio.Channel:
    if cfg.insecure:
        return grpc.aio.insecure_channel(target)
    with open(cfg.tls_ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.aio.secure_channel(target, creds)


async def gpu_memory(cfg, gpus: list[tuple[str, int]], horizon_s: float) -> dict:
    """(node, index) -> GetForecastResponse, or the reason (a string) there is none."""
    md = (("authorization", f"Bearer {cfg.token}"),) if cfg.token else None
    targets = [t.strip() for t in cfg.control_plane.split(",") if t.strip()]
    why = "no control plane configured"
    for target in targets:
        try:
            async with _channel(cfg, target) as ch:
                stub = forecast_service_pb2_grpc.ForecastServiceStub(ch)

                async def one(g):
                    try:
                        return await stub.GetForecast(F.GetForecastRequest(
                            kind="gpu", name=f"{g[0]}/{g[1]}", metric="memory_used", horizon_seconds=horizon_s),
                            metadata=md, timeout=DEADLINE_S)
                    except grpc.aio.AioRpcError as e:
                        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
                            raise
                        return f"{e.code().name}: {e.details()}"
                got = await asyncio.wait_for(asyncio.gather(*(one(g) for g in gpus)), DEADLINE_S + 5)
                return dict(zip(gpus, got))
        except grpc.aio.AioRpcError as e:
            why = ("the control plane has no forecasting service" if e.code() == grpc.StatusCode.UNIMPLEMENTED
                   else f"{target}: {e.code().name}: {e.details()}")
        except (asyncio.TimeoutError, OSError) as e:
            why = f"{target}: {e!r}"
    return {g: why for g in gpus}
