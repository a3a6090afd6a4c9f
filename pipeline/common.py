"""Shared helpers of the DVC stage scripts: read params.yaml, validate it before any long work,
resolve the active profile. (The `spectra` package itself knows nothing of DVC.)"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

# Before torch is imported anywhere: OpenMP threads that spin while waiting make 2-thread training
# 2.5-3x slower whenever another process shares the 2 cores; passive waiting costs nothing when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spectra.config import VARIANTS, ConfigError, MoEConfig  # noqa: E402

SECTIONS = ("data", "base", "moe", "train", "eval", "enabled", "benchmark")


class ParamsError(ValueError):
    """params.yaml is wrong; the message names the field and the fix."""


def load_params(path: str | os.PathLike = ROOT / "params.yaml") -> dict[str, Any]:
    with open(path) as fh:
        params = yaml.safe_load(fh)
    validate(params)
    return params


def validate(params: dict[str, Any]) -> None:
    """Fail fast, before any long work: unknown profile or variant, impossible router config."""
    profiles = params.get("profiles") or {}
    name = params.get("profile")
    if name not in profiles:
        raise ParamsError(f"params.yaml: profile={name!r} is unknown; allowed values: {', '.join(profiles)}.")
    prof = profiles[name]
    missing = [s for s in SECTIONS if s not in prof]
    if missing:
        raise ParamsError(f"params.yaml: profiles.{name} lacks section(s) {missing}.")
    variants = params.get("variants") or {}
    allowed = ["dense", *VARIANTS]
    for v in variants:
        if v not in allowed:
            raise ParamsError(f"params.yaml: variants.{v} is not a known variant; allowed values: {', '.join(allowed)}.")
    for key, run in (params.get("runs") or {}).items():
        if run.get("variant") not in variants:
            raise ParamsError(f"params.yaml: runs.{key}.variant={run.get('variant')!r} is not listed under `variants:` "
                              f"(known: {', '.join(variants)}).")
        if not isinstance(run.get("seed"), int):
            raise ParamsError(f"params.yaml: runs.{key}.seed must be an integer.")
    enabled = prof["enabled"]
    if enabled != "all" and not (isinstance(enabled, list) and set(enabled) <= set(variants)):
        raise ParamsError(f"params.yaml: profiles.{name}.enabled must be 'all' or a list of variant names.")
    for v in variants:
        if v != "dense":
            try:
                moe_config(params, v, hidden_size=8)
            except (ConfigError, TypeError) as exc:
                raise ParamsError(f"params.yaml: variants.{v} / profiles.{name}.moe give an impossible router "
                                  f"configuration: {exc}") from None


def profile(params: dict[str, Any]) -> dict[str, Any]:
    return params["profiles"][params["profile"]]


def moe_config(params: dict[str, Any], variant: str, hidden_size: int, num_layers: int = 1) -> MoEConfig:
    prof = profile(params)
    base = {k: v for k, v in prof["moe"].items() if k not in ("layers", "noise_std")}
    overrides = dict(params["variants"].get(variant) or {})
    overrides.pop("router", None)
    return MoEConfig.from_variant(variant, hidden_size=hidden_size, extra={"num_layers": num_layers},
                                  **{**base, **overrides})


def run_enabled(params: dict[str, Any], variant: str) -> bool:
    enabled = profile(params)["enabled"]
    return enabled == "all" or variant in enabled


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
    p = params["profile"]
    return {
        "packages": ROOT / "data" / "packages",
        "corpus": ROOT / "data" / p / "corpus",
        "probes": ROOT / "data" / p / "probes",
        "tokenizer": ROOT / "data" / p / "tokenizer",
        "tokens": ROOT / "data" / p / "tokens",
        "runs": ROOT / "runs" / p,
        "results": ROOT / "results" / p,
    }


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)
