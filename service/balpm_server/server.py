"""The balpm gRPC server: wiring, security, metrics, health, reflection, graceful shutdown.

`create_server(settings)` builds and starts a server and returns it with its bound
ports; `serve()` runs until SIGTERM/SIGINT (SIGHUP reloads the API keys); `main()` is
the `balpm-server` entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from balpm.v1 import balpm_pb2, balpm_pb2_grpc
from balpm_server import errors, metrics
from balpm_server.auth import KeyStore
from balpm_server.domain.cluster import default_replica_id
from balpm_server.domain.service import PoolService
from balpm_server.features import FeatureExtractor, build_extractor
from balpm_server.features.cache import CachedExtractor
from balpm_server.logs import setup_logging
from balpm_server.settings import ENV_PREFIX, Settings
from balpm_server.storage import SqlStore, faults
from balpm_server.storage.faults import storage_error
from balpm_server.tracing import setup_tracing  # imports OpenTelemetry only when BALPM_OTLP_ENDPOINT is set
from balpm_server.transport.forwarding import Forwarder
from balpm_server.transport.interceptors import ServerInterceptor
from balpm_server.transport.servicer import BalpmServicer

log = logging.getLogger(__name__)
SERVICE_NAME = balpm_pb2.DESCRIPTOR.services_by_name["BalpmService"].full_name


class StartupError(RuntimeError):
    """The server cannot start for a reason the operator must fix (printed as one `error:` line)."""


def _writable(folder: Path) -> bool:
    """Whether `folder` (or, when it is missing, its nearest existing parent) is writable (read-only mounts too)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def _data_dir_error(settings: Settings, exc: BaseException) -> StartupError | None:
    """A StartupError for a data dir the stores cannot be opened in (full, read-only, broken), else None."""
    fault = storage_error(exc)
    if fault is not None and fault.reason == faults.DATABASE_UNAVAILABLE:
        return StartupError(f"cannot reach the database {_database_shown(settings)}: {fault.message}")
    if fault is not None and fault.reason == faults.STORAGE_UNAVAILABLE and not _writable(settings.data_path):
        fault = errors.Unavailable(faults.MESSAGES[faults.STORAGE_READ_ONLY], reason=faults.STORAGE_READ_ONLY)
    if fault is not None:
        return StartupError(f"cannot use data dir {settings.data_path}: {fault.message} [{fault.reason}]")
    if faults.is_database_error(exc):
        return StartupError(f"cannot open the store in data dir {settings.data_path}: {exc}")
    return None


@dataclass
class RunningServer:
    """A started server with the objects tests and `serve` need."""

    server: grpc.aio.Server
    port: int
    service: PoolService
    health: health.aio.HealthServicer
    keys: KeyStore | None = None
    metrics_port: int | None = None
    _metrics_http: Any = field(default=None, repr=False)
    _counted: SqlStore | None = field(default=None, repr=False)  # registered with the metrics collector
    _forwarder: Forwarder | None = field(default=None, repr=False)

    async def stop(self, grace_s: float | None = None) -> None:
        """Flip health to NOT_SERVING, hand the pools over (cluster mode), drain in-flight RPCs for `grace_s`, stop."""
        await self.health.enter_graceful_shutdown()
        await self.service.drain()  # calls arriving meanwhile are forwarded to the pools' new owners
        await self.server.stop(grace_s)
        await self.service.close()
        if self._forwarder is not None:
            await self._forwarder.close()
        if self._counted is not None:
            metrics.STORE_COLLECTOR.remove(self._counted)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


def is_loopback(host: str) -> bool:
    """Whether a bind host only accepts local connections ("localhost", 127.0.0.0/8, ::1)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from the settings' PEM files; None means plaintext.

    Raises:
        ValueError: Incomplete TLS settings, or plaintext on a non-loopback host without `insecure`.
        OSError: A PEM file cannot be read.
    """
    if settings.tls_cert_file or settings.tls_key_file:
        if not (settings.tls_cert_file and settings.tls_key_file):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        cert = Path(settings.tls_cert_file).read_bytes()
        key = Path(settings.tls_key_file).read_bytes()
        client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
    if settings.tls_client_ca_file:
        raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
    if not is_loopback(settings.host) and not settings.insecure:
        raise ValueError(
            f"refusing plaintext gRPC on non-loopback host {settings.host!r}: "
            "set tls_cert_file/tls_key_file, or pass --insecure (BALPM_INSECURE=true)"
        )
    return None


def start_metrics_http(settings: Settings) -> tuple[Any, int | None]:
    """Start the Prometheus `/metrics` HTTP server (port 0 = free port, -1 = disabled).

    Returns:
        (the HTTP server or None, its bound port or None).
    """
    if settings.metrics_port < 0:
        return None, None
    from prometheus_client import start_http_server

    http_server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    return http_server, int(http_server.server_port)


