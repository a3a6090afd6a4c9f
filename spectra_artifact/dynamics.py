"""Routing dynamics, Gram geometry and layer-wise balance — the new analyses of notebook 04.

Three analyses the design notes ask for (``shared/seeds``, Korean), each a set of pure functions plus one table
builder that the notebook calls:

* **Routing dynamics** (seed 002 §3.1 "Routing Dynamics": does routing converge, does it oscillate, how fast;
  §7.1 "Routing stability: routing change during training"). Every MoE run records, at each held-out curve
  point, the eval-mode top-1 expert of a *fixed* token set and the per-expert loads (``dynamics.npz``: ``steps``
  [P], ``top1`` [P, L, N], ``loads`` [P, L, E]; pipeline/experiment.py). From consecutive points: the top-1 flip
  rate (`flip_rate`), Kendall's τ of the loads (`load_tau`), and the first point after which the flip rate stays
  below a threshold (`stable_step`).
* **Gram geometry** (seed 002 §1.3 "Representation Capacity": effective dimension, rank, ``log det`` of the Gram
  matrix; §2.3 "Gram Matrix as Geometric Object": eigenvalue spectrum, condition number as the "flatness" of the
  space). For a PSD matrix: `spectrum`, `condition_number`, `effective_rank` = exp(H(λ/Σλ)), `log_det`. Applied
  to SPECTRA's router Gram ``G = Ē Ēᵀ`` (docs/spectra-method.md §1.4: Ē the row-normalised mean expression per
  expert, its per-layer EMA at inference — `router_grams`) and to the cosine-similarity matrix of the experts'
  mean outputs (`output_similarity`, from `spectra_artifact.analysis.expert_outputs`).
* **Layer-wise balance** (seed 004 §2 "Layer-wise Load Balancing"): the three metrics `spectra.metrics.
  layer_utilisation` defines, judged against the seed note's marks (`LAYER_BALANCE_TARGETS`).

Inputs are the pipeline's run records (`spectra_artifact.analysis.load_runs`); tables are pandas DataFrames.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

NAN = float("nan")
STABILITY_THRESHOLD = 0.05  #: default flip rate under which routing counts as stable (5 % of the fixed tokens)


# =============================================================================================== routing dynamics
def read_dynamics(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """A run's ``dynamics.npz``: ``steps`` [P], ``top1`` [P, L, N], ``loads`` [P, L, E] (empty arrays when the
    router has no per-token top-1, e.g. expert choice)."""
    path = Path(run_dir) / "dynamics.npz"
    if not path.exists():
        raise FileNotFoundError(f"required input {path} does not exist: the train stage of this MoE run writes it "
                                "(rerun the run's `scratch@<variant>` / `upcycle@<variant>` stage).")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def flip_rate(before: np.ndarray, after: np.ndarray) -> float:
    """Fraction of tokens whose top-1 expert differs between two snapshots, averaged over MoE layers.

    `before`, `after`: top-1 expert ids ``[L, N]`` (or ``[N]`` for one layer) of the same tokens. 0 = routing
    unchanged, 1 = every token moved; NaN when there are no tokens."""
    a, b = np.asarray(before), np.asarray(after)
    if a.shape != b.shape:
        raise ValueError(f"flip_rate: the snapshots have shapes {a.shape} and {b.shape}; they must hold the top-1 "
                         "experts of the same tokens at the same layers.")
    if a.size == 0:
        return NAN
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean([(x != y).mean() for x, y in zip(a, b)]))


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b between two vectors (ties handled as in ``scipy.stats.kendalltau``): 1 = same order,
    −1 = reversed. NaN when either vector is constant (the order is undefined) or shorter than 2."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau: vectors of lengths {x.size} and {y.size}; they must have the same length.")
    if x.size < 2:
        return NAN
    i, j = np.triu_indices(x.size, k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    pairs = len(i)
    tied_x, tied_y = int((dx == 0).sum()), int((dy == 0).sum())
    denom = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return float((dx * dy).sum() / denom) if denom > 0 else NAN


def load_tau(before: np.ndarray, after: np.ndarray) -> float:
    """Kendall's τ-b of the per-expert loads of two snapshots (``[L, E]`` or ``[E]``), averaged over the layers
    where it is defined: 1 = the experts' ranking by load is unchanged. NaN when undefined at every layer."""
    a, b = np.atleast_2d(np.asarray(before, np.float64)), np.atleast_2d(np.asarray(after, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"load_tau: loads of shapes {a.shape} and {b.shape}; they must be [L, E] of the same model.")
    taus = [kendall_tau(x, y) for x, y in zip(a, b)]
    taus = [t for t in taus if np.isfinite(t)]
    return float(np.mean(taus)) if taus else NAN


def stable_step(steps: Sequence[int], flips: Sequence[float], threshold: float = STABILITY_THRESHOLD) -> int | None:
    """The first curve point after which routing stays stable: the earliest ``steps[p]`` such that every flip rate
    from point p on (``flips[p:]``, ``flips[i]`` between ``steps[i]`` and ``steps[i + 1]``) is below `threshold`.

    None when the last transition is at or above the threshold (not stable by the end of training — the last
    point alone is no evidence of stability) or when there is no transition (< 2 points)."""
    steps, flips = list(steps), list(flips)
    if len(flips) != len(steps) - 1:
        raise ValueError(f"stable_step: {len(steps)} curve points need {len(steps) - 1} flip rates, got {len(flips)}.")
    stable = None
    for p in range(len(flips) - 1, -1, -1):  # walk back from the end while the flips stay below the threshold
        if not (np.isfinite(flips[p]) and flips[p] < threshold):
            break
        stable = int(steps[p])
    return stable


def run_dynamics(dyn: dict[str, np.ndarray], threshold: float = STABILITY_THRESHOLD) -> dict[str, Any]:
    """Routing dynamics of one run from its ``dynamics.npz`` (`read_dynamics`): per transition between consecutive
    curve points (``step_from``, ``step_to``, ``flip_rate``, ``load_tau``) and the run's `stable_step`.
    A run without per-token top-1 records (expert choice) gets no transitions and a ``note``."""
    steps = [int(s) for s in np.asarray(dyn.get("steps", np.zeros(0))).ravel()]
    top1, loads = np.asarray(dyn.get("top1", np.zeros((0, 0, 0)))), np.asarray(dyn.get("loads", np.zeros((0, 0, 0))))
    if not steps or top1.size == 0:
        return {"steps": steps, "transitions": [], "stable_step": None, "threshold": threshold,
                "note": "no per-token top-1 records (the router has no per-token top-1, e.g. expert choice)"}
    trans = [{"step_from": steps[p], "step_to": steps[p + 1], "flip_rate": flip_rate(top1[p], top1[p + 1]),
              "load_tau": load_tau(loads[p], loads[p + 1]) if loads.size else NAN} for p in range(len(steps) - 1)]
    note = "" if len(steps) > 1 else "one curve point: no transition"
    return {"steps": steps, "transitions": trans, "threshold": threshold, "note": note,
            "stable_step": stable_step(steps, [t["flip_rate"] for t in trans], threshold)}


def dynamics_frames(runs: Sequence[dict[str, Any]], threshold: float = STABILITY_THRESHOLD):
    """``(curve, per_run)`` DataFrames of every MoE run in `runs` (records of `spectra_artifact.analysis.load_runs`;
    dense runs, which have no dynamics.npz, are skipped).

    * curve: one row per (run, transition): arm, variant, seed, run, step_from, step_to, flip_rate, load_tau;
    * per_run: arm, variant, seed, run, points, curve_steps, flip_rate_mean / _last, load_tau_mean / _last,
      stable_step (NaN = not stable by the end), stable_fraction (stable_step / last curve step), threshold, note.
    """
    import pandas as pd

    curve, rows = [], []
    for m in runs:
        if not m.get("moe_config"):
            continue
        d = run_dynamics(read_dynamics(m["_dir"]), threshold)
        key = {"arm": m.get("arm"), "variant": m["variant"], "seed": int(m["seed"]), "run": m["run"]}
        curve += [{**key, **t} for t in d["transitions"]]
        flips = [t["flip_rate"] for t in d["transitions"]]
        taus = [t["load_tau"] for t in d["transitions"]]
        st = d["stable_step"]
        note = d["note"]
        if m.get("dynamics_steps_missing"):  # a resumed run: snapshots before its checkpoint were not recorded
            note = "; ".join(filter(None, [note, f"no snapshot at steps {m['dynamics_steps_missing']} (resumed run)"]))
        rows.append({**key, "points": len(d["steps"]), "curve_steps": " ".join(map(str, d["steps"])),
                     "flip_rate_mean": float(np.nanmean(flips)) if flips else NAN,
                     "flip_rate_last": flips[-1] if flips else NAN,
                     "load_tau_mean": float(np.nanmean(taus)) if taus and np.isfinite(taus).any() else NAN,
                     "load_tau_last": taus[-1] if taus else NAN,
                     "stable_step": float(st) if st is not None else NAN,
                     "stable_fraction": st / d["steps"][-1] if st is not None else NAN,
                     "threshold": threshold, "note": note})
    return pd.DataFrame(curve), pd.DataFrame(rows)


def dynamics_by_variant(per_run, labels: dict[str, str] | None = None):
    """Per (arm, variant): mean ± std over seeds of the per-run dynamics (`dynamics_frames`), with n (runs with
    transitions), n_stable (runs whose routing became stable), stable_step_mean over those runs, the threshold and
    the curve steps."""
    import pandas as pd

    labels = labels or {}
    rows = []
    if len(per_run) == 0:
        return pd.DataFrame(rows)
    for (arm, variant), sub in per_run.groupby(["arm", "variant"], sort=False):
        has = sub[sub["points"] > 1]
        row: dict[str, Any] = {"arm": arm, "variant": variant, "label": labels.get(variant, variant), "n": len(has),
                               "seeds": " ".join(str(s) for s in sorted(has["seed"]))}
        for col in ("flip_rate_mean", "flip_rate_last", "load_tau_mean", "load_tau_last"):
            v = has[col].to_numpy(np.float64)
            v = v[np.isfinite(v)]
            row[col] = float(v.mean()) if v.size else NAN
            row[f"{col}_std"] = float(v.std(ddof=1)) if v.size > 1 else NAN
        st = has["stable_step"].to_numpy(np.float64)
        row["n_stable"] = int(np.isfinite(st).sum())
        row["stable_step_mean"] = float(np.nanmean(st)) if np.isfinite(st).any() else NAN
        row["stable_fraction_mean"] = float(np.nanmean(has["stable_fraction"])) if np.isfinite(st).any() else NAN
        row["threshold"] = float(sub["threshold"].iloc[0])
        row["curve_steps"] = sub["curve_steps"].iloc[0]
        row["note"] = "; ".join(sorted({n for n in sub["note"] if n}))
        rows.append(row)
    return pd.DataFrame(rows)


# =============================================================================================== Gram geometry
def spectrum(matrix: np.ndarray | torch.Tensor) -> np.ndarray:
    """Eigenvalues (descending) of the symmetric part of a PSD matrix, rounding negatives clipped to 0."""
    g = np.asarray(matrix.detach().cpu() if torch.is_tensor(matrix) else matrix, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"spectrum: expected a square matrix, got shape {g.shape}.")
    return np.clip(np.linalg.eigvalsh((g + g.T) / 2)[::-1], 0.0, None)


def condition_number(matrix: np.ndarray | torch.Tensor, rtol: float = 1e-12) -> float:
    """λ_max / λ_min; +inf when λ_min ≤ rtol·λ_max (singular: the experts span fewer than E directions)."""
    lam = spectrum(matrix)
    if lam.size == 0 or lam[0] <= 0:
        return NAN
    return float(lam[0] / lam[-1]) if lam[-1] > rtol * lam[0] else math.inf


def effective_rank(matrix: np.ndarray | torch.Tensor) -> float:
    """exp(H(λ/Σλ)) (Roy & Vetterli 2007): between 1 (one direction) and E (all eigenvalues equal, e.g. G = I)."""
    lam = spectrum(matrix)
    total = lam.sum()
    if total <= 0:
        return NAN
    p = lam[lam > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def log_det(matrix: np.ndarray | torch.Tensor) -> float:
    """log det = Σ log λ (the notes' "information capacity"; 0 for G = I, −inf when singular)."""
    lam = spectrum(matrix)
    return float(np.log(lam).sum()) if (lam > 0).all() else -math.inf


def matrix_geometry(matrix: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """The four Gram-geometry quantities of one matrix: eigenvalues (descending list), condition_number,
    effective_rank, log_det."""
    return {"eigenvalues": spectrum(matrix).tolist(), "condition_number": condition_number(matrix),
            "effective_rank": effective_rank(matrix), "log_det": log_det(matrix)}


def router_grams(model: nn.Module) -> list[np.ndarray | None]:
    """SPECTRA's inference Gram matrix ``G = Ē Ēᵀ`` [E, E] of every MoE layer (depth order): Ē is the router's
    per-layer EMA ``ebar_ema`` (docs/spectra-method.md §1.4, the matrix `spectra_artifact.evaluate.router_geometry`
    measures). None for a layer whose EMA has had no optimizer step; [] for a model without SPECTRA routers."""
    from spectra.routers import SpectraRouter
    from spectra.upcycle import routers_of

    out: list[np.ndarray | None] = []
    for r in routers_of(model):
        if not isinstance(r, SpectraRouter):
            continue
        for layer in range(r.num_layers):
            if not bool(r.ebar_ready[layer]):
                out.append(None)
                continue
            ebar = r.ebar_ema[layer].detach().to(torch.float64)
            out.append((ebar @ ebar.t()).numpy())
    return out


def output_similarity(reps: np.ndarray) -> list[np.ndarray]:
    """Per MoE layer, the cosine-similarity (Gram) matrix [E, E] of the experts' mean outputs: each expert's
    output averaged over the domains present (`spectra_artifact.analysis.expert_outputs` gives [L, E, domains, D]), rows
    L2-normalised. Unit diagonal like the router's G; all ones when the experts compute the same function."""
    out = []
    for layer in np.asarray(reps, np.float64):
        mean = np.nanmean(layer, axis=1)  # [E, D]
        unit = mean / np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None)
        out.append(unit @ unit.T)
    return out


def geometry_rows(key: dict[str, Any], matrix_name: str, matrices: Sequence[np.ndarray | None]) -> list[dict[str, Any]]:
    """One row per layer of `matrices` (None entries skipped): `key` columns, matrix, layer, condition_number,
    effective_rank, effective_rank_fraction (/E), log_det and the eigenvalues as eig_0 … eig_{E−1} (descending)."""
    rows = []
    for layer, g in enumerate(matrices):
        if g is None:
            continue
        geo = matrix_geometry(g)
        lam = geo.pop("eigenvalues")
        rows.append({**key, "matrix": matrix_name, "layer": layer, **geo,
                     "effective_rank_fraction": geo["effective_rank"] / len(lam),
                     **{f"eig_{i}": v for i, v in enumerate(lam)}})
    return rows


# =============================================================================================== layer-wise balance
#: Seed 004 §2 marks for the three layer-balance metrics (`spectra.metrics.layer_utilisation`): the note's
#: "좋은 값" (good value) is the target (``target`` / ``good_if``: met or not met), its "나쁜 값" (bad value) the
#: imbalance mark (``bad`` / ``bad_if``); a value between the two is "intermediate". ``source``: its metrics.json path.
LAYER_BALANCE_TARGETS: dict[str, dict[str, Any]] = {
    "layer_cv": {"source": ("routing", "layer_layer_cv"), "target": "< 0.1", "bad": "> 0.3",
                 "good_if": lambda v: v < 0.1, "bad_if": lambda v: v > 0.3},
    "early_late_ratio": {"source": ("routing", "layer_early_late_ratio"), "target": "0.9 to 1.1",
                         "bad": "< 0.7 or > 1.3",
                         "good_if": lambda v: 0.9 <= v <= 1.1, "bad_if": lambda v: v < 0.7 or v > 1.3},
    "mean_layer_entropy": {"source": ("routing", "layer_mean_layer_entropy"), "target": "> 0.8", "bad": "< 0.5",
                           "good_if": lambda v: v > 0.8, "bad_if": lambda v: v < 0.5},
}


def rate_layer_balance(metric: str, value: float | None) -> tuple[bool, str]:
    """``(met, rating)`` of one layer-balance value against `LAYER_BALANCE_TARGETS`: met = inside the seed's good
    range; rating "good", "intermediate" (between the good and the bad marks), "bad" or "n/a" (NaN / None)."""
    if metric not in LAYER_BALANCE_TARGETS:
        raise KeyError(f"unknown layer-balance metric {metric!r}; one of {', '.join(LAYER_BALANCE_TARGETS)}.")
    if value is None or not np.isfinite(value):
        return False, "n/a"
    spec = LAYER_BALANCE_TARGETS[metric]
    if spec["good_if"](value):
        return True, "good"
    return False, "bad" if spec["bad_if"](value) else "intermediate"


def layer_balance_table(runs: Sequence[dict[str, Any]], labels: dict[str, str] | None = None):
    """Per (arm, variant) of the MoE runs in `runs`: mean ± std over seeds of the layer utilisation CV, the
    early/late utilisation ratio and the mean layer entropy (metrics.json ``routing.layer_*``, from
    `spectra.metrics.layer_utilisation`), each with the seed-004 target, whether the seed mean meets it
    (``<metric>_met``) and its rating; ``all_met`` when all three do; ``num_layers`` (for L < 3 the early/late
    ratio compares the first with the last layer)."""
    import pandas as pd

    labels = labels or {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in runs:
        if m.get("moe_config") and isinstance(m.get("routing"), dict) and m["routing"]:
            groups.setdefault((m.get("arm"), m["variant"]), []).append(m)
    rows = []
    for (arm, variant), ms in groups.items():
        row: dict[str, Any] = {"arm": arm, "variant": variant, "label": labels.get(variant, variant), "n": len(ms),
                               "seeds": " ".join(str(int(m["seed"])) for m in sorted(ms, key=lambda m: m["seed"])),
                               "num_layers": len(ms[0]["routing"].get("per_layer") or [])}
        mets = []
        for metric, spec in LAYER_BALANCE_TARGETS.items():
            sec, key = spec["source"]
            v = np.asarray([float(m[sec].get(key, NAN)) for m in ms], np.float64)
            v = v[np.isfinite(v)]
            mean = float(v.mean()) if v.size else NAN
            met, rating = rate_layer_balance(metric, mean)
            row.update({f"{metric}_mean": mean, f"{metric}_std": float(v.std(ddof=1)) if v.size > 1 else NAN,
                        f"{metric}_target": spec["target"], f"{metric}_bad": spec["bad"], f"{metric}_met": met,
                        f"{metric}_rating": rating})
            mets.append(met)
        row["all_met"] = all(mets)
        rows.append(row)
    return pd.DataFrame(rows)
