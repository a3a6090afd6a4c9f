"""Held-out evaluation of a trained (dense or upcycled) causal LM: perplexity overall and per
domain, routing metrics on held-out text, the post-hoc expression ablation, hidden-state probes."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import metrics


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@torch.no_grad()
def perplexity(model: nn.Module, blocks: np.ndarray, domain_ids: np.ndarray, domain_names: Sequence[str],
               batch_size: int = 8) -> dict[str, Any]:
    """Token-level perplexity exp(mean NLL) over all blocks and per domain (eval mode, LM loss only)."""
    model.eval()
    nll_sum = np.zeros(len(domain_names))
    count = np.zeros(len(domain_names))
    for sl in _batches(len(blocks), batch_size):
        ids = torch.from_numpy(blocks[sl].astype(np.int64))
        logits = model(input_ids=ids).logits.float()
        nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                          reduction="none").view(ids.shape[0], -1).sum(1).numpy()
        np.add.at(nll_sum, domain_ids[sl], nll)
        np.add.at(count, domain_ids[sl], ids.shape[1] - 1)
    by_domain = {name: float(math.exp(nll_sum[i] / count[i])) for i, name in enumerate(domain_names) if count[i] > 0}
    return {"ppl": float(math.exp(nll_sum.sum() / max(1, count.sum()))), "ppl_by_domain": by_domain,
            "nll": float(nll_sum.sum() / max(1, count.sum())), "tokens": int(count.sum())}


def unigram_perplexity(train_blocks: np.ndarray, eval_blocks: np.ndarray, eval_domains: np.ndarray,
                       domain_names: Sequence[str], vocab_size: int) -> dict[str, Any]:
    """The unigram baseline (add-one smoothed token frequencies of the training blocks)."""
    freq = np.bincount(train_blocks.reshape(-1), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(freq / freq.sum())
    out = {}
    targets = eval_blocks[:, 1:]
    for i, name in enumerate(domain_names):
        sel = targets[eval_domains == i]
        if sel.size:
            out[name] = float(math.exp(-logp[sel].mean()))
    return {"ppl": float(math.exp(-logp[targets].mean())), "ppl_by_domain": out}


@torch.no_grad()
def collect_routing(model: nn.Module, blocks: np.ndarray, batch_size: int = 8, train_mode_too: bool = True) -> dict[str, Any]:
    """Eval-mode routing of every token of `blocks`, per MoE layer: top-1 expert, top-k set, loads;
    and (if `train_mode_too`) the train-mode top-k of the same tokens for the train/eval agreement."""
    from .upcycle import routers_of

    if not routers_of(model):
        return {}
    top1: dict[int, list[torch.Tensor]] = {}
    topk: dict[int, list[torch.Tensor]] = {}
    topk_train: dict[int, list[torch.Tensor]] = {}
    loads: dict[int, torch.Tensor] = {}
    for sl in _batches(len(blocks), batch_size):
        ids = torch.from_numpy(blocks[sl].astype(np.int64))
        model.eval()
        out = model(input_ids=ids)
        for layer, s in out.routing_stats.items():
            loads[layer] = loads.get(layer, 0) + s["tokens_per_expert"]
            if "topk" in s:
                top1.setdefault(layer, []).append(s["topk"][:, 0])
                topk.setdefault(layer, []).append(s["topk"])
        if train_mode_too:
            model.train()
            out = model(input_ids=ids)
            for layer, s in out.routing_stats.items():
                if "topk" in s:
                    topk_train.setdefault(layer, []).append(s["topk"])
            for r in routers_of(model):
                r.ctx.pending.clear()  # an analysis pass is not an optimizer step
    model.eval()
    layers = sorted(loads)
    result = {
        "layers": layers,
        "loads": torch.stack([loads[l] for l in layers]) if layers else torch.zeros(0),
        "top1": torch.stack([torch.cat(top1[l]) for l in layers]) if top1 else None,
        "topk": {l: torch.cat(topk[l]) for l in topk},
    }
    if topk_train:
        result["topk_train"] = {l: torch.cat(topk_train[l]) for l in topk_train}
    return result


def routing_summary(routing: dict[str, Any], block_domains: np.ndarray, block_size: int, num_domains: int) -> dict[str, Any]:
    """The method page §5 routing metrics from `collect_routing` output (means over MoE layers)."""
    if not routing:
        return {}
    loads = routing["loads"]
    per_layer = [metrics.summarise_load(l) for l in loads]
    out: dict[str, Any] = {k: float(np.mean([p[k] for p in per_layer])) for k in per_layer[0]}
    out["per_layer"] = per_layer
    out.update({f"layer_{k}": v for k, v in metrics.layer_utilisation(loads).items() if not torch.is_tensor(v)})
    if routing["top1"] is not None:
        top1 = routing["top1"]
        token_domains = torch.from_numpy(np.repeat(block_domains, block_size).astype(np.int64))
        e = loads.shape[1]
        mi = [metrics.expert_domain_mi(t, token_domains, e, num_domains) for t in top1]
        out["expert_domain_mi"] = float(np.mean([m["mutual_information"] for m in mi]))
        out["expert_domain_nmi"] = float(np.mean([m["normalised_mi"] for m in mi]))
        out["expert_purity"] = float(np.mean([m["purity"] for m in mi]))
        out["affinity"] = [m["affinity"].tolist() for m in mi]
        out["layer_consistency"] = metrics.layer_consistency(top1.view(top1.shape[0], -1, block_size)) if top1.shape[0] > 1 else float("nan")
        out["expert_overlap"] = float(np.mean([metrics.mean_expert_overlap(routing["topk"][l], e) for l in routing["topk"]]))
    if "topk_train" in routing:
        out["train_eval_agreement"] = float(np.mean([
            metrics.routing_agreement(routing["topk_train"][l], routing["topk"][l]) for l in routing["topk_train"]]))
    return out


def router_geometry(model: nn.Module) -> dict[str, Any]:
    """Gram orthogonality (both forms, from the inference EMA of Ē) and projector orthogonality of
    SPECTRA routers; empty for routers without them."""
    from .routers import SpectraRouter
    from .upcycle import routers_of

    out: dict[str, Any] = {}
    for r in routers_of(model):
        if not isinstance(r, SpectraRouter):
            continue
        ready = r.ebar_ready.nonzero().flatten().tolist()
        grams = [r.ebar_ema[i] @ r.ebar_ema[i].t() for i in ready]
        if grams:
            out["gram_orthogonality"] = float(np.mean([metrics.gram_orthogonality(g) for g in grams]))
            out["gram_residual"] = float(np.mean([metrics.gram_residual(g) for g in grams]))
        w = r.projector_weight()
        if w is not None:
            out["projector_orthogonality"] = float(metrics.projector_orthogonality(w))
    return out


@torch.no_grad()
def hidden_features(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 128,
                    batch_size: int = 16, layer: int = -1) -> np.ndarray:
    """Mean-pooled hidden states of `layer` for each text (features for linear probes)."""
    model.eval()
    feats = []
    for sl in _batches(len(texts), batch_size):
        enc = tokenizer(list(texts[sl]), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        h = out.hidden_states[layer].float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        feats.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).numpy())
    return np.concatenate(feats)
