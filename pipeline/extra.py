"""DVC stages `extra_scratch`, `extra_upcycle` (``python pipeline/extra.py <profile> <arm>``): the extra seeds of the arm's strongest
baseline, so that SPECTRA and it both have `focus_seeds` seeds (README 'Experiment').

The strongest baseline is the causal MoE baseline (not dense, not the routing control, not expert choice, which
looks at future tokens) with the lowest mean final *validation* loss over its first `seeds` seeds — the rule
`spectra_artifact.analysis.comparison` uses to name the strongest baseline of a table — chosen on validation, so
the test numbers of the tables are not used to pick what they compare. Writes
runs/<profile>/extra/<arm>/<variant>/s<seed>/ and runs/<profile>/extra/<arm>/choice.json.
"""

from __future__ import annotations

import json

from common import (enabled_variants, is_dense, load_params, paths, profile, stage_args, timed_stage,  # noqa: I001
                    write_json)
from experiment import Data, run
from train_group import upcycle_choice

from spectra.config import BASELINES, CONTROLS, MoEConfig  # noqa: E402


def strongest_baseline(params: dict, arm: str) -> tuple[str | None, dict[str, float]]:
    """(name, {baseline: mean validation nll}) of the arm's enabled, trained MoE baselines."""
    p = paths(params)
    means = {}
    for v in enabled_variants(params, arm):
        if v not in BASELINES or v in CONTROLS or is_dense(params, v) or not MoEConfig.from_variant(v).is_causal:
            continue  # a router that sees future tokens (expert choice) is never the strongest baseline
        runs = sorted((p["runs"] / arm / v).glob("s*/metrics.json"))
        nll = [json.loads(r.read_text())["validation"]["nll"] for r in runs]
        if nll:
            means[v] = sum(nll) / len(nll)
    return (min(means, key=means.get) if means else None), means


def main(profile_name: str, arm: str) -> None:
    params = load_params(profile_name)
    prof, p = profile(params), paths(params)
    out = p["runs"] / "extra" / arm
    out.mkdir(parents=True, exist_ok=True)
    (p["state"] / "extra" / arm).mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing runs
    best, means = strongest_baseline(params, arm)
    seeds = list(range(prof[arm]["seeds"], prof[arm]["focus_seeds"])) if best else []
    write_json(out / "choice.json", {"arm": arm, "strongest_baseline": best, "validation_nll": means, "seeds": seeds,
                                     "rule": "lowest mean final validation NLL over the first seeds"})
    symmetry, overrides = None, None
    if arm == "upcycle" and seeds:
        choice = upcycle_choice(params)
        symmetry, overrides = choice["symmetry"], {"lr": choice["lr"], "expert_lr": choice["lr"]}
    data = Data(params) if seeds else None
    for seed in seeds:
        key = f"{arm}-{best}"
        run(params, arm, best, seed, data, out / best / f"s{seed}", p["state"] / "extra" / arm / best / f"s{seed}",
            p["timing"] / f"extra-{key}.json", symmetry=symmetry, train_overrides=overrides)


if __name__ == "__main__":
    name, which = stage_args("python pipeline/extra.py <profile> <arm>", 2)
    with timed_stage(name, f"extra_{which}"):
        main(name, which)
