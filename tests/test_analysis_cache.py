"""`spectra_artifact.evaluate.block_forward`: the analyses that share one forward per block give what separate
plain forwards give, reuse it only while it is valid, and keep the depth order of MoE layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectra.upcycle import expression_ablation, routed_modules, step_routers, upcycle
from spectra_artifact import analysis as A
from spectra_artifact import evaluate as E

V, T = 50, 8


def _model(router: str | None = "spectra", n_layer: int = 2, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=n_layer, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if router is not None:
        upcycle(model, router=router, num_experts=4, top_k=kw.pop("top_k", 2), router_dim=4, noise_std=0.1, **kw)
        model.train()
        with torch.no_grad():  # running state as after training (Ē EMA, potentials)
            model(input_ids=torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(1)))
        step_routers(model)
    E.clear_cache()
    return model.eval()


def _blocks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (n, T))


def _count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def _plain_nll(model, blocks):
    with torch.no_grad():
        ids = torch.from_numpy(blocks.astype(np.int64))
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1),
                                                 reduction="none").view(len(blocks), -1).sum(1)


def test_perplexity_equals_a_plain_forward_and_a_second_call_runs_no_forward():
    model = _model()
    blocks, doms = _blocks(6), np.array([0, 1, 0, 1, 1, 0])
    calls = _count_forwards(model)
    res = E.perplexity(model, blocks, doms, ["a", "b"], batch_size=4)
    nll = _plain_nll(model, blocks).double()
    assert res["nll"] == pytest.approx(float(nll.sum() / (6 * (T - 1))), rel=1e-5)
    assert res["ppl_by_domain"]["a"] == pytest.approx(float(torch.exp(nll[doms == 0].sum() / (3 * (T - 1)))), rel=1e-5)
    before = calls[0]
    again = E.perplexity(model, blocks, doms, ["a", "b"], batch_size=4)
    assert calls[0] == before and again == res


def test_collect_routing_reuses_the_perplexity_forward_and_matches_the_batch_statistics():
    model = _model()
    blocks = _blocks(6)
    E.perplexity(model, blocks, np.zeros(6, int), ["a"])
    calls = _count_forwards(model)
    got = E.collect_routing(model, blocks[:4], train_mode_too=False)
    assert calls[0] == 0  # the eval-mode routing of these blocks came from the perplexity forward
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(blocks[:4].astype(np.int64)))
    names = [b.moe_name for b in routed_modules(model)]
    assert got["layers"] == names
    for i, n in enumerate(names):
        assert torch.equal(got["topk"][n], out.routing_stats[n]["topk"])
        assert torch.equal(got["loads"][i], out.routing_stats[n]["tokens_per_expert"])
        assert torch.equal(got["top1"][i], out.routing_stats[n]["topk"][:, 0])


def test_collect_routing_keeps_the_depth_order_of_ten_or_more_moe_layers():
    """Layer names sort as text ("h.10" before "h.2"); the layers must stay in depth order."""
    model = _model(n_layer=11)
    got = E.collect_routing(model, _blocks(2), train_mode_too=False)
    assert got["layers"] == [b.moe_name for b in routed_modules(model)]
    assert got["layers"][2].endswith("h.2.mlp") and got["layers"][10].endswith("h.10.mlp")


def test_block_features_then_capture_of_a_subset_runs_no_new_forward_and_equals_hooks():
    model = _model()
    blocks = _blocks(7)
    feats = A.block_features(model, blocks, batch_size=3)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(blocks.astype(np.int64)), output_hidden_states=True)
    np.testing.assert_allclose(feats, out.hidden_states[-1].mean(1).numpy(), rtol=1e-5, atol=1e-6)
    calls = _count_forwards(model)
    sub = blocks[[5, 1, 2]]
    inputs = A.capture_mlp_inputs(model, sub)
    assert calls[0] == 0
    store = []
    hooks = [m.register_forward_hook(lambda mod, a, o: store.append(a[0].reshape(-1, 16))) for m in A.mlp_modules(model)]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(sub.astype(np.int64)))
    for h in hooks:
        h.remove()
    for got, ref in zip(inputs, store):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert not torch.is_inference(got)  # usable in autograd afterwards (notebook 01 trains a router on them)


def test_a_changed_model_is_not_served_from_the_cache():
    model = _model()
    blocks = _blocks(3)
    first = E.perplexity(model, blocks, np.zeros(3, int), ["a"])["nll"]
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # in place, as an optimizer step
    second = E.perplexity(model, blocks, np.zeros(3, int), ["a"])["nll"]
    assert second != first
    assert second == pytest.approx(float(_plain_nll(model, blocks).double().sum() / (3 * (T - 1))), rel=1e-5)


def test_batch_dependent_results_bypass_the_cache():
    """Expert choice (non-causal) and the batch-mean expression ablation depend on the batch."""
    ec = _model("expert_choice", capacity_factor=1.0)
    calls = _count_forwards(ec)
    blocks = _blocks(4)
    E.perplexity(ec, blocks, np.zeros(4, int), ["a"])
    n = calls[0]
    E.perplexity(ec, blocks, np.zeros(4, int), ["a"])
    assert calls[0] == 2 * n
    model = _model()
    plain = E.perplexity(model, blocks, np.zeros(4, int), ["a"])["nll"]
    with expression_ablation(model):
        ablated = E.perplexity(model, blocks, np.zeros(4, int), ["a"], batch_size=4)["nll"]
        with torch.no_grad():
            ref = _plain_nll(model, blocks).double().sum() / (4 * (T - 1))
    assert ablated != plain and ablated == pytest.approx(float(ref), rel=1e-5)
    assert E.perplexity(model, blocks, np.zeros(4, int), ["a"])["nll"] == plain


def test_expert_outputs_are_per_domain_means_of_each_expert():
    model = _model()
    blocks, doms = _blocks(4), np.array([0, 0, 2, 2])
    reps = A.expert_outputs(model, blocks, doms, num_domains=3)
    x = A.capture_mlp_inputs(model, blocks)[1]
    moe = routed_modules(model)[1].moe
    with torch.no_grad():
        y = moe.experts[3](x[:2 * T])  # expert 3 on the tokens of domain 0
    np.testing.assert_allclose(reps[1, 3, 0], y.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert np.isnan(reps[:, :, 1]).all()


def test_hidden_features_batched_by_length_equal_one_text_at_a_time():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i for i in range(26)} | {"<pad>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    texts = ["a b c d e f", "b", "c d e", "z y x w v u t s r", "m n"]
    model = _model()
    got = E.hidden_features(model, tokenizer, texts, max_length=T, batch_size=2)
    for i, text in enumerate(texts):
        ref = E.hidden_features(model, tokenizer, [text], max_length=T, batch_size=1)[0]
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pad token"):
        E.hidden_features(model, PreTrainedTokenizerFast(tokenizer_object=tok), texts)
    every = E.hidden_features_at(model, tokenizer, texts, [0, 1, -1], max_length=T, batch_size=2)  # one forward
    assert sorted(every) == [-1, 0, 1]
    for layer in (0, 1, -1):
        np.testing.assert_array_equal(every[layer], E.hidden_features(model, tokenizer, texts, max_length=T,
                                                                      batch_size=2, layer=layer))
    assert not np.allclose(every[0], every[-1])
