"""Prometheus `/metrics` over HTTP after a short real loop, and the JSON access log."""

from __future__ import annotations

import json
import logging
import math
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from balpm import Client
from balpm.v1 import balpm_pb2 as pb
from balpm_server.logs import JsonFormatter, RequestIdFilter
from tests.conftest import ServerThread, make_settings, synthetic_items

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of `/metrics`, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= set(lbls))


def test_metrics_move_after_a_short_loop(tmp_path: Path) -> None:
    srv = ServerThread(make_settings(tmp_path / "data", extractor="", metrics_port=0))
    try:
        port = srv.running.metrics_port
        assert port and port > 0
        before = scrape(port)
        with Client(srv.target) as c:
            items, truth = synthetic_items(80, 8, seed=3)
            c.create_pool("m", feature_source="CLIENT", feature_dim=8, ensemble_size=2, hidden_sizes=[16], epochs=5)
            c.upload_items("m", items)
            first = c.acquire("m", batch_size=8, strategy="BALPM", annotator_id="ann")
            c.ingest_labels(
                "m",
                [
                    {"label_id": f"l-{a.item.item_id}", "item_id": a.item.item_id, "preference": truth[a.item.item_id]}
                    for a in first.items
                ],
            )
            op = c.update_posterior("m", seed=1)
            assert op.result.posterior_version == 1
            for strategy in ("BALD", "BALPM", "RANDOM"):
                c.acquire("m", batch_size=4, strategy=strategy, annotator_id=f"a-{strategy}")
            with pytest.raises(Exception):  # noqa: B017 - any SDK error; counted as NOT_FOUND below
                c.get_pool("missing")
        after = scrape(port)
    finally:
        srv.stop()

    svc = "balpm.v1.BalpmService"
    # RPC counters and latency histograms by method and code.
    for method in ("CreatePool", "UploadItems", "AcquireBatch", "IngestLabels", "UpdatePosterior"):
        grew = value(after, "balpm_rpc_requests_total", service=svc, method=method, code="OK") - value(
            before, "balpm_rpc_requests_total", service=svc, method=method, code="OK"
        )
        assert grew >= 1, method
        assert value(after, "balpm_rpc_duration_seconds_count", method=method, code="OK") >= 1
        assert value(after, "balpm_rpc_duration_seconds_bucket", method=method, code="OK", le="+Inf") >= 1
    assert (
        value(after, "balpm_rpc_requests_total", method="AcquireBatch", code="OK")
        - value(before, "balpm_rpc_requests_total", method="AcquireBatch", code="OK")
        == 4
    )
    assert value(after, "balpm_rpc_requests_total", method="GetPool", code="NOT_FOUND") >= 1
    # Gauges of pools, items, labels and leases (read from the store at scrape time).
    assert value(after, "balpm_pools", state="ready") >= 1
    assert value(after, "balpm_items", split="pool") >= 80
    assert value(after, "balpm_labels") >= 8
    assert value(after, "balpm_leases", state="active") >= 12
    # Training duration and last validation log-likelihood.
    assert (
        value(after, "balpm_training_duration_seconds_count") - value(before, "balpm_training_duration_seconds_count")
        == 1
    )
    assert value(after, "balpm_training_runs_total") >= 1
    ll = value(after, "balpm_training_last_val_log_likelihood")
    assert math.isnan(ll) or ll <= 0.0
    # Acquisition duration by strategy; mean epistemic / entropy terms and their ratio.
    for strategy in ("BALD", "BALPM", "RANDOM"):
        assert value(after, "balpm_acquisition_duration_seconds_count", strategy=strategy) >= 1
        assert value(after, "balpm_acquisition_items_total", strategy=strategy) >= 4
    assert value(after, "balpm_acquisition_epistemic_mean", strategy="BALD") > 0.0
    assert math.isfinite(value(after, "balpm_acquisition_entropy_mean", strategy="BALPM"))
    assert ("balpm_acquisition_epistemic_entropy_ratio", (("strategy", "BALPM"),)) in after
    names = {n for n, _ in after}
    assert "balpm_rpc_in_flight" in names
    # No unbounded labels: no item, pool or annotator ids anywhere.
    for _name, labels in after:
        for _k, v in labels:
            assert not v.startswith(("it-", "a-", "ann")) and v != "m"


def test_metrics_port_disabled(tmp_path: Path) -> None:
    srv = ServerThread(make_settings(tmp_path / "data", extractor="", metrics_port=-1))
    try:
        assert srv.running.metrics_port is None
    finally:
        srv.stop()


def test_access_log_line_per_rpc(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    srv = ServerThread(make_settings(tmp_path / "data", extractor=""))
    try:
        with caplog.at_level(logging.INFO, logger="balpm.access"), Client(srv.target) as c:
            c.create_pool("logged", feature_source="CLIENT", feature_dim=4)
            with pytest.raises(Exception):  # noqa: B017
                c.get_pool("nope")
            c.stub.ListPools(pb.ListPoolsRequest(), metadata=[("x-request-id", "trace-42")])
    finally:
        srv.stop()
    records = [r for r in caplog.records if r.name == "balpm.access"]
    by_method = {r.method: r for r in records}  # type: ignore[attr-defined]
    assert {"CreatePool", "GetPool", "ListPools"} <= set(by_method)
    assert by_method["GetPool"].code == "NOT_FOUND"  # type: ignore[attr-defined]
    assert by_method["ListPools"].request_id == "trace-42"  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(by_method["CreatePool"]))
    for key in ("method", "code", "duration_ms", "tenant", "request_id"):
        assert key in line, key
    assert line["code"] == "OK" and line["tenant"] == "default" and line["duration_ms"] >= 0
    assert RequestIdFilter().filter(by_method["CreatePool"])


def test_instrumented_extractor_counts_texts_and_errors() -> None:
    import asyncio

    import numpy as np

    from balpm_server import errors, metrics

    class Fake:
        name = "fake"

        async def dim(self) -> int:
            return 3

        async def embed(self, texts: list[str]) -> np.ndarray:
            if "boom" in texts:
                raise errors.Unavailable("backend down")
            return np.zeros((len(texts), 3), dtype=np.float32)

        async def close(self) -> None:
            return None

    ex = metrics.InstrumentedExtractor(Fake(), "test")
    texts_before = metrics.FEATURE_TEXTS_TOTAL.labels("test")._value.get()
    errors_before = metrics.FEATURE_EXTRACTION_ERRORS_TOTAL.labels("test")._value.get()
    assert asyncio.run(ex.embed(["a", "b", "c"])).shape == (3, 3)
    with pytest.raises(errors.Unavailable):
        asyncio.run(ex.embed(["boom"]))
    assert metrics.FEATURE_TEXTS_TOTAL.labels("test")._value.get() - texts_before == 3
    assert metrics.FEATURE_EXTRACTION_ERRORS_TOTAL.labels("test")._value.get() - errors_before == 1
    assert ex.name == "fake" and asyncio.run(ex.dim()) == 3
    metrics.TRITON_ERRORS_TOTAL.labels("unavailable").inc()
