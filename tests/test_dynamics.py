"""spectra_artifact.dynamics — routing dynamics (flip rate, Kendall τ, stability step), Gram geometry, layer
balance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spectra_artifact import dynamics as D

try:
    from scipy import stats as sps
except ImportError:  # pragma: no cover
    sps = None


# --------------------------------------------------------------------------------------------- flip rate
def test_flip_rate_counts_changed_top1_and_averages_layers():
    assert D.flip_rate([0, 1, 2, 3], [0, 1, 3, 3]) == 0.25
    before = np.array([[0, 1, 2, 3], [0, 0, 1, 1]])
    after = np.array([[0, 1, 2, 0], [1, 1, 1, 1]])  # layer 0: 1/4 changed, layer 1: 2/4
    assert D.flip_rate(before, after) == pytest.approx(0.375)
    assert D.flip_rate(before, before) == 0.0
    assert math.isnan(D.flip_rate(np.zeros((2, 0)), np.zeros((2, 0))))
    with pytest.raises(ValueError, match="same tokens"):
        D.flip_rate(before, after[:, :3])


# --------------------------------------------------------------------------------------------- Kendall tau
def test_kendall_tau_hand_examples():
    assert D.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert D.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert D.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)  # 5 concordant, 1 discordant pair
    # a tie in x: 2 concordant of 3 pairs, tau-b = 2 / sqrt((3 - 1) * 3)
    assert D.kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(D.kendall_tau([5, 5, 5], [1, 2, 3]))  # constant: order undefined
    assert math.isnan(D.kendall_tau([1], [1]))


@pytest.mark.skipif(sps is None, reason="scipy not installed")
def test_kendall_tau_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, 9), rng.integers(0, 4, 9)
        ref = sps.kendalltau(x, y).statistic
        got = D.kendall_tau(x, y)
        assert (math.isnan(ref) and math.isnan(got)) or got == pytest.approx(ref, abs=1e-12)


def test_load_tau_averages_layers_where_defined():
    before = np.array([[10, 20, 30, 40], [5, 5, 5, 5]])  # layer 1 constant: skipped
    after = np.array([[40, 30, 20, 10], [1, 2, 3, 4]])
    assert D.load_tau(before, after) == pytest.approx(-1.0)
    assert D.load_tau([[1, 2, 3], [3, 2, 1]], [[1, 2, 3], [1, 2, 3]]) == pytest.approx(0.0)  # mean of 1 and −1
    assert math.isnan(D.load_tau([[1, 1]], [[2, 2]]))


# --------------------------------------------------------------------------------------------- stability step
def test_stable_step_is_the_first_point_after_which_flips_stay_low():
    steps, flips = [10, 20, 30, 40, 50], [0.30, 0.02, 0.20, 0.01]
    assert D.stable_step(steps, flips, 0.05) == 40  # the dip at 20→30 does not count: it rises again
    assert D.stable_step(steps, flips, 0.25) == 20
    assert D.stable_step(steps, flips, 0.5) == 10  # stable from the first point
    assert D.stable_step(steps, [0.01, 0.01, 0.01, 0.2], 0.05) is None  # moving at the end: not stable
    assert D.stable_step(steps, [0.01, 0.01, 0.05, 0.01], 0.05) == 40  # "below": equal is not below
    assert D.stable_step([10], [], 0.05) is None
    with pytest.raises(ValueError, match="flip rates"):
        D.stable_step(steps, flips[:2])


def test_run_dynamics_from_a_dynamics_record():
    top1 = np.array([[[0, 1, 2, 3]], [[1, 1, 2, 3]], [[1, 1, 2, 3]]], np.int16)  # [P=3, L=1, N=4]
    loads = np.array([[[1, 2, 3, 4]], [[4, 3, 2, 1]], [[4, 3, 2, 1]]], np.float32)
    d = D.run_dynamics({"steps": np.array([4, 8, 12]), "top1": top1, "loads": loads}, threshold=0.1)
    assert [t["flip_rate"] for t in d["transitions"]] == [0.25, 0.0]
    assert [t["load_tau"] for t in d["transitions"]] == pytest.approx([-1.0, 1.0])
    assert d["stable_step"] == 8 and d["threshold"] == 0.1
    empty = D.run_dynamics({"steps": np.zeros(0, np.int64), "top1": np.zeros((0, 0, 0)), "loads": np.zeros((0, 0, 0))})
    assert empty["transitions"] == [] and empty["stable_step"] is None and "expert choice" in empty["note"]


def _fake_run(tmp_path, arm, variant, seed, top1, loads, steps=(4, 8, 12), routing=None):
    d = tmp_path / arm / variant / f"s{seed}"
    d.mkdir(parents=True)
    np.savez_compressed(d / "dynamics.npz", steps=np.array(steps, np.int64), top1=np.asarray(top1, np.int16),
                        loads=np.asarray(loads, np.float32))
    return {"arm": arm, "variant": variant, "seed": seed, "run": f"{arm}/{variant}-s{seed}", "_dir": str(d),
            "moe_config": {"num_experts": 4}, "routing": routing or {}}


def test_dynamics_frames_and_means_over_seeds(tmp_path):
    still = np.zeros((3, 2, 8), np.int16)
    moving = still.copy()
    moving[1:, :, :4] = 1  # half the tokens move at the first transition, then stay
    loads = np.tile(np.array([1, 2, 3, 4], np.float32), (3, 2, 1))
    runs = [_fake_run(tmp_path, "scratch", "spectra", 0, still, loads),
            _fake_run(tmp_path, "scratch", "spectra", 1, moving, loads),
            {"arm": "scratch", "variant": "dense", "seed": 0, "run": "scratch/dense-s0", "_dir": "x",
             "moe_config": None}]
    runs[0]["dynamics_steps_missing"] = [2]  # as a resumed run records it
    curve, per_run = D.dynamics_frames(runs, threshold=0.05)
    assert "resumed" in per_run.set_index("seed").loc[0, "note"] and per_run.set_index("seed").loc[1, "note"] == ""
    assert len(curve) == 4 and set(per_run["run"]) == {"scratch/spectra-s0", "scratch/spectra-s1"}  # dense skipped
    r1 = per_run.set_index("seed").loc[1]
    assert r1["flip_rate_mean"] == pytest.approx(0.25) and r1["flip_rate_last"] == 0.0
    assert r1["stable_step"] == 8 and r1["stable_fraction"] == pytest.approx(8 / 12)
    assert per_run.set_index("seed").loc[0, "stable_step"] == 4
    by = D.dynamics_by_variant(per_run).iloc[0]
    assert by["n"] == 2 and by["n_stable"] == 2 and by["threshold"] == 0.05
    assert by["flip_rate_mean"] == pytest.approx(0.125) and by["stable_step_mean"] == pytest.approx(6.0)
    assert by["load_tau_mean"] == pytest.approx(1.0) and by["curve_steps"] == "4 8 12"


def test_missing_dynamics_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="dynamics.npz"):
        D.read_dynamics(tmp_path)


# --------------------------------------------------------------------------------------------- Gram geometry
def test_geometry_of_a_known_matrix_is_rotation_invariant():
    lam = np.array([4.0, 2.0, 1.0, 1.0])
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    g = q @ np.diag(lam) @ q.T
    geo = D.matrix_geometry(g)
    assert geo["eigenvalues"] == pytest.approx([4, 2, 1, 1])
    assert geo["condition_number"] == pytest.approx(4.0)
    assert geo["log_det"] == pytest.approx(math.log(8.0))
    # p = (1/2, 1/4, 1/8, 1/8): H = 1.75 ln 2
    assert geo["effective_rank"] == pytest.approx(2 ** 1.75)
    assert D.effective_rank(torch.eye(5)) == pytest.approx(5.0) and D.log_det(np.eye(5)) == pytest.approx(0.0)


def test_geometry_of_a_singular_matrix():
    ones = np.ones((3, 3))  # three identical unit vectors: one direction
    assert D.effective_rank(ones) == pytest.approx(1.0)
    assert D.condition_number(ones) == math.inf and D.log_det(ones) == -math.inf
    with pytest.raises(ValueError, match="square"):
        D.spectrum(np.ones((2, 3)))


def test_output_similarity_identical_and_orthogonal_experts():
    same = np.tile(np.array([1.0, 2.0, 0.0]), (1, 3, 2, 1))  # [L=1, E=3, domains=2, D=3]
    assert D.output_similarity(same)[0] == pytest.approx(np.ones((3, 3)))
    ortho = np.eye(3)[None, :, None, :].repeat(2, axis=2) * 5.0
    ortho[0, :, 1] = np.nan  # a domain without tokens is ignored
    assert D.output_similarity(ortho)[0] == pytest.approx(np.eye(3))


def test_router_grams_are_the_inference_ebar_gram():
    from transformers import GPT2Config, GPT2LMHeadModel

    from spectra.upcycle import routers_of, upcycle

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2))
    upcycle(model, router="spectra", num_experts=4, top_k=2, router_dim=4)
    r = routers_of(model)[0]
    assert D.router_grams(model) == [None, None]  # no optimizer step yet: no inference Gram
    ebar = torch.nn.functional.normalize(torch.randn(4, 4), dim=-1)
    r.ebar_ema[1] = ebar
    r.ebar_steps[1] = 3
    grams = D.router_grams(model)
    assert grams[0] is None and np.allclose(grams[1], (ebar @ ebar.t()).numpy(), atol=1e-6)
    rows = D.geometry_rows({"variant": "spectra"}, "router_gram", grams)
    assert len(rows) == 1 and rows[0]["layer"] == 1 and rows[0]["eig_0"] >= rows[0]["eig_3"]
    assert sum(rows[0][f"eig_{i}"] for i in range(4)) == pytest.approx(4.0, abs=1e-5)  # trace of a unit-diagonal G
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    assert D.router_grams(dense) == []


# --------------------------------------------------------------------------------------------- layer balance
@pytest.mark.parametrize("metric, value, expected", [
    ("layer_cv", 0.05, (True, "good")), ("layer_cv", 0.1, (False, "intermediate")), ("layer_cv", 0.31, (False, "bad")),
    ("early_late_ratio", 1.0, (True, "good")), ("early_late_ratio", 1.2, (False, "intermediate")),
    ("early_late_ratio", 0.6, (False, "bad")), ("early_late_ratio", math.inf, (False, "n/a")),
    ("mean_layer_entropy", 0.9, (True, "good")), ("mean_layer_entropy", 0.6, (False, "intermediate")),
    ("mean_layer_entropy", 0.4, (False, "bad")), ("mean_layer_entropy", float("nan"), (False, "n/a")),
])
def test_rate_layer_balance_uses_the_seed_marks(metric, value, expected):
    assert D.rate_layer_balance(metric, value) == expected


def test_layer_balance_table_judges_the_seed_mean():
    def run(arm, variant, seed, cv, ratio, ent):
        return {"arm": arm, "variant": variant, "seed": seed, "moe_config": {"num_experts": 4},
                "routing": {"layer_layer_cv": cv, "layer_early_late_ratio": ratio, "layer_mean_layer_entropy": ent,
                            "per_layer": [{}, {}]}}
    runs = [run("scratch", "spectra", 0, 0.02, 1.0, 0.9), run("scratch", "spectra", 1, 0.06, 1.04, 0.86),
            run("scratch", "top2", 0, 0.5, 1.5, 0.3),
            {"arm": "scratch", "variant": "dense", "seed": 0, "moe_config": None}]
    t = D.layer_balance_table(runs, {"spectra": "SPECTRA"}).set_index("variant")
    assert list(t.index) == ["spectra", "top2"]
    sp = t.loc["spectra"]
    assert sp["label"] == "SPECTRA" and sp["n"] == 2 and sp["num_layers"] == 2
    assert sp["layer_cv_mean"] == pytest.approx(0.04) and sp["layer_cv_std"] == pytest.approx(math.sqrt(0.0008))
    assert sp["all_met"] and sp["layer_cv_target"] == "< 0.1" and sp["mean_layer_entropy_rating"] == "good"
    tp = t.loc["top2"]
    assert not tp["all_met"] and tp["early_late_ratio_rating"] == "bad" and tp["layer_cv_met"] == False  # noqa: E712
    json.dumps(t.reset_index().to_dict("records"))  # plain values only: CSV/JSON ready
