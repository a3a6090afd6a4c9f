import pytest
import torch

from spectra.sinkhorn import log_sinkhorn


def _cost(n=64, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, e, generator=g) * 2 - 1


def test_marginals_converge_with_enough_iterations():
    res = log_sinkhorn(_cost(), epsilon=0.05, iters=200)
    assert res.row_error < 1e-3
    assert res.col_error < 1e-3
    n, e = res.plan.shape
    assert torch.allclose(res.plan.sum(0), torch.full((e,), n / e), rtol=1e-3)


def test_marginal_error_falls_with_iterations():
    cost = _cost(seed=1)
    errors = [max(float(r.row_error), float(r.col_error))
              for r in (log_sinkhorn(cost, 0.05, it) for it in (1, 3, 10, 30))]
    assert errors[0] > errors[1] > errors[2] > errors[3]


def test_sign_low_cost_gets_high_mass():
    # token 0 is very similar (low cost) to expert 3; other tokens spread evenly.
    n, e = 16, 4
    cost = torch.zeros(n, e)
    cost[0] = 1.0
    cost[0, 3] = -1.0
    plan = log_sinkhorn(cost, epsilon=0.05, iters=10).plan
    assert int(plan[0].argmax()) == 3
    assert plan[0, 3] > 0.9


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_finite_for_extreme_costs(scale):
    cost = _cost() * scale
    res = log_sinkhorn(cost, epsilon=0.05, iters=5)
    assert torch.isfinite(res.plan).all()
    assert torch.isfinite(res.log_plan).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_for_low_precision_inputs(dtype):
    cost = _cost().to(dtype).requires_grad_()
    res = log_sinkhorn(cost, epsilon=0.05, iters=3)
    assert res.plan.dtype == torch.float32
    assert torch.isfinite(res.plan).all()
    res.plan[:, 0].sum().backward()
    assert torch.isfinite(cost.grad).all()


def test_padding_excluded_from_marginals():
    cost = _cost(n=20, e=4)
    mask = torch.ones(20, dtype=torch.bool)
    mask[15:] = False
    res = log_sinkhorn(cost, epsilon=0.05, iters=300, mask=mask)
    assert torch.all(res.plan[15:] == 0)
    # columns sum to N_valid / E = 15 / 4, not 20 / 4
    assert torch.allclose(res.plan.sum(0), torch.full((4,), 15 / 4), rtol=1e-3)
    # same plan as running on the valid rows alone
    alone = log_sinkhorn(cost[:15], epsilon=0.05, iters=300)
    assert torch.allclose(res.plan[:15], alone.plan, atol=1e-6)


def test_all_padding_returns_zero_plan():
    res = log_sinkhorn(_cost(n=5, e=3), 0.05, 3, mask=torch.zeros(5, dtype=torch.bool))
    assert torch.all(res.plan == 0)


def test_gradients_flow_through_iterations():
    cost = _cost().requires_grad_()
    res = log_sinkhorn(cost, epsilon=0.05, iters=3)
    (res.plan * torch.randn_like(res.plan)).sum().backward()
    assert cost.grad is not None and cost.grad.abs().sum() > 0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        log_sinkhorn(_cost(), epsilon=0.0, iters=3)
    with pytest.raises(ValueError, match="tokens, experts"):
        log_sinkhorn(torch.zeros(3), epsilon=0.1, iters=3)
