"""Cluster-mode load: AcquireBatch / IngestLabels with 1, 2 and 3 replicas, and the forwarding overhead.

In one run: a PostgreSQL 16 (the `pgserver` wheel's binaries) and a `moto_server` (an
S3-compatible bucket) on loopback, then `balpm-server` replicas in cluster mode
(`BALPM_CLUSTER=true`, replica ids r0, r1, r2) sharing them. Replica r0 starts first;
`--pools` pools of `--items` client-feature items (dim `--dim`) are created through it,
each gets `--labels` seed labels and one posterior training. Then, for 1, 2 and 3
replicas (one more replica started before each step), the bench waits until ownership
has settled (every pool has a live owner in `pool_owners` and every replica owns its
share, at most ceil(pools / replicas)), warms every pool up through every replica, and
drives `--clients` concurrent closed-loop clients for `--duration-s` seconds per cell;
each call goes to a random replica (as behind a Service) and a random pool:

- AcquireBatch, strategy RANDOM and BALPM, `--batch-size` items, short leases
  (`--lease-ttl-s`, so the pools never run dry);
- IngestLabels, `--batch-size` new labels per call (cycling over a reserved set of
  items per pool, so the acquirable items are not used up).

Per cell: throughput, p50 / p99 latency, and CPU seconds per request of the replica
processes together (user + sys from /proc over the measured window), besides those of
PostgreSQL, moto_server and the client process, so the throughput on a machine with a
core per replica can be estimated (1 / replica CPU s per request per core). With 2 and
3 replicas, also the forwarding overhead: AcquireBatch of one pool sent alternately
through its owner and through a non-owner by one sequential client (no other load),
p50 through the non-owner minus p50 through the owner.

    python bench/cluster.py                # default counts: 20 s per cell, results to bench/results/cluster.json
    python bench/cluster.py --quick        # a smoke run of a few seconds per cell (writes nothing unless --out)

Every process the bench starts is stopped at the end (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/cluster.py): make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any, cast

import grpc
import numpy as np
import psutil

from balpm import Client
from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc
from bench.load import log_tail, process_cpu_s, start_server
from tests.backends import MotoServer, PostgresServer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "cluster.json"
STRATEGIES = ("RANDOM", "BALPM")


@dataclass
class Replica:
    """One `balpm-server` replica process.

    Attributes:
        replica_id: Its BALPM_REPLICA_ID (r0, r1, ...).
        proc: The process.
        target: Its loopback gRPC address.
        log_path: Its stderr log.
    """

    replica_id: str
    proc: subprocess.Popen[str]
    target: str
    log_path: Path


@dataclass
class Cell:
    """One measured cell: one RPC (and strategy) at one replica count."""

    replicas: int
    rpc: str
    strategy: str
    clients: int
    duration_s: float
    requests: int
    errors: int
    error_codes: dict[str, int]
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    replica_cpu_s: float
    replica_cpu_ms_per_req: float
    est_rps_per_replica_core: float
    postgres_cpu_ms_per_req: float
    moto_cpu_ms_per_req: float
    client_cpu_ms_per_req: float
    per_replica_cpu_s: dict[str, float]
    per_replica_requests: dict[str, int]
    forwarded_share: float
    direct_p50_ms: float
    forwarded_p50_ms: float
    server_acquire_p50_ms: float


@dataclass
class Forwarding:
    """AcquireBatch of one pool through its owner vs through a non-owner, alternating, one sequential client."""

    replicas: int
    strategy: str
    pool: str
    owner: str
    via: str
    pairs: int
    errors: int
    owner_p50_ms: float
    non_owner_p50_ms: float
    overhead_p50_ms: float
    paired_diff_median_ms: float
    owner_p99_ms: float
    non_owner_p99_ms: float
    server_acquire_p50_ms: float


@dataclass
class Step:
    """What happened at one replica count besides the cells."""

    replicas: int
    settle_s: float
    owners: dict[str, str]
    owners_after: dict[str, str]
    warmup_s: float
    cells: list[Cell] = field(default_factory=list)
    forwarding: list[Forwarding] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile of `values` (NaN when empty)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def postgres_cpu_s(pg: PostgresServer) -> float:
    """User + system CPU seconds of the PostgreSQL server: the postmaster, its live backends and its reaped ones."""
    pid = int((pg.data / "postmaster.pid").read_text().split()[0])
    try:
        master = psutil.Process(pid)
        t = master.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in master.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.NoSuchProcess:
                pass
        return float(total)
    except psutil.NoSuchProcess:
        return float("nan")


def safe_cpu_s(pid: int) -> float:
    """`process_cpu_s`, or NaN when the process is gone."""
    try:
        return process_cpu_s(pid)
    except (FileNotFoundError, ProcessLookupError):
        return float("nan")


def pool_names(n: int) -> list[str]:
    """The benchmark's pool ids."""
    return [f"cl{i}" for i in range(n)]


