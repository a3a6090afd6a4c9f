"""DVC stage `benchmark` (``python pipeline/benchmark.py <profile>``): the speed and memory ratios of
benchmarks/ for a profile (`--quick` smoke sizes on `tiny`), written as JSON under results/<profile>/benchmarks/
for the paper's router-overhead table.

Only the sizes the paper reports run here (`PAPER_ARGS`): the MoE block against HF's block and the dense
floor at the default model's own size (D = 256, E = 8, N = 2048 tokens per step — the eight-size grid took
~5 of the stage's ~8 minutes); the router overhead (D = 768, N = 8192) and the training step of the default
model at their scripts' defaults. Measured on the shared 2-core machine (load ~1.5): moe_dispatch at
256,8,2048 + 768,8,8192 72 s, router_overhead 51 s, training_throughput 67 s; the single D = 256 size
takes ~20 s. The full grids stay available from the command line (``python benchmarks/moe_dispatch.py``
runs all eight sizes)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from common import ROOT, load_params, paths, profile, stage_args, timed_stage

SCRIPTS = ("moe_dispatch", "router_overhead", "training_throughput")
#: Extra arguments per script in a full (non --quick) run: the sizes of the paper's overhead table.
PAPER_ARGS: dict[str, list[str]] = {"moe_dispatch": ["--config", "256,8,2048"]}


def main(profile_name: str) -> None:
    params = load_params(profile_name)
    out = paths(params)["results"] / "benchmarks"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    quick = ["--quick"] if profile(params)["benchmark"].get("quick") else []
    for name in SCRIPTS:
        sizes = [] if quick else PAPER_ARGS.get(name, [])
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *quick, *sizes, "--out", str(tmp)],
                       check=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


if __name__ == "__main__":
    (name,) = stage_args("python pipeline/benchmark.py <profile>", 1)
    with timed_stage(name, "benchmark"):
        main(name)
