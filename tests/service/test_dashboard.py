"""The Grafana dashboard (deploy/grafana/balpm-dashboard.json) against a real Prometheus scraping real servers.

Three `balpm-server` replicas in cluster mode (one real PostgreSQL, one real S3-compatible
server, tests/backends.py) and one single-node server with the embedded extractor (the
bundled MiniLM, offline), each with its own `/metrics` port; traffic through random
replicas with the SDK (client-feature pools: upload, acquire with RANDOM and BALPM, labels,
posterior updates, an automatic update, a NOT_FOUND; server-feature items on the single
node), one replica SIGTERMed and restarted (hand-overs and take-overs). A real
`prometheus` (Debian's package) scrapes all four every second; then every panel target of
the dashboard, its template variables substituted, must return at least one series.

Without `prometheus` on PATH the test is skipped, or fails when BALPM_PROMETHEUS_REQUIRED=1
(CI, .ci/run). Bounded: every wait has a deadline; every process is stopped in `finally`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from balpm import Client
from balpm.errors import BalpmError
from tests.conftest import backend_overrides, synthetic_items
from tests.procserver import ProcServer, free_port
from tests.waiting import wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "balpm-dashboard.json"
TTL_S = 3.0
POOLS = [f"dash{i}" for i in range(4)]
SMALL = {"ensemble_size": 2, "hidden_sizes": [16], "epochs": 5}
# Grafana's built-in and template variables, as the test substitutes them.
VARIABLES = {"__rate_interval": "30s", "__interval": "15s", "__range": "5m", "replica": ".*", "instance": ".*"}


def dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def panel_targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel (rows' nested panels included)."""
    out = []
    stack = list(dash["panels"])
    while stack:
        panel = stack.pop(0)
        stack += panel.get("panels", [])
        out += [(str(panel["title"]), str(t["expr"])) for t in panel.get("targets", [])]
    return out


def substitute(expr: str) -> str:
    """The expression with `$name` / `${name}` replaced as Grafana would (all replicas selected)."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in VARIABLES:
            raise AssertionError(f"unknown dashboard variable ${name} in {expr!r}")
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


# ---- static checks (no server) ------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_with_datasource_and_replica_variables() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["replica"]["includeAll"] and variables["replica"]["allValue"] == ".*"
    ids = []
    stack = list(dash["panels"])
    while stack:
        panel = stack.pop(0)
        stack += panel.get("panels", [])
        ids.append(panel["id"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            for t in panel["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", panel["title"]
                assert 'instance=~"$replica"' in t["expr"], (panel["title"], t["expr"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_reads_only_metrics_the_server_exports() -> None:
    from prometheus_client import REGISTRY

    from balpm_server import metrics

    # Sample names of every registered metric (`_total`, `_bucket`, ...) and the store's gauges.
    exported = set(REGISTRY._names_to_collectors) | {family.name for family in metrics.STORE_COLLECTOR.collect()}
    for title, expr in panel_targets(dashboard()):
        for name in re.findall(r"\bbalpm_\w+", expr):
            assert name in exported, f"panel {title!r} reads {name}, which balpm_server.metrics does not export"


# ---- processes ----------------------------------------------------------------------------


class MetricsServer(ProcServer):
    """A `ProcServer` with its Prometheus endpoint on a fixed free port (kept across restarts)."""

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, extra_env)
        self.metrics_port = free_port()
        self.metrics_target = f"127.0.0.1:{self.metrics_port}"

    def launch(self) -> None:
        """Start the process without waiting for it."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "balpm_server.server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--data-dir", str(self.data_dir), "--metrics-port", str(self.metrics_port)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )

    def wait_serving(self, timeout_s: float) -> None:
        """Wait until health reports SERVING for the balpm service."""
        assert self.proc is not None
        proc = self.proc

        def serving() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; log: {self.log_path}")
            with grpc.insecure_channel(self.target) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="balpm.v1.BalpmService"), timeout=1.0
                )
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

        wait_until(serving, timeout_s, f"{self.target} to serve (log: {self.log_path})", ignore=(grpc.RpcError,))

    def start(self, timeout_s: float = 90.0) -> None:
        self.launch()
        self.wait_serving(timeout_s)

    def scrape(self, name: str) -> float:
        """Sum of the samples of metric `name` on this server's `/metrics` now."""
        with urllib.request.urlopen(f"http://{self.metrics_target}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        return sum(
            s.value for family in text_string_to_metric_families(body) for s in family.samples if s.name == name
        )


