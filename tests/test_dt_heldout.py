"""`benchmarks/dt_heldout.py --d3rlpy`: d3rlpy's DT on the held-out episodes, beside glmgym's runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "dt_heldout.py"
FIXTURE = ROOT / "tests" / "agents" / "fixtures" / "d3rlpy_dt_tiny.npz"


def _fake_d3rlpy_python(tmp_path: Path, returns: dict) -> Path:
    """A stand-in for a d3rlpy venv's python: records the runner's arguments, saves a tiny d3rlpy
    model (the converter's fixture) where `--save-model` says, prints the runner's JSON line."""
    fake = tmp_path / "python"
    line = json.dumps({"train_seconds": 12.5, "returns": returns, "d3rlpy": "2.8.1", "gymnasium": "1.0.0"})
    save = f'while [ $# -gt 0 ]; do [ "$1" = --save-model ] && cp {FIXTURE} "$2"; shift; done\n'
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args.txt'}\n{save}echo '{line}'\n")
    fake.chmod(0o755)
    return fake


def _run(tmp_path: Path, fake: Path, out: Path):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--d3rlpy", "hopper-medium", "--d3rlpy-python", str(fake),
         "--d3rlpy-seeds", "1", "--targets", "3600", "1800", "--episodes", "2", "--seed", "100",
         "--steps", "20", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path)


def test_d3rlpy_runs_on_the_held_out_episodes_and_are_normalized_like_glmgyms(tmp_path):
    fake = _fake_d3rlpy_python(tmp_path, {"3600.0": [1615.0, 2415.0], "1800.0": [1000.0, 1200.0]})
    out = tmp_path / "heldout.json"
    proc = _run(tmp_path, fake, out)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args.txt").read_text().split()
    # the same episodes as glmgym's held-out evaluation: from episode seed 100, not the training seed
    assert args[args.index("--episode-seed") + 1] == "100"
    assert args[args.index("--seed") + 1] == "1"
    assert args[args.index("--steps") + 1] == "20"
    entry = json.loads(out.read_text())["hopper-medium/end-d3rlpy/seed1/20"]
    assert entry["init"] == "d3rlpy" and entry["episode_seeds"] == [100, 101]
    from glmgym.agents.data import load_dataset
    from glmgym.agents.envs import normalized_score, reference_scores

    ref = reference_scores("Hopper-v5", load_dataset("embedded:hopper-medium").metadata)
    assert np.isclose(entry["results"]["3600.0"]["normalized_mean"],
                      normalized_score(np.array([1615.0, 2415.0]), ref).mean())
    assert entry["results"]["1800.0"]["returns"] == [1000.0, 1200.0]
    # d3rlpy's weights are kept as a glmgym run folder beside glmgym's runs
    saved = Path(args[args.index("--save-model") + 1])
    assert saved == tmp_path / "benchmarks" / "runs" / "hopper-medium-d3rlpy-dt-seed1.npz"
    run = tmp_path / "benchmarks" / "runs" / entry["run"]
    assert json.loads((run / "train_config.json").read_text())["init"] == "d3rlpy-weights"
    assert (run / "checkpoints" / "step_0000020" / "model.safetensors").is_file()

    # a second call with the same targets trains nothing
    (tmp_path / "args.txt").unlink()
    proc = _run(tmp_path, fake, out)
    assert proc.returncode == 0 and "done before" in proc.stdout
    assert not (tmp_path / "args.txt").exists()


def test_the_tables_d3rlpy_runs_are_evaluated_again_without_training(tmp_path):
    """dt_quality.py keeps each d3rlpy DT's weights; dt_heldout.py then hands them to the runner
    (`--load-model`) instead of training that seed again."""
    fake = _fake_d3rlpy_python(tmp_path, {"3600.0": [1615.0, 2415.0], "1800.0": [1000.0, 1200.0]})
    table = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dt_quality.py"), "--methods", "d3rlpy_dt",
         "--datasets", "hopper-medium", "--d3rlpy-seeds", "1", "--d3rlpy-python", str(fake),
         "--steps", "20", "--episodes", "2", "--out", str(tmp_path / "table.json")],
        capture_output=True, text=True, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    args = (tmp_path / "args.txt").read_text().split()
    kept = tmp_path / "benchmarks" / "runs" / "hopper-medium-d3rlpy-dt-seed1.npz"
    assert Path(args[args.index("--save-model") + 1]) == kept and kept.is_file()
    assert "--load-model" not in args

    out = tmp_path / "heldout.json"
    proc = _run(tmp_path, fake, out)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args.txt").read_text().split()
    assert Path(args[args.index("--load-model") + 1]) == kept and "--save-model" not in args
    assert args[args.index("--episode-seed") + 1] == "100"
    entry = json.loads(out.read_text())["hopper-medium/end-d3rlpy/seed1/20"]
    assert entry["weights_from"] == kept.name
    assert entry["results"]["1800.0"]["returns"] == [1000.0, 1200.0]
    assert (tmp_path / "benchmarks" / "runs" / entry["run"] / "train_config.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--d3rlpy", "hopper-medium"], "--d3rlpy needs --d3rlpy-python"),
    ([], "give run folders"),
    (["--d3rlpy", "no-such-medium", "--d3rlpy-python", sys.executable], "not found"),
])
def test_bad_options_get_one_clear_message_and_write_nothing(tmp_path, extra, message):
    out = tmp_path / "heldout.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *extra, "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
