"""The balpm Python SDK: `Client` (blocking) and `balpm.AsyncClient` (asyncio), over the balpm.v1 gRPC API.

    with balpm.Client("127.0.0.1:50051") as client:
        client.create_pool("demo")
        client.upload_items("demo", items)
        batch = client.acquire("demo", batch_size=32, strategy="BALPM")

Both clients have the same methods; what each does is written once in `balpm._plans` (with the
request builders of `balpm.messages`) and run here with blocking gRPC calls. Every failure is a
`balpm.errors.BalpmError` subclass. Every call has a deadline: `timeout_s` (default 60 s) for unary
calls, `long_timeout_s` (default 1 h) for uploads and exports, and the caller's `timeout_s` for waits.
The idempotent methods (`RETRY_METHODS`) are retried on UNAVAILABLE by gRPC itself, through the
channel's service config (`service_config`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from balpm import _plans as plans
from balpm.errors import UnavailableError, from_rpc_error
from balpm.messages import PREFERENCES, STRATEGIES, UploadSummary, item_message, strategy_number
from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc

T = TypeVar("T")
SERVICE = "balpm.v1.BalpmService"
#: Methods gRPC retries on UNAVAILABLE: the read-only ones, IngestLabels (idempotent by label_id and
#: request_id: a replay is counted as duplicates), UpdateItemScores (sets absolute values) and
#: CancelOperation (a second request changes nothing). Not retried: CreatePool and DeletePool (a replay
#: answers ALREADY_EXISTS / NOT_FOUND), UploadItems (client streaming, beyond gRPC's retry buffer),
#: UpdatePosterior (starts training), AcquireBatch (leases) and ReleaseItems (with annotator_id "" a
#: replay could end another annotator's new lease).
RETRY_METHODS = (
    "GetPool",
    "ListPools",
    "GetOperation",
    "WatchOperation",
    "CancelOperation",
    "ExportLabels",
    "ExportItems",
    "Predict",
    "Evaluate",
    "GetLearningCurve",
    "IngestLabels",
    "UpdateItemScores",
    "ExcludeItems",
)
#: gRPC retry policy of RETRY_METHODS: up to 5 attempts, exponential backoff 0.2 s .. 5 s (jittered by gRPC).
RETRY_POLICY: Mapping[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
#: Deadline of Predict and Evaluate (they may featurise ad-hoc texts) when `timeout_s` is shorter.
SLOW_TIMEOUT_S = 600.0
MAX_MESSAGE_BYTES = 64 << 20


def service_config(*, retry: bool = True) -> dict[str, Any]:
    """The gRPC service config of the SDK's channels (`grpc.service_config`): RETRY_POLICY for RETRY_METHODS."""
    if not retry:
        return {}
    names = [{"service": SERVICE, "method": method} for method in RETRY_METHODS]
    return {"methodConfig": [{"name": names, "retryPolicy": dict(RETRY_POLICY)}]}


def channel_options(options: Sequence[tuple[str, Any]] = (), *, retry: bool = True) -> list[tuple[str, Any]]:
    """The channel options of a client: 64 MiB messages, the service config; `options` override them."""
    opts: dict[str, Any] = {
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.enable_retries": 1 if retry else 0,
    }
    if retry:
        opts["grpc.service_config"] = json.dumps(service_config())
    opts.update(dict(options))
    return list(opts.items())