async def create_server(settings: Settings) -> RunningServer:
    """Build, bind and start the server; health turns SERVING once state is restored.

    Args:
        settings: Server settings (port 0 binds a free port).

    Returns:
        The running server and its bound port.
    """
    credentials = server_credentials(settings)
    keys = KeyStore(settings.api_keys_file) if settings.api_keys_file else None
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    interceptor = ServerInterceptor(keys, SERVICE_NAME)
    tracing = setup_tracing(settings, settings.replica_id or default_replica_id())
    traced = tracing.server_interceptors() if tracing is not None else []  # first: their spans cover auth failures
    server = grpc.aio.server(options=options, interceptors=[*traced, interceptor])
    if tracing is not None:
        tracing.stop_with(server)  # flushes the spans and uninstruments once the server has stopped
    extractor: FeatureExtractor | None = None
    try:  # opens (creates) the stores in the data dir
        if settings.extractor:
            extractor = CachedExtractor(
                metrics.InstrumentedExtractor(build_extractor(settings), settings.extractor),
                settings.data_path / "feature_cache.sqlite3",
            )
        service = PoolService(settings, extractor)
    except Exception as e:
        if (err := _data_dir_error(settings, e)) is not None:
            raise err from e
        raise
    if service.cluster is not None:  # pool-scoped calls go to the pool's owner replica
        interceptor.forwarder = Forwarder(service.cluster, settings, SERVICE_NAME)
    balpm_pb2_grpc.add_BalpmServiceServicer_to_server(BalpmServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    await server.start()
    try:
        # Writes to the store (interrupted operations); in cluster mode, joins at the advertised address.
        await service.start(settings.advertise_address or f"{settings.host}:{port}")
    except Exception as e:
        await server.stop(None)
        await service.close()
        if (err := _data_dir_error(settings, e)) is not None:
            raise err from e
        raise
    metrics.STORE_COLLECTOR.add(service.store)
    http_server, metrics_port = start_metrics_http(settings)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "balpm server listening",
        extra={
            "address": f"{settings.host}:{port}",
            "tls": credentials is not None,
            "mutual_tls": bool(settings.tls_client_ca_file),
            "auth": keys is not None,
            "metrics_port": metrics_port,
        },
    )
    return RunningServer(
        server, port, service, health_servicer, keys, metrics_port, http_server, service.store, interceptor.forwarder
    )


async def check_extractor(extractor: FeatureExtractor | None, settings: Settings, timeout_s: float = 60.0) -> bool:
    """Ask the extractor for its dimension once at start-up and log the answer (a reachability check).

    A Triton that is down or misconfigured is reported here, in the first lines of the log, instead of
    at the first upload; the server keeps running either way (Triton may come up later).
    """
    if extractor is None or settings.extractor != "triton":
        return True
    try:
        dim = await asyncio.wait_for(extractor.dim(), timeout_s)
    except (errors.BalpmError, asyncio.TimeoutError) as e:
        why = e.message if isinstance(e, errors.BalpmError) else f"no answer in {timeout_s:g} s"
        log.warning("Triton at %s is not usable yet: %s; server-feature pools wait for it", settings.triton_url, why)
        return False
    log.info("Triton at %s serves %s with dimension %d", settings.triton_url, settings.triton_model, dim)
    return True


