"""Training throughput (tokens/s) and peak memory of the default profile's upcycled model.

The default profile's model: GPT-2 architecture, 4 layers x 256 wide, 4 heads, vocabulary 8192,
blocks of 128 tokens, batch 16 (2048 tokens per step), no dropout; every MLP upcycled by
`spectra.upcycle` into E = 8 experts, k = 2, router_dim 32. Variants: ``spectra`` and ``top2`` (and the
``dense`` base model as a reference). One training step = forward with labels (the router losses are
added to the loss by the upcycler's hook), backward, AdamW step, `step_routers`. fp32, CPU, 2 threads.

* Throughput: the three models train side by side in one process, steps interleaved, median step time.
* Model FLOPs utilisation (MFU): model FLOPs per token (`spectra.flops.flops_per_token`: attention incl.
  the T² part, MLP / experts ×k, router, LM head; forward + backward = 3× forward) × tokens/s ÷ the GEMM
  rate this machine reaches on the same matmul shapes (`common.gemm_floor`: every product of the
  variant's step, preallocated, timed in the same interleaved repetitions as the training steps). Goal
  >= 0.60 for every variant; in the JSON also as the time ratio ``step/gemm-floor`` (= 1/MFU, <= 1/0.6).
* Peak memory: one child process per variant (so each peak is its own): once the model is built the
  kernel's peak-RSS mark is reset and a few steps run; the peak (VmHWM) minus the resident size before
  them is the training-time peak on top of the weights (gradients, AdamW state, activations saved for
  backward); the absolute peak RSS is reported too. RSS, not tracemalloc: tensors are not Python
  allocations.

No goal is set for the step times and memory; they are reported for the paper's overhead table.

    python benchmarks/training_throughput.py            # ~1-2 minutes on 2 cores
    python benchmarks/training_throughput.py --quick    # smoke run: a 2-layer x 64 model
"""

from __future__ import annotations

try:
    from common import gemm_floor, goal_line, interleaved, medians, parser, ratio, save, setup, table
except ImportError:  # imported as benchmarks.training_throughput
    from benchmarks.common import gemm_floor, goal_line, interleaved, medians, parser, ratio, save, setup, table

import copy
import json
import os
import subprocess
import sys

import torch

from spectra.flops import flops_per_token, forward_matmuls

VARIANTS = ("dense", "spectra", "top2")
GOAL_MFU = 0.60
DEFAULT = dict(n_layer=4, n_embd=256, n_head=4, vocab=8192, block=128, batch=16, experts=8, top_k=2, router_dim=32)
QUICK = dict(n_layer=2, n_embd=64, n_head=2, vocab=512, block=32, batch=4, experts=4, top_k=2, router_dim=8)


