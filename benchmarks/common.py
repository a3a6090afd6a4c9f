"""Shared harness of the benchmarks: side-by-side timing in one process, ratios, JSON output.

Timing rules (the machine is shared, absolute times are noise): every subject of one comparison runs in
the same process, repetitions are interleaved (A B C, then C B A, ...), and a ratio is the median over
repetitions of the per-repetition ratio (each repetition times both subjects within seconds of each
other). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from anywhere, with or without an install
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# As in the pipeline (must precede the first torch import): OpenMP threads that spin while waiting make
# 2-thread runs several times slower whenever another process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

THREADS = 2


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repetitions: a smoke run (CI, tiny profile)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per subject (default 5; 2 with --quick)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks",
                   help="directory of the JSON result (default results/benchmarks)")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads (default 2)")
    return p


def setup(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def interleaved(subjects: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each subject per repetition; subjects alternate within every repetition and the
    order is reversed every other repetition (so a slow drift of the machine hits all of them alike)."""
    names = list(subjects)
    for _ in range(warmup):
        for name in names:
            subjects[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            subjects[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repetitions of time(a) / time(b)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def environment() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    import transformers
    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu": cpu, "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def save(name: str, out_dir: Path, payload: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    env = payload.setdefault("environment", environment())
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = os.getloadavg()
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def goal_line(label: str, value: float, goal: float, evaluated: bool = True) -> str:
    """One printed result: the ratio, its goal and whether it is met (`evaluated=False`: a --quick smoke
    run at other sizes than the goal's, so the goal is shown but not judged)."""
    ok = ("met" if value <= goal else "MISSED") if evaluated else "not evaluated (--quick smoke sizes)"
    return f"{label:<58s} {value:6.3f}x   goal <= {goal:.2f}x   {ok}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)
