"""`torch.compile` (inductor, CPU) against eager, side by side: the training step and held-out evaluation.

The models of `training_throughput.py` (the default profile's GPT-2 4x256, upcycled to E = 8, k = 2,
R = 32 for ``spectra`` and ``top2``, and the ``dense`` base). For each variant two copies with the same
weights are built, one called eagerly and one through ``torch.compile(model)`` (inductor, default mode):

* training step: forward with labels, backward, AdamW step, `step_routers` (as `training_throughput.py`);
* evaluation: a forward under ``torch.inference_mode`` of a batch of held-out-sized blocks (64 x 128
  tokens), logits only (what `spectra_artifact.evaluate.perplexity` does per batch).

``--scope model`` compiles the whole model (one ``torch.compile`` of its forward); ``--scope attention``
compiles only the non-MLP children of every decoder layer (attention and norms, ``module.compile()``),
leaving the MoE blocks eager: their data-dependent expert counts make every call a new shape for the
compiler (graph breaks at the count, recompilation per call).

Correctness first: the compiled copy must give the eager loss (training) and logits (evaluation) to
1e-4 relative before anything is timed; a variant that fails to compile or disagrees is reported as such
(the error is printed and saved), not timed. The compile time (first call, which includes it) is reported
separately: the pipeline trains each run in its own process for 60 steps, so a compiled step only pays
off when ``steps x (eager - compiled) > compile time``. Ratios compiled / eager are medians over
interleaved repetitions (< 1: compiled is faster). No goal; the measurement chooses the default of
``spectra_artifact.train``'s compile option.

Measured (2026-12, torch 2.13, the shared 2-core machine under load, medians of 5 interleaved repetitions):

=================  =======================  ==================  ====================  =================
model, scope       train step compiled/eager  first-call compile  eval compiled/eager   first-call compile
=================  =======================  ==================  ====================  =================
dense, model       0.70                       163 s               0.64                  51 s
top2, model        6.6 (quick sizes)          21 s                13 (quick sizes)      25 s
spectra, model     15 (quick sizes)           95 s                67 (quick sizes)      64 s
top2, attention    0.99                       4.5 s               1.00                  3.7 s
=================  =======================  ==================  ====================  =================

MoE models break the graph at every data-dependent size (the expert counts, 20-27 graphs) and recompile
as the counts change from call to call, so compiling them is many times slower; compiling only the
attention and norms gains nothing measurable. The dense model compiles to one graph and runs 30-36 %
faster, but a 60-step run saves ~10 s against minutes of compilation. Hence: eager everywhere by default
(no compile option in the training or evaluation path pays on the default profile).

    python benchmarks/compile_speed.py            # default sizes (several minutes: compilation)
    python benchmarks/compile_speed.py --quick    # smoke run: the 2-layer x 64 model
"""

from __future__ import annotations

try:
    from common import interleaved, medians, parser, ratio, save, setup, table
    from training_throughput import DEFAULT, QUICK, VARIANTS, base_model, batch, trainer, variant_model
except ImportError:  # imported as benchmarks.compile_speed
    from benchmarks.common import interleaved, medians, parser, ratio, save, setup, table
    from benchmarks.training_throughput import DEFAULT, QUICK, VARIANTS, base_model, batch, trainer, variant_model

import copy
import time
import traceback

import torch

EVAL_BATCH = 64
TOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def eval_step(model, ids: torch.Tensor):
    def step() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids).logits

    return step


def compile_scope(model, scope: str):
    """The callable to time: the whole model compiled (``model``) or the model with the non-MLP children
    of each decoder layer compiled in place (``attention``)."""
    if scope == "model":
        return torch.compile(model)
    from spectra.upcycle import find_decoder_layers, find_mlp

    _, stack = find_decoder_layers(model, "mlp")
    for layer in stack:
        mlp_name = find_mlp(layer)[0].split(".")[0]
        for name, child in layer.named_children():
            if name != mlp_name and next(child.parameters(), None) is not None:
                child.compile()
    return model


