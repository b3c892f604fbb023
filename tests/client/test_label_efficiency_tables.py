"""The pure table functions of bench/label_efficiency.py (issue 18): AUC, paired bootstrap, labels to reach.

Synthetic round records stand in for a run; no server is started.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import label_efficiency as le

pytestmark = pytest.mark.unit

LABELS = (100, 200, 300, 400, 500)


def _records(
    strategy: str,
    seed: int,
    lls: list[float] | np.ndarray,
    *,
    oracle: str = "model-near_linear",
    teacher: str | None = "near_linear",
    redundancy: int = 4,
    labels: tuple[int, ...] = LABELS,
) -> list[dict[str, Any]]:
    """One run's round records, as `run_one` writes them."""
    out = []
    for rnd, (n, ll) in enumerate(zip(labels, lls, strict=True)):
        ent = None if strategy != "BALPM" or rnd == 0 else 1.5
        out.append(
            {
                "oracle": oracle, "teacher": teacher, "phase": "main", "redundancy": redundancy, "beta": 1.0,
                "knn_k": 5, "d_ent": 1.0, "round": rnd, "labels": n, "strategy": strategy, "seed": seed,
                "test_log_likelihood": float(ll), "test_accuracy": 0.6 + 0.1 * float(ll + 0.7), "test_ece": 0.05,
                "acquire_s": 0.1, "train_s": 1.0, "batch_strategy": "RANDOM" if rnd == 0 else strategy,
                "posterior_version": rnd + 1, "batch_size": 100, "distinct_prompts": 100 if rnd == 0 else 60,
                "mean_epistemic": 0.0 if rnd == 0 else 0.08, "min_epistemic": 0.0, "max_epistemic": 0.0 if rnd == 0
                else 0.2, "mean_entropy": ent, "min_entropy": ent and 1.0, "max_entropy": ent and 2.0,
                "mean_total": 0.1, "posterior": {"bootstrap": False, "patience": 7, "val_fraction": 0.1,
                                                 "train_batch_size": 32, "learning_rate": 0.001,
                                                 "weight_decay": 0.0001, "epochs": 100},
                "posterior_sent": {"bootstrap": False, "patience": 7}, "run_wall_s": 12.0,
            }
        )
    return out


def _random_curve(rng: np.random.Generator) -> np.ndarray:
    """A rising test LL curve with a per-seed offset and per-round noise."""
    return np.linspace(-0.68, -0.55, len(LABELS)) + rng.normal(0, 0.02) + rng.normal(0, 0.003, len(LABELS))


# ---- AUC


def test_normalised_auc_of_known_curves() -> None:
    # Trapezoids: 100 x (-0.65) + 200 x (-0.55) = -175 over a range of 300.
    assert le.normalised_auc([100, 200, 400], [-0.7, -0.6, -0.5]) == pytest.approx(-175 / 300)
    assert le.normalised_auc([64, 128, 576], [-0.6, -0.6, -0.6]) == pytest.approx(-0.6)
    assert le.normalised_auc([0, 10], [-0.7, -0.5]) == pytest.approx(-0.6)  # a line: the mean of its ends
    # Unequal spacing matters: the long last interval weighs the late values more than a plain mean would.
    assert le.normalised_auc([100, 200, 1000], [-0.7, -0.6, -0.5]) != pytest.approx(np.mean([-0.7, -0.6, -0.5]))
    assert le.normalised_auc([256], [-0.61]) == pytest.approx(-0.61)
    with pytest.raises(ValueError):
        le.normalised_auc([100, 100, 200], [-0.7, -0.6, -0.5])
    with pytest.raises(ValueError):
        le.normalised_auc([], [])


