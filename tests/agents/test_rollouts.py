"""Recorded episodes: exact counts, consistent arrays, the random-policy datasets."""

import numpy as np
import pytest

from glmgym.agents.rollouts import collect_random, run_episodes
from glmgym.errors import GlmgymError


def test_run_episodes_runs_exactly_the_requested_episodes():
    r = run_episodes("Hopper-v5", lambda obs: np.zeros((len(obs), 3)), episodes=5, num_envs=3, seed=7)
    assert len(r["episode_returns"]) == 5
    assert int(r["terminals"].sum() + r["timeouts"].sum()) == 5
    np.testing.assert_allclose(r["episode_returns"].sum(), r["rewards"].sum(), rtol=1e-5)


def test_random_datasets_are_seeded_and_whole_episodes():
    a = collect_random("Hopper-v5", episodes=3, seed=1, num_envs=2)
    b = collect_random("Hopper-v5", episodes=3, seed=1, num_envs=2)
    assert a.num_episodes == 3 and a.source == "random:Hopper-v5:3"
    np.testing.assert_array_equal(a.actions, b.actions)
    assert np.all(np.abs(a.actions) <= 1.0)  # inside Hopper's action box
    with pytest.raises(GlmgymError, match="must be positive"):
        collect_random("Hopper-v5", episodes=0)


def test_random_specs_are_generated_by_open_dataset_not_loaded():
    from glmgym.agents.data import load_dataset
    from glmgym.agents.rollouts import open_dataset

    ds = open_dataset("random:Hopper-v5:2")
    assert ds.num_episodes == 2 and ds.source == "random:Hopper-v5:2"
    assert open_dataset("embedded:hopper-medium").name == "hopper-medium"  # the rest: load_dataset's
    with pytest.raises(GlmgymError, match="EPISODES must be an integer"):
        open_dataset("random:Hopper-v5:many")
    with pytest.raises(GlmgymError, match="not loaded"):
        load_dataset("random:Hopper-v5")
