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

Before/after mode: `--compare-src before=/tmp/base after=.` runs, for each source tree
in turn (its server started with PYTHONPATH=<tree>/service:<tree>/client, and the
imported `balpm_server.__file__` checked), the same pool build, then Health.Check
from a separate poller process every `--health-interval-ms` with no load
(`--health-idle-s`), then the closed-loop IngestLabels row (`--clients`, `--batch-size`
new labels per call, for `--duration-s`) with that poller running alongside; one table,
one column per tree. The data dirs are on disk (`--data-parent`, default the temp dir),
so every label commit pays a real fsync; `--fsync-delay-ms` makes each server fsync
slower (an LD_PRELOAD shim, built with `cc`), as on a disk slower than this one:

    python bench/load.py --compare-src before=/tmp/base after=. --duration-s 12

Storage backends: `--compare-backends sqlite,postgres` builds the same pool on each backend
in turn (postgres: a PostgreSQL 16 from the `pgserver` wheel and `moto_server` as the S3
artifact store, started on loopback and stopped after) and prints the AcquireBatch rows
and the IngestLabels row per backend:

    python bench/load.py --compare-backends sqlite,postgres --items 20000 --clients 16 --requests 320
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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


# --fsync-delay-ms: LD_PRELOAD shim that sleeps before every fsync / fdatasync of the server,
# i.e. a disk whose flush takes that long (this VM's virtio disk flushes in ~0.2 ms).
FSYNC_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static long delay_ns = -1;
static void slow_disk(void) {
    if (delay_ns < 0) {
        const char *us = getenv("BALPM_BENCH_FSYNC_DELAY_US");
        delay_ns = us ? atol(us) * 1000L : 0;
        fprintf(stderr, "fsync delay shim: %ld us per fsync/fdatasync\n", delay_ns / 1000L);
    }
    if (delay_ns > 0) {
        struct timespec t = {delay_ns / 1000000000L, delay_ns % 1000000000L};
        nanosleep(&t, NULL);
    }
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow_disk();
    return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow_disk();
    return real(fd);
}
"""


def build_fsync_shim(tmp: Path) -> Path:
    """Compile `FSYNC_SHIM_C` with the system C compiler; returns the shared library."""
    src, lib = tmp / "fsync_shim.c", tmp / "fsync_shim.so"
    src.write_text(FSYNC_SHIM_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"], check=True)
    return lib


# Runs `balpm-server` from whatever `balpm_server` PYTHONPATH puts first, after saying which;
# logs each cyclic-GC pause of 5 ms or more to stderr ("# gc-pause <unix s> <ms> <generation>"),
# since a GC pause also stalls the event loop.
SERVER_LAUNCHER = """
import gc, sys, time
import balpm, balpm_server, balpm_server.server as s
print("# balpm_server", balpm_server.__file__, "balpm", balpm.__file__, flush=True)
_gc_start = [0.0]
def _gc_pause(phase, info):
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    elif (ms := (time.perf_counter() - _gc_start[0]) * 1000.0) >= 5.0:
        print(f"# gc-pause {time.time():.3f} {ms:.1f} {info['generation']}", file=sys.stderr, flush=True)
gc.callbacks.append(_gc_pause)
sys.argv[0] = "balpm-server"
s.main()
"""


def gc_pauses(log_path: Path, since: float, until: float) -> list[float]:
    """The server's GC pauses (ms, >= 5 ms) logged by `SERVER_LAUNCHER` between two unix times."""
    pauses = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("# gc-pause "):
            _, _, at, ms, _ = line.split()
            if since <= float(at) <= until:
                pauses.append(float(ms))
    return pauses


