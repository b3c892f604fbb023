"""Bounded loopback load test of AcquireBatch and IngestLabels (fixed request counts).

Starts a real `balpm-server` subprocess on loopback, creates a 100k-item pool with
client features (small dim), labels a few hundred items and trains the posterior
once (so BALD scores and the BAL-PM kNN graph are cached after one warm-up call),
then drives `--clients` concurrent grpc.aio clients, each with its own channel and
annotator id, and prints a latency / throughput table:

    python bench/load.py                      # 100k items, dim 32, 32 clients, batch 16
    python bench/load.py --items 20000 --requests 320 --json out.json

Rows: first gRPC Health.Check under the same closed loop, the transport floor (what
this machine's Python gRPC does with no work at all); then AcquireBatch per strategy
closed-loop (saturation: every client re-sends at once) and open-loop at `--rate-rps`
(Poisson arrivals, latency from the scheduled send time); then IngestLabels.

Target: p99 <= 50 ms for AcquireBatch with cached scores (batch 16). Profile the
server with `--py-spy out.svg` (py-spy record on the server process during the run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balpm import Client
from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc

POOL = "load"


@dataclass
class Row:
    """One line of the result table."""

    rpc: str
    strategy: str
    mode: str
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    throughput_rps: float
    server_acquire_p50_ms: float
    server_cpu_ms_per_req: float
    client_cpu_ms_per_req: float


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen[str], str]:
    """Start `balpm-server` on a free loopback port; returns the process and its target."""
    exe = Path(sys.executable).parent / "balpm-server"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "balpm_server.server"]
    env = {**os.environ, "BALPM_EXTRACTOR": "", "BALPM_LOG_JSON": "true"}
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--data-dir", str(data_dir), "--metrics-port", "-1"],
        stdout=subprocess.PIPE,
        stderr=open(log_path, "wb"),  # noqa: SIM115 - handed to the child
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on [^:]+:(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}; see {log_path}")
    return proc, f"127.0.0.1:{match.group(1)}"


def make_pool(client: Client, n_items: int, dim: int, n_labels: int, seed: int) -> None:
    """Create and fill the pool, label `n_labels` items and train the posterior once."""
    rng = np.random.default_rng(seed)
    w_D = rng.normal(size=dim)
    prompts_N_D = rng.normal(size=(n_items, dim)).astype(np.float32)
    a_N_D = (prompts_N_D + rng.normal(size=(n_items, dim))).astype(np.float32)
    b_N_D = (prompts_N_D + rng.normal(size=(n_items, dim))).astype(np.float32)
    client.create_pool(POOL, feature_source="CLIENT", feature_dim=dim, ensemble_size=5, hidden_sizes=[64], epochs=20)

    def items() -> Any:
        for i in range(n_items):
            yield pb.Item(
                item_id=f"it-{i}",
                prompt=f"prompt {i}",
                completion_a=f"a {i}",
                completion_b=f"b {i}",
                prompt_features=prompts_N_D[i].tolist(),
                completion_a_features=a_N_D[i].tolist(),
                completion_b_features=b_N_D[i].tolist(),
            )

    started = time.perf_counter()
    up = client.upload_items(POOL, items(), chunk_size=1000)
    print(f"# uploaded {up.accepted_count} items in {time.perf_counter() - started:.1f} s", flush=True)
    prefs = np.where(a_N_D[:n_labels] @ w_D > b_N_D[:n_labels] @ w_D, "A", "B")
    client.ingest_labels(
        POOL,
        [{"label_id": f"seed-{i}", "item_id": f"it-{i}", "preference": str(prefs[i])} for i in range(n_labels)],
    )
    started = time.perf_counter()
    op = client.update_posterior(POOL, seed=seed)
    print(f"# trained posterior v{op.result.posterior_version} in {time.perf_counter() - started:.1f} s", flush=True)
    for strategy in ("RANDOM", "BALD", "BALPM"):  # warm-up: scores, kNN graph
        started = time.perf_counter()
        batch = client.acquire(POOL, batch_size=1, strategy=strategy, annotator_id="warmup")
        client.release_items(POOL, [a.item.item_id for a in batch.items], annotator_id="warmup")
        print(f"# warm-up {strategy}: {time.perf_counter() - started:.2f} s", flush=True)


async def run_load(
    target: str,
    server_pid: int,
    rpc: str,
    strategy: str,
    clients: int,
    requests: int,
    batch_size: int,
    label_offset: int,
    rate_rps: float = 0.0,
) -> Row:
    """`requests` calls spread over `clients` concurrent channels; returns the row.

    Closed loop (`rate_rps` 0): each client sends its next call as soon as the last
    returns, so the row measures saturation. Open loop: calls are scheduled as a Poisson
    stream of `rate_rps` in total, and latency counts from the scheduled send time, so a
    backlog shows up in the figures (no coordinated omission). CPU per request is the
    server process's and this (client) process's CPU time over the timed calls.
    """
    per_client = max(1, requests // clients)
    latencies_ms: list[float] = []
    server_ms: list[float] = []
    ended: list[float] = []
    errors = 0
    strat = cast(Any, pb.Strategy.Value(f"STRATEGY_{strategy}") if strategy else 0)

    async def worker(w: int) -> list[str]:
        """Sends this client's calls; returns the item ids it leased (released after the clock)."""
        nonlocal errors
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.BalpmServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            await channel.channel_ready()
            await start_gate.wait()
            leased: list[str] = []
            rng = np.random.default_rng(w)
            scheduled = time.perf_counter()
            for j in range(per_client):
                if rpc == "Health":
                    req: Any = health_pb2.HealthCheckRequest()
                    method: Any = health.Check
                elif rpc == "AcquireBatch":
                    req = pb.AcquireBatchRequest(
                        pool_id=POOL,
                        batch_size=batch_size,
                        strategy=strat,
                        seed=j,
                        annotator_id=f"{strategy}-{w}",
                        lease_ttl_s=600.0,
                    )
                    method = stub.AcquireBatch
                else:
                    base = label_offset + (w * per_client + j) * batch_size
                    req = pb.IngestLabelsRequest(
                        pool_id=POOL,
                        labels=[
                            pb.Label(
                                label_id=f"load-{base + k}",
                                item_id=f"it-{base + k}",
                                preference=pb.PREFERENCE_A,
                                annotator_id=f"labeler-{w}",
                            )
                            for k in range(batch_size)
                        ],
                    )
                    method = stub.IngestLabels
                if rate_rps > 0:
                    scheduled += rng.exponential(clients / rate_rps)
                    await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                    started = scheduled
                else:
                    started = time.perf_counter()
                try:
                    resp = await method(req, timeout=30)
                except grpc.aio.AioRpcError as e:
                    errors += 1
                    if errors <= 3:
                        print(f"# {rpc} error: {e.code().name} {e.details()}", file=sys.stderr)
                    continue
                ended.append(time.perf_counter())
                latencies_ms.append((ended[-1] - started) * 1000.0)
                if rpc == "AcquireBatch":
                    server_ms.append(resp.acquire_s * 1000.0)
                    leased.extend(a.item.item_id for a in resp.items)
            return leased

    start_gate = asyncio.Event()
    tasks = [asyncio.ensure_future(worker(w)) for w in range(clients)]
    await asyncio.sleep(0.5)  # let every channel connect before the clock starts
    cpu0_server, cpu0_client = process_cpu_s(server_pid), time.process_time()
    started = time.perf_counter()
    start_gate.set()
    leased_by_worker = await asyncio.gather(*tasks)
    cpu_server, cpu_client = process_cpu_s(server_pid) - cpu0_server, time.process_time() - cpu0_client
    wall_s = (max(ended) if ended else time.perf_counter()) - started
    async with grpc.aio.insecure_channel(target) as channel:  # untimed: the next row sees the same pool
        stub = pb_grpc.BalpmServiceStub(channel)
        for w, leased in enumerate(leased_by_worker):
            if leased:
                await stub.ReleaseItems(
                    pb.ReleaseItemsRequest(pool_id=POOL, item_ids=leased, annotator_id=f"{strategy}-{w}"), timeout=60
                )
    lat = np.array(latencies_ms) if latencies_ms else np.array([np.nan])
    return Row(
        rpc=rpc,
        strategy=strategy or "-",
        mode=f"open {rate_rps:g} req/s" if rate_rps > 0 else "closed",
        requests=len(latencies_ms) + errors,
        errors=errors,
        p50_ms=float(np.percentile(lat, 50)),
        p95_ms=float(np.percentile(lat, 95)),
        p99_ms=float(np.percentile(lat, 99)),
        max_ms=float(lat.max()),
        throughput_rps=len(latencies_ms) / wall_s,
        server_acquire_p50_ms=float(np.percentile(server_ms, 50)) if server_ms else float("nan"),
        server_cpu_ms_per_req=cpu_server * 1000.0 / max(1, len(latencies_ms)),
        client_cpu_ms_per_req=cpu_client * 1000.0 / max(1, len(latencies_ms)),
    )


