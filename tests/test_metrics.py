"""Hand-computed cases for every metric in spectra.metrics."""

from __future__ import annotations

import math

import pytest
import torch

from spectra import metrics as M

E_VALUES = [2, 4, 8, 64]


def collapsed(e: int, n: float = 100.0) -> torch.Tensor:
    load = torch.zeros(e)
    load[0] = n
    return load


# ------------------------------------------------------------------------------------------ tokens_per_expert
def test_tokens_per_expert_counts_topk_slots_and_mask():
    idx = torch.tensor([[0, 1], [1, 2], [1, 3], [0, 3]])
    assert M.tokens_per_expert(idx, 5).tolist() == [2.0, 3.0, 1.0, 2.0, 0.0]
    mask = torch.tensor([True, True, False, True])
    assert M.tokens_per_expert(idx, 5, mask).tolist() == [2.0, 2.0, 1.0, 1.0, 0.0]
    # the router's flat slot-major layout gives the same counts
    flat = idx.t().reshape(-1)
    assert M.tokens_per_expert(flat, 5, mask).tolist() == [2.0, 2.0, 1.0, 1.0, 0.0]
    token_index = torch.arange(4).repeat(2)
    assert M.tokens_per_expert(flat, 5, mask, token_index=token_index).tolist() == [2.0, 2.0, 1.0, 1.0, 0.0]
    # out-of-range (dropped) indices are ignored; dtype float
    out = M.tokens_per_expert(torch.tensor([0, -1, 4, 1]), 2)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------ load metrics
@pytest.mark.parametrize("e", E_VALUES)
def test_uniform_load(e):
    s = M.summarise_load(torch.full((e,), 7.0))
    assert s == pytest.approx({"cv": 0.0, "max_vio": 0.0, "gini": 0.0, "dead_fraction": 0.0, "load_entropy": 1.0},
                              abs=1e-9)


@pytest.mark.parametrize("e", E_VALUES)
def test_full_collapse(e):
    s = M.summarise_load(collapsed(e))
    assert s["cv"] == pytest.approx(math.sqrt(e - 1))
    assert s["max_vio"] == pytest.approx(e - 1)
    assert s["gini"] == pytest.approx((e - 1) / e)
    assert s["dead_fraction"] == pytest.approx((e - 1) / e)
    assert s["load_entropy"] == pytest.approx(0.0, abs=1e-12)


def test_load_metrics_hand_case():
    load = [1.0, 2.0, 3.0, 6.0]  # mean 3, population std sqrt((4+1+0+9)/4)=sqrt(3.5)
    assert M.load_cv(load) == pytest.approx(math.sqrt(3.5) / 3)
    assert M.max_vio(load) == pytest.approx(1.0)  # |6-3|/3
    # Gini: sum_i (2i-E-1) x_(i) / (E sum) = (-3*1 - 1*2 + 1*3 + 3*6)/(4*12) = 16/48
    assert M.gini(load) == pytest.approx(1 / 3)
    p = torch.tensor(load) / 12
    assert M.load_entropy(load) == pytest.approx(float(-(p * p.log()).sum() / math.log(4)), rel=1e-6)
    # shares 1/12 < 0.1/4? no (0.083 > 0.025); with threshold 0.5: 1/12 < 0.125 -> one dead expert
    assert M.dead_expert_fraction(load) == 0.0
    assert M.dead_expert_fraction(load, threshold=0.5) == pytest.approx(0.25)
    assert M.dead_expert_fraction([5.0, 0.0, 5.0, 5.0], threshold=0.0) == pytest.approx(0.25)


def test_load_metrics_zero_tokens_are_zero_and_finite():
    s = M.summarise_load(torch.zeros(8))
    assert s == {"cv": 0.0, "max_vio": 0.0, "gini": 0.0, "dead_fraction": 0.0, "load_entropy": 0.0}
    assert M.load_entropy([3.0]) == 1.0
    with pytest.raises(ValueError):
        M.load_cv([1.0, -1.0])


# ------------------------------------------------------------------------------------------ routing entropy
def test_routing_entropy():
    e = 4
    assert M.routing_entropy(torch.full((5, e), 1 / e)) == pytest.approx(1.0)
    assert M.routing_entropy(torch.eye(e)) == pytest.approx(0.0, abs=1e-12)
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # H = log2, 0 -> mean log2/log4/2
    assert M.routing_entropy(probs) == pytest.approx(0.25)
    assert M.routing_entropy(probs, mask=torch.tensor([True, False])) == pytest.approx(0.5)
    assert M.routing_entropy(probs, mask=torch.tensor([False, False])) == 0.0