def owners_now(database_url: str) -> dict[str, str]:
    """Pool id -> replica id of every pool's live owner (expiry in the future) in `pool_owners`."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT p.name, o.replica_id FROM pool_owners o JOIN pools p ON p.pool_id = o.pool_id"
            " WHERE o.expire_time > %s",
            (time.time(),),
        ).fetchall()
    return {str(name): str(rid) for name, rid in rows}


def settled(owners: dict[str, str], pools: Sequence[str], replica_ids: Sequence[str]) -> bool:
    """Whether every pool has a live owner among `replica_ids` and each replica owns its share."""
    if set(owners) != set(pools) or not set(owners.values()) <= set(replica_ids):
        return False
    counts = [list(owners.values()).count(r) for r in replica_ids]
    cap = math.ceil(len(pools) / len(replica_ids))
    return max(counts) <= cap and min(counts) >= len(pools) // len(replica_ids)


def wait_settled(database_url: str, pools: Sequence[str], replica_ids: Sequence[str], timeout_s: float) -> float:
    """Poll `pool_owners` until ownership has settled (see `settled`) and stayed so for a second.

    Returns:
        Seconds waited.

    Raises:
        TimeoutError: Not settled within `timeout_s`.
    """
    started = time.monotonic()
    stable_since: float | None = None
    last: dict[str, str] = {}
    while time.monotonic() - started < timeout_s:
        owners = owners_now(database_url)
        if settled(owners, pools, replica_ids):
            if owners != last:
                stable_since = time.monotonic()
            elif stable_since is not None and time.monotonic() - stable_since >= 1.0:
                return time.monotonic() - started
        else:
            stable_since = None
        last = owners
        time.sleep(0.2)
    raise TimeoutError(f"ownership not settled over {list(replica_ids)} in {timeout_s:g} s: {last}")


def start_replica(index: int, tmp: Path, cluster_env: dict[str, str]) -> Replica:
    """Start replica r<index> (cluster mode, client features) with `bench.load.start_server`."""
    rid = f"r{index}"
    log_path = tmp / f"{rid}.log"
    env = {**cluster_env, "BALPM_REPLICA_ID": rid, "BALPM_HOST": "127.0.0.1"}
    proc, target = start_server(tmp / f"data-{rid}", log_path, extra_env=env)
    print(f"# started {rid} at {target} (pid {proc.pid})", flush=True)
    return Replica(rid, proc, target, log_path)


def stop_all(procs: Sequence[subprocess.Popen[Any]], grace_s: float = 20.0) -> None:
    """SIGTERM every process still running, wait up to `grace_s` in all, then SIGKILL the rest."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def make_pools(target: str, pools: Sequence[str], args: argparse.Namespace) -> None:
    """Create, fill, seed-label and train each pool once, through one replica."""
    with Client(target, timeout_s=600) as client:
        for n, pool in enumerate(pools):
            rng = np.random.default_rng(args.seed + n)
            w_D = rng.normal(size=args.dim)
            prompts_N_D = rng.normal(size=(args.items, args.dim)).astype(np.float32)
            a_N_D = (prompts_N_D + rng.normal(size=(args.items, args.dim))).astype(np.float32)
            b_N_D = (prompts_N_D + rng.normal(size=(args.items, args.dim))).astype(np.float32)
            client.create_pool(
                pool, feature_source="CLIENT", feature_dim=args.dim, ensemble_size=args.ensemble,
                hidden_sizes=[64], epochs=args.epochs,
            )

            def items(p: np.ndarray = prompts_N_D, a: np.ndarray = a_N_D, b: np.ndarray = b_N_D) -> Iterator[pb.Item]:
                for i in range(args.items):
                    yield pb.Item(
                        item_id=f"it-{i}", prompt=f"prompt {i}", completion_a=f"a {i}", completion_b=f"b {i}",
                        prompt_features=p[i].tolist(), completion_a_features=a[i].tolist(),
                        completion_b_features=b[i].tolist(),
                    )

            started = time.perf_counter()
            client.upload_items(pool, items(), chunk_size=1000)
            prefs = np.where(a_N_D[: args.labels] @ w_D > b_N_D[: args.labels] @ w_D, "A", "B")
            client.ingest_labels(pool, [
                {"label_id": f"seed-{i}", "item_id": f"it-{i}", "preference": str(prefs[i])}
                for i in range(args.labels)
            ])
            op = client.update_posterior(pool, seed=args.seed)
            print(
                f"# pool {pool}: {args.items} items, {args.labels} labels, posterior "
                f"v{op.result.posterior_version} in {time.perf_counter() - started:.1f} s",
                flush=True,
            )


