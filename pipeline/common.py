"""Shared helpers of the DVC stage scripts: read params.yaml, validate it before any long work, resolve a
profile's paths, record stage wall times, and tell a notebook which profile it can read.

Every stage script takes the profile as its first argument (``python pipeline/data.py tiny corpus``); dvc.yaml
passes it (``${profile}``). params.yaml holds the experiment values of every profile and has no switch: the
profile is chosen by which pipeline is built (README 'Pipeline'). (The `spectra` package knows nothing of DVC.)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

# Before torch is imported anywhere: OpenMP threads that spin while waiting make 2-thread training
# 2.5-3x slower whenever another process shares the 2 cores; passive waiting costs nothing when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
STARTED = time.perf_counter()  # a stage's wall time counts from here (its script's first import)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from spectra.config import VARIANTS, ConfigError, MoEConfig  # noqa: E402

SECTIONS = ("data", "base", "moe", "scratch", "upcycle", "eval", "enabled", "benchmark")
ARMS = ("scratch", "upcycle")  # README 'Experiment': from scratch (the main table) and upcycled from the base
FOCUS = "spectra"  # the variant every comparison is paired against; it runs `focus_seeds` seeds
DEFAULT = "default"  # the profile of the root dvc.yaml / dvc.lock, whose paper is committed (`make paper`)


class ParamsError(ValueError):
    """params.yaml is wrong; the message names the field and the fix."""


class NotBuiltError(RuntimeError):
    """A profile's pipeline outputs that a notebook reads are missing; the message names them and the command."""


def load_params(profile: str, path: str | os.PathLike = ROOT / "params.yaml") -> dict[str, Any]:
    """params.yaml, validated, with ``params["profile"]`` set to the profile this stage builds."""
    with open(path) as fh:
        params = yaml.safe_load(fh)
    if "profile" in params:
        raise ParamsError("params.yaml: the `profile:` switch is gone; remove it and build a profile with "
                          "`make paper` (default) or `make tiny`, or `python pipeline/repro.py <profile>`.")
    params["profile"] = profile
    validate(params)
    return params


def validate(params: dict[str, Any]) -> None:
    """Fail fast, before any long work: unknown profile or variant, impossible router config — in every
    profile, or only in ``params["profile"]`` when one is set."""
    profiles = params.get("profiles") or {}
    names = [params["profile"]] if "profile" in params else list(profiles)
    for name in names:
        if name not in profiles:
            raise ParamsError(f"params.yaml: profile={name!r} is unknown; allowed values: {', '.join(profiles)}.")
        prof = profiles[name]
        missing = [s for s in SECTIONS if s not in prof]
        if missing:
            raise ParamsError(f"params.yaml: profiles.{name} lacks section(s) {missing}.")
    variants = params.get("variants") or {}
    allowed = ["dense", "dense_2x", *VARIANTS]
    for v, spec in variants.items():
        if v not in allowed:
            raise ParamsError(f"params.yaml: variants.{v} is not a known variant; allowed values: {', '.join(allowed)}.")
        if (spec or {}).get("kind", "moe") not in ("dense", "moe"):
            raise ParamsError(f"params.yaml: variants.{v}.kind={spec['kind']!r}; allowed: dense, moe (the default).")
    arms = params.get("arms") or {}
    if set(arms) != set(ARMS):
        raise ParamsError(f"params.yaml: `arms:` must list the variants of each of {', '.join(ARMS)}.")
    for arm, names_ in arms.items():
        for v in names_:
            if v not in variants:
                raise ParamsError(f"params.yaml: arms.{arm} lists {v!r}, which is not under `variants:` "
                                  f"(known: {', '.join(variants)}).")
    for name in names:
        prof = profiles[name]
        for arm in ARMS:
            spec = prof[arm]
            for field in ("seeds", "focus_seeds"):
                if not isinstance(spec.get(field), int) or spec[field] < 1:
                    raise ParamsError(f"params.yaml: profiles.{name}.{arm}.{field} must be a positive integer.")
            if spec["focus_seeds"] < spec["seeds"]:
                raise ParamsError(f"params.yaml: profiles.{name}.{arm}.focus_seeds < seeds; make it >= seeds.")
            enabled = prof["enabled"].get(arm) if isinstance(prof["enabled"], dict) else None
            if enabled != "all" and not (isinstance(enabled, list) and set(enabled) <= set(variants)):
                raise ParamsError(f"params.yaml: profiles.{name}.enabled.{arm} must be 'all' or a list of variant "
                                  f"names.")
        if not 0.0 <= prof["data"].get("pretrain_fraction", 0.0) < 1.0:
            raise ParamsError(f"params.yaml: profiles.{name}.data.pretrain_fraction must be in [0, 1).")
        for v in variants:
            if not is_dense(params, v):
                try:
                    moe_config({**params, "profile": name}, v, hidden_size=8)
                except (ConfigError, TypeError) as exc:
                    raise ParamsError(f"params.yaml: variants.{v} / profiles.{name}.moe give an impossible router "
                                      f"configuration: {exc}") from None


