"""The command line (`spectra.cli`): ``python -m spectra upcycle | swap-router | inspect`` on tiny local model
folders written with save_pretrained (no hub). The main paths run the real entry point in a subprocess;
the wider error matrix calls `spectra.cli.main` in-process (the same code, without a Python start-up each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import transformers

import spectra
from spectra import cli, metrics

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat on mat ran fast slow red blue big small and or".split()


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "spectra", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=180)


def assert_user_error(proc: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    """Exit status 2, one stderr line ``spectra <command>: error: ...`` containing `fragments`, no traceback."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"spectra {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A dense GPT-2 folder with a word-level tokenizer, a Mixtral folder without one, a text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("cli")
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")
    torch.manual_seed(0)
    dense = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=32, n_positions=64, bos_token_id=0,
                                    eos_token_id=0)
    transformers.AutoModelForCausalLM.from_config(dense).save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    moe = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=32, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(moe).save_pretrained(root / "mixtral")
    (root / "text.txt").write_text(" ".join(WORDS * 12))
    return {"root": root, "dense": root / "dense", "mixtral": root / "mixtral", "text": root / "text.txt"}


@pytest.fixture(scope="module")
def upcycled(folders) -> Path:
    """``spectra upcycle`` run once through the real entry point; later tests inspect its output."""
    out = folders["root"] / "moe"
    proc = run_cli("upcycle", str(folders["dense"]), str(out), "--router", "spectra", "--num-experts", "4", "--top-k", "2",
                   "--every-n", "2", "--noise-std", "0.01", "--set", "router_dim=8")
    assert proc.returncode == 0, proc.stderr
    assert "upcycled GPT2LMHeadModel: MoE layers [1], router spectra, E=4, k=2" in proc.stdout
    return out


def test_upcycle_command_writes_a_loadable_moe_folder(folders, upcycled):
    model = spectra.load(upcycled)
    settings = model.config.spectra_moe
    assert settings["mode"] == "upcycle" and settings["layers"] == [1] and settings["noise_std"] == 0.01  # --every-n 2
    cfg = spectra.moe_config_of(model)
    assert (cfg.router, cfg.num_experts, cfg.top_k, cfg.router_dim) == ("spectra", 4, 2, 8)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # tokenizer files copied
        assert (upcycled / name).read_bytes() == (folders["dense"] / name).read_bytes()
    tokenizer = transformers.AutoTokenizer.from_pretrained(upcycled)
    assert tokenizer("the cat sat")["input_ids"] == [1, 3, 5]


def test_upcycle_layers_option_selects_decoder_layers(folders):
    out = folders["root"] / "moe-layers"
    assert cli.main(["upcycle", str(folders["dense"]), str(out), "--router", "top2", "--num-experts", "4",
                     "--layers", "0,-1"]) == 0
    assert spectra.load(out).config.spectra_moe["layers"] == [0, 2]