def warm_up(replicas: Sequence[Replica], pools: Sequence[str], owners: dict[str, str]) -> float:
    """One AcquireBatch per pool and strategy through the owner, then through every other replica; released.

    The owner loads the pool (items, labels, posterior, kNN graph) and every replica opens
    its channels to the owners, so the cells measure the steady state.

    Returns:
        Seconds taken.
    """
    started = time.perf_counter()
    by_id = {r.replica_id: r for r in replicas}
    for pool in pools:
        order = [by_id[owners[pool]], *(r for r in replicas if r.replica_id != owners[pool])]
        for r in order:
            with Client(r.target, timeout_s=600) as client:
                for strategy in STRATEGIES:
                    batch = client.acquire(pool, batch_size=1, strategy=strategy, annotator_id="warmup")
                    client.release_items(pool, [a.item.item_id for a in batch.items], annotator_id="warmup")
    return time.perf_counter() - started


async def run_cell(
    replicas: Sequence[Replica],
    pools: Sequence[str],
    owners: dict[str, str],
    rpc: str,
    strategy: str,
    args: argparse.Namespace,
    pg: PostgresServer,
    moto: MotoServer,
) -> Cell:
    """`args.clients` closed-loop clients for `args.duration_s`, each call to a random replica and pool.

    CPU per request: the replica processes' (and PostgreSQL's, moto_server's, this
    process's) CPU time between the start gate and the last reply, over the calls completed.
    """
    n = len(replicas)
    strat = cast(Any, pb.Strategy.Value(f"STRATEGY_{strategy}") if strategy else 0)
    records: list[tuple[float, int, bool]] = []  # (latency ms, replica index, forwarded)
    server_ms: list[float] = []
    ended: list[float] = []
    error_codes: dict[str, int] = {}
    gate = asyncio.Event()
    stop_at = [0.0]

    async def worker(w: int) -> None:
        channels = [grpc.aio.insecure_channel(r.target) for r in replicas]
        try:
            stubs = [pb_grpc.BalpmServiceStub(ch) for ch in channels]
            for ch in channels:
                await ch.channel_ready()
            await gate.wait()
            rng = random.Random(f"{n}-{rpc}-{strategy}-{w}")
            j = 0
            while time.perf_counter() < stop_at[0]:
                i = rng.randrange(n)
                pool = rng.choice(pools)
                if rpc == "AcquireBatch":
                    req: Any = pb.AcquireBatchRequest(
                        pool_id=pool, batch_size=args.batch_size, strategy=strat, seed=j,
                        annotator_id=f"c{w}", lease_ttl_s=args.lease_ttl_s,
                    )
                    method: Any = stubs[i].AcquireBatch
                else:
                    req = pb.IngestLabelsRequest(pool_id=pool, labels=[
                        pb.Label(
                            label_id=f"n{n}-w{w}-{j}-{k}",
                            item_id=f"it-{(w * 7919 + j * args.batch_size + k) % args.reserve}",
                            preference=pb.PREFERENCE_A if (j + k) % 2 else pb.PREFERENCE_B,
                            annotator_id=f"labeler-{w}",
                        )
                        for k in range(args.batch_size)
                    ])
                    method = stubs[i].IngestLabels
                j += 1
                sent = time.perf_counter()
                try:
                    resp = await method(req, timeout=30)
                except grpc.aio.AioRpcError as e:
                    key = e.code().name
                    error_codes[key] = error_codes.get(key, 0) + 1
                    if sum(error_codes.values()) <= 3:
                        print(f"# {rpc} {strategy} via {replicas[i].replica_id}: {key} {e.details()}", file=sys.stderr)
                    continue
                done = time.perf_counter()
                ended.append(done)
                forwarded = rpc == "AcquireBatch" and owners[pool] != replicas[i].replica_id
                records.append(((done - sent) * 1000.0, i, forwarded))
                if rpc == "AcquireBatch":
                    server_ms.append(resp.acquire_s * 1000.0)
        finally:
            for ch in channels:
                await ch.close()

    tasks = [asyncio.ensure_future(worker(w)) for w in range(args.clients)]
    await asyncio.sleep(0.5 + 0.05 * args.clients)  # every channel connected before the clock starts
    cpu0 = {r.replica_id: safe_cpu_s(r.proc.pid) for r in replicas}
    pg0, moto0, client0 = postgres_cpu_s(pg), safe_cpu_s(moto.proc.pid), time.process_time()
    started = time.perf_counter()
    stop_at[0] = started + args.duration_s
    gate.set()
    await asyncio.gather(*tasks)
    cpu = {r.replica_id: safe_cpu_s(r.proc.pid) - cpu0[r.replica_id] for r in replicas}
    pg_s, moto_s = postgres_cpu_s(pg) - pg0, safe_cpu_s(moto.proc.pid) - moto0
    client_s = time.process_time() - client0
    wall_s = (max(ended) if ended else time.perf_counter()) - started
    done_n = len(records)
    per = 1000.0 / max(1, done_n)
    lat = [r[0] for r in records]
    replica_s = sum(cpu.values())
    return Cell(
        replicas=n,
        rpc=rpc,
        strategy=strategy or "-",
        clients=args.clients,
        duration_s=round(wall_s, 3),
        requests=done_n,
        errors=sum(error_codes.values()),
        error_codes=error_codes,
        throughput_rps=done_n / wall_s if wall_s > 0 else float("nan"),
        p50_ms=percentile(lat, 50),
        p95_ms=percentile(lat, 95),
        p99_ms=percentile(lat, 99),
        max_ms=max(lat) if lat else float("nan"),
        replica_cpu_s=replica_s,
        replica_cpu_ms_per_req=replica_s * per,
        est_rps_per_replica_core=done_n / replica_s if replica_s > 0 else float("nan"),
        postgres_cpu_ms_per_req=pg_s * per,
        moto_cpu_ms_per_req=moto_s * per,
        client_cpu_ms_per_req=client_s * per,
        per_replica_cpu_s={k: round(v, 3) for k, v in cpu.items()},
        per_replica_requests={r.replica_id: sum(1 for x in records if x[1] == i) for i, r in enumerate(replicas)},
        forwarded_share=sum(1 for x in records if x[2]) / max(1, done_n),
        direct_p50_ms=percentile([x[0] for x in records if not x[2]], 50) if rpc == "AcquireBatch" else float("nan"),
        forwarded_p50_ms=percentile([x[0] for x in records if x[2]], 50) if rpc == "AcquireBatch" else float("nan"),
        server_acquire_p50_ms=percentile(server_ms, 50),
    )