def profile(params: dict[str, Any]) -> dict[str, Any]:
    return params["profiles"][params["profile"]]


def is_dense(params: dict[str, Any], variant: str) -> bool:
    """A dense model (no router): `kind: dense` in params.yaml `variants:`."""
    return (params["variants"].get(variant) or {}).get("kind") == "dense"


def moe_config(params: dict[str, Any], variant: str, hidden_size: int, num_layers: int = 1) -> MoEConfig:
    prof = profile(params)
    base = {k: v for k, v in prof["moe"].items() if k not in ("layers", "noise_std")}
    overrides = dict(params["variants"].get(variant) or {})
    overrides.pop("router", None)
    overrides.pop("kind", None)
    return MoEConfig.from_variant(variant, hidden_size=hidden_size, extra={"num_layers": num_layers},
                                  **{**base, **overrides})


def run_enabled(params: dict[str, Any], arm: str, variant: str) -> bool:
    """Whether the profile runs ``variant`` in ``arm`` (params.yaml `enabled:`)."""
    enabled = profile(params)["enabled"][arm]
    return enabled == "all" or variant in enabled


def enabled_variants(params: dict[str, Any], arm: str) -> list[str]:
    """The variants of ``arm`` this profile runs, in the order of params.yaml `arms:`."""
    return [v for v in params["arms"][arm] if run_enabled(params, arm, v)]


def seeds_of(params: dict[str, Any], arm: str, variant: str) -> list[int]:
    """The seeds a variant's own stage runs: `seeds`, or `focus_seeds` for SPECTRA (the strongest baseline's extra
    seeds run in stage `extra_<arm>`)."""
    spec = profile(params)[arm]
    return list(range(spec["focus_seeds"] if variant == FOCUS else spec["seeds"]))


