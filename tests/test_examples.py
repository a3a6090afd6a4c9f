"""The scripts in examples/ are the library's real clients (issue 14 item 4): each runs here on a tiny
model, as a user would run it, and must exit 0 with a sensible printed result.

* `examples/trainer_finetune.py`: HF `Trainer`, padding collator, `RoutingStateCallback` (padded batches
  must give finite losses and gradients — issue 10 item 1 — and the routers one update per step);
* `examples/accelerate_ddp.py`: `accelerate launch` with 2 CPU processes; every process must end with
  the router state of process 0 (issue 10 item 3).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = ["--steps", "3", "--hidden-size", "32", "--layers", "2", "--num-experts", "4", "--top-k", "2"]

pytestmark = pytest.mark.timeout(400)


def run_example(cmd: list[str], tmp_path: Path, timeout: int = 240) -> tuple[str, dict]:
    """Run `cmd` from the repository root; return its stdout and the parsed ``summary: {json}`` line.
    On a timeout the launcher and every process it started (torchrun puts ranks in sessions of their own)
    are killed and the partial output is shown."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "HF_HOME": str(tmp_path / "hf_home")}  # no user accelerate config, no hub cache
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_file.open("w") as out, err_file.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            proc.wait()
    stdout, stderr = out_file.read_text(), err_file.read_text()
    report = f"{' '.join(cmd)}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-5000:]}"
    assert proc.returncode is not None and proc.returncode >= 0, f"killed after {timeout} s: {report}"
    assert proc.returncode == 0, f"exit status {proc.returncode}: {report}"
    lines = [line for line in stdout.splitlines() if line.startswith("summary: ")]
    assert len(lines) == 1, f"expected one 'summary:' line in the output: {report}"
    return stdout, json.loads(lines[0].removeprefix("summary: "))


def check_loads(loads: dict[str, list[float]], layers: int = 2, experts: int = 4) -> None:
    assert len(loads) == layers
    for layer, load in loads.items():
        assert len(load) == experts and all(x >= 0 for x in load), (layer, load)
        assert math.isclose(sum(load), 1.0, abs_tol=1e-5), (layer, load)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("router,padding_side", [("spectra", "right"), ("no_context", "left")])
def test_trainer_example_fine_tunes_on_padded_batches(tmp_path, router, padding_side):
    stdout, summary = run_example(
        [sys.executable, str(EXAMPLES / "trainer_finetune.py"), *TINY, "--router", router, "--padding-side",
         padding_side, "--num-texts", "12", "--batch-size", "4", "--vocab-size", "300",
         "--output-dir", str(tmp_path / "out")], tmp_path)
    assert summary["router"] == router and summary["steps"] == 3
    assert summary["router_updates"] == 3  # RoutingStateCallback: once per optimizer step
    assert summary["padding_fraction"] > 0.1  # the batches really were padded
    assert all(math.isfinite(summary[k]) for k in ("first_loss", "last_loss", "train_loss"))
    check_loads(summary["loads"])
    assert "loss: first step" in stdout and "expert load" in stdout


def test_trainer_example_stops_on_a_non_finite_loss():
    """The example's guard raises on NaN instead of logging it (the Trainer alone would carry on)."""
    spec = importlib.util.spec_from_file_location("trainer_finetune", EXAMPLES / "trainer_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    guard = module.StopOnNonFinite()
    state = type("State", (), {"global_step": 7})()
    guard.on_log(None, state, None, logs={"loss": 1.5, "grad_norm": 0.3})
    with pytest.raises(FloatingPointError, match="loss = nan at step 7"):
        guard.on_log(None, state, None, logs={"loss": float("nan")})


@pytest.mark.parametrize("router", ["spectra", "aux_free"])
def test_accelerate_example_keeps_router_state_identical_on_2_processes(tmp_path, router):
    stdout, summary = run_example(  # = `accelerate launch --multi_gpu ...`, the CPU invocation the example documents
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         str(free_port()), str(EXAMPLES / "accelerate_ddp.py"), *TINY, "--router", router, "--batch-size", "2", "--seq-len", "16"], tmp_path)
    assert summary["processes"] == 2 and summary["router"] == router
    assert summary["state_identical"] is True and summary["router_updates"] == [3]
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    check_loads(summary["loads"])
    assert "router state identical on all 2 processes" in stdout
    checked = {"aux_free": ("expert_bias", "load_ema", "num_updates"),
               "spectra": ("ebar_ema", "load_ema", "num_updates")}
    line = next(line for line in stdout.splitlines() if line.startswith("router state identical"))
    assert all(name in line for name in checked[router]), line