# ------------------------------------------------------------------------------------------ gram
def test_gram_identity_and_all_ones():
    assert M.gram_orthogonality(torch.eye(8)) == pytest.approx(1.0)
    assert M.gram_residual(torch.eye(8)) == pytest.approx(0.0)
    ones = torch.ones(2, 2)
    assert M.gram_residual(ones) == pytest.approx(math.sqrt(2))
    assert M.gram_orthogonality(ones) == pytest.approx(0.5)
    # collapsed unit vectors at E: 1 - sqrt(1-1/E)/sqrt(2)   (analysis §8)
    assert M.gram_orthogonality(torch.ones(8, 8)) == pytest.approx(1 - math.sqrt(1 - 1 / 8) / math.sqrt(2))


@pytest.mark.parametrize("shape", [(6, 16), (16, 6), (8, 8)])
def test_projector_orthogonality(shape):
    torch.manual_seed(0)
    w = torch.empty(shape, dtype=torch.float64)
    torch.nn.init.orthogonal_(w)
    r = M.projector_orthogonality(w)
    assert r.dim() == 0 and r.dtype == torch.float32
    assert float(r) < 1e-5
    # 2·W: W Wᵀ = 4I on the small side -> residual 3·sqrt(min(shape))
    assert float(M.projector_orthogonality(2 * w)) == pytest.approx(3 * math.sqrt(min(shape)), rel=1e-5)


def test_projector_orthogonality_is_the_router_alias():
    from spectra.routers import semi_orthogonality_residual
    from spectra.routers.spectra import semi_orthogonality_residual as inner

    assert semi_orthogonality_residual is M.projector_orthogonality is inner


