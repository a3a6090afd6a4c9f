"""How the experiment's power and MDE grow with training length: a measurement for choosing a profile's budget.

Issue 11 asks for power >= 5 (control gap / seed std) and an MDE <= 0.5 % perplexity (SPECTRA vs the strongest
baseline) and says to choose tokens per run, seeds and model size to get there. This script measures the two
figures as a function of training steps, on a profile's own tokenized data, for a few variants of either
arm, so that a budget is chosen from a measurement instead of a guess:

* each (variant, seed) is one run of `pipeline/experiment.run` (the pipeline's code: same model, same paired
  seeds, same data order) with `--steps` steps of the arm's schedule and `--points` held-out evaluations
  (`curve_blocks` validation blocks; the schedule's own cosine decay ends at `--steps`, so the earlier points are
  losses *during* a longer run, not the ends of shorter runs; only the last point is a finished run);
* at every point: each variant's mean and seed std; the power figure of `spectra_artifact.stats.experiment_power`
  (`--control` against the best of the other variants that are learned routers: the gap over the pooled seed std,
  the figure the paper prints) and, beside it, the same gap over the std of the per-seed paired differences
  (``paired_power``, the standardised effect a paired test sees; not the paper's figure); and for each pair
  `--pair A,B` the paired difference (mean, std) and its MDE (`stats.minimum_detectable_effect`, % perplexity)
  at the n seeds run;
* the training loss (`lm_loss` of the run's log, mean of the `TRAIN_WINDOW` steps up to each point) beside the
  held-out loss, which tells slow optimisation (both high) from a train/inference mismatch (train low, held-out
  high); `--moe KEY=VALUE` sets a MoEConfig field on every MoE variant, to probe one factor at a longer budget;
* wall seconds per run, from which ``arm_minutes`` = mean seconds per run x (`--arm-runs`, the runs one arm of the
  profile makes) / 60 — what a profile with that many steps would spend on that arm.

Nothing here is a pipeline output: the paper's numbers come from `dvc repro`. The JSON and the printed table are
for the person sizing a profile (the closing note of issue 11 quotes them).

    python scripts/power_probe.py default --steps 512 --points 8 --variants top2,random_router \\
        --seeds 0,1,2 --out /tmp/power_probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))

from common import is_dense, load_params, moe_config, paths, profile  # noqa: E402
import experiment  # noqa: E402

from spectra.config import ConfigError, MoEConfig  # noqa: E402
from spectra_artifact import stats  # noqa: E402
from spectra_artifact.analysis import is_learned_router  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", help="a profile of params.yaml whose data/<profile>/tokens exists (`dvc repro tokenize`)")
    p.add_argument("--arm", choices=("scratch", "upcycle"), default="scratch")
    p.add_argument("--variants", default="top2,random_router", help="comma-separated variants of the arm")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated paired seeds")
    p.add_argument("--steps", type=int, default=512, help="training steps of each run (the schedule's length)")
    p.add_argument("--points", type=int, default=8, help="held-out evaluations, evenly spaced, the last at --steps")
    p.add_argument("--batch-size", type=int, default=None, help="override the arm's batch size")
    p.add_argument("--symmetry", default=None, metavar="noise:STD|drop:FRACTION",
                   help="upcycling arm: the symmetry breaking (default: the upcycle_sweep stage's choice)")
    p.add_argument("--lr", type=float, default=None,
                   help="upcycling arm: lr and expert_lr (default: the upcycle_sweep stage's choice)")
    p.add_argument("--control", default="random_router", help="the routing control of the power figure")
    p.add_argument("--pair", action="append", default=[], metavar="A,B",
                   help="paired difference B - A whose MDE is reported (repeatable), e.g. spectra,hash")
    p.add_argument("--arm-runs", type=int, default=None,
                   help="runs of one arm for the cost estimate (default: the profile's runs of --arm)")
    p.add_argument("--moe", action="append", default=[], metavar="KEY=VALUE",
                   help="set a MoEConfig field on every MoE variant (repeatable; VALUE read as YAML), "
                        "e.g. sinkhorn_epsilon=0.2")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    return p.parse_args(argv)


TRAIN_WINDOW = 16  # training steps averaged into the training loss reported at each curve point


def moe_overrides(items: list[str]) -> dict:
    """`--moe KEY=VALUE` arguments as MoEConfig overrides; a malformed item or an unknown field is refused."""
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"power_probe: --moe {item!r}: use KEY=VALUE with KEY a MoEConfig field "
                             f"({', '.join(sorted(known))}).")
        out[key] = yaml.safe_load(value)
    return out


def apply_moe_overrides(params: dict, variants: list[str], moe_set: dict) -> None:
    """Put `moe_set` into every MoE variant's params.yaml entry, each checked by the pipeline's own `moe_config`
    (MoEConfig's validation), so that a bad value is refused before anything trains."""
    routed = [v for v in variants if not is_dense(params, v)]
    if not routed:
        raise SystemExit(f"power_probe: --moe has no MoE variant to apply to (--variants {', '.join(variants)}).")
    for v in routed:
        params["variants"][v] = {**(params["variants"].get(v) or {}), **moe_set}
        try:
            moe_config(params, v, hidden_size=0)  # 0 = taken from the model when it is built
        except ConfigError as err:
            raise SystemExit(f"power_probe: --moe for variant {v!r}: {err}") from None


def train_curve(log: list[dict], steps: list[int], window: int = TRAIN_WINDOW) -> list[float]:
    """Mean training `lm_loss` over the `window` optimizer steps ending at each of `steps`."""
    losses = {r["step"]: r["lm_loss"] for r in log if "lm_loss" in r}
    return [sum(w) / len(w) if (w := [losses[t] for t in range(s - window + 1, s + 1) if t in losses]) else math.nan
            for s in steps]


def arm_runs(params: dict, arm: str = "scratch") -> int:
    """Runs of one arm of the profile: `seeds` per enabled variant, `focus_seeds` for SPECTRA and one baseline."""
    prof = profile(params)
    enabled = prof["enabled"][arm]
    variants = params["arms"][arm] if enabled == "all" else enabled
    seeds, focus = prof[arm]["seeds"], prof[arm]["focus_seeds"]
    return len(variants) * seeds + 2 * max(0, focus - seeds)


def upcycle_setting(params: dict, symmetry: str | None, lr: float | None) -> tuple[dict, dict]:
    """The upcycling arm's symmetry breaking and learning rate: the arguments, else the upcycle_sweep's choice."""
    if symmetry is None or lr is None:
        sweep = paths(params)["results"] / "upcycle_sweep" / "sweep.json"
        if not sweep.exists():
            raise SystemExit(f"power_probe: --arm upcycle needs --symmetry and --lr, or {sweep} "
                             "(run `python pipeline/repro.py <profile> repro upcycle_sweep`).")
        choice = json.loads(sweep.read_text())["choice"]
        sym, rate = choice["symmetry"], choice["lr"]
    if symmetry is not None:
        method, _, value = symmetry.partition(":")
        if method not in ("noise", "drop") or not value:
            raise SystemExit(f"power_probe: --symmetry {symmetry!r}: use noise:STD or drop:FRACTION.")
        sym = {"method": method, ("noise_std" if method == "noise" else "fraction"): float(value)}
    rate = lr if lr is not None else rate
    return sym, {"lr": rate, "expert_lr": rate}


def summarise(curves: dict[str, dict[int, list[float]]], steps: list[int], control: str,
              pairs: list[tuple[str, str]]) -> list[dict]:
    """Per evaluation step: per-variant mean / std, the power figure and each pair's paired MDE."""
    rows = []
    for i, step in enumerate(steps):
        at = {v: {s: c[i] for s, c in by_seed.items()} for v, by_seed in curves.items()}
        row: dict = {"step": step, "variants": {}}
        for v, by_seed in at.items():
            m = stats.mean_ci(list(by_seed.values()))
            row["variants"][v] = {"mean": m["mean"], "std": m["std"]}
        learned = [v for v in at if v != control and is_learned_router(v)]
        if control in at and learned:
            best = min(learned, key=lambda v: row["variants"][v]["mean"])
            pw = stats.experiment_power(list(at[control].values()), list(at[best].values()))
            d = stats.paired_difference(at[best], at[control])  # control − best per seed
            paired = d["mean"] / d["std"] if d["n"] >= 2 and d["std"] > 0 else math.nan
            row["power"] = {"best": best, **pw, "paired_std": d["std"], "paired_power": paired}
        row["pairs"] = {}
        for a, b in pairs:
            if a in at and b in at:
                d = stats.paired_difference(at[a], at[b])
                mde = stats.minimum_detectable_effect(d["std"], d["n"]) if d["n"] >= 2 else math.nan
                row["pairs"][f"{b}-{a}"] = {"mean": d["mean"], "std": d["std"], "n": d["n"],
                                            "mde_ppl_pct": stats.mde_ppl_pct(mde)}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    params = load_params(args.profile)
    prof = profile(params)
    variants = [v for v in args.variants.split(",") if v]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    pairs = [tuple(p.split(",")) for p in args.pair]
    unknown = [v for v in variants + [x for p in pairs for x in p] if v not in params["variants"]]
    if unknown:
        raise SystemExit(f"power_probe: unknown variant(s) {', '.join(sorted(set(unknown)))}; "
                         f"choose from variants: in params.yaml ({', '.join(params['variants'])}).")
    moe_set = moe_overrides(args.moe)
    if moe_set:
        apply_moe_overrides(params, variants, moe_set)
    arm = args.arm
    prof[arm]["train"].update(steps=args.steps)
    if args.batch_size:
        prof[arm]["train"].update(batch_size=args.batch_size)
    extra = {}
    if arm == "upcycle":
        sym, overrides = upcycle_setting(params, args.symmetry, args.lr)
        extra = {"symmetry": sym, "train_overrides": overrides}
    prof["eval"].update(curve_points=args.points)
    data = experiment.Data(params)
    curves: dict[str, dict[int, list[float]]] = {}
    train_curves: dict[str, dict[int, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    steps: list[int] = []
    for v in variants:
        for s in seeds:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
                rec = experiment.run(params, arm, v, s, data, Path(d) / "run", Path(d) / "state",
                                     final_eval=False, **extra)
                log = [json.loads(line) for line in (Path(d) / "run" / "log.jsonl").read_text().splitlines()]
            seconds.setdefault(v, []).append(time.perf_counter() - t0)
            steps = [c["step"] for c in rec["curve"]]
            curves.setdefault(v, {})[s] = [c["val_nll"] for c in rec["curve"]]
            train_curves.setdefault(v, {})[s] = train_curve(log, steps)
            print(json.dumps({"variant": v, "seed": s, "val_nll": [round(x, 4) for x in curves[v][s]],
                              "train_nll": [round(x, 4) for x in train_curves[v][s]],
                              "seconds": round(seconds[v][-1], 1)}), flush=True)
    rows = summarise(curves, steps, args.control, pairs)
    n_runs = args.arm_runs or arm_runs(params, arm)
    per_run = sum(sum(x) for x in seconds.values()) / sum(len(x) for x in seconds.values())
    result = {"profile": args.profile, "arm": arm, "vocab_size": data.meta["vocab_size"],
              "train": {**prof[arm]["train"], **extra.get("train_overrides", {})}, "symmetry": extra.get("symmetry"),
              "moe_overrides": moe_set,
              "seeds": seeds, "variants": variants, "dense_variants": [v for v in variants if is_dense(params, v)],
              "curve_blocks": prof["eval"]["curve_blocks"],
              "curves": {v: {str(s): c for s, c in by.items()} for v, by in curves.items()}, "steps": steps,
              "train_curves": {v: {str(s): c for s, c in by.items()} for v, by in train_curves.items()},
              "rows": rows, "seconds_per_run": per_run, "arm_runs": n_runs, "arm_minutes": per_run * n_runs / 60}
    print(f"\n{args.profile}, {arm} arm: vocab {result['vocab_size']}, {args.steps} steps x batch "
          f"{prof[arm]['train']['batch_size']}, seeds {seeds}; {per_run:.0f} s per run -> "
          f"{result['arm_minutes']:.0f} min for the arm's {n_runs} runs")
    for r in rows:
        parts = [f"step {r['step']:>4}"] + [f"{v} {x['mean']:.3f}±{x['std']:.3f}" for v, x in r["variants"].items()]
        if "power" in r:
            parts.append(f"power {r['power']['power']:.2f} (gap {r['power']['gap']:.4f} vs {r['power']['best']}; "
                         f"paired {r['power']['paired_power']:.2f})")
        parts += [f"MDE {k} {x['mde_ppl_pct']:.2f}%" for k, x in r["pairs"].items()]
        print("  ".join(parts))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