async def serve(settings: Settings) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully."""
    running = await create_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if running.keys is not None:
        loop.add_signal_handler(signal.SIGHUP, running.keys.reload)
    metrics_note = f", metrics on {settings.metrics_host}:{running.metrics_port}" if running.metrics_port else ""
    print(f"balpm-server listening on {settings.host}:{running.port}{metrics_note}", flush=True)
    check = loop.create_task(check_extractor(running.service.extractor, settings))
    await stop.wait()
    check.cancel()
    log.info("shutting down: draining in-flight RPCs", extra={"grace_s": settings.shutdown_grace_s})
    await running.stop(settings.shutdown_grace_s)
    log.info("stopped")


def build_arg_parser() -> argparse.ArgumentParser:
    """The `balpm-server` command line (every flag also has a BALPM_* env var)."""
    p = argparse.ArgumentParser(prog="balpm-server", description="balpm acquisition service")
    p.add_argument("--host", help="bind address (BALPM_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port, 0 = any free port (BALPM_PORT, default 50051)")
    p.add_argument("--data-dir", help="state folder (BALPM_DATA_DIR, default ./balpm-data)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = free port, -1 disables (BALPM_METRICS_PORT)")
    p.add_argument("--metrics-host", help="Prometheus bind address (BALPM_METRICS_HOST, default 127.0.0.1)")
    p.add_argument("--extractor", choices=["transformers", "triton"], help="feature extractor (BALPM_EXTRACTOR)")
    p.add_argument("--model-path", help="local model folder for the in-process extractor (BALPM_MODEL_PATH)")
    p.add_argument("--triton-url", help="Triton gRPC host:port (BALPM_TRITON_URL)")
    p.add_argument("--api-keys-file", help="JSON file of hashed API keys (BALPM_API_KEYS_FILE)")
    p.add_argument("--tls-cert-file", help="server certificate PEM (BALPM_TLS_CERT_FILE)")
    p.add_argument("--tls-key-file", help="server key PEM (BALPM_TLS_KEY_FILE)")
    p.add_argument("--tls-client-ca-file", help="client CA PEM; enables mutual TLS (BALPM_TLS_CLIENT_CA_FILE)")
    p.add_argument(
        "--insecure", action="store_true", default=None, help="allow plaintext on non-loopback hosts (BALPM_INSECURE)"
    )
    p.add_argument("--shutdown-grace-s", type=float, help="SIGTERM drain time in seconds (BALPM_SHUTDOWN_GRACE_S)")
    p.add_argument(
        "--check-storage", action="store_true", default=None,
        help="connect to the database (migrating its schema) and write, read and delete a probe object in the "
        "artifact store, print one line per store, then exit: 0 when both work, 2 with an error: line otherwise",
    )
    _add_setting_flags(p)
    return p


def _setting_docs() -> dict[str, str]:
    """Each Settings field's description, from the class docstring's Attributes section."""
    docs: dict[str, str] = {}
    name = ""
    for line in (Settings.__doc__ or "").splitlines():
        match = re.match(r"^ {8}(\w+): (.*)$", line)
        if match:
            name, docs[match[1]] = match[1], match[2].strip()
        elif name and line.startswith(" " * 12):
            docs[name] += " " + line.strip()
        else:
            name = ""
    return docs


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    """A flag for every Settings field the parser has none for yet (`--triton-model`, `--pooling`, ...)."""
    taken = {a.dest for a in p._actions}
    docs = _setting_docs()
    kinds: dict[str, Any] = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(Settings):
        if f.name.startswith("_") or f.name in taken or str(f.type) not in (*kinds, "bool"):
            continue
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{docs.get(f.name, f.name)} ({env}, default {default!r})".replace("%", "%%")
        if str(f.type) == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, type=kinds[str(f.type)], default=None, help=text)


def _database_shown(settings: Settings) -> str:
    """The configured database, as it may be printed (no password)."""
    url = settings.database_url.strip()
    if url.startswith(("postgresql://", "postgres://")):
        from balpm_server.storage.postgres_store import redact

        return redact(url)
    return url or str(settings.data_path / "balpm.sqlite3")


def check_storage(settings: Settings) -> list[str]:
    """Open the metadata store (migrating it) and probe the artifact store; one line about each.

    Raises:
        StartupError: A store is unreachable or misconfigured (the message says which and why).
    """
    from balpm_server.storage import open_store
    from balpm_server.storage.artifacts import ArtifactStoreError, open_artifact_store

    try:
        store = open_store(
            settings.database_url, settings.data_path, connect_timeout_s=settings.database_connect_timeout_s
        )
    except errors.BalpmError as e:
        raise StartupError(f"database {_database_shown(settings)}: {e.message} [{e.reason}]") from e
    except Exception as e:
        fault = storage_error(e)
        shown = f"{fault.message} [{fault.reason}]" if fault is not None else str(e).strip().splitlines()[0]
        raise StartupError(f"database {_database_shown(settings)}: cannot open it: {shown}") from e
    try:
        where = store.describe()
        counts = store.counts()
    finally:
        store.close()
    pools = sum(counts.pools_by_state.values()) if counts else 0
    lines = [f"database ok: {where} (schema up to date, {pools} pools)"]
    try:
        artifacts = open_artifact_store(
            settings.artifact_url, cache_dir=settings.data_path / "artifact-cache",
            cache_max_bytes=settings.artifact_cache_bytes,
        )
        if artifacts is None:
            lines.append(f"artifact store ok: the data dir {settings.data_path} (no BALPM_ARTIFACT_URL)")
        else:
            artifacts.check()
            lines.append(f"artifact store ok: {artifacts.url} (probe object written, read and deleted)")
    except ArtifactStoreError as e:
        raise StartupError(f"artifact store: {e}") from e
    return lines


def main(argv: list[str] | None = None) -> None:
    """Entry point of `balpm-server`."""
    args = build_arg_parser().parse_args(argv)
    check_only = bool(args.check_storage)
    settings = Settings.from_env(**{k: v for k, v in vars(args).items() if v is not None and k != "check_storage"})
    setup_logging(settings.log_level, json_lines=settings.log_json)
    if check_only:
        try:
            for line in check_storage(settings):
                print(line, flush=True)
        except (ValueError, OSError, StartupError) as e:
            print(f"balpm-server: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        return
    try:
        asyncio.run(serve(settings))
    # Bad TLS/auth configuration, or a data dir on a full or read-only disk: a clear message, not a traceback.
    except (ValueError, OSError, StartupError) as e:
        log.error("balpm-server cannot start: %s", e)
        print(f"balpm-server: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