# ------------------------------------------------------------------------------------------ overlap
def test_expert_overlap_jaccard_hand_case():
    # tokens: 0->{0,1}, 1->{0,1}, 2->{1,2}, 3->{0,2};  T0={0,1,3}, T1={0,1,2}, T2={2,3}, T3={}
    idx = torch.tensor([[0, 1], [0, 1], [1, 2], [0, 2]])
    jac = M.expert_overlap(idx, 4)
    expected = torch.tensor([
        [1.0, 2 / 4, 1 / 4, 0.0],
        [2 / 4, 1.0, 1 / 4, 0.0],
        [1 / 4, 1 / 4, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ])
    torch.testing.assert_close(jac, expected)
    assert M.mean_expert_overlap(idx, 4) == pytest.approx(2 * (0.5 + 0.25 + 0.25) / 12)
    # masking token 3: T0={0,1}, T1={0,1,2} -> J(0,1)=2/3; T0∩T2 = {} -> 0
    jac_m = M.expert_overlap(idx, 4, mask=torch.tensor([True, True, True, False]))
    assert float(jac_m[0, 1]) == pytest.approx(2 / 3)
    assert float(jac_m[0, 2]) == pytest.approx(0.0)


def test_expert_overlap_top1_is_disjoint():
    idx = torch.tensor([0, 1, 2, 0, 1])
    assert M.mean_expert_overlap(idx, 3) == 0.0
    assert M.mean_expert_overlap(idx, 1) == 0.0


# ------------------------------------------------------------------------------------------ agreement
def test_routing_agreement():
    a = torch.tensor([[0, 1], [2, 3], [4, 5]])
    b = torch.tensor([[1, 0], [2, 5], [6, 7]])  # 2/2, 1/2, 0/2
    assert M.routing_agreement(a, b) == pytest.approx(0.5)
    assert M.routing_agreement(a, a) == pytest.approx(1.0)
    assert M.routing_agreement(a, b, mask=torch.tensor([True, True, False])) == pytest.approx(0.75)
    assert M.routing_agreement(a[:0], b[:0]) == 0.0


def test_layer_consistency():
    top1 = torch.tensor([[0, 1, 2],
                         [0, 1, 3],
                         [0, 2, 3]])  # pairs (l0,l1): 1,1,0 ; (l1,l2): 1,0,1 -> 4/6
    assert M.layer_consistency(top1) == pytest.approx(4 / 6)
    assert M.layer_consistency(top1, mask=torch.tensor([True, False, True])) == pytest.approx(3 / 4)
    assert M.layer_consistency(top1.view(3, 1, 3)) == pytest.approx(4 / 6)  # [L, B, T]
    assert M.layer_consistency(top1[:1]) == 0.0


# ------------------------------------------------------------------------------------------ layers
def test_layer_utilisation():
    e = 4
    loads = torch.tensor([
        [10.0, 10.0, 10.0, 10.0],  # util 1, entropy 1
        [10.0, 10.0, 10.0, 10.0],
        [10.0, 10.0, 10.0, 10.0],
        [20.0, 20.0, 0.0, 0.0],  # util 0.5, entropy 0.5
        [20.0, 20.0, 0.0, 0.0],
        [40.0, 0.0, 0.0, 0.0],  # util 0.25, entropy 0
    ])
    out = M.layer_utilisation(loads)
    util = torch.tensor([1, 1, 1, 0.5, 0.5, 0.25], dtype=torch.float64)
    assert out["utilisation"].tolist() == pytest.approx(util.tolist())
    assert out["layer_cv"] == pytest.approx(float(util.std(correction=0) / util.mean()))
    assert out["early_late_ratio"] == pytest.approx(1.0 / 0.375)  # first 2 layers vs last 2
    assert out["mean_layer_entropy"] == pytest.approx((3 + 0.5 + 0.5 + 0) / 6)
    assert out["layer_load_cv"][-1].item() == pytest.approx(math.sqrt(e - 1))
    balanced = M.layer_utilisation(torch.full((4, e), 5.0))
    assert (balanced["layer_cv"], balanced["early_late_ratio"], balanced["mean_layer_entropy"]) == pytest.approx(
        (0.0, 1.0, 1.0))
    empty = M.layer_utilisation(torch.zeros(3, e))
    assert (empty["layer_cv"], empty["early_late_ratio"], empty["mean_layer_entropy"]) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------ domains
def test_expert_domain_mi_independent():
    experts = torch.tensor([0, 1, 0, 1])
    domains = torch.tensor([0, 0, 1, 1])
    out = M.expert_domain_mi(experts, domains, 2, 2)
    assert out["mutual_information"] == pytest.approx(0.0, abs=1e-12)
    assert out["normalised_mi"] == pytest.approx(0.0, abs=1e-12)
    assert out["purity"] == pytest.approx(0.5)
    torch.testing.assert_close(out["affinity"], torch.ones(2, 2))
    assert out["contingency"].tolist() == [[1, 1], [1, 1]]


def test_expert_domain_mi_aligned():
    experts = torch.tensor([0, 0, 1, 1, 1, 1])
    domains = torch.tensor([1, 1, 0, 0, 0, 0])
    out = M.expert_domain_mi(experts, domains, 2, 2)
    p = torch.tensor([1 / 3, 2 / 3])
    h = float(-(p * p.log()).sum())
    assert out["mutual_information"] == pytest.approx(h)  # = H(E) = H(D)
    assert out["normalised_mi"] == pytest.approx(1.0)
    assert out["purity"] == pytest.approx(1.0)
    assert out["contingency"].tolist() == [[0, 4], [2, 0]]
    # affinity P(e|d)/P(e): d=0 -> e=1: 1/(2/3)=1.5 ; d=1 -> e=0: 1/(1/3)=3
    torch.testing.assert_close(out["affinity"], torch.tensor([[0.0, 1.5], [3.0, 0.0]]))
    balanced = M.expert_domain_mi(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1]), 2, 2)
    assert balanced["mutual_information"] == pytest.approx(math.log(2))


def test_expert_domain_mi_many_experts_unlabelled_and_empty():
    # 4 experts, 2 domains, each expert serves one domain -> MI = H(D), normalised 1; domain -1 dropped
    experts = torch.tensor([0, 1, 2, 3, 0, 2, 3])
    domains = torch.tensor([0, 0, 1, 1, 0, 1, -1])
    out = M.expert_domain_mi(experts, domains, 4, 2)
    assert out["num_tokens"] == 6
    assert out["mutual_information"] == pytest.approx(math.log(2))
    assert out["normalised_mi"] == pytest.approx(1.0)
    empty = M.expert_domain_mi(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 4, 2)
    assert (empty["mutual_information"], empty["normalised_mi"], empty["purity"]) == (0.0, 0.0, 0.0)
    assert empty["affinity"].shape == (2, 4) and float(empty["affinity"].abs().sum()) == 0.0


# ------------------------------------------------------------------------------------------ probes
def test_linear_probe_accuracy():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (240,), generator=g)
    x = torch.randn(240, 8, generator=g)
    separable = x.clone()
    separable[:, 0] += 6.0 * (2 * y.float() - 1)
    assert M.linear_probe_accuracy(separable[:160], y[:160], separable[160:], y[160:]) == 1.0
    noise = M.linear_probe_accuracy(x[:160], y[:160], x[160:], y[160:])
    assert noise < 0.75
