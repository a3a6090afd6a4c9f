"""Router running statistics under multi-process data parallelism (issue 10 item 3).

Method page §1.9: every running statistic is updated once per optimizer step; §1.7: the potential
average ḡ is "reduced across processes". Under DDP each rank routes its *own* data shard, so a rank
that updates its buffers from its own records alone ends with a state of its own (and DDP's
``broadcast_buffers`` only copies rank 0's, i.e. rank 0's shard wins). The contract tested here:
after ``spectra.step_routers`` every rank holds the same router buffers, and they equal what one
process computes on the global batch (the concatenation of the shards) — a real reduction.

"One process on the global batch" means, per router:

* ``aux_free`` (token-wise routing): one forward on the concatenated shards;
* ``spectra``: the concatenated shards as the ranks' micro-batches of one optimizer step. Sinkhorn's
  column marginals and the batch Ē are batch-level (§1.4, §1.6), so each rank balances its own shard,
  exactly as each micro-batch of gradient accumulation does; the per-step statistics (counts, Ē per
  layer, column potentials) are then averaged over all records of the step.

Two CPU processes (gloo), spawned once for the whole module, a few seconds.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP

import spectra
from spectra.upcycle import OUTPUT_KEYS

WORLD, STEPS, LAYERS, VOCAB, LR = 2, 3, 2, 96, 1e-2
ROUTERS = ("aux_free", "spectra")
SPAWN_TIMEOUT_S = 150

pytestmark = pytest.mark.timeout(240)


# ------------------------------------------------------------------------------------ shared pieces
def tiny_model(router: str, seed: int = 0, grouped: bool = True, top_k: int | None = 2) -> torch.nn.Module:
    """A 2-layer LLaMA, upcycled (E=4, k=2; None: the variant's k); identical on every rank for one seed."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return spectra.upcycle(model, router=router, num_experts=4, top_k=top_k, router_dim=8, noise_std=0.1,
                           extra={} if grouped else {"grouped_experts": False}).train()


def shard(step: int, rank: int) -> torch.Tensor:
    """Rank r's batch at step s: tokens from its own half of the vocabulary, so shards route differently."""
    half = VOCAB // WORLD
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(1 + rank * half, (rank + 1) * half, (2, 12), generator=g)


def router_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every router buffer (num_updates, load_ema, expert_bias, ebar_ema, ... and any added later)."""
    (routers,) = [m for n, m in model.named_modules() if n.endswith("spectra_routers")]
    return {name: b.detach().clone() for name, b in routers.named_buffers()}


def train(model: torch.nn.Module, batches_of_step, wrapped: torch.nn.Module | None = None) -> None:
    """STEPS optimizer steps; each step averages the loss over its micro-batches, then `step_routers`."""
    net = wrapped if wrapped is not None else model
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    for step in range(STEPS):
        micro = batches_of_step(step)
        for ids in micro:
            loss = net(input_ids=ids, labels=ids).loss / len(micro)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss {float(loss)} at step {step}")
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        spectra.step_routers(net)


def reference(router: str, ranks: tuple[int, ...] = tuple(range(WORLD))) -> dict[str, torch.Tensor]:
    """One process, the global batch of `ranks`' shards (see the module docstring)."""
    model = tiny_model(router)
    if router == "aux_free":
        train(model, lambda step: [torch.cat([shard(step, r) for r in ranks])])
    else:
        train(model, lambda step: [shard(step, r) for r in ranks])
    return router_buffers(model)


def blocked_expert_run(experts: str, find_unused: bool) -> str:
    """STEPS DDP steps of an aux-free model whose last expert can never be chosen (bias −1e4), so it
    receives no token. Returns "ok" (trained, and the output still carries the routing extras of
    `spectra.upcycle`) or the error. `experts`: "grouped" (`spectra.experts.GroupedExperts`, the
    default for recognised MLPs) or "generic" (an ``nn.ModuleList`` of copies)."""
    model = tiny_model("aux_free", grouped=experts == "grouped")
    for r in spectra.routers_of(model):
        r.expert_bias[-1] = -1e4
    ddp = DDP(model, find_unused_parameters=find_unused)
    try:
        train(model, lambda step: [shard(step, dist.get_rank())], wrapped=ddp)
        ids = shard(STEPS, dist.get_rank())
        out = ddp(input_ids=ids, labels=ids)
    except Exception as exc:  # noqa: BLE001 - the message is what the tests check
        return f"{type(exc).__name__}: {exc}"
    missing = [k for k in OUTPUT_KEYS if getattr(out, k, None) is None]
    return f"output lacks {missing}" if missing else "ok"


