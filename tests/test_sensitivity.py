"""The `sensitivity` stage (pipeline/sensitivity.py): the one-factor-at-a-time grid around SPECTRA's default, the
refusal of settings the SPECTRA router would not honour, the noise yardstick and the table / sentence the report
makes of it; and the stage itself on the tiny profile's data (in a temporary root), resumed from its checkpoints."""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sensitivity as S  # noqa: E402

from spectra_artifact import report as R  # noqa: E402

GRID = {"repulsion_weight": [0.0, 0.5, 1.0], "sinkhorn_iters": [1, 3], "capacity_factor": [1.0, "dropless"]}


def params_with(grid: dict | None = None, **spec) -> dict:
    """The tiny profile's params with its `sensitivity:` section replaced (in memory)."""
    params = common.load_params("tiny")
    section = {"seed": 0, "noise_seeds": [1, 2], "eval_blocks": 24, "train": {"steps": 2, "save_every": 1},
               "grid": copy.deepcopy(GRID if grid is None else grid)}
    params["profiles"]["tiny"]["sensitivity"] = {**section, **spec}
    return params


# ------------------------------------------------------------------------------------------------ the grid
def test_the_grid_moves_one_factor_at_a_time_and_runs_the_default_once():
    params = params_with()
    points = S.expand(params)
    assert [p.key for p in points] == ["default-s0", "repulsion_weight=0-s0", "repulsion_weight=1-s0",
                                       "sinkhorn_iters=1-s0", "capacity_factor=1-s0", "default-s1", "default-s2"]
    default = S.default_config(params).to_dict()
    assert (default["repulsion_weight"], default["sinkhorn_iters"], default["capacity_factor"]) == (0.5, 3, None)
    for p in points:
        cfg = S.check_point(params, p).to_dict()
        changed = {k for k in default if cfg[k] != default[k]}
        assert changed == (set() if p.factor is None else {p.factor}), p.key
        if p.factor:
            assert cfg[p.factor] == p.value


def test_point_params_is_a_copy_with_the_analysis_evaluation_set():
    params = params_with()
    before = copy.deepcopy(params)
    point = S.Point("num_experts", 2, 0)
    out = S.point_params(params, point)
    assert params == before  # never written back
    assert out["variants"]["spectra"]["num_experts"] == 2 and "num_experts" not in params["variants"]["spectra"]
    ev = out["profiles"]["tiny"]["eval"]
    assert ev["curve_blocks"] == 24 and ev["curve_points"] == 1 and ev["routing_blocks"] <= 24


def test_a_profile_with_sensitivity_null_runs_nothing_and_a_missing_section_is_an_error(tmp_path, monkeypatch):
    assert S.expand(common.load_params("smollm2")) == []
    monkeypatch.setattr(common, "ROOT", tmp_path)
    S.main("smollm2")  # the stage still writes its DVC outputs: a status file saying it did not run
    status = json.loads((tmp_path / "results" / "smollm2" / "sensitivity" / "sensitivity.json").read_text())
    assert status["status"] == "not run in this profile" and "sensitivity is null" in status["reason"]
    assert (tmp_path / "runs" / "smollm2" / "sensitivity").is_dir()
    assert (tmp_path / "runs" / "smollm2" / "state" / "sensitivity").is_dir()
    assert json.loads((tmp_path / "runs" / "smollm2" / "timing" / "sensitivity.json").read_text()) == {}
    params = common.load_params("tiny")
    del params["profiles"]["tiny"]["sensitivity"]
    with pytest.raises(common.ParamsError, match=r"profiles\.tiny\.sensitivity is missing.*sensitivity: null"):
        S.expand(params)


@pytest.mark.parametrize("change, message", [
    ({"grid": {"top_k": [1]}}, r"grid\.top_k: not a factor of the analysis; allowed: repulsion_weight"),
    ({"grid": {"num_experts": [1]}}, r"grid\.num_experts=1: impossible for SPECTRA: MoEConfig\.num_experts=1"),
    ({"grid": {"sinkhorn_epsilon": [0.0]}}, r"sinkhorn_epsilon=0: impossible for SPECTRA: .*temperature must be > 0"),
    ({"grid": {"sinkhorn_iters": [2.5]}}, r"grid\.sinkhorn_iters: 2\.5 must be an integer"),
    ({"grid": {"repulsion_weight": [-1.0]}}, r"repulsion_weight=-1: impossible for SPECTRA: .*must be >= 0"),
    ({"grid": {"capacity_factor": ["none"]}}, r"'none' is not a number \(or `dropless`\)"),
    ({"grid": {"repulsion_weight": [0.0, 0.0]}}, r"repeats a value"),
    ({"grid": {"repulsion_weight": []}}, r"non-empty list"),
    ({"noise_seeds": [0, 1]}, r"noise_seeds=\[0, 1\].*other than seed=0"),
    ({"noise_seeds": []}, r"noise_seeds=\[\]"),
    ({"steps": 3}, r"unknown key\(s\) \['steps'\]"),
    ({"train": {"steps": 2, "warmup": 1}}, r"sensitivity\.train: .*unexpected keyword argument 'warmup'"),
    ({"train": {"steps": 0}}, r"sensitivity\.train: train\.steps=0: must be a positive integer"),
])
def test_a_bad_grid_is_refused_naming_the_field(change, message):
    params = params_with(**change)
    with pytest.raises(common.ParamsError, match=message):
        S.expand(params)


