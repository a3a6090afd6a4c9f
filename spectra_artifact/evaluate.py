"""Held-out evaluation of a trained (dense or upcycled) causal LM: perplexity overall and per
domain, routing metrics on held-out text, the post-hoc expression ablation, hidden-state probes.

Every analysis of token blocks goes through `block_forward`: one eval-mode forward per block under
``torch.inference_mode`` in large batches, whose per-block results — the summed next-token NLL, the
mean of every hidden state, each MoE layer's eval-mode top-k, the MLP inputs — are kept per model and
reused by the next analysis of the same blocks (`perplexity` and `collect_routing` in the train stage;
`spectra_artifact.analysis.block_features`, `capture_mlp_inputs` and `expert_outputs` in notebook 04). The cache
is exact: it is keyed by the block's tokens and by the model's parameters and buffers (storage and
in-place version counter, so a training step or a reload invalidates it), and it is bypassed when a
block's result depends on the other blocks of its batch (a non-causal router such as expert choice,
or an active expression-ablation override).
"""

from __future__ import annotations

import inspect
import itertools
import math
import weakref
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from spectra import metrics

#: Default size of the evaluation forwards: tokens per forward, and the most memory the fp32 logits of
#: one forward may take when every position's logits are needed (perplexity). Measured on the 2-core
#: CPU (default model, 128-token blocks, eval forward time relative to batch 8): batch 16 0.68-0.77,
#: 32 0.56-0.67, 64 0.51-0.60 — larger batches amortise the per-call overhead and use larger GEMMs.
EVAL_TOKENS = 8192
EVAL_LOGITS_BYTES = 256 * 2**20


