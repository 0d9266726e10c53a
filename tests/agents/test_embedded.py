"""The artifacts shipped inside the package: datasets and the pretrained agent."""

import json

import numpy as np

from glmgym.agents import TrainConfig, load_checkpoint, load_dataset
from glmgym.agents.catalog import format_catalog, list_datasets
from glmgym.agents.data import embedded_datasets
from glmgym.agents.play import PRETRAINED_DIR
from glmgym.cli import main


def test_embedded_hopper_medium_has_the_documented_shape():
    assert "hopper-medium" in embedded_datasets()
    total = sum(p.stat().st_size for p in embedded_datasets().values())
    assert total <= 30 * 2**20  # all shipped data together <= 30 MB
    ds = load_dataset("embedded:hopper-medium")
    assert (ds.state_dim, ds.act_dim) == (11, 3)
    assert ds.env_id == "Hopper-v5"
    assert ds.num_transitions >= 50_000
    assert ds.lengths.max() <= 1000
    ref_min, ref_max = ds.metadata["ref_min_score"], ds.metadata["ref_max_score"]
    # a medium policy: clearly better than random, clearly below the expert
    mean = ds.episode_returns().mean()
    assert ref_min < mean < ref_max


def test_pretrained_agent_loads_with_its_extras():
    ckpt = load_checkpoint(PRETRAINED_DIR)
    cfg = ckpt.model.config
    assert (cfg.state_dim, cfg.act_dim, cfg.hidden_size, cfg.n_layer) == (11, 3, 128, 3)
    assert ckpt.extras["env_id"] == "Hopper-v5"
    assert ckpt.extras["dataset"] == "hopper-medium"
    assert ckpt.state_mean.shape == (11,) and np.all(ckpt.state_std > 0)


def test_datasets_lists_the_embedded_ones(capsys):
    rows = list_datasets()
    assert any(r["spec"] == "embedded:hopper-medium" and r["episodes"] > 0 for r in rows)
    assert "embedded:hopper-medium" in format_catalog(rows)
    assert main(["agent", "datasets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["spec"] for r in listed} >= {"embedded:hopper-medium"}


def test_train_without_arguments_uses_the_embedded_dataset(capsys, tmp_path):
    assert TrainConfig().dataset == "embedded:hopper-medium"
    assert TrainConfig().steps == 10_000  # the cpu preset
    # the no-argument command, shortened for the test
    rc = main(["agent", "train", "--steps", "3", "--eval-episodes", "0", "--no-progress",
               "--hidden-size", "32"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "training on hopper-medium" in out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("dt-hopper-medium-")
    assert (runs[0] / "report.md").exists() and (runs[0] / "loss.png").exists()
