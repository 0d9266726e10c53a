"""Trained Decision Transformers on held-out episodes: more episodes than the table's, other seeds.

    python benchmarks/dt_heldout.py benchmarks/runs/walker2d-medium-expert-glmgym-dt-end-seed0 ...

The table evaluates each run on 10 episodes (episode seeds 0-9), too few to tell two recipes
apart on a row whose episodes either run to the end or fall early. This evaluates each run
folder's newest checkpoint on `--episodes` episodes from episode seed `--seed` (default 30 from
100, as `dt_variant.py`'s fixed-target figures) at `--targets`. Results go to `--out`, one
entry per (dataset, windows, init, seed, steps), kept across calls (an entry is redone only when
its checkpoint or targets changed); `benchmarks/report.py` tabulates them.

    python benchmarks/dt_heldout.py --d3rlpy walker2d-medium-expert --data-dir DIR \
        --d3rlpy-python VENV/bin/python --d3rlpy-seeds 0 1

trains d3rlpy's DT as `dt_quality.py` does (10k steps, one run at a time, not resumable) and
evaluates it on the same episodes, for the peer's figure beside glmgym's; where `dt_quality.py`
(or this script) already trained that seed on that dataset (`--runs-dir`/<dataset>-d3rlpy-dt-
seed<N>.npz), those weights are evaluated in d3rlpy's loop instead. Its weights are kept
as a glmgym run folder (`--runs-dir`/<dataset>-d3rlpy-dt-end-seed<N>, `_d3rlpy_convert.py`), so
that this script (as a run folder: glmgym's evaluation loop) and `dt_tokens.py` take it too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _d3rlpy_convert import write_run  # beside this script (sys.path[0])
from _machine import cpu_kind
from dt_quality import d3rlpy_weights, find_dataset, load_with_env, run_d3rlpy
from dt_sweep import policy_and_ref, run_key
from glmgym._io import atomic_write_json, read_json
from glmgym.agents.checkpoint import latest_checkpoint
from glmgym.agents.envs import normalized_score
from glmgym.agents.evaluate import evaluate


def d3rlpy_entries(args, result: dict) -> None:
    """Train d3rlpy's DT on `args.d3rlpy` for each of `args.d3rlpy_seeds` and evaluate it on the
    held-out episodes; each seed's entry is saved as soon as it is done."""
    path = find_dataset(args.d3rlpy, Path(args.data_dir), Path(args.runs_dir) / "data")
    if path is None:
        raise SystemExit(f"{args.d3rlpy}: not found (embedded or {args.data_dir}/<Env>-v5/)")
    _, env_id, ref = load_with_env(args.d3rlpy, path)
    for seed in args.d3rlpy_seeds:
        key = f"{args.d3rlpy}/end-d3rlpy/seed{seed}/{args.steps}"
        if result.get(key, {}).get("targets") == args.targets:
            print(f"{key}: done before")
            continue
        weights = d3rlpy_weights(Path(args.runs_dir), args.d3rlpy, seed)
        kept = weights.exists()  # trained before (by dt_quality.py): evaluate, do not train again
        r = run_d3rlpy(path, env_id, args, "dt", seed, args.targets, episode_seed=args.seed,
                       **({"load_model": weights} if kept else {"save_model": weights}))
        result[key] = d3rlpy_entry(args, seed, r, ref)
        if kept:
            result[key]["weights_from"] = weights.name
        # d3rlpy's weights as a glmgym run, for glmgym's evaluation loop and dt_tokens.py
        run = write_run(weights, Path(args.runs_dir) / f"{args.d3rlpy}-d3rlpy-dt-end-seed{seed}", path,
                        env_id, seed, args.steps)
        result[key]["run"] = run.name
        print(f"{key}: d3rlpy's weights as a glmgym run: {run}")
        atomic_write_json(Path(args.out), result)
        print(f"{key}: " + ", ".join(f"{t}: {x['normalized_mean']:.1f}"
                                     for t, x in result[key]["results"].items()))


def d3rlpy_entry(args, seed: int, r: dict, ref) -> dict:
    """The results entry of one d3rlpy run (`dt_quality.run_d3rlpy`'s output `r`)."""
    return {
        "dataset": args.d3rlpy, "windows": "end", "init": "d3rlpy", "seed": seed,
        "steps": args.steps, "targets": args.targets,
        "episode_seeds": [args.seed, args.seed + args.episodes - 1],
        "results": {t: {"normalized_mean": float(normalized_score(rets, ref).mean()),
                        "return_mean": float(np.mean(rets)), "returns": rets}
                    for t, rets in r["returns"].items()},
        "train_seconds": r["train_seconds"], "versions": r["versions"],
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_kind(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="run folders of glmgym agent train (or of dt_quality.py)")
    p.add_argument("--targets", type=float, nargs="+", default=[4844.0])
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--seed", type=int, default=100, help="episode seed of the first episode")
    p.add_argument("--out", default="benchmarks/results/dt_heldout.json")
    p.add_argument("--d3rlpy", metavar="DATASET", help="also train and evaluate d3rlpy's DT on it")
    p.add_argument("--d3rlpy-python", help="python of a venv with d3rlpy (as dt_quality.py's)")
    p.add_argument("--d3rlpy-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data-dir", default="datasets", help="as dt_quality.py's")
    p.add_argument("--runs-dir", default="benchmarks/runs", help="as dt_quality.py's --runs")
    p.add_argument("--steps", type=int, default=10_000, help="d3rlpy's training steps")
    p.add_argument("--warmup", type=int, default=1_000, help="d3rlpy's warmup steps")
    args = p.parse_args()
    if not args.runs and not args.d3rlpy:
        p.error("give run folders, --d3rlpy DATASET, or both")
    if args.d3rlpy and not args.d3rlpy_python:
        p.error("--d3rlpy needs --d3rlpy-python")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if args.d3rlpy:
        d3rlpy_entries(args, result)
    for run in map(Path, args.runs):
        cfg = read_json(run / "train_config.json")
        key, windows, init = run_key(cfg)
        ckpt = latest_checkpoint(run)
        old = result.get(key, {})
        if old.get("checkpoint") == ckpt.name and old.get("targets") == args.targets:
            print(f"{key}: done before")
            continue
        policy, ref = policy_and_ref(ckpt)
        extras = policy.extras
        report = evaluate(policy, extras["env_id"], args.targets, episodes=args.episodes,
                          seed=args.seed, ref=ref)
        result[key] = {
            "checkpoint": ckpt.name, "dataset": extras.get("dataset"), "windows": windows,
            "init": init, "seed": cfg.get("seed"), "steps": cfg.get("steps"),
            "targets": args.targets, "episode_seeds": [args.seed, args.seed + args.episodes - 1],
            "results": {str(r["target_return"]): {k: r.get(k) for k in (
                "normalized_mean", "normalized_std", "return_mean", "length_mean", "returns", "lengths")}
                for r in report["results"]},
            "date": time.strftime("%Y-%m-%d"), "cpu": cpu_kind(),
        }
        atomic_write_json(out, result)
        print(f"{key}: " + ", ".join(f"{t}: {r['normalized_mean']:.1f} (length {r['length_mean']:.0f})"
                                     for t, r in result[key]["results"].items()))


if __name__ == "__main__":
    main()
