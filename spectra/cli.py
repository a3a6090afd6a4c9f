"""Command line (``spectra ...`` or ``python -m spectra ...``): the upcycler, the router swap and a
routing inspector on saved Hugging Face model folders (method page §4 and §5).

    spectra upcycle DENSE_DIR OUT_DIR --router spectra --num-experts 8 --top-k 2 [--every-n 2] [--noise-std 0.01]
    spectra swap-router MOE_DIR OUT_DIR --router spectra [--init-from-gate]
    spectra inspect MODEL_DIR TEXT_FILE [--json] [--plot heatmap.png]

User errors (a missing folder, a folder that is not a SPECTRA-MoE model, an unknown router, an
impossible setting) print one line ``spectra <command>: error: <problem>; <fix>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import fields
from typing import Any, Sequence

import torch

from . import metrics
from .config import VARIANTS, ConfigError, MoEConfig
from .hf_auto import MODEL_TYPE
from .upcycle import CONFIG_KEY, UnsupportedModelError

#: Tokenizer files copied next to a converted model when the source folder has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
#: MoEConfig fields set by their own options (or by the model), not by ``--set``.
_OWN_OPTIONS = {"router", "num_experts", "top_k", "hidden_size", "variant", "extra"}


class CLIError(Exception):
    """A user error: printed as one line (problem and fix), exit status 2. ``prog``: the command it
    belongs to, when known before the arguments are parsed (usage errors)."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and pointing at ``--help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see `{self.prog} --help`)", prog=self.prog)


# ---------------------------------------------------------------------------------------------- folders
def _read_config(folder: str) -> dict[str, Any]:
    """The ``config.json`` of a model folder, with a clear error when there is none."""
    if not os.path.isdir(folder):
        raise CLIError(f"model folder {folder!r} not found; pass a folder written by save_pretrained "
                       "(download a Hub model first, e.g. `hf download ORG/NAME --local-dir DIR`).")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CLIError(f"{folder!r} has no config.json, so it is not a Hugging Face model folder; "
                       "save the model there with model.save_pretrained(folder).")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(f"{path} is not a readable JSON config ({exc}); save the model again with save_pretrained.") from exc


def _is_spectra(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE or bool(config.get(CONFIG_KEY))


def _describe(config: dict[str, Any]) -> str:
    settings = config.get(CONFIG_KEY) or {}
    router = (settings.get("moe_config") or {}).get("router", "?")
    return f"router {router}, made by `spectra {'swap-router' if settings.get('mode') == 'swap' else 'upcycle'}`"


def _load_hf_model(folder: str) -> torch.nn.Module:
    """A plain (dense or MoE) HF causal LM from a local folder."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder).eval()
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"cannot load a causal LM from {folder!r}: {first}") from exc


def _check_output(folder: str, overwrite: bool) -> None:
    if os.path.exists(os.path.join(folder, "config.json")) and not overwrite:
        raise CLIError(f"{folder!r} already holds a model; choose a new output folder or pass --overwrite.")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CLIError(f"output {folder!r} is a file; choose a folder.")


def copy_tokenizer(source: str, target: str) -> list[str]:
    """Copy the tokenizer files (`TOKENIZER_FILES`) of ``source`` into ``target``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(target, name))
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------------------------- options
def _layers(text: str) -> str | list[int]:
    """``--layers``: ``all`` or comma-separated decoder-layer indices (negative = from the end)."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'all' or a comma-separated list of layer indices like 0,2,-1")


def _setting(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``: one more `MoEConfig` field (VALUE parsed as YAML: 64, 0.5, true, null, depth)."""
    import yaml

    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    allowed = sorted(f.name for f in fields(MoEConfig) if f.name not in _OWN_OPTIONS)
    if not sep or key not in allowed:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY one of {', '.join(allowed)}")
    return key, yaml.safe_load(value)


def _router_options(p: argparse.ArgumentParser, default_router: str | None) -> None:
    p.add_argument("--router", default=default_router, choices=list(VARIANTS), metavar="NAME",
                   help=f"router or paper variant (default: {default_router}); one of: {', '.join(VARIANTS)}")
    p.add_argument("--top-k", type=int, default=None, help="experts per token k (default: the router's / model's)")
    p.add_argument("--set", dest="settings", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                   help="any other MoEConfig field, e.g. --set router_dim=64 --set sinkhorn_iters=5 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new router (and expert noise) initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in OUT_DIR")