def test_a_setting_the_router_would_ignore_is_refused(monkeypatch):
    params = params_with({"sinkhorn_iters": [1, 10]})
    params["variants"]["spectra"] = {**params["variants"]["spectra"], "use_sinkhorn": False}
    with pytest.raises(common.ParamsError, match="use_sinkhorn: false, so the Sinkhorn iterations change nothing"):
        S.expand(params)
    from spectra.routers import SpectraRouter

    monkeypatch.setattr(SpectraRouter, "block_capacity", False)  # a block that would not cap SPECTRA's assignments
    with pytest.raises(common.ParamsError, match="applies no capacity"):
        S.expand(params_with({"capacity_factor": [1.25]}))
    S.expand(params_with({"capacity_factor": ["dropless"]}))  # dropless needs no capacity: allowed


def test_a_pretrained_profile_cannot_run_the_analysis():
    params = params_with()
    params["profiles"]["tiny"]["base"] = {"source": "smollm2"}
    with pytest.raises(common.ParamsError, match="needs profiles.tiny.base.n_layer, n_embd and n_head"):
        S.expand(params)


# ------------------------------------------------------------------------------------------------ the summary
def fake_runs(params: dict, losses: dict[str, float]) -> list[dict]:
    runs = []
    for p in S.expand(params):
        runs.append({"key": p.key, "factor": p.factor, "value": p.value, "seed": p.seed, "val_nll": losses[p.key],
                     "train_tokens": 128, "dropped_fraction": 0.3 if p.factor == "capacity_factor" else 0.0})
    return runs


LOSSES = {"default-s0": 5.0, "default-s1": 5.01, "default-s2": 4.99, "repulsion_weight=0-s0": 5.1,
          "repulsion_weight=1-s0": 5.01, "sinkhorn_iters=1-s0": 5.02, "capacity_factor=1-s0": 4.95}
EVALUATION = {"block_size": 64, "eval_blocks": 24, "eval_tokens": 24 * 63}


def test_summary_deltas_noise_band_and_best_values():
    params = params_with()
    s = S.summarise(params, fake_runs(params, LOSSES), EVALUATION)
    assert s["noise"]["sd"] == pytest.approx(0.01) and s["noise"]["band"] == pytest.approx(0.02 * math.sqrt(2))
    assert s["noise"]["seeds"] == [0, 1, 2]
    rows = {(r["factor"], r["label"]): r for r in s["rows"]}
    # each factor's own default row (Δ = 0), values sorted, dropless last
    assert [r["label"] for r in s["rows"] if r["factor"] == "capacity_factor"] == ["1", "dropless"]
    assert [r["label"] for r in s["rows"] if r["factor"] == "sinkhorn_iters"] == ["1", "3"]
    assert rows[("sinkhorn_iters", "3")]["is_default"] and rows[("sinkhorn_iters", "3")]["delta_val_nll"] == 0
    assert rows[("repulsion_weight", "0")]["delta_val_nll"] == pytest.approx(0.1)
    assert rows[("repulsion_weight", "0")]["beyond_noise"] and not rows[("repulsion_weight", "1")]["beyond_noise"]
    assert rows[("capacity_factor", "1")]["beyond_noise"] and rows[("capacity_factor", "1")]["delta_val_nll"] < 0
    assert not rows[("sinkhorn_iters", "1")]["beyond_noise"]  # +0.02 < 0.028
    assert s["best"]["repulsion_weight"]["is_default"] and s["best"]["capacity_factor"]["label"] == "1"
    assert s["budget"]["steps"] == 2 and s["budget"]["train_tokens"] == 128 and s["budget"]["runs"] == 7
    assert s["budget"]["full_steps"] == params["profiles"]["tiny"]["scratch"]["train"]["steps"]


# ------------------------------------------------------------------------------------------------ the report
@pytest.fixture()
def tree(tmp_path):
    from test_report import make_tree  # the fake results/runs tree of the report's own tests

    return make_tree(tmp_path)