class ClientBase:
    """What `Client` and `AsyncClient` share: the channel's options, credentials, metadata and deadlines.

    Args:
        target: Server address "host:port".
        api_key: Bearer token sent as `authorization: Bearer <key>` metadata.
        root_certificates: PEM CA bundle; enables TLS when given (or when `tls` is True).
        private_key: Client key PEM for mutual TLS.
        certificate_chain: Client certificate PEM for mutual TLS.
        tls: Use TLS with the system roots.
        timeout_s: Deadline of unary calls (Predict and Evaluate: at least SLOW_TIMEOUT_S).
        long_timeout_s: Deadline of uploads and exports (streams).
        retry: Retry the idempotent methods (RETRY_METHODS) on UNAVAILABLE.
        options: Extra channel options (override the SDK's, e.g. ("grpc.service_config", ...)).
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        tls: bool = False,
        timeout_s: float = 60.0,
        long_timeout_s: float = 3600.0,
        retry: bool = True,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.long_timeout_s = long_timeout_s
        self.channel_options = channel_options(options, retry=retry)
        self._credentials = None
        if tls or root_certificates or certificate_chain:
            self._credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        self._channel: Any = None
        self._stub: pb_grpc.BalpmServiceStub | None = None
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        if self._EAGER:
            self._connect()

    #: Open the channel in __init__ (the blocking client) rather than on the first call (asyncio).
    _EAGER = False

    def _open_channel(self, target: str, creds: grpc.ChannelCredentials | None, opts: list[tuple[str, Any]]) -> Any:
        raise NotImplementedError

    def _connect(self) -> pb_grpc.BalpmServiceStub:
        """The stub, opening the channel on first use (AsyncClient: in the event loop that uses it)."""
        if self._stub is None:
            self._channel = self._open_channel(self.target, self._credentials, self.channel_options)
            self._stub = pb_grpc.BalpmServiceStub(self._channel)
        return self._stub

    @property
    def stub(self) -> pb_grpc.BalpmServiceStub:
        """The raw generated stub, for calls the SDK does not wrap."""
        return self._connect()

    def _deadline(self, deadline: plans.Deadline) -> float:
        if deadline == "default":
            return self.timeout_s
        if deadline == "slow":
            return max(self.timeout_s, SLOW_TIMEOUT_S)
        if deadline == "long":
            return self.long_timeout_s
        return float(deadline)

    def _unreachable(self, timeout_s: float) -> UnavailableError:
        return UnavailableError.local(
            f"server {self.target} not reachable within {timeout_s:g} s", reason="SERVER_UNREACHABLE"
        )

    def _method(self, name: str) -> Any:
        return getattr(self._connect(), name)

    def _call(self, method: Callable[..., Any], request: Any, *, timeout_s: float | None = None) -> Any:
        """Invoke a stub method with the key's metadata and a deadline (default `timeout_s`)."""
        return method(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def _start(self, step: plans.Step) -> Any:
        """Start a Unary or Open step (the blocking reply, or the call to read / await); do a Close."""
        if isinstance(step, (plans.Unary, plans.Open)):
            return self._call(self._method(step.method), step.request, timeout_s=self._deadline(step.deadline))
        if isinstance(step, plans.Close):
            step.stream.cancel()
            return None
        raise TypeError(f"not a step for _start: {step!r}")


class Client(ClientBase):
    """Blocking balpm client (arguments: see `ClientBase`)."""

    _EAGER = True

    def _open_channel(self, target: str, creds: grpc.ChannelCredentials | None, opts: list[tuple[str, Any]]) -> Any:
        if creds is not None:
            return grpc.secure_channel(target, creds, options=opts)
        return grpc.insecure_channel(target, options=opts)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            self._channel.close()

    # ---- running plans ---------------------------------------------------------------------

    def _execute(self, step: plans.Step) -> Any:
        try:
            if isinstance(step, plans.Read):
                return next(step.stream, None)
            if isinstance(step, plans.Upload):
                return self._upload(step)
            if isinstance(step, plans.Sleep):
                return time.sleep(step.seconds)
            return self._start(step)  # a unary call's reply
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def _upload(self, step: plans.Upload) -> Any:
        requests = step.requests
        future = self._method(step.method).future(
            iter(requests), timeout=self._deadline(step.deadline), metadata=self._metadata
        )
        requests.cancel = future.cancel
        try:
            resp = future.result()
        except grpc.FutureCancelledError:
            resp = None  # cancelled by `requests` itself: it raises why
        except grpc.RpcError as e:
            return requests.outcome(None, from_rpc_error(e))
        return requests.outcome(resp)

    def _run(self, plan: plans.Plan[T]) -> T:
        with plans.Stepper(plan) as stepper:
            for step in stepper:
                stepper.settle(self._execute, step)
        return stepper.result  # type: ignore[return-value]

    def _iterate(self, plan: plans.Plan[None]) -> Iterator[Any]:
        with plans.Stepper(plan) as stepper:
            for step in stepper:
                if isinstance(step, plans.Emit):
                    yield step.value
                else:
                    stepper.settle(self._execute, step)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the channel connects.

        Raises:
            balpm.errors.UnavailableError: Not connected within `timeout_s` (reason SERVER_UNREACHABLE).
        """
        try:
            self._connect()
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as e:
            raise self._unreachable(timeout_s) from e

    # ---- pools ---------------------------------------------------------------------------

    def create_pool(self, pool_id: str, **settings: Any) -> pb.Pool:
        """Create a pool. Settings are PoolSettings fields, e.g. feature_source="CLIENT", feature_dim=384,
        default_strategy="BALPM", beta=0.01, knn_k=13, knn_convention="AUTHORS", ensemble_size=5,
        hidden_sizes=[2048, 256], feature_storage="FLOAT16" (half-size feature arrays)."""
        return self._run(plans.create_pool(pool_id, settings))

    def get_pool(self, pool_id: str) -> pb.Pool:
        """Return a pool."""
        return self._run(plans.get_pool(pool_id))

    def list_pools(self, page_size: int = 100) -> Iterator[pb.Pool]:
        """Iterate over all pools, fetching pages as needed."""
        return self._iterate(plans.list_pools(page_size))

    def delete_pool(self, pool_id: str) -> None:
        """Delete a pool and its data."""
        self._run(plans.delete_pool(pool_id))

    def wait_pool_ready(
        self,
        pool_id: str,
        *,
        timeout_s: float = 3600.0,
        poll_s: float = 0.5,
        progress: Callable[[pb.Pool], None] | None = None,
    ) -> pb.Pool:
        """Poll until the pool leaves STATE_FEATURIZING; `progress(pool)` after every poll.

        Raises:
            balpm.errors.WaitTimeoutError: Still featurising after `timeout_s` (reason WAIT_TIMEOUT).
        """
        return self._run(plans.wait_pool_ready(pool_id, timeout_s, poll_s, progress))

    # ---- items and labels ----------------------------------------------------------------

    def upload_items(
        self,
        pool_id: str,
        items: Iterable[Mapping[str, Any] | pb.Item],
        *,
        chunk_size: int = 500,
        progress: Callable[[int], None] | None = None,
        timeout_s: float | None = None,
    ) -> UploadSummary:
        """Stream items to a pool in chunks; `progress(n_sent)` is called after each chunk is queued.

        Items are dicts (see `balpm.messages.item_message`) or balpm.v1.Item messages, converted chunk by
        chunk. `timeout_s` defaults to the client's `long_timeout_s`.

        Raises:
            balpm.errors.InvalidInputError: A malformed item (nothing after it is sent).
        """
        return self._run(plans.upload_items(pool_id, items, chunk_size, progress, timeout_s))

    def ingest_labels(
        self, pool_id: str, labels: Iterable[Mapping[str, Any] | pb.Label], *, request_id: str = ""
    ) -> pb.IngestLabelsResponse:
        """Store labels: dicts with label_id, item_id, preference ("A", "B" or "TIE"), annotator_id."""
        return self._run(plans.ingest_labels(pool_id, labels, request_id))

    def export_labels(self, pool_id: str, *, page_size: int = 1000, page_token: str = "") -> Iterator[pb.ExportedLabel]:
        """Stream every label of a pool (resumed after the last page if the stream breaks)."""
        return self._iterate(plans.export_labels(pool_id, page_size, page_token))

    def export_items(
        self,
        pool_id: str,
        *,
        include_features: bool = False,
        split: str | int | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> Iterator[pb.Item]:
        """Stream a pool's items in upload order (resumed after the last page if the stream breaks).

        Args:
            pool_id: The pool.
            include_features: Also send the three feature vectors (items still being featurised come
                without them).
            split: "POOL" or "HELDOUT" (None: every item).
            page_size: Items per streamed page (0: the server's default).
            page_token: Resume after this token.
        """
        return self._iterate(plans.export_items(pool_id, include_features, split, page_size, page_token))

    def release_items(self, pool_id: str, item_ids: Sequence[str], annotator_id: str = "") -> int:
        """End leases; returns how many ended."""
        return self._run(plans.release_items(pool_id, item_ids, annotator_id))

    def exclude_items(
        self, pool_id: str, item_ids: Sequence[str], *, include: bool = False
    ) -> pb.ExcludeItemsResponse:
        """Exclude items from acquisition (their leases end; labels stay), or include them again."""
        return self._run(plans.exclude_items(pool_id, item_ids, include))

    def update_item_scores(self, pool_id: str, scores: Mapping[str, Mapping[str, float]]) -> int:
        """Set APL log-probabilities: item_id -> {logp_policy_a, logp_policy_b, logp_ref_a, logp_ref_b}."""
        return self._run(plans.update_item_scores(pool_id, scores))

    # ---- training ------------------------------------------------------------------------

    def update_posterior(
        self,
        pool_id: str,
        *,
        seed: int = 0,
        warm_start: bool = False,
        epochs: int = 0,
        wait: bool = True,
        progress: Callable[[pb.Operation], None] | None = None,
        timeout_s: float = 3600.0,
    ) -> pb.Operation:
        """Start training; with `wait`, follow its progress until done and return the final operation.

        Raises:
            balpm.errors.BalpmError: The operation failed or was cancelled (code from its error).
            balpm.errors.WaitTimeoutError: Not done after `timeout_s`.
        """
        return self._run(plans.update_posterior(pool_id, seed, warm_start, epochs, wait, progress, timeout_s))

    def wait_operation(
        self, operation_id: str, *, progress: Callable[[pb.Operation], None] | None = None, timeout_s: float = 3600.0
    ) -> pb.Operation:
        """Watch an operation until done; raise if it failed.

        Raises:
            balpm.errors.BalpmError: The operation failed (reason OPERATION_STATE_FAILED) or was cancelled
                (OPERATION_STATE_CANCELLED), with the class of its error code.
            balpm.errors.WaitTimeoutError: Not done after `timeout_s`.
        """
        return self._run(plans.wait_operation(operation_id, progress, timeout_s))

    def get_operation(self, operation_id: str) -> pb.Operation:
        """Return an operation."""
        return self._run(plans.get_operation(operation_id))

    def cancel_operation(self, operation_id: str) -> pb.Operation:
        """Request cancellation of an operation."""
        return self._run(plans.cancel_operation(operation_id))

    # ---- acquisition and prediction ------------------------------------------------------

    def acquire(
        self,
        pool_id: str,
        *,
        batch_size: int,
        strategy: str | int | None = None,
        seed: int = 0,
        lease_ttl_s: float = 0.0,
        annotator_id: str = "",
        **options: float,
    ) -> pb.AcquireBatchResponse:
        """Acquire and lease the next batch. Options: beta, d_ent, temperature, apl_beta_dpo, apl_entropy_top_s."""
        return self._run(plans.acquire(pool_id, batch_size, strategy, seed, lease_ttl_s, annotator_id, options))

    def predict(
        self, pool_id: str, item_ids: Sequence[str] = (), items: Iterable[Mapping[str, Any] | pb.Item] = ()
    ) -> pb.PredictResponse:
        """Predict stored items (by id) or ad-hoc items."""
        return self._run(plans.predict(pool_id, item_ids, items))

    def evaluate(
        self, pool_id: str, items: Iterable[tuple[Mapping[str, Any] | pb.Item, str]] = ()
    ) -> pb.EvaluateResponse:
        """Evaluate on (item, preference) pairs, or on the held-out split when none are given."""
        return self._run(plans.evaluate(pool_id, items))

    def learning_curve(
        self, pool_id: str, *, next_batch_size: int = 0, wait: bool = False, timeout_s: float = 600.0,
        poll_s: float = 1.0,
    ) -> pb.GetLearningCurveResponse:
        """The savings estimate and stopping signal; with `wait`, until the background computation is done."""
        return self._run(plans.learning_curve(pool_id, next_batch_size, wait, timeout_s, poll_s))


__all__ = [
    "PREFERENCES",
    "RETRY_METHODS",
    "RETRY_POLICY",
    "STRATEGIES",
    "Client",
    "ClientBase",
    "UploadSummary",
    "channel_options",
    "item_message",
    "service_config",
    "strategy_number",
]
