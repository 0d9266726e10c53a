"""`benchmarks/dt_quality.py --merge`: seeds run in parallel processes fold into one table file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "dt_quality.py"


def _part(config: dict, seed: int, returns: list[float]) -> dict:
    run = {"train_seconds": 100.0 + seed, "resumed": False, "returns": {"3600.0": returns},
           "date": "2026-12-06", "cpu": "avx2"}
    return {"datasets": {"hopper-medium": {"config": config, "runs": {f"glmgym_dt/{seed}": run}}}}


def _merge(tmp_path: Path, *parts: dict, out: dict | None = None):
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part))
    out_path = tmp_path / "out.json"
    if out is not None:
        out_path.write_text(json.dumps(out))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--merge", *map(str, paths), "--out", str(out_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    return proc, out_path


def test_merge_folds_the_seeds_of_parallel_runs_and_summarizes(tmp_path):
    ref = {"min": 15.0, "max": 3215.0, "source": "dataset"}
    config = {"dataset_file": "hopper-medium.hdf5", "env_id": "Hopper-v5", "steps": 10,
              "reference_scores": ref}
    proc, out = _merge(tmp_path, _part(config, 0, [1615.0, 1615.0]), _part(config, 1, [2415.0, 2415.0]))
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(out.read_text())["datasets"]["hopper-medium"]
    assert set(entry["runs"]) == {"glmgym_dt/0", "glmgym_dt/1"}
    # normalized by the embedded file's own references: (return - min) / (max - min) * 100, per seed
    from glmgym.agents.data import load_dataset
    from glmgym.agents.envs import normalized_score, reference_scores

    ds = load_dataset("embedded:hopper-medium")
    r = reference_scores("Hopper-v5", ds.metadata)
    per_seed = [float(np.mean(normalized_score(np.array(v), r))) for v in ([1615.0] * 2, [2415.0] * 2)]
    dt = entry["glmgym_dt"]
    assert dt["seeds"] == [0, 1]
    assert np.isclose(dt["normalized_score_mean"], np.mean(per_seed))
    assert np.isclose(dt["normalized_score_std"], np.std(per_seed))
    assert np.isclose(dt["train_seconds"], 100.5)
    assert "dataset" in entry and entry["dataset"]["normalized_score_mean"] > 0


def test_merge_refuses_runs_of_other_settings_and_writes_nothing(tmp_path):
    config = {"dataset_file": "hopper-medium.hdf5", "env_id": "Hopper-v5", "steps": 10}
    before = _part(config, 0, [1000.0])
    proc, out = _merge(tmp_path, _part({**config, "steps": 20}, 1, [2000.0]), out=before)
    assert proc.returncode != 0
    assert "other data or settings" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(out.read_text()) == before  # untouched


def test_merge_names_a_missing_part(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--merge", str(tmp_path / "nope.json"), "--out",
                           str(tmp_path / "out.json")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "nope.json does not exist" in proc.stderr
    assert not (tmp_path / "out.json").exists()
