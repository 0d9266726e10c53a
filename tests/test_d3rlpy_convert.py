"""`benchmarks/_d3rlpy_convert.py`: d3rlpy's trained DT as a glmgym run, checked against d3rlpy's
own outputs (`tests/agents/fixtures/d3rlpy_dt_tiny.npz`, made by d3rlpy 2.8.1)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "agents" / "fixtures" / "d3rlpy_dt_tiny.npz"


@pytest.fixture
def convert(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _d3rlpy_convert

    yield _d3rlpy_convert
    sys.modules.pop("_d3rlpy_convert", None)


def _golden():
    with np.load(FIXTURE, allow_pickle=False) as z:
        return dict(z)


def _glmgym_inputs(g: dict, facts: dict):
    """d3rlpy's raw inputs as glmgym's model takes them: normalized states, scaled returns,
    0-based timesteps (d3rlpy's are 1-based, 0 on padding)."""
    states = (g["golden.observations"] - facts["state_mean"]) / facts["state_std"]
    return (torch.from_numpy(states.astype(np.float32)), torch.from_numpy(g["golden.actions"]),
            torch.from_numpy(g["golden.returns_to_go"] / facts["reward_scale"]),
            torch.from_numpy(np.maximum(g["golden.timesteps"] - 1, 0)), torch.from_numpy(g["golden.masks"]))


def test_converted_model_predicts_what_d3rlpy_predicted(convert):
    g = _golden()
    model, facts = convert.glmgym_model(g)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.hidden_size, cfg.layer_norm_epsilon) == (2, 2, 16, 0.003)
    assert facts["context_len"] == 6 and facts["reward_scale"] == pytest.approx(1000.0)
    with torch.no_grad():
        pred = model.eval()(*_glmgym_inputs(g, facts)).numpy()
    real = g["golden.masks"].astype(bool)  # padded steps' outputs are not defined alike
    np.testing.assert_allclose(pred[real], g["golden.predicted"][real], atol=2e-6)
    # the mapping is not trivially right: the epsilon matters at these weights
    model.config.layer_norm_epsilon = 1e-5
    for block in model.encoder.h:
        block.ln_1.eps = block.ln_2.eps = 1e-5
    model.encoder.ln_f.eps = 1e-5
    with torch.no_grad():
        off = model(*_glmgym_inputs(g, facts)).numpy()
    assert np.abs(off[real] - g["golden.predicted"][real]).max() > 1e-5


def test_written_run_loads_as_a_policy_with_its_data_facts(convert, tmp_path):
    from glmgym.agents import Policy
    from glmgym.agents.collect import write_d4rl_hdf5

    rng = np.random.default_rng(0)
    n = 30
    rewards = rng.random(n).astype(np.float32)
    timeouts = np.zeros(n, bool)
    timeouts[[9, 29]] = True
    data = write_d4rl_hdf5(tmp_path / "tiny.hdf5", {
        "observations": rng.standard_normal((n, 5)).astype(np.float32),
        "next_observations": rng.standard_normal((n, 5)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, 3)).astype(np.float32), "rewards": rewards,
        "terminals": np.zeros(n, bool), "timeouts": timeouts}, {"env_id": "Hopper-v5"})
    run = convert.write_run(FIXTURE, tmp_path / "run", data, "Hopper-v5", seed=3, steps=10_000)
    cfg = json.loads((run / "train_config.json").read_text())
    assert (cfg["init"], cfg["windows"], cfg["seed"], cfg["steps"]) == ("d3rlpy-weights", "end", 3, 10_000)
    policy = Policy.from_pretrained(run)
    assert policy.context_len == 6 and policy.reward_scale == pytest.approx(1000.0)
    assert len(policy.extras["target_returns"]) >= 1  # `glmgym agent evaluate` runs without --target
    returns = policy.extras["dataset_returns"]
    assert returns["max"] == pytest.approx(max(rewards[:10].sum(), rewards[10:].sum()), rel=1e-5)
    g = _golden()
    states, actions, rtg, timesteps, _ = _glmgym_inputs(g, {"state_mean": policy.state_mean,
                                                           "state_std": policy.state_std,
                                                           "reward_scale": policy.reward_scale})
    with torch.no_grad():  # the full window's last action, as an evaluation step computes it
        last = policy.model.eval().predict_last_action(states[:1], actions[:1], rtg[:1], timesteps[:1])
    np.testing.assert_allclose(last[0].numpy(), g["golden.predicted"][0, -1], atol=2e-6)
