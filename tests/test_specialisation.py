"""Issue 12, items 5 and 6: expert–domain specialisation per layer with block-bootstrap CIs and a permutation null
(`spectra_artifact.analysis.specialisation_bootstrap`), linear probes at every hidden state with Wilson intervals
(`spectra_artifact.analysis.layer_probes`, `spectra_artifact.stats.wilson_interval`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectra import metrics
from spectra_artifact import analysis as A
from spectra_artifact import stats as S

E, D, BLOCKS_PER_DOMAIN, T, L = 4, 3, 8, 16, 2


def _routing(follow: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A routing.npz record: with probability `follow` a token's top-1 expert is its domain, else uniform."""
    rng = np.random.default_rng(seed)
    doms = np.repeat(np.arange(D), BLOCKS_PER_DOMAIN)
    tok = np.repeat(doms, T)
    top1 = rng.integers(0, E, size=(L, tok.size))
    top1 = np.where(rng.random(top1.shape) < follow, tok[None] % E, top1)
    return {"top1": top1.astype(np.int16), "loads": np.full((L, E), 1 / E), "block_domains": doms.astype(np.int16),
            "block_size": np.array(T)}


def test_contingency_stats_match_metrics_expert_domain_mi():
    rng = np.random.default_rng(3)
    for _ in range(5):
        e, d = rng.integers(0, E, 500), rng.integers(0, D, 500)
        ref = metrics.expert_domain_mi(torch.from_numpy(e), torch.from_numpy(d), E, D)
        joint = np.zeros((D, E))
        np.add.at(joint, (d, e), 1)
        got = A.contingency_stats(joint)
        assert math.isclose(float(got["mi"]), ref["mutual_information"], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(float(got["nmi"]), ref["normalised_mi"], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(float(got["purity"]), ref["purity"], rel_tol=1e-9)


def test_block_expert_counts_sum_to_the_tokens_and_refuse_a_ragged_record():
    r = _routing(0.5)
    counts, doms = A.block_expert_counts(r, E)
    assert counts.shape == (L, D * BLOCKS_PER_DOMAIN, E) and (counts.sum(-1) == T).all()
    assert (doms == r["block_domains"]).all()
    bad = dict(r, top1=r["top1"][:, :-1])
    with pytest.raises(ValueError, match="do not split"):
        A.block_expert_counts(bad, E)
    empty, _ = A.block_expert_counts(dict(r, top1=np.zeros((0, 0), np.int16)), E)
    assert empty.shape[0] == 0


def test_domain_following_routing_is_detected_and_independent_routing_is_not():
    strong = A.specialisation_bootstrap([_routing(0.6, s) for s in range(2)], E, D, n_boot=300)
    none = A.specialisation_bootstrap([_routing(0.0, s) for s in range(2)], E, D, n_boot=300)
    assert len(strong) == len(none) == L
    for s_row, n_row in zip(strong, none):
        assert s_row["p_perm"] < 0.01 and s_row["mi_low"] > 0.05          # the CI excludes zero by far
        assert s_row["mi_low"] <= s_row["mi_bc"] <= s_row["mi_high"]
        assert n_row["p_perm"] > 0.01                                      # no dependence: not detected
        assert n_row["mi_bc"] < 0.02 and n_row["mi_low"] < 0.01            # bias-corrected towards zero
        assert n_row["mi"] > n_row["mi_bc"]                                # the plug-in MI is biased upwards
        assert abs(n_row["mi"] - n_row["null_mi"]) < 0.01                  # and sits at the permutation null
        assert s_row["n_runs"] == 2 and s_row["n_boot"] == 300


def test_the_bootstrap_is_reproducible_and_skips_runs_without_top1():
    runs = [_routing(0.3, 0), dict(_routing(0.3, 1), top1=np.zeros((0, 0), np.int16))]
    a = A.specialisation_bootstrap(runs, E, D, n_boot=100, seed=5)
    b = A.specialisation_bootstrap(runs, E, D, n_boot=100, seed=5)
    assert repr(a) == repr(b) and a[0]["n_runs"] == 1        # (repr: nan != nan in a plain ==)
    assert A.specialisation_bootstrap([runs[1]], E, D) == []


def test_wilson_interval_known_values_and_edges():
    low, high = S.wilson_interval(8, 10, 0.95)
    assert math.isclose(low, 0.4902, abs_tol=1e-3) and math.isclose(high, 0.9433, abs_tol=1e-3)
    assert S.wilson_interval(0, 20)[0] == 0.0 and 0 < S.wilson_interval(0, 20)[1] < 0.2
    assert S.wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(x) for x in S.wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes <= n"):
        S.wilson_interval(5, 3)


def test_probe_layer_indices():
    assert A.probe_layer_indices(2) == [0, 1, 2]
    deep = A.probe_layer_indices(30, max_points=7)
    assert deep[0] == 0 and deep[-1] == 30 and len(deep) == 7
    with pytest.raises(ValueError):
        A.probe_layer_indices(3, max_points=1)


def test_layer_probes_read_every_hidden_state_of_a_real_model():
    """A tiny GPT-2 whose embeddings carry the label (token id = class): the probe must find it at h0, and every
    (task, layer) row has a Wilson interval around its accuracy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    blocks = np.where(y[:, None] == 1, rng.integers(0, 8, (80, 16)), rng.integers(16, 24, (80, 16))).astype(np.int64)
    rows = A.layer_probes(model, None, {"dom": (blocks[:40], y[:40], blocks[40:], y[40:])}, [0, 1, 2], max_length=16)
    assert [(r["probe"], r["layer"]) for r in rows] == [("dom", 0), ("dom", 1), ("dom", 2)]
    assert rows[0]["accuracy"] > 0.9
    for r in rows:
        assert r["low"] <= r["accuracy"] <= r["high"] and r["n_test"] == 40