def test_auc_table_difference_is_exact_when_a_strategy_is_a_seed_wise_shift_of_random() -> None:
    rng = np.random.default_rng(0)
    recs = []
    for seed in range(6):
        base = _random_curve(rng)
        recs += _records("RANDOM", seed, base) + _records("BALPM", seed, base + 0.02)
        recs += _records("BALD", seed, base - 0.01 + rng.normal(0, 0.01, len(LABELS)))
    rows = {r["strategy"]: r for r in le.auc_table(recs)}
    assert [r["strategy"] for r in le.auc_table(recs)] == ["RANDOM", "BALD", "BALPM"]
    balpm = rows["BALPM"]
    assert balpm["auc_diff"] == pytest.approx(0.02)
    # Paired by seed: the per-seed offsets (SD 0.02) cancel, so the interval is the shift itself.
    assert balpm["ci_lo"] == pytest.approx(0.02) and balpm["ci_hi"] == pytest.approx(0.02)
    assert balpm["share_above"] == 1.0
    assert balpm["auc"] == pytest.approx(rows["RANDOM"]["auc"] + 0.02)
    assert rows["RANDOM"]["auc_diff"] == 0.0
    bald = rows["BALD"]
    assert bald["ci_lo"] < bald["auc_diff"] < bald["ci_hi"]
    assert bald["ci_hi"] - bald["ci_lo"] < 0.03  # unpaired, the offsets alone would make it about 0.06 wide
    assert (balpm["labels_from"], balpm["labels_to"], balpm["n_paired"]) == (100.0, 500.0, 6)


def test_random_reference_is_pooled_over_all_its_seeds() -> None:
    recs = []
    for seed in range(8):
        recs += _records("RANDOM", seed, np.full(len(LABELS), -0.6 - 0.01 * seed))
    for seed in range(4):
        recs += _records("BALPM", seed, np.full(len(LABELS), -0.6))
    rows = {r["strategy"]: r for r in le.auc_table(recs)}
    assert rows["BALPM"]["reference_auc"] == pytest.approx(np.mean([-0.6 - 0.01 * s for s in range(8)]))
    assert (rows["BALPM"]["n_seeds"], rows["BALPM"]["n_reference_seeds"], rows["BALPM"]["n_paired"]) == (4, 8, 4)
    assert rows["BALPM"]["auc_diff"] == pytest.approx(0.035)
    savings = {r["strategy"]: r for r in le.savings_table(recs)}
    assert savings["BALPM"]["target_ll"] == pytest.approx(-0.635)


# ---- paired bootstrap


def _noisy_pair(n_seeds: int, seed: int = 1) -> tuple[dict[int, float], dict[int, float]]:
    rng = np.random.default_rng(seed)
    offset = rng.normal(0, 0.05, n_seeds)
    ref = {s: float(-0.6 + offset[s]) for s in range(n_seeds)}
    val = {s: float(-0.59 + offset[s] + rng.normal(0, 0.01)) for s in range(n_seeds)}
    return val, ref


@pytest.mark.parametrize("n_seeds", [3, 8, 32])
def test_paired_bootstrap_interval_contains_the_point_estimate(n_seeds: int) -> None:
    val, ref = _noisy_pair(n_seeds)
    point, lo, hi = le.paired_bootstrap_diff(val, ref, n_boot=2000, rng_seed=0)
    assert point == pytest.approx(np.mean(list(val.values())) - np.mean(list(ref.values())))
    assert lo <= point <= hi
    assert lo < hi


def test_paired_bootstrap_interval_shrinks_with_more_seeds() -> None:
    widths = {}
    for n in (4, 64):
        val, ref = _noisy_pair(n)
        _, lo, hi = le.paired_bootstrap_diff(val, ref, n_boot=2000, rng_seed=0)
        widths[n] = hi - lo
    # The width goes as 1 / sqrt(seeds): 16x the seeds, about a quarter of the width.
    assert widths[64] < 0.5 * widths[4], widths
    # Paired: the shared offsets (SD 0.05) do not widen it; only the per-seed noise (SD 0.01) does.
    assert widths[4] < 0.05, widths


def test_paired_bootstrap_is_seeded() -> None:
    val, ref = _noisy_pair(8)
    assert le.paired_bootstrap_diff(val, ref, rng_seed=3) == le.paired_bootstrap_diff(val, ref, rng_seed=3)
    assert le.paired_bootstrap_diff(val, ref, rng_seed=3) != le.paired_bootstrap_diff(val, ref, rng_seed=4)


def test_resampled_means_weights_by_multiplicity_and_is_nan_without_a_drawn_seed() -> None:
    draws = np.array([[0, 0, 2], [1, 1, 1], [5, 5, 5]])
    means = le.resampled_means(np.array([10.0, 20.0, 40.0]), [0, 1, 2], draws)
    assert means[0] == pytest.approx(20.0) and means[1] == pytest.approx(20.0)
    assert math.isnan(means[2])


