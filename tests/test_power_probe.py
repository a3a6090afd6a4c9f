"""scripts/power_probe.py: the measurement that sizes a profile's budget (issue 11) — its per-step power figure and
paired MDE agree with `spectra_artifact.stats` on known curves, its cost estimate counts the arm's runs as the
pipeline makes them, and a mistyped variant is refused before anything trains."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import power_probe as P  # noqa: E402

from spectra_artifact import stats  # noqa: E402


def test_each_point_reports_the_power_figure_of_the_best_learned_router_and_the_paired_mde():
    # two points; top2 beats the control by a growing margin while its seeds spread less; hash is not a learned
    # router, so it never counts as "best learned" even where it is lowest
    curves = {"random_router": {0: [6.0, 5.50], 1: [6.2, 5.52], 2: [6.1, 5.54]},
              "top2": {0: [6.1, 5.30], 1: [6.3, 5.31], 2: [6.0, 5.32]},
              "hash": {0: [5.0, 5.00], 1: [5.1, 5.02], 2: [5.2, 5.01]}}
    rows = P.summarise(curves, [64, 128], "random_router", [("top2", "hash")])
    assert [r["step"] for r in rows] == [64, 128]
    last = rows[1]
    assert last["power"]["best"] == "top2"
    want = stats.experiment_power([5.50, 5.52, 5.54], [5.30, 5.31, 5.32])
    assert last["power"]["power"] == pytest.approx(want["power"]) and last["power"]["gap"] == pytest.approx(0.21)
    assert rows[0]["power"]["power"] < 0 < last["power"]["power"]  # the control is better than top2 at step 64
    # paired: the per-seed gaps are 0.20, 0.21, 0.22 — std 0.01, so the paired figure is 21 where the pooled one is ~10
    assert last["power"]["paired_std"] == pytest.approx(0.01)
    assert last["power"]["paired_power"] == pytest.approx(21.0)
    d = stats.paired_difference({s: c[1] for s, c in curves["top2"].items()},
                                {s: c[1] for s, c in curves["hash"].items()})
    pair = last["pairs"]["hash-top2"]
    assert pair["n"] == 3 and pair["mean"] == pytest.approx(d["mean"]) and pair["std"] == pytest.approx(d["std"])
    assert pair["mde_ppl_pct"] == pytest.approx(stats.mde_ppl_pct(stats.minimum_detectable_effect(d["std"], 3)))
    assert last["variants"]["hash"]["std"] == pytest.approx(0.01)


def test_without_the_control_there_is_no_power_figure_and_one_seed_gives_no_mde():
    rows = P.summarise({"top2": {0: [5.0]}, "hash": {0: [5.1]}}, [10], "random_router", [("top2", "hash")])
    assert "power" not in rows[0]
    assert math.isnan(rows[0]["pairs"]["hash-top2"]["mde_ppl_pct"])


def test_the_cost_estimate_counts_the_scratch_arm_as_the_pipeline_runs_it():
    params = P.load_params("default")
    prof = params["profiles"]["default"]
    n = len(params["arms"]["scratch"]) * prof["scratch"]["seeds"] + 2 * (prof["scratch"]["focus_seeds"]
                                                                        - prof["scratch"]["seeds"])
    assert P.arm_runs(params) == n == 61
    tiny = P.load_params("tiny")
    assert P.arm_runs(tiny) == len(tiny["profiles"]["tiny"]["enabled"]["scratch"]) * 2 + 2


def test_a_mistyped_variant_is_refused_before_anything_trains(capsys):
    with pytest.raises(SystemExit, match="unknown variant.*top3.*choose from"):
        P.main(["tiny", "--variants", "top2,top3", "--steps", "1"])


def test_moe_overrides_read_yaml_values_and_refuse_an_unknown_field():
    assert P.moe_overrides(["sinkhorn_epsilon=0.2", "weights_from=softmax", "use_sinkhorn=false"]) == {
        "sinkhorn_epsilon": 0.2, "weights_from": "softmax", "use_sinkhorn": False}
    with pytest.raises(SystemExit, match="sinkhorn_eps.*MoEConfig field.*sinkhorn_epsilon"):
        P.moe_overrides(["sinkhorn_eps=0.2"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        P.moe_overrides(["sinkhorn_epsilon"])


def test_the_training_loss_at_a_point_is_the_mean_of_the_window_ending_there():
    log = [{"step": t, "lm_loss": float(t)} for t in range(1, 41)] + [{"step": 40, "val_nll": 1.0}]
    got = P.train_curve(log, [4, 20, 40], window=4)
    assert got == [2.5, 18.5, 38.5]  # mean of steps 1-4, 17-20, 37-40; the evaluation line has no lm_loss
    assert math.isnan(P.train_curve([], [4], window=4)[0])


def test_a_bad_moe_value_or_a_dense_only_run_is_refused_before_anything_trains():
    # data/tiny need not exist: both are refused before the profile's data is read
    with pytest.raises(SystemExit, match="'top2'.*sinkhorn_epsilon=0.*> 0"):
        P.main(["tiny", "--variants", "top2", "--moe", "sinkhorn_epsilon=0", "--steps", "1"])
    with pytest.raises(SystemExit, match="no MoE variant"):
        P.main(["tiny", "--variants", "dense", "--moe", "sinkhorn_epsilon=0.2", "--steps", "1"])
    params = P.load_params("default")
    P.apply_moe_overrides(params, ["spectra", "dense"], {"sinkhorn_epsilon": 0.2})
    assert params["variants"]["spectra"] == {"router": "spectra", "sinkhorn_epsilon": 0.2}
    assert P.moe_config(params, "spectra", hidden_size=0).sinkhorn_epsilon == 0.2
    assert "sinkhorn_epsilon" not in (params["variants"].get("dense") or {})
