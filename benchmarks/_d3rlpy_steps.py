"""d3rlpy's Decision Transformer training steps on windows chosen here, for `dt_step_parity.py`.

Runs in d3rlpy's virtual environment. Builds d3rlpy 2.8.1's DT as the table's runs configure it
(`_d3rlpy_runner.dt_config`), saves its initial weights, then takes `--steps` gradient steps with
d3rlpy's own `update` on windows ending at transitions drawn here (episode index, step within the
episode), and writes the initial and final weights, the windows and d3rlpy's loss at every step.
`--no-dropout` turns dropout off so that the steps are deterministic and another implementation can
take the same ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np

from _d3rlpy_runner import dt_config, mdp_dataset, save_model  # beside this script (sys.path[0])


def take_steps(algo, dataset, steps: int, batch_size: int, context: int, rng: np.random.Generator):
    """`steps` calls of d3rlpy's `update`, each on windows cut by d3rlpy's `BasicTrajectorySlicer`
    that end at transitions drawn uniformly over every step of the data (d3rlpy's own sampler
    leaves out the last step of a timed-out episode). Returns the episode index [steps, B], the
    step within the episode [steps, B] and d3rlpy's loss [steps]."""
    from d3rlpy.dataset import BasicTrajectorySlicer, TrajectoryMiniBatch

    episodes = dataset.episodes
    lengths = np.array([e.size() for e in episodes])
    cum = np.cumsum(lengths)
    slicer = BasicTrajectorySlicer()
    ep_idx = np.empty((steps, batch_size), np.int64)
    step_idx = np.empty((steps, batch_size), np.int64)
    losses = np.empty(steps, np.float64)
    for s in range(steps):
        k = rng.integers(0, cum[-1], size=batch_size)
        ep = np.searchsorted(cum, k, side="right")
        t = k - (cum[ep] - lengths[ep])
        ep_idx[s], step_idx[s] = ep, t
        batch = TrajectoryMiniBatch.from_partial_trajectories(
            [slicer(episodes[e], int(i), context) for e, i in zip(ep, t)])
        losses[s] = algo.update(batch)["loss"]
    return ep_idx, step_idx, losses


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--out", required=True, help="an .npz prefix: OUT.init.npz, OUT.final.npz, OUT.steps.npz")
    args = p.parse_args()

    import d3rlpy
    import torch
    from d3rlpy.algos.utility import build_scalers_with_trajectory_slicer

    dataset = mdp_dataset(d3rlpy, args.dataset)
    d3rlpy.seed(args.seed)
    config = dt_config(d3rlpy, args.warmup)
    if args.no_dropout:
        config = dataclasses.replace(config, attn_dropout=0.0, resid_dropout=0.0, embed_dropout=0.0)
    algo = config.create(device="cpu:0")
    build_scalers_with_trajectory_slicer(algo, dataset)
    algo.create_impl(dataset.sample_transition().observation_signature.shape[0],
                     dataset.dataset_info.action_size)
    save_model(algo, f"{args.out}.init.npz")

    ep_idx, step_idx, losses = take_steps(algo, dataset, args.steps, config.batch_size, config.context_size,
                                          np.random.default_rng(args.seed))
    lengths = np.array([e.size() for e in dataset.episodes])
    save_model(algo, f"{args.out}.final.npz")
    tmp = f"{args.out}.steps.tmp.npz"
    np.savez(tmp, episode=ep_idx, step=step_idx, loss=losses, lengths=lengths,
             torch=np.asarray(torch.__version__), d3rlpy=np.asarray(d3rlpy.__version__))
    os.replace(tmp, f"{args.out}.steps.npz")


if __name__ == "__main__":
    main()
