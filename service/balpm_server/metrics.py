"""Every Prometheus metric of the server, in one module.

Names follow Prometheus conventions (`_seconds`, `_total`, base units); labels are
bounded (RPC method names, status codes, strategy names, pool states), never item,
pool or annotator ids. Other modules record through the functions and objects here:

* the transport interceptor: `observe_rpc` (count and latency by method and code);
* the domain: `observe_acquisition`, `observe_training` (one-line hooks);
* the server wiring: `InstrumentedExtractor` (feature-extraction throughput, errors)
  and `StoreCollector` (pools, items, labels, leases by state, asked of the store at scrape
  time: `SqliteStore.counts`);
* the Triton extractor: `TRITON_ERRORS_TOTAL.labels(kind=...).inc()`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from balpm_server.domain.models import StoreCounts

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TRAIN_BUCKETS_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

# ---- RPCs --------------------------------------------------------------------------------

RPC_REQUESTS_TOTAL = Counter(
    "balpm_rpc_requests_total", "RPCs handled, by service, method and gRPC status code.", ["service", "method", "code"]
)
RPC_DURATION_SECONDS = Histogram(
    "balpm_rpc_duration_seconds",
    "RPC handling time in seconds, by service, method and gRPC status code.",
    ["service", "method", "code"],
    buckets=LATENCY_BUCKETS_S,
)
RPC_IN_FLIGHT = Gauge("balpm_rpc_in_flight", "RPCs being handled now.", ["service", "method"])
AUTH_FAILURES_TOTAL = Counter(
    "balpm_auth_failures_total", "Rejected calls, by reason (unauthenticated, permission_denied).", ["reason"]
)
API_KEY_RELOADS_TOTAL = Counter("balpm_api_key_reloads_total", "API key file reloads, by result.", ["result"])

# ---- acquisition -------------------------------------------------------------------------

ACQUISITION_DURATION_SECONDS = Histogram(
    "balpm_acquisition_duration_seconds",
    "AcquireBatch selection time (scores, kNN graph, selection, lease) in seconds, by strategy.",
    ["strategy"],
    buckets=LATENCY_BUCKETS_S,
)
ACQUISITION_ITEMS_TOTAL = Counter("balpm_acquisition_items_total", "Items handed out by AcquireBatch.", ["strategy"])
ACQUISITION_EPISTEMIC_MEAN = Gauge(
    "balpm_acquisition_epistemic_mean", "Mean epistemic (BALD) term of the last acquired batch.", ["strategy"]
)
ACQUISITION_ENTROPY_MEAN = Gauge(
    "balpm_acquisition_entropy_mean", "Mean entropy term (BAL-PM) of the last acquired batch.", ["strategy"]
)
ACQUISITION_EPISTEMIC_ENTROPY_RATIO = Gauge(
    "balpm_acquisition_epistemic_entropy_ratio",
    "Mean epistemic term / |mean entropy term| of the last acquired batch (NaN when undefined).",
    ["strategy"],
)

# ---- posterior training ------------------------------------------------------------------

TRAINING_DURATION_SECONDS = Histogram(
    "balpm_training_duration_seconds", "Posterior (ensemble) training time in seconds.", buckets=TRAIN_BUCKETS_S
)
TRAINING_RUNS_TOTAL = Counter("balpm_training_runs_total", "Finished posterior trainings.")
AUTO_UPDATES_TOTAL = Counter(
    "balpm_auto_updates_total", "UpdatePosterior operations started by a pool's automatic update policy.", ["trigger"]
)
TRAINING_LAST_VAL_LOG_LIKELIHOOD = Gauge(
    "balpm_training_last_val_log_likelihood", "Validation log-likelihood of the most recent training."
)

# ---- feature extraction ------------------------------------------------------------------

FEATURE_TEXTS_TOTAL = Counter(
    "balpm_feature_texts_total", "Texts embedded by the feature extractor (rate() = throughput).", ["extractor"]
)
FEATURE_EXTRACTION_SECONDS_TOTAL = Counter(
    "balpm_feature_extraction_seconds_total", "Time spent in feature extraction calls, in seconds.", ["extractor"]
)
FEATURE_EXTRACTION_ERRORS_TOTAL = Counter(
    "balpm_feature_extraction_errors_total", "Failed feature extraction calls.", ["extractor"]
)
FEATURE_THROUGHPUT_TEXTS_PER_SECOND = Gauge(
    "balpm_feature_throughput_texts_per_second", "Texts per second of the last extraction call.", ["extractor"]
)
TRITON_ERRORS_TOTAL = Counter(
    "balpm_triton_errors_total",
    "Triton request failures, by kind (e.g. unavailable, timeout, bad_response).",
    ["kind"],
)

# ---- what active learning saves (GetLearningCurve; per pool) ---------------------------
SAVINGS_SHARE = Gauge(
    "balpm_savings_labels_share",
    "Estimated share of labels saved against random at equal held-out LL (NaN: not estimable yet).",
    ["tenant", "pool"],
)
LEARNING_SLOPE_PER_1K = Gauge(
    "balpm_learning_slope_per_1k_labels", "Held-out LL gained per 1,000 labels (NaN: not estimable).",
    ["tenant", "pool"],
)
NEXT_BATCH_INFORMATION_GAIN = Gauge(
    "balpm_next_batch_information_gain", "Sum of the next batch's BALD scores (nats).", ["tenant", "pool"]
)
STOP_RECOMMENDATION = Gauge(
    "balpm_stop_recommendation", "Stopping signal: 0 not estimable, 1 CONTINUE, 2 DIMINISHING, 3 STOP.",
    ["tenant", "pool"],
)

# ---- cluster mode ----------------------------------------------------------------------
POOLS_OWNED = Gauge("balpm_pools_owned", "Pools this replica owns (cluster mode).")
CLUSTER_REPLICAS = Gauge("balpm_cluster_replicas", "Live replicas this replica sees (cluster mode).")
OWNERSHIP_TAKEOVERS_TOTAL = Counter(
    "balpm_ownership_takeovers_total", "Pools this replica took up at a new epoch (claimed, handed over, failed over)."
)
OWNERSHIP_HANDOVERS_TOTAL = Counter(
    "balpm_ownership_handovers_total", "Pools this replica handed to another (rebalancing, draining)."
)
FORWARDED_CALLS_TOTAL = Counter(
    "balpm_forwarded_calls_total", "Calls forwarded to a pool's owner replica, by method and code.", ["method", "code"]
)
FORWARD_DURATION_SECONDS = Histogram(
    "balpm_forward_duration_seconds",
    "Duration of calls forwarded to a pool's owner (round trip to the owner), by method.",
    ["method"],
    buckets=LATENCY_BUCKETS_S,
)


def observe_rpc(service: str, method: str, code: str, seconds: float) -> None:
    """Count one finished RPC and record its latency.

    Args:
        service: Full gRPC service name ("balpm.v1.BalpmService").
        method: Method name ("AcquireBatch").
        code: gRPC status code name ("OK", "NOT_FOUND", ...).
        seconds: Handling time.
    """
    RPC_REQUESTS_TOTAL.labels(service, method, code).inc()
    RPC_DURATION_SECONDS.labels(service, method, code).observe(seconds)


def _finite_mean(values: Sequence[float] | np.ndarray) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def observe_acquisition(
    strategy: str, seconds: float, epistemic_B: Sequence[float] | np.ndarray, entropy_B: Sequence[float] | np.ndarray
) -> None:
    """Record one AcquireBatch selection (a one-line hook in the domain).

    Args:
        strategy: Strategy name (an enum's `.name` or str); bounded by the enum.
        seconds: Selection time.
        epistemic_B: Epistemic terms of the chosen batch.
        entropy_B: Entropy terms of the chosen batch (NaN where the strategy has none).
    """
    name = getattr(strategy, "name", str(strategy))
    epi, ent = _finite_mean(epistemic_B), _finite_mean(entropy_B)
    ACQUISITION_DURATION_SECONDS.labels(name).observe(seconds)
    ACQUISITION_ITEMS_TOTAL.labels(name).inc(len(epistemic_B))
    ACQUISITION_EPISTEMIC_MEAN.labels(name).set(epi)
    ACQUISITION_ENTROPY_MEAN.labels(name).set(ent)
    ratio = epi / abs(ent) if math.isfinite(epi) and math.isfinite(ent) and ent != 0.0 else math.nan
    ACQUISITION_EPISTEMIC_ENTROPY_RATIO.labels(name).set(ratio)


def observe_training(seconds: float, val_log_likelihood: float) -> None:
    """Record one finished posterior training (a one-line hook in the domain).

    Args:
        seconds: Training time.
        val_log_likelihood: Validation log-likelihood of the result (NaN when no validation split).
    """
    TRAINING_DURATION_SECONDS.observe(seconds)
    TRAINING_RUNS_TOTAL.inc()
    TRAINING_LAST_VAL_LOG_LIKELIHOOD.set(float(val_log_likelihood))


class InstrumentedExtractor:
    """Wraps a `FeatureExtractor` to count texts, time and errors of `embed` calls.

    Args:
        inner: The extractor doing the work.
        label: Bounded metric label ("transformers" or "triton").
    """

    def __init__(self, inner: Any, label: str) -> None:
        self.inner = inner
        self.label = label

    @property
    def name(self) -> str:
        """The inner extractor's name (stored with pools, so it must not change)."""
        return str(self.inner.name)

    async def dim(self) -> int:
        """The inner extractor's dimension."""
        return int(await self.inner.dim())

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed with the inner extractor, recording throughput or the error."""
        started = time.perf_counter()
        try:
            feats: np.ndarray = await self.inner.embed(texts)
        except BaseException:
            FEATURE_EXTRACTION_ERRORS_TOTAL.labels(self.label).inc()
            raise
        elapsed_s = time.perf_counter() - started
        FEATURE_TEXTS_TOTAL.labels(self.label).inc(len(texts))
        FEATURE_EXTRACTION_SECONDS_TOTAL.labels(self.label).inc(elapsed_s)
        if elapsed_s > 0 and texts:
            FEATURE_THROUGHPUT_TEXTS_PER_SECOND.labels(self.label).set(len(texts) / elapsed_s)
        return feats

    async def close(self) -> None:
        """Close the inner extractor."""
        await self.inner.close()


class CountsSource(Protocol):
    """What `StoreCollector` reads: a store that can total itself from any thread."""

    def describe(self) -> str:
        """Where the store's records are (several servers on one store are counted once)."""
        ...

    def counts(self) -> StoreCounts | None:
        """Totals now, or None when unreadable (skipped)."""
        ...


class StoreCollector(Collector):
    """Pool, item, label and lease gauges, asked of the stores at scrape time.

    Each store answers `counts()` over its own short-lived read-only connection (WAL
    readers never block the server's writer), so scrapes cost the server's event loop
    nothing. Several servers in one process (tests) register their stores with one
    collector; stores on one file are counted once.
    """

    def __init__(self) -> None:
        self._sources: dict[str, tuple[CountsSource, int]] = {}
        self._lock = threading.Lock()

    def add(self, source: CountsSource) -> None:
        """Start reporting a store."""
        with self._lock:
            where = source.describe()
            _, held = self._sources.get(where, (source, 0))
            self._sources[where] = (source, held + 1)

    def remove(self, source: CountsSource) -> None:
        """Stop reporting a store."""
        with self._lock:
            where = source.describe()
            found, held = self._sources.get(where, (source, 0))
            if held > 1:
                self._sources[where] = (found, held - 1)
            else:
                self._sources.pop(where, None)

    def describe(self) -> Iterable[Any]:
        """No fixed description: avoids a scrape at registration time."""
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Read the counts of every registered store."""
        pools = GaugeMetricFamily("balpm_pools", "Pools, by state.", labels=["state"])
        items = GaugeMetricFamily("balpm_items", "Items, by split (pool, heldout).", labels=["split"])
        featurized = GaugeMetricFamily("balpm_items_featurized", "Items whose features are stored.")
        labels = GaugeMetricFamily("balpm_labels", "Labels stored.")
        leases = GaugeMetricFamily("balpm_leases", "Item leases, by state (active, expired).", labels=["state"])
        by_state: dict[str, float] = {}
        by_split = {"pool": 0.0, "heldout": 0.0}
        n_feat = n_labels = n_active = n_expired = 0.0
        with self._lock:
            sources = [source for source, _ in self._sources.values()]
        for source in sources:
            c = source.counts()
            if c is None:
                continue
            for state, held in c.pools_by_state.items():
                by_state[state] = by_state.get(state, 0.0) + held
            by_split["pool"] += c.pool_items
            by_split["heldout"] += c.heldout_items
            n_feat += c.featurized_items
            n_labels += c.labels
            n_active += c.active_leases
            n_expired += c.expired_leases
        for state, count in sorted(by_state.items()):
            pools.add_metric([state], count)
        for split, count in by_split.items():
            items.add_metric([split], count)
        featurized.add_metric([], n_feat)
        labels.add_metric([], n_labels)
        leases.add_metric(["active"], n_active)
        leases.add_metric(["expired"], n_expired)
        yield from (pools, items, featurized, labels, leases)


STORE_COLLECTOR = StoreCollector()
REGISTRY.register(STORE_COLLECTOR)
