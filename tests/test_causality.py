"""Causality of inference routing, and non-degenerate single-token decoding (method page §1.4, §1.7, §3).

Each router / SPECTRA ablation is upcycled into a tiny GPT-2 (2 MoE layers, experts perturbed so that
routing changes the output), trained for one optimizer step (so SPECTRA uses its Ē EMA at inference),
then checked in eval mode.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

import spectra
from spectra import ABLATIONS, ROUTER_NAMES

VOCAB, E = 128, 4
CAUSAL = [name for name in ROUTER_NAMES if name != "expert_choice"] + list(ABLATIONS)


@functools.lru_cache(maxsize=None)
def trained_model(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    dense = transformers.AutoModelForCausalLM.from_config(config)
    model = spectra.upcycle(dense, variant=variant, num_experts=E, router_dim=8, noise_std=0.3)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    opt.step()
    spectra.step_routers(model)
    return model.eval()


def _changed_suffix(ids: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    other = ids.clone()
    gen = torch.Generator().manual_seed(seed)
    other[:, t + 1:] = torch.randint(1, VOCAB, other[:, t + 1:].shape, generator=gen)
    return other


@pytest.mark.parametrize("variant", CAUSAL)
def test_future_tokens_do_not_change_past_logits(variant):
    model = trained_model(variant)
    assert all(r.causal for r in spectra.routers_of(model)) and spectra.moe_config_of(model).is_causal
    if variant == "spectra":
        assert bool(spectra.routers_of(model)[0].ebar_ready.all())  # inference uses the EMA, not the batch
    ids = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = model(ids).logits
        for t in (0, 5, 11):
            other = model(_changed_suffix(ids, t, seed=t)).logits
            torch.testing.assert_close(other[:, : t + 1], ref[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(other[:, t + 1:], ref[:, t + 1:])  # the change itself is visible


def test_expert_choice_is_flagged_and_really_non_causal():
    model = trained_model("expert_choice")
    router = spectra.routers_of(model)[0]
    assert router.causal is False and spectra.moe_config_of(model).is_causal is False
    ids = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(11))
    t = 5
    changed = False
    with torch.no_grad():
        ref = model(ids).logits
        for seed in range(10):
            other = model(_changed_suffix(ids, t, seed)).logits
            changed |= not torch.allclose(other[:, : t + 1], ref[:, : t + 1], atol=1e-6)
    assert changed, "expert choice should let future tokens change earlier tokens' routing"


@pytest.mark.parametrize("variant", CAUSAL)
def test_single_token_routing_is_not_uniform_and_depends_on_the_token(variant):
    model = trained_model(variant)
    probs, top1 = [], []
    with torch.no_grad():
        for token in range(1, 17):
            out = model(torch.tensor([[token]]))
            stats = out.routing_stats["transformer.h.0.mlp"]
            probs.append(stats["router_probs_mean"])
            top1.append(int(stats["topk"][0, 0]))
    probs = torch.stack(probs)
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-4)
    assert (probs - 1.0 / E).abs().amax(-1).min() > 1e-2, "single-token routing is (near) uniform"
    assert len(set(top1)) > 1, f"every token goes to expert {top1[0]}"
