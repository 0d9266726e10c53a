"""The return model of `--variant max-return`: its fit, its file, and how a rollout uses it."""

import numpy as np
import pytest
import torch

from glmgym.agents import DecisionTransformer, DTConfig, Policy
from glmgym.agents.data import OfflineDataset
from glmgym.agents.evaluate import evaluate, format_report, rollout
from glmgym.agents.return_model import fit_return_model, load_return_model, save_return_model
from glmgym.errors import GlmgymError

LENGTH = 10


def _two_payoffs(episodes_each=30):
    """Episodes that visit the same states; half earn 1 a step, half 3: from the state at step t
    the returns-to-go are 1 * (10 - t) or 3 * (10 - t)."""
    n = 2 * episodes_each * LENGTH
    t = np.tile(np.arange(LENGTH), 2 * episodes_each)
    states = np.stack([t / LENGTH, np.zeros(n)], 1).astype(np.float32)
    rewards = np.repeat(np.r_[np.ones(episodes_each), 3 * np.ones(episodes_each)], LENGTH).astype(np.float32)
    timeouts = (t == LENGTH - 1)
    return OfflineDataset("two-payoffs", states, np.zeros((n, 1), np.float32), rewards, np.zeros(n, bool),
                          timeouts)


def _fit(data, expectile, steps=1500):
    return fit_return_model(data, np.zeros(2, np.float32), np.ones(2, np.float32), 1.0, max_ep_len=LENGTH,
                            expectile=expectile, hidden_size=32, steps=steps, learning_rate=3e-3)


def test_a_high_expectile_estimates_the_best_return_reachable_and_the_median_the_middle():
    data = _two_payoffs()
    high, median = _fit(data, 0.99), _fit(data, 0.5)
    t = np.arange(LENGTH)
    best = np.array([high.estimate(data.observations[i:i + 1], i)[0] for i in t])
    middle = np.array([median.estimate(data.observations[i:i + 1], i)[0] for i in t])
    # the best behaviour earns 3 * (10 - t) from step t; the mean of the two is 2 * (10 - t)
    np.testing.assert_allclose(best, 3.0 * (LENGTH - t), rtol=0.12, atol=0.6)
    np.testing.assert_allclose(middle, 2.0 * (LENGTH - t), rtol=0.12, atol=0.6)


def test_fitting_leaves_the_global_random_state_alone():
    before = torch.get_rng_state()
    _fit(_two_payoffs(4), 0.9, steps=5)
    assert torch.equal(before, torch.get_rng_state())
    a, b = _fit(_two_payoffs(4), 0.9, steps=20), _fit(_two_payoffs(4), 0.9, steps=20)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)  # seeded: the same fit twice


def test_file_round_trip_and_bad_files(tmp_path):
    model = _fit(_two_payoffs(4), 0.9, steps=20)
    save_return_model(model, tmp_path / "r.safetensors")
    again = load_return_model(tmp_path / "r.safetensors")
    assert (again.state_dim, again.max_ep_len, again.hidden_size, again.expectile) == (2, LENGTH, 32, 0.9)
    s = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    np.testing.assert_array_equal(model.estimate(s, 3), again.estimate(s, 3))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GlmgymError, match="not a glmgym return model"):
        load_return_model(tmp_path / "bad.safetensors")
    with pytest.raises(GlmgymError, match="expectile must be in"):
        _fit(_two_payoffs(4), 1.0, steps=1)


class _Estimate:
    """A stand-in return model: c + slope * t for every state."""

    def __init__(self, c, slope):
        self.c, self.slope = c, slope

    def estimate(self, states, timestep):
        return np.full(len(states), self.c + self.slope * timestep, np.float32)


def _spied_policy(monkeypatch, return_model=None):
    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig(state_dim=11, act_dim=3, hidden_size=32, max_ep_len=1000))
    policy = Policy(model, np.zeros(11, np.float32), np.ones(11, np.float32), 1000.0, 5,
                    return_model=return_model)
    seen = []
    inner = model.predict_last_action

    def spy(states, actions, returns_to_go, timesteps):
        seen.append(returns_to_go[0, -1, 0].item())
        return inner(states, actions, returns_to_go, timesteps)

    monkeypatch.setattr(model, "predict_last_action", spy)
    return policy, seen


def test_target_max_conditions_on_the_larger_of_the_carried_target_and_the_estimate(monkeypatch):
    # an estimate that grows each step always wins: the model sees exactly the estimate
    policy, seen = _spied_policy(monkeypatch, _Estimate(2.0, 0.5))
    rollout(policy, "Hopper-v5", "max", episodes=1, seed=1)
    assert len(seen) > 3
    np.testing.assert_allclose(seen, 2.0 + 0.5 * np.arange(len(seen)), rtol=1e-6)
    # one that falls faster than any reward never wins after the first step: the rollout is the
    # plain one with the first estimate (2.0 x reward scale 1000) as its target
    policy, seen = _spied_policy(monkeypatch, _Estimate(2.0, -0.5))
    rollout(policy, "Hopper-v5", "max", episodes=1, seed=1)
    fixed, seen_fixed = _spied_policy(monkeypatch)
    rollout(fixed, "Hopper-v5", 2000.0, episodes=1, seed=1)
    np.testing.assert_allclose(seen, seen_fixed, rtol=1e-6)


def test_target_max_without_a_return_model_is_a_clear_error_and_reports_label_it(monkeypatch):
    policy, _ = _spied_policy(monkeypatch)
    with pytest.raises(GlmgymError, match="needs a checkpoint with a return model"):
        rollout(policy, "Hopper-v5", "max", episodes=1)
    policy, _ = _spied_policy(monkeypatch, _Estimate(1.0, 0.0))
    report = evaluate(policy, "Hopper-v5", ["max", 1800], episodes=1)
    assert [r["target_return"] for r in report["results"]] == ["max", 1800.0]
    assert "\n       max " in format_report(report)