def base_model(size: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=size["vocab"], n_positions=size["block"], n_embd=size["n_embd"], n_layer=size["n_layer"],
                     n_head=size["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def variant_model(base, variant: str, size: dict):
    from spectra.upcycle import upcycle

    model = copy.deepcopy(base)
    if variant != "dense":
        torch.manual_seed(1)
        upcycle(model, router=variant, num_experts=size["experts"], top_k=size["top_k"], router_dim=size["router_dim"],
                noise_std=0.0)
    return model.train()


def batch(size: dict, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, size["vocab"], (size["batch"], size["block"]), generator=g)


def trainer(model, ids: torch.Tensor):
    from spectra.upcycle import step_routers

    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        step_routers(model)
        return out.loss.detach().item()

    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(variant: str, quick: bool, steps: int, threads: int, malloc: bool = True) -> dict:
    """Peak resident memory of training `variant`, in a fresh process (``ru_maxrss`` would include the
    parent's size at fork; the per-process VmHWM does not): the peak mark is reset once the model is
    built, then `steps` training steps run (the first one allocates gradients and AdamW state)."""
    setup(threads, malloc)
    size = QUICK if quick else DEFAULT
    model = variant_model(base_model(size), variant, size)
    ids = batch(size)
    step = trainer(model, ids)
    import gc
    gc.collect()
    before = _status_kib("VmRSS")
    reset = _reset_peak()
    for _ in range(steps):
        step()
    peak = _status_kib("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    return {"variant": variant, "rss_before_kib": before, "peak_rss_kib": peak, "peak_reset": reset,
            "training_peak_increment_kib": max(0, peak - before), "parameters": params,
            "note": "increment = peak RSS during the steps - RSS of the built model (grads, AdamW state, activations)"}


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 8; 2 with --quick)")
    p.add_argument("--memory-child", default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.quick, args.steps or 3, args.threads, args.malloc)))
        return {}
    setup(args.threads, args.malloc)
    size = QUICK if args.quick else DEFAULT
    reps = args.steps or args.reps or (2 if args.quick else 8)
    base = base_model(size)
    models = {v: variant_model(base, v, size) for v in VARIANTS}
    ids = batch(size)
    steps = {v: trainer(m, ids) for v, m in models.items()}
    counts = {v: flops_per_token(m.config, seq_len=size["block"]) for v, m in models.items()}
    floors = {v: gemm_floor(forward_matmuls(m.config, batch=size["batch"], seq_len=size["block"]))
              for v, m in models.items()}
    subjects = {**steps, **{f"gemm {v}": floors[v][0] for v in VARIANTS}}
    times = interleaved(subjects, reps=reps, warmup=2)
    med = medians(times)
    tokens = size["batch"] * size["block"]
    tps = {v: tokens / med[v] for v in VARIANTS}
    params = {v: sum(p.numel() for p in m.parameters()) for v, m in models.items()}
    gemm_rate = {v: floors[v][1] / med[f"gemm {v}"] for v in VARIANTS}  # FLOP/s on the model's shapes
    # MFU = (counted FLOPs / step time) / (floor FLOPs / floor time), per repetition, median
    mfu = {v: counts[v].training_per_token * tokens / floors[v][1] * ratio(times, f"gemm {v}", v) for v in VARIANTS}
    del models, steps, floors, subjects

    memory = {}
    for v in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", v, "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        if not args.malloc:
            cmd.append("--no-malloc-tuning")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
        memory[v] = json.loads(res.stdout.strip().splitlines()[-1])

    rows = [[v, f"{params[v] / 1e6:.2f}", f"{med[v] * 1e3:.0f}", f"{tps[v]:.0f}",
             f"{memory[v]['training_peak_increment_kib'] / 1024:.0f}", f"{memory[v]['peak_rss_kib'] / 1024:.0f}"]
            for v in VARIANTS]
    desc = (f"GPT-2 {size['n_layer']}x{size['n_embd']}, E={size['experts']} k={size['top_k']} R={size['router_dim']}, "
            f"batch {size['batch']}x{size['block']} tokens, fp32, {args.threads} threads, median of {reps} interleaved steps")
    print(desc)
    print(table(rows, ["model", "params (M)", "step (ms)", "tokens/s", "step peak +MiB", "peak RSS (MiB)"]))
    r_time = ratio(times, "spectra", "top2")
    r_dense = ratio(times, "spectra", "dense")
    r_top2_dense = ratio(times, "top2", "dense")
    mem_ratio = memory["spectra"]["training_peak_increment_kib"] / max(1, memory["top2"]["training_peak_increment_kib"])
    print()
    print(f"[4] step time spectra / top2          {r_time:.3f}x   (tokens/s ratio {1 / r_time:.3f})")
    print(f"[4] step time spectra / dense         {r_dense:.3f}x   (top2 / dense {r_top2_dense:.3f}x)")
    print(f"[4] training peak memory spectra / top2 {mem_ratio:.3f}x")
    print()
    print(table([[v, f"{counts[v].training_per_token / 1e6:.2f}", f"{counts[v].active_parameters / 1e6:.2f}",
                  f"{counts[v].training_per_token * tps[v] / 1e9:.1f}", f"{gemm_rate[v] / 1e9:.1f}", f"{mfu[v]:.3f}"]
                 for v in VARIANTS],
                ["model", "train MFLOP/token", "active params (M)", "model GFLOP/s", "GEMM GFLOP/s (same shapes)", "MFU"]))
    for v in VARIANTS:
        print(goal_line(f"[3] MFU {v} (model FLOP/s / GEMM FLOP/s, same shapes)", 100 * mfu[v], 100 * GOAL_MFU,
                        not args.quick, at_least=True, unit="%"))
    payload = {
        "benchmark": "training_throughput", "quick": args.quick, "model": size, "tokens_per_step": tokens, "reps": reps,
        "D": size["n_embd"], "E": size["experts"], "k": size["top_k"], "N": tokens,
        "median_step_s": med, "samples_s": times, "tokens_per_s": tps, "parameters": params, "memory": memory,
        "ratios": {"step spectra/top2": r_time, "step spectra/dense": r_dense, "step top2/dense": r_top2_dense,
                   "train-peak-memory spectra/top2": mem_ratio,
                   **{f"step/gemm-floor {v}": 1.0 / mfu[v] for v in VARIANTS}},
        "goals": {} if args.quick else {f"step/gemm-floor {v}": 1.0 / GOAL_MFU for v in VARIANTS},
        "met": {} if args.quick else {f"step/gemm-floor {v}": mfu[v] >= GOAL_MFU for v in VARIANTS},
        "mfu": {v: {"mfu": mfu[v], "goal_at_least": GOAL_MFU, "train_flops_per_token": counts[v].training_per_token,
                    "forward_flops_per_token_by_part": counts[v].by_part, "active_parameters": counts[v].active_parameters,
                    "gemm_floor_flop_per_s": gemm_rate[v]} for v in VARIANTS},
    }
    path = save("training_throughput", args.out, payload)
    print(f"\nwrote {path}")
    return payload


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
