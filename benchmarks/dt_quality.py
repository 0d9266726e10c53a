"""Proof of learning on the embedded hopper-medium: glmgym's DT vs BC vs d3rlpy's DT vs the data.

Every method trains for the same number of gradient steps (default: the `cpu` preset's 10k, with
1k warmup) on the same HDF5 file, for each training seed; every policy is then scored over the
same evaluation episodes (seeds seed..seed+N-1). glmgym's DT and d3rlpy's DT are evaluated at three
target returns; the table reports each method at its best target (best mean over seeds).
Normalized scores use the dataset's own reference returns (random and expert policy, from its
metadata). d3rlpy runs in a virtual environment of its own (it pins gymnasium 1.0.0):

    python3 -m venv /tmp/d3rlpy && /tmp/d3rlpy/bin/pip install torch==2.13.0 d3rlpy h5py \\
        "gymnasium[mujoco]==1.0.0"
    python benchmarks/dt_quality.py --d3rlpy-python /tmp/d3rlpy/bin/python

Results are cached per (method, seed) in the output JSON, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from glmgym._io import atomic_write_json
from glmgym.agents import TrainConfig, load_checkpoint, train
from glmgym.agents.checkpoint import latest_checkpoint
from glmgym.agents.data import embedded_datasets, load_dataset
from glmgym.agents.envs import normalized_score, reference_scores
from glmgym.agents.evaluate import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="hopper-medium", help="embedded dataset name")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=1_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--targets", type=float, nargs="+", default=None,
                   help="target returns (default: 3600, 1800 and the dataset's best return)")
    p.add_argument("--d3rlpy-python", default=None, help="python of a venv with d3rlpy")
    p.add_argument("--runs", default="benchmarks/runs", help="where glmgym's runs go")
    p.add_argument("--out", default="benchmarks/results/dt_quality.json")
    args = p.parse_args()

    out = Path(args.out)
    path = embedded_datasets()[args.dataset]
    ds = load_dataset(f"embedded:{args.dataset}")
    ref = reference_scores(ds.env_id, ds.metadata)
    summary = ds.summary()
    targets = args.targets or [3600.0, 1800.0, float(np.round(summary["return_max"]))]
    # cached runs are reused only for the same data and settings; anything else starts over
    setting = {"dataset": f"embedded:{args.dataset}",
               "dataset_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
               "steps": args.steps, "warmup": args.warmup, "episodes": args.episodes,
               "targets": targets}
    cache = json.loads(out.read_text()) if out.exists() else {}
    if cache and {k: cache.get("config", {}).get(k) for k in setting} != setting:
        print(f"{out}: cached runs are for other data or settings; starting over")
        cache = {}
    runs = cache.setdefault("runs", {})
    cache.setdefault("config", dict(setting))  # saved with the first run, so a resume matches

    def save() -> None:
        atomic_write_json(out, cache)

    # one method at a time over all seeds (the slow peer last), each result cached at once
    for seed in args.seeds:
        key = f"glmgym_dt/{seed}"
        if key in runs:
            continue
        run_dir = Path(args.runs) / f"glmgym-dt-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)  # not in the cache: an old or interrupted run
        t0 = time.perf_counter()
        train(TrainConfig(dataset=f"embedded:{args.dataset}", steps=args.steps, warmup_steps=args.warmup,
                          seed=seed, eval_episodes=0, save_every=args.steps, out=str(run_dir),
                          progress=False))
        seconds = time.perf_counter() - t0
        ckpt = load_checkpoint(latest_checkpoint(run_dir))
        policy = ckpt.policy()
        report = evaluate(policy, ds.env_id, targets, episodes=args.episodes, seed=seed, ref=ref)
        runs[key] = {"train_seconds": seconds,
                     "returns": {str(r["target_return"]): r["returns"] for r in report["results"]}}
        save()
    for algo in ("bc", "dt") if args.d3rlpy_python else ():
        for seed in args.seeds:
            key = f"{'d3rlpy_dt' if algo == 'dt' else 'bc'}/{seed}"
            if key in runs:
                continue
            with tempfile.TemporaryDirectory() as cwd:  # d3rlpy writes d3rlpy_logs/ there
                proc = subprocess.run(
                    [args.d3rlpy_python, str(Path(__file__).resolve().with_name("_d3rlpy_runner.py")),
                     "--dataset", str(path), "--algo", algo, "--env", ds.env_id,
                     "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(seed),
                     "--episodes", str(args.episodes), "--targets", *map(str, targets)],
                    capture_output=True, text=True, cwd=cwd)
            if proc.returncode != 0:
                raise SystemExit(f"d3rlpy {algo} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[key] = {"train_seconds": result["train_seconds"], "returns": {
                (k if k == "none" else str(float(k))): v for k, v in result["returns"].items()},
                "versions": {"d3rlpy": result["d3rlpy"], "gymnasium": result["gymnasium"]}}
            save()

    methods: dict[str, dict] = {}
    for method in ("glmgym_dt", "d3rlpy_dt", "bc"):
        seeds = [s for s in args.seeds if f"{method}/{s}" in runs]
        if not seeds:
            continue
        per_target: dict[str, list[float]] = {}
        for s in seeds:
            for target, returns in runs[f"{method}/{s}"]["returns"].items():
                per_target.setdefault(target, []).append(float(np.mean(normalized_score(returns, ref))))
        best = max(per_target, key=lambda t: np.mean(per_target[t]))
        methods[method] = {
            "normalized_score_mean": float(np.mean(per_target[best])),
            "normalized_score_std": float(np.std(per_target[best])),
            "best_target_return": None if best == "none" else float(best),
            "by_target": {t: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                          for t, v in per_target.items()},
            "train_seconds": float(np.mean([runs[f"{method}/{s}"]["train_seconds"] for s in seeds])),
            "seeds": seeds,
        }
    ds_norm = normalized_score(ds.episode_returns(), ref)
    methods["dataset"] = {"normalized_score_mean": float(ds_norm.mean()),
                          "normalized_score_std": float(ds_norm.std()), "train_seconds": 0.0,
                          "return_mean": summary["return_mean"]}
    cache.update(methods)
    cache["config"] = {**setting, "seeds": args.seeds,
                       "reference_scores": {"min": ref.min, "max": ref.max, "source": ref.source},
                       "date": time.strftime("%Y-%m-%d")}
    save()
    for name in ("glmgym_dt", "d3rlpy_dt", "bc", "dataset"):
        if name in methods:
            m = methods[name]
            print(f"{name:>10}: {m['normalized_score_mean']:6.1f} ± {m['normalized_score_std']:5.1f}"
                  f"  train {m['train_seconds']:7.1f} s")


if __name__ == "__main__":
    main()