def compare(variant: str, base, size: dict, reps: int, scope: str = "model") -> dict:
    """Eager vs compiled training step and evaluation of one variant (see the module docstring)."""
    eager = variant_model(base, variant, size)
    compiled_model = copy.deepcopy(eager)
    compiled = compile_scope(compiled_model, scope)
    ids = batch(size)
    eval_ids = torch.randint(0, size["vocab"], (EVAL_BATCH if size is DEFAULT else 8, size["block"]),
                             generator=torch.Generator().manual_seed(1))
    out: dict = {"variant": variant, "scope": scope}
    # --- evaluation: compile time, agreement, then timing
    try:
        eager.eval(), compiled_model.eval()
        ref = eval_step(eager, eval_ids)()
        t0 = time.perf_counter()
        got = eval_step(compiled, eval_ids)()
        out["eval_compile_s"] = time.perf_counter() - t0
        out["eval_max_rel_diff"] = _rel(got, ref)
        if out["eval_max_rel_diff"] > TOL:
            raise AssertionError(f"compiled logits differ from eager by {out['eval_max_rel_diff']:.2e} (> {TOL})")
        t = interleaved({"eager": eval_step(eager, eval_ids), "compiled": eval_step(compiled, eval_ids)}, reps=reps)
        out["eval_median_s"] = medians(t)
        out["eval_compiled/eager"] = ratio(t, "compiled", "eager")
    except Exception as exc:  # a compile failure is a result here, not a crash
        out["eval_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
    # --- training: the first step of each copy from the same weights must give the same loss
    try:
        eager.train(), compiled_model.train()
        step_e, step_c = trainer(eager, ids), trainer(compiled, ids)
        loss_e = step_e()
        t0 = time.perf_counter()
        loss_c = step_c()
        out["train_compile_s"] = time.perf_counter() - t0
        out["train_loss_rel_diff"] = abs(loss_c - loss_e) / max(abs(loss_e), 1e-6)
        if out["train_loss_rel_diff"] > TOL:
            raise AssertionError(f"compiled loss {loss_c} differs from eager {loss_e} (> {TOL} relative)")
        t0 = time.perf_counter()
        step_c()  # a second compiled call: recompilation (dynamic shapes) shows here
        out["train_second_call_s"] = time.perf_counter() - t0
        t = interleaved({"eager": step_e, "compiled": step_c}, reps=reps, warmup=1)
        out["train_median_s"] = medians(t)
        out["train_compiled/eager"] = ratio(t, "compiled", "eager")
    except Exception as exc:
        out["train_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
    try:
        expl = torch._dynamo.explain(compiled_model)(input_ids=eval_ids[:2])
        out["graphs"], out["graph_breaks"] = expl.graph_count, expl.graph_break_count
        out["break_reasons"] = sorted({str(b.reason).split("\n")[0][:160] for b in expl.break_reasons})
    except Exception as exc:
        out["explain_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return out


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of dense,spectra,top2")
    p.add_argument("--scope", choices=("model", "attention"), default="model",
                   help="compile the whole model (default) or only each decoder layer's non-MLP children")
    args = p.parse_args(argv)
    setup(args.threads, args.malloc)
    size = QUICK if args.quick else DEFAULT
    reps = args.reps or (2 if args.quick else 5)
    base = base_model(size)
    results = []
    for v in args.variants.split(","):
        torch._dynamo.reset()
        res = compare(v, base, size, reps, args.scope)
        results.append(res)
        print(f"{v}: " + ", ".join(f"{k}={res[k]:.3f}" if isinstance(res[k], float) else f"{k}={res[k]}"
                                   for k in res if k not in ("variant", "eval_median_s", "train_median_s",
                                                             "break_reasons")), flush=True)

    def cell(r: dict, key: str) -> str:
        return f"{r[key]:.3f}" if key in r else ("failed" if f"{key.split('_')[0]}_error" in r else "-")

    rows = [[r["variant"], cell(r, "train_compiled/eager"), cell(r, "train_compile_s"), cell(r, "eval_compiled/eager"),
             cell(r, "eval_compile_s"), str(r.get("graphs", "-")), str(r.get("graph_breaks", "-"))] for r in results]
    print()
    print(f"torch.compile (inductor, CPU, scope={args.scope}) / eager, {args.threads} threads, median of {reps} "
          "interleaved repetitions")
    print(table(rows, ["model", "train step compiled/eager", "train compile (s)", "eval compiled/eager",
                       "eval compile (s)", "graphs", "graph breaks"]))
    payload = {"benchmark": "compile_speed", "quick": args.quick, "scope": args.scope, "model": size, "reps": reps,
               "results": results}
    path = save(f"compile_speed_{args.scope}", args.out, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
