"""Train and evaluate one d3rlpy baseline on a D4RL-layout HDF5 file; print one JSON line.

Runs inside a virtual environment of its own (d3rlpy pins gymnasium==1.0.0); started by
`dt_quality.py`. Hyperparameters follow d3rlpy's own Decision Transformer reproduction script
(the paper's), with the warmup given on the command line so that every method shares the schedule.
`--load-model` evaluates weights an earlier run kept (`--save-model`) instead of training.
"""

from __future__ import annotations

import argparse
import json
import time

import gymnasium as gym
import h5py
import numpy as np


def dt_config(d3rlpy, warmup: int, hidden: int = 128, context: int = 20, heads: int = 1, layers: int = 3,
              max_timestep: int = 1000):
    """d3rlpy's Decision Transformer as its reproduction script configures it (the paper's
    hyperparameters; the sizes are arguments so that a test fixture can build a tiny one)."""
    return d3rlpy.algos.DecisionTransformerConfig(
        batch_size=64, learning_rate=1e-4,
        optim_factory=d3rlpy.optimizers.AdamWFactory(
            weight_decay=1e-4, clip_grad_norm=0.25,
            lr_scheduler_factory=d3rlpy.optimizers.WarmupSchedulerFactory(warmup_steps=warmup)),
        encoder_factory=d3rlpy.models.VectorEncoderFactory([hidden], exclude_last_activation=True),
        observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
        reward_scaler=d3rlpy.preprocessing.MultiplyRewardScaler(0.001),
        position_encoding_type=d3rlpy.PositionEncodingType.SIMPLE,
        context_size=context, num_heads=heads, num_layers=layers, max_timestep=max_timestep,
    )


def mdp_dataset(d3rlpy, path: str):
    """A D4RL-layout HDF5 file as d3rlpy's `MDPDataset` (episodes end at terminals and timeouts)."""
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    return d3rlpy.dataset.MDPDataset(data["observations"], data["actions"], data["rewards"],
                                     data["terminals"].astype(np.float32),
                                     data["timeouts"].astype(np.float32))


def save_model(algo, path: str, steps: int | None = None) -> None:
    """The transformer's weights (without the causal-mask buffers) and the observation scaler, as
    plain arrays: loadable with `np.load(allow_pickle=False)`; with the training `steps` if given.
    Written to a temp file, then renamed."""
    import os

    state = {k: v.detach().cpu().numpy() for k, v in algo.impl.modules.transformer.state_dict().items()
             if not k.endswith("_mask")}
    scaler = algo.observation_scaler
    arrays = {**state, "__observation_mean": np.asarray(scaler.mean, np.float64),
              "__observation_std": np.asarray(scaler.std, np.float64),
              "__observation_eps": np.asarray(scaler.eps, np.float64),
              "__reward_scale": np.asarray(algo.reward_scaler.multiplier, np.float64),
              "__num_heads": np.asarray(algo.config.num_heads),
              "__context_size": np.asarray(algo.config.context_size),
              **({"__steps": np.asarray(steps)} if steps is not None else {})}
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_model(d3rlpy, algo, dataset, path: str, steps: int) -> None:
    """Build `algo` on `dataset` as `fit` does, then put `save_model`'s weights into it. The
    observation scaler is fitted on `dataset` again and must equal the saved one, which also
    checks that the weights were trained on these data; the saved training steps (where the file
    has them) must equal `steps`."""
    import torch
    from d3rlpy.algos.utility import build_scalers_with_trajectory_slicer

    build_scalers_with_trajectory_slicer(algo, dataset)
    algo.create_impl(dataset.sample_transition().observation_signature.shape[0],
                     dataset.dataset_info.action_size)
    with np.load(path, allow_pickle=False) as saved:
        arrays = {k: saved[k] for k in saved.files}
    if "__steps" in arrays and int(arrays["__steps"]) != steps:
        raise SystemExit(f"{path}: trained for {int(arrays['__steps'])} steps, not {steps}")
    scaler = algo.observation_scaler
    for name, fitted in (("mean", scaler.mean), ("std", scaler.std)):
        kept, fitted = arrays[f"__observation_{name}"], np.asarray(fitted)
        if kept.shape != fitted.shape or not np.allclose(kept, fitted, rtol=1e-6, atol=1e-9):
            raise SystemExit(f"{path}: its observation {name} differs from this dataset's; "
                             "the weights were trained on other data")
    state = {k: torch.from_numpy(v) for k, v in arrays.items() if not k.startswith("__")}
    result = algo.impl.modules.transformer.load_state_dict(state, strict=False)
    # the causal-mask buffers are not saved (they are rebuilt by the constructor); nothing else may miss
    missing = [k for k in result.missing_keys if not k.endswith("_mask")]
    if missing or result.unexpected_keys:
        raise SystemExit(f"{path}: missing {missing}, unexpected {result.unexpected_keys}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True)
    p.add_argument("--algo", choices=("dt", "bc"), required=True)
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--episode-seed", type=int, default=None,
                   help="episode seed of the first episode (default: --seed, as glmgym's table)")
    p.add_argument("--targets", type=float, nargs="*", default=[])
    p.add_argument("--save-model", metavar="NPZ",
                   help="also write the trained DT's weights and observation scaler here (numpy arrays, "
                        "d3rlpy's names; `_d3rlpy_convert.py` turns them into a glmgym checkpoint)")
    p.add_argument("--load-model", metavar="NPZ",
                   help="evaluate these weights (written by --save-model) instead of training (DT only)")
    args = p.parse_args()
    if args.load_model and (args.algo != "dt" or args.save_model):
        p.error("--load-model is for --algo dt, without --save-model")

    import d3rlpy
    import torch

    dataset = mdp_dataset(d3rlpy, args.dataset)
    d3rlpy.seed(args.seed)
    if args.algo == "dt":
        algo = dt_config(d3rlpy, args.warmup).create(device="cpu:0")
    else:
        algo = d3rlpy.algos.BCConfig(
            batch_size=64, observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
        ).create(device="cpu:0")
    if args.load_model:
        load_model(d3rlpy, algo, dataset, args.load_model, args.steps)
        train_seconds = None
    else:
        t0 = time.perf_counter()
        algo.fit(dataset, n_steps=args.steps, n_steps_per_epoch=args.steps, show_progress=False,
                 save_interval=10**9, experiment_name=f"bench_{args.algo}_{args.seed}", with_timestamp=True)
        train_seconds = time.perf_counter() - t0
    if args.save_model and args.algo == "dt":
        save_model(algo, args.save_model, args.steps)

    env = gym.make(args.env)
    results = {}
    first = args.seed if args.episode_seed is None else args.episode_seed
    for target in args.targets if args.algo == "dt" else [None]:
        returns = []
        for i in range(args.episodes):  # the same episode seeds as glmgym's evaluation
            obs, _ = env.reset(seed=first + i)
            if target is not None:
                actor = algo.as_stateful_wrapper(target_return=target)
                actor.reset()
            total, reward, done = 0.0, 0.0, False
            while not done:
                with torch.no_grad():
                    action = actor.predict(obs, reward) if target is not None else algo.predict(obs[None])[0]
                obs, reward, term, trunc, _ = env.step(action)
                reward = float(reward)
                total += reward
                done = term or trunc
            returns.append(total)
        results["none" if target is None else str(target)] = returns
    print(json.dumps({"train_seconds": train_seconds, "returns": results,
                      "d3rlpy": d3rlpy.__version__, "gymnasium": gym.__version__}))


if __name__ == "__main__":
    main()
