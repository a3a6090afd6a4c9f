"""DVC stage `sensitivity` (``python pipeline/sensitivity.py <profile>``): how much SPECTRA's loss depends on its
hyperparameters, one factor at a time, on a reduced and stated budget (issue 12, item 1).

Around SPECTRA's default configuration (the `spectra` variant of the profile: the notes' repulsion λ = 0.5,
Sinkhorn ε = 0.05 and 3 iterations, entropy coefficient λ_ent = 0.1, method page §1.5-1.8; E and k from the profile's
`moe:`; dropless), each factor of params.yaml `profiles.<p>.sensitivity.grid` is moved alone through its values:

    repulsion_weight λ, sinkhorn_epsilon ε, sinkhorn_iters, entropy_loss_coef λ_ent, num_experts E (k fixed),
    capacity_factor (null or "dropless" = no capacity; a number = the hard cap ⌈cf·N·k/E⌉ per expert in training).

Every point is a from-scratch SPECTRA run built exactly as the `scratch` arm builds it (pipeline/experiment.py
`build_model` / `run`, arm "scratch") with one seed (`seed`, 0): the same data order, the same dense
initialisation and the same experts' draw for every point, so the points are paired. The budget is the scratch arm's
training settings with `train` overridden (fewer steps), and the loss is the mean token NLL on `eval_blocks`
domain-stratified *validation* blocks after the last step (the test split is never read). The default point is run
once more at each of `noise_seeds`: their standard deviation is the seed-to-seed noise of the default configuration,
and a point whose difference to the default, Δ = NLL(point) − NLL(default), lies within ±2·√2·SD is not
distinguishable from it at this budget (the √2: a difference of two runs; the factor 2: about 95 % under normal
noise). Three seeds estimate an SD only roughly, and pairing may make a point's own noise smaller than the band
assumes, so the band is a yardstick, not a test; one factor at a time cannot see interactions between factors.

A setting the SPECTRA router would not honour is refused before any training (`check_point`): an unknown factor,
an impossible value (E < k, ε <= 0, ...), Sinkhorn iterations while Sinkhorn is off, a capacity factor for a router
whose block applies no capacity. A profile with `sensitivity: null` writes a status file saying it did not run.

Writes results/<profile>/sensitivity/sensitivity.json (the budget, the noise yardstick, one row per factor value with
its Δ and whether it is beyond the band, the best value of each factor, every run) and runs.csv (one row per run);
each run's folder runs/<profile>/sensitivity/<key>/ (metrics.json, log.jsonl); resume points in
runs/<profile>/state/sensitivity/<key>/ (persisted: a killed stage resumes); wall times in
runs/<profile>/timing/sensitivity.json (apart from the results, which are deterministic).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (FOCUS, ParamsError, load_params, moe_config, paths, profile, stage_args,  # noqa: I001
                    timed_stage, write_json)
from experiment import Data, run

from spectra.config import ConfigError, MoEConfig  # noqa: E402
from spectra.routers import ROUTERS  # noqa: E402
from spectra_artifact.train import TrainSettings  # noqa: E402

ARM = "scratch"  #: the from-scratch arm: no base model, so no upcycling choice confounds the factors
VARIANT = FOCUS  #: SPECTRA's own configuration is the centre of the grid
#: The factors the grid may move (MoEConfig fields the SPECTRA router reads), in the order of the paper's table.
FACTORS = ("repulsion_weight", "sinkhorn_epsilon", "sinkhorn_iters", "entropy_loss_coef", "num_experts",
           "capacity_factor")
INTEGER_FACTORS = ("sinkhorn_iters", "num_experts")
DROPLESS = "dropless"  #: how params.yaml may spell capacity_factor = None
BAND_SIGMAS = 2.0  #: the noise band is ±BAND_SIGMAS·√2·SD of the default configuration over seeds
REQUIRED = ("seed", "noise_seeds", "eval_blocks", "train", "grid")
RUN_COLUMNS = ("key", "factor", "value", "seed", "val_nll", "train_tokens", "dropped_fraction")  #: runs.csv


@dataclass(frozen=True)
class Point:
    """One run of the analysis: ``factor`` None is SPECTRA's default configuration."""

    factor: str | None
    value: Any
    seed: int

    @property
    def key(self) -> str:
        """The run's folder name: ``default-s0``, ``repulsion_weight=0.25-s0``, ``capacity_factor=dropless-s0``."""
        return f"{'default' if self.factor is None else f'{self.factor}={value_label(self.value)}'}-s{self.seed}"


def value_label(value: Any) -> str:
    """A factor value as the tables write it: ``dropless`` for no capacity, numbers as short as they are exact."""
    return DROPLESS if value is None else f"{value:g}"


