"""DVC stages `scratch@<variant>` and `upcycle@<variant>` (``python pipeline/train_group.py <profile> <arm> <variant>``): every seed
of one variant in one arm (README 'Experiment', pipeline/experiment.py).

Writes runs/<profile>/<arm>/<variant>/s<seed>/ for each seed (`seeds_of`: `seeds`, or `focus_seeds` for SPECTRA);
seed 0 keeps its model/. Resume points live in runs/<profile>/state/<arm>-<variant>/s<seed>/ (persisted), wall
times in runs/<profile>/timing/<arm>-<variant>.json. A variant the profile does not enable gets a folder with a
`status.json` saying so, and nothing else.
"""

from __future__ import annotations

import json

from common import (ParamsError, load_params, paths, run_enabled, seeds_of, stage_args, timed_stage,  # noqa: I001
                    write_json)
from experiment import Data, run


def upcycle_choice(params: dict) -> dict:
    """The symmetry breaking and learning rate the `upcycle_sweep` stage picked for the upcycling arm."""
    path = paths(params)["results"] / "upcycle_sweep" / "sweep.json"
    return json.loads(path.read_text())["choice"]


def main(profile_name: str, arm: str, variant: str) -> None:
    params = load_params(profile_name)
    if variant not in params["arms"].get(arm, []):
        raise ParamsError(f"variant {variant!r} is not in arms.{arm} of params.yaml "
                          f"({', '.join(params['arms'].get(arm, [])) or 'unknown arm'}).")
    key = f"{arm}-{variant}"
    p = paths(params)
    out = p["runs"] / arm / variant
    out.mkdir(parents=True, exist_ok=True)
    (p["state"] / key).mkdir(parents=True, exist_ok=True)  # DVC outputs even when nothing runs
    timing = p["timing"] / f"{key}.json"
    if not run_enabled(params, arm, variant):
        write_json(out / "status.json", {"arm": arm, "variant": variant, "status": "not run in this profile"})
        write_json(timing, {})
        return
    if timing.exists():
        timing.unlink()  # this build's wall times only
    symmetry, overrides = None, None
    if arm == "upcycle":
        choice = upcycle_choice(params)
        symmetry, overrides = choice["symmetry"], {"lr": choice["lr"], "expert_lr": choice["lr"]}
    data = Data(params)
    seeds = seeds_of(params, arm, variant)
    write_json(out / "status.json", {"arm": arm, "variant": variant, "status": "trained", "seeds": seeds,
                                     "symmetry": symmetry, "train_overrides": overrides})
    for seed in seeds:
        run(params, arm, variant, seed, data, out / f"s{seed}", p["state"] / key / f"s{seed}",
            timing, symmetry=symmetry, train_overrides=overrides, save_model=seed == 0)


if __name__ == "__main__":
    name, arm_, variant_ = stage_args("python pipeline/train_group.py <profile> <arm> <variant>", 3)
    with timed_stage(name, f"{arm_}@{variant_}"):
        main(name, arm_, variant_)