# ---------------------------------------------------------------------------------------------- commands
def cmd_upcycle(args: argparse.Namespace) -> int:
    """Dense HF folder → SPECTRA-MoE folder (`spectra.upcycle`, then ``save_pretrained``)."""
    from .upcycle import upcycle

    config = _read_config(args.model)
    if _is_spectra(config):
        raise CLIError(f"{args.model!r} is already a SPECTRA-MoE model ({_describe(config)}); upcycle the dense model "
                       "it came from instead.")
    _check_output(args.output, args.overwrite)
    model = _load_hf_model(args.model)
    torch.manual_seed(args.seed)
    try:
        upcycle(model, router=args.router, num_experts=args.num_experts, top_k=args.top_k, layers=args.layers,
                every_n=args.every_n, noise_std=args.noise_std, **dict(args.settings))
    except ValueError as exc:  # ConfigError, UnsupportedModelError, a layer out of range, an MoE model, ...
        raise CLIError(str(exc)) from exc
    return _save(model, args, "upcycled")


def cmd_swap_router(args: argparse.Namespace) -> int:
    """HF MoE folder (Mixtral, Qwen2/3-MoE, OLMoE, …) → the same experts with a new router."""
    from .upcycle import swap_router

    config = _read_config(args.model)
    if _is_spectra(config):
        raise CLIError(f"{args.model!r} is already a SPECTRA-MoE model ({_describe(config)}); swap-router takes the "
                       "original MoE model folder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) - pass that one.")
    _check_output(args.output, args.overwrite)
    model = _load_hf_model(args.model)
    torch.manual_seed(args.seed)
    try:
        swap_router(model, router=args.router, init_from_gate=args.init_from_gate, top_k=args.top_k,
                    **dict(args.settings))
    except UnsupportedModelError as exc:
        raise CLIError(f"{exc} (command line: `spectra upcycle DENSE_DIR OUT_DIR`)") from exc
    except ValueError as exc:  # ConfigError, init_from_gate with a router without a gate, ...
        raise CLIError(str(exc)) from exc
    return _save(model, args, "router swapped")


