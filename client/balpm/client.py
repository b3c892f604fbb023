"""The balpm Python SDK: a blocking client over the balpm.v1 gRPC API.

    with balpm.Client("127.0.0.1:50051") as client:
        client.create_pool("demo")
        client.upload_items("demo", items)
        batch = client.acquire("demo", batch_size=32, strategy="BALPM")

Every transport error is converted in `_call` into `balpm.errors.BalpmError` subclasses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc

from balpm.errors import from_rpc_error
from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc

T = TypeVar("T")
PREFERENCES = {"A": pb.PREFERENCE_A, "B": pb.PREFERENCE_B, "TIE": pb.PREFERENCE_TIE}
STRATEGIES = {name[len("STRATEGY_") :]: num for name, num in pb.Strategy.items() if name != "STRATEGY_UNSPECIFIED"}


def strategy_number(strategy: str | int | None) -> int:
    """Map "BALPM"/"balpm"/"STRATEGY_BALPM" or an enum number to the Strategy enum number."""
    if strategy is None:
        return pb.STRATEGY_UNSPECIFIED
    if isinstance(strategy, int):
        return strategy
    key = strategy.upper().removeprefix("STRATEGY_").replace("-", "_")
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[key]


def item_message(item: Mapping[str, Any] | pb.Item) -> pb.Item:
    """Build an Item from a dict with item_id, prompt, completion_a, completion_b and optional
    prompt_features / completion_a_features / completion_b_features / split / heldout_preference."""
    if isinstance(item, pb.Item):
        return item
    msg = pb.Item(
        item_id=str(item["item_id"]),
        prompt=item.get("prompt", ""),
        completion_a=item.get("completion_a", ""),
        completion_b=item.get("completion_b", ""),
    )
    for key in ("prompt_features", "completion_a_features", "completion_b_features"):
        if item.get(key) is not None:
            getattr(msg, key).extend([float(x) for x in item[key]])
    if item.get("split") in ("HELDOUT", pb.SPLIT_HELDOUT):
        msg.split = pb.SPLIT_HELDOUT
        msg.heldout_preference = PREFERENCES[str(item["heldout_preference"]).upper()]
    return msg


@dataclass(frozen=True)
class UploadSummary:
    """Totals of an upload."""

    accepted_count: int
    duplicate_count: int
    rejections: list[pb.Rejection]
    pool: pb.Pool


class Client:
    """Blocking balpm client.

    Args:
        target: Server address "host:port".
        api_key: Bearer token sent as `authorization: Bearer <key>` metadata.
        root_certificates: PEM CA bundle; enables TLS when given (or when `tls` is True).
        private_key: Client key PEM for mutual TLS.
        certificate_chain: Client certificate PEM for mutual TLS.
        tls: Use TLS with the system roots.
        timeout_s: Default deadline of unary calls.
        options: Extra channel options.
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
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20), *options]
        if tls or root_certificates or certificate_chain:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._stub = pb_grpc.BalpmServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s
        self.target = target

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    @property
    def stub(self) -> pb_grpc.BalpmServiceStub:
        """The raw generated stub, for calls the SDK does not wrap."""
        return self._stub

    def _call(self, method: Callable[..., T], request: Any, *, timeout_s: float | None = None) -> T:
        try:
            return method(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def _stream(self, method: Callable[..., Iterable[T]], request: Any, timeout_s: float | None) -> Iterator[T]:
        try:
            yield from method(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the channel connects.

        Raises:
            balpm.errors.UnavailableError: Not connected within `timeout_s`.
        """
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as e:
            from balpm.errors import UnavailableError

            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, f"server {self.target} not reachable") from e

    # ---- pools ---------------------------------------------------------------------------

    def create_pool(self, pool_id: str, **settings: Any) -> pb.Pool:
        """Create a pool. Settings are PoolSettings fields, e.g. feature_source="CLIENT", feature_dim=384,
        default_strategy="BALPM", beta=0.01, knn_k=13, knn_convention="AUTHORS", ensemble_size=5,
        hidden_sizes=[2048, 256]."""
        s = dict(settings)
        if isinstance(s.get("feature_source"), str):
            s["feature_source"] = pb.FeatureSource.Value("FEATURE_SOURCE_" + s["feature_source"].upper())
        if "default_strategy" in s:
            s["default_strategy"] = strategy_number(s["default_strategy"])
        if isinstance(s.get("posterior_kind"), str):
            s["posterior_kind"] = pb.PosteriorKind.Value("POSTERIOR_KIND_" + s["posterior_kind"].upper())
        if isinstance(s.get("knn_convention"), str):
            s["knn_convention"] = pb.KnnConvention.Value("KNN_CONVENTION_" + s["knn_convention"].upper())
        req = pb.CreatePoolRequest(pool_id=pool_id, settings=pb.PoolSettings(**s))
        return self._call(self._stub.CreatePool, req).pool

    def get_pool(self, pool_id: str) -> pb.Pool:
        """Return a pool."""
        return self._call(self._stub.GetPool, pb.GetPoolRequest(pool_id=pool_id)).pool

    def list_pools(self, page_size: int = 100) -> Iterator[pb.Pool]:
        """Iterate over all pools, fetching pages as needed."""
        token = ""
        while True:
            resp = self._call(self._stub.ListPools, pb.ListPoolsRequest(page_size=page_size, page_token=token))
            yield from resp.pools
            token = resp.next_page_token
            if not token:
                return

    def delete_pool(self, pool_id: str) -> None:
        """Delete a pool and its data."""
        self._call(self._stub.DeletePool, pb.DeletePoolRequest(pool_id=pool_id))

    def wait_pool_ready(
        self,
        pool_id: str,
        *,
        timeout_s: float = 3600.0,
        poll_s: float = 0.5,
        progress: Callable[[pb.Pool], None] | None = None,
    ) -> pb.Pool:
        """Poll until the pool leaves STATE_FEATURIZING."""
        deadline = time.monotonic() + timeout_s
        while True:
            pool = self.get_pool(pool_id)
            if progress is not None:
                progress(pool)
            if pool.state == pb.Pool.STATE_READY:
                return pool
            if time.monotonic() > deadline:
                raise TimeoutError(f"pool {pool_id} still featurising after {timeout_s} s")
            time.sleep(poll_s)

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
        """Stream items to a pool in chunks; `progress(n_sent)` is called after each chunk is queued."""

        def messages() -> Iterator[pb.UploadItemsRequest]:
            yield pb.UploadItemsRequest(header=pb.UploadHeader(pool_id=pool_id))
            chunk: list[pb.Item] = []
            sent = 0
            for it in items:
                chunk.append(item_message(it))
                if len(chunk) >= chunk_size:
                    yield pb.UploadItemsRequest(chunk=pb.ItemChunk(items=chunk))
                    sent += len(chunk)
                    chunk = []
                    if progress is not None:
                        progress(sent)
            if chunk:
                yield pb.UploadItemsRequest(chunk=pb.ItemChunk(items=chunk))
                sent += len(chunk)
                if progress is not None:
                    progress(sent)

        resp = self._call(self._stub.UploadItems, messages(), timeout_s=timeout_s or 3600.0)
        return UploadSummary(resp.accepted_count, resp.duplicate_count, list(resp.rejections), resp.pool)

    def ingest_labels(
        self, pool_id: str, labels: Iterable[Mapping[str, Any]], *, request_id: str = ""
    ) -> pb.IngestLabelsResponse:
        """Store labels: dicts with label_id, item_id, preference ("A", "B" or "TIE"), annotator_id."""
        msgs = [
            pb.Label(
                label_id=str(lb["label_id"]),
                item_id=str(lb["item_id"]),
                preference=cast(
                    Any,
                    PREFERENCES[str(lb["preference"]).upper()]
                    if isinstance(lb["preference"], str)
                    else int(lb["preference"]),
                ),
                annotator_id=str(lb.get("annotator_id", "")),
            )
            for lb in labels
        ]
        req = pb.IngestLabelsRequest(pool_id=pool_id, labels=msgs, request_id=request_id)
        return self._call(self._stub.IngestLabels, req)

    def export_labels(self, pool_id: str, *, page_size: int = 1000, page_token: str = "") -> Iterator[pb.ExportedLabel]:
        """Stream every label of a pool."""
        req = pb.ExportLabelsRequest(pool_id=pool_id, page_size=page_size, page_token=page_token)
        for page in self._stream(self._stub.ExportLabels, req, None):
            yield from page.labels

    def release_items(self, pool_id: str, item_ids: Sequence[str], annotator_id: str = "") -> int:
        """End leases; returns how many ended."""
        req = pb.ReleaseItemsRequest(pool_id=pool_id, item_ids=list(item_ids), annotator_id=annotator_id)
        return self._call(self._stub.ReleaseItems, req).released_count

    def update_item_scores(self, pool_id: str, scores: Mapping[str, Mapping[str, float]]) -> int:
        """Set APL log-probabilities: item_id -> {logp_policy_a, logp_policy_b, logp_ref_a, logp_ref_b}."""
        req = pb.UpdateItemScoresRequest(
            pool_id=pool_id,
            scores=[pb.ItemScores(item_id=iid, apl_scores=pb.AplScores(**s)) for iid, s in scores.items()],
        )
        return self._call(self._stub.UpdateItemScores, req).updated_count

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
        """Start training; with `wait`, stream progress until done and return the final operation.

        Raises:
            balpm.errors.BalpmError: The operation failed or was cancelled (code from its error).
        """
        req = pb.UpdatePosteriorRequest(pool_id=pool_id, seed=seed, warm_start=warm_start, epochs=epochs)
        op = self._call(self._stub.UpdatePosterior, req).operation
        if not wait:
            return op
        return self.wait_operation(op.operation_id, progress=progress, timeout_s=timeout_s)

    def wait_operation(
        self, operation_id: str, *, progress: Callable[[pb.Operation], None] | None = None, timeout_s: float = 3600.0
    ) -> pb.Operation:
        """Watch an operation until done; raise if it failed."""
        op = None
        for msg in self._stream(
            self._stub.WatchOperation, pb.WatchOperationRequest(operation_id=operation_id), timeout_s
        ):
            op = msg.operation
            if progress is not None:
                progress(op)
            if op.done:
                break
        if op is None or not op.done:
            op = self.get_operation(operation_id)
        if op.state != pb.Operation.STATE_SUCCEEDED:
            code = {c.value[0]: c for c in grpc.StatusCode}.get(op.error.code, grpc.StatusCode.UNKNOWN)
            from balpm.errors import _BY_CODE, BalpmError

            raise _BY_CODE.get(code, BalpmError)(
                code, op.error.message, reason="OPERATION_" + pb.Operation.State.Name(op.state)
            )
        return op

    def get_operation(self, operation_id: str) -> pb.Operation:
        """Return an operation."""
        return self._call(self._stub.GetOperation, pb.GetOperationRequest(operation_id=operation_id)).operation

    def cancel_operation(self, operation_id: str) -> pb.Operation:
        """Request cancellation of an operation."""
        return self._call(self._stub.CancelOperation, pb.CancelOperationRequest(operation_id=operation_id)).operation

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
        req = pb.AcquireBatchRequest(
            pool_id=pool_id,
            batch_size=batch_size,
            strategy=cast(Any, strategy_number(strategy)),
            seed=seed,
            lease_ttl_s=lease_ttl_s,
            annotator_id=annotator_id,
            options=pb.StrategyOptions(**cast(dict[str, Any], options)),
        )
        return self._call(self._stub.AcquireBatch, req)

    def predict(
        self, pool_id: str, item_ids: Sequence[str] = (), items: Iterable[Mapping[str, Any]] = ()
    ) -> pb.PredictResponse:
        """Predict stored items (by id) or ad-hoc items."""
        req = pb.PredictRequest(pool_id=pool_id, item_ids=list(item_ids), items=[item_message(i) for i in items])
        return self._call(self._stub.Predict, req)

    def evaluate(self, pool_id: str, items: Iterable[tuple[Mapping[str, Any], str]] = ()) -> pb.EvaluateResponse:
        """Evaluate on (item, preference) pairs, or on the held-out split when none are given."""
        req = pb.EvaluateRequest(
            pool_id=pool_id,
            items=[pb.LabelledItem(item=item_message(i), preference=PREFERENCES[p.upper()]) for i, p in items],
        )
        return self._call(self._stub.Evaluate, req, timeout_s=600.0)
