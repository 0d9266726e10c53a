"""Return conditioning of trained Decision Transformers: achieved return against target return.

    python benchmarks/dt_sweep.py benchmarks/runs/walker2d-medium-expert-glmgym-dt-end-seed0 ...

For each run folder (its newest checkpoint) the agent is evaluated at `--points` targets from the
training data's worst episode return to 1.25x its best (`glmgym agent evaluate --sweep`), over
`--episodes` episodes each (episode seeds 0..N-1). Results go to `--out`, one entry per
(dataset, windows, init, seed, steps), kept across calls (an entry is redone only when its
checkpoint changed); `benchmarks/report.py` plots them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _machine import cpu_kind  # beside this script (sys.path[0])
from glmgym._io import atomic_write_json, read_json
from glmgym.agents.checkpoint import latest_checkpoint
from glmgym.agents.envs import RefScores
from glmgym.agents.evaluate import conditioning, evaluate, sweep_targets
from glmgym.agents.policy import Policy


def recipe(cfg: dict) -> tuple[str, str]:
    """A run's (windows, init); runs saved before those options existed used start windows and
    GPT-2's init (train._OLDER_RUNS)."""
    return cfg.get("windows", "start"), cfg.get("init", "gpt2")


def run_key(cfg: dict) -> tuple[str, str, str]:
    """A run's results key `<dataset>/<windows>[-<init>-init]/seed<N>/<steps>`, its windows and
    its init; GPT-2-init keys keep the form they had before `--init` existed."""
    windows, init = recipe(cfg)
    tag = windows + ("" if init == "gpt2" else f"-{init}-init")
    return f"{Path(cfg['dataset']).stem}/{tag}/seed{cfg['seed']}/{cfg['steps']}", windows, init


def policy_and_ref(ckpt: Path) -> tuple[Policy, RefScores | None]:
    """A checkpoint's policy and the reference scores recorded with it (None: not recorded)."""
    policy = Policy.from_pretrained(ckpt)
    recorded = policy.extras.get("ref_scores")
    return policy, RefScores(**recorded) if recorded else None


def sweep(run: Path, cfg: dict, points: int, episodes: int) -> dict:
    """One run folder's sweep (see the module docstring); `cfg`: its train_config.json."""
    ckpt = latest_checkpoint(run)
    policy, ref = policy_and_ref(ckpt)
    extras = policy.extras
    windows, init = recipe(cfg)
    report = evaluate(
        policy, extras["env_id"], sweep_targets(extras, points), episodes=episodes, seed=0, ref=ref
    )
    curve = conditioning(report)
    return {
        "checkpoint": ckpt.name,
        "dataset": extras.get("dataset"),
        "windows": windows,
        "init": init,
        "seed": cfg.get("seed"),
        "steps": cfg.get("steps"),
        "dataset_returns": extras.get("dataset_returns"),
        "targets": curve["targets"],
        "achieved": curve["achieved"],
        "achieved_std": [
            r["return_std"] for r in sorted(report["results"], key=lambda r: r["target_return"])
        ],
        "normalized": [
            r.get("normalized_mean") for r in sorted(report["results"], key=lambda r: r["target_return"])
        ],
        "slope": curve["slope"],
        "spread": curve["spread"],
        "episodes": episodes,
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_kind(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders of glmgym agent train (or of dt_quality.py)")
    p.add_argument("--points", type=int, default=7)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/dt_sweep.json")
    args = p.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    for run in map(Path, args.runs):
        cfg = read_json(run / "train_config.json")
        key, _, _ = run_key(cfg)
        if result.get(key, {}).get("checkpoint") == latest_checkpoint(run).name:
            print(f"{key}: done before")
            continue
        result[key] = sweep(run, cfg, args.points, args.episodes)
        atomic_write_json(out, result)
        r = result[key]
        print(
            f"{key}: slope {r['slope']:.3f}, spread {r['spread']:+.1f} "
            f"({' '.join(f'{t:.0f}->{a:.0f}' for t, a in zip(r['targets'], r['achieved']))})"
        )


if __name__ == "__main__":
    main()