# ------------------------------------------------------------------------------------------ data partitions
def pretrain_partition(n_blocks: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split the training blocks once: ``(pretrain, fresh)`` index arrays. The base is pretrained on `pretrain`
    only; every run of both arms trains on `fresh`, which the base never saw. A fixed permutation (seed 0) of the
    blocks, so every domain is in both parts in proportion."""
    perm = np.random.default_rng(0).permutation(n_blocks)
    cut = int(round(fraction * n_blocks))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def eval_subset(blocks: np.ndarray, domains: np.ndarray, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic domain-stratified subset of held-out blocks: ⌈max/D⌉ blocks of each domain, evenly spaced over
    all of that domain's blocks (so over all of its documents, which are stored in order); all of them when the
    domain has fewer."""
    per = -(-max_blocks // max(1, len(np.unique(domains))))
    idx = []
    for d in np.unique(domains):
        rows = np.flatnonzero(domains == d)
        idx.append(rows if len(rows) <= per else rows[np.unique(np.linspace(0, len(rows) - 1, per).round().astype(int))])
    idx = np.concatenate(idx)
    return blocks[idx], domains[idx]


def data_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What identifies the tokenized data (from data/<profile>/tokens/meta.json)."""
    return {k: meta.get(k) for k in ("corpus_sha256", "tokenizer_sha256", "block_size", "vocab_size")}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def paths(params: dict[str, Any]) -> dict[str, Path]:
    """Where a profile's outputs live: every profile has its own data/, runs/, results/ and paper/ folder."""
    p = params["profile"]
    return {
        "packages": ROOT / "data" / "packages",  # shared: the pinned downloads, identical for every profile
        "corpus": ROOT / "data" / p / "corpus",
        "probes": ROOT / "data" / p / "probes",
        "tokenizer": ROOT / "data" / p / "tokenizer",
        "tokens": ROOT / "data" / p / "tokens",
        "runs": ROOT / "runs" / p,
        "state": ROOT / "runs" / p / "state",  # resume points (persisted, not cached, never read by analyses)
        "timing": ROOT / "runs" / p / "timing",  # wall times (vary run to run; kept apart from the results)
        "results": ROOT / "results" / p,
        "executed": ROOT / "notebooks" / "executed" / p,
        "paper": ROOT / "paper" / p,
    }


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def stage_args(usage: str, count: int) -> list[str]:
    """``sys.argv[1:]`` of a stage script, which must hold exactly ``count`` arguments (the profile first)."""
    args = sys.argv[1:]
    if len(args) != count:
        raise SystemExit(f"usage: {usage}")
    return args


# ---------------------------------------------------------------------------------------------- stage times
def stage_times_path(profile_name: str) -> Path:
    return ROOT / "results" / profile_name / "stage_times.json"


@contextmanager
def timed_stage(profile_name: str, stage: str) -> Iterator[None]:
    """Record the wall time of a stage that succeeds (from its script's start) in
    results/<profile>/stage_times.json: ``{stage: {"seconds": ..., "finished": ISO time}}``; the end-of-build
    summary of `make paper` / `make tiny` (pipeline/repro.py) prints it. Not a DVC output: timings vary."""
    yield
    path = stage_times_path(profile_name)
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = {"seconds": round(time.perf_counter() - STARTED, 2),
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(path, times)


# ------------------------------------------------------------------------------------- profiles and notebooks
def profile_names(params: dict[str, Any] | None = None) -> list[str]:
    """Every profile of params.yaml, the default one first."""
    params = params or yaml.safe_load((ROOT / "params.yaml").read_text())
    names = list(params["profiles"])
    return sorted(names, key=lambda n: n != DEFAULT)


def build_command(profile_name: str) -> str:
    """The command that builds a profile's pipeline (Makefile)."""
    return {DEFAULT: "make paper", "tiny": "make tiny"}.get(profile_name, f"make paper PROFILE={profile_name}")


def profile_inputs(stage: str, profile_name: str) -> list[Path]:
    """The pipeline outputs of ``profile_name`` that ``stage`` (a plain, non-foreach stage) reads: its dvc.yaml
    dependencies under a ``${profile}`` path (data/, runs/, results/ of that profile; code is not listed)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    if stage not in spec["stages"] or "deps" not in spec["stages"][stage]:
        raise KeyError(f"dvc.yaml has no stage {stage!r} with deps")
    deps = [d.replace("${profile}", profile_name) for d in spec["stages"][stage]["deps"] if "${profile}" in d]
    if any("${" in d for d in deps):
        raise ValueError(f"dvc.yaml: stage {stage!r} has a dependency with a variable other than ${{profile}}")
    return [ROOT / d for d in deps]


def missing_outputs(stage: str, profile_name: str) -> list[str]:
    """The pipeline outputs ``stage`` reads for ``profile_name`` that do not exist, relative to the repository root."""
    return [str(p.relative_to(ROOT)) for p in profile_inputs(stage, profile_name) if not p.exists()]


def notebook_setup(name: str, profile_name: str | None = None, results_dir: str | None = None,
                   final_results_dir: str | None = None) -> tuple[str, str, str]:
    """The first thing a notebook does: choose the profile to read and check its pipeline outputs exist.

    ``profile_name=None`` (an interactive session, `make lab`) takes the first profile whose outputs this notebook
    needs are all present, `default` first. Missing outputs raise `NotBuiltError` naming them and the `make` command
    that builds them, instead of a traceback deep inside the notebook. ``results_dir=None`` writes into
    notebooks/lab/<profile>/<name>/ (git-ignored), never into the pipeline's results/. Returns
    ``(profile, results_dir, final_results_dir)``.
    """
    names = profile_names()
    if profile_name is not None and profile_name not in names:
        raise NotBuiltError(f"profile={profile_name!r} is unknown; profiles of params.yaml: {', '.join(names)}.")
    missing = {p: missing_outputs(name, p) for p in ([profile_name] if profile_name else names)}

    def lacks(p: str) -> str:
        more = f" and {len(missing[p]) - 3} more" if len(missing[p]) > 3 else ""
        return f"{', '.join(missing[p][:3])}{more} (build them: `{build_command(p)}`)"

    if profile_name is not None and missing[profile_name]:
        raise NotBuiltError(f"notebook {name} reads the pipeline outputs of profile {profile_name!r}, and some are "
                            f"missing: {lacks(profile_name)}.")
    if profile_name is None:
        profile_name = next((p for p in names if not missing[p]), None)
        if profile_name is None:
            raise NotBuiltError(f"notebook {name} reads the pipeline outputs of a built profile, and none is built: "
                                + "; ".join(f"{p!r} lacks {lacks(p)}" for p in (DEFAULT, "tiny") if p in missing)
                                + ". `make tiny` takes minutes; pass `profile=` to choose another profile.")
    if results_dir is None:
        results_dir = str(ROOT / "notebooks" / "lab" / profile_name / name)
    return profile_name, results_dir, final_results_dir or results_dir


# ------------------------------------------------------------------------------------ DVC-recorded hashes
def dvc_md5(path: Path) -> str:
    """The md5 DVC records in dvc.lock for an output: of the bytes for a file; of the sorted JSON listing of the
    files' md5s (``<md5>.dir``) for a folder. Uses DVC's own hashing (dvc_data)."""
    from dvc_data.hashfile.hash import file_md5
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    if path.is_file():
        return file_md5(str(path))
    tree = Tree()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        tree.add(f.relative_to(path).parts, None, HashInfo("md5", file_md5(str(f))))
    tree.digest()
    return tree.hash_info.value


def lock_mismatches(lock: Path, stages: list[str], base: Path = ROOT) -> list[str]:
    """Outputs of ``stages`` whose files differ from the md5 that ``lock`` (a dvc.lock, its paths relative to
    ``base``, the stages' working directory) records: one line each; empty when all match."""
    data = yaml.safe_load(lock.read_text())["stages"]
    bad = []
    for stage in stages:
        if stage not in data:
            bad.append(f"{lock.name} has no stage {stage!r}")
            continue
        for out in data[stage].get("outs", []):
            path = base / out["path"]
            if not path.exists():
                bad.append(f"{out['path']}: missing (dvc.lock records md5 {out['md5']})")
            elif (actual := dvc_md5(path)) != out["md5"]:
                bad.append(f"{out['path']}: md5 {actual}, dvc.lock records {out['md5']}")
    return bad
