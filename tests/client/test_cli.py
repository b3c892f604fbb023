"""The `balpm` CLI as people use it: global options anywhere, tables and JSON, plots, errors on one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from balpm import cli
from balpm.data import demo_rows
from tests.client.conftest import FakeServicer, featurizing_pool
from tests.conftest import synthetic_items
from tests.procserver import ProcServer


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `balpm ARGV` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


# ---- parsing --------------------------------------------------------------------------------------


def test_global_options_go_before_or_after_the_command() -> None:
    parse = cli.build_parser().parse_args
    before = parse(["--server", "a:1", "--api-key", "k", "--timeout-s", "5", "-o", "json", "pools", "list"])
    after = parse(["pools", "list", "--server", "a:1", "--api-key", "k", "--timeout-s", "5", "-o", "json"])
    for args in (before, after):
        assert (args.server, args.api_key, args.timeout_s, args.output) == ("a:1", "k", 5.0, "json")
    both = parse(["--server", "a:1", "-o", "json", "simulate", "--pool-file", "p", "--test-file", "t",
                  "--server", "b:2", "--out", "o.jsonl"])
    assert (both.server, both.output, both.out) == ("b:2", "json", "o.jsonl")  # after the command wins
    nested = parse(["label-studio", "sync", "--ls-url", "u", "--project", "1", "--pool", "p", "--server", "c:3",
                    "--output", "json"])
    assert (nested.server, nested.output) == ("c:3", "json")
    plain = parse(["pools", "list"])
    assert (plain.output, plain.timeout_s, plain.no_progress) == ("table", None, False)


def test_env_defaults_are_used_and_shown_in_help(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("BALPM_SERVER", "envhost:7")
    monkeypatch.setenv("BALPM_API_KEY", "secret-key")
    args = cli.build_parser().parse_args(["pools", "list"])
    assert (args.server, args.api_key) == ("envhost:7", "secret-key")
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "BALPM_SERVER" in out and "envhost:7" in out and "BALPM_API_KEY" in out
    assert "secret-key" not in out  # the key itself is never printed
    code, out, _ = run(capsys, "upload", "--help")
    assert code == 0 and "--server" in out and "BALPM_SERVER" in out


def test_every_flag_has_help() -> None:
    missing = []
    for parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog}: {action.option_strings or action.dest}")
    assert not missing, missing


def test_feature_storage_flag_and_sdk_setting() -> None:
    from balpm.messages import pool_settings
    from balpm.v1 import balpm_pb2 as pb

    args = cli.build_parser().parse_args(["pools", "create", "p", "--feature-storage", "FLOAT16"])
    assert args.feature_storage == "float16"
    assert cli.build_parser().parse_args(["pools", "create", "p"]).feature_storage is None  # server default
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["pools", "create", "p", "--feature-storage", "float8"])
    for name in ("FLOAT16", "float16", "FEATURE_STORAGE_FLOAT16"):
        assert pool_settings({"feature_storage": name}).feature_storage == pb.FEATURE_STORAGE_FLOAT16
    assert pool_settings({}).feature_storage == pb.FEATURE_STORAGE_UNSPECIFIED  # the server reads it as FLOAT32


def test_label_file_format_is_in_the_help(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "label", "--help")
    flat = " ".join(out.split())
    assert code == 0 and '"item_id"' in flat and '"preference"' in flat and "A, B or TIE" in flat


# ---- against a real server --------------------------------------------------------------------------


def _items_file(path: Path, n: int = 40, dim: int = 4) -> dict[str, str]:
    items, truth = synthetic_items(n, dim, seed=7)
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return truth


def test_pools_table_json_and_the_labelling_commands(
    real_server: ProcServer, pool_id: str, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    t = ("--server", real_server.target, "--no-progress")
    code, out, err = run(capsys, "pools", "create", pool_id, "--feature-source", "CLIENT", "--feature-dim", "4",
                         "--ensemble-size", "2", *t)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["pool", pool_id] and "settings.feature_dim" in out

    truth = _items_file(tmp_path / "items.jsonl")
    code, out, err = run(capsys, *t, "upload", pool_id, str(tmp_path / "items.jsonl"), "--wait", "-o", "json")
    assert code == 0, err
    up = json.loads(out)
    assert up["accepted_count"] == 40 and up["pool"]["state"] == "STATE_READY"

    code, out, _ = run(capsys, "-o", "json", "pools", "list", *t)
    pools = json.loads(out)
    assert isinstance(pools, list) and pool_id in [p["pool_id"] for p in pools]

    code, out, _ = run(capsys, "pools", "list", *t)
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["POOL", "STATE", "ITEMS", "HELDOUT", "FEATURIZED"]
    mine = next(r.split() for r in rows if r.split()[0] == pool_id)
    assert mine[1:4] == ["READY", "40", "0"]

    code, out, _ = run(capsys, "pools", "get", pool_id, "-o", "json", *t)
    assert json.loads(out)["item_count"] == "40"

    code, out, _ = run(capsys, "acquire", pool_id, "--batch-size", "12", "--strategy", "random", "-o", "json", *t)
    batch = json.loads(out)
    ids = [a["item"]["item_id"] for a in batch["items"]]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"item_id": i, "preference": truth[i]}) + "\n" for i in ids))
    code, out, err = run(capsys, "label", pool_id, "--file", str(labels), "--annotator", "carol", *t)
    assert code == 0 and out.startswith("stored 12, duplicates 0"), err

    code, out, err = run(capsys, "train", pool_id, "--epochs", "3", *t)
    assert code == 0 and "STATE_SUCCEEDED" in out, err
    code, out, _ = run(capsys, "acquire", pool_id, "--batch-size", "3", "--strategy", "BALD", *t)
    assert out.splitlines()[0].split()[:4] == ["RANK", "ITEM", "TOTAL", "EPISTEMIC"] and "posterior version 1" in out

    code, out, _ = run(capsys, "export", pool_id, *t)
    exported = [json.loads(line) for line in out.splitlines()]
    assert len(exported) == 12 and {e["label"]["annotator_id"] for e in exported} == {"carol"}
    assert {e["label"]["label_id"] for e in exported} == {f"{i}-carol" for i in ids}

    code, out, err = run(capsys, "pools", "delete", pool_id, "-o", "json", *t)
    assert code == 0 and json.loads(out) == {"deleted": pool_id}, err


def test_pools_create_with_float16_feature_storage(real_server: ProcServer, pool_id: str, capsys) -> None:  # type: ignore[no-untyped-def]
    t = ("--server", real_server.target, "--no-progress")
    code, out, err = run(capsys, "pools", "create", pool_id, "--feature-source", "CLIENT", "--feature-dim", "4",
                         "--feature-storage", "float16", "-o", "json", *t)
    assert code == 0, err
    assert json.loads(out)["settings"]["feature_storage"] == "FEATURE_STORAGE_FLOAT16"
    code, out, _ = run(capsys, "pools", "get", pool_id, *t)
    assert "settings.feature_storage" in out and "FEATURE_STORAGE_FLOAT16" in out
    run(capsys, "pools", "delete", pool_id, *t)


def test_simulate_plots_the_learning_curves_of_its_runs(real_server: ProcServer, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    for name, n, seed in (("pool", 48, 1), ("test", 16, 2)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_rows(n, seed)))
    png = tmp_path / "plots" / "curve.png"
    code, out, err = run(
        capsys, "simulate", "--pool-file", str(tmp_path / "pool.jsonl"), "--test-file", str(tmp_path / "test.jsonl"),
        "--strategy", "random,balpm", "--initial", "8", "--batch-size", "8", "--rounds", "1",
        "--ensemble-size", "2", "--hidden-sizes", "16", "--epochs", "5", "--plot", str(png),
        "--out", str(tmp_path / "runs.jsonl"), "--server", real_server.target, "-o", "json",
    )
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]  # -o json: one object per round
    assert [(r["strategy"], r["round"]) for r in records] == [("RANDOM", 0), ("RANDOM", 1), ("BALPM", 0), ("BALPM", 1)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 4

    again = tmp_path / "again.png"  # earlier runs drawn next to new ones
    from balpm.plots import plot_learning_curves

    plot_learning_curves(records, again)
    assert again.exists()


# ---- errors -----------------------------------------------------------------------------------------


def test_pools_wait_timeout_exits_nonzero_with_the_reason(fake_server: tuple[str, FakeServicer], capsys) -> None:  # type: ignore[no-untyped-def]
    target, servicer = fake_server
    servicer.get_pool = lambda n: featurizing_pool("slow")
    code, out, err = run(capsys, "pools", "wait", "slow", "--timeout-s", "0.5", "--server", target, "--no-progress")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: DEADLINE_EXCEEDED: pool slow still featurising")
    assert "[WAIT_TIMEOUT]" in err and "3/10" in err


@pytest.mark.parametrize(
    "argv",
    [
        ("pools", "list", "--server", "127.0.0.1:1", "--timeout-s", "0.5"),
        ("upload", "p", "/nonexistent/items.jsonl", "--server", "127.0.0.1:1"),
        ("label", "p", "--item", "x", "--server", "127.0.0.1:1"),
        ("pools", "get", "--server", "127.0.0.1:1"),
        ("simulate", "--pool-file", "/nonexistent", "--test-file", "/nonexistent", "--server", "127.0.0.1:1"),
    ],
)
def test_errors_print_one_line_and_no_traceback(argv: tuple[str, ...], capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, *argv, "--no-progress")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err


def test_plot_without_matplotlib_fails_before_any_run(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, _, err = run(capsys, "simulate", "--pool-file", "p", "--test-file", "t", "--plot", "x.png",
                       "--server", "127.0.0.1:1", "--no-progress")
    assert code == 2 and "needs matplotlib: pip install 'balpm[sim]'" in err and err.count("\n") == 1
