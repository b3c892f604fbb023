"""What every SDK method does, written once for `balpm.Client` and `balpm.AsyncClient`.

Each SDK method is a *plan*: a generator that yields steps (a unary call, opening, reading or closing
a server stream, an upload, a sleep, or an item to hand to the caller) and receives each step's result.
The blocking client runs plans with blocking gRPC calls and `time.sleep`; the asyncio client with
grpc.aio and `asyncio.sleep`. Pagination, polling, deadlines, stream resumption and error handling
therefore live here only. A step that fails is thrown back into the plan as a
`balpm.errors.BalpmError`, so plans handle errors with ordinary try/except.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from balpm import messages as m
from balpm.errors import (
    DeadlineExceededError,
    UnavailableError,
    WaitTimeoutError,
)
from balpm.v1 import balpm_pb2 as pb

T = TypeVar("T")
#: A call's deadline: seconds, or the client's `timeout_s` ("default"), `slow_timeout_s` ("slow":
#: calls that may extract features) or `long_timeout_s` ("long": uploads and exports).
Deadline = float | Literal["default", "slow", "long"]


@dataclass(frozen=True)
class Unary:
    """Call a unary method; the result is its reply."""

    method: str
    request: Any
    deadline: Deadline = "default"


@dataclass(frozen=True)
class Upload:
    """Call the client-streaming UploadItems with `requests`; the result is its reply."""

    method: str
    requests: m.UploadStream
    deadline: Deadline = "long"


@dataclass(frozen=True)
class Open:
    """Open a server stream; the result is a handle for `Read` and `Close`."""

    method: str
    request: Any
    deadline: Deadline = "long"


@dataclass(frozen=True)
class Read:
    """Read the next message of a stream; the result is the message, or None at its end."""

    stream: Any


@dataclass(frozen=True)
class Close:
    """Cancel a stream that is not read to its end."""

    stream: Any


@dataclass(frozen=True)
class Sleep:
    """Wait."""

    seconds: float


@dataclass(frozen=True)
class Emit:
    """Hand one value to the caller of an iterating method (list_pools, export_labels, export_items)."""

    value: Any


Step = Unary | Upload | Open | Read | Close | Sleep | Emit
Plan = Generator[Step, Any, T]
MAX_STREAM_RESUMES = 5


class Stepper(Generic[T]):
    """Advances a plan: iterate to get its steps, `reply` or `fail` each one; `result` once it is done.

    Used as a context manager, it cancels the streams the plan left open when it ends early.
    """

    def __init__(self, plan: Plan[T]) -> None:
        self._plan = plan
        self._reply: Any = None
        self._error: BaseException | None = None
        self._step: Step | None = None
        self.opened: list[Any] = []
        self.result: T | None = None

    def __iter__(self) -> Stepper[T]:
        return self

    def __next__(self) -> Step:
        reply, error, self._reply, self._error = self._reply, self._error, None, None
        try:
            step = self._plan.throw(error) if error is not None else self._plan.send(reply)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration from None
        self._step = step
        return step

    def reply(self, value: Any) -> None:
        """The result of the last step."""
        if isinstance(self._step, Open):
            self.opened.append(value)
        self._reply = value

    def fail(self, error: BaseException) -> None:
        """The last step failed: `error` is raised inside the plan at that step."""
        self._error = error

    def settle(self, execute: Callable[[Step], Any], step: Step) -> None:
        """Run `step` with a blocking `execute`: its result is the reply, its exception the failure."""
        try:
            self.reply(execute(step))
        except Exception as e:
            self.fail(e)

    async def settle_async(self, execute: Callable[[Step], Awaitable[Any]], step: Step) -> None:
        """Run `step` with an async `execute`: its result is the reply, its exception the failure."""
        try:
            self.reply(await execute(step))
        except Exception as e:
            self.fail(e)

    def __enter__(self) -> Stepper[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        """Cancel the streams left open (the plan failed, or its caller stopped iterating); close the plan."""
        for stream in self.opened:
            stream.cancel()
        self._plan.close()


def unary(method: str, request: Any, unpack: Callable[[Any], T], deadline: Deadline = "default") -> Plan[T]:
    """One unary call; `unpack` turns the reply into the method's return value."""
    reply = yield Unary(method, request, deadline)
    return unpack(reply)


def _pool(resp: Any) -> pb.Pool:
    return resp.pool  # type: ignore[no-any-return]


def _operation(resp: Any) -> pb.Operation:
    return resp.operation  # type: ignore[no-any-return]


def _same(resp: T) -> T:
    return resp


def _none(resp: Any) -> None:
    return None


# ---- pools --------------------------------------------------------------------------------------


def create_pool(pool_id: str, settings: Mapping[str, Any]) -> Plan[pb.Pool]:
    """CreatePool."""
    return unary("CreatePool", m.create_pool_request(pool_id, settings), _pool)


def get_pool(pool_id: str) -> Plan[pb.Pool]:
    """GetPool."""
    return unary("GetPool", pb.GetPoolRequest(pool_id=pool_id), _pool)