def section(params: dict[str, Any]) -> dict[str, Any] | None:
    """The profile's `sensitivity:` section, checked; None when the profile does not run the analysis (null)."""
    name, prof = params["profile"], profile(params)
    where = f"params.yaml: profiles.{name}.sensitivity"
    if "sensitivity" not in prof:
        raise ParamsError(f"{where} is missing; add a `sensitivity:` section (see the default profile) or "
                          "`sensitivity: null` to skip the analysis in this profile.")
    spec = prof["sensitivity"]
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ParamsError(f"{where} must be a mapping with {', '.join(REQUIRED)}, or null.")
    missing = [k for k in REQUIRED if k not in spec]
    unknown = sorted(set(spec) - set(REQUIRED))
    if missing or unknown:
        raise ParamsError(f"{where}: " + "; ".join(
            ([f"lacks {missing}"] if missing else []) + ([f"unknown key(s) {unknown}"] if unknown else []))
            + f". Its keys: {', '.join(REQUIRED)}.")
    if not all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("seed", "eval_blocks")) \
            or spec["seed"] < 0 or spec["eval_blocks"] < 1:
        raise ParamsError(f"{where}: seed must be an integer >= 0 and eval_blocks a positive integer.")
    seeds = spec["noise_seeds"]
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds) or spec["seed"] in seeds):
        raise ParamsError(f"{where}.noise_seeds={seeds!r}: must be a non-empty list of distinct seeds other than "
                          f"seed={spec['seed']} (the noise yardstick needs the default configuration at >= 2 seeds).")
    if not isinstance(spec["train"], dict) or not isinstance(spec["train"].get("steps"), int):
        raise ParamsError(f"{where}.train must override the scratch arm's training settings with at least `steps`.")
    try:
        TrainSettings(**{**prof[ARM]["train"], **spec["train"]})
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"{where}.train: {exc}") from None
    grid = spec["grid"]
    if not isinstance(grid, dict) or not grid:
        raise ParamsError(f"{where}.grid must map factors to lists of values; factors: {', '.join(FACTORS)}.")
    for factor, values in grid.items():
        if factor not in FACTORS:
            raise ParamsError(f"{where}.grid.{factor}: not a factor of the analysis; allowed: {', '.join(FACTORS)}.")
        if not isinstance(values, list) or not values:
            raise ParamsError(f"{where}.grid.{factor} must be a non-empty list of values.")
        normal = [normalise(factor, v, where) for v in values]
        if len(set(normal)) != len(normal):
            raise ParamsError(f"{where}.grid.{factor}={values!r} repeats a value; list each value once.")
    b = prof.get("base") or {}
    if any(not isinstance(b.get(k), int) for k in ("n_layer", "n_embd", "n_head")):
        raise ParamsError(f"{where}: the analysis trains from scratch and needs profiles.{name}.base.n_layer, "
                          "n_embd and n_head (a GPT-2-architecture model); set `sensitivity: null` for a profile "
                          "built on a pretrained model.")
    return spec


def normalise(factor: str, value: Any, where: str = "params.yaml") -> Any:
    """A grid value as MoEConfig takes it (``dropless``/null -> None for capacity_factor); wrong types refused."""
    if factor == "capacity_factor" and value in (None, DROPLESS):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamsError(f"{where}.grid.{factor}: {value!r} is not a number"
                          + (f" (or `{DROPLESS}`)" if factor == "capacity_factor" else "") + ".")
    if factor in INTEGER_FACTORS:
        if float(value) != int(value):
            raise ParamsError(f"{where}.grid.{factor}: {value!r} must be an integer.")
        return int(value)
    return float(value)


def default_config(params: dict[str, Any]) -> MoEConfig:
    """SPECTRA's configuration in this profile (params.yaml `moe:` + `variants.spectra` + the MoEConfig defaults)."""
    prof = profile(params)
    layers = prof["moe"]["layers"]  # as experiment.build_model counts the MoE layers of the scratch model
    return moe_config(params, VARIANT, hidden_size=prof["base"]["n_embd"],
                      num_layers=prof["base"]["n_layer"] if layers == "all" else len(layers))


def expand(params: dict[str, Any]) -> list[Point]:
    """Every run, one factor at a time: the default point once (at `seed`), each factor's other values (a value equal
    to the default is the default point, not run again), then the default point at each noise seed."""
    spec = section(params)
    if spec is None:
        return []
    where = f"params.yaml: profiles.{params['profile']}.sensitivity"
    default = default_config(params)
    points = [Point(None, None, spec["seed"])]
    for factor, values in spec["grid"].items():
        for v in (normalise(factor, v, where) for v in values):
            if v != getattr(default, factor):
                points.append(Point(factor, v, spec["seed"]))
    points += [Point(None, None, s) for s in spec["noise_seeds"]]
    for point in points:
        check_point(params, point)
    return points