def test_inspect_command_reports_routing_statistics(folders, upcycled):
    plot = folders["root"] / "load.png"
    proc = run_cli("inspect", str(upcycled), str(folders["text"]), "--seq-len", "16", "--json", "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["router"], report["num_experts"], report["top_k"]) == ("spectra", 4, 2)
    assert report["tokens"] == len(WORDS) * 12 and report["sequences"] == len(WORDS) * 12 // 16
    (layer,) = report["layers"]
    assert layer["name"] == "transformer.h.1.mlp" and layer["tokens"] == report["tokens"]
    assert sum(layer["tokens_per_expert"]) == 2 * report["tokens"]  # k = 2 assignments per token, dropless
    assert sum(layer["load_share"]) == pytest.approx(1.0)
    assert layer["cv"] == pytest.approx(metrics.load_cv(layer["tokens_per_expert"]))
    assert 0.0 <= layer["routing_entropy"] <= 1.0
    assert report["mean"]["cv"] == pytest.approx(layer["cv"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_table_has_one_row_per_layer_and_expert_columns(folders, upcycled, capsys):
    assert cli.main(["inspect", str(upcycled), str(folders["text"]), "--seq-len", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("MoE layer"))
    assert header.split() == ["MoE", "layer", "tokens", "e0", "e1", "e2", "e3", "entropy", "load_cv"]
    row = next(line for line in lines if line.startswith("transformer.h.1.mlp"))
    assert len(row.split()) == 1 + 1 + 4 + 2 and row.count("%") == 4
    assert lines[-1].startswith("mean over layers")


def test_swap_router_command_keeps_the_experts(folders):
    out = folders["root"] / "mixtral-top2"
    proc = run_cli("swap-router", str(folders["mixtral"]), str(out), "--router", "top2", "--init-from-gate")
    assert proc.returncode == 0, proc.stderr
    assert "router swapped MixtralForCausalLM: MoE layers [0, 1], router top2" in proc.stdout
    original = transformers.AutoModelForCausalLM.from_pretrained(folders["mixtral"])
    swapped = spectra.load(out)
    assert spectra.moe_config_of(swapped).router == "top2"
    experts = {k: v for k, v in original.state_dict().items() if ".experts." in k}
    assert experts and all(torch.equal(swapped.state_dict()[k], v) for k, v in experts.items())
    for layer, router in zip(original.model.layers, spectra.routers_of(swapped)):  # --init-from-gate
        assert torch.equal(router.gate.weight, layer.mlp.gate.weight)


def test_user_error_exits_2_with_one_line_and_no_traceback(tmp_path):
    assert_user_error(run_cli("upcycle", str(tmp_path / "missing"), str(tmp_path / "out")), "upcycle",
                      "model folder", "not found", "save_pretrained")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", [
    "unknown-router", "not-spectra", "upcycle-spectra", "output-exists", "bad-layers", "bad-setting", "top-k", "swap-dense", "swap-spectra",
    "gate-init", "text-missing", "no-tokenizer", "no-command",
])
def test_user_error_matrix(case, folders, upcycled, tmp_path, capsys):
    d, m, t, out = str(folders["dense"]), str(folders["mixtral"]), str(folders["text"]), str(tmp_path / "out")
    argv, command, fragment = {
        "unknown-router": (["upcycle", d, out, "--router", "nope"], "upcycle", "invalid choice: 'nope' (choose from"),
        "not-spectra": (["inspect", d, t], "inspect", "is not a SPECTRA-MoE model (model type 'gpt2'); convert it first"),
        "upcycle-spectra": (["upcycle", str(upcycled), out], "upcycle", "already a SPECTRA-MoE model"),
        "output-exists": (["upcycle", d, str(upcycled)], "upcycle", "--overwrite"),
        "bad-layers": (["upcycle", d, out, "--layers", "0,x"], "upcycle", "comma-separated list of layer indices"),
        "bad-setting": (["upcycle", d, out, "--set", "router_dimm=8"], "upcycle", "KEY one of"),
        "top-k": (["upcycle", d, out, "--num-experts", "4", "--top-k", "5"], "upcycle", "choose top_k in 1..4"),
        "swap-dense": (["swap-router", d, out], "swap-router", "spectra upcycle"),
        "swap-spectra": (["swap-router", str(upcycled), out], "swap-router", "original MoE model folder"),
        "gate-init": (["swap-router", m, out, "--init-from-gate"], "swap-router", "needs a router with a linear gate"),
        "text-missing": (["inspect", str(upcycled), str(tmp_path / "none.txt")], "inspect", "text file"),
        "no-tokenizer": (["inspect", str(upcycled), t, "--tokenizer", m], "inspect", "pass --tokenizer DIR"),
        "no-command": ([], None, "choose a command"),
    }[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"spectra {command}: error: " if command else "spectra: error: "), err
    assert fragment in err[0], err[0]
    assert not os.path.exists(out)


def test_plot_without_matplotlib_is_a_clear_error(folders, upcycled, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    plot = tmp_path / "load.png"
    assert cli.main(["inspect", str(upcycled), str(folders["text"]), "--plot", str(plot)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--plot needs matplotlib" in line and "pip install matplotlib" in line
    assert not plot.exists()


def test_help_of_every_command(capsys):
    proc = run_cli("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("upcycle", "swap-router", "inspect"))
    options = {"upcycle": ["--router", "--num-experts", "--top-k", "--layers", "--every-n", "--noise-std"],
               "swap-router": ["--router", "--init-from-gate", "--top-k"],
               "inspect": ["--json", "--plot", "--tokenizer", "--seq-len"]}
    for command, flags in options.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: spectra {command}") and all(f in text for f in flags)


def test_console_script_and_spdx_license_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["spectra"] == "spectra.cli:main"
    module, _, name = project["scripts"]["spectra"].partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is cli.main
    assert project["license"] == "Apache-2.0"  # SPDX string: no TOML-table deprecation warning at install
