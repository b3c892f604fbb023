"""The `balpm` command line: pools, upload, label, train, acquire, predict, evaluate, export, simulate.

Global options (`--server`, `--api-key`, `--timeout-s`, `-o/--output`, `--no-progress`) go before or
after the command: `balpm --server X pools list` and `balpm pools list --server X` are the same.
Results print as tables (`-o table`, the default) or JSON (`-o json`); progress bars go to stderr.
Every failure prints one `error: ...` line on stderr and exits with status 2 (130 when interrupted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balpm import _output as out
from balpm.client import Client
from balpm.data import hide_preferences, read_jsonl
from balpm.errors import BalpmError, InvalidInputError
from balpm.progress import bar

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_WAIT_S = 3600.0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, api_key=args.api_key or None, timeout_s=args.timeout_s or DEFAULT_TIMEOUT_S)


def _wait_s(args: argparse.Namespace) -> float:
    """How long a command waits for a pool or an operation: --timeout-s, else an hour."""
    return float(args.timeout_s or DEFAULT_WAIT_S)


def _bar(args: argparse.Namespace, total: int | None, desc: str, unit: str) -> Any:
    return bar(total, desc, unit, enabled=not args.no_progress)


def _wait_ready(args: argparse.Namespace, c: Client, pool_id: str) -> Any:
    """Wait until the pool is featurised, with a progress bar of featurized_count."""
    reported: list[tuple[str, int]] = []

    def progress(p: Any) -> None:
        b.set(int(p.featurized_count), total=int(p.item_count + p.heldout_count))
        if p.HasField("featurization_pause"):
            seen = (p.featurization_pause.reason, p.featurization_pause.attempts)
            if not reported or reported[-1] != seen:  # once per failed attempt
                reported.append(seen)
                b.write(f"featurisation paused: {out.pause_text(p)}")

    with _bar(args, None, f"featurise {pool_id}", "item") as b:
        return c.wait_pool_ready(pool_id, timeout_s=_wait_s(args), progress=progress)


def cmd_pools(args: argparse.Namespace) -> None:
    if args.action != "list" and not args.pool:
        raise InvalidInputError.local(f"balpm pools {args.action} needs a POOL", field="pool")
    with _client(args) as c:
        if args.action == "create":
            settings: dict[str, Any] = {"feature_source": args.feature_source}
            if args.feature_dim:
                settings["feature_dim"] = args.feature_dim
            for key in ("ensemble_size", "knn_k", "beta", "d_ent", "labels_per_item", "epochs",
                        "auto_update_min_labels", "auto_update_interval_s", "bootstrap", "patience", "val_fraction",
                        "train_batch_size", "learning_rate", "weight_decay", "control_fraction",
                        "stop_slope_per_1k"):
                if getattr(args, key) is not None:
                    settings[key] = getattr(args, key)
            if args.strategy:
                settings["default_strategy"] = args.strategy
            if args.knn_convention:
                settings["knn_convention"] = args.knn_convention
            if args.feature_storage:
                settings["feature_storage"] = args.feature_storage
            pool = c.create_pool(args.pool, **settings)
            out.emit(args.output, pool, lambda: out.pool_details(pool))
        elif args.action == "list":
            pools = list(c.list_pools())
            out.emit(args.output, pools, lambda: out.pools_table(pools))
        elif args.action == "get":
            pool = c.get_pool(args.pool)
            out.emit(args.output, pool, lambda: out.pool_details(pool))
        elif args.action == "wait":
            pool = _wait_ready(args, c, args.pool)
            out.emit(args.output, pool, lambda: out.pool_details(pool))
        elif args.action == "delete":
            c.delete_pool(args.pool)
            out.emit(args.output, {"deleted": args.pool}, lambda: f"deleted {args.pool}")


def cmd_upload(args: argparse.Namespace) -> None:
    rows = list(read_jsonl(args.file))
    items = [p.item for p in hide_preferences(rows, args.seed, heldout=args.heldout)]
    with _client(args) as c:
        with _bar(args, len(items), f"upload {args.pool}", "item") as b:
            summary = c.upload_items(args.pool, items, chunk_size=args.chunk_size, progress=b.set)
        pool = _wait_ready(args, c, args.pool) if args.wait else summary.pool
    result = {
        "accepted_count": summary.accepted_count,
        "duplicate_count": summary.duplicate_count,
        "rejections": summary.rejections,
        "pool": pool,
    }

    def render() -> str:
        lines = [
            f"accepted {summary.accepted_count}, duplicates {summary.duplicate_count}, "
            f"rejected {len(summary.rejections)}"
        ]
        lines += [f"  item {r.id!r} (#{r.index}): {r.field}: {r.message} [{r.reason}]" for r in summary.rejections[:20]]
        if len(summary.rejections) > 20:
            lines.append(f"  ... and {len(summary.rejections) - 20} more (-o json lists them all)")
        return "\n".join([*lines, "", out.pool_details(pool)])

    out.emit(args.output, result, render)


LABEL_FILE_HELP = (
    'JSON lines file of labels, one object per line: {"item_id": "x1", "preference": "A"} with preference '
    'A, B or TIE, and optionally "label_id" (default <item_id>-<annotator>; labels are idempotent by it) '
    'and "annotator_id" (default --annotator, else anonymous), "replaces_label_id" (the stored label this '
    'one revises: same item and annotator, a new label_id). .jsonl or .jsonl.gz'
)


def _file_labels(path: str, annotator: str) -> list[dict[str, Any]]:
    labels = []
    for i, row in enumerate(read_jsonl(path)):
        who = str(row.get("annotator_id") or annotator or "")
        if not row.get("item_id") or not row.get("preference"):
            raise InvalidInputError.local(
                f"{path}: label {i + 1} needs item_id and preference ({LABEL_FILE_HELP})", field=f"labels[{i}]"
            )
        labels.append(
            {
                "label_id": row.get("label_id") or f"{row['item_id']}-{who or 'anonymous'}",
                "item_id": row["item_id"],
                "preference": row["preference"],
                "annotator_id": who,
                "replaces_label_id": str(row.get("replaces_label_id") or ""),
            }
        )
    return labels


def cmd_label(args: argparse.Namespace) -> None:
    if args.file:
        labels = _file_labels(args.file, args.annotator or "")
    elif args.item and args.preference:
        labels = [
            {
                "label_id": args.label_id or f"{args.item}-{args.annotator or 'anonymous'}",
                "item_id": args.item,
                "preference": args.preference,
                "annotator_id": args.annotator or "",
            }
        ]
    else:
        raise InvalidInputError.local("balpm label needs --file, or --item and --preference", field="file")
    with _client(args) as c:
        resp = c.ingest_labels(args.pool, labels, request_id=args.request_id or "")
    out.emit(
        args.output,
        resp,
        lambda: f"stored {resp.stored_count}, duplicates {resp.duplicate_count}; "
        f"the pool has {resp.label_count} labels",
    )


def _operation_view(op: Any) -> str:
    return out.message_details(op, skip=("error",) if not op.error.code else ())


def cmd_train(args: argparse.Namespace) -> None:
    with _client(args) as c, _bar(args, None, f"train {args.pool}", "epoch") as b:

        def show(op: Any) -> None:
            p = op.progress
            b.set(int(p.epoch), total=int(p.epochs))
            b.set_postfix(f"loss {p.train_loss:.4f} val LL {p.val_log_likelihood:.4f}")

        op = c.update_posterior(
            args.pool,
            seed=args.seed,
            warm_start=args.warm_start,
            epochs=args.epochs,
            wait=not args.no_wait,
            progress=show,
            timeout_s=_wait_s(args),
        )
    out.emit(args.output, op, lambda: _operation_view(op))


def cmd_exclude(args: argparse.Namespace) -> None:
    with _client(args) as c:
        resp = c.exclude_items(args.pool, args.items, include=args.include)
    if args.output == "json":
        print(out.dumps(resp))
    else:
        verb = "included again" if args.include else "excluded"
        print(f"{verb}: {resp.changed_count} items changed; {resp.excluded_count} excluded in pool {args.pool}")


def cmd_acquire(args: argparse.Namespace) -> None:
    with _client(args) as c:
        resp = c.acquire(
            args.pool,
            batch_size=args.batch_size,
            strategy=args.strategy,
            seed=args.seed,
            lease_ttl_s=args.lease_ttl_s,
            annotator_id=args.annotator or "",
        )
    out.emit(args.output, resp, lambda: out.batch_table(resp))


def cmd_predict(args: argparse.Namespace) -> None:
    with _client(args) as c:
        resp = c.predict(args.pool, item_ids=args.items)
    out.emit(args.output, resp, lambda: out.predictions_table(resp))


def cmd_evaluate(args: argparse.Namespace) -> None:
    items = []
    if args.file:
        items = [(p.item, p.preference) for p in hide_preferences(list(read_jsonl(args.file)), args.seed)]
    with _client(args) as c:
        resp = c.evaluate(args.pool, items)
    out.emit(args.output, resp, lambda: out.message_details(resp))


def cmd_curve(args: argparse.Namespace) -> None:
    with _client(args) as c:
        resp = c.learning_curve(args.pool, next_batch_size=args.next_batch_size, wait=args.wait,
                                timeout_s=args.wait_timeout_s)
    out.emit(args.output, resp, lambda: out.learning_curve(resp))


def cmd_export(args: argparse.Namespace) -> None:
    with _client(args) as c:
        if args.items:
            rows: Any = c.export_items(args.pool, include_features=args.features, split=args.split or None)
        else:
            rows = c.export_labels(args.pool)
        for row in rows:
            print(out.dumps(row, indent=None))


def cmd_demo_data(args: argparse.Namespace) -> None:
    from balpm.data import demo_rows

    folder = Path(args.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("pool", args.pool_size, args.seed), ("test", args.test_size, args.seed + 1)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in demo_rows(n, seed):
                row["id"] = f"{name}-{row['id']}"
                f.write(json.dumps(row) + "\n")
    written = {"pool": str(folder / "pool.jsonl"), "test": str(folder / "test.jsonl")}
    out.emit(
        args.output,
        written,
        lambda: f"wrote {written['pool']} ({args.pool_size} rows) and {written['test']} ({args.test_size} rows)",
    )


class _Tee:
    """Writes round records to several streams (the --out file, stdout with -o json)."""

    def __init__(self, *streams: Any) -> None:
        self.streams = [s for s in streams if s is not None]

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def cmd_simulate(args: argparse.Namespace) -> None:
    from balpm.oracles import prepare_oracle  # the `sim` extra: MissingDependencyError without numpy
    from balpm.simulate import SimulationConfig, load_split, parse_rows, run_simulation

    strategies = [s.strip().upper() for s in args.strategy.split(",") if s.strip()]
    if not strategies:
        raise InvalidInputError.local("--strategy names no strategy", field="strategy")
    if args.plot:
        from balpm.plots import check_plotting

        check_plotting()  # fail now, not after the runs
    earlier = [row for path in args.compare for row in read_jsonl(path)]
    settings: dict[str, Any] = {}
    for key in ("knn_k", "beta", "ensemble_size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.knn_convention:
        settings["knn_convention"] = args.knn_convention
    if args.hidden_sizes:
        try:
            settings["hidden_sizes"] = [int(h) for h in args.hidden_sizes.split(",")]
        except ValueError as e:
            raise InvalidInputError.local(f"--hidden-sizes {args.hidden_sizes!r}: {e}", field="hidden_sizes") from e
    pool = load_split(args.pool_file, args.seed, heldout=False, limit=args.limit, rows=parse_rows(args.pool_rows))
    test = load_split(args.test_file, args.seed + 1, heldout=True, limit=args.limit, rows=parse_rows(args.test_rows))
    if not pool or not test:
        raise InvalidInputError.local(
            f"no rows in {'--pool-file' if not pool else '--test-file'} (after --limit / --*-rows)", field="rows"
        )
    progress = not args.no_progress
    try:
        out_file = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115
    except OSError as e:
        raise InvalidInputError.local(f"cannot write --out {args.out}: {e}", field="out") from e
    sink = _Tee(out_file, sys.stdout if args.output == "json" else None)
    records: list[dict[str, Any]] = []
    try:
        with _client(args) as c:
            c.wait_ready()
            data = prepare_oracle(
                pool,
                test,
                args.oracle,
                agreement=args.oracle_agreement,
                redundancy=args.redundancy,
                noise=args.redundancy_noise,
                teacher_seed=args.teacher_seed,
                label_seed=args.seed,
                client=c,
                progress=progress,
            )
            print(json.dumps(data.info), file=sys.stderr)
            run_settings = {"feature_source": data.feature_source, **settings}
            if data.feature_source == "CLIENT":
                run_settings["feature_dim"] = len(data.pool[0].item["prompt_features"])
            for strategy in strategies:
                config = SimulationConfig(
                    strategy=strategy,
                    initial=args.initial,
                    batch_size=args.batch_size,
                    rounds=args.rounds,
                    seed=args.seed,
                    epochs=args.epochs,
                    keep_pool=args.keep_pool,
                    pool_id=f"{args.pool_id}-{strategy.lower()}" if args.pool_id else "",
                    feature_source=data.feature_source,
                    pool_settings=tuple(run_settings.items()),
                    tags=(("oracle", args.oracle), ("redundancy", args.redundancy)),
                )
                records += run_simulation(c, data.pool, data.test, config, out=sink, progress=progress)  # type: ignore[arg-type]
    finally:
        if out_file is not None:
            out_file.close()
    if args.output != "json":
        print(out.rounds_table(records))
    if args.plot:
        from balpm.plots import plot_learning_curves

        title = f"{args.oracle} oracle, seed {args.seed}; {Path(args.pool_file).name}"
        path = plot_learning_curves(earlier + records, args.plot, title=title)
        print(f"wrote learning curves to {path}", file=sys.stderr)


_KNN_CONVENTION_HELP = (
    "BAL-PM kNN radius convention: STANDARD (k-th nearest other pool item, default) or AUTHORS "
    "(the BAL-PM authors' code: self included, over the acquirable items, log(2 r + 1e-4))"
)


def _global_options(*, top_level: bool) -> argparse.ArgumentParser:
    """The global options, accepted before the command (`top_level`, with the defaults) and after it.

    After the command they default to SUPPRESS, so one given there overrides the same option given
    before the command and one not given leaves it alone.
    """
    env_server = os.environ.get("BALPM_SERVER", "")
    env_key = os.environ.get("BALPM_API_KEY", "")

    def default(value: Any) -> Any:
        return value if top_level else argparse.SUPPRESS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=default(env_server or DEFAULT_SERVER),
        help=f"balpm server address (default: $BALPM_SERVER, else {DEFAULT_SERVER}; "
        f"now {env_server or DEFAULT_SERVER})",
    )
    g.add_argument(
        "--api-key",
        metavar="KEY",
        default=default(env_key),
        help="API key, sent as 'authorization: Bearer KEY' "
        f"(default: $BALPM_API_KEY, now {'set' if env_key else 'unset'})",
    )
    g.add_argument(
        "--timeout-s",
        type=float,
        metavar="S",
        default=default(None),
        help=f"give up after S seconds: the deadline of each call (default {DEFAULT_TIMEOUT_S:g}) and, for "
        f"`pools wait`, `upload --wait` and `train`, of the whole wait (default {DEFAULT_WAIT_S:g}); "
        "a wait that runs out exits with status 2 and says why",
    )
    g.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default=default("table"),
        help="result format: table for people (default) or json for scripts (proto3 JSON; lists as one array)",
    )
    g.add_argument(
        "--no-progress",
        action="store_true",
        default=default(False),
        help="no progress bars on stderr (also BALPM_PROGRESS=0)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    """The `balpm` argument parser."""
    p = argparse.ArgumentParser(
        prog="balpm",
        description="balpm client: choose which preference pairs to label",
        parents=[_global_options(top_level=True)],
        epilog="Errors print one 'error: ...' line on stderr and exit with status 2.",
    )
    common = [_global_options(top_level=False)]
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pools = sub.add_parser("pools", help="create, list, get, wait for or delete pools", parents=common)
    pools.add_argument(
        "action",
        choices=["create", "list", "get", "wait", "delete"],
        help="create, list (a table of all pools), get (one pool), wait (until featurised; --timeout-s), delete",
    )
    pools.add_argument("pool", nargs="?", default="", help="pool id (all actions but list)")
    pools.add_argument(
        "--feature-source",
        default="SERVER",
        choices=["SERVER", "CLIENT"],
        help="create: SERVER (the server embeds the texts, default) or CLIENT (items carry vectors)",
    )
    pools.add_argument("--feature-dim", type=int, default=0, help="create: feature dimension (CLIENT pools)")
    pools.add_argument(
        "--feature-storage",
        choices=["float32", "float16"],
        type=str.lower,
        help="create: precision of the stored feature arrays: float32 (default) or float16 (half the memory "
        "and disk, N x D x 3 x 2 bytes; client feature values up to 65504 in magnitude)",
    )
    pools.add_argument("--strategy", default="", help="create: default acquisition strategy (default BALPM)")
    pools.add_argument("--ensemble-size", type=int, help="create: ensemble members (default 5)")
    pools.add_argument("--knn-k", type=int, help="create: BAL-PM neighbour count k (default 13)")
    pools.add_argument(
        "--knn-convention",
        choices=["STANDARD", "AUTHORS"],
        type=str.upper,
        help=_KNN_CONVENTION_HELP,
    )
    pools.add_argument("--beta", type=float, help="create: BAL-PM entropy weight beta (default 0.01)")
    pools.add_argument("--d-ent", type=float, help="create: BAL-PM d_ent (default 1)")
    pools.add_argument("--labels-per-item", type=int, help="create: distinct annotators per item (default 1)")
    pools.add_argument("--epochs", type=int, help="create: max training epochs per update (default 30)")
    pools.add_argument(
        "--bootstrap", action=argparse.BooleanOptionalAction, default=None,
        help="create: each ensemble member trains on its own bootstrap resample (default off)",
    )
    pools.add_argument("--patience", type=int, help="create: early-stopping patience in epochs (default 5)")
    pools.add_argument("--val-fraction", type=float, help="create: labels held out for early stopping (default 0.1)")
    pools.add_argument("--train-batch-size", type=int, help="create: label pairs per training minibatch (default 32)")
    pools.add_argument("--learning-rate", type=float, help="create: AdamW learning rate (default 0.001)")
    pools.add_argument("--weight-decay", type=float, help="create: AdamW weight decay (default 0.0001)")
    pools.add_argument(
        "--control-fraction", type=float,
        help="create: share of every batch drawn uniformly at random, flagged control (0..0.5, default 0.1)",
    )
    pools.add_argument(
        "--stop-slope-per-1k", type=float,
        help="create: held-out LL gain per 1,000 labels below which the stopping signal says DIMINISHING/STOP "
        "(default 0.005)",
    )
    pools.add_argument(
        "--auto-update-min-labels",
        type=int,
        help="create: retrain by itself once this many new labels arrived since the latest posterior (default 0: off)",
    )
    pools.add_argument(
        "--auto-update-interval-s",
        type=float,
        help="create: retrain by itself this long after the latest posterior when new labels arrived (default 0: off)",
    )
    pools.set_defaults(func=cmd_pools)

    up = sub.add_parser("upload", help="upload items from FILE.jsonl[.gz]", parents=common)
    up.add_argument("pool", help="pool id")
    up.add_argument(
        "file",
        help="JSON lines: {id, prompt, chosen, rejected} (shown as A/B in a seeded random order) or "
        "{item_id, prompt, completion_a, completion_b[, *_features]}; .gz allowed",
    )
    up.add_argument("--heldout", action="store_true", help="upload as held-out items with their preference")
    up.add_argument("--seed", type=int, default=0, help="seed of the A/B order for chosen/rejected files")
    up.add_argument("--chunk-size", type=int, default=500, help="items per streamed chunk (default 500)")
    up.add_argument("--wait", action="store_true", help="then wait until the features are extracted (--timeout-s)")
    up.set_defaults(func=cmd_upload)

    lab = sub.add_parser("label", help="store one label or a JSON lines file of labels", parents=common)
    lab.add_argument("pool", help="pool id")
    lab.add_argument("--file", help=LABEL_FILE_HELP)
    lab.add_argument("--item", help="one label: the item id")
    lab.add_argument("--preference", choices=["A", "B", "TIE"], type=str.upper, help="one label: A, B or TIE")
    lab.add_argument("--label-id", help="one label: its id (default <item>-<annotator>)")
    lab.add_argument("--annotator", help="annotator id (default anonymous; for --file, rows without annotator_id)")
    lab.add_argument("--request-id", help="idempotency key of the whole request")
    lab.set_defaults(func=cmd_label)

    tr = sub.add_parser("train", help="update the posterior, with a progress bar of its epochs", parents=common)
    tr.add_argument("pool", help="pool id")
    tr.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    tr.add_argument("--epochs", type=int, default=0, help="max epochs (0: the pool's setting)")
    tr.add_argument("--warm-start", action="store_true", help="continue from the latest posterior")
    tr.add_argument("--no-wait", action="store_true", help="start the operation and print it without waiting")
    tr.set_defaults(func=cmd_train)

    acq = sub.add_parser("acquire", help="acquire and lease the next batch", parents=common)
    acq.add_argument("pool", help="pool id")
    acq.add_argument("--batch-size", type=int, default=32, help="items to acquire (default 32)")
    acq.add_argument("--strategy", default=None, help="acquisition strategy (default: the pool's), e.g. BALPM, BALD")
    acq.add_argument("--seed", type=int, default=0, help="seed of random and stochastic strategies")
    acq.add_argument("--lease-ttl-s", type=float, default=0.0, help="lease length (0: the server's, 1 h)")
    acq.add_argument("--annotator", help="who receives the lease (default anonymous)")
    acq.set_defaults(func=cmd_acquire)

    exc = sub.add_parser(
        "exclude", help="never hand out these items again (their leases end; labels stay); --include undoes it",
        parents=common,
    )
    exc.add_argument("pool", help="pool id")
    exc.add_argument("items", nargs="+", help="item ids")
    exc.add_argument("--include", action="store_true", help="include the items again instead")
    exc.set_defaults(func=cmd_exclude)

    pr = sub.add_parser("predict", help="predict stored items", parents=common)
    pr.add_argument("pool", help="pool id")
    pr.add_argument("items", nargs="+", help="item ids")
    pr.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="evaluate on the held-out split or a labelled file", parents=common)
    ev.add_argument("pool", help="pool id")
    ev.add_argument("--file", help="labelled items in the upload format (default: the pool's held-out split)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the A/B order for chosen/rejected files")
    ev.set_defaults(func=cmd_evaluate)

    cu = sub.add_parser(
        "curve", parents=common,
        help="what active learning saves on the pool (from its control labels) and whether to keep labelling",
    )
    cu.add_argument("pool", help="pool id")
    cu.add_argument("--wait", action="store_true", help="wait until the background estimate is up to date")
    cu.add_argument("--wait-timeout-s", type=float, default=600.0, help="how long --wait waits (default 600)")
    cu.add_argument("--next-batch-size", type=int, default=0,
                    help="batch size for the next batch's expected information gain (default 100)")
    cu.set_defaults(func=cmd_curve)

    ex = sub.add_parser(
        "export", help="stream a pool's labels (or items) as JSON lines, whatever -o says", parents=common
    )
    ex.add_argument("pool", help="pool id")
    ex.add_argument("--items", action="store_true", help="export the items instead of the labels")
    ex.add_argument("--features", action="store_true", help="with --items: include the feature vectors")
    ex.add_argument("--split", choices=["POOL", "HELDOUT"], type=str.upper, help="with --items: only this split")
    ex.set_defaults(func=cmd_export)

    demo = sub.add_parser(
        "demo-data", help="write synthetic pool.jsonl and test.jsonl in the shared format", parents=common
    )
    demo.add_argument("--out-dir", required=True, help="folder to write into")
    demo.add_argument("--pool-size", type=int, default=600, help="rows of pool.jsonl (default 600)")
    demo.add_argument("--test-size", type=int, default=200, help="rows of test.jsonl (default 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed")
    demo.set_defaults(func=cmd_demo_data)

    sim = sub.add_parser(
        "simulate",
        help="oracle replay of the active-learning loop (needs balpm[sim])",
        parents=common,
        description="Replay the active-learning loop against the server with an oracle's labels: one pool per "
        "strategy, round 0 a RANDOM batch, then --rounds batches of the strategy, each followed by training and "
        "an evaluation on the test file. -o table prints a table of the rounds at the end, -o json one JSON "
        "object per round as it finishes; --out keeps them as JSON lines.",
    )
    sim.add_argument("--pool-file", required=True, help="pool items (shared format, JSON lines)")
    sim.add_argument("--test-file", required=True, help="held-out test items (shared format)")
    sim.add_argument(
        "--strategy", default="BALPM", help="strategy, or several comma-separated (one run each), e.g. random,balpm"
    )
    sim.add_argument("--initial", type=int, default=256, help="size of the initial RANDOM batch (default 256)")
    sim.add_argument("--batch-size", type=int, default=256, help="size of the later batches (default 256)")
    sim.add_argument("--rounds", type=int, default=5, help="acquisition rounds after the initial batch (default 5)")
    sim.add_argument("--seed", type=int, default=0, help="seed of acquisition, training and the A/B order")
    sim.add_argument("--epochs", type=int, default=0, help="max epochs per update (0 = pool default)")
    sim.add_argument("--limit", type=int, default=0, help="use only the first N rows of each file")
    sim.add_argument("--pool-rows", default="", help="row range START:STOP of the pool file")
    sim.add_argument("--test-rows", default="", help="row range START:STOP of the test file")
    sim.add_argument("--oracle", default="human", choices=["human", "model"], help="who answers: file or teacher")
    sim.add_argument("--oracle-agreement", type=float, default=0.89, help="model oracle: expected agreement")
    sim.add_argument("--redundancy", type=int, default=1, help="model oracle: copies R of each pool item")
    sim.add_argument("--redundancy-noise", type=float, default=0.01, help="relative feature noise of the copies")
    sim.add_argument("--teacher-seed", type=int, default=0, help="model oracle: seed of the teacher's weights")
    sim.add_argument("--knn-k", type=int, help="BAL-PM neighbour count k (default 13)")
    sim.add_argument(
        "--knn-convention",
        choices=["STANDARD", "AUTHORS"],
        type=str.upper,
        help=_KNN_CONVENTION_HELP,
    )
    sim.add_argument("--beta", type=float, help="BAL-PM entropy weight beta (default 0.01)")
    sim.add_argument("--ensemble-size", type=int, help="ensemble members (default 5)")
    sim.add_argument("--hidden-sizes", default="", help="comma-separated hidden widths, e.g. 256,64")
    sim.add_argument("--keep-pool", action="store_true", help="keep the run's pools afterwards")
    sim.add_argument("--pool-id", default="", help="name the run's pools PREFIX-<strategy> (default: generated)")
    sim.add_argument("--out", help="write every round as a JSON line to this file")
    sim.add_argument(
        "--plot",
        metavar="PNG",
        help="draw the learning curves (test log-likelihood and accuracy vs labels) of every run into this image "
        "(needs matplotlib, balpm[sim])",
    )
    sim.add_argument(
        "--compare",
        metavar="JSONL",
        action="append",
        default=[],
        help="with --plot: also draw the runs of an earlier --out file (repeatable)",
    )
    sim.set_defaults(func=cmd_simulate)

    from balpm.integrations.label_studio import register_cli as register_label_studio  # issue #9

    register_label_studio(sub, parents=common)
    return p


def _one_line(e: BalpmError) -> str:
    text = " ".join(str(e).split())
    fields = [
        v.field if v.description in text else f"{v.field}: {v.description}"
        for v in e.field_violations
        if v.field and v.field not in text
    ]
    return text + (f" (field {'; '.join(fields)})" if fields else "")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `balpm`: one `error: ...` line and exit status 2 on any failure, never a traceback.

    BALPM_DEBUG=1 re-raises unexpected exceptions (with their traceback) for bug reports.
    """
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BalpmError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # e.g. `balpm export ... | head`
        sys.stderr.close()
        sys.exit(EXIT_ERROR)
    except Exception as e:
        if os.environ.get("BALPM_DEBUG"):
            raise
        message = " ".join(str(e).split())
        print(f"error: {type(e).__name__}: {message} (BALPM_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
