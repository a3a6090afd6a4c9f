"""Running routing statistics are updated exactly once per optimizer step (method page §1.9).

Three MoE layers share one SPECTRA router; whatever the number of layers, micro-batches or activation
recomputations, ``num_updates`` counts optimizer steps and the EMAs take one step each.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import spectra

VOCAB, LAYERS = 128, 3


def model_with(router: str = "spectra", checkpointing: str = "none") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = spectra.upcycle(transformers.AutoModelForCausalLM.from_config(config), router=router, num_experts=4,
                            router_dim=8, noise_std=0.1)
    if checkpointing != "none":
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    return model.train()


def batch(seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def buffers(router) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in router.named_buffers()}


def train_step(model, opt, micro_batches: int, seed: int) -> int:
    for m in range(micro_batches):
        ids = batch(seed * 10 + m)
        (model(ids, labels=ids).loss / micro_batches).backward()
    opt.step()
    opt.zero_grad()
    return spectra.step_routers(model)


pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


@pytest.mark.parametrize("checkpointing", ["none", "non_reentrant"])
def test_shared_router_updates_once_per_step(checkpointing):
    model = model_with("spectra", checkpointing)
    (router,) = spectra.routers_of(model)
    assert all(b.router is router for b in spectra.routed_modules(model)) and len(spectra.routed_modules(model)) == 3
    calls = []
    router.register_forward_hook(lambda *_: calls.append(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    decay = router.config.ema_decay
    for step in range(1, 4):
        before = buffers(router)
        ids = batch(step)
        model(ids, labels=ids).loss.backward()
        # with checkpointing every layer's routing really ran twice (forward + recomputation)
        assert len(calls) == (1 if checkpointing == "none" else 2) * LAYERS
        calls.clear()
        records = list(router.ctx.pending.values())
        assert len(records) == LAYERS  # one per layer, not one per (re)computation
        counts = torch.stack([r["counts"] for r in records]).sum(0)
        opt.step()
        opt.zero_grad()
        assert spectra.step_routers(model) == LAYERS
        assert int(router.num_updates) == step
        expected = decay * before["load_ema"] + (1 - decay) * counts / counts.sum()
        torch.testing.assert_close(router.load_ema, expected)
        assert bool(router.ebar_ready.all())
        if step > 1:
            assert not torch.equal(router.ebar_ema, before["ebar_ema"])
    assert spectra.step_routers(model) == 0 and int(router.num_updates) == 3  # nothing pending: no update


@pytest.mark.parametrize("checkpointing", ["none", "non_reentrant"])
def test_gradient_accumulation_counts_once(checkpointing):
    model = model_with("spectra", checkpointing)
    (router,) = spectra.routers_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, 3):
        assert train_step(model, opt, micro_batches=2, seed=step) == 2 * LAYERS
        assert int(router.num_updates) == step


def test_eval_forward_does_not_change_state():
    model = model_with("spectra")
    (router,) = spectra.routers_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, 1, seed=1)
    before = buffers(router)
    model.eval()
    with torch.no_grad():
        model(batch(7))
    model(batch(8))  # eval mode with autograd on: still no record
    assert not router.ctx.pending
    assert spectra.step_routers(model) == 0
    model.train()
    with torch.no_grad():  # a no-grad training-mode forward (e.g. a validation loss) records nothing either
        model(batch(9))
    assert spectra.step_routers(model) == 0
    for k, v in buffers(router).items():
        assert torch.equal(v, before[k]), k


def test_per_layer_baseline_routers_update_once_per_step():
    model = model_with("aux_free", "non_reentrant")
    routers = spectra.routers_of(model)
    assert len(routers) == LAYERS
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, 3):
        bias = [r.expert_bias.clone() for r in routers]
        assert train_step(model, opt, micro_batches=2, seed=step) == 2 * LAYERS
        for r, b in zip(routers, bias):
            assert int(r.num_updates) == step
            moved = float((r.expert_bias - b).abs().max())
            # the bias really moves, by one update per optimizer step — not one per layer call / micro-batch
            assert 0 < moved <= r.config.bias_update_rate + 1e-9


def test_non_reentrant_checkpointing_gives_the_same_router_gradients():
    grads = {}
    for checkpointing in ("none", "non_reentrant"):
        model = model_with("spectra", checkpointing)
        ids = batch(3)
        model(ids, labels=ids).loss.backward()
        grads[checkpointing] = {k: p.grad for k, p in spectra.routers_of(model)[0].named_parameters()}
    for k, g in grads["none"].items():  # incl. the depth-recurrent cell, whose state crosses layers
        torch.testing.assert_close(grads["non_reentrant"][k], g, atol=1e-6, rtol=1e-5)