def source_digest(src: Path) -> str:
    """First 12 hex digits of a SHA-256 over `src`'s service/ and client/ Python files (names and contents).

    Tells which code a result row measured, also for a source tree that is not a git checkout.
    """
    digest = hashlib.sha256()
    for f in sorted([*(src / "service").rglob("*.py"), *(src / "client").rglob("*.py")]):
        digest.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file (for error messages: the data dir may be deleted right after)."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_server(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the server (graceful drain), then SIGKILL if it is not gone in 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_server(
    data_dir: Path,
    log_path: Path,
    src: Path | None = None,
    fsync_shim: Path | None = None,
    fsync_delay_ms: float = 0,
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Start `balpm-server` on a free loopback port; returns the process and its target.

    With `src`, the server runs that source tree's code (PYTHONPATH=<src>/service:<src>/client
    ahead of the editable install), and the check that it really imports from there is
    printed and enforced. With `fsync_shim`, every fsync of the server first sleeps
    `fsync_delay_ms` (see `FSYNC_SHIM_C`). `extra_env` adds variables (e.g. a storage backend).
    """
    exe = Path(sys.executable).parent / "balpm-server"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "balpm_server.server"]
    env = {**os.environ, "BALPM_EXTRACTOR": "", "BALPM_LOG_JSON": "true", **(extra_env or {})}
    if src is not None:
        cmd = [sys.executable, "-c", SERVER_LAUNCHER]
        env["PYTHONPATH"] = f"{src.resolve() / 'service'}:{src.resolve() / 'client'}"
    if fsync_shim is not None:
        env["LD_PRELOAD"] = str(fsync_shim)
        env["BALPM_BENCH_FSYNC_DELAY_US"] = str(round(fsync_delay_ms * 1000))
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--data-dir", str(data_dir), "--metrics-port", "-1"],
        stdout=subprocess.PIPE,
        stderr=open(log_path, "wb"),  # noqa: SIM115 - handed to the child
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if src is not None:
        words = line.split()
        server_file = Path(words[2]).resolve() if len(words) >= 5 and words[1] == "balpm_server" else None
        if server_file is None or not server_file.is_relative_to(src.resolve() / "service"):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"server does not run {src}'s code: {line!r}; its log ends:\n{log_tail(log_path)}")
        print(f"# server for {src}: {line[2:].strip()}", flush=True)
        line = proc.stdout.readline()
    match = re.search(r"listening on [^:]+:(\d+)", line)
    if not match:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start: {line!r}; its log ends:\n{log_tail(log_path)}")
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


def health_poll(target: str, interval_ms: float, duration_s: float) -> None:
    """`--health-poll`: the Health.Check poller, run as its own process (see `start_poller`).

    Prints "ready" once connected and warm, waits for a line on stdin, then sends one
    Health.Check every `interval_ms` (the next right away if a reply took longer) for
    `duration_s` and prints {"latencies_ms": [...], "sent_s": [...], "errors": n} (sent_s:
    each call's send time from the start) as one JSON line. Its own
    process, so the latencies are not those of the load clients' event loop.
    """
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = health_pb2_grpc.HealthStub(channel)
    req = health_pb2.HealthCheckRequest()
    for _ in range(20):
        stub.Check(req, timeout=30)
    print("ready", flush=True)
    sys.stdin.readline()
    latencies_ms: list[float] = []
    sent_s: list[float] = []
    errors = 0
    start = time.perf_counter()
    end = start + duration_s
    due = start
    while (sent := time.perf_counter()) < end:
        try:
            stub.Check(req, timeout=30)
        except grpc.RpcError:
            errors += 1
        else:
            latencies_ms.append((time.perf_counter() - sent) * 1000.0)
            sent_s.append(sent - start)
        due = max(due + interval_ms / 1000.0, time.perf_counter())
        time.sleep(max(0.0, due - time.perf_counter()))
    channel.close()
    print(json.dumps({"latencies_ms": latencies_ms, "sent_s": sent_s, "errors": errors}), flush=True)


def start_poller(target: str, interval_ms: float, duration_s: float) -> subprocess.Popen[str]:
    """Start the Health.Check poller process; returns once it is connected and waiting for "go"."""
    poller = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--health-poll",
            target,
            "--health-interval-ms",
            str(interval_ms),
            "--duration-s",
            str(duration_s),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert poller.stdout is not None
    if poller.stdout.readline().strip() != "ready":
        poller.kill()
        raise RuntimeError("Health.Check poller did not start")
    return poller


def go_poller(poller: subprocess.Popen[str]) -> None:
    """Tell a started poller to begin its timed polling."""
    assert poller.stdin is not None
    poller.stdin.write("go\n")
    poller.stdin.flush()


def finish_poller(poller: subprocess.Popen[str]) -> tuple[np.ndarray, int, float]:
    """Wait for the poller's result: (latencies ms, errors, send time of the slowest call in s)."""
    out, _ = poller.communicate(timeout=120)
    result = json.loads(out.strip().splitlines()[-1])
    lat = np.array(result["latencies_ms"] or [np.nan])
    slowest_at_s = float(result["sent_s"][int(np.argmax(lat))]) if result["sent_s"] else float("nan")
    return lat, int(result["errors"]), slowest_at_s


@dataclass
class CompareRow:
    """One source tree's column of the before/after IngestLabels table."""

    tree: str
    src: str
    src_digest: str
    ingest_requests: int
    ingest_errors: int
    ingest_rps: float
    labels_per_s: float
    ingest_p50_ms: float
    ingest_p99_ms: float
    ingest_max_ms: float
    server_cpu_ms_per_req: float
    health_idle_samples: int
    health_idle_p50_ms: float
    health_idle_p99_ms: float
    health_load_samples: int
    health_load_errors: int
    health_load_p50_ms: float
    health_load_p99_ms: float
    health_load_max_ms: float
    health_load_max_at_s: float
    gc_pauses_during: int
    gc_max_pause_ms_during: float


async def run_ingest_for(
    target: str,
    server_pid: int,
    clients: int,
    duration_s: float,
    batch_size: int,
    n_items: int,
    poller: subprocess.Popen[str],
) -> tuple[np.ndarray, int, float, float]:
    """Closed-loop IngestLabels from `clients` channels for `duration_s`, while `poller` polls Health.

    Every label id is new (so each call stores `batch_size` labels and commits them);
    item ids cycle over the pool. Returns (latencies ms, errors, wall s, server CPU s).
    """
    latencies_ms: list[float] = []
    errors = 0

    async def worker(w: int) -> None:
        nonlocal errors
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.BalpmServiceStub(channel)
            await channel.channel_ready()
            await start_gate.wait()
            j = 0
            while time.perf_counter() < end:
                first = (w * 7919 + j * batch_size) % n_items
                req = pb.IngestLabelsRequest(
                    pool_id=POOL,
                    labels=[
                        pb.Label(
                            label_id=f"cmp-{w}-{j}-{k}",
                            item_id=f"it-{(first + k) % n_items}",
                            preference=pb.PREFERENCE_A if (j + k) % 2 else pb.PREFERENCE_B,
                            annotator_id=f"labeler-{w}",
                        )
                        for k in range(batch_size)
                    ],
                )
                j += 1
                started = time.perf_counter()
                try:
                    await stub.IngestLabels(req, timeout=30)
                except grpc.aio.AioRpcError as e:
                    errors += 1
                    if errors <= 3:
                        print(f"# IngestLabels error: {e.code().name} {e.details()}", file=sys.stderr)
                    continue
                latencies_ms.append((time.perf_counter() - started) * 1000.0)

    start_gate = asyncio.Event()
    end = float("inf")
    tasks = [asyncio.ensure_future(worker(w)) for w in range(clients)]
    await asyncio.sleep(0.5)  # let every channel connect before the clock starts
    cpu0 = process_cpu_s(server_pid)
    started = time.perf_counter()
    end = started + duration_s
    go_poller(poller)
    start_gate.set()
    await asyncio.gather(*tasks)
    return np.array(latencies_ms or [np.nan]), errors, time.perf_counter() - started, process_cpu_s(server_pid) - cpu0


def compare_tree(
    name: str, src: Path, args: argparse.Namespace, tmp: Path, fsync_shim: Path | None
) -> CompareRow:
    """Start `src`'s server on a fresh on-disk data dir, build the pool, measure Health idle, then ingest."""
    proc, target = start_server(
        tmp / f"data-{name}", tmp / f"server-{name}.log", src, fsync_shim, args.fsync_delay_ms
    )
    try:
        with Client(target, timeout_s=600) as client:
            make_pool(client, args.items, args.dim, args.labels, args.seed)
        poller = start_poller(target, args.health_interval_ms, args.health_idle_s)
        go_poller(poller)
        idle_ms, _, _ = finish_poller(poller)
        poller = start_poller(target, args.health_interval_ms, args.duration_s)
        load_since = time.time()
        lat, errors, wall_s, cpu_s = asyncio.run(
            run_ingest_for(target, proc.pid, args.clients, args.duration_s, args.batch_size, args.items, poller)
        )
        load_ms, health_errors, slowest_at_s = finish_poller(poller)
        load_until = time.time()
    finally:
        stop_server(proc)
    if fsync_shim is not None and "fsync delay shim" not in (tmp / f"server-{name}.log").read_text(errors="replace"):
        raise RuntimeError(f"the fsync delay shim did not load in {name}'s server")
    pauses = gc_pauses(tmp / f"server-{name}.log", load_since, load_until)
    done = int(np.isfinite(lat).sum())
    print(f"# done {name}: {done} IngestLabels calls in {wall_s:.1f} s", flush=True)
    return CompareRow(
        tree=name,
        src=str(src),
        src_digest=source_digest(src),
        ingest_requests=done + errors,
        ingest_errors=errors,
        ingest_rps=done / wall_s,
        labels_per_s=done * args.batch_size / wall_s,
        ingest_p50_ms=float(np.percentile(lat, 50)),
        ingest_p99_ms=float(np.percentile(lat, 99)),
        ingest_max_ms=float(lat.max()),
        server_cpu_ms_per_req=cpu_s * 1000.0 / max(1, done),
        health_idle_samples=int(np.isfinite(idle_ms).sum()),
        health_idle_p50_ms=float(np.percentile(idle_ms, 50)),
        health_idle_p99_ms=float(np.percentile(idle_ms, 99)),
        health_load_samples=int(np.isfinite(load_ms).sum()),
        health_load_errors=health_errors,
        health_load_p50_ms=float(np.percentile(load_ms, 50)),
        health_load_p99_ms=float(np.percentile(load_ms, 99)),
        health_load_max_ms=float(load_ms.max()),
        health_load_max_at_s=slowest_at_s,
        gc_pauses_during=len(pauses),
        gc_max_pause_ms_during=max(pauses, default=0.0),
    )


def print_compare(rows: list[CompareRow]) -> None:
    """Markdown table, one column per source tree."""
    metrics = [
        ("source sha256 (service/, client/ *.py)", lambda r: r.src_digest),
        ("IngestLabels calls (errors)", lambda r: f"{r.ingest_requests} ({r.ingest_errors})"),
        ("IngestLabels req/s", lambda r: f"{r.ingest_rps:.0f}"),
        ("labels/s", lambda r: f"{r.labels_per_s:.0f}"),
        ("IngestLabels p50 ms", lambda r: f"{r.ingest_p50_ms:.1f}"),
        ("IngestLabels p99 ms", lambda r: f"{r.ingest_p99_ms:.1f}"),
        ("IngestLabels max ms", lambda r: f"{r.ingest_max_ms:.1f}"),
        ("server CPU ms/call", lambda r: f"{r.server_cpu_ms_per_req:.2f}"),
        ("Health.Check p50 ms, idle", lambda r: f"{r.health_idle_p50_ms:.2f}"),
        ("Health.Check p99 ms, idle", lambda r: f"{r.health_idle_p99_ms:.2f}"),
        ("Health.Check p50 ms, during ingest", lambda r: f"{r.health_load_p50_ms:.1f}"),
        ("Health.Check p99 ms, during ingest", lambda r: f"{r.health_load_p99_ms:.1f}"),
        (
            "Health.Check max ms, during ingest (sent at s)",
            lambda r: f"{r.health_load_max_ms:.1f} ({r.health_load_max_at_s:.2f})",
        ),
        (
            "server GC pauses >= 5 ms during ingest (longest ms)",
            lambda r: f"{r.gc_pauses_during} ({r.gc_max_pause_ms_during:.1f})",
        ),
        (
            "Health.Check samples idle / during (errors)",
            lambda r: f"{r.health_idle_samples} / {r.health_load_samples} ({r.health_load_errors})",
        ),
    ]
    print("| metric | " + " | ".join(r.tree for r in rows) + " |")
    print("| --- |" + " ---: |" * len(rows))
    for label, fmt in metrics:
        print(f"| {label} | " + " | ".join(fmt(r) for r in rows) + " |")


def source_trees(specs: list[str], flag: str) -> list[tuple[str, Path]]:
    """NAME=PATH pairs of source trees (PATH/service/balpm_server must exist)."""
    trees: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not (Path(path) / "service" / "balpm_server").is_dir():
            raise SystemExit(f"{flag} wants NAME=PATH with PATH/service/balpm_server; got {spec!r}")
        trees.append((name, Path(path)))
    return trees


def run_acquire_compare(args: argparse.Namespace) -> None:
    """`--acquire-src`: the AcquireBatch rows of `--strategies`, per source tree, one after the other in one run."""
    trees = source_trees(args.acquire_src, "--acquire-src")
    strategies = [s.strip().upper() for s in args.strategies.split(",") if s.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="balpm-load-"))
    tables: list[tuple[str, str, list[Row]]] = []
    try:
        for name, src in trees:
            proc, target = start_server(tmp / f"data-{name}", tmp / f"server-{name}.log", src)
            try:
                with Client(target, timeout_s=600) as client:
                    make_pool(client, args.items, args.dim, args.labels, args.seed)
                rows = []
                for strategy in strategies:
                    rows.append(asyncio.run(run_load(
                        target, proc.pid, "AcquireBatch", strategy, args.clients, args.requests, args.batch_size, 0
                    )))
                    print(f"# done {name} AcquireBatch {strategy}", flush=True)
                tables.append((name, source_digest(src), rows))
            finally:
                stop_server(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n{args.items} items, dim {args.dim}, {args.labels} seed labels and one training, {args.clients} "
        f"concurrent clients, batch {args.batch_size}, {args.requests} requests per row, {os.cpu_count()} CPUs"
    )
    for name, digest, rows in tables:
        print(f"\n### {name} (source sha256 {digest})\n")
        print_table(rows, args.target_p99_ms)
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"tree": name, "src_digest": digest, "rows": [asdict(r) for r in rows]} for name, digest, rows in tables],
            indent=2,
        ))