def measure_forwarding(
    replicas: Sequence[Replica], pool: str, owners: dict[str, str], strategy: str, pairs: int
) -> Forwarding:
    """AcquireBatch of `pool` alternately through its owner and a non-owner (random order in each pair)."""
    owner = next(r for r in replicas if r.replica_id == owners[pool])
    via = next(r for r in replicas if r.replica_id != owners[pool])
    strat = cast(Any, pb.Strategy.Value(f"STRATEGY_{strategy}"))
    channels = {r.replica_id: grpc.insecure_channel(r.target) for r in (owner, via)}
    try:
        stubs = {k: pb_grpc.BalpmServiceStub(ch) for k, ch in channels.items()}
        times: dict[str, list[float]] = {owner.replica_id: [], via.replica_id: []}
        server_ms: list[float] = []
        diffs: list[float] = []
        errors = 0
        rng = random.Random(f"fwd-{len(replicas)}-{strategy}")
        for j in range(-10, pairs):  # 10 pairs of warm-up, not counted
            order = [owner.replica_id, via.replica_id]
            rng.shuffle(order)
            got: dict[str, float] = {}
            for rid in order:
                req = pb.AcquireBatchRequest(
                    pool_id=pool, batch_size=8, strategy=strat, seed=j + 10, annotator_id=f"fwd-{rid}",
                    lease_ttl_s=60.0,
                )
                sent = time.perf_counter()
                try:
                    resp = stubs[rid].AcquireBatch(req, timeout=30)
                except grpc.RpcError as e:
                    errors += 1
                    if errors <= 3:
                        print(f"# forwarding {strategy} via {rid}: {e}", file=sys.stderr)
                    continue
                got[rid] = (time.perf_counter() - sent) * 1000.0
                stubs[owner.replica_id].ReleaseItems(  # untimed; keeps the pool from running dry
                    pb.ReleaseItemsRequest(
                        pool_id=pool, item_ids=[a.item.item_id for a in resp.items], annotator_id=f"fwd-{rid}"
                    ),
                    timeout=30,
                )
                if j >= 0 and rid == owner.replica_id:
                    server_ms.append(resp.acquire_s * 1000.0)
            if j >= 0:
                for rid, ms in got.items():
                    times[rid].append(ms)
                if len(got) == 2:
                    diffs.append(got[via.replica_id] - got[owner.replica_id])
    finally:
        for ch in channels.values():
            ch.close()
    o, v = times[owner.replica_id], times[via.replica_id]
    return Forwarding(
        replicas=len(replicas), strategy=strategy, pool=pool, owner=owner.replica_id, via=via.replica_id,
        pairs=len(diffs), errors=errors, owner_p50_ms=percentile(o, 50), non_owner_p50_ms=percentile(v, 50),
        overhead_p50_ms=percentile(v, 50) - percentile(o, 50), paired_diff_median_ms=percentile(diffs, 50),
        owner_p99_ms=percentile(o, 99), non_owner_p99_ms=percentile(v, 99),
        server_acquire_p50_ms=percentile(server_ms, 50),
    )


