"""One training run: pretrain a dense base, or continue-train an upcycled variant.

A plain, readable loop (nanoGPT style) on HF `accelerate`, so that `accelerate launch` / `torchrun`
scale the same code to several devices unchanged. What it guarantees:

* the same data order for every variant and seed (batch b of step s is a pure function of
  `data_seed`, s and b), so variants differ only in their router and model seed;
* separate learning rates for router, experts and the rest (AdamW, cosine schedule with warm-up;
  no weight decay on router parameters, biases and norms); the router's gradient norm clipped apart from the
  rest's, so a router's own losses never scale down the LM's and the experts' updates;
* router running statistics updated exactly once per optimizer step (`step_routers`);
* per-step JSONL log: loss, router losses, per-layer load CV, MaxVio, entropy, dead experts, dropped fraction;
* resumable: an atomic checkpoint (model, optimizer, scheduler, RNG, step, log offset) every
  `save_every` steps; re-running resumes from it and ends with the same final metrics.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from spectra import metrics

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainSettings:
    """Optimisation settings of one run (params.yaml `train:` section)."""

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3  #: the rest of the model
    expert_lr: float = 1e-3
    router_lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0  #: model initialisation / routing noise
    data_seed: int = 1234  #: data order (shared by all runs)
    save_every: int = 50
    log_every: int = 1
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name}={value!r}: must be a positive integer.")
        for name in ("lr", "expert_lr", "router_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: must be > 0.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- data order
class BlockSampler:
    """Deterministic batches of token blocks: an epoch-wise permutation seeded by `data_seed`."""

    def __init__(self, blocks: np.ndarray, batch_size: int, data_seed: int, rank: int = 0, world: int = 1) -> None:
        if len(blocks) == 0:
            raise ValueError("no training blocks: the tokenized corpus is empty; rebuild it with a smaller block size.")
        self.blocks, self.batch_size, self.data_seed = blocks, batch_size, data_seed
        self.rank, self.world = rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.data_seed, epoch]).permutation(len(self.blocks))}
        return self._perms[epoch]

    def batch(self, step: int, micro: int, grad_accum: int) -> torch.Tensor:
        global_batch = self.batch_size * self.world
        start = ((step * grad_accum + micro) * global_batch) + self.rank * self.batch_size
        idx = [self._perm((start + i) // len(self.blocks))[(start + i) % len(self.blocks)] for i in range(self.batch_size)]
        return torch.from_numpy(self.blocks[np.array(idx)].astype(np.int64))


# ---------------------------------------------------------------------- optimiser
def parameter_groups(model: nn.Module, settings: TrainSettings) -> list[dict[str, Any]]:
    """AdamW groups: router (no decay), experts / dense MLPs, rest; biases and norms without decay."""
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in ("router", "expert", "expert_nd", "rest", "rest_nd")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.dim() < 2 or "norm" in name.lower() or ".ln_" in name
        if name.startswith("spectra_routers.") or ".router." in name or ".gate." in name and ".experts." not in name:
            groups["router"].append(p)
        elif ".experts." in name or ".mlp." in name:
            groups["expert_nd" if no_decay else "expert"].append(p)
        else:
            groups["rest_nd" if no_decay else "rest"].append(p)
    s = settings
    spec = {
        "router": (s.router_lr, 0.0), "expert": (s.expert_lr, s.weight_decay), "expert_nd": (s.expert_lr, 0.0),
        "rest": (s.lr, s.weight_decay), "rest_nd": (s.lr, 0.0),
    }
    return [{"params": ps, "lr": spec[k][0], "weight_decay": spec[k][1], "name": k} for k, ps in groups.items() if ps]


def cosine_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    warm, total, floor = settings.warmup_steps, settings.steps, settings.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------- logging
def routing_log(outputs: Any) -> dict[str, Any]:
    """Per-layer load CV, MaxVio, entropy, dead-expert fraction and dropped fraction (real tokens that a
    capacity or expert choice left to the residual path; 0 when dropless) from a model output."""
    stats = getattr(outputs, "routing_stats", None) or {}
    record: dict[str, Any] = {}
    for name, key in (("load_cv", "cv"), ("max_vio", "max_vio"), ("dead_fraction", "dead_fraction")):
        record[name] = [metrics.summarise_load(s["tokens_per_expert"])[key] for s in stats.values()]
    record["entropy"] = [float(s["routing_entropy"]) for s in stats.values()]
    record["dropped_fraction"] = [float(s["dropped_fraction"]) for s in stats.values()]
    return record


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint; a truncated or corrupted file is a clear error, never half-loaded."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means corruption
        raise RuntimeError(
            f"checkpoint {path} is corrupted or truncated ({type(exc).__name__}: {exc}); delete it to restart the run "
            "from scratch.") from exc
    required = {"model", "optimizer", "scheduler", "step", "rng", "log_lines", "fingerprint"}
    if not isinstance(state, dict) or not required <= set(state):
        raise RuntimeError(f"checkpoint {path} is incomplete (missing {sorted(required - set(state or {}))}); delete it to restart.")
    return state


# ---------------------------------------------------------------------- the loop
def train(
    model: nn.Module,
    train_blocks: np.ndarray,
    settings: TrainSettings,
    run_dir: str | Path,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    fingerprint: str = "",
    stop_after: int | None = None,
    evaluate: Callable[[nn.Module, int], dict[str, Any]] | None = None,
    eval_steps: Sequence[int] = (),
) -> dict[str, Any]:
    """Train `model` (an HF causal LM, dense or upcycled) for `settings.steps` optimizer steps.

    Writes `run_dir/log.jsonl` (one line per step) and `run_dir/checkpoint.pt` (every
    `save_every` steps and at the end). `fingerprint` identifies the run configuration: a checkpoint
    written under another fingerprint is ignored (the run starts afresh), never resumed. `stop_after` stops
    early after that many steps (used by tests to simulate an interruption). `evaluate(model, step)` is called
    after the optimizer steps listed in `eval_steps` (the model in eval mode, no autograd; set back to train mode
    after); what it returns is merged into that step's log line (e.g. a held-out loss: the learning curve), so a
    resumed run keeps the evaluations of the steps its checkpoint covers. Returns a summary.
    """
    from accelerate import Accelerator

    from spectra.upcycle import step_routers

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    seed_everything(settings.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(parameter_groups(model, settings), betas=(0.9, 0.95), eps=1e-8)
    scheduler = cosine_schedule(optimizer, settings)
    ckpt_path, log_path = run_dir / CHECKPOINT_NAME, run_dir / "log.jsonl"

    start_step, log_lines = 0, 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
    else:
        state = None
    if state is not None and state["fingerprint"] != fingerprint:
        print(f"[train] {ckpt_path} was written by another configuration; starting this run afresh.")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, log_lines = state["step"], state["log_lines"]
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
    # keep exactly the log lines of the steps the checkpoint covers
    lines = log_path.read_text().splitlines()[:log_lines] if log_path.exists() else []
    log_path.write_text("".join(line + "\n" for line in lines))

    model, optimizer = accelerator.prepare(model, optimizer)
    router_params = [p for g in optimizer.param_groups if g.get("name") == "router" for p in g["params"]]
    model_params = [p for g in optimizer.param_groups if g.get("name") != "router" for p in g["params"]]
    raw = accelerator.unwrap_model(model)
    sampler = BlockSampler(train_blocks, settings.batch_size, settings.data_seed,
                           accelerator.process_index, accelerator.num_processes)
    model.train()
    tokens_per_step = settings.batch_size * settings.grad_accum * accelerator.num_processes * train_blocks.shape[1]
    t0 = time.perf_counter()
    end = settings.steps if stop_after is None else min(settings.steps, start_step + stop_after)

    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, end), initial=start_step, total=settings.steps, desc=run_dir.name,
               disable=not accelerator.is_local_main_process, mininterval=2.0)
    for step in bar:
        loss_sum, router_sum, router_parts, outputs = 0.0, 0.0, {}, None
        for micro in range(settings.grad_accum):
            batch = sampler.batch(step, micro, settings.grad_accum).to(accelerator.device)
            outputs = model(input_ids=batch, labels=batch)
            accelerator.backward(outputs.loss / settings.grad_accum)
            loss_sum += float(outputs.loss.detach()) / settings.grad_accum
            rl = getattr(outputs, "router_loss", None)
            if rl is not None:
                router_sum += float(rl.detach()) / settings.grad_accum
                for k, v in (getattr(outputs, "router_losses", None) or {}).items():
                    router_parts[k] = router_parts.get(k, 0.0) + float(v.detach()) / settings.grad_accum
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"{run_dir.name}: loss became {loss_sum} at step {step}; lower the learning rate.")
        # the router's gradient is clipped apart from the rest: one global norm would let a router's losses shrink
        # every update of the LM and the experts (a confound between routers)
        grad_norm = accelerator.clip_grad_norm_(model_params, settings.grad_clip)
        router_grad_norm = (accelerator.clip_grad_norm_(router_params, settings.grad_clip) if router_params
                            else torch.zeros(()))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_routers(raw)
        record = {"step": step + 1, "loss": loss_sum, "lm_loss": loss_sum - router_sum, "router_loss": router_sum,
                  "router_losses": router_parts, "grad_norm": float(grad_norm),
                  "router_grad_norm": float(router_grad_norm), "lr": scheduler.get_last_lr()[0],
                  "tokens": (step + 1) * tokens_per_step, **routing_log(outputs)}
        if evaluate is not None and step + 1 in eval_steps:
            raw.eval()
            with torch.no_grad():
                record.update(evaluate(raw, step + 1))
            raw.train()
        if accelerator.is_main_process and ((step + 1) % settings.log_every == 0 or step + 1 == settings.steps
                                            or step + 1 in eval_steps):
            with log_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            log_lines += 1
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if on_step is not None:
            on_step(step + 1, record)
        if accelerator.is_main_process and ((step + 1) % settings.save_every == 0 or step + 1 == settings.steps):
            _atomic_torch_save({
                "model": raw.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step + 1, "log_lines": log_lines, "fingerprint": fingerprint,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            }, ckpt_path)
    bar.close()
    elapsed = time.perf_counter() - t0
    done = end - start_step
    return {
        "steps": end, "completed": end == settings.steps, "tokens_seen": end * tokens_per_step,
        "settings": asdict(settings),
        # measurements, not results: callers keep them apart from the deterministic metrics
        "timing": {"train_seconds_this_session": elapsed, "steps_this_session": done,
                   "tokens_per_second": done * tokens_per_step / elapsed if elapsed > 0 and done else None},
    }
