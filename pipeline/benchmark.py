"""DVC stage `benchmark`: the speed and memory ratios of benchmarks/ for the active profile
(`--quick` smoke sizes on `tiny`), written as JSON under results/<profile>/benchmarks/ for the paper's
router-overhead table."""

from __future__ import annotations

import shutil
import subprocess
import sys

from common import ROOT, load_params, paths, profile

SCRIPTS = ("moe_dispatch", "router_overhead", "training_throughput")


def main() -> None:
    params = load_params()
    out = paths(params)["results"] / "benchmarks"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    quick = ["--quick"] if profile(params)["benchmark"].get("quick") else []
    for name in SCRIPTS:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *quick, "--out", str(tmp)], check=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


if __name__ == "__main__":
    main()
