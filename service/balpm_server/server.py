"""The balpm gRPC server: wiring, health, reflection, graceful shutdown.

`create_server(settings)` builds and starts a server and returns it with its bound
port; `serve()` runs until SIGTERM/SIGINT; `main()` is the `balpm-server` entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from balpm.v1 import balpm_pb2, balpm_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from balpm_server.domain.service import PoolService
from balpm_server.features import FeatureExtractor, build_extractor
from balpm_server.features.cache import CachedExtractor
from balpm_server.logs import setup_logging
from balpm_server.settings import Settings
from balpm_server.transport.servicer import BalpmServicer

log = logging.getLogger(__name__)
SERVICE_NAME = balpm_pb2.DESCRIPTOR.services_by_name["BalpmService"].full_name


@dataclass
class RunningServer:
    """A started server with the objects tests and `serve` need."""

    server: grpc.aio.Server
    port: int
    service: PoolService
    health: health.aio.HealthServicer

    async def stop(self, grace_s: float | None = None) -> None:
        """Flip health to NOT_SERVING, drain in-flight RPCs for `grace_s`, then stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.service.close()


async def create_server(settings: Settings) -> RunningServer:
    """Build, bind and start the server; health turns SERVING once state is restored.

    Args:
        settings: Server settings (port 0 binds a free port).

    Returns:
        The running server and its bound port.
    """
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    server = grpc.aio.server(options=options)
    extractor: FeatureExtractor | None = None
    if settings.extractor:
        extractor = CachedExtractor(build_extractor(settings), settings.data_path / "feature_cache.sqlite3")
    service = PoolService(settings, extractor)
    balpm_pb2_grpc.add_BalpmServiceServicer_to_server(BalpmServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{settings.host}:{settings.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    await server.start()
    await service.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("balpm server listening", extra={"address": f"{settings.host}:{port}"})
    return RunningServer(server, port, service, health_servicer)


async def serve(settings: Settings) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully."""
    running = await create_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"balpm-server listening on {settings.host}:{running.port}", flush=True)
    await stop.wait()
    log.info("shutting down", extra={"grace_s": settings.shutdown_grace_s})
    await running.stop(settings.shutdown_grace_s)


def build_arg_parser() -> argparse.ArgumentParser:
    """The `balpm-server` command line (every flag also has a BALPM_* env var)."""
    p = argparse.ArgumentParser(prog="balpm-server", description="balpm acquisition service")
    p.add_argument("--host", help="bind address (BALPM_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port, 0 = any free port (BALPM_PORT, default 50051)")
    p.add_argument("--data-dir", help="state folder (BALPM_DATA_DIR, default ./balpm-data)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port, -1 disables (BALPM_METRICS_PORT)")
    p.add_argument("--extractor", choices=["transformers", "triton"], help="feature extractor (BALPM_EXTRACTOR)")
    p.add_argument("--model-path", help="local model folder for the in-process extractor (BALPM_MODEL_PATH)")
    p.add_argument("--triton-url", help="Triton gRPC host:port (BALPM_TRITON_URL)")
    p.add_argument("--api-keys-file", help="JSON file of hashed API keys (BALPM_API_KEYS_FILE)")
    p.add_argument("--tls-cert-file", help="server certificate PEM (BALPM_TLS_CERT_FILE)")
    p.add_argument("--tls-key-file", help="server key PEM (BALPM_TLS_KEY_FILE)")
    p.add_argument("--tls-client-ca-file", help="client CA PEM; enables mutual TLS (BALPM_TLS_CLIENT_CA_FILE)")
    p.add_argument("--insecure", action="store_true", default=None, help="allow plaintext on non-loopback hosts")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of `balpm-server`."""
    args = build_arg_parser().parse_args(argv)
    settings = Settings.from_env(**{k: v for k, v in vars(args).items() if v is not None})
    setup_logging(settings.log_level, json_lines=settings.log_json)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