class Prometheus:
    """A real `prometheus` scraping `targets` every second, with its own storage dir and free port."""

    def __init__(self, binary: str, root: Path, targets: list[str]) -> None:
        self.binary = binary
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets = targets
        self.log_path = root / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: balpm\n    static_configs:\n"
            f"      - targets: {json.dumps(self.targets)}\n"
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log_path.read_text()}")
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)

        wait_until(ready, 60, "prometheus to be ready", ignore=(OSError,))

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def scraped_all_after(self, after_s: float) -> bool:
        """Whether every target is up and was last scraped after `after_s` (epoch seconds)."""
        active = self.get("/api/v1/targets", state="active")["activeTargets"]
        done = {
            t["labels"]["instance"] for t in active
            if t["health"] == "up" and _rfc3339_s(t["lastScrape"]) > after_s
        }
        return done >= set(self.targets)

    def query(self, expr: str) -> list[Any]:
        data = self.get("/api/v1/query", query=expr)
        result: list[Any] = data["result"]
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _rfc3339_s(stamp: str) -> float:
    """Epoch seconds of Prometheus' lastScrape (RFC 3339 with nanoseconds and an offset)."""
    from datetime import datetime

    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp)
    assert m, stamp
    base = datetime.fromisoformat(m.group(1) + (m.group(3).replace("Z", "+00:00")))
    return base.timestamp() + float(m.group(2) or 0.0)


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        reason = "`prometheus` is not on PATH (Debian: apt-get install prometheus)"
        if os.environ.get("BALPM_PROMETHEUS_REQUIRED", "") in ("1", "true", "yes"):
            pytest.fail(f"Prometheus is required (BALPM_PROMETHEUS_REQUIRED=1) but unavailable: {reason}")
        pytest.skip(reason)
    return found


# ---- traffic ------------------------------------------------------------------------------


def _auto_updates(replicas: list[MetricsServer]) -> float:
    """Automatic updates the replicas have started (since each one's start)."""
    return sum(s.scrape("balpm_auto_updates_total") for s in replicas)


def _wait_auto_update(replicas: list[MetricsServer], before: float, what: str) -> None:
    wait_until(lambda: _auto_updates(replicas) > before, 30, what, ignore=(OSError,))


def _not_found_everywhere(replicas: list[MetricsServer]) -> None:
    """A non-OK code (NOT_FOUND) on every replica, for the error panels."""
    for s in replicas:
        with Client(s.target, timeout_s=10) as c, pytest.raises(BalpmError):
            c.get_pool("no-such-pool")


def _client_pools_traffic(replicas: list[MetricsServer], rng: random.Random, first: bool) -> None:
    """Pools (first time), acquisitions with RANDOM and BALPM, labels and posterior updates via random replicas."""

    def client() -> Client:
        return Client(rng.choice(replicas).target, timeout_s=60)

    _not_found_everywhere(replicas)  # (before as after: rate() sees a counter grow only once it exists)
    items, truth = synthetic_items(240, 8, seed=5)
    if first:
        for i, pool in enumerate(POOLS):
            auto = {"auto_update_min_labels": 4} if i == 0 else {}
            with client() as c:
                c.create_pool(pool, feature_source="CLIENT", feature_dim=8, **SMALL, **auto)
            with client() as c:
                c.upload_items(pool, items)
    for i, pool in enumerate(POOLS):
        annotator = f"ann-{int(first)}-{i}"
        with client() as c:
            batch = c.acquire(pool, batch_size=8, strategy="BALPM", annotator_id=annotator, lease_ttl_s=300)
        labels = [
            {"label_id": f"{annotator}-{a.item.item_id}", "item_id": a.item.item_id,
             "preference": truth[a.item.item_id], "annotator_id": annotator}
            for a in batch.items
        ]
        auto_before = _auto_updates(replicas) if i == 0 else 0.0
        with client() as c:
            reply = c.ingest_labels(pool, labels)
        if i == 0:  # the automatic update policy trains: at once when the labels reached the owner,
            # else (IngestLabels runs on any replica) at the owner's next cluster tick
            _wait_auto_update(replicas, auto_before, f"an automatic update of {pool} (reply: {reply})")
        else:
            with client() as c:
                c.update_posterior(pool, seed=i, timeout_s=120)
        for strategy in ("RANDOM", "BALPM"):
            with client() as c:
                c.acquire(pool, batch_size=4, strategy=strategy, annotator_id=f"{annotator}-{strategy}",
                          lease_ttl_s=300)
    _not_found_everywhere(replicas)


