"""Behavior policies -> offline datasets.

For now: a uniform random policy, which is what `random:ENV_ID` dataset specs generate on the spot
(the CLI's default dataset until an embedded one ships). Rollouts run in a vector env.
"""

from __future__ import annotations

import numpy as np

from glmgym.agents.data import OfflineDataset
from glmgym.agents.envs import make_vector_env
from glmgym.errors import GlmgymError

__all__ = ["collect_random"]


def collect_random(env_id: str, episodes: int = 100, seed: int = 0, num_envs: int = 8) -> OfflineDataset:
    """Roll out a uniform random policy for `episodes` complete episodes.

    Args:
        env_id: Gymnasium env id with Box observation and action spaces.
        episodes: number of complete episodes to record.
        seed: seeds the env resets (episode i of env j is reproducible) and the action sampling.
        num_envs: environments stepped together.
    """
    if episodes <= 0:
        raise GlmgymError(f"random:{env_id}: the number of episodes must be positive")
    envs = make_vector_env(env_id, num_envs)
    try:
        if len(envs.single_observation_space.shape or ()) != 1:
            raise GlmgymError(f"{env_id}: only flat Box observations are supported")
        envs.action_space.seed(seed)
        obs, _ = envs.reset(seed=seed)
        buffers: list[list[tuple]] = [[] for _ in range(num_envs)]
        done_episodes: list[list[tuple]] = []
        # With NEXT_STEP autoreset, the step after an episode's end is a reset step: skip it.
        resetting = np.zeros(num_envs, dtype=bool)
        while len(done_episodes) < episodes:
            action = envs.action_space.sample()
            next_obs, reward, term, trunc, _ = envs.step(action)
            for i in np.flatnonzero(~resetting):
                buffers[i].append((obs[i], action[i], reward[i], term[i], trunc[i]))
                if term[i] or trunc[i]:
                    done_episodes.append(buffers[i])
                    buffers[i] = []
            resetting = term | trunc
            obs = next_obs
    finally:
        envs.close()
    steps = [s for ep in done_episodes[:episodes] for s in ep]
    o, a, r, t, c = (np.array(x) for x in zip(*steps))
    return OfflineDataset(
        name=f"{env_id.lower()}-random",
        observations=o.astype(np.float32),
        actions=a.astype(np.float32),
        rewards=r.astype(np.float32),
        terminals=t.astype(bool),
        timeouts=c.astype(bool),
        env_id=env_id,
        source=f"random:{env_id}:{episodes}",
        metadata={"policy": "uniform random", "seed": seed, "episodes": episodes},
    )
