"""Evaluate a Decision Transformer in a Gymnasium env: N episodes at once, one model call a step.

`evaluate()` is the single code path used by training-time evaluation and by
`glmgym agent evaluate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from glmgym.agents.envs import RefScores, make_vector_env, normalized_score
from glmgym.agents.policy import Policy
from glmgym.errors import GlmgymError

__all__ = ["conditioning", "evaluate", "format_report", "rollout", "sweep_targets"]


def rollout(
    policy: Policy,
    env_id: str,
    target_return: float,
    episodes: int,
    seed: int = 0,
    num_envs: int | None = None,
    on_step: Callable | None = None,
    **env_kwargs,
) -> dict[str, np.ndarray]:
    """Run `episodes` episodes conditioned on `target_return`.

    Episodes run `num_envs` at a time (default: all at once) in a vector env; each step makes
    one batched model call for the still-running episodes. Episode i is reset with seed + i.

    `on_step(envs)` is called after the reset and after every step (rendering); `env_kwargs`
    go to `gymnasium.make_vec` (e.g. render_mode).

    Returns:
        returns, lengths and seeds of the episodes ([episodes] arrays) and the env steps taken.
    """
    num_envs = min(num_envs or episodes, episodes)
    out: dict[str, list] = {"returns": [], "lengths": [], "seeds": []}
    env_steps = 0
    for first in range(0, episodes, num_envs):
        n = min(num_envs, episodes - first)
        seeds = [seed + first + i for i in range(n)]
        ret, length, steps = _rollout_batch(policy, env_id, target_return, seeds, on_step, env_kwargs)
        out["returns"] += ret.tolist()
        out["lengths"] += length.tolist()
        out["seeds"] += seeds
        env_steps += steps
    result = {k: np.asarray(v) for k, v in out.items()}
    result["env_steps"] = np.asarray(env_steps)
    return result


def _rollout_batch(policy: Policy, env_id: str, target_return: float, seeds: list[int],
                   on_step: Callable | None = None, env_kwargs: dict | None = None):
    model, K = policy.model.eval(), policy.context_len
    cfg = model.config
    device = policy.device
    n = len(seeds)
    envs = make_vector_env(env_id, n, **(env_kwargs or {}))
    try:
        obs_shape = envs.single_observation_space.shape
        act_shape = envs.single_action_space.shape
        if obs_shape != (cfg.state_dim,) or act_shape != (cfg.act_dim,):
            raise GlmgymError(
                f"{env_id} has observations {obs_shape} and actions {act_shape}, but the model "
                f"expects ({cfg.state_dim},) and ({cfg.act_dim},): wrong --env for this model?"
            )
        horizon = envs.spec.max_episode_steps if envs.spec and envs.spec.max_episode_steps else 1000
        mean, std = policy.state_mean.astype(np.float32), policy.state_std.astype(np.float32)
        scale = np.float32(policy.reward_scale)
        states = np.zeros((n, horizon + 1, cfg.state_dim), np.float32)
        actions = np.zeros((n, horizon, cfg.act_dim), np.float32)
        rtg = np.zeros((n, horizon + 1), np.float32)
        obs, _ = envs.reset(seed=seeds)
        if on_step is not None:
            on_step(envs)
        states[:, 0] = (obs - mean) / std
        rtg[:, 0] = target_return / scale
        active = np.ones(n, dtype=bool)
        ep_return = np.zeros(n, np.float64)
        ep_len = np.zeros(n, np.int64)
        steps = 0
        for t in range(horizon):
            idx = np.flatnonzero(active)
            lo = max(0, t - K + 1)
            # All running episodes are at step t, so their last-K windows have the same length:
            # no padding is needed (a window shorter than K is exactly a masked, padded one).
            timesteps = np.minimum(np.arange(lo, t + 1), cfg.max_ep_len - 1)
            with torch.inference_mode():
                pred = model.predict_last_action(
                    torch.from_numpy(states[idx, lo : t + 1]).to(device),
                    torch.from_numpy(actions[idx, lo : t + 1]).to(device),  # a_t is a 0 placeholder
                    torch.from_numpy(rtg[idx, lo : t + 1, None]).to(device),
                    torch.from_numpy(timesteps).to(device).expand(len(idx), -1),
                )
            act = np.zeros((n, cfg.act_dim), np.float32)
            act[idx] = pred.float().cpu().numpy()
            obs, reward, term, trunc, _ = envs.step(act)
            steps += len(idx)
            actions[idx, t] = act[idx]
            ep_return[idx] += reward[idx]
            ep_len[idx] += 1
            states[idx, t + 1] = (obs[idx] - mean) / std
            rtg[idx, t + 1] = rtg[idx, t] - reward[idx] / scale
            active[idx[term[idx] | trunc[idx]]] = False
            if not active.any():
                break
            if on_step is not None:
                on_step(envs)
    finally:
        envs.close()
    return ep_return, ep_len, steps


def evaluate(
    policy: Policy,
    env_id: str,
    target_returns: list[float] | tuple[float, ...],
    episodes: int = 10,
    seed: int = 0,
    ref: RefScores | None = None,
    num_envs: int | None = None,
) -> dict[str, Any]:
    """Evaluate for each target return; return a JSON-ready report.

    Args:
        policy: model and normalization.
        env_id: Gymnasium env id.
        target_returns: returns to condition on, one evaluation each.
        episodes: episodes per target.
        seed: episode i is reset with seed + i (the same seeds for every target).
        ref: reference scores for the normalized score (None: not reported).
        num_envs: episodes run at once (default: all).
    """
    if not target_returns:
        raise GlmgymError("no target return to evaluate: pass --target-return R")
    results = []
    t0 = time.perf_counter()
    total_steps = 0
    for target in target_returns:
        r = rollout(policy, env_id, float(target), episodes, seed=seed, num_envs=num_envs)
        total_steps += int(r["env_steps"])
        entry: dict[str, Any] = {
            "target_return": float(target),
            "episodes": episodes,
            "return_mean": float(r["returns"].mean()),
            "return_std": float(r["returns"].std()),
            "return_min": float(r["returns"].min()),
            "return_max": float(r["returns"].max()),
            "length_mean": float(r["lengths"].mean()),
        }
        if ref is not None:
            norm = normalized_score(r["returns"], ref)
            entry["normalized_mean"] = float(norm.mean())
            entry["normalized_std"] = float(norm.std())
        entry.update(returns=r["returns"].tolist(), lengths=r["lengths"].tolist(),
                     seeds=r["seeds"].tolist())
        results.append(entry)
    seconds = time.perf_counter() - t0
    return {
        "env_id": env_id,
        "reference_scores": None if ref is None else {"min": ref.min, "max": ref.max,
                                                       "source": ref.source},
        "results": results,
        "seconds": seconds,
        "env_steps_per_s": total_steps / seconds if seconds > 0 else math.nan,
    }


def sweep_targets(extras: dict[str, Any], n: int) -> list[float]:
    """`n` target returns from the training data's worst episode return to 1.25x its best, from a
    checkpoint's recorded `dataset_returns` (or, for older checkpoints, from its reference scores:
    random to 1.25x expert).

    Raises:
        GlmgymError: the checkpoint records neither.
    """
    recorded = extras.get("dataset_returns") or {}
    low, high = recorded.get("min"), recorded.get("max")
    if low is None or high is None:
        ref = extras.get("ref_scores") or {}
        low, high = ref.get("min"), ref.get("max")
    if low is None or high is None:
        raise GlmgymError("the checkpoint records neither its data's returns nor reference scores: "
                          "pass --target-return R ... instead of --sweep")
    return [float(t) for t in np.round(np.linspace(low, 1.25 * high, n), 1)]


def conditioning(report: dict[str, Any]) -> dict[str, float]:
    """How much the achieved return follows the target over an `evaluate()` report's targets:
    `slope` (least squares, achieved return per unit of target) and `spread` (achieved at the
    highest target minus achieved at the lowest)."""
    res = sorted(report["results"], key=lambda r: r["target_return"])
    x = np.array([r["target_return"] for r in res])
    y = np.array([r["return_mean"] for r in res])
    slope = float(np.polyfit(x, y, 1)[0]) if len(res) > 1 and np.ptp(x) > 0 else 0.0
    return {"slope": slope, "spread": float(y[-1] - y[0]),
            "targets": [float(t) for t in x], "achieved": [float(v) for v in y]}


def format_report(report: dict[str, Any]) -> str:
    """A readable table of an `evaluate()` report."""
    ref = report.get("reference_scores")
    lines = [f"env {report['env_id']}"
             + (f"  (normalized with {ref['source']} references {ref['min']:.1f} / {ref['max']:.1f})"
                if ref else "  (no reference scores: normalized score not reported)")]
    header = (f"{'target':>10} {'episodes':>8} {'return mean':>12} {'std':>9} {'min':>9} "
              f"{'max':>9} {'length':>7}")
    if ref:
        header += f" {'normalized':>16}"
    lines.append(header)
    for e in report["results"]:
        row = (f"{e['target_return']:>10.0f} {e['episodes']:>8d} {e['return_mean']:>12.1f} "
               f"{e['return_std']:>9.1f} {e['return_min']:>9.1f} {e['return_max']:>9.1f} "
               f"{e['length_mean']:>7.0f}")
        if ref:
            row += f" {e['normalized_mean']:>8.1f} ± {e['normalized_std']:<5.1f}"
        lines.append(row)
    if "conditioning" in report:
        c = report["conditioning"]
        lines.append(f"return conditioning: slope {c['slope']:.2f} (achieved return per unit of target), "
                     f"spread {c['spread']:.1f} from the lowest target to the highest")
    lines.append(f"{report['env_steps_per_s']:.0f} env steps/s, {report['seconds']:.1f} s")
    return "\n".join(lines)
