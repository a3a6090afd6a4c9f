"""Fine-tune an upcycled model with the Hugging Face `Trainer`, a padding data collator and
`spectra.RoutingStateCallback`.

Run (a tiny LLaMA and a tiny BPE tokenizer built here; nothing is downloaded):

    python examples/trainer_finetune.py                         # SPECTRA router, 40 steps
    python examples/trainer_finetune.py --router aux_free --padding-side left
    python examples/trainer_finetune.py --model-dir path/to/hf_model   # a local HF causal-LM folder + tokenizer

What it shows:

* the texts have different lengths, so `DataCollatorForLanguageModeling(mlm=False)` pads every batch
  (labels of padding positions are -100 and the attention mask marks them; the routers skip them);
* the router losses reach the `Trainer` through ``output.loss`` (method page §1.8), and the routers'
  running statistics are updated once per optimizer step by `RoutingStateCallback` (§1.9);
* nothing fails silently: a non-finite loss, a non-finite weight after training, or routers that were
  not stepped once per optimizer step stop the script with an error.

At the end it prints the training loss and, per MoE layer, the share of tokens each expert receives on a
padded held-out batch (padding tokens excluded), then one line ``summary: {json}`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile

import torch
import transformers
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

import spectra
from spectra import metrics

WORDS = {
    "animals": "cat dog horse owl fox wolf bear deer hare mole".split(),
    "colours": "red green blue amber violet white black grey teal gold".split(),
    "numbers": "one two three four five six seven eight nine ten".split(),
}


def demo_texts(count: int, seed: int) -> list[str]:
    """`count` texts of 1–12 short sentences, each about one topic, so their lengths differ widely."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        topic = rng.choice(sorted(WORDS))
        sentences = [" ".join(rng.choices(WORDS[topic], k=rng.randint(3, 8))) + "." for _ in range(rng.randint(1, 12))]
        texts.append(f"{topic}: " + " ".join(sentences))
    return texts


def tiny_tokenizer(texts: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with its own padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def load_base(args: argparse.Namespace, texts: list[str]) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    """The dense model and its tokenizer: a local HF folder, or a tiny LLaMA built from a config."""
    if args.model_dir:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise SystemExit(f"{args.model_dir}: the tokenizer has neither a pad nor an eos token; add a pad token.")
            tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked out of the loss anyway
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        return model, tokenizer
    tokenizer = tiny_tokenizer(texts, args.vocab_size)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.AutoModelForCausalLM.from_config(config), tokenizer


class PaddingCounter:
    """Wraps a collator and counts how many positions of the batches it builds are padding."""

    def __init__(self, collator: DataCollatorForLanguageModeling) -> None:
        self.collator, self.real, self.total = collator, 0, 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        self.real += int(batch["attention_mask"].sum())
        self.total += batch["attention_mask"].numel()
        return batch

    @property
    def fraction(self) -> float:
        return 1.0 - self.real / max(1, self.total)


class StopOnNonFinite(TrainerCallback):
    """Raise as soon as a logged loss or gradient norm is NaN or infinite (the Trainer would go on)."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise FloatingPointError(f"{key} = {value} at step {state.global_step}: training diverged.")
        return control


def layer_loads(model: torch.nn.Module, tokenizer, texts: list[str]) -> dict[str, list[float]]:
    """Per MoE layer: the share of (real-token) assignments each expert gets on a padded batch, eval mode."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    loads = {}
    for layer, stats in out.routing_stats.items():
        counts = stats["tokens_per_expert"]
        loads[layer] = (counts / counts.sum()).tolist()
    return loads


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model-dir", help="local Hugging Face causal-LM folder (default: a tiny LLaMA built here)")
    parser.add_argument("--router", default="spectra", help="router or variant name (spectra.VARIANTS)")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, help="experts per token (default: the variant's, e.g. 2 for spectra)")
    parser.add_argument("--router-dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-texts", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text at most")
    parser.add_argument("--padding-side", choices=["right", "left"], default="right")
    parser.add_argument("--hidden-size", type=int, default=64, help="tiny model only")
    parser.add_argument("--layers", type=int, default=2, help="tiny model only")
    parser.add_argument("--vocab-size", type=int, default=400, help="tiny tokenizer only")
    parser.add_argument("--output-dir", help="Trainer output folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    transformers.set_seed(args.seed)
    texts = demo_texts(args.num_texts + args.batch_size, args.seed)
    train_texts, held_out = texts[:args.num_texts], texts[args.num_texts:]
    model, tokenizer = load_base(args, texts)
    tokenizer.padding_side = args.padding_side
    model = spectra.upcycle(model, router=args.router, num_experts=args.num_experts, top_k=args.top_k,
                            router_dim=args.router_dim, noise_std=0.01)

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    dataset = [{"input_ids": tokenizer(t, truncation=True, max_length=args.max_length - len(eos))["input_ids"] + eos}
               for t in train_texts]
    collator = PaddingCounter(DataCollatorForLanguageModeling(tokenizer, mlm=False))

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, warmup_steps=max(1, args.steps // 10), logging_steps=1, save_strategy="no",
            report_to="none", disable_tqdm=True, logging_nan_inf_filter=False, remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(), seed=args.seed, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                          callbacks=[spectra.RoutingStateCallback(), StopOnNonFinite()])
        result = trainer.train()

    # fail loudly instead of printing numbers from a broken run
    if collator.fraction == 0.0:
        raise SystemExit("no batch was padded: the demo texts all have one length; lower --max-length or vary them.")
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"non-finite weights after training: {bad[:5]}{' …' if len(bad) > 5 else ''}")
    updates = sorted({int(r.num_updates) for r in spectra.routers_of(model)})
    if updates != [result.global_step]:
        raise RuntimeError(f"router statistics were updated {updates} times in {result.global_step} optimizer steps; "
                           "pass spectra.RoutingStateCallback() to the Trainer.")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    loads = layer_loads(model, tokenizer, held_out)
    summary = {"router": args.router, "steps": result.global_step, "router_updates": updates[0],
               "padding_fraction": collator.fraction, "first_loss": losses[0], "last_loss": losses[-1],
               "train_loss": result.training_loss, "loads": loads}

    if not trainer.is_world_process_zero():  # under torchrun: one report
        return summary
    print(f"router {args.router}: {result.global_step} steps, padding {collator.fraction:.0%} of the batch positions")
    print(f"loss: first step {losses[0]:.4f}, last step {losses[-1]:.4f}, mean {result.training_loss:.4f}")
    print("expert load on a padded held-out batch (share of assignments per expert, eval mode):")
    for layer, load in loads.items():
        print(f"  {layer:<24} " + " ".join(f"{x:.2f}" for x in load) + f"   CV {metrics.load_cv(torch.tensor(load)):.3f}")
    print("summary: " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
