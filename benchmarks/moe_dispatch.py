"""MoE dispatch speed: `MoEBlock` against HF's Mixtral eager block and against the dense floor.

Forward + backward, fp32, CPU, 2 threads, k = 2, for D in {256, 768}, E in {8, 16}, N in {2048, 8192}:

* ``hf``     transformers' `MixtralSparseMoeBlock` with ``experts_implementation="eager"`` (a Python loop
             over the hit experts, ``index_add_``; stacked ``gate_up_proj``/``down_proj`` parameters);
* ``moe``    `spectra.MoEBlock.from_dense(LlamaMLP)` with the `top2` router: the grouped-experts path
             (`spectra.experts`), the router's load-balancing loss and routing statistics included;
* ``list``   the same block forced onto the generic ``nn.ModuleList`` path (sort / split / per-expert
             module call / ``index_add``) — the plain sort-and-split dispatch, for reference;
* ``dense``  the floor: one `LlamaMLP` of intermediate width k·I on the same N tokens (same FLOPs as the
             experts, no routing);
* ``gemm``   (reference) only the experts' nine matmuls per expert (3 forward, 6 backward) on the real
             per-expert token counts, preallocated operands: the fp32 FLOP floor of these experts.

All four have the same weights (hf/moe/list: the same E experts and the same gate, checked to give
the same output before timing). Experts are SwiGLU (gate/up/down) with I = 8D/3 rounded up to a
multiple of 64 (the LLaMA/Mixtral convention: 704 for D = 256, 2048 for D = 768).

Goals: moe/hf <= 0.8 and moe/dense <= 1.3 for every configuration.

    python benchmarks/moe_dispatch.py            # full grid (several minutes on 2 cores)
    python benchmarks/moe_dispatch.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import itertools
import math

try:
    from common import REPO, goal_line, interleaved, medians, parser, ratio, save, setup, table  # noqa: F401
except ImportError:  # imported as benchmarks.moe_dispatch
    from benchmarks.common import REPO, goal_line, interleaved, medians, parser, ratio, save, setup, table  # noqa: F401

import torch

GOAL_HF = 0.8
GOAL_DENSE = 1.3
K = 2


def intermediate(d: int) -> int:
    return int(math.ceil(8 * d / 3 / 64) * 64)


def build(d: int, e: int, i: int, seed: int = 0):
    from transformers import LlamaConfig, MixtralConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from spectra import MoEBlock, MoEConfig
    from spectra.experts import GroupedExperts

    torch.manual_seed(seed)
    heads = dict(num_attention_heads=1, num_key_value_heads=1)
    mlp = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=i, hidden_act="silu", **heads))
    cfg = MoEConfig.from_variant("top2", hidden_size=d, num_experts=e, top_k=K)
    torch.manual_seed(seed + 1)
    moe = MoEBlock.from_dense(mlp, cfg, noise_std=0.1)
    assert isinstance(moe.experts, GroupedExperts)
    torch.manual_seed(seed + 1)
    lst = MoEBlock.from_dense(mlp, cfg.replace(extra={"grouped_experts": False}), noise_std=0.1)
    lst.own_router.load_state_dict(moe.own_router.state_dict())

    mc = MixtralConfig(hidden_size=d, intermediate_size=i, num_local_experts=e, num_experts_per_tok=K,
                       hidden_act="silu", router_jitter_noise=0.0, **heads)
    mc._experts_implementation = "eager"
    hf = MixtralSparseMoeBlock(mc)
    with torch.no_grad():
        hf.gate.weight.copy_(moe.own_router.gate.weight)
        stacked = moe.experts.stacked()
        hf.experts.gate_up_proj.copy_(stacked["w_in"])  # [E, 2I, D], gate rows first in both
        hf.experts.down_proj.copy_(stacked["w_out"])
    dense = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=K * i, hidden_act="silu", **heads))
    for m in (moe, lst, hf, dense):
        m.train()
    return {"hf": hf, "moe": moe, "list": lst, "dense": dense}


def make_step(module, x: torch.Tensor, gy: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        xx = x.detach().requires_grad_(True)
        out = module(xx)
        if hasattr(out, "hidden_states"):  # MoEOutput: the router's loss is part of the block's work
            torch.autograd.backward([out.hidden_states, out.router_loss], [gy, torch.ones_like(out.router_loss)])
        else:
            torch.autograd.backward([out], [gy])
        for p in params:
            p.grad = None

    return step


def gemm_floor_step(moe, x: torch.Tensor):
    """Only the experts' matmuls, forward + backward, on the block's real per-expert token counts and
    with preallocated operands: the FLOP floor of any implementation of these experts (no gather,
    activation, routing, scatter or allocation of results)."""
    with torch.no_grad():
        out = moe.router(x.reshape(-1, x.shape[-1]), _call(moe, x))
        counts = torch.bincount(out.expert_index, minlength=len(moe.experts)).tolist()
    d = x.shape[-1]
    i = moe.experts.w_out[0].shape[1]
    ops = []
    for e, c in enumerate(counts):
        if not c:
            continue
        w_in, w_out = moe.experts.w_in[e].detach(), moe.experts.w_out[e].detach()
        xe, h, a, ge, dh = (torch.randn(c, d), torch.randn(c, i), torch.randn(c, i), torch.randn(c, d),
                            torch.randn(c, i))
        out_h, out_y, out_dx = torch.empty(c, i), torch.empty(c, d), torch.empty(c, d)
        dw_in, dw_out = torch.empty_like(w_in), torch.empty_like(w_out)
        ops.append((xe, h, a, ge, dh, out_h, out_y, out_dx, w_in, w_out, dw_in, dw_out))

    def step() -> None:
        for xe, h, a, ge, dh, out_h, out_y, out_dx, w_in, w_out, dw_in, dw_out in ops:
            torch.mm(xe, w_in[:i].t(), out=out_h)  # forward: gate, up, down
            torch.mm(xe, w_in[i:].t(), out=out_h)
            torch.mm(a, w_out.t(), out=out_y)
            torch.mm(ge.t(), a, out=dw_out)  # backward: dW_down, d a, dW_gate, dW_up, dx (2)
            torch.mm(ge, w_out, out=h)
            torch.mm(dh.t(), xe, out=dw_in[:i])
            torch.mm(dh.t(), xe, out=dw_in[i:])
            torch.mm(dh, w_in[:i], out=out_dx)
            torch.mm(dh, w_in[i:], out=out_dx)

    return step


def _call(moe, x):
    from spectra.routers import RoutingCall
    n = x.reshape(-1, x.shape[-1]).shape[0]
    return RoutingCall(moe.layer_idx, None, None, (1, n), False)


def check_same(modules: dict, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = modules["hf"](x)
        diffs = [(modules[k](x).hidden_states - ref).abs().max().item() for k in ("moe", "list")]
    scale = max(ref.abs().max().item(), 1e-6)
    diff = max(diffs) / scale
    if diff > 1e-4:
        raise AssertionError(f"MoEBlock and the HF block disagree (relative max diff {diff:.2e}): not the same computation")
    return diff


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=None, metavar="D,E,N",
                   help="run only these configurations (repeatable), e.g. --config 256,8,2048")
    args = p.parse_args(argv)
    setup(args.threads, args.malloc)
    if args.quick:
        grid = [(64, 4, 256)]
        reps = args.reps or 2
    elif args.config:
        grid = [tuple(int(v) for v in c.split(",")) for c in args.config]
        reps = args.reps
    else:
        grid = list(itertools.product((256, 768), (8, 16), (2048, 8192)))
        reps = args.reps
    results = []
    rows = []
    lines = []
    for d, e, n in grid:
        i = intermediate(d) if not args.quick else 128
        # default repetitions: 9, or 5 for the largest sizes (a D=768, N=8192 repetition takes ~20 s)
        reps_here = reps or (5 if d * n >= 768 * 8192 else 9)
        modules = build(d, e, i)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, n, d, generator=g)
        gy = torch.randn(1, n, d, generator=g)
        diff = check_same(modules, x)
        steps = {name: make_step(m, x, gy) for name, m in modules.items()}
        steps["gemm"] = gemm_floor_step(modules["moe"], x)
        times = interleaved(steps, reps=reps_here, warmup=1)
        med = medians(times)
        r_hf, r_dense = ratio(times, "moe", "hf"), ratio(times, "moe", "dense")
        r_list_hf, r_hf_dense = ratio(times, "list", "hf"), ratio(times, "hf", "dense")
        r_list_dense = ratio(times, "list", "dense")
        r_gemm_hf, r_moe_gemm = ratio(times, "gemm", "hf"), ratio(times, "moe", "gemm")
        tag = f"D={d} E={e} N={n}"
        results.append({
            "D": d, "E": e, "N": n, "k": K, "I": i, "reps": reps_here, "max_rel_diff_vs_hf": diff,
            "median_s": med, "samples_s": times,
            "ratios": {"moe/hf": r_hf, "moe/dense": r_dense, "list/hf": r_list_hf, "hf/dense": r_hf_dense,
                       "gemm/hf": r_gemm_hf},
            "moe/gemm": r_moe_gemm,
            "list/dense": r_list_dense,
            # the goals are stated for the full grid; a --quick smoke run does not judge them
            "goals": {} if args.quick else {"moe/hf": GOAL_HF, "moe/dense": GOAL_DENSE},
            "met": {} if args.quick else {"moe/hf": r_hf <= GOAL_HF, "moe/dense": r_dense <= GOAL_DENSE},
        })
        rows.append([tag, f"{med['hf'] * 1e3:.0f}", f"{med['moe'] * 1e3:.0f}", f"{med['list'] * 1e3:.0f}",
                     f"{med['dense'] * 1e3:.0f}", f"{med['gemm'] * 1e3:.0f}", f"{r_hf:.3f}", f"{r_dense:.3f}",
                     f"{r_list_hf:.3f}", f"{r_hf_dense:.3f}", f"{r_gemm_hf:.3f}"])
        lines.append(goal_line(f"[1] MoEBlock / HF Mixtral eager   {tag}", r_hf, GOAL_HF, not args.quick))
        lines.append(goal_line(f"[2] MoEBlock / dense floor        {tag}", r_dense, GOAL_DENSE, not args.quick))
        print(f"{tag}: moe/hf {r_hf:.3f}  moe/dense {r_dense:.3f}  (list/hf {r_list_hf:.3f}, hf/dense {r_hf_dense:.3f}, "
              f"gemm/hf {r_gemm_hf:.3f})", flush=True)
        del modules, steps
    print()
    print(f"forward+backward, fp32, CPU, {args.threads} threads, k=2, median ms of "
          f"{reps or '9 (5 at D=768, N=8192)'} interleaved repetitions")
    print(table(rows, ["config", "hf", "moe", "list", "dense", "gemm", "moe/hf", "moe/dense", "list/hf", "hf/dense",
                       "gemm/hf"]))
    print("gemm = the experts' matmuls alone (preallocated operands): where gemm/hf > 0.8 the goal moe/hf <= 0.8 "
          "is below the fp32 matmul floor")
    print()
    print("\n".join(lines))
    payload = {"benchmark": "moe_dispatch", "quick": args.quick, "description": __doc__.strip().split("\n\n")[0],
               "goals": {"moe/hf": GOAL_HF, "moe/dense": GOAL_DENSE}, "results": results,
               "all_met": None if args.quick else all(all(r["met"].values()) for r in results)}
    path = save("moe_dispatch", args.out, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
