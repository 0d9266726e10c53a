"""How far one run's policy swings between checkpoints, and what the mean of their weights scores.

    python benchmarks/dt_average.py RUN [RUN ...] --target 4844

Each RUN is a run folder of `glmgym agent train` (or of `dt_quality.py`) with a checkpoint every
1k steps. The script evaluates the trained weights of the last `--checkpoints` checkpoints one by
one, and the uniform mean of those weights (stochastic weight averaging sampled every 1k steps),
on the same held-out episodes as `dt_heldout.py` (30 from episode seed 100) at one target
return. Runs trained with weight averaging (`--average-from`, in glmgym at commit e68aaf3 only)
hold the average in their checkpoints and the trained weights in the trainer state, which this
script reads. Results go to `--out`, one entry per run, kept across calls; `benchmarks/report.py`
tabulates them.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from _machine import cpu_kind  # beside this script (sys.path[0])
from dt_sweep import policy_and_ref, run_key
from glmgym._io import atomic_write_json, read_json
from glmgym.agents.evaluate import evaluate


def trained_policy(ckpt: Path):
    """The checkpoint's policy with the weights training went on from (not its average)."""
    policy, ref = policy_and_ref(ckpt)
    trained = torch.load(ckpt / "trainer_state.pt", weights_only=True).get("trained_model")
    if trained is not None:
        policy.model.load_state_dict(trained)
    return policy, ref


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders with a checkpoint every 1k steps")
    p.add_argument("--target", type=float, required=True, help="the target return")
    p.add_argument("--checkpoints", type=int, default=5, help="how many of the last checkpoints")
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--seed", type=int, default=100, help="episode seed of the first episode")
    p.add_argument("--label", default=None, help="recipe name for the table (default: from the run)")
    p.add_argument("--out", default="benchmarks/results/dt_average.json")
    args = p.parse_args()
    out = Path(args.out)
    result = read_json(out) if out.exists() else {}
    for run in map(Path, args.runs):
        cfg = read_json(run / "train_config.json")
        key, windows, init = run_key(cfg)
        ckpts = sorted((run / "checkpoints").glob("step_*"))[-args.checkpoints:]
        policies = {int(c.name.split("_")[1]): trained_policy(c) for c in ckpts}
        steps = sorted(policies)
        first, ref = policies[steps[-1]]
        mean = copy.deepcopy(first)
        states = [policies[s][0].model.state_dict() for s in steps]
        # the uniform mean of the checkpoints' weights, tensor by tensor (shapes: as the model's)
        mean.model.load_state_dict({name: torch.stack([st[name].float() for st in states]).mean(0)
                                    for name in states[-1]})
        recipe = args.label or f"{init} init" + ("" if windows == "end" else f", {windows} windows")
        entry = {"dataset": Path(cfg["dataset"]).stem, "recipe": recipe,
                 "seed": cfg["seed"], "target": args.target, "steps": steps,
                 "episode_seeds": [args.seed, args.seed + args.episodes - 1], "checkpoints": {}}
        t0 = time.perf_counter()
        for name, policy in [*((str(s), policies[s][0]) for s in steps), ("mean", mean)]:
            r = evaluate(policy, policy.extras["env_id"], [args.target], episodes=args.episodes,
                         seed=args.seed, ref=ref)["results"][0]
            scores = {"normalized_mean": r["normalized_mean"], "return_mean": r["return_mean"],
                      "returns": r["returns"], "lengths": r["lengths"]}
            if name == "mean":
                entry["mean_of_weights"] = scores
            else:
                entry["checkpoints"][name] = scores
            print(f"{key} {name}: {r['normalized_mean']:.1f}", flush=True)
        entry |= {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_kind(),
                  "seconds": time.perf_counter() - t0}
        result[key + ("" if args.label is None else f"/{args.label}")] = entry
        atomic_write_json(out, result)


if __name__ == "__main__":
    main()