def point_params(params: dict[str, Any], point: Point) -> dict[str, Any]:
    """A deep copy of ``params`` (never written back) whose `variants.spectra` carries the point's factor value, and
    whose profile's held-out curve is the analysis' evaluation set: `eval_blocks` validation blocks, one point at the
    end of training."""
    spec = section(params)
    out = copy.deepcopy(params)
    prof = profile(out)
    ev = prof["eval"]
    prof["eval"] = {**ev, "curve_blocks": spec["eval_blocks"], "curve_points": 1,
                    "routing_blocks": min(ev["routing_blocks"], spec["eval_blocks"])}
    if point.factor is not None:
        out["variants"][VARIANT] = {**(out["variants"].get(VARIANT) or {}), point.factor: point.value}
    return out


def check_point(params: dict[str, Any], point: Point) -> MoEConfig:
    """The point's MoEConfig, refused with a ParamsError when the setting is impossible or would not change what the
    SPECTRA router does (so a grid point never silently runs the default)."""
    if point.factor is None:
        return default_config(params)
    where = f"params.yaml: profiles.{params['profile']}.sensitivity.grid.{point.factor}={value_label(point.value)}"
    try:
        cfg = default_config(point_params(params, point))
    except (ConfigError, TypeError) as exc:
        raise ParamsError(f"{where}: impossible for SPECTRA: {exc}") from None
    if cfg.router != "spectra":
        raise ParamsError(f"{where}: variants.{VARIANT} routes with {cfg.router!r}; the analysis is of SPECTRA's router.")
    if getattr(cfg, point.factor) != point.value:
        raise ParamsError(f"{where}: the built configuration has {point.factor}={getattr(cfg, point.factor)!r}; "
                          "something overrides it — fix variants.spectra or the grid.")
    if point.factor == "sinkhorn_iters" and not cfg.use_sinkhorn:
        raise ParamsError(f"{where}: variants.{VARIANT} has use_sinkhorn: false, so the Sinkhorn iterations change "
                          "nothing; remove sinkhorn_iters from the grid or turn Sinkhorn on.")
    if point.factor == "capacity_factor" and point.value is not None and not ROUTERS[cfg.router].block_capacity:
        raise ParamsError(f"{where}: the MoE block applies no capacity to the {cfg.router!r} router; remove "
                          "capacity_factor from the grid.")
    return cfg


# ------------------------------------------------------------------------------------------------ the summary
def sample_sd(xs: list[float]) -> float:
    """The sample standard deviation (n − 1); nan for fewer than two values."""
    if len(xs) < 2:
        return float("nan")
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def summarise(params: dict[str, Any], runs: list[dict[str, Any]], evaluation: dict[str, Any]) -> dict[str, Any]:
    """sensitivity.json from the runs (each: RUN_COLUMNS) and the evaluation set's size (`evaluation`: block_size,
    eval_blocks, eval_tokens): the budget, the noise yardstick, one row per factor value (the default's own row in each
    factor, Δ = 0) with Δ val NLL vs the default at the same seed and whether |Δ| exceeds the band, and the best
    (lowest-loss) value of each factor."""
    spec, prof = section(params), profile(params)
    default = default_config(params)
    by_key = {r["key"]: r for r in runs}
    centre = by_key[Point(None, None, spec["seed"]).key]
    noise_runs = [centre] + [by_key[Point(None, None, s).key] for s in spec["noise_seeds"]]
    sd = sample_sd([r["val_nll"] for r in noise_runs])
    band = BAND_SIGMAS * math.sqrt(2.0) * sd
    rows, best = [], {}
    for factor, values in spec["grid"].items():
        d = getattr(default, factor)
        vals = sorted({normalise(factor, v) for v in values} | {d}, key=lambda v: (v is None, v or 0))  # dropless last
        factor_rows = []
        for v in vals:
            r = centre if v == d else by_key[Point(factor, v, spec["seed"]).key]
            delta = r["val_nll"] - centre["val_nll"]
            factor_rows.append({"factor": factor, "value": v, "label": value_label(v), "is_default": v == d,
                                "seed": r["seed"], "val_nll": r["val_nll"], "val_ppl": math.exp(r["val_nll"]),
                                "delta_val_nll": delta, "beyond_noise": bool(v != d and abs(delta) > band),
                                "train_tokens": r["train_tokens"], "dropped_fraction": r["dropped_fraction"]})
        rows += factor_rows
        top = min(factor_rows, key=lambda x: x["val_nll"])
        best[factor] = {"value": top["value"], "label": top["label"], "is_default": top["is_default"],
                        "delta_val_nll": top["delta_val_nll"], "beyond_noise": top["beyond_noise"]}
    tr = {**prof[ARM]["train"], **spec["train"]}
    return {
        "status": "run", "arm": ARM, "variant": VARIANT, "factors": list(spec["grid"]),
        "default": {f: getattr(default, f) for f in FACTORS}, "top_k": default.top_k,
        "budget": {"seed": spec["seed"], "noise_seeds": spec["noise_seeds"], "steps": tr["steps"],
                   "batch_size": tr["batch_size"], "train_tokens": centre["train_tokens"], **evaluation,
                   "eval_split": "validation", "runs": len(runs), "full_steps": prof[ARM]["train"]["steps"]},
        "noise": {"seeds": [r["seed"] for r in noise_runs], "val_nll": [r["val_nll"] for r in noise_runs], "sd": sd,
                  "band": band, "rule": f"|delta| > {BAND_SIGMAS:g} * sqrt(2) * sd: beyond the seed-to-seed noise"},
        "capacity_in_eval": default.capacity_in_eval,
        "rows": rows, "best": best,
        "runs": sorted(runs, key=lambda r: r["key"]),
    }