def list_pools(page_size: int) -> Plan[None]:
    """ListPools, page after page, emitting every pool."""
    token = ""
    while True:
        resp = yield Unary("ListPools", pb.ListPoolsRequest(page_size=page_size, page_token=token))
        for pool in resp.pools:
            yield Emit(pool)
        token = resp.next_page_token
        if not token:
            return


def delete_pool(pool_id: str) -> Plan[None]:
    """DeletePool."""
    return unary("DeletePool", pb.DeletePoolRequest(pool_id=pool_id), _none)


def wait_pool_ready(
    pool_id: str, timeout_s: float, poll_s: float, progress: Callable[[pb.Pool], None] | None
) -> Plan[pb.Pool]:
    """Poll GetPool until the pool is READY.

    Raises:
        WaitTimeoutError: Still featurising after `timeout_s` (metadata featurized_count, item_count, and
            pause_reason / pause_attempts when the server reports featurisation paused).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        pool = yield from get_pool(pool_id)
        if progress is not None:
            progress(pool)
        if pool.state == pb.Pool.STATE_READY:
            return pool
        left = deadline - time.monotonic()
        if left <= 0:
            total = pool.item_count + pool.heldout_count
            facts = {"pool_id": pool_id, "featurized_count": str(pool.featurized_count), "item_count": str(total)}
            why = ""
            if pool.HasField("featurization_pause"):
                pause = pool.featurization_pause
                facts |= {"pause_reason": pause.reason, "pause_attempts": str(pause.attempts)}
                why = f"; featurisation is paused: {pause.reason}: {pause.message}"
            raise WaitTimeoutError.local(
                f"pool {pool_id} still featurising after {timeout_s:g} s ({pool.featurized_count}/{total} items){why}",
                reason="WAIT_TIMEOUT",
                metadata=facts,
            )
        yield Sleep(min(poll_s, left))


# ---- items and labels ---------------------------------------------------------------------------


def upload_items(
    pool_id: str,
    items: Iterable[Mapping[str, Any] | pb.Item],
    chunk_size: int,
    progress: Callable[[int], None] | None,
    timeout_s: float | None,
) -> Plan[m.UploadSummary]:
    """UploadItems, streaming the items in chunks."""
    requests = m.UploadStream(pool_id, items, chunk_size, progress)
    resp = yield Upload("UploadItems", requests, "long" if timeout_s is None else timeout_s)
    return m.upload_summary(resp)


def ingest_labels(
    pool_id: str, labels: Iterable[Mapping[str, Any] | pb.Label], request_id: str
) -> Plan[pb.IngestLabelsResponse]:
    """IngestLabels."""
    return unary("IngestLabels", m.ingest_labels_request(pool_id, labels, request_id), _same)


def _pages(method: str, request: Any, unpack: Callable[[Any], Iterable[Any]]) -> Plan[None]:
    """A paginated server stream (ExportLabels, ExportItems), emitting every element of every page.

    A stream that breaks with UNAVAILABLE after some pages is reopened after the last page received
    (its next_page_token), so a server restart mid-export neither loses nor repeats elements; a failure
    before the first page is left to the channel's retry policy.
    """
    token, resumes = request.page_token, 0
    while True:
        got_page = False
        req = type(request)()
        req.CopyFrom(request)
        req.page_token = token
        stream = yield Open(method, req)
        try:
            while (page := (yield Read(stream))) is not None:
                got_page = True
                for element in unpack(page):
                    yield Emit(element)
                token = page.next_page_token
                if not token:
                    yield Close(stream)
                    return
            return
        except UnavailableError:
            if not got_page or not token or resumes >= MAX_STREAM_RESUMES:
                raise
            resumes += 1


def export_labels(pool_id: str, page_size: int, page_token: str) -> Plan[None]:
    """ExportLabels, emitting every label."""
    req = pb.ExportLabelsRequest(pool_id=pool_id, page_size=page_size, page_token=page_token)
    return _pages("ExportLabels", req, lambda page: page.labels)


def export_items(
    pool_id: str, include_features: bool, split: str | int | None, page_size: int, page_token: str
) -> Plan[None]:
    """ExportItems, emitting every item."""
    req = m.export_items_request(
        pool_id, include_features=include_features, split=split, page_size=page_size, page_token=page_token
    )
    return _pages("ExportItems", req, lambda page: page.items)


def release_items(pool_id: str, item_ids: Sequence[str], annotator_id: str) -> Plan[int]:
    """ReleaseItems."""
    req = pb.ReleaseItemsRequest(pool_id=pool_id, item_ids=list(item_ids), annotator_id=annotator_id)
    return unary("ReleaseItems", req, lambda resp: int(resp.released_count))


def exclude_items(pool_id: str, item_ids: Sequence[str], include: bool) -> Plan[pb.ExcludeItemsResponse]:
    """ExcludeItems."""
    req = pb.ExcludeItemsRequest(pool_id=pool_id, item_ids=list(item_ids), include=include)
    return unary("ExcludeItems", req, _same)


def update_item_scores(pool_id: str, scores: Mapping[str, Mapping[str, float]]) -> Plan[int]:
    """UpdateItemScores."""
    return unary(
        "UpdateItemScores", m.update_item_scores_request(pool_id, scores), lambda resp: int(resp.updated_count)
    )


# ---- training -----------------------------------------------------------------------------------


def update_posterior(
    pool_id: str,
    seed: int,
    warm_start: bool,
    epochs: int,
    wait: bool,
    progress: Callable[[pb.Operation], None] | None,
    timeout_s: float,
) -> Plan[pb.Operation]:
    """UpdatePosterior, then (with `wait`) `wait_operation`."""
    req = pb.UpdatePosteriorRequest(pool_id=pool_id, seed=seed, warm_start=warm_start, epochs=epochs)
    op = yield from unary("UpdatePosterior", req, _operation)
    if not wait:
        return op
    return (yield from wait_operation(op.operation_id, progress, timeout_s))


def wait_operation(
    operation_id: str, progress: Callable[[pb.Operation], None] | None, timeout_s: float, poll_s: float = 1.0
) -> Plan[pb.Operation]:
    """Follow WatchOperation until the operation is done; poll GetOperation if the stream breaks.

    Raises:
        WaitTimeoutError: Not done after `timeout_s`.
        balpm.errors.BalpmError: The operation failed or was cancelled (see `messages.operation_outcome`).
    """
    deadline = time.monotonic() + timeout_s
    op: pb.Operation | None = None
    try:
        stream = yield Open("WatchOperation", pb.WatchOperationRequest(operation_id=operation_id), timeout_s)
        while (msg := (yield Read(stream))) is not None:
            op = msg.operation
            if progress is not None:
                progress(op)
            if op.done:
                yield Close(stream)
                break
    except DeadlineExceededError as e:
        raise _operation_timeout(operation_id, timeout_s) from e
    except UnavailableError:
        op = None  # the stream broke (e.g. a server restart): poll below, with the channel's retries
    while op is None or not op.done:
        op = yield from get_operation(operation_id)
        if op.done:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise _operation_timeout(operation_id, timeout_s)
        if progress is not None:
            progress(op)
        yield Sleep(min(poll_s, left))
    return m.operation_outcome(op)


def _operation_timeout(operation_id: str, timeout_s: float) -> WaitTimeoutError:
    return WaitTimeoutError.local(
        f"operation {operation_id} not done after {timeout_s:g} s",
        reason="WAIT_TIMEOUT",
        metadata={"operation_id": operation_id},
    )


def get_operation(operation_id: str) -> Plan[pb.Operation]:
    """GetOperation."""
    return unary("GetOperation", pb.GetOperationRequest(operation_id=operation_id), _operation)


def cancel_operation(operation_id: str) -> Plan[pb.Operation]:
    """CancelOperation."""
    return unary("CancelOperation", pb.CancelOperationRequest(operation_id=operation_id), _operation)


# ---- acquisition and prediction -----------------------------------------------------------------


def acquire(
    pool_id: str,
    batch_size: int,
    strategy: str | int | None,
    seed: int,
    lease_ttl_s: float,
    annotator_id: str,
    options: Mapping[str, float],
) -> Plan[pb.AcquireBatchResponse]:
    """AcquireBatch."""
    req = m.acquire_request(
        pool_id,
        batch_size=batch_size,
        strategy=strategy,
        seed=seed,
        lease_ttl_s=lease_ttl_s,
        annotator_id=annotator_id,
        options=options,
    )
    return unary("AcquireBatch", req, _same)


def predict(
    pool_id: str, item_ids: Sequence[str], items: Iterable[Mapping[str, Any] | pb.Item]
) -> Plan[pb.PredictResponse]:
    """Predict (slow deadline: ad-hoc texts are featurised)."""
    return unary("Predict", m.predict_request(pool_id, item_ids, items), _same, "slow")


def learning_curve(
    pool_id: str, next_batch_size: int, wait: bool, timeout_s: float, poll_s: float
) -> Plan[pb.GetLearningCurveResponse]:
    """GetLearningCurve; with `wait`, poll until no newer estimate is being computed.

    Raises:
        WaitTimeoutError: Still computing after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        request = pb.GetLearningCurveRequest(pool_id=pool_id, next_batch_size=next_batch_size)
        resp: pb.GetLearningCurveResponse = yield Unary("GetLearningCurve", request)
        if not wait or not resp.computing:
            return resp
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeoutError.local(
                f"the learning curve of pool {pool_id} is still computing after {timeout_s:g} s "
                f"({resp.fits_done}/{resp.fits_total} fits)",
                reason="WAIT_TIMEOUT", metadata={"pool_id": pool_id},
            )
        yield Sleep(min(poll_s, left))


def evaluate(
    pool_id: str, items: Iterable[tuple[Mapping[str, Any] | pb.Item, str]]
) -> Plan[pb.EvaluateResponse]:
    """Evaluate (slow deadline)."""
    return unary("Evaluate", m.evaluate_request(pool_id, items), _same, "slow")