# ---- labels to reach RANDOM's final LL


def test_labels_to_reach_interpolates_and_reports_not_reached() -> None:
    labels = np.array([100.0, 200.0, 300.0])
    assert le.labels_to_reach(labels, np.array([-0.7, -0.6, -0.5]), -0.55) == pytest.approx(250.0)
    assert le.labels_to_reach(labels, np.array([-0.5, -0.6, -0.7]), -0.55) == 100.0
    assert le.labels_to_reach(labels, np.array([-0.7, -0.65, -0.6]), -0.55) == math.inf


def test_savings_table_reports_a_saving_and_not_reached() -> None:
    recs = []
    for seed in range(5):
        jitter = 0.002 * (seed - 2)
        recs += _records("RANDOM", seed, np.linspace(-0.7, -0.5, 5) + jitter)
        # BAL-PM crosses -0.5 two thirds of the way from 200 to 300 labels: 1 - 266.7 / 500 = 47% fewer labels.
        recs += _records("BALPM", seed, np.array([-0.7, -0.6, -0.45, -0.45, -0.45]) + jitter)
        recs += _records("BALD", seed, np.array([-0.7, -0.68, -0.66, -0.64, -0.62]) + jitter)
    rows = {r["strategy"]: r for r in le.savings_table(recs)}
    assert rows["RANDOM"]["target_ll"] == pytest.approx(-0.5)
    assert rows["BALPM"]["labels_needed"] == pytest.approx(200 + 100 * 0.1 / 0.15)
    assert rows["BALPM"]["saving"] == pytest.approx(1 - (200 + 100 * 0.1 / 0.15) / 500)
    assert rows["BALPM"]["reached_share"] == 1.0
    assert rows["BALPM"]["ci_lo"] <= rows["BALPM"]["saving"] <= rows["BALPM"]["ci_hi"]
    bald = rows["BALD"]
    assert bald["labels_needed"] == math.inf and not bald["reached"]
    assert bald["saving"] == -math.inf and bald["reached_share"] == 0.0
    assert bald["ci_lo"] == -math.inf and bald["ci_hi"] == -math.inf

    text, _ = le.render_markdown(le.Arm("model", "near_linear", 4), recs, [], (1.0, 5), "set by --beta / --knn-k",
                                      {"oracle": "model-near_linear"}, None, "Command: `test`")
    reach = text.split("## Labels to reach RANDOM's final mean test LL", 1)[1].split("##", 1)[0]
    bald_row = next(line for line in reach.splitlines() if line.startswith("| BALD |"))
    assert "not reached" in bald_row and "[n/a, n/a]" in bald_row and "0% of resamples" in bald_row
    balpm_row = next(line for line in reach.splitlines() if line.startswith("| BALPM |"))
    assert "| 267 | 47% |" in balpm_row and "100% of resamples" in balpm_row


# ---- the report


def _arm_records(oracle: str = "model-near_linear", teacher: str | None = "near_linear", red: int = 4) -> list[dict]:
    rng = np.random.default_rng(5)
    recs = []
    for seed in range(3):
        base = _random_curve(rng)
        for strat, shift in (("RANDOM", 0.0), ("BALD", -0.01), ("BALPM", 0.005)):
            recs += _records(strat, seed, base + shift, oracle=oracle, teacher=teacher, redundancy=red)
    return recs


def test_markdown_names_teacher_and_redundancy_in_every_table_and_puts_auc_first() -> None:
    text, _ = le.render_markdown(le.Arm("model", "near_linear", 4), _arm_records(), [], (1.0, 5), "tuned",
                                 {"oracle": "model-near_linear"}, None, "Command: `test`")
    assert text.startswith("# Label efficiency: model-near_linear oracle, redundancy R = 4")
    sections = text.split("\n## ")[1:]
    assert sections[0].startswith("Area under the test log-likelihood curve")
    assert sections[1].startswith("Labels to reach RANDOM's final mean test LL")
    for section in sections:
        assert "teacher near_linear" in section and "R = 4" in section, section[:200]
    assert "bootstrap off, patience 7" in text and "set by this run: bootstrap off, patience 7" in text
    assert "beta x entropy" in text and "distinct prompts / batch" in text