def _generate(tree, tmp_path, sens: dict | None, name: str) -> tuple[dict[str, str], str]:
    results, runs = tree
    if sens is not None:
        common.write_json(results / "sensitivity" / "sensitivity.json", sens)
    out = tmp_path / name
    R.generate(results, runs, out)
    macros = dict(re.findall(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}$", (out / "numbers.tex").read_text(), flags=re.M))
    return macros, (out / "tables" / "sensitivity.tex").read_text()


def test_the_report_says_which_factor_moved_the_loss_and_when_none_did(tree, tmp_path):
    params = params_with()
    m, table = _generate(tree, tmp_path, S.summarise(params, fake_runs(params, LOSSES), EVALUATION), "g0")
    claim = m["SensitivityClaim"]
    assert "Beyond the noise: repulsion $\\lambda$ at 0 raises the loss by 0.1000 nats" in claim
    assert "capacity factor at 1 lowers the loss by 0.0500 nats" in claim and "Sinkhorn iterations stayed within" in claim
    assert ("lowest loss of each factor is capacity factor at 1 (the default for repulsion $\\lambda$ and Sinkhorn "
            "iterations); of these only capacity factor at 1 is beyond the band") in claim
    assert "$\\pm$0.0283 nats" in claim and m["SensitivityBand"] == "0.0283" and m["SensitivitySteps"] == "2"
    assert m["SensitivitySeeds"] == "3" and m["SensitivityRuns"] == "7" and m["SensitivityTokens"] == "128"
    assert table.count("$^\\dagger$") == 2 and table.count("reference") == 3 and table.count("\\midrule") == 3
    assert "dropless (default)" in table and "30.0" in table
    quiet = dict(LOSSES, **{"repulsion_weight=0-s0": 5.02, "capacity_factor=1-s0": 4.985})
    m, table = _generate(tree, tmp_path, S.summarise(params, fake_runs(params, quiet), EVALUATION), "g1")
    claim = m["SensitivityClaim"]
    assert "No factor moved the loss beyond the noise: the largest difference is +0.0200 nats, repulsion" in claim
    assert "none of these differs from the default beyond the band" in claim  # capacity factor 1 is lowest, within
    assert "$^\\dagger$" not in table


def test_the_report_says_when_the_analysis_did_not_run(tree, tmp_path):
    m, table = _generate(tree, tmp_path, None, "g0")  # no file: the fake tree predates the stage
    assert m["SensitivityClaim"] == "The sensitivity analysis was not run in this build." and "not run" in table
    m, _ = _generate(tree, tmp_path, S.not_run(common.load_params("smollm2")), "g1")
    assert "not run in this profile (its params.yaml section is null)" in m["SensitivityClaim"]
    assert m["SensitivitySteps"] == "n/a" and m["SensitivityBand"] == "n/a"


# ------------------------------------------------------------------------------------------------ the stage
def test_the_stage_on_tiny_data_honours_each_setting_and_resumes(tmp_path, monkeypatch):
    """Two factors (the capacity really drops tokens), the noise seeds, then a second call that resumes every run from
    its persisted checkpoint and writes byte-identical results."""
    tokens = ROOT / "data" / "tiny" / "tokens"
    if not (tokens / "meta.json").exists():
        pytest.skip("the tiny profile's data is not built (`make tiny`)")
    (tmp_path / "data" / "tiny").mkdir(parents=True)
    (tmp_path / "data" / "tiny" / "tokens").symlink_to(tokens)
    monkeypatch.setattr(common, "ROOT", tmp_path)
    params = params_with({"repulsion_weight": [0.0], "capacity_factor": [0.5]}, noise_seeds=[1],
                         train={"steps": 2, "save_every": 1, "threads": 1})
    monkeypatch.setattr(S, "load_params", lambda name: copy.deepcopy(params))
    S.main("tiny")
    out = tmp_path / "results" / "tiny" / "sensitivity" / "sensitivity.json"
    first = out.read_bytes()
    s = json.loads(first)
    assert [r["key"] for r in s["runs"]] == sorted(["default-s0", "repulsion_weight=0-s0", "capacity_factor=0.5-s0",
                                                    "default-s1"])
    by = {r["key"]: r for r in s["runs"]}
    assert by["capacity_factor=0.5-s0"]["dropped_fraction"] > 0.3 and by["default-s0"]["dropped_fraction"] == 0
    assert by["repulsion_weight=0-s0"]["val_nll"] != by["default-s0"]["val_nll"]
    assert s["budget"]["train_tokens"] == 2 * 8 * 64 and s["budget"]["eval_split"] == "validation"
    for key in by:
        m = json.loads((tmp_path / "runs" / "tiny" / "sensitivity" / key / "metrics.json").read_text())
        assert m["train"]["steps"] == 2 and m["moe_config"]["router"] == "spectra"
    assert json.loads((tmp_path / "runs" / "tiny" / "sensitivity" / "capacity_factor=0.5-s0" / "metrics.json")
                      .read_text())["moe_config"]["capacity_factor"] == 0.5
    ckpts = sorted((tmp_path / "runs" / "tiny" / "state" / "sensitivity").glob("*/checkpoint.pt"))
    assert len(ckpts) == 4
    stamps = [c.stat().st_mtime_ns for c in ckpts]
    S.main("tiny")  # every run resumes from its finished checkpoint: no step runs, no checkpoint is rewritten
    assert out.read_bytes() == first and [c.stat().st_mtime_ns for c in ckpts] == stamps
