"""Data-parallel training of an upcycled model with HF `accelerate`; the router state stays identical
on every process.

Run on 2 CPU processes (gloo) — this is the invocation that works on a CPU-only machine:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no examples/accelerate_ddp.py

(``--multi_gpu`` only selects accelerate's multi-process launcher; without GPUs the processes run on the
CPU with the gloo backend. ``accelerate launch --cpu --num_processes 2`` starts ONE process. Add
``--main_process_port PORT`` if the default port 29500 is taken.) Equivalent:
``torchrun --nproc_per_node 2 examples/accelerate_ddp.py``; a single process: ``python examples/accelerate_ddp.py``.

Options: ``--router aux_free`` (any `spectra.VARIANTS` name), ``--model-dir path/to/hf_model`` (a local
HF causal-LM folder instead of the tiny LLaMA built here), ``--steps``, ``--batch-size`` …

Each process trains on its own shard of a synthetic token stream (a plain loop: forward, backward,
optimizer step, then `spectra.step_routers(model)` — method page §1.9). The routers' running statistics
(load EMA, SPECTRA's Ē EMA and potential average, the aux-free bias, the step counter) are reduced
across processes inside ``step_routers``. At the end every process compares each of its router buffers
with process 0's and the script exits with status 1 if any differs. DDP's unused-parameter search is
turned on only where an expert can get no gradient (`needs_unused_parameter_search`). Prints the loss,
the per-layer expert loads of the last step, and one line ``summary: {json}`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.distributed as dist
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

import spectra
from spectra import metrics


def tiny_llama(vocab_size: int, hidden_size: int, layers: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
        pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config)


def shard_batch(step: int, rank: int, batch_size: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Process `rank`'s batch at `step`: sequences ``a, a+d, a+2d, … (mod V)`` with a per-sequence start a
    and stride d — learnable, and different on every process."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    start = torch.randint(1, vocab_size, (batch_size, 1), generator=g)
    stride = torch.randint(1, 8, (batch_size, 1), generator=g)
    return (start + stride * torch.arange(seq_len)) % (vocab_size - 1) + 1


def router_state_mismatches(model: torch.nn.Module) -> list[str]:
    """Names of the router buffers of this process that differ from process 0's (empty on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    mismatches = []
    for name, buf in model.spectra_routers.named_buffers():
        reference = buf.detach().clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(buf, reference):
            mismatches.append(name)
    return mismatches


def needs_unused_parameter_search(model: torch.nn.Module) -> bool:
    """Whether DDP must look for parameters without gradient (``find_unused_parameters=True``): only when an
    expert can be skipped entirely. Upcycled recognised MLPs become `spectra.experts.GroupedExperts`, whose
    experts without tokens still report an all-zero gradient; an ``nn.ModuleList`` of generic expert copies
    does not call an expert that gets no token, so its parameters have no gradient on that process."""
    return any(isinstance(getattr(getattr(block, "moe", None), "experts", None), torch.nn.ModuleList)
               for block in spectra.routed_modules(model))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="local Hugging Face causal-LM folder (default: a tiny LLaMA built here)")
    parser.add_argument("--router", default="spectra", help="router or variant name (spectra.VARIANTS)")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, help="experts per token (default: the variant's, e.g. 2 for spectra)")
    parser.add_argument("--router-dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per process and step")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden-size", type=int, default=64, help="tiny model only")
    parser.add_argument("--layers", type=int, default=2, help="tiny model only")
    parser.add_argument("--vocab-size", type=int, default=256, help="tiny model only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)  # the same initial model on every process
    if args.model_dir:
        dense = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    else:
        dense = tiny_llama(args.vocab_size, args.hidden_size, args.layers)
    vocab_size = dense.config.get_text_config().vocab_size
    model = spectra.upcycle(dense, router=args.router, num_experts=args.num_experts, top_k=args.top_k,
                            router_dim=args.router_dim, noise_std=0.01)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=needs_unused_parameter_search(model))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    model.train()

    losses = []
    for step in range(args.steps):
        ids = shard_batch(step, accelerator.process_index, args.batch_size, args.seq_len, vocab_size,
                          args.seed).to(accelerator.device)
        out = model(input_ids=ids, labels=ids)
        loss = out.loss.detach()
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"process {accelerator.process_index}: loss {float(loss)} at step {step}.")
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        spectra.step_routers(raw)  # once per optimizer step, after it
        losses.append(float(accelerator.reduce(loss, reduction="mean")))

    updates = sorted({int(r.num_updates) for r in spectra.routers_of(raw)})
    mismatches = router_state_mismatches(raw)
    flags = accelerator.gather(torch.tensor([len(mismatches)], device=accelerator.device))
    loads = {layer: (s["tokens_per_expert"] / s["tokens_per_expert"].sum()).tolist()
             for layer, s in out.routing_stats.items()}
    if mismatches:
        print(f"process {accelerator.process_index}: router buffers differ from process 0: {mismatches}",
              file=sys.stderr, flush=True)
    identical = int(flags.sum()) == 0
    ok = identical and updates == [args.steps]
    if accelerator.is_main_process:
        n = accelerator.num_processes
        print(f"router {args.router}: {args.steps} steps on {n} process(es) ({accelerator.distributed_type.value})")
        print(f"loss (mean over processes): first step {losses[0]:.4f}, last step {losses[-1]:.4f}")
        print("expert load of the last step on process 0 (share of assignments per expert):")
        for layer, load in loads.items():
            print(f"  {layer:<24} " + " ".join(f"{x:.2f}" for x in load) + f"   CV {metrics.load_cv(torch.tensor(load)):.3f}")
        names = ", ".join(name for name, _ in raw.spectra_routers.named_buffers())
        if identical:
            print(f"router state identical on all {n} processes ({names})")
        else:
            print(f"ERROR: router state differs from process 0's on {int((flags > 0).sum())} of {n} processes",
                  file=sys.stderr)
        if updates != [args.steps]:
            print(f"ERROR: routers were updated {updates} times in {args.steps} steps", file=sys.stderr)
        print("summary: " + json.dumps({"router": args.router, "processes": n, "steps": args.steps,
                                        "router_updates": updates, "first_loss": losses[0], "last_loss": losses[-1],
                                        "loads": loads, "state_identical": identical}), flush=True)
    # Drop the DDP wrapper (its reducer holds the process group) before the process group itself: a gloo
    # process group destroyed from the reducer's destructor can deadlock with its own worker threads.
    model = optimizer = None
    accelerator.free_memory()
    accelerator.end_training()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