def default_batch(model: nn.Module, seq_len: int, full_logits: bool) -> int:
    """Blocks per evaluation forward: `EVAL_TOKENS` tokens, and with `full_logits` at most
    `EVAL_LOGITS_BYTES` of fp32 logits (vocabulary from the model's config or output embeddings)."""
    batch = max(1, EVAL_TOKENS // max(1, seq_len))
    if full_logits:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
            vocab = model.get_output_embeddings().weight.shape[0]
        if vocab:
            batch = min(batch, max(1, EVAL_LOGITS_BYTES // (4 * seq_len * int(vocab))))
    return batch


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


# ---------------------------------------------------------------------------------------------- forwards
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


def _model_state(model: nn.Module) -> tuple | None:
    """What the model computes, as a hashable key (parameter and buffer storage + version counters), or
    None when per-block results must not be cached (a block's result depends on its batch)."""
    from spectra.upcycle import routers_of

    routers = routers_of(model)
    if any(not r.causal or r.ctx.expression_override for r in routers):
        return None
    configs = tuple(r.config.to_json_string() for r in routers)  # e.g. inference_bias changes the routing
    return configs + tuple((t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


def _row_cache(model: nn.Module) -> dict[tuple, dict[str, Any]] | None:
    state = _model_state(model)
    if state is None:
        return None
    entry = _CACHE.get(model)
    if entry is None or entry["state"] != state:
        entry = {"state": state, "rows": {}}
        _CACHE[model] = entry
    return entry["rows"]


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget the cached per-block results of `model` (of every model when None)."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """The MLP (or upcycled MoE) module of every decoder layer, in depth order."""
    from spectra.upcycle import find_decoder_layers, find_mlp

    _, stack = find_decoder_layers(model, "mlp")
    out = []
    for layer in stack:
        hit = find_mlp(layer)
        if hit is None:
            raise ValueError(f"no MLP found in decoder layer {type(layer).__name__}")
        out.append(hit[1])
    return out


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _row_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each row [B] (fp32)."""
    logits = logits.float()
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="none").view(ids.shape[0], -1).sum(1)


def block_forward(model: nn.Module, blocks: np.ndarray, batch_size: int | None = None, *, nll: bool = False,
                  mlp_inputs: bool = False, use_cache: bool = True
                  ) -> tuple[list[dict[str, Any]], list[dict[str, dict[str, torch.Tensor]]]]:
    """Eval-mode results of every block (row of `blocks` [B, T]), from the cache where possible.

    Returns ``(rows, batch_stats)``: per block a dict with ``means`` [L+1, D] (the mean over positions of
    every hidden state, embeddings first), ``topk`` {MoE layer name: [T, k]} (routed models whose router
    reports a top-k and dropped no assignment), ``nll`` (summed next-token NLL, with `nll`) and
    ``mlp_in`` [decoder layers][T, D] (the MLP inputs, with `mlp_inputs`); and the model's routing
    statistics of each batch that was actually run (all of them, in order, when nothing was cached).
    Only missing blocks are run, `batch_size` at a time, under ``torch.inference_mode``; the logits are
    restricted to the last position when the NLL is not needed (``logits_to_keep``). ``use_cache=False``
    runs every block (and stores nothing)."""
    if batch_size is None:
        batch_size = default_batch(model, blocks.shape[-1], full_logits=nll)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1 (blocks per forward).")
    cache = _row_cache(model) if use_cache else None
    keys = [(row.dtype.str, row.shape[0], row.tobytes()) for row in np.ascontiguousarray(blocks)]
    need = {"means"} | ({"nll"} if nll else set()) | ({"mlp_in"} if mlp_inputs else set())
    found: dict[int, dict[str, Any]] = {}
    missing = []
    for i, key in enumerate(keys):
        hit = cache.get(key) if cache is not None else None
        if hit is not None and need <= hit.keys():
            found[i] = hit
        else:
            missing.append(i)
    batch_stats: list[dict[str, dict[str, torch.Tensor]]] = []
    if missing:
        mods = mlp_modules(model) if mlp_inputs else []
        captured: list[torch.Tensor | None] = [None] * len(mods)

        def hook(i: int):
            def fn(module, args, output):
                captured[i] = args[0]
            return fn

        hooks = [m.register_forward_hook(hook(i)) for i, m in enumerate(mods)]
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if not nll and _accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for sl in _batches(len(missing), batch_size):
                    idx = missing[sl]
                    ids = torch.from_numpy(np.ascontiguousarray(blocks[idx]).astype(np.int64))
                    out = model(input_ids=ids, **kwargs)
                    means = torch.stack([h.float().mean(1) for h in out.hidden_states], 1)  # [B, L+1, D]
                    row_nll = _row_nll(out.logits, ids) if nll else None
                    stats = getattr(out, "routing_stats", None) or {}
                    batch_stats.append(stats)
                    topk = _rows_topk(stats, ids.shape)
                    for j, i in enumerate(idx):
                        rec = dict(cache.get(keys[i], {})) if cache is not None else {}
                        rec["means"] = means[j]
                        if topk is not None:
                            rec["topk"] = {name: t[j] for name, t in topk.items()}
                        if row_nll is not None:
                            rec["nll"] = float(row_nll[j])
                        if mlp_inputs:
                            rec["mlp_in"] = [c.reshape(ids.shape[0], ids.shape[1], -1)[j] for c in captured]
                        found[i] = rec
                        if cache is not None:
                            cache[keys[i]] = rec
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
    return [found[i] for i in range(len(keys))], batch_stats


def _rows_topk(stats: dict[str, dict[str, torch.Tensor]], shape: torch.Size) -> dict[str, torch.Tensor] | None:
    """Each MoE layer's top-k as [B, T, k], or None when a layer has none or dropped assignments (then
    its loads are not the top-k counts and only the batch statistics are exact)."""
    out = {}
    for name, s in stats.items():
        topk = s.get("topk")
        if topk is None or topk.shape[0] != shape[0] * shape[1]:
            return None
        if not torch.equal(torch.bincount(topk.reshape(-1), minlength=s["tokens_per_expert"].numel()).to(
                s["tokens_per_expert"]), s["tokens_per_expert"]):
            return None
        out[name] = topk.reshape(shape[0], shape[1], -1)
    return out


def perplexity(model: nn.Module, blocks: np.ndarray, domain_ids: np.ndarray, domain_names: Sequence[str],
               batch_size: int | None = None) -> dict[str, Any]:
    """Token-level perplexity exp(mean NLL) over all blocks and per domain (eval mode, LM loss only)."""
    rows, _ = block_forward(model, blocks, batch_size, nll=True)
    nll_sum = np.zeros(len(domain_names))
    count = np.zeros(len(domain_names))
    np.add.at(nll_sum, domain_ids, np.asarray([r["nll"] for r in rows], dtype=np.float32))
    np.add.at(count, domain_ids, blocks.shape[1] - 1)
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


def collect_routing(model: nn.Module, blocks: np.ndarray, batch_size: int | None = None,
                    train_mode_too: bool = True) -> dict[str, Any]:
    """Eval-mode routing of every token of `blocks`, per MoE layer (in depth order): top-1 expert, top-k
    set, loads; and (if `train_mode_too`) the train-mode top-k of the same tokens for the train/eval
    agreement. The eval-mode pass reuses `block_forward`'s cached forwards (e.g. of `perplexity` on a
    superset of the blocks); the train-mode pass records no routing state (not an optimizer step)."""
    from spectra.upcycle import routers_of

    if not routers_of(model):
        return {}
    batch_size = batch_size or default_batch(model, blocks.shape[-1], full_logits=False)
    rows, batch_stats = block_forward(model, blocks, batch_size)
    if rows and all("topk" in r for r in rows):  # loads = the top-k counts (checked per batch)
        layers = list(rows[0]["topk"])
        topk = {l: torch.cat([r["topk"][l] for r in rows]) for l in layers}
        e = max(r.num_experts for r in routers_of(model))
        loads = {l: torch.bincount(topk[l].reshape(-1), minlength=e).float() for l in layers}
    else:  # no top-k (expert choice) or dropped assignments: sum the batch statistics (all batches ran)
        layers = list(batch_stats[0]) if batch_stats else []
        loads = {l: sum(s[l]["tokens_per_expert"] for s in batch_stats) for l in layers}
        topk = {l: torch.cat([s[l]["topk"] for s in batch_stats]) for l in layers
                if all("topk" in s[l] for s in batch_stats)}
    topk_train: dict[str, list[torch.Tensor]] = {}
    # the train/eval agreement is only a measurement where training routes by another rule (§5)
    train_mode_too = train_mode_too and any(r.train_rule_differs for r in routers_of(model))
    if train_mode_too:
        was_training = model.training
        model.train()
        try:
            with torch.inference_mode():
                for sl in _batches(len(blocks), batch_size):
                    out = model(input_ids=torch.from_numpy(blocks[sl].astype(np.int64)))
                    for layer, s in out.routing_stats.items():
                        if "topk" in s:
                            topk_train.setdefault(layer, []).append(s["topk"])
                    for r in routers_of(model):
                        r.ctx.pending.clear()  # an analysis pass is not an optimizer step
        finally:
            model.train(was_training)
    model.eval()
    result = {
        "layers": layers,
        "loads": torch.stack([loads[l] for l in layers]) if layers else torch.zeros(0),
        "top1": torch.stack([topk[l][:, 0] for l in layers]) if layers and len(topk) == len(layers) else None,
        "topk": topk,
    }
    if topk_train:
        result["topk_train"] = {l: torch.cat(v) for l, v in topk_train.items()}
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
    from spectra.routers import SpectraRouter
    from spectra.upcycle import routers_of

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


def hidden_features(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 128,
                    batch_size: int | None = None, layer: int = -1) -> np.ndarray:
    """Mean-pooled hidden states of `layer` for each text (features for linear probes): one layer of
    `hidden_features_at`."""
    return hidden_features_at(model, tokenizer, texts, [layer], max_length, batch_size)[layer]


def hidden_features_at(model: nn.Module, tokenizer: Any, texts: Sequence[str], layers: Sequence[int],
                       max_length: int = 128, batch_size: int | None = None) -> dict[int, np.ndarray]:
    """{layer: mean-pooled hidden states [len(texts), D]} of every index in `layers` (0 the embeddings, -1 the
    last), all from one forward per batch.

    One tokenisation of all texts; the forwards run under ``torch.inference_mode``, on texts batched
    by length (less padding; each text's features do not depend on its batch-mates in a causal model,
    so the order is restored afterwards — kept as given for non-causal routers), logits of the last
    position only."""
    from spectra.upcycle import routers_of

    texts, layers = list(texts), list(dict.fromkeys(int(x) for x in layers))
    if not texts:
        return {x: np.zeros((0, 0), np.float32) for x in layers}
    batch_size = batch_size or default_batch(model, max_length, full_logits=False)
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in enc["input_ids"]]
    causal = all(r.causal for r in routers_of(model))
    order = sorted(range(len(texts)), key=lambda i: lengths[i]) if causal else list(range(len(texts)))
    kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    was_training = model.training
    model.eval()
    feats: dict[int, list[np.ndarray]] = {x: [] for x in layers}
    try:
        with torch.inference_mode():
            for sl in _batches(len(order), batch_size):
                ids, mask = _pad([enc["input_ids"][i] for i in order[sl]], tokenizer)
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
                m = mask.unsqueeze(-1).float()
                for x in layers:
                    h = out.hidden_states[x].float()
                    feats[x].append(((h * m).sum(1) / m.sum(1).clamp_min(1)).numpy())
    finally:
        model.train(was_training)
    result = {}
    for x in layers:
        got = np.concatenate(feats[x])
        restored = np.empty_like(got)
        restored[np.asarray(order)] = got
        result[x] = restored
    return result


def _pad(seqs: list[list[int]], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, max len] of token-id lists, padded with the tokenizer's pad token
    on its padding side (what ``tokenizer(..., padding=True)`` gives)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("hidden_features needs a tokenizer with a pad token (set tokenizer.pad_token, e.g. to "
                         "tokenizer.eos_token; spectra_artifact.analysis.text_features does).")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for i, s in enumerate(seqs):
        if s:
            (ids[i, width - len(s):] if left else ids[i, :len(s)]).copy_(torch.tensor(s, dtype=torch.long))
            (mask[i, width - len(s):] if left else mask[i, :len(s)]).fill_(1)
    return ids, mask