def test_report_only_rebuilds_tables_from_the_jsonl_alone(tmp_path: Path) -> None:
    for arm, recs in (("model-near_linear_r4", _arm_records()),
                      ("human_r1", _arm_records("human", None, 1))):
        (tmp_path / f"label_efficiency_{arm}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    le.main(["--report-only", "--out-dir", str(tmp_path)])
    model_md = (tmp_path / "label_efficiency_model-near_linear_r4.md").read_text()
    human_md = (tmp_path / "label_efficiency_human_r1.md").read_text()
    assert "| BALPM |" in model_md and "teacher near_linear" in model_md
    assert human_md.startswith("# Label efficiency: human oracle, redundancy R = 1")
    assert (tmp_path / "label_efficiency_model-near_linear_r4.png").stat().st_size > 0
    summary = json.loads((tmp_path / "label_efficiency_summary.json").read_text())
    auc = {r["strategy"]: r for r in summary["arms"]["model-near_linear_r4"]["auc"]}
    assert auc["BALPM"]["auc_diff"] == pytest.approx(0.005)
    # Rebuilding again gives the same report (nothing depends on state beyond the files).
    le.main(["--report-only", "--out-dir", str(tmp_path)])
    assert (tmp_path / "label_efficiency_model-near_linear_r4.md").read_text() == model_md


# ---- options


def test_arms_cover_teachers_and_redundancies_and_the_human_oracle_once() -> None:
    args = le.parse_args(["--oracles", "model,human", "--teachers", "near_linear,reward", "--redundancy", "1,4"])
    arms = le.build_arms(args.oracle_list, args.teacher_list, args.redundancy_list)
    assert [a.label for a in arms] == ["model-near_linear_r1", "model-near_linear_r4", "model-reward_r1",
                                       "model-reward_r4", "human_r1"]
    assert [a.name for a in arms][-1] == "human"
    assert le.tuned_here(arms[1], ["model"]) and le.tuned_here(arms[1], ["model-near_linear_r4"])
    assert not le.tuned_here(arms[1], ["model-reward"]) and not le.tuned_here(arms[4], ["model"])
    tuned = {arms[0]: (0.1, 5), arms[1]: (1.0, 13)}
    assert le.choice_for(arms[3], tuned) == (arms[1], (1.0, 13))  # same R first
    assert le.choice_for(le.Arm("model", "reward", 2), tuned) == (arms[0], (0.1, 5))
    assert args.seeds == 8


def test_posterior_flags_become_pool_settings_and_defaults_send_nothing() -> None:
    assert le.posterior_settings(le.parse_args([])) == {}
    args = le.parse_args(["--bootstrap", "off", "--patience", "7", "--posterior-val-fraction", "0",
                          "--train-batch-size", "64", "--learning-rate", "0.003", "--weight-decay", "0"])
    assert le.posterior_settings(args) == {"bootstrap": False, "patience": 7, "val_fraction": 0.0,
                                           "train_batch_size": 64, "learning_rate": 0.003, "weight_decay": 0.0}
    line = le.describe_posterior({"bootstrap": False, "patience": 7}, {"patience": 7})
    assert "bootstrap off, patience 7" in line and "set by this run: patience 7" in line


@pytest.mark.parametrize(
    "argv",
    [["--teachers", "linear"], ["--redundancy", "0"], ["--redundancy", "1,x"], ["--patience", "2000"],
     ["--posterior-val-fraction", "0.7"], ["--oracles", "crowd"], ["--beta", "1"]],
)
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        le.parse_args(argv)


def test_a_flat_reference_curve_gets_a_caution_instead_of_a_saving_claim() -> None:
    recs = []
    for seed in range(4):
        flat = np.array([-0.60, -0.62, -0.61, -0.60, -0.60]) + 0.001 * seed  # round 0 already at the final LL
        recs += _records("RANDOM", seed, flat) + _records("BALPM", seed, flat + 0.001)
    text, tables = le.render_markdown(le.Arm("model", "reward", 1), recs, [], (1.0, 5), "tuned", {}, None, "h")
    assert tables["savings"][0]["labels_needed"] == 100.0  # RANDOM "reaches" its own final LL at round 0
    assert "Caution: RANDOM's own mean curve reaches its final LL at 100 labels" in text
    steep = _arm_records()
    assert "Caution" not in le.render_markdown(le.Arm("model", "near_linear", 4), steep, [], (1.0, 5), "tuned", {},
                                               None, "h")[0]
