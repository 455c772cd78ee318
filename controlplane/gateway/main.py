"""`mesh-gateway`: the GPU-aware, OpenAI-compatible inference gateway (docs/gateway.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from controlplane.gateway.config import GatewayConfig
from mesh import config, logs
from mesh.errors import FailedPrecondition
from mesh.logs import log

logger = logging.getLogger("gateway")


async def serve(cfg: GatewayConfig) -> None:
    import uvicorn

    from controlplane.gateway.app import create_app
    from controlplane.gateway.service import Gateway
    from controlplane.gateway.view import ViewFollower
    from mesh.config import parse_hostport

    gw = Gateway(cfg)
    follower = ViewFollower(gw.view, cfg)
    follower.start()
    await gw.start()
    grpc_server = None
    if cfg.grpc_listen:
        from controlplane.gateway.grpcsvc import start_grpc
        grpc_server = await start_grpc(gw, cfg.grpc_listen, cfg.serve_tls_cert, cfg.serve_tls_key)
    host, port = parse_hostport(cfg.listen, "listen")
    server = uvicorn.Server(uvicorn.Config(create_app(gw), host=host, port=port, log_level="warning",
                                           access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=cfg.shutdown_grace_seconds,
                                           ssl_certfile=cfg.serve_tls_cert or None,
                                           ssl_keyfile=cfg.serve_tls_key or None))
    server.install_signal_handlers = lambda: None
    loop = asyncio.get_running_loop()
    grpc_stopping: list[asyncio.Task] = []

    async def drain() -> None:
        """Not ready first (a balancer stops sending), then stop taking requests; those in flight finish
        within the grace, HTTP and gRPC alike, before the backends' client closes (the finally below)."""
        log(logger, logging.INFO, "shutting down", drain_seconds=cfg.shutdown_drain_seconds,
            grace_seconds=cfg.shutdown_grace_seconds)
        if grpc_server is not None:
            from controlplane.gateway.grpcsvc import set_serving
            await set_serving(gw, False)
        await asyncio.sleep(cfg.shutdown_drain_seconds)
        if grpc_server is not None:
            grpc_stopping.append(asyncio.ensure_future(grpc_server.stop(cfg.shutdown_grace_seconds)))
        server.should_exit = True

    def on_signal() -> None:
        if gw.draining:
            server.force_exit = True            # a second signal: no more waiting
            return
        gw.draining = True
        loop.create_task(drain())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    async def announce():
        while not server.started:
            await asyncio.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()
        log(logger, logging.INFO, "serving", http=f"{bound[0]}:{bound[1]}", policy=cfg.policy,
            control_plane=cfg.control_plane, authentication="tenants file" if cfg.tenants_file else "none")
        if grpc_server is not None:
            host_g = cfg.grpc_listen.rpartition(":")[0] or "0.0.0.0"
            log(logger, logging.INFO, "serving gRPC InferenceService", grpc=f"{host_g}:{gw.grpc_port}")
            print(f"GATEWAY_GRPC_LISTENING {host_g}:{gw.grpc_port}", flush=True)
        print(f"GATEWAY_LISTENING {bound[0]}:{bound[1]}", flush=True)
    asyncio.get_running_loop().create_task(announce())
    try:
        await server.serve()
    finally:
        if grpc_server is not None:             # before the backends' client closes: streams in flight finish
            await (grpc_stopping[0] if grpc_stopping else grpc_server.stop(cfg.shutdown_grace_seconds))
        await follower.stop()
        await gw.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mesh-gateway",
        description="gpumesh inference gateway: OpenAI-compatible HTTP in front of the deployments' replicas, "
                    "routed by GPU memory pressure, temperature, latency, load and failures.",
        epilog="example: mesh-gateway --control-plane 127.0.0.1:50051 --insecure --listen 0.0.0.0:8080")
    config.add_arguments(parser, GatewayConfig)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", default="json", choices=("json", "text"))
    args = parser.parse_args(argv)
    try:
        cfg = config.load(GatewayConfig, args)
    except config.ConfigError as e:
        print(f"mesh-gateway: configuration error: {e}", file=sys.stderr)
        return 2
    logs.setup("gateway", args.log_level, args.log_format)
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    except FailedPrecondition as e:          # e.g. the semantic cache's model is not installed
        print(f"mesh-gateway: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
