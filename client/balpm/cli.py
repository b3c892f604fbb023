"""The `balpm` command line: pools, upload, label, train, acquire, predict, evaluate, simulate."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict

from balpm.client import Client
from balpm.data import hide_preferences, read_jsonl
from balpm.errors import BalpmError


def _print(msg: Any) -> None:
    if hasattr(msg, "DESCRIPTOR"):
        msg = MessageToDict(msg, preserving_proto_field_name=True)
    print(json.dumps(msg, indent=2, default=str))


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, api_key=args.api_key or os.environ.get("BALPM_API_KEY") or None)


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=None)


def cmd_pools(args: argparse.Namespace) -> None:
    with _client(args) as c:
        if args.action == "create":
            settings: dict[str, Any] = {"feature_source": args.feature_source}
            if args.feature_dim:
                settings["feature_dim"] = args.feature_dim
            for key in ("ensemble_size", "knn_k", "beta", "d_ent", "labels_per_item", "epochs"):
                if getattr(args, key) is not None:
                    settings[key] = getattr(args, key)
            if args.strategy:
                settings["default_strategy"] = args.strategy
            if args.knn_convention:
                settings["knn_convention"] = args.knn_convention
            _print(c.create_pool(args.pool, **settings))
        elif args.action == "list":
            for pool in c.list_pools():
                _print(pool)
        elif args.action == "get":
            _print(c.get_pool(args.pool))
        elif args.action == "delete":
            c.delete_pool(args.pool)
            print(f"deleted {args.pool}")


def cmd_upload(args: argparse.Namespace) -> None:
    rows = list(read_jsonl(args.file))
    items = [p.item for p in hide_preferences(rows, args.seed, heldout=args.heldout)]
    with _client(args) as c, _progress_bar(len(items), "upload") as bar:
        sent = [0]

        def step(n: int) -> None:
            bar.update(n - sent[0])
            sent[0] = n

        summary = c.upload_items(args.pool, items, chunk_size=args.chunk_size, progress=step)
    print(
        f"accepted {summary.accepted_count}, duplicates {summary.duplicate_count}, rejected {len(summary.rejections)}"
    )
    for r in summary.rejections[:20]:
        print(f"  item {r.id!r} (#{r.index}): {r.field}: {r.message}")
    if args.wait:
        with _client(args) as c:
            pool = c.wait_pool_ready(
                args.pool,
                progress=lambda p: print(
                    f"featurised {p.featurized_count}/{p.item_count + p.heldout_count}", file=sys.stderr
                ),
            )
        _print(pool)


def cmd_label(args: argparse.Namespace) -> None:
    if args.file:
        labels = list(read_jsonl(args.file))
    else:
        labels = [
            {
                "label_id": args.label_id or f"{args.item}-{args.annotator or 'anonymous'}",
                "item_id": args.item,
                "preference": args.preference,
                "annotator_id": args.annotator or "",
            }
        ]
    with _client(args) as c:
        _print(c.ingest_labels(args.pool, labels, request_id=args.request_id or ""))


def cmd_train(args: argparse.Namespace) -> None:
    def show(op: Any) -> None:
        p = op.progress
        print(f"epoch {p.epoch}/{p.epochs} loss {p.train_loss:.4f} val LL {p.val_log_likelihood:.4f}", file=sys.stderr)

    with _client(args) as c:
        _print(
            c.update_posterior(
                args.pool,
                seed=args.seed,
                warm_start=args.warm_start,
                epochs=args.epochs,
                wait=not args.no_wait,
                progress=show,
            )
        )


def cmd_acquire(args: argparse.Namespace) -> None:
    with _client(args) as c:
        _print(
            c.acquire(
                args.pool,
                batch_size=args.batch_size,
                strategy=args.strategy,
                seed=args.seed,
                lease_ttl_s=args.lease_ttl_s,
                annotator_id=args.annotator or "",
            )
        )


def cmd_predict(args: argparse.Namespace) -> None:
    with _client(args) as c:
        _print(c.predict(args.pool, item_ids=args.items))


def cmd_evaluate(args: argparse.Namespace) -> None:
    items = []
    if args.file:
        items = [(p.item, p.preference) for p in hide_preferences(list(read_jsonl(args.file)), args.seed)]
    with _client(args) as c:
        _print(c.evaluate(args.pool, items))


def cmd_export(args: argparse.Namespace) -> None:
    with _client(args) as c:
        for lb in c.export_labels(args.pool):
            print(json.dumps(MessageToDict(lb, preserving_proto_field_name=True)))


def cmd_demo_data(args: argparse.Namespace) -> None:
    from pathlib import Path

    from balpm.data import demo_rows

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("pool", args.pool_size, args.seed), ("test", args.test_size, args.seed + 1)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in demo_rows(n, seed):
                row["id"] = f"{name}-{row['id']}"
                f.write(json.dumps(row) + "\n")
    print(f"wrote {out / 'pool.jsonl'} ({args.pool_size} rows) and {out / 'test.jsonl'} ({args.test_size} rows)")


def cmd_simulate(args: argparse.Namespace) -> None:
    from balpm.oracles import prepare_oracle
    from balpm.simulate import SimulationConfig, load_split, parse_rows, run_simulation

    pool = load_split(args.pool_file, args.seed, heldout=False, limit=args.limit, rows=parse_rows(args.pool_rows))
    test = load_split(args.test_file, args.seed + 1, heldout=True, limit=args.limit, rows=parse_rows(args.test_rows))
    data = prepare_oracle(
        pool,
        test,
        args.oracle,
        agreement=args.oracle_agreement,
        redundancy=args.redundancy,
        noise=args.redundancy_noise,
        teacher_seed=args.teacher_seed,
        label_seed=args.seed,
        cache_path=args.feature_cache,
        model_path=args.model_path,
        pooling=args.pooling,
    )
    print(json.dumps(data.info), file=sys.stderr)
    settings: dict[str, Any] = {"feature_source": data.feature_source}
    if data.feature_source == "CLIENT":
        settings["feature_dim"] = len(data.pool[0].item["prompt_features"])
    for key in ("knn_k", "beta", "ensemble_size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.knn_convention:
        settings["knn_convention"] = args.knn_convention
    if args.hidden_sizes:
        settings["hidden_sizes"] = [int(h) for h in args.hidden_sizes.split(",")]
    tags = {"oracle": args.oracle, "redundancy": args.redundancy}
    config = SimulationConfig(
        strategy=args.strategy.upper(),
        initial=args.initial,
        batch_size=args.batch_size,
        rounds=args.rounds,
        seed=args.seed,
        epochs=args.epochs,
        keep_pool=args.keep_pool,
        feature_source=data.feature_source,
        pool_settings=tuple(settings.items()),
        tags=tuple(tags.items()),
    )
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    try:
        with _client(args) as c:
            c.wait_ready()
            run_simulation(c, data.pool, data.test, config, out=out)
    finally:
        if args.out:
            out.close()


def build_parser() -> argparse.ArgumentParser:
    """The `balpm` argument parser."""
    p = argparse.ArgumentParser(prog="balpm", description="balpm client: choose which preference pairs to label")
    p.add_argument("--server", default=os.environ.get("BALPM_SERVER", "127.0.0.1:50051"), help="host:port")
    p.add_argument("--api-key", default="", help="API key (or BALPM_API_KEY)")
    sub = p.add_subparsers(dest="command", required=True)

    pools = sub.add_parser("pools", help="create, list, get or delete pools")
    pools.add_argument("action", choices=["create", "list", "get", "delete"])
    pools.add_argument("pool", nargs="?", default="")
    pools.add_argument("--feature-source", default="SERVER", choices=["SERVER", "CLIENT"])
    pools.add_argument("--feature-dim", type=int, default=0)
    pools.add_argument("--strategy", default="")
    pools.add_argument("--ensemble-size", type=int)
    pools.add_argument("--knn-k", type=int)
    pools.add_argument(
        "--knn-convention",
        choices=["STANDARD", "AUTHORS"],
        type=str.upper,
        help="BAL-PM kNN radius convention: STANDARD (k-th nearest other pool item, default) or AUTHORS "
        "(the BAL-PM authors' code: self included, over the acquirable items, log(2 r + 1e-4))",
    )
    pools.add_argument("--beta", type=float)
    pools.add_argument("--d-ent", type=float)
    pools.add_argument("--labels-per-item", type=int)
    pools.add_argument("--epochs", type=int)
    pools.set_defaults(func=cmd_pools)

    up = sub.add_parser("upload", help="upload items from FILE.jsonl[.gz]")
    up.add_argument("pool")
    up.add_argument("file")
    up.add_argument("--heldout", action="store_true", help="upload as held-out items with their preference")
    up.add_argument("--seed", type=int, default=0, help="seed of the A/B order for chosen/rejected files")
    up.add_argument("--chunk-size", type=int, default=500)
    up.add_argument("--wait", action="store_true", help="wait until features are extracted")
    up.set_defaults(func=cmd_upload)

    lab = sub.add_parser("label", help="store one label or a JSONL file of labels")
    lab.add_argument("pool")
    lab.add_argument("--file")
    lab.add_argument("--item")
    lab.add_argument("--preference", choices=["A", "B", "TIE"])
    lab.add_argument("--label-id")
    lab.add_argument("--annotator")
    lab.add_argument("--request-id")
    lab.set_defaults(func=cmd_label)

    tr = sub.add_parser("train", help="update the posterior, showing progress")
    tr.add_argument("pool")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--epochs", type=int, default=0)
    tr.add_argument("--warm-start", action="store_true")
    tr.add_argument("--no-wait", action="store_true")
    tr.set_defaults(func=cmd_train)

    acq = sub.add_parser("acquire", help="acquire and lease the next batch")
    acq.add_argument("pool")
    acq.add_argument("--batch-size", type=int, default=32)
    acq.add_argument("--strategy", default=None)
    acq.add_argument("--seed", type=int, default=0)
    acq.add_argument("--lease-ttl-s", type=float, default=0.0)
    acq.add_argument("--annotator")
    acq.set_defaults(func=cmd_acquire)

    pr = sub.add_parser("predict", help="predict stored items")
    pr.add_argument("pool")
    pr.add_argument("items", nargs="+")
    pr.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="evaluate on the held-out split or a labelled file")
    ev.add_argument("pool")
    ev.add_argument("--file")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("export", help="stream all labels as JSON lines")
    ex.add_argument("pool")
    ex.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo-data", help="write synthetic pool.jsonl and test.jsonl in the shared format")
    demo.add_argument("--out-dir", required=True)
    demo.add_argument("--pool-size", type=int, default=600)
    demo.add_argument("--test-size", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_data)

    sim = sub.add_parser("simulate", help="oracle replay of the active-learning loop")
    sim.add_argument("--pool-file", required=True)
    sim.add_argument("--test-file", required=True)
    sim.add_argument("--strategy", default="BALPM")
    sim.add_argument("--initial", type=int, default=256)
    sim.add_argument("--batch-size", type=int, default=256)
    sim.add_argument("--rounds", type=int, default=5)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--epochs", type=int, default=0, help="max epochs per update (0 = pool default)")
    sim.add_argument("--limit", type=int, default=0, help="use only the first N rows of each file")
    sim.add_argument("--pool-rows", default="", help="row range START:STOP of the pool file")
    sim.add_argument("--test-rows", default="", help="row range START:STOP of the test file")
    sim.add_argument("--oracle", default="human", choices=["human", "model"], help="who answers: file or teacher")
    sim.add_argument("--oracle-agreement", type=float, default=0.89, help="model oracle: expected agreement")
    sim.add_argument("--redundancy", type=int, default=1, help="model oracle: copies R of each pool item")
    sim.add_argument("--redundancy-noise", type=float, default=0.01, help="relative feature noise of the copies")
    sim.add_argument("--teacher-seed", type=int, default=0, help="model oracle: seed of the teacher's weights")
    sim.add_argument(
        "--feature-cache",
        default="./balpm-data/feature_cache.sqlite3",
        help="model oracle: the server's feature cache (<data_dir>/feature_cache.sqlite3) for client features",
    )
    sim.add_argument("--model-path", default="", help="model oracle: extractor model folder (server's)")
    sim.add_argument("--pooling", default="mean", choices=["mean", "last_token"])
    sim.add_argument("--knn-k", type=int)
    sim.add_argument(
        "--knn-convention",
        choices=["STANDARD", "AUTHORS"],
        type=str.upper,
        help="BAL-PM kNN radius convention: STANDARD (k-th nearest other pool item, default) or AUTHORS "
        "(the BAL-PM authors' code: self included, over the acquirable items, log(2 r + 1e-4))",
    )
    sim.add_argument("--beta", type=float)
    sim.add_argument("--ensemble-size", type=int)
    sim.add_argument("--hidden-sizes", default="", help="comma-separated hidden widths, e.g. 256,64")
    sim.add_argument("--keep-pool", action="store_true")
    sim.add_argument("--out")
    sim.set_defaults(func=cmd_simulate)

    from balpm.integrations.label_studio import register_cli as register_label_studio  # issue #9

    register_label_studio(sub)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `balpm`."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BalpmError as e:
        print(f"error: {e}", file=sys.stderr)
        for v in e.field_violations:
            print(f"  field {v.field}: {v.description}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