def print_table(rows: list[Row], target_p99_ms: float) -> None:
    """Markdown table of the rows."""
    print(
        "| rpc | strategy | load | requests | errors | p50 ms | p95 ms | p99 ms | max ms | throughput req/s "
        "| server acquire p50 ms | server CPU ms/req | client CPU ms/req | p99 target |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        verdict = ("met" if r.p99_ms <= target_p99_ms else "MISSED") if r.rpc == "AcquireBatch" else "-"
        print(
            f"| {r.rpc} | {r.strategy} | {r.mode} | {r.requests} | {r.errors} | {r.p50_ms:.1f} | {r.p95_ms:.1f} "
            f"| {r.p99_ms:.1f} | {r.max_ms:.1f} | {r.throughput_rps:.0f} | {r.server_acquire_p50_ms:.1f} "
            f"| {r.server_cpu_ms_per_req:.2f} | {r.client_cpu_ms_per_req:.2f} | {verdict} |"
        )


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--labels", type=int, default=500, help="labels before the one training")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=640, help="requests per row (fixed count)")
    p.add_argument("--batch-size", type=int, default=16, help="AcquireBatch batch_size and labels per IngestLabels")
    p.add_argument("--strategies", default="RANDOM,BALD,BALPM")
    p.add_argument("--target-p99-ms", type=float, default=50.0)
    p.add_argument(
        "--rate-rps", type=float, default=100.0, help="also an open-loop row per strategy at this total rate (0: no)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--py-spy",
        default="",
        help="write a py-spy profile of the server during the load: flame graph SVG, or collapsed stacks if *.txt",
    )
    p.add_argument("--json", default="", help="also write the rows as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="balpm-load-"))
    proc, target = start_server(tmp / "data", tmp / "server.log")
    spy: subprocess.Popen[bytes] | None = None
    try:
        with Client(target, timeout_s=600) as client:
            make_pool(client, args.items, args.dim, args.labels, args.seed)
        if args.py_spy:
            spy_exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            spy = subprocess.Popen(
                [
                    spy_exe,
                    "record",
                    "-o",
                    args.py_spy,
                    "--pid",
                    str(proc.pid),
                    "--rate",
                    "200",
                    "--nonblocking",
                    "--format",
                    "raw" if args.py_spy.endswith(".txt") else "flamegraph",
                ]
            )
        rows = [asyncio.run(run_load(target, proc.pid, "Health", "", args.clients, args.requests, args.batch_size, 0))]
        print("# done Health (the transport floor: gRPC with no work)", flush=True)
        strategies = [s.strip().upper() for s in args.strategies.split(",") if s.strip()]
        for rate_rps in (0.0, *([args.rate_rps] if args.rate_rps > 0 else [])):
            for strategy in strategies:
                rows.append(
                    asyncio.run(
                        run_load(
                            target,
                            proc.pid,
                            "AcquireBatch",
                            strategy,
                            args.clients,
                            args.requests,
                            args.batch_size,
                            0,
                            rate_rps,
                        )
                    )
                )
                print(f"# done AcquireBatch {strategy} {rows[-1].mode}", flush=True)
        rows.append(
            asyncio.run(
                run_load(
                    target, proc.pid, "IngestLabels", "", args.clients, args.requests, args.batch_size, args.labels
                )
            )
        )
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        print(
            f"\n{args.items} items, dim {args.dim}, {args.clients} concurrent clients, batch {args.batch_size}, "
            f"{args.requests} requests per row, {os.cpu_count()} CPUs\n"
        )
        print_table(rows, args.target_p99_ms)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"# data and server log in {tmp}")


if __name__ == "__main__":
    main()