# ------------------------------------------------------------------------------------ the 2 ranks
def ddp_run(router: str, rank: int) -> dict[str, torch.Tensor]:
    """STEPS DDP steps on this rank's shards; the router buffers at the end. Every expert gets tokens from
    these shards, so DDP's default (no unused-parameter search) works; the general case (an expert without
    tokens) is the subject of the ``blocked`` runs. The DDP wrapper is freed on return, before the process
    group (a gloo group destroyed from a reducer's destructor can deadlock with its worker threads)."""
    model = tiny_model(router)
    train(model, lambda step: [shard(step, rank)], wrapped=DDP(model))
    return router_buffers(model)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    result: dict = {}
    try:
        for router in ROUTERS:
            result[router] = ddp_run(router, rank)
        for experts in ("grouped", "generic"):
            for find_unused in (False, True):
                result[f"blocked/{experts}/find_unused={find_unused}"] = blocked_expert_run(experts, find_unused)
    except Exception:  # noqa: BLE001 - reported by the parent test
        result["error"] = traceback.format_exc()
    finally:
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """Run `_worker` on 2 spawned CPU processes once; the results of each rank."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(_worker, args=(init_file, tmp), nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_TIMEOUT_S} s (collective mismatch?)")
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, torch.Tensor]]:
    return {router: reference(router) for router in ROUTERS}


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("router", ROUTERS)
def test_router_state_is_identical_on_every_rank(ranks, router):
    state0 = ranks[0][router]
    assert int(state0["0.num_updates"]) == STEPS
    for r in range(1, WORLD):
        for name, value in state0.items():
            assert torch.equal(ranks[r][router][name], value), (
                f"{router}: buffer {name} differs between rank 0 and rank {r}: each rank updated it from its own shard")


@pytest.mark.parametrize("router", ROUTERS)
def test_router_state_equals_one_process_on_the_global_batch(ranks, references, router):
    expected = references[router]
    assert set(ranks[0][router]) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ranks[0][router][name], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{router}: buffer {name} is not the global-batch value: {m}")


@pytest.mark.parametrize("router", ROUTERS)
def test_shards_really_route_differently(references, router):
    """Guards the two tests above: rank 0's shard alone gives another state than the global batch,
    so neither 'keep each rank's own state' nor 'broadcast rank 0's' can pass them."""
    own = reference(router, ranks=(0,))
    differs = [n for n, v in references[router].items()
               if v.is_floating_point() and not torch.allclose(own[n], v, rtol=1e-4, atol=1e-5)]
    assert "0.load_ema" in differs
    if router == "aux_free":
        assert any(n.endswith("expert_bias") for n in differs)
    else:
        assert "0.ebar_ema" in differs


def test_ddp_default_trains_grouped_experts_when_one_gets_no_token(ranks):
    """`GroupedExperts` take every expert weight as an input of one autograd function, so an expert without
    tokens still reports an (all-zero) gradient to DDP: the default ``find_unused_parameters=False`` works."""
    for r in range(WORLD):
        assert ranks[r]["blocked/grouped/find_unused=False"] == "ok", ranks[r]["blocked/grouped/find_unused=False"]


def test_ddp_raises_on_a_generic_expert_without_tokens_unless_find_unused_parameters(ranks):
    """A ``ModuleList`` expert that receives no token is not called, its parameters get no gradient and DDP's
    default stops at the next forward: such models need ``find_unused_parameters=True``."""
    for r in range(WORLD):
        message = ranks[r]["blocked/generic/find_unused=False"]
        assert message.startswith("RuntimeError") and "find_unused_parameters" in message, message


@pytest.mark.parametrize("experts", ["grouped", "generic"])
def test_ddp_with_find_unused_parameters_trains_and_keeps_the_routing_outputs(ranks, experts):
    """With ``find_unused_parameters=True`` DDP rebuilds the model output from its fields; the output of an
    upcycled model must survive that with ``router_loss``, ``router_losses`` and ``routing_stats``."""
    for r in range(WORLD):
        result = ranks[r][f"blocked/{experts}/find_unused=True"]
        assert result == "ok", result


@pytest.mark.parametrize("variant", list(spectra.VARIANTS))
def test_every_router_parameter_gets_a_gradient(variant):
    """Router parameters are always used in a training step (so they never need find_unused_parameters;
    only experts without tokens do)."""
    model = tiny_model(variant, top_k=None)
    ids = shard(0, 0)
    model(input_ids=ids, labels=ids).loss.backward()
    (routers,) = [m for n, m in model.named_modules() if n.endswith("spectra_routers")]
    unused = [n for n, p in routers.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{variant}: router parameters without gradient: {unused}"