def _save(model: torch.nn.Module, args: argparse.Namespace, verb: str) -> int:
    from .upcycle import moe_config_of, spectra_settings

    model.save_pretrained(args.output)
    copied = copy_tokenizer(args.model, args.output)
    cfg, settings = moe_config_of(model), spectra_settings(model)
    tokenizer = f"tokenizer copied ({len(copied)} files)" if copied else "no tokenizer files in the source folder"
    print(f"{verb} {type(model).__name__}: MoE layers {settings['layers']}, router {cfg.router}, "
          f"E={cfg.num_experts}, k={cfg.top_k} -> {args.output} ({tokenizer})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Routing statistics of a saved SPECTRA-MoE model on a text file (method page §5 metrics)."""
    from .upcycle import load, moe_config_of

    config = _read_config(args.model)
    if not _is_spectra(config):
        raise CLIError(f"{args.model!r} is not a SPECTRA-MoE model (model type {config.get('model_type')!r}); convert "
                       f"it first: `spectra upcycle {args.model} OUT_DIR` (or `spectra swap-router` for an MoE model).")
    if not os.path.isfile(args.text):
        raise CLIError(f"text file {args.text!r} not found; pass a UTF-8 text file to route.")
    if args.plot:
        _pyplot()  # fail before the model runs
    tokenizer = _tokenizer(args.tokenizer or args.model, given=args.tokenizer is not None)
    with open(args.text, encoding="utf-8", errors="replace") as fh:
        ids = tokenizer(fh.read(), add_special_tokens=False)["input_ids"][: args.max_tokens]
    if not ids:
        raise CLIError(f"{args.text!r} gives no tokens; pass a non-empty text file.")
    model = load(args.model)
    seq_len = args.seq_len or min(512, getattr(model.config, "max_position_embeddings", None) or 512)
    report = routing_report(model, ids, seq_len, args.batch_size)
    cfg = moe_config_of(model)
    report = {"model": args.model, "text": args.text, "architecture": type(model).__name__, "router": cfg.router,
              "num_experts": cfg.num_experts, "top_k": cfg.top_k, "seq_len": seq_len, **report}
    if args.plot:
        plot_heatmap(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        if args.plot:
            print(f"heatmap (MoE layer x expert load share) written to {args.plot}")
    return 0


def _tokenizer(source: str, given: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        where = f"--tokenizer {source!r}" if given else f"{source!r}"
        raise CLIError(f"no usable tokenizer in {where} ({type(exc).__name__}); pass --tokenizer DIR with the "
                       "tokenizer files of the base model.") from exc


@torch.no_grad()
def routing_report(model: torch.nn.Module, ids: Sequence[int], seq_len: int, batch_size: int = 8) -> dict[str, Any]:
    """Eval-mode routing of ``ids`` cut into sequences of ``seq_len`` tokens, per MoE layer: assignments
    per expert and their share, the mean normalised routing entropy and the load metrics of
    `metrics.summarise_load` (cv, max_vio, gini, dead_fraction, load_entropy); ``mean`` over layers."""
    model.eval()
    device = next(model.parameters()).device
    tokens = torch.tensor(list(ids), dtype=torch.long)
    full = len(tokens) // seq_len
    batches = list(tokens[: full * seq_len].view(full, seq_len).split(batch_size)) if full else []
    if len(tokens) % seq_len:
        batches.append(tokens[full * seq_len:].unsqueeze(0))
    loads: dict[str, torch.Tensor] = {}
    entropy: dict[str, float] = {}
    routed: dict[str, float] = {}
    for batch in batches:
        out = model(input_ids=batch.to(device))
        for name, stats in out.routing_stats.items():
            n = float(stats["num_tokens"])
            loads[name] = loads.get(name, 0) + stats["tokens_per_expert"].detach().double().cpu()
            entropy[name] = entropy.get(name, 0.0) + float(stats["routing_entropy"]) * n
            routed[name] = routed.get(name, 0.0) + n
    layers = []
    for name, load in loads.items():
        share = (load / load.sum().clamp_min(1)).tolist()
        layers.append({"name": name, "tokens": int(routed[name]), "tokens_per_expert": [int(c) for c in load.tolist()],
                       "load_share": share, "routing_entropy": entropy[name] / max(routed[name], 1.0),
                       **metrics.summarise_load(load)})
    keys = ["routing_entropy", "cv", "max_vio", "gini", "dead_fraction", "load_entropy"]
    mean = {k: sum(layer[k] for layer in layers) / len(layers) for k in keys} if layers else {}
    return {"tokens": len(tokens), "sequences": sum(len(b) for b in batches), "layers": layers, "mean": mean}


def format_table(report: dict[str, Any]) -> str:
    """The ``inspect`` table: one row per MoE layer (load share per expert, entropy, load CV), then the mean."""
    e = report["num_experts"]
    width = max([len("MoE layer")] + [len(layer["name"]) for layer in report["layers"]])
    head = (f"{report['model']} ({report['architecture']}, router {report['router']}, E={e}, k={report['top_k']}) on "
            f"{report['text']}: {report['tokens']} tokens in {report['sequences']} sequences of <= {report['seq_len']}")
    cols = f"{'MoE layer':<{width}}  {'tokens':>7}  " + " ".join(f"{f'e{i}':>6}" for i in range(e))
    lines = [head, "load share of the token-expert assignments per expert; entropy = mean normalised routing entropy",
             cols + f"  {'entropy':>7}  {'load_cv':>7}"]
    for layer in report["layers"]:
        shares = " ".join(f"{100 * s:5.1f}%" for s in layer["load_share"])
        lines.append(f"{layer['name']:<{width}}  {layer['tokens']:>7}  {shares}  {layer['routing_entropy']:>7.3f}  "
                     f"{layer['cv']:>7.3f}")
    if report["mean"]:
        pad = " " * (7 * e - 1)
        lines.append(f"{'mean over layers':<{width}}  {'':>7}  {pad}  {report['mean']['routing_entropy']:>7.3f}  "
                     f"{report['mean']['cv']:>7.3f}")
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise CLIError("--plot needs matplotlib, which is not installed; `pip install matplotlib` or drop --plot.") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(report: dict[str, Any], path: str) -> None:
    """Heatmap of the load share, MoE layer (rows) × expert (columns), written to ``path``."""
    plt = _pyplot()
    share = [layer["load_share"] for layer in report["layers"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 3.0 + 0.35 * report["num_experts"]), max(2.8, 1.4 + 0.3 * len(share))))
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(report["num_experts"]))
    ax.set_yticks(range(len(share)), [layer["name"] for layer in report["layers"]], fontsize=7)
    ax.set_title(f"{report['router']}: load share, {report['tokens']} tokens", fontsize=9)
    fig.colorbar(image, ax=ax, label="share of assignments")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise CLIError(f"cannot write the heatmap to {path!r} ({exc.strerror}); choose a writable path.") from exc
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``spectra`` argument parser (one sub-parser per command)."""
    from . import __version__

    parser = _Parser(prog="spectra", description="SPECTRA-MoE: upcycle Hugging Face models to Sinkhorn-routed MoE, swap "
                     "the router of MoE models, inspect routing. Folders are Hugging Face model folders.")
    parser.add_argument("--version", action="version", version=f"spectra-moe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("upcycle", help="dense model folder -> SPECTRA-MoE folder",
                       description="Replace the MLPs of a dense Hugging Face causal LM by MoE blocks whose experts are "
                       "copies of the MLP (method page §4) and save the result (tokenizer files are copied).")
    p.add_argument("model", metavar="DENSE_DIR", help="folder of the dense model (save_pretrained output)")
    p.add_argument("output", metavar="OUT_DIR", help="folder for the upcycled model")
    _router_options(p, "spectra")
    p.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer E (default: the router's, 8)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layers", type=_layers, default="all", help="'all' (default) or decoder-layer indices: 0,2,-1")
    which.add_argument("--every-n", type=int, default=None, metavar="N",
                       help="convert layers i with (i+1) %% N == 0 (HF decoder_sparse_step convention)")
    p.add_argument("--noise-std", type=float, default=0.0, help="relative Gaussian noise on each expert copy (default 0)")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("swap-router", help="MoE model folder -> same experts, new router",
                       description="Keep the experts of a Hugging Face MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
                       "...) and replace only its router (method page §4); save the result.")
    p.add_argument("model", metavar="MOE_DIR", help="folder of the MoE model (save_pretrained output)")
    p.add_argument("output", metavar="OUT_DIR", help="folder for the model with the new router")
    _router_options(p, "spectra")
    p.add_argument("--init-from-gate", action="store_true",
                   help="initialise a linear router's gate from the old gate (switch_top1, top2, gshard_top2, aux_free, "
                   "expert_choice)")
    p.set_defaults(func=cmd_swap_router)

    p = sub.add_parser("inspect", help="routing statistics of a SPECTRA-MoE folder on a text file",
                       description="Route a text file through a saved SPECTRA-MoE model (eval mode) and report, per MoE "
                       "layer, the load share of every expert, the normalised routing entropy and the load CV "
                       "(method page §5).")
    p.add_argument("model", metavar="MODEL_DIR", help="folder written by `spectra upcycle` / save_pretrained")
    p.add_argument("text", metavar="TEXT_FILE", help="UTF-8 text to route")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: MODEL_DIR)")
    p.add_argument("--max-tokens", type=int, default=16384, help="route at most this many tokens (default 16384)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: min(512, context length))")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward call (default 8)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON instead of a table")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write a layer x expert heatmap (needs matplotlib)")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spectra`` / ``python -m spectra``; returns the exit status (2 = user error)."""
    parser = build_parser()
    prog = "spectra"
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise CLIError("choose a command: upcycle, swap-router or inspect (see `spectra --help`)")
        prog = f"spectra {args.command}"
        for name in ("top_k", "num_experts", "every_n", "max_tokens", "seq_len", "batch_size"):
            value = getattr(args, name, None)
            if value is not None and value < 1:
                raise CLIError(f"--{name.replace('_', '-')}={value}: must be a positive integer.")
        import transformers

        transformers.logging.set_verbosity_error()  # keep the output to the command's own lines
        transformers.logging.disable_progress_bar()
        return args.func(args)
    except (CLIError, ConfigError, UnsupportedModelError) as exc:
        message = " ".join(str(exc).split())
        print(f"{getattr(exc, 'prog', None) or prog}: error: {message}", file=sys.stderr)
        return 2


__all__ = ["CLIError", "build_parser", "copy_tokenizer", "format_table", "main", "plot_heatmap", "routing_report"]