def not_run(params: dict[str, Any]) -> dict[str, Any]:
    return {"status": "not run in this profile", "arm": ARM, "variant": VARIANT,
            "reason": f"params.yaml: profiles.{params['profile']}.sensitivity is null"}


def mean_dropped(log_path: Path) -> float:
    """The mean over training steps and MoE layers of the fraction of token-expert assignments over capacity
    (`dropped_fraction` of the run's log.jsonl; 0 when dropless)."""
    fr = [x for line in log_path.read_text().splitlines() for x in json.loads(line).get("dropped_fraction", [])]
    return sum(fr) / len(fr) if fr else 0.0


def main(profile_name: str) -> None:
    params = load_params(profile_name)
    p = paths(params)
    out, runs_dir, state = p["results"] / "sensitivity", p["runs"] / "sensitivity", p["state"] / "sensitivity"
    for d in (out, runs_dir, state):
        d.mkdir(parents=True, exist_ok=True)  # DVC outputs even when nothing runs
    points = expand(params)  # every point checked before any training
    if not points:
        write_json(out / "sensitivity.json", not_run(params))
        write_json(p["timing"] / "sensitivity.json", {})
        (out / "runs.csv").write_text(",".join(RUN_COLUMNS) + "\n")
        print(f"sensitivity: not run in profile {profile_name} (sensitivity: null)")
        return
    spec = section(params)
    data = Data(point_params(params, points[0]))  # the evaluation set of every point (the same eval override)
    runs, times = [], {}
    for point in points:
        t0 = time.perf_counter()
        rec = run(point_params(params, point), ARM, VARIANT, point.seed, data, runs_dir / point.key, state / point.key,
                  train_overrides=spec["train"], final_eval=False)
        times[point.key] = {"wall_seconds": round(time.perf_counter() - t0, 2)}
        got = rec["moe_config"][point.factor] if point.factor else None
        if point.factor and got != point.value:
            raise RuntimeError(f"sensitivity: {point.key} ran with {point.factor}={got!r}, not {point.value!r}.")
        runs.append({"key": point.key, "factor": point.factor, "value": point.value, "seed": point.seed,
                     "val_nll": rec["curve"][-1]["val_nll"], "train_tokens": rec["train"]["tokens_seen"],
                     "dropped_fraction": mean_dropped(runs_dir / point.key / "log.jsonl")})
    block = data.meta["block_size"]
    result = summarise(params, runs, {"block_size": block, "eval_blocks": len(data.curve),
                                      "eval_tokens": len(data.curve) * (block - 1)})
    write_json(out / "sensitivity.json", result)
    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RUN_COLUMNS)
        w.writeheader()
        w.writerows({**r, "value": "" if r["factor"] is None else value_label(r["value"])} for r in result["runs"])
    write_json(p["timing"] / "sensitivity.json", times)
    moved = [f"{r['factor']}={r['label']}" for r in result["rows"] if r["beyond_noise"]]
    print(f"sensitivity: {len(runs)} runs; noise SD {result['noise']['sd']:.4f} nats, band ±{result['noise']['band']:.4f}; "
          f"beyond the band: {', '.join(moved) or 'none'}")


if __name__ == "__main__":
    (name,) = stage_args("python pipeline/sensitivity.py <profile>", 1)
    with timed_stage(name, "sensitivity"):
        main(name)