def machine_facts() -> dict[str, Any]:
    """Cores, CPU model, memory, Python, load average."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def fmt(x: float, digits: int = 1) -> str:
    """A number for the table ('-' for NaN)."""
    return "-" if x != x else f"{x:.{digits}f}"


def markdown(steps: Sequence[Step], meta: dict[str, Any]) -> str:
    """The result tables as markdown."""
    s = meta["settings"]
    lines = [
        f"{s['pools']} pools x {s['items']} client-feature items (dim {s['dim']}), {s['clients']} closed-loop "
        f"clients, each call to a random replica and pool, {s['duration_s']:g} s per cell, batch {s['batch_size']} "
        f"(AcquireBatch items / IngestLabels labels), ownership TTL {s['ownership_ttl_s']:g} s; "
        f"{meta['machine']['cpus']} CPUs ({meta['machine']['cpu_model']}), shared with other work.",
        "",
        "| replicas | rpc | strategy | requests | errors | req/s | p50 ms | p99 ms | replica CPU ms/req "
        "| est. req/s per replica core | PostgreSQL CPU ms/req | client CPU ms/req | forwarded "
        "| p50 direct / forwarded ms |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for st in steps:
        for c in st.cells:
            split = (
                f"{fmt(c.direct_p50_ms)} / {fmt(c.forwarded_p50_ms)}" if c.rpc == "AcquireBatch" else "-"
            )
            lines.append(
                f"| {c.replicas} | {c.rpc} | {c.strategy} | {c.requests} | {c.errors} | {c.throughput_rps:.0f} "
                f"| {fmt(c.p50_ms)} | {fmt(c.p99_ms)} | {fmt(c.replica_cpu_ms_per_req, 2)} "
                f"| {c.est_rps_per_replica_core:.0f} | {fmt(c.postgres_cpu_ms_per_req, 2)} "
                f"| {fmt(c.client_cpu_ms_per_req, 2)} | {c.forwarded_share:.0%} | {split} |"
            )
    fwd = [f for st in steps for f in st.forwarding]
    if fwd:
        lines += [
            "",
            "Forwarding overhead (one sequential client, no other load, the same pool through its owner and "
            "through a non-owner, alternating):",
            "",
            "| replicas | strategy | pool | owner | via | pairs | owner p50 ms | non-owner p50 ms | overhead p50 ms "
            "| median paired diff ms | owner p99 ms | non-owner p99 ms | server acquire p50 ms |",
            "| ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for f in fwd:
            lines.append(
                f"| {f.replicas} | {f.strategy} | {f.pool} | {f.owner} | {f.via} | {f.pairs} "
                f"| {fmt(f.owner_p50_ms, 2)} | {fmt(f.non_owner_p50_ms, 2)} | {fmt(f.overhead_p50_ms, 2)} "
                f"| {fmt(f.paired_diff_median_ms, 2)} "
                f"| {fmt(f.owner_p99_ms, 2)} | {fmt(f.non_owner_p99_ms, 2)} | {fmt(f.server_acquire_p50_ms, 2)} |"
            )
    lines += ["", "Ownership per step (pool: owner): " + "; ".join(
        f"{st.replicas} replica(s), settled in {st.settle_s:.1f} s: "
        + ", ".join(f"{p}: {o}" for p, o in sorted(st.owners.items()))
        + ("" if st.owners_after == st.owners else " (CHANGED during the cells)")
        for st in steps
    )]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """The whole benchmark (see the module docstring)."""
    machine = machine_facts()
    pools = pool_names(args.pools)
    tmp = Path(tempfile.mkdtemp(prefix="balpm-cluster-"))
    pg: PostgresServer | None = None
    moto: MotoServer | None = None
    replicas: list[Replica] = []
    steps: list[Step] = []
    pg_version = ""
    try:
        pg = PostgresServer(tmp / "pg")
        moto = MotoServer(tmp / "moto.log")
        url = pg.new_database()
        import psycopg

        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT version()").fetchone()
        pg_version = str(row[0]).split(",")[0] if row else "PostgreSQL"
        cluster_env = {
            **moto.env(),
            "BALPM_CLUSTER": "true",
            "BALPM_OWNERSHIP_TTL_S": str(args.ttl_s),
            "BALPM_DATABASE_URL": url,
            "BALPM_ARTIFACT_URL": f"s3://{moto.new_bucket()}/balpm",
            "BALPM_SHUTDOWN_GRACE_S": "2",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        print(f"# {pg_version} on port {pg.port}, moto_server at {moto.endpoint}", flush=True)
        replicas.append(start_replica(0, tmp, cluster_env))
        started = time.perf_counter()
        make_pools(replicas[0].target, pools, args)
        print(f"# pools ready in {time.perf_counter() - started:.1f} s", flush=True)
        for n in args.replica_counts:
            while len(replicas) < n:
                replicas.append(start_replica(len(replicas), tmp, cluster_env))
            ids = [r.replica_id for r in replicas[:n]]
            settle_s = wait_settled(url, pools, ids, args.settle_timeout_s)
            owners = owners_now(url)
            active = replicas[:n]
            warm_s = warm_up(active, pools, owners)
            print(f"# {n} replica(s): settled in {settle_s:.1f} s, warm-up {warm_s:.1f} s: {owners}", flush=True)
            step = Step(n, round(settle_s, 2), owners, {}, round(warm_s, 2))
            for rpc, strategy in [*(("AcquireBatch", s) for s in STRATEGIES), ("IngestLabels", "")]:
                cell = asyncio.run(run_cell(active, pools, owners, rpc, strategy, args, pg, moto))
                step.cells.append(cell)
                print(
                    f"# {n} replica(s) {rpc} {strategy or '-'}: {cell.requests} calls, {cell.errors} errors, "
                    f"{cell.throughput_rps:.0f} req/s, p50 {cell.p50_ms:.1f} ms, p99 {cell.p99_ms:.1f} ms, "
                    f"replica CPU {cell.replica_cpu_ms_per_req:.2f} ms/req",
                    flush=True,
                )
            if n >= 2:
                pool = pools[0]
                for strategy in STRATEGIES:
                    f = measure_forwarding(active, pool, owners, strategy, args.forward_pairs)
                    step.forwarding.append(f)
                    print(
                        f"# {n} replicas forwarding {strategy}: owner {f.owner} p50 {f.owner_p50_ms:.2f} ms, "
                        f"via {f.via} p50 {f.non_owner_p50_ms:.2f} ms, overhead {f.overhead_p50_ms:.2f} ms",
                        flush=True,
                    )
            step.owners_after = owners_now(url)
            steps.append(step)
        for r in replicas:
            lines = log_tail(r.log_path, 5000).splitlines()
            bad = [ln for ln in lines if '"level": "ERROR"' in ln or "Traceback" in ln]
            if bad:
                print(f"# {r.replica_id}: {len(bad)} error lines in its log, first: {bad[0][:300]}", flush=True)
    finally:
        stop_all([r.proc for r in replicas])
        if moto is not None:
            moto.close()
        if pg is not None:
            pg.close()
        if args.keep:
            print(f"# logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    settings = {
        "replica_counts": args.replica_counts, "pools": args.pools, "items": args.items, "dim": args.dim,
        "seed_labels": args.labels, "ensemble_size": args.ensemble, "epochs": args.epochs, "clients": args.clients,
        "duration_s": args.duration_s, "batch_size": args.batch_size, "lease_ttl_s": args.lease_ttl_s,
        "ingest_reserved_items": args.reserve, "ownership_ttl_s": args.ttl_s, "forward_pairs": args.forward_pairs,
        "strategies": list(STRATEGIES), "quick": args.quick, "storage": f"{pg_version} + S3 (moto_server)",
        "command": " ".join(["python bench/cluster.py", *sys.argv[1:]]),
    }
    notes = [
        "All processes (replicas, PostgreSQL, moto_server and the client process) share this machine's "
        f"{machine['cpus']} cores, and the machine was shared with other work during the run (CPU contention: "
        "see loadavg_at_start / loadavg_at_end), so throughput cannot grow with replicas here and absolute "
        "figures are noisy.",
        "replica_cpu_ms_per_req is the replica processes' user + sys CPU time (from /proc/<pid>/stat) over the "
        "measured window divided by the completed requests; est_rps_per_replica_core = requests / replica CPU s, "
        "the throughput one replica with one dedicated core would reach if CPU were the only limit, so N "
        "replicas on N cores give about N times that, as long as PostgreSQL (postgres_cpu_ms_per_req) keeps up.",
        "Replica CPU includes the cluster background work (heartbeats and renewals every TTL/3) and, for "
        "forwarded calls, both the receiving and the owning replica's work.",
        "AcquireBatch leases are short (lease_ttl_s) so the pools never run dry; IngestLabels cycles over the "
        "first ingest_reserved_items items of each pool (new label ids, the same items).",
        "Forwarding overhead: one sequential client, no other load; pairs of calls for the same pool, one through "
        "its owner and one through a non-owner, in random order within each pair (each batch released through the "
        "owner after its call, untimed).",
    ]
    meta = {"machine": machine, "settings": settings, "notes": notes}
    table = markdown(steps, meta)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(
            {**meta, "steps": [asdict(s) for s in steps]}, indent=2, default=lambda x: None,
        ) + "\n")
        out.with_suffix(".md").write_text(
            f"# Cluster mode load (`{settings['command']}`)\n\n{table}\n\nNotes:\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n"
        )
        print(f"# wrote {out} and {out.with_suffix('.md')}")


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM of the bench: unwind, so the `finally` blocks stop every process it started."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1500-item pools, 3 s cells, 20 forwarding pairs")
    p.add_argument("--replicas", default="1,2,3", help="replica counts, increasing (one replica added per step)")
    p.add_argument("--pools", type=int, default=6)
    p.add_argument("--items", type=int, default=3000, help="items per pool")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--labels", type=int, default=200, help="seed labels per pool before its one training")
    p.add_argument("--ensemble", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration-s", type=float, default=20.0, help="seconds per cell")
    p.add_argument("--batch-size", type=int, default=8, help="AcquireBatch batch_size and labels per IngestLabels")
    p.add_argument("--lease-ttl-s", type=float, default=1.0, help="AcquireBatch lease length in the cells")
    p.add_argument("--reserve", type=int, default=256, help="items per pool that IngestLabels labels (cycled)")
    p.add_argument("--ttl-s", type=float, default=3.0, help="BALPM_OWNERSHIP_TTL_S")
    p.add_argument("--forward-pairs", type=int, default=300, help="owner / non-owner pairs per strategy")
    p.add_argument("--settle-timeout-s", type=float, default=90.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"result JSON (and .md beside it); default {DEFAULT_OUT}, "
                   "none with --quick; '' for none")
    p.add_argument("--keep", action="store_true", help="keep the temporary dir with the logs")
    args = p.parse_args()
    args.replica_counts = sorted({int(x) for x in args.replicas.split(",") if x.strip()})
    if not args.replica_counts or args.replica_counts[0] < 1:
        p.error("--replicas wants positive counts, e.g. 1,2,3")
    if args.quick:
        args.items, args.labels, args.ensemble, args.epochs = min(args.items, 1500), min(args.labels, 100), 2, 5
        args.duration_s, args.forward_pairs, args.clients = min(args.duration_s, 3.0), 20, min(args.clients, 8)
    if args.out is None:
        args.out = "" if args.quick else str(DEFAULT_OUT)
    args.reserve = min(args.reserve, args.items)
    signal.signal(signal.SIGTERM, _terminate)
    run(args)


if __name__ == "__main__":
    main()
