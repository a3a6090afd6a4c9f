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
# 2-thread runs several times slower whenever another process shares the cores. On an idle machine passive waiting
# is not free: it slows many-small-op code (the MoE block) more than one big GEMM (README: the wait-policy table);
# `OMP_WAIT_POLICY=ACTIVE python benchmarks/<script>.py` measures without it.
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
    p.add_argument("--no-malloc-tuning", dest="malloc", action="store_false",
                   help="keep glibc's default malloc thresholds (see common.tune_malloc)")
    return p


#: glibc malloc settings applied by `tune_malloc` (bytes): blocks up to the mmap threshold come from the
#: heap, and freed heap memory is kept up to the trim threshold instead of being returned to the kernel.
MALLOC_MMAP_THRESHOLD = 1 << 30
MALLOC_TRIM_THRESHOLD = 2**31 - 1


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``): by default every tensor above glibc's mmap
    threshold (≤ 32 MiB, e.g. the [B·T, vocab] logits) is fresh pages on every step — page faults at
    ≈ 0.3 ms/MiB. Measured on the default model's training step (2 threads, one process per setting,
    alternating): dense 470-484 → 403-409 ms (minor faults per step 75-91 k → 3-5 k), top-2 716-737 →
    626-697 ms, SPECTRA 754-767 → 711-722 ms. Process-wide, effective from the call on; False where
    glibc's ``mallopt`` is unavailable. The pipeline should do the same for its training processes."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MALLOC_MMAP_THRESHOLD)) and bool(libc.mallopt(-1, MALLOC_TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


_MALLOC_TUNED: bool | None = None


def setup(threads: int = THREADS, malloc: bool = True) -> None:
    """Threads, seed, and (`malloc`) `tune_malloc`, recorded in the JSON environment."""
    global _MALLOC_TUNED
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if malloc:
        _MALLOC_TUNED = tune_malloc()


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
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc_tuned": _MALLOC_TUNED, "cpu": cpu, "cpu_count": os.cpu_count(),
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


def goal_line(label: str, value: float, goal: float, evaluated: bool = True, at_least: bool = False,
              unit: str = "x") -> str:
    """One printed result: the ratio, its goal and whether it is met (`evaluated=False`: a --quick smoke
    run at other sizes than the goal's, so the goal is shown but not judged; `at_least`: the goal is a
    lower bound, e.g. a utilisation)."""
    good = value >= goal if at_least else value <= goal
    ok = ("met" if good else "MISSED") if evaluated else "not evaluated (--quick smoke sizes)"
    v, g = (f"{value:6.1f}", f"{goal:.0f}") if unit == "%" else (f"{value:6.3f}", f"{goal:.2f}")
    return f"{label:<58s} {v}{unit}   goal {'>=' if at_least else '<='} {g}{unit}   {ok}"


def gemm_floor(matmuls, dtype: torch.dtype = torch.float32) -> tuple[Callable[[], None], float]:
    """(step, FLOPs): every product of `matmuls` (`spectra.flops.Matmul`, one forward pass) and its two
    backward products (∂input = ∂out·Bᵀ, ∂weight = Aᵀ·∂out), on preallocated random operands and
    outputs — the fp32 GEMM floor of the same shapes, with nothing else (no allocation, no element-wise
    work). Rows split over ``groups`` weight matrices (experts) run as that many products."""
    ops: list[tuple[torch.Tensor, ...]] = []
    flops = 0.0
    for mm in matmuls:
        rows = max(1, round(mm.m / mm.groups))
        for _ in range(mm.groups):
            b = (mm.batch,) if mm.batch > 1 else ()
            a, w, gy = torch.randn(*b, rows, mm.k, dtype=dtype), torch.randn(*b, mm.k, mm.n, dtype=dtype), \
                torch.randn(*b, rows, mm.n, dtype=dtype)
            ops.append((a, w, gy, torch.empty_like(gy), torch.empty_like(a), torch.empty_like(w)))
            flops += 3 * 2.0 * rows * mm.k * mm.n * mm.batch

    def step() -> None:
        for a, w, gy, y, da, dw in ops:
            mm = torch.bmm if a.dim() == 3 else torch.mm
            mm(a, w, out=y)
            mm(gy, w.transpose(-1, -2), out=da)
            mm(a.transpose(-1, -2), gy, out=dw)

    return step, flops


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)
