"""The artifacts shipped inside the package: datasets and the pretrained agent."""

import json

import numpy as np
import pytest

from glmgym.agents import Policy, TrainConfig, load_dataset
from glmgym.agents.catalog import format_catalog, list_datasets
from glmgym.agents.config import PRESETS
from glmgym.agents.data import embedded_datasets
from glmgym.agents.play import pretrained_agent, pretrained_agents
from glmgym.cli import main

# (episodes, transitions) of each shipped file, as docs/agents/shipped.md documents them
SHIPPED = {"hopper-medium": (234, 80_168), "hopper-medium-replay": (232, 36_645),
           "hopper-expert": (80, 80_000), "walker2d-medium": (129, 79_318),
           "halfcheetah-medium": (75, 75_000)}
# per env: (state_dim, act_dim, env id, random reference, expert reference) of its one SAC run
FAMILIES = {"hopper": (11, 3, "Hopper-v5", 15.0, 3220.5),
            "walker2d": (17, 6, "Walker2d-v5", 1.4, 3926.0),
            "halfcheetah": (17, 6, "HalfCheetah-v5", -297.4, 8575.9)}


def test_embedded_datasets_have_the_documented_shapes():
    assert set(embedded_datasets()) == set(SHIPPED)
    total = sum(p.stat().st_size for p in embedded_datasets().values())
    assert total <= 60_000_000  # all shipped data together <= 60 MB
    returns = {}
    for name, (episodes, transitions) in SHIPPED.items():
        ds = load_dataset(f"embedded:{name}")
        state_dim, act_dim, env_id, ref_min, ref_max = FAMILIES[name.split("-")[0]]
        assert (ds.state_dim, ds.act_dim, ds.env_id) == (state_dim, act_dim, env_id)
        assert (ds.num_episodes, ds.num_transitions) == (episodes, transitions)
        assert ds.observations.shape == (transitions, state_dim)
        assert ds.actions.shape == (transitions, act_dim)
        assert ds.lengths.max() <= 1000 and np.isfinite(ds.observations).all()
        # the files of one env come from one SAC run: they share its reference returns
        assert ds.metadata["ref_min_score"] == pytest.approx(ref_min, abs=0.1)
        assert ds.metadata["ref_max_score"] == pytest.approx(ref_max, abs=0.1)
        returns[name] = ds.episode_returns().mean()
    # D4RL's levels: medium about a third of the expert, the expert near its own reference
    assert 0.25 < returns["hopper-medium"] / returns["hopper-expert"] < 0.45
    assert returns["hopper-expert"] == pytest.approx(3220.5, rel=0.02)
    # medium: the snapshot closest to a third of the expert, with the spread of a half-trained policy
    assert 0.3 < returns["walker2d-medium"] / FAMILIES["walker2d"][4] < 0.7
    assert 0.25 < returns["halfcheetah-medium"] / FAMILIES["halfcheetah"][4] < 0.45


def test_pretrained_agent_loads_with_its_extras():
    ckpt = Policy.from_pretrained(pretrained_agent("Hopper-v5"))
    cfg = ckpt.model.config
    assert (cfg.state_dim, cfg.act_dim, cfg.hidden_size, cfg.n_layer) == (11, 3, 128, 3)
    assert ckpt.extras["env_id"] == "Hopper-v5"
    assert ckpt.extras["dataset"] == "hopper-medium"
    assert ckpt.extras["dataset_source"] == "embedded:hopper-medium"  # no build-machine path
    assert ckpt.state_mean.shape == (11,) and np.all(ckpt.state_std > 0)


def test_every_shipped_agent_loads_and_matches_its_env():
    from glmgym.agents.envs import make_vector_env

    agents = pretrained_agents()
    assert "Hopper-v5" in agents
    for env_id, path in agents.items():
        ckpt = Policy.from_pretrained(path)
        envs = make_vector_env(env_id, 1)
        try:
            assert ckpt.model.config.state_dim == envs.single_observation_space.shape[0]
            assert ckpt.model.config.act_dim == envs.single_action_space.shape[0]
        finally:
            envs.close()
        assert ckpt.extras["target_returns"], env_id


def test_datasets_lists_the_embedded_ones(capsys):
    rows = list_datasets()
    assert any(r["spec"] == "embedded:hopper-medium" and r["episodes"] > 0 for r in rows)
    assert "embedded:hopper-medium" in format_catalog(rows)
    assert main(["agent", "datasets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["spec"] for r in listed} >= {f"embedded:{name}" for name in SHIPPED}


def test_train_without_arguments_uses_the_embedded_dataset(capsys, tmp_path):
    assert TrainConfig().dataset == "embedded:hopper-medium"
    assert TrainConfig().steps == PRESETS["cpu"]["steps"] == 1_250  # the cpu preset
    # the no-argument command, shortened for the test
    rc = main(["agent", "train", "--steps", "3", "--eval-episodes", "0", "--no-progress",
               "--hidden-size", "32"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "training on hopper-medium" in out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("dt-hopper-medium-")
    assert (runs[0] / "report.md").exists() and (runs[0] / "loss.png").exists()


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.endswith("-medium") and not n.startswith("hopper")])
def test_train_on_each_shipped_env_needs_no_other_option(name, tmp_path):
    """`glmgym agent train --dataset embedded:<env>-medium` infers the env and its target returns."""
    from glmgym.agents.train import default_target_returns

    rc = main(["agent", "train", "--dataset", f"embedded:{name}", "--steps", "3", "--eval-episodes", "0",
               "--no-progress", "--hidden-size", "32"])
    assert rc == 0
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = Policy.from_pretrained(run)
    state_dim, act_dim, env_id, *_ = FAMILIES[name.split("-")[0]]
    assert ckpt.extras["env_id"] == env_id
    assert (ckpt.model.config.state_dim, ckpt.model.config.act_dim) == (state_dim, act_dim)
    assert ckpt.extras["dataset_source"] == f"embedded:{name}"
    ds = load_dataset(f"embedded:{name}")
    targets = default_target_returns(env_id, ds)
    assert ckpt.extras["target_returns"] == pytest.approx(list(targets))
    # the paper's target sits at the normalized score it has under D4RL's references
    assert ds.episode_returns().mean() < targets[0] < 1.3 * ds.metadata["ref_max_score"]
