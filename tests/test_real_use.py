"""Issue 10: ordinary use that used to break or silently do the wrong thing.

Each test drives the library as a user would (a tiny LLaMA, upcycled; HF-style calls) and fails on the
code before the fix: padded batches, reentrant checkpointing, the Ē EMA's start, standalone blocks,
balanced causal inference, and layer-balance metrics that could not fail.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import spectra
from spectra import MoEBlock, MoEConfig, metrics

VOCAB = 96
CAUSAL_VARIANTS = [v for v in spectra.VARIANTS if MoEConfig.from_variant(v).is_causal]


def tiny_llama(variant: str = "spectra", layers: int = 2, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    k = {} if "top_k" in spectra.VARIANTS.get(variant, {}) else {"top_k": 2}  # top-1 variants keep their k
    return spectra.upcycle(model, router=variant, num_experts=4, router_dim=8, noise_std=0.1,
                           **k, **overrides).train()


def padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three sequences of lengths 12, 7 and 3, padded to 12 on the given side, with -100 labels on padding."""
    g = torch.Generator().manual_seed(1)
    lengths = (12, 7, 3)
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(12 - n, 12) if side == "left" else slice(0, n)
        ids[i, cols] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, cols] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# ------------------------------------------------------------------------------------------ 1. padding
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", list(spectra.VARIANTS))
def test_padded_batch_gives_finite_loss_and_gradients_everywhere(variant, side):
    model = tiny_llama(variant)
    ids, mask, labels = padded_batch(side)
    out = model(ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {bad[:5]}"
    emb = model.get_input_embeddings().weight.grad
    assert emb is not None and emb.abs().sum() > 0
    if spectra.routers_of(model)[0].config.router == "spectra":  # the router itself is trained by the task loss
        grads = [p.grad for p in spectra.routers_of(model)[0].parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_padding_does_not_change_the_real_tokens_routing_state():
    """A right-padded batch gives the router the same per-step statistics as the real tokens alone."""
    ids, mask, labels = padded_batch("right")
    states = []
    for padded in (True, False):
        model = tiny_llama("spectra")
        (router,) = spectra.routers_of(model)
        if padded:
            model(ids, attention_mask=mask, labels=labels)
        else:  # the same real tokens, one sequence at a time (no padding at all)
            for i in range(3):
                n = int(mask[i].sum())
                model(ids[i:i + 1, :n], labels=ids[i:i + 1, :n])
        stats = router.step_statistics(router.ctx.pop_pending())
        states.append(stats)
    torch.testing.assert_close(states[0]["ebar_tokens"], states[1]["ebar_tokens"])
    assert float(states[0]["counts"].sum()) == float(mask.sum()) * 2 * 2  # real tokens × k × layers


# ------------------------------------------------------------------------------------------ 2. reentrant
def test_reentrant_checkpointing_is_refused_with_the_fix():
    model = tiny_llama("spectra")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(3, VOCAB, (2, 8))
    with pytest.raises(spectra.ReentrantCheckpointError, match="use_reentrant': False"):
        model(ids, labels=ids)


@pytest.mark.parametrize("variant", ["spectra", "top2"])
def test_non_reentrant_checkpointing_keeps_router_loss_gradient(variant):
    model = tiny_llama(variant)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, VOCAB, (2, 8))
    out = model(ids, labels=ids)
    assert out.router_loss.requires_grad
    router = spectra.routers_of(model)[0]
    grads = torch.autograd.grad(out.router_loss, [p for p in router.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_no_grad_training_mode_call_is_not_mistaken_for_reentrant():
    model = tiny_llama("spectra")
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (2, 8)))  # e.g. a validation loss in train mode: allowed


# ------------------------------------------------------------------------------------------ 4. Ē EMA
def test_ebar_ema_is_not_dominated_by_the_first_step():
    """After t steps each step's Ē has EMA weight (1−d)·d^(t−s)/(1−d^t): the first of 60 steps ≈ 1 %."""
    cfg = MoEConfig(hidden_size=8, num_experts=4, top_k=2, router_dim=4, extra={"num_layers": 1})
    router = spectra.build_router(cfg)
    first = torch.randn(4, 4)
    later = torch.randn(4, 4)

    def record(ebar):
        return {"counts": torch.ones(4), "ebar_sum": ebar * 10, "tokens": torch.tensor([10.0]), "layer": torch.tensor(0),
                "potential": torch.zeros(4)}

    router.update_state([record(first)])
    torch.testing.assert_close(router.ebar_ema[0], torch.nn.functional.normalize(first, dim=-1))  # t = 1: exact
    for _ in range(59):
        router.update_state([record(later)])
    d = cfg.ema_decay
    w_first = (1 - d) * d ** 59 / (1 - d ** 60)
    assert w_first < 0.013
    expected = torch.nn.functional.normalize(w_first * first + (1 - w_first) * later, dim=-1)
    torch.testing.assert_close(router.ebar_ema[0], expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ 5. standalone
def test_standalone_shared_router_needs_a_slot_per_layer():
    cfg = MoEConfig(hidden_size=16, num_experts=4, top_k=2, router_dim=4)
    router = spectra.build_router(cfg)
    MoEBlock(cfg, router=router, layer_idx=0)
    with pytest.raises(ValueError, match="num_layers"):
        MoEBlock(cfg, router=router, layer_idx=1)
    shared = spectra.build_router(cfg.replace(extra={"num_layers": 2}))
    blocks = [MoEBlock(cfg, router=shared, layer_idx=i) for i in range(2)]
    x = torch.randn(2, 6, 16)
    h = blocks[1](blocks[0](x).hidden_states)
    assert torch.isfinite(h.hidden_states).all()


def test_standalone_block_never_reuses_a_previous_calls_depth_state():
    cfg = MoEConfig(hidden_size=16, num_experts=4, top_k=2, router_dim=4, extra={"num_layers": 2})
    torch.manual_seed(0)
    shared = spectra.build_router(cfg)
    b0, b1 = MoEBlock(cfg, router=shared, layer_idx=0), MoEBlock(cfg, router=shared, layer_idx=1)
    b0.eval(), b1.eval()
    x, y = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    with torch.no_grad():
        b1(b0(x).hidden_states)  # a full call on x
        alone = b1(y).hidden_states  # a new call on y that starts at layer 1: h_0 = 0, not x's layer-0 state
        shared.ctx.begin_forward()
        fresh = b1(y).hidden_states
    torch.testing.assert_close(alone, fresh, atol=0, rtol=0)


def test_standalone_block_forgets_a_previous_calls_padding_mask():
    cfg = MoEConfig.from_variant("top2", hidden_size=16, num_experts=4)
    block = MoEBlock(cfg)
    x = torch.randn(2, 6, 16)
    block(x, padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    out = block(x)  # no mask given: every token is real, whatever the previous call said
    assert int(out.stats["tokens_per_expert"].sum()) == 2 * 6 * 2


# ------------------------------------------------------------------------------------------ balanced inference
def _train_spectra(inference_bias: str, steps: int = 30) -> torch.nn.Module:
    model = tiny_llama("spectra", inference_bias=inference_bias, sinkhorn_iters=10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        ids = torch.randint(3, VOCAB // 4, (8, 16), generator=g)  # a skewed token distribution
        model(ids, labels=ids).loss.backward()
        opt.step(), opt.zero_grad()
        spectra.step_routers(model)
    return model.eval()


def test_potential_bias_is_causal_and_moves_inference_toward_training_balance():
    model = _train_spectra("potential")
    (router,) = spectra.routers_of(model)
    assert bool((router.potential_steps > 0).all())
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, VOCAB // 4, (16, 16), generator=g)
    with torch.no_grad():
        biased = torch.stack([v["tokens_per_expert"] for v in model(ids).routing_stats.values()])
        router.config.inference_bias = "none"
        plain = torch.stack([v["tokens_per_expert"] for v in model(ids).routing_stats.values()])
        router.config.inference_bias = "potential"
        # causal: a token's routing does not depend on the other tokens of the batch
        one = model(ids[:1]).routing_stats
        full = model(ids).routing_stats
    for name in one:
        torch.testing.assert_close(one[name]["topk"], full[name]["topk"][:16])
    cv_biased = sum(metrics.load_cv(row) for row in biased) / len(biased)
    cv_plain = sum(metrics.load_cv(row) for row in plain) / len(plain)
    assert not torch.equal(biased, plain)
    assert cv_biased < cv_plain


def test_potential_bias_is_a_real_option():
    with pytest.raises(spectra.ConfigError, match="inference_bias"):
        MoEConfig(inference_bias="mean")
    router = spectra.build_router(MoEConfig(hidden_size=8, num_experts=4, router_dim=4, use_sinkhorn=False))
    router.eval()
    assert not router._uses_potential()  # no Sinkhorn in training: no potentials to carry


# ------------------------------------------------------------------------------------------ metrics that can fail
def test_layer_utilisation_fails_when_one_layer_is_unbalanced():
    balanced = torch.full((8,), 100.0)
    skewed = torch.tensor([300.0, 200.0, 100.0, 60.0, 50.0, 40.0, 30.0, 20.0])  # no expert dead, badly unbalanced
    good = metrics.layer_utilisation(torch.stack([balanced] * 4))
    bad = metrics.layer_utilisation(torch.stack([balanced, balanced, skewed, skewed]))
    assert metrics.dead_expert_fraction(skewed) == 0.0
    assert good["layer_cv"] == pytest.approx(0.0) and good["early_late_ratio"] == pytest.approx(1.0)
    assert bad["layer_cv"] > 0.1  # the seed-004 target (< 0.1) is missed
    assert bad["early_late_ratio"] > 1.1


def test_gram_residual_before_any_step_is_unavailable_not_zero():
    block = MoEBlock(MoEConfig(hidden_size=16, num_experts=4, top_k=2, router_dim=4)).eval()
    with torch.no_grad():
        out = block(torch.randn(2, 5, 16))
    assert "gram_residual" not in out.stats


# ------------------------------------------------------------------------------------------ §2 ablations
@pytest.mark.parametrize("ablation", list(spectra.ABLATIONS))
def test_each_ablation_changes_the_model(ablation):
    """Same experts, same input, the ablation's router given every weight of SPECTRA's it has: its
    training-mode routing (or, for no_ortho, its losses and constraint) differs from SPECTRA's."""
    sizes = dict(hidden_size=32, num_experts=4, top_k=2, router_dim=8)
    torch.manual_seed(0)
    ref = MoEBlock(MoEConfig.from_variant("spectra", **sizes))
    abl = MoEBlock(MoEConfig.from_variant(ablation, **sizes))
    abl.experts.load_state_dict(ref.experts.state_dict())
    ref_r, abl_r = ref.router, abl.router
    with torch.no_grad():
        shared = {k: v for k, v in ref_r.state_dict().items() if k in abl_r.state_dict()
                  and abl_r.state_dict()[k].shape == v.shape}
        abl_r.load_state_dict(shared, strict=False)
        if ablation == "no_ortho":  # plain weight := SPECTRA's orthogonal one, so only the constraint differs
            abl_r.projector.weight.copy_(ref_r.projector.weight)
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.2, 3, 32)
    a, b = ref(x), abl(x)
    if ablation == "no_ortho":
        assert "ortho" in a.losses and "ortho" not in b.losses
        assert not torch.nn.utils.parametrize.is_parametrized(abl_r.projector)
        torch.testing.assert_close(a.hidden_states, b.hidden_states)  # same routing until trained
    elif ablation == "no_sinkhorn":
        assert not torch.equal(a.stats["topk"], b.stats["topk"])  # Sinkhorn changes the training selection
    else:
        assert not torch.allclose(a.hidden_states, b.hidden_states)
