"""Trained Decision Transformers on held-out episodes: more episodes than the table's, other seeds.

    python benchmarks/dt_heldout.py benchmarks/runs/walker2d-medium-expert-glmgym-dt-end-seed0 ...

The table evaluates each run on 10 episodes (episode seeds 0-9), too few to tell two recipes
apart on a row whose episodes either run to the end or fall early. This evaluates each run
folder's newest checkpoint on `--episodes` episodes from episode seed `--seed` (default 30 from
100, as `dt_variant.py`'s fixed-target figures) at `--targets`. Results go to `--out`, one
entry per (dataset, windows, init, seed, steps), kept across calls (an entry is redone only when
its checkpoint or targets changed); `benchmarks/report.py` tabulates them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _machine import cpu_kind  # beside this script (sys.path[0])
from dt_sweep import policy_and_ref, run_key
from glmgym._io import atomic_write_json, read_json
from glmgym.agents.checkpoint import latest_checkpoint
from glmgym.agents.evaluate import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders of glmgym agent train (or of dt_quality.py)")
    p.add_argument("--targets", type=float, nargs="+", default=[4844.0])
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--seed", type=int, default=100, help="episode seed of the first episode")
    p.add_argument("--out", default="benchmarks/results/dt_heldout.json")
    args = p.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
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
                "normalized_mean", "normalized_std", "return_mean", "length_mean", "returns")}
                for r in report["results"]},
            "date": time.strftime("%Y-%m-%d"), "cpu": cpu_kind(),
        }
        atomic_write_json(out, result)
        print(f"{key}: " + ", ".join(f"{t}: {r['normalized_mean']:.1f} (length {r['length_mean']:.0f})"
                                     for t, r in result[key]["results"].items()))


if __name__ == "__main__":
    main()
