"""A return-aligned variant tried on the DT table's runs: target "max" against the fixed target.

    python benchmarks/dt_variant.py benchmarks/runs/walker2d-medium-expert-glmgym-dt-end-seed0 ...

The variant (the idea of Elastic DT, Wu et al. 2023, and Reinformer, Zhuang et al. 2024):
condition the Decision Transformer on the best return reachable from the current state instead of
a fixed target. The estimate comes from a small MLP over the normalized state and the timestep,
fitted by expectile regression (expectile 0.99, which approaches the best return the data reach
from a state) on the run's own training data; the transformer is the run's, untouched. At step 0
the return-to-go is the estimate at the reset state; at each later step it is the larger of the
carried-over target less the reward just earned and the estimate at the new state. (Reinformer
predicts the return with the transformer itself, which needs the token order state, return,
action, and conditions on the prediction alone.)

For each run folder (its newest checkpoint), on the same `--episodes` held-out episodes (seeds
`--seed`...) both ways:

- `fixed`: the target the DT table reports for that dataset (its best of three, chosen on
  episode seeds 0-9);
- `max`: the variant.

It stays a benchmark: on the medium-expert rows it did not beat the fixed target (see the
benchmarks page), so glmgym does not offer it. Results go to `--out`, one entry per run
(`dataset/seedN`), kept across calls; `report.py` renders them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _machine import cpu_kind  # beside this script (sys.path[0])
from glmgym._io import atomic_write_json, read_json
from glmgym.agents.checkpoint import latest_checkpoint
from glmgym.agents.data import episode_bounds, returns_to_go
from glmgym.agents.envs import RefScores, make_vector_env, normalized_score
from glmgym.agents.evaluate import rollout
from glmgym.agents.policy import Policy
from glmgym.agents.rollouts import open_dataset

RESULTS = Path(__file__).parent / "results"
EXPECTILE, HIDDEN, FIT_STEPS, FIT_BATCH, FIT_LR = 0.99, 256, 5000, 256, 1e-3


class ReturnModel(nn.Module):
    """MLP (normalized state, timestep / max_ep_len) -> return-to-go / reward scale."""

    def __init__(self, state_dim: int, max_ep_len: int) -> None:
        super().__init__()
        self.max_ep_len = max_ep_len
        self.net = nn.Sequential(nn.Linear(state_dim + 1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN),
                                 nn.ReLU(), nn.Linear(HIDDEN, 1))

    def forward(self, states: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x = torch.cat([states, (timesteps.to(states.dtype) / self.max_ep_len)[:, None]], dim=-1)
        return self.net(x).squeeze(-1)

    @torch.inference_mode()
    def estimate(self, states: np.ndarray, timestep: int) -> np.ndarray:
        s = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))
        return self(s, torch.full((len(s),), float(timestep))).numpy()


def fit_return_model(dataset, policy: Policy, max_ep_len: int, seed: int) -> ReturnModel:
    """Expectile regression of the return-to-go: loss |expectile - 1(u < 0)| u^2, u = target -
    prediction, over uniformly drawn transitions."""
    starts, lengths = episode_bounds(dataset.terminals, dataset.timeouts)
    # [n] step of each transition within its episode, clipped as the transformer's timesteps are
    steps_in = np.arange(dataset.num_transitions) - np.repeat(starts, lengths)
    t = torch.from_numpy(np.minimum(steps_in, max_ep_len - 1).astype(np.float32))
    y = torch.from_numpy(returns_to_go(dataset.rewards, starts, lengths) / np.float32(policy.reward_scale))
    x = torch.from_numpy(((dataset.observations - policy.state_mean) / policy.state_std).astype(np.float32))
    torch.manual_seed(seed)
    model = ReturnModel(x.shape[1], max_ep_len)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=FIT_LR)
    for _ in range(FIT_STEPS):
        idx = torch.randint(len(x), (min(FIT_BATCH, len(x)),), generator=gen)
        u = y[idx] - model(x[idx], t[idx])
        loss = (torch.abs(EXPECTILE - (u < 0).float()) * u.square()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def rollout_max(policy: Policy, return_model: ReturnModel, env_id: str, episodes: int,
                seed: int) -> np.ndarray:
    """Episode returns of the variant: all episodes at once, one model call a step (as
    `glmgym.agents.evaluate.rollout`, with the return-to-go rule of the module docstring)."""
    model, K, cfg = policy.model.eval(), policy.context_len, policy.model.config
    estimate = return_model.estimate
    envs = make_vector_env(env_id, episodes)
    horizon = envs.spec.max_episode_steps or 1000
    mean, std = policy.state_mean.astype(np.float32), policy.state_std.astype(np.float32)
    scale = np.float32(policy.reward_scale)
    states = np.zeros((episodes, horizon + 1, cfg.state_dim), np.float32)
    actions = np.zeros((episodes, horizon, cfg.act_dim), np.float32)
    rtg = np.zeros((episodes, horizon + 1), np.float32)
    obs, _ = envs.reset(seed=[seed + i for i in range(episodes)])
    states[:, 0] = (obs - mean) / std
    rtg[:, 0] = estimate(states[:, 0], 0)
    active, ep_return = np.ones(episodes, bool), np.zeros(episodes)
    try:
        for t in range(horizon):
            idx, lo = np.flatnonzero(active), max(0, t - K + 1)
            timesteps = np.minimum(np.arange(lo, t + 1), cfg.max_ep_len - 1)
            with torch.inference_mode():
                pred = model.predict_last_action(
                    torch.from_numpy(states[idx, lo : t + 1]), torch.from_numpy(actions[idx, lo : t + 1]),
                    torch.from_numpy(rtg[idx, lo : t + 1, None]),
                    torch.from_numpy(timesteps).expand(len(idx), -1))
            act = np.zeros((episodes, cfg.act_dim), np.float32)
            act[idx] = pred.float().numpy()
            obs, reward, term, trunc, _ = envs.step(act)
            actions[idx, t] = act[idx]
            ep_return[idx] += reward[idx]
            states[idx, t + 1] = (obs[idx] - mean) / std
            carried = rtg[idx, t] - reward[idx] / scale
            rtg[idx, t + 1] = np.maximum(carried, estimate(states[idx, t + 1], t + 1))
            active[idx[term[idx] | trunc[idx]]] = False
            if not active.any():
                break
    finally:
        envs.close()
    return ep_return


def table_target(dataset: str) -> float:
    """The target return the DT table reports for `dataset` (end windows)."""
    for path in sorted(RESULTS.glob("dt_windows_end_*.json")):
        entry = read_json(path)["datasets"].get(dataset)
        if entry and "glmgym_dt" in entry:
            return float(entry["glmgym_dt"]["best_target_return"])
    raise SystemExit(f"{dataset}: no end-window row in {RESULTS}/dt_windows_end_*.json")


def compare(run: Path, episodes: int, seed: int) -> dict:
    """One run folder's comparison (see the module docstring)."""
    cfg = read_json(run / "train_config.json")
    policy = Policy.from_pretrained(latest_checkpoint(run))
    extras = policy.extras
    dataset = open_dataset(extras["dataset_source"])
    mean, std = dataset.state_stats()
    same = np.allclose(mean, policy.state_mean, atol=1e-5) and np.allclose(std, policy.state_std, atol=1e-5)
    if not same:
        raise SystemExit(f"{run}: {extras['dataset_source']} is not the data this run was trained on")
    t0 = time.perf_counter()
    return_model = fit_return_model(dataset, policy, cfg["max_ep_len"], cfg["seed"])
    fit_s = time.perf_counter() - t0
    ref = RefScores(**extras["ref_scores"])
    target = table_target(extras["dataset"])
    fixed = rollout(policy, extras["env_id"], target, episodes, seed=seed)["returns"]
    best = rollout_max(policy, return_model, extras["env_id"], episodes, seed)
    fixed_n, best_n = normalized_score(fixed, ref), normalized_score(best, ref)
    return {
        "dataset": extras["dataset"], "seed": cfg["seed"], "steps": cfg["steps"],
        "windows": cfg.get("windows", "start"), "fixed_target": target,
        "episodes": episodes, "episode_seeds": [seed, seed + episodes - 1],
        "fixed": float(fixed_n.mean()), "fixed_std": float(fixed_n.std()),
        "max": float(best_n.mean()), "max_std": float(best_n.std()),
        "fixed_episodes": fixed.tolist(), "max_episodes": best.tolist(),
        "fit_seconds": fit_s, "date": time.strftime("%Y-%m-%d"), "cpu": cpu_kind(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders of glmgym agent train (or of dt_quality.py)")
    p.add_argument("--episodes", type=int, default=30, help="held-out episodes per side")
    p.add_argument("--seed", type=int, default=100, help="seed of the first held-out episode")
    p.add_argument("--out", default=str(RESULTS / "dt_variant.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    for run in map(Path, args.runs):
        cfg = read_json(run / "train_config.json")
        key = f"{Path(cfg['dataset']).stem}/seed{cfg['seed']}"
        result[key] = compare(run, args.episodes, args.seed)
        atomic_write_json(out, result)
        r = result[key]
        print(f"{key}: fixed {r['fixed_target']:.0f} {r['fixed']:.1f}, max {r['max']:.1f} "
              f"({args.episodes} held-out episodes)", flush=True)


if __name__ == "__main__":
    main()
