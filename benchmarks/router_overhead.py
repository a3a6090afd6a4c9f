"""SPECTRA's overhead: the SPECTRA block against the top-2 block, with a per-stage breakdown.

Forward + backward, fp32, CPU, 2 threads, training mode, at D = 768, E = 8, k = 2, N = 8192 tokens,
R = 128 (`MoEConfig` defaults otherwise: depth context cell, `param` orthogonal projector, 3 Sinkhorn
iterations). Both blocks are `MoEBlock.from_dense` of one GPT-2 MLP (Conv1D, gelu_new, I = 4D) with
the same experts; only the router differs. Goal: spectra / top2 <= 1.10 (issue 13).

The breakdown (the paper's overhead table) times each stage of the SPECTRA router on its own, forward
+ backward from detached inputs, interleaved with the two blocks in the same repetitions:

    context cell   h = GRUCell(x, h_prev), r = W_r h                  [N, E, R]
    projector      p = x W_pᵀ (orthogonal parametrisation included)   [N, E, R]
    similarity     S = cos(r, p)                                      [N, E]
    Gram           Ē = normalise(mean_n p̂), G = Ē Ēᵀ                  [E, E]
    cost           C = −S + λ |S| (G ⊙ (1 − I))²                      [N, E]
    Sinkhorn       log-domain, 3 iterations                           [N, E]
    top-k          top-k of Q, combine weights, entropy/ortho losses, agreement statistic
    experts        the dispatch (`MoEBlock.dispatch`) of the top-k assignments
    other          block total − the stages above (block bookkeeping: statistics, checks)

    python benchmarks/router_overhead.py            # D=768, N=8192 (a few minutes on 2 cores)
    python benchmarks/router_overhead.py --hidden 512 --tokens 4096   # the issue's second size
    python benchmarks/router_overhead.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

try:
    from common import goal_line, interleaved, medians, parser, ratio, save, setup, table
except ImportError:  # imported as benchmarks.router_overhead
    from benchmarks.common import goal_line, interleaved, medians, parser, ratio, save, setup, table

import statistics

import torch
import torch.nn.functional as F

GOAL = 1.10  # issue 13
STAGES = ("context cell", "projector", "similarity", "Gram", "cost", "Sinkhorn", "top-k", "experts")


def build(d: int, e: int, k: int, r: int, seed: int = 0):
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    from spectra import MoEBlock, MoEConfig

    torch.manual_seed(seed)
    mlp = GPT2MLP(4 * d, GPT2Config(n_embd=d, n_head=1, activation_function="gelu_new", resid_pdrop=0.0))
    blocks = {}
    for variant in ("spectra", "top2"):
        cfg = MoEConfig.from_variant(variant, hidden_size=d, num_experts=e, top_k=k, router_dim=r)
        torch.manual_seed(seed + 1)  # the same experts for both blocks
        blocks[variant] = MoEBlock.from_dense(mlp, cfg, noise_std=0.1).train()
    return blocks


def block_step(block, x, gy):
    params = [p for p in block.parameters() if p.requires_grad]
    ctx = block.router.ctx

    def step():
        ctx.begin_forward()
        xx = x.detach().requires_grad_(True)
        out = block(xx)
        torch.autograd.backward([out.hidden_states, out.router_loss], [gy, torch.ones_like(out.router_loss)])
        for p in params:
            p.grad = None
        ctx.pop_pending()

    return step


def stage_steps(block, x, gy) -> dict:
    """One fwd+bwd closure per stage of the SPECTRA router (inputs: the previous stage's outputs, detached)."""
    from spectra.routers import RoutingCall
    try:
        from spectra.routers.spectra import cosine_and_mean
    except ImportError:  # an older router: unfused normalise / product / sum
        cosine_and_mean = None
    from spectra.sinkhorn import log_sinkhorn

    router = block.router
    cfg = router.config

    def similarity(r, p):  # S = cos(r, p) and the mean p̂ for Ē, as SpectraRouter.route computes them
        if cosine_and_mean is not None:
            return cosine_and_mean(r, p, None, with_mean=True)
        p_hat = F.normalize(p, dim=-1)
        return (F.normalize(r, dim=-1) * p_hat).sum(-1), p_hat.mean(0)

    n, e, r_dim, k = x.shape[0], cfg.num_experts, cfg.router_dim, cfg.top_k
    call = RoutingCall(block.layer_idx, None, None, (1, n), False)
    g = torch.Generator().manual_seed(2)
    params = [p for p in block.parameters() if p.requires_grad]

    def run(fn, *inputs):
        inputs = [t.detach().clone() for t in inputs]
        grads: list[torch.Tensor] = []

        def step():
            router.ctx.begin_forward()
            outs = fn(*(t.detach().requires_grad_(True) for t in inputs))
            outs = outs if isinstance(outs, tuple) else (outs,)
            outs = [o for o in outs if torch.is_tensor(o) and o.requires_grad]
            if not grads:  # fixed upstream gradients, drawn once (outside the timed repetitions)
                grads.extend(torch.randn(o.shape, generator=g) if o.dim() else torch.ones(()) for o in outs)
            torch.autograd.backward(outs, grads)
            for p in params:
                p.grad = None
        return step

    with torch.no_grad():
        router.ctx.begin_forward()
        r = router._context(x, call).view(n, e, r_dim)
        p = router.expression(x, None)
        s, p_hat_mean = similarity(r, p)
        gram, _ = router.gram(p, None, block.layer_idx, p_hat_mean=p_hat_mean)
        c = router.cost(s, gram)
        sk = log_sinkhorn(c, cfg.sinkhorn_epsilon, cfg.sinkhorn_iters, None)
        out = router(x, call)

    def topk(c, log_plan, gram):  # the tail of SpectraRouter.route (selection, weights, losses, agreement)
        logits = -c / cfg.sinkhorn_epsilon
        log_soft = logits.log_softmax(-1)
        log_q = log_plan.log_softmax(-1)
        idx = log_q.topk(k, dim=-1).indices
        weight = log_q.gather(-1, idx).softmax(-1)
        probs = log_q.exp()
        entropy = cfg.entropy_loss_coef * (-(probs * log_q.clamp_min(-1e4)).sum(-1)).mean()
        eye = torch.eye(e)
        ortho = cfg.ortho_loss_coef * (gram - eye).pow(2).sum()
        eval_index = log_soft.topk(k, dim=-1).indices
        (idx.unsqueeze(-1) == eval_index.unsqueeze(-2)).any(-1).float().mean()
        return weight, entropy, ortho

    tok, exp, w = out.token_index, out.expert_index, out.weight
    return {
        "context cell": run(lambda xx: router._context(xx, call), x),
        "projector": run(lambda xx: router.expression(xx, None), x),
        "similarity": run(similarity, r, p),
        "Gram": run(lambda pm: router.gram(p, None, block.layer_idx, p_hat_mean=pm)[0], p_hat_mean),
        "cost": run(router.cost, s, gram),
        "Sinkhorn": run(lambda cc: log_sinkhorn(cc, cfg.sinkhorn_epsilon, cfg.sinkhorn_iters, None).log_plan, c),
        "top-k": run(topk, c, sk.log_plan, gram),
        "experts": run(lambda xx, ww: block.dispatch(xx, tok, exp, ww), x, w),
    }


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=None, help="N (default 8192; 512 with --quick)")
    p.add_argument("--hidden", type=int, default=None,
                   help="D (default 768; 64 with --quick); the issue's second size is --hidden 512 --tokens 4096")
    args = p.parse_args(argv)
    setup(args.threads, args.malloc)
    d, e, k, r = (64, 4, 2, 16) if args.quick else (768, 8, 2, 128)
    d = args.hidden or d
    n = args.tokens or (512 if args.quick else 8192)
    reps = args.reps or (2 if args.quick else 5)
    blocks = build(d, e, k, r)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen)
    gy = torch.randn(n, d, generator=gen)
    subjects = {"spectra block": block_step(blocks["spectra"], x, gy), "top2 block": block_step(blocks["top2"], x, gy)}
    stages = stage_steps(blocks["spectra"], x, gy)
    subjects.update(stages)
    times = interleaved(subjects, reps=reps, warmup=1)
    med = medians(times)
    overhead = ratio(times, "spectra block", "top2 block")
    total = med["spectra block"]
    other = total - sum(med[s] for s in STAGES)
    router_total = sum(med[s] for s in STAGES if s != "experts")
    rows = [[s, f"{med[s] * 1e3:.1f}", f"{100 * med[s] / total:.1f}"] for s in STAGES]
    rows.append(["other (block bookkeeping)", f"{other * 1e3:.1f}", f"{100 * other / total:.1f}"])
    rows.append(["= SPECTRA block", f"{total * 1e3:.1f}", "100.0"])
    rows.append(["top-2 block (reference)", f"{med['top2 block'] * 1e3:.1f}", f"{100 * med['top2 block'] / total:.1f}"])
    print(f"SPECTRA block breakdown, forward+backward, fp32, {args.threads} threads, D={d} E={e} k={k} N={n} R={r}, "
          f"median of {reps} interleaved repetitions")
    print(table(rows, ["stage", "ms", "% of block"]))
    print()
    print(f"SPECTRA router stages (context..top-k): {router_total * 1e3:.1f} ms = "
          f"{router_total / med['experts']:.3f}x the experts' time")
    print(goal_line(f"[3] SPECTRA block / top-2 block   D={d} E={e} N={n}", overhead, GOAL, not args.quick))
    payload = {
        "benchmark": "router_overhead", "quick": args.quick, "D": d, "E": e, "k": k, "N": n, "R": r, "reps": reps,
        "expert_mlp": "GPT-2 MLP (Conv1D, gelu_new, I=4D)",
        "median_s": med, "samples_s": times,
        "breakdown_s": {**{s: med[s] for s in STAGES}, "other": other, "total": total},
        "breakdown_fraction": {**{s: med[s] / total for s in STAGES}, "other": other / total},
        "ratio": {"spectra/top2": overhead,
                  "spectra/top2 (ratio of medians)": med["spectra block"] / med["top2 block"],
                  "spread (min..max per-rep ratio)": [min(a / b for a, b in zip(times["spectra block"], times["top2 block"])),
                                                      max(a / b for a, b in zip(times["spectra block"], times["top2 block"]))]},
        # the goal is stated for D=768, N=8192; a --quick smoke run does not judge it
        "goal": {} if args.quick else {"spectra/top2": GOAL}, "met": None if args.quick else overhead <= GOAL,
        # each stage's time as a share of the top-2 block: the router stages sum to (about) the overhead
        "stages": {"D": d, "E": e, "k": k, "N": n,
                   "ratios": {f"{s} / top-2 block": med[s] / med["top2 block"] for s in STAGES}},
    }
    path = save("router_overhead", args.out, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
