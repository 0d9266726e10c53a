"""Recorded episodes of any policy in batched Gymnasium envs, and the random-policy datasets.

`run_episodes` is the one place that steps environments to record D4RL-layout transitions: the
SAC collection (`collect.py`) and the `random:ENV_ID` dataset specs (`open_dataset`) both use it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from glmgym.agents.data import OfflineDataset, load_dataset
from glmgym.agents.envs import make_env, make_vector_env
from glmgym.errors import GlmgymError

__all__ = ["ActFn", "check_spaces", "collect_random", "open_dataset", "run_episodes", "uniform_policy"]

ActFn = Callable[[np.ndarray], np.ndarray]
"""A batched policy: observations [n, obs_dim] -> actions [n, act_dim]."""


def check_spaces(envs, env_id: str) -> None:
    """Raise GlmgymError unless the envs have a Box action space and flat Box observations."""
    import gymnasium as gym

    if not isinstance(envs.single_action_space, gym.spaces.Box):
        raise GlmgymError(f"{env_id} has a {type(envs.single_action_space).__name__} action space; "
                          "glmgym collects continuous (Box) actions only")
    if not isinstance(envs.single_observation_space, gym.spaces.Box) or \
            len(envs.single_observation_space.shape) != 1:
        raise GlmgymError(f"{env_id}: only flat Box observations are supported")


def run_episodes(
    env_id: str,
    act: ActFn,
    *,
    episodes: int | None = None,
    transitions: int | None = None,
    seed: int = 0,
    num_envs: int = 8,
    desc: str | None = None,
) -> dict[str, np.ndarray]:
    """Run whole episodes of `act` (batched over `num_envs` envs) and record every transition.

    Stops after exactly `episodes` episodes, or once at least `transitions` transitions of
    complete episodes are recorded. Episode k of the run is reset with seed `seed + k`.

    Returns:
        flat D4RL arrays (observations, next_observations, actions, rewards, terminals,
        timeouts, qpos, qvel) and `episode_returns`.
    """
    from tqdm.auto import tqdm

    if (episodes is None) == (transitions is None):
        raise ValueError("pass exactly one of episodes and transitions")
    n = min(num_envs, episodes) if episodes else num_envs
    envs = make_vector_env(env_id, n)
    keys = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts",
            "qpos", "qvel")
    out: dict[str, list] = {k: [] for k in keys}
    returns: list[float] = []
    try:
        check_spaces(envs, env_id)
        mujoco = hasattr(envs.envs[0].unwrapped, "data")
        started = n
        obs, _ = envs.reset(seed=[seed + i for i in range(n)])
        live = np.ones(n, bool)  # False: this env's current episode is not recorded
        buffers: list[list[tuple]] = [[] for _ in range(n)]
        resetting = np.zeros(n, bool)
        total = 0
        bar = tqdm(total=episodes or transitions, desc=desc, disable=desc is None,
                   unit="ep" if episodes else "step", mininterval=2.0)
        while (episodes and len(returns) < episodes) or (transitions and total < transitions):
            if not live.any() and not resetting.any():
                break
            action = np.asarray(act(obs), dtype=np.float32)
            if mujoco:
                qpos = [e.unwrapped.data.qpos.copy() for e in envs.envs]
                qvel = [e.unwrapped.data.qvel.copy() for e in envs.envs]
            next_obs, reward, term, trunc, _ = envs.step(action)
            for i in range(n):
                if resetting[i]:  # NEXT_STEP autoreset: this step only reset env i
                    resetting[i] = False
                    if episodes and started >= episodes:
                        live[i] = False
                    else:
                        started += 1
                    continue
                if not live[i]:
                    continue
                buffers[i].append((obs[i], next_obs[i], action[i], reward[i], term[i], trunc[i],
                                   qpos[i] if mujoco else np.zeros(0), qvel[i] if mujoco else np.zeros(0)))
                if term[i] or trunc[i]:
                    resetting[i] = True
                    ep = buffers[i]
                    buffers[i] = []
                    for k, col in zip(keys, zip(*ep)):
                        out[k].append(np.asarray(col))
                    returns.append(float(np.sum([s[3] for s in ep])))
                    total += len(ep)
                    bar.update(1 if episodes else len(ep))
            obs = next_obs
        bar.close()
    finally:
        envs.close()
    arrays = {k: np.concatenate(v).astype(np.float32 if k not in ("terminals", "timeouts") else bool)
              for k, v in out.items()}
    arrays["episode_returns"] = np.asarray(returns)
    return arrays


def uniform_policy(env_id: str, seed: int) -> ActFn:
    """A uniform random policy over `env_id`'s action box (batched: one action per row of obs)."""
    space = make_env(env_id).action_space
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(space.low, space.high, size=(len(obs), *space.shape))


def collect_random(env_id: str, episodes: int = 100, seed: int = 0, num_envs: int = 8) -> OfflineDataset:
    """`episodes` episodes of a uniform random policy, as an in-memory dataset (`random:` specs)."""
    if episodes <= 0:
        raise GlmgymError(f"random:{env_id}: the number of episodes must be positive")
    a = run_episodes(env_id, uniform_policy(env_id, seed), episodes=episodes, seed=seed, num_envs=num_envs)
    return OfflineDataset(
        name=f"{env_id.lower()}-random", observations=a["observations"], actions=a["actions"],
        rewards=a["rewards"], terminals=a["terminals"], timeouts=a["timeouts"], env_id=env_id,
        source=f"random:{env_id}:{episodes}",
        metadata={"policy": "uniform random", "seed": seed, "episodes": episodes},
    )


def open_dataset(spec: str, download: bool = False) -> OfflineDataset:
    """Any dataset spec: `random:ENV_ID[:EPISODES]` is generated here, the rest is
    `data.load_dataset`'s (its grammar).

    Raises:
        GlmgymError: a malformed spec, or what `load_dataset` / `collect_random` raise.
    """
    scheme, _, rest = spec.partition(":")
    if scheme != "random":
        return load_dataset(spec, download=download)
    env_id, _, n = rest.partition(":")
    try:
        episodes = int(n) if n else 100
    except ValueError:
        raise GlmgymError(f"random:{rest}: EPISODES must be an integer") from None
    return collect_random(env_id, episodes=episodes)