def run_backend_compare(args: argparse.Namespace) -> None:
    """`--compare-backends`: the AcquireBatch rows and the IngestLabels row per storage backend, in one run.

    "sqlite" is the embedded default (data dir on this disk); "postgres" is a PostgreSQL 16
    server (the `pgserver` wheel's binaries, on loopback) for the records plus an S3-compatible
    server (`moto_server`, on loopback) for the artifacts, both started here and stopped after.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.backends import MotoServer, PostgresServer

    names = [n.strip() for n in args.compare_backends.split(",") if n.strip()]
    unknown = set(names) - {"sqlite", "postgres"}
    if unknown:
        raise SystemExit(f"--compare-backends: unknown backend(s) {sorted(unknown)}; use sqlite,postgres")
    strategies = [s.strip().upper() for s in args.strategies.split(",") if s.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="balpm-load-", dir=args.data_parent or None))
    pg: PostgresServer | None = None
    moto: MotoServer | None = None
    tables: list[tuple[str, str, list[Row]]] = []
    try:
        for name in names:
            env: dict[str, str] = {}
            described = "SQLite + data dir"
            if name == "postgres":
                pg = pg or PostgresServer(tmp / "pg")
                moto = moto or MotoServer(tmp / "moto.log")
                import psycopg

                url = pg.new_database()
                with psycopg.connect(url) as conn:
                    row = conn.execute("SELECT version()").fetchone()
                described = f"{str(row[0]).split(',')[0] if row else 'PostgreSQL'} + S3 (moto_server)"
                env = {**moto.env(), "BALPM_DATABASE_URL": url, "BALPM_ARTIFACT_URL": f"s3://{moto.new_bucket()}/balpm"}
            proc, target = start_server(tmp / f"data-{name}", tmp / f"server-{name}.log", extra_env=env)
            try:
                with Client(target, timeout_s=600) as client:
                    make_pool(client, args.items, args.dim, args.labels, args.seed)
                rows = []
                for strategy in strategies:
                    rows.append(asyncio.run(run_load(
                        target, proc.pid, "AcquireBatch", strategy, args.clients, args.requests, args.batch_size, 0
                    )))
                    print(f"# done {name} AcquireBatch {strategy}", flush=True)
                rows.append(asyncio.run(run_load(
                    target, proc.pid, "IngestLabels", "", args.clients, args.requests, args.batch_size, args.labels
                )))
                print(f"# done {name} IngestLabels", flush=True)
                errors_seen = [ln for ln in log_tail(tmp / f"server-{name}.log", 2000).splitlines()
                               if '"level": "ERROR"' in ln or "Traceback" in ln]
                if errors_seen:
                    print(f"# {name}: {len(errors_seen)} error lines in the server log, first: {errors_seen[0][:300]}")
                tables.append((name, described, rows))
            finally:
                stop_server(proc)
    finally:
        if moto is not None:
            moto.close()
        if pg is not None:
            pg.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n{args.items} items, dim {args.dim}, {args.labels} seed labels and one training, {args.clients} "
        f"concurrent clients, batch {args.batch_size}, {args.requests} requests per row, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}"
    )
    for name, described, rows in tables:
        print(f"\n### {name}: {described}\n")
        print_table(rows, args.target_p99_ms)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cpus": os.cpu_count(), "python": sys.version.split()[0],
             "backends": [{"backend": n, "stores": d, "rows": [asdict(r) for r in rows]} for n, d, rows in tables]},
            indent=2,
        ))


def run_compare(args: argparse.Namespace) -> None:
    """`--compare-src`: the IngestLabels row and Health.Check during it, per source tree, in one table."""
    trees = source_trees(args.compare_src, "--compare-src")
    tmp = Path(tempfile.mkdtemp(prefix="balpm-load-", dir=args.data_parent or None))
    try:
        shim = build_fsync_shim(tmp) if args.fsync_delay_ms > 0 else None
        rows = [compare_tree(name, src, args, tmp, shim) for name, src in trees]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"# data and server logs in {tmp}")
    print(
        f"\n{args.items} items, dim {args.dim}, {args.labels} seed labels and one training; IngestLabels: "
        f"{args.clients} concurrent clients, {args.batch_size} new labels per call, closed loop for "
        f"{args.duration_s:g} s; Health.Check: one separate client process, one call every "
        f"{args.health_interval_ms:g} ms ({args.health_idle_s:g} s idle first, then during the ingest); "
        f"data dir on {tmp.parent}"
        + (f", each server fsync slowed by {args.fsync_delay_ms:g} ms (LD_PRELOAD shim)" if args.fsync_delay_ms else "")
        + f"; {os.cpu_count()} CPUs\n"
    )
    print_compare(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))


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
    p.add_argument(
        "--compare-src",
        nargs="+",
        metavar="NAME=PATH",
        default=[],
        help="instead of the rows above: per source tree (its server run with PYTHONPATH=PATH/service:PATH/client), "
        "the IngestLabels closed-loop row and Health.Check p50/p99 idle and during it, side by side",
    )
    p.add_argument(
        "--acquire-src",
        nargs="+",
        metavar="NAME=PATH",
        default=[],
        help="instead of the rows above: the AcquireBatch rows of --strategies per source tree, one after the other",
    )
    p.add_argument("--duration-s", type=float, default=12.0, help="--compare-src: ingest seconds per tree")
    p.add_argument("--health-interval-ms", type=float, default=5.0, help="--compare-src: Health.Check poll period")
    p.add_argument("--health-idle-s", type=float, default=3.0, help="--compare-src: idle Health.Check seconds")
    p.add_argument(
        "--compare-backends", default="",
        help="instead of the rows above: e.g. sqlite,postgres: the AcquireBatch rows of --strategies and the "
        "IngestLabels row per storage backend in one run (postgres = a PostgreSQL 16 and an S3-compatible server, "
        "both started on loopback by the bench)",
    )
    p.add_argument(
        "--data-parent", default="", help="--compare-src: where the on-disk data dirs go (default: the temp dir)"
    )
    p.add_argument(
        "--fsync-delay-ms",
        type=float,
        default=0.0,
        help="--compare-src: sleep this long before each server fsync/fdatasync (LD_PRELOAD shim; a slower disk)",
    )
    p.add_argument("--health-poll", default="", help=argparse.SUPPRESS)  # internal: the poller process
    args = p.parse_args()
    if args.health_poll:
        health_poll(args.health_poll, args.health_interval_ms, args.duration_s)
        return
    if args.compare_src:
        run_compare(args)
        return
    if args.acquire_src:
        run_acquire_compare(args)
        return
    if args.compare_backends:
        run_backend_compare(args)
        return

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
        stop_server(proc)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"# data and server log in {tmp}")


if __name__ == "__main__":
    main()
