"""Feature extraction through a Triton Inference Server (`deploy/triton` model repository).

The server runs `balpm_extractor` (Python backend) which returns, per text, the final
hidden state of the last non-padding token (`LAST_TOKEN`) and the mean over non-padding
tokens (`MEAN_EMBEDDING`); this client asks for one of them.

Client behaviour:
    * texts are sorted by length (less padding), cut into requests of `batch_size` texts,
      sent concurrently (at most `max_in_flight` at a time, so Triton's dynamic batcher
      can merge them) and put back in input order;
    * each request has a deadline (`timeout_s`);
    * UNAVAILABLE / connection-level failures (and deadline overruns) are retried with
      exponential backoff, bounded by `max_attempts` and `retry_budget_s`;
    * every Triton / tritonclient / gRPC error surfaces as a balpm typed error:
      `errors.FailedPrecondition` when the deployment is wrong (model missing or not
      ready, unexpected inputs/outputs/shapes), `errors.Unavailable` for anything else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from balpm_server import errors

LOG = logging.getLogger(__name__)

INPUT_NAME = "TEXT"
OUTPUT_NAMES = ("MEAN_EMBEDDING", "LAST_TOKEN")

# Status strings as tritonclient reports them (str(grpc.StatusCode.X)).
_RETRYABLE_STATUSES = frozenset({"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.UNKNOWN"})
_DEPLOYMENT_STATUSES = frozenset({"StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT", "StatusCode.UNIMPLEMENTED"})
_MAX_MESSAGE_BYTES = 2**31 - 1

T = TypeVar("T")


class _Retryable(Exception):
    """Internal: a failure worth another attempt (wraps the typed error to raise at the end)."""

    def __init__(self, error: errors.BalpmError) -> None:
        super().__init__(error.message)
        self.error = error


class TritonExtractor:
    """`FeatureExtractor` backed by Triton's gRPC API (`tritonclient.grpc.aio`).

    Args:
        url: Triton gRPC endpoint "host:port".
        model_name: Model name in the Triton repository (e.g. "balpm_extractor").
        output_name: Output tensor to return: "MEAN_EMBEDDING" or "LAST_TOKEN".
        timeout_s: Deadline of one Triton request (and of each readiness probe).
        max_in_flight: Cap on concurrent requests from this extractor.
        batch_size: Texts per request.
        model_version: Model version ("" = Triton's version policy).
        max_attempts: Attempts per request (1 = no retry).
        retry_budget_s: Wall-clock limit on retrying one request, first attempt included;
            no new attempt starts after it.
        backoff_initial_s: First backoff; doubles per attempt.
        backoff_max_s: Cap on a single backoff.
        reconnect_backoff_max_s: Cap on gRPC's own reconnect backoff, so that a restarted
            Triton is noticed within about this time.

    Raises:
        ValueError: Non-positive sizes or timeouts.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        output_name: str = "MEAN_EMBEDDING",
        timeout_s: float = 30.0,
        max_in_flight: int = 4,
        batch_size: int = 64,
        model_version: str = "",
        max_attempts: int = 6,
        retry_budget_s: float = 30.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
        reconnect_backoff_max_s: float = 1.0,
    ) -> None:
        if output_name not in OUTPUT_NAMES:
            raise ValueError(f"output_name must be one of {OUTPUT_NAMES}, got {output_name!r}")
        if timeout_s <= 0 or retry_budget_s <= 0 or reconnect_backoff_max_s <= 0:
            raise ValueError("timeout_s, retry_budget_s and reconnect_backoff_max_s must be > 0")
        if max_in_flight < 1 or batch_size < 1 or max_attempts < 1:
            raise ValueError("max_in_flight, batch_size and max_attempts must be >= 1")
        self._url = url
        self._model_name = model_name
        self._model_version = model_version
        self._output_name = output_name
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._batch_size = batch_size
        self._max_attempts = max_attempts
        self._retry_budget_s = retry_budget_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._reconnect_backoff_max_ms = max(100, int(reconnect_backoff_max_s * 1000))
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._dim: int | None = None

    @property
    def name(self) -> str:
        """Identifier stored with pools that use this extractor."""
        version = f":{self._model_version}" if self._model_version else ""
        return f"triton:{self._output_name}:{self._model_name}{version}"

    # ------------------------------------------------------------------ connection

    def _get_client(self) -> Any:
        """Return the gRPC client bound to the running event loop (created on first use)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # grpc.aio channels belong to the loop that created them; a new loop (tests,
            # a restarted server) gets a new channel. The old one is dropped, not awaited.
            from tritonclient.grpc.aio import InferenceServerClient

            channel_args = [
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                # Notice a restarted Triton quickly instead of after gRPC's default
                # reconnect backoff (which grows to 120 s).
                ("grpc.initial_reconnect_backoff_ms", min(100, self._reconnect_backoff_max_ms)),
                ("grpc.min_reconnect_backoff_ms", min(100, self._reconnect_backoff_max_ms)),
                ("grpc.max_reconnect_backoff_ms", self._reconnect_backoff_max_ms),
                ("grpc.enable_retries", 0),
            ]
            try:
                self._client = InferenceServerClient(self._url, channel_args=channel_args)
            except Exception as e:
                raise errors.Unavailable(
                    f"cannot create a Triton client for {self._url!r}: {e}",
                    reason="TRITON_UNAVAILABLE",
                    metadata={"url": self._url},
                ) from e
            self._client_loop = loop
            self._semaphore = asyncio.Semaphore(self._max_in_flight)
        return self._client

    async def close(self) -> None:
        """Close the gRPC channel (safe to call twice; the extractor can be reused)."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            try:
                await client.close()
            except Exception as e:  # closing must never fail the caller
                LOG.debug("closing the Triton client failed: %s", e)

    # ------------------------------------------------------------------ errors/retries

    def _typed(self, e: BaseException, what: str) -> errors.BalpmError:
        """Map any tritonclient / gRPC / OS error to a balpm typed error."""
        if isinstance(e, errors.BalpmError):
            return e
        status = _status_of(e)
        message = _message_of(e)
        meta = {"url": self._url, "model": self._model_name, "status": status or type(e).__name__}
        lowered = message.lower()
        if (
            status in _DEPLOYMENT_STATUSES
            or "unknown model" in lowered
            or ("is not found" in lowered and self._model_name in message)
        ):
            return errors.FailedPrecondition(
                f"Triton {what} failed for model {self._model_name!r}: {message}",
                reason="TRITON_MODEL_UNAVAILABLE",
                metadata=meta,
            )
        hint = ""
        if "socket closed" in lowered or "http1" in lowered or "http/1" in lowered:
            hint = " (is this Triton's gRPC port? BALPM_TRITON_URL takes the gRPC port, 8001 by default, not HTTP 8000)"
        return errors.Unavailable(
            f"Triton {what} at {self._url} failed: {message}{hint}",
            reason="TRITON_UNAVAILABLE",
            metadata=meta,
        )

    def _is_retryable(self, e: BaseException, *, retry_missing_model: bool) -> bool:
        if isinstance(e, errors.BalpmError):
            return isinstance(e, errors.Unavailable) and e.reason == "TRITON_UNAVAILABLE"
        if retry_missing_model and isinstance(self._typed(e, ""), errors.FailedPrecondition):
            # The model was ready when `dim()` ran: a model that vanishes mid-extraction
            # means Triton is stopping / reloading, which is worth waiting for.
            return _status_of(e) != "StatusCode.INVALID_ARGUMENT"
        status = _status_of(e)
        if status is None:  # connection-level / OS errors, not a server verdict
            return isinstance(e, (OSError, ConnectionError, asyncio.TimeoutError))
        if status in _RETRYABLE_STATUSES:
            return "unknown model" not in _message_of(e).lower()
        return False

    async def _with_retries(
        self,
        what: str,
        attempt_fn: Callable[[], Awaitable[T]],
        *,
        retry_missing_model: bool = False,
    ) -> T:
        """Run `attempt_fn` with bounded retries; raise only balpm typed errors.

        Args:
            what: Description for error messages ("infer", "readiness check").
            attempt_fn: One attempt; raises tritonclient / gRPC errors or balpm errors.
            retry_missing_model: Also retry "model not found" answers (mid-extraction).

        Returns:
            The first successful result.

        Raises:
            errors.Unavailable: Retryable failure persisted through every attempt.
            errors.FailedPrecondition: The deployment is wrong (not retried).
        """
        started_s = time.monotonic()
        backoff_s = self._backoff_initial_s
        for attempt in range(1, self._max_attempts + 1):
            try:
                return await attempt_fn()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                typed = self._typed(e, what)
                retryable = self._is_retryable(e, retry_missing_model=retry_missing_model)
                if not retryable or attempt == self._max_attempts:
                    if attempt > 1:
                        typed.metadata["attempts"] = str(attempt)
                    raise typed from e
                elapsed_s = time.monotonic() - started_s
                if elapsed_s + backoff_s >= self._retry_budget_s:
                    typed.metadata["attempts"] = str(attempt)
                    raise typed from e
                LOG.warning(
                    "Triton %s attempt %d/%d failed (%s); retrying in %.2fs",
                    what,
                    attempt,
                    self._max_attempts,
                    typed.message,
                    backoff_s,
                )
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2.0, self._backoff_max_s)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ FeatureExtractor

    async def dim(self) -> int:
        """Check that Triton and the model are ready and return the output dimension D.

        Validates the model metadata (TEXT/BYTES input, the chosen FP32 output of rank 2).
        When the config leaves D open (`dims: [-1]`), one probe request finds it. The
        result is cached.

        Returns:
            D, the length of one feature vector.

        Raises:
            errors.Unavailable: Triton not reachable / not ready (after retries).
            errors.FailedPrecondition: Model missing, not ready or with unexpected metadata.
        """
        if self._dim is not None:
            return self._dim
        dim_D = await self._with_retries("readiness check", self._check_ready_and_metadata)
        if dim_D <= 0:
            probe_N_D = await self._infer_chunk(["balpm dimension probe"])
            dim_D = int(probe_N_D.shape[1])
        if dim_D <= 0:
            raise errors.FailedPrecondition(
                f"Triton model {self._model_name!r} returned empty feature vectors",
                reason="TRITON_BAD_METADATA",
            )
        self._dim = dim_D
        return dim_D

    async def _check_ready_and_metadata(self) -> int:
        client = self._get_client()
        timeout_s = self._timeout_s
        if not await client.is_server_ready(client_timeout=timeout_s):
            raise errors.Unavailable(
                f"Triton at {self._url} is not ready",
                reason="TRITON_UNAVAILABLE",
                metadata={"url": self._url},
            )
        ready = await client.is_model_ready(self._model_name, self._model_version, client_timeout=timeout_s)
        if not ready:
            raise errors.FailedPrecondition(
                f"Triton model {self._model_name!r} is missing or not ready at {self._url}",
                reason="TRITON_MODEL_UNAVAILABLE",
                metadata={"url": self._url, "model": self._model_name},
            )
        meta = await client.get_model_metadata(
            self._model_name, self._model_version, as_json=True, client_timeout=timeout_s
        )
        return self._dim_from_metadata(meta)

    def _dim_from_metadata(self, meta: dict[str, Any]) -> int:
        """Validate model metadata; return D, or -1 when the model leaves it variable."""
        inputs = {t.get("name"): t for t in meta.get("inputs", [])}
        outputs = {t.get("name"): t for t in meta.get("outputs", [])}
        problems = []
        text = inputs.get(INPUT_NAME)
        if text is None or text.get("datatype") != "BYTES":
            problems.append(f"input {INPUT_NAME} of type BYTES")
        out = outputs.get(self._output_name)
        shape: list[int] = []
        if out is None or out.get("datatype") != "FP32":
            problems.append(f"output {self._output_name} of type FP32")
        else:
            shape = [int(s) for s in out.get("shape", [])]
            if len(shape) != 2:  # [batch, D]: the model must be batching (max_batch_size > 0)
                problems.append(f"output {self._output_name} of shape [-1, D] (got {shape})")
        if problems:
            raise errors.FailedPrecondition(
                f"Triton model {self._model_name!r} has unexpected metadata: expected " + "; ".join(problems),
                reason="TRITON_BAD_METADATA",
                metadata={"url": self._url, "model": self._model_name},
            )
        return shape[1]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts through Triton, in input order.

        Args:
            texts: N strings.

        Returns:
            float32 array `feats_N_D`.

        Raises:
            errors.Unavailable: Triton failed transiently and retries did not help.
            errors.FailedPrecondition: The model is missing or misconfigured.
        """
        texts = list(texts)
        dim_D = await self.dim()
        feats_N_D = np.zeros((len(texts), dim_D), dtype=np.float32)
        if not texts:
            return feats_N_D
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = [order[s : s + self._batch_size] for s in range(0, len(order), self._batch_size)]

        async def run(rows: list[int]) -> None:
            got_B_D = await self._infer_chunk([texts[i] for i in rows])
            if got_B_D.shape[1] != dim_D:
                raise errors.FailedPrecondition(
                    f"Triton returned D={got_B_D.shape[1]}, expected {dim_D}",
                    reason="TRITON_BAD_METADATA",
                )
            feats_N_D[rows] = got_B_D

        tasks = [asyncio.ensure_future(run(rows)) for rows in chunks]
        try:
            _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for t in tasks:  # first failure in input order
            if t.done() and not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                assert exc is not None
                raise self._typed(exc, "infer") from exc
        return feats_N_D

    async def _infer_chunk(self, texts: list[str]) -> np.ndarray:
        """Send one request (under the in-flight cap, with retries); return `feats_B_D`.

        Args:
            texts: B strings.

        Returns:
            float32 `feats_B_D` in the order of `texts`.
        """
        from tritonclient.grpc import InferInput, InferRequestedOutput

        batch = np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)

        async def attempt() -> np.ndarray:
            client = self._get_client()
            text_in = InferInput(INPUT_NAME, list(batch.shape), "BYTES")
            text_in.set_data_from_numpy(batch)
            result = await client.infer(
                self._model_name,
                [text_in],
                model_version=self._model_version,
                outputs=[InferRequestedOutput(self._output_name)],
                client_timeout=self._timeout_s,
            )
            got = result.as_numpy(self._output_name)
            if got is None or got.ndim != 2 or got.shape[0] != len(texts):
                shape = None if got is None else got.shape
                raise errors.FailedPrecondition(
                    f"Triton output {self._output_name} has shape {shape}, expected ({len(texts)}, D)",
                    reason="TRITON_BAD_METADATA",
                )
            return np.asarray(got, dtype=np.float32)

        self._get_client()  # binds the channel and the semaphore to the running loop
        assert self._semaphore is not None
        # The slot is held through retries and backoff: during an outage at most
        # `max_in_flight` requests probe Triton instead of every pending chunk.
        async with self._semaphore:
            return await self._with_retries("infer", attempt, retry_missing_model=True)


def _status_of(e: BaseException) -> str | None:
    """Return the gRPC status string of a tritonclient / grpc error ("StatusCode.X")."""
    status = getattr(e, "status", None)
    if callable(status):
        try:
            value = status()
        except Exception:
            value = None
        if value:
            return str(value)
    code = getattr(e, "code", None)
    if callable(code):
        try:
            return str(code())
        except Exception:
            return None
    return None


def _message_of(e: BaseException) -> str:
    message = getattr(e, "message", None)
    if callable(message):
        try:
            return str(message())
        except Exception:
            pass
    return str(e) or type(e).__name__
