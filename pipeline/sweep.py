"""DVC stage `upcycle_sweep` (``python pipeline/sweep.py <profile>``): how the upcycling arm breaks the experts'
symmetry, and at which learning rate it continues training — chosen by a measurement, not by hand.

A small grid (params.yaml `profiles.<p>.upcycle.sweep`): symmetry-breaking methods (none: identical copies; noise;
Drop-Upcycling with a fraction r of each expert's units re-initialised, arXiv 2502.19261) x learning rates, for
one router (`top2` in the default profile: a baseline, so the choice does not favour SPECTRA) and one seed, on a
shortened run. The pick is the lowest final held-out loss on the validation curve blocks (never the test split).
Writes results/<profile>/upcycle_sweep/sweep.json: every point and the choice, which every run of the upcycling
arm reads.
"""

from __future__ import annotations

from common import load_params, paths, profile, stage_args, timed_stage, write_json  # noqa: I001
from experiment import Data, run


def label(symmetry: dict) -> str:
    m = symmetry["method"]
    return {"none": "none", "noise": f"noise σ={symmetry.get('noise_std')}",
            "drop": f"drop r={symmetry.get('fraction')}"}.get(m, m)


def main(profile_name: str) -> None:
    params = load_params(profile_name)
    prof, p = profile(params), paths(params)
    sweep = prof["upcycle"]["sweep"]
    data = Data(params)
    points = []
    for symmetry in sweep["methods"]:
        for lr in sweep["lrs"]:
            key = f"{label(symmetry).replace(' ', '_').replace('σ=', '')}-lr{lr:g}"
            rec = run(params, "upcycle", sweep["variant"], sweep["seed"], data, p["runs"] / "sweep" / key,
                      p["state"] / "sweep" / key, symmetry=dict(symmetry),
                      train_overrides={"lr": lr, "expert_lr": lr, "steps": sweep["steps"]}, final_eval=False)
            points.append({"key": key, "symmetry": dict(symmetry), "label": label(symmetry), "lr": lr,
                           "curve": rec["curve"], "final_val_nll": rec["curve"][-1]["val_nll"]})
    best = min(points, key=lambda q: q["final_val_nll"])
    write_json(p["results"] / "upcycle_sweep" / "sweep.json", {
        "variant": sweep["variant"], "seed": sweep["seed"], "steps": sweep["steps"], "points": points,
        "choice": {"symmetry": best["symmetry"], "label": best["label"], "lr": best["lr"],
                   "final_val_nll": best["final_val_nll"]}})
    print(f"upcycle_sweep: chose {best['label']} at lr {best['lr']:g} (val nll {best['final_val_nll']:.4f})")


if __name__ == "__main__":
    (name,) = stage_args("python pipeline/sweep.py <profile>", 1)
    with timed_stage(name, "upcycle_sweep"):
        main(name)