def _server_features_traffic(single: MetricsServer) -> None:
    """A server-feature pool on the single node: its extractor embeds the texts."""
    texts = [
        {"item_id": f"t-{i}", "prompt": f"Question number {i}?", "completion_a": f"Answer {i}.",
         "completion_b": f"Another answer {i}."}
        for i in range(24)
    ]
    with Client(single.target, timeout_s=120) as c:
        c.create_pool("texts", ensemble_size=2, hidden_sizes=[16], epochs=5)
        c.upload_items("texts", texts)
        c.wait_pool_ready("texts", timeout_s=120, poll_s=0.2)


@pytest.mark.slow
def test_every_dashboard_panel_has_data_from_a_real_prometheus(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    binary = _prometheus_binary()  # before PostgreSQL and moto_server start
    targets = panel_targets(dashboard())
    shared = backend_overrides(request, "postgres")  # (the s3_server fixture also points boto3's env at it)
    cluster_env = {"BALPM_" + k.upper(): v for k, v in shared.items()}
    replicas = [
        MetricsServer(tmp_path / f"r{i}", {
            "BALPM_CLUSTER": "true", "BALPM_REPLICA_ID": f"r{i}", "BALPM_OWNERSHIP_TTL_S": str(TTL_S),
            "BALPM_EXTRACTOR": "", **cluster_env,
        })
        for i in range(3)
    ]
    single = MetricsServer(tmp_path / "single", {
        "BALPM_CLUSTER": "false", "BALPM_EXTRACTOR": "transformers", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    })
    servers = [*replicas, single]
    prom = Prometheus(binary, tmp_path / "prometheus", [s.metrics_target for s in servers])
    rng = random.Random(21)
    try:
        for s in servers:
            s.launch()
        prom.start()
        for s in servers:
            s.wait_serving(120)
        wait_until(lambda: prom.scraped_all_after(0.0), 30, "prometheus to scrape every server", ignore=(OSError,))

        _client_pools_traffic(replicas, rng, first=True)
        _server_features_traffic(single)

        # SIGTERM the replica owning most pools (it hands them over while draining), restart it
        # (same id, ports and data dir): once settled it is handed pools back (take-overs).
        victim = max(replicas, key=lambda s: s.scrape("balpm_pools_owned"))
        assert victim.scrape("balpm_pools_owned") >= 1, "no replica owns a pool"
        assert victim.terminate(60) == 0
        victim.start(120)
        wait_until(lambda: victim.scrape("balpm_pools_owned") >= 1, 60, "the restarted replica to own a pool again",
                   ignore=(OSError,))
        others = [s for s in replicas if s is not victim]
        assert sum(s.scrape("balpm_ownership_handovers_total") for s in others) >= 1

        _client_pools_traffic(replicas, rng, first=False)
        done = time.time()
        wait_until(lambda: prom.scraped_all_after(done + 1.0), 30, "prometheus to scrape the final state",
                   ignore=(OSError,))

        empty = []
        for title, expr in targets:
            if not prom.query(substitute(expr)):
                empty.append(f"{title}: {expr}")
        assert not empty, f"{len(empty)} of {len(targets)} panel targets returned no series:\n" + "\n".join(empty)
        # A few that must have moved in the last 30 s, not only exist.
        for expr in ('sum(rate(balpm_rpc_requests_total{code!="OK"}[30s]))',
                     "sum(rate(balpm_forwarded_calls_total[30s]))",
                     "sum(rate(balpm_acquisition_items_total[30s]))"):
            assert float(prom.query(expr)[0]["value"][1]) > 0, expr
    finally:
        prom.stop()
        for s in servers:
            s.kill()
