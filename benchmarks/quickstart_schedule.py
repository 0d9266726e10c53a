"""How many steps the Quickstart needs: the score of `glmgym agent train`'s recipe along its run.

Trains `embedded:hopper-medium` with two schedules, once per seed each, with an evaluation every
few hundred steps, and reports the normalized return at the default target (3600) at each
evaluation, per seed and as mean ± std over the seeds:

- `4k`: 4000 steps, 1000 warmup (the `cpu` preset until 2026-12-06), GPT-2's init;
- `1.5k`: 1500 steps, 250 warmup, GPT-2's init (the default until 2026-12-06);
- `1.5k-paper-init`: the same with the paper's init of the embeddings and the action head
  (`TrainConfig.init`, the default since 2026-12-06).

The learning rate is constant after warmup, so the evaluation at step n of a run is the final
score of an n-step run with the same warmup and seed: one run per seed and warmup answers "does a
shorter schedule lose score?" for every shorter length at once. Everything else is the default
recipe (the paper's network and optimizer, end windows, batch 64). `--schedules` runs some of
them and keeps the others' results in `--out`.

Runs go to `benchmarks/runs/quickstart-<schedule>-seed<N>` and are reused when their log already
holds the final evaluation; each trains with one thread, so that several share a small machine.

    python benchmarks/quickstart_schedule.py [--seeds 0 1 2] [--schedules 1.5k-paper-init]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from glmgym._io import atomic_write_json

ROOT = Path(__file__).resolve().parent
TARGET = 3600.0
SCHEDULES = {
    "4k": {"steps": 4000, "warmup_steps": 1000, "eval_every": 500, "init": "gpt2"},
    "1.5k": {"steps": 1500, "warmup_steps": 250, "eval_every": 250, "init": "gpt2"},
    "1.5k-paper-init": {"steps": 1500, "warmup_steps": 250, "eval_every": 250, "init": "paper"},
}


def _evals(run: Path) -> dict[int, float]:
    """step -> normalized mean return at TARGET, from a run's log."""
    out = {}
    log = run / "log.jsonl"
    if not log.exists():
        return out
    for line in log.read_text().splitlines():
        e = json.loads(line)
        if e.get("event") == "eval":
            hit = [r for r in e["results"] if r["target_return"] == TARGET]
            if hit:
                out[int(e["step"])] = hit[0]["normalized_mean"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--schedules", nargs="+", choices=tuple(SCHEDULES), default=list(SCHEDULES))
    p.add_argument("--runs", type=Path, default=ROOT / "runs")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "quickstart_schedule.json")
    args = p.parse_args(argv)

    os.environ.setdefault("MUJOCO_GL", "egl")
    import torch

    from glmgym.agents.train import TrainConfig, train

    torch.set_num_threads(1)
    kept = json.loads(args.out.read_text()) if args.out.exists() else {}
    if kept.get("seeds", args.seeds) != args.seeds:
        kept = {}  # other seeds: their means do not compare
    schedules = {k: v for k, v in kept.get("schedules", {}).items() if k not in args.schedules}
    for name in args.schedules:
        sched = SCHEDULES[name]
        per_seed = {}
        for seed in args.seeds:
            run = args.runs / f"quickstart-{name}-seed{seed}"
            if sched["steps"] not in _evals(run):
                resume = run if (run / "checkpoints").exists() else None
                train(TrainConfig(dataset="embedded:hopper-medium", **sched, seed=seed, progress=False,
                                  out=None if resume else str(run), resume=str(resume) if resume else None))
            per_seed[seed] = _evals(run)
        common = sorted(set.intersection(*(set(e) for e in per_seed.values())))
        by_step = {
            str(s): {"normalized_mean": float(np.mean([per_seed[k][s] for k in args.seeds])),
                     "normalized_std": float(np.std([per_seed[k][s] for k in args.seeds])),
                     "per_seed": [per_seed[k][s] for k in args.seeds]}
            for s in common
        }
        schedules[name] = {**sched, "by_step": by_step}
        for s in common:
            e = by_step[str(s)]
            print(f"{name:5s} step {s:5d}: {e['normalized_mean']:5.1f} ± {e['normalized_std']:4.1f}  "
                  + " ".join(f"{x:5.1f}" for x in e["per_seed"]))
    atomic_write_json(args.out, {"dataset": "embedded:hopper-medium", "target_return": TARGET,
                                 "seeds": args.seeds, "eval_episodes": 10, "schedules": schedules})


if __name__ == "__main__":
    main()
