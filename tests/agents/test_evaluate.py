import numpy as np
import pytest
import torch

from glmgym.agents import DecisionTransformer, DTConfig
from glmgym.agents.envs import D4RL_REF_SCORES
from glmgym.agents.evaluate import Policy, evaluate, format_report, rollout
from glmgym.errors import GlmgymError


def _policy(state_dim=11, act_dim=3, seed=0):
    torch.manual_seed(seed)
    model = DecisionTransformer(DTConfig(state_dim=state_dim, act_dim=act_dim, hidden_size=32,
                                         max_ep_len=1000))
    return Policy(model, np.zeros(state_dim, np.float32), np.ones(state_dim, np.float32), 1000.0, 5)


def test_vectorized_rollout_equals_one_episode_at_a_time():
    policy = _policy()
    together = rollout(policy, "Hopper-v5", 1000.0, episodes=4, seed=3)
    alone = rollout(policy, "Hopper-v5", 1000.0, episodes=4, seed=3, num_envs=1)
    assert together["seeds"].tolist() == alone["seeds"].tolist() == [3, 4, 5, 6]
    np.testing.assert_array_equal(together["lengths"], alone["lengths"])
    # batched vs single matmuls may differ in the last float bits
    np.testing.assert_allclose(together["returns"], alone["returns"], rtol=1e-4)
    assert int(together["env_steps"]) == together["lengths"].sum()


def test_evaluate_reports_each_target_with_normalized_scores():
    report = evaluate(_policy(), "Hopper-v5", [3600, 1800], episodes=2, seed=0,
                      ref=D4RL_REF_SCORES["hopper"])
    assert [r["target_return"] for r in report["results"]] == [3600.0, 1800.0]
    for r in report["results"]:
        assert r["episodes"] == 2 and len(r["returns"]) == 2
        assert r["return_min"] <= r["return_mean"] <= r["return_max"]
        ref = D4RL_REF_SCORES["hopper"]
        expected = 100 * (np.array(r["returns"]) - ref.min) / (ref.max - ref.min)
        assert r["normalized_mean"] == pytest.approx(expected.mean())
        assert 1 <= r["length_mean"] <= 1000
    table = format_report(report)
    assert "Hopper-v5" in table and "3600" in table and "D4RL" in table


def test_episode_is_capped_at_the_env_limit():
    # Pendulum never terminates: its TimeLimit (200) must end every episode.
    policy = _policy(state_dim=3, act_dim=1)
    r = rollout(policy, "Pendulum-v1", 0.0, episodes=2)
    assert r["lengths"].tolist() == [200, 200]


def test_model_env_mismatch_is_a_clear_error():
    with pytest.raises(GlmgymError, match="wrong --env"):
        rollout(_policy(state_dim=17, act_dim=6), "Hopper-v5", 100.0, episodes=1)
