import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from glmgym.agents import TrainConfig, train
from glmgym.errors import GlmgymError

SMALL = dict(hidden_size=32, n_layer=2, context_len=5, batch_size=8, warmup_steps=3,
             eval_episodes=0, progress=False, log_every=2, precision="fp32")


def _weights(run: Path) -> dict:
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    return load_file(ckpt / "model.safetensors")


def test_resume_gives_the_same_weights_as_one_run(hopper_file, tmp_path):
    N = 6
    train(TrainConfig(dataset="d4rl:hopper-medium-v2", steps=2 * N, save_every=100,
                      out=str(tmp_path / "one"), **SMALL))
    train(TrainConfig(dataset="d4rl:hopper-medium-v2", steps=N, save_every=100,
                      out=str(tmp_path / "two"), **SMALL))
    first_half = _weights(tmp_path / "two")
    train(TrainConfig(steps=2 * N, resume=str(tmp_path / "two"), progress=False))
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] == two[name]).all(), name
    assert any((first_half[n] != two[n]).any() for n in two)  # the resumed run did train
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 2 * N + 1, 2))  # no duplicated records after the resume
    ckpts = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert ckpts == [f"step_{N:07d}", f"step_{2 * N:07d}"]


def test_resume_refuses_changing_the_math(hopper_file, tmp_path):
    train(TrainConfig(dataset="d4rl:hopper-medium-v2", steps=2, out=str(tmp_path / "r"), **SMALL))
    with pytest.raises(GlmgymError, match="cannot change --learning-rate"):
        train(TrainConfig(steps=4, learning_rate=1.0, resume=str(tmp_path / "r")))
    with pytest.raises(GlmgymError, match="already at step 2"):
        train(TrainConfig(steps=2, resume=str(tmp_path / "r")))


def test_training_with_evaluation_writes_logs_checkpoints_and_report(hopper_file, tmp_path):
    run = train(TrainConfig(dataset="d4rl:hopper-medium-v2", steps=4, eval_every=2, save_every=2,
                            out=str(tmp_path / "run"),
                            **(SMALL | {"eval_episodes": 2, "precision": "bf16"})))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all("normalized_mean" in r for r in evals)
    assert all(r["loss"] > 0 for r in records if "loss" in r)
    report = json.loads((run / "eval.json").read_text())
    assert report["env_id"] == "Hopper-v5" and len(report["results"]) == 2
    extras = json.loads((run / "checkpoints" / "step_0000004" / "glmgym.json").read_text())
    assert extras["target_returns"] == [3600.0, 1800.0]
    assert len(extras["state_mean"]) == 11 and extras["context_len"] == 5
    assert json.loads((run / "train_config.json").read_text())["precision"] == "bf16"
    # the sweep reuses the final evaluation for the run's own targets: the same as evaluating again
    sweep = json.loads((run / "eval_sweep.json").read_text())["results"]
    targets = [e["target_return"] for e in sweep]
    assert targets == sorted(targets) and {3600.0, 1800.0} < set(targets)
    final = {e["target_return"]: e for e in report["results"]}
    assert all(e == final[e["target_return"]] for e in sweep if e["target_return"] in final)
    from glmgym.cli import main

    again = run / "again.json"
    assert main(["agent", "evaluate", "--checkpoint", str(run / "checkpoints" / "step_0000004"),
                 "--target-return", "3600", "--episodes", "2", "--json", str(again)]) == 0
    # (equal up to float rounding: the loaded checkpoint runs the same math in another order)
    assert json.loads(again.read_text())["results"][0]["returns"] == pytest.approx(final[3600.0]["returns"],
                                                                                rel=1e-6)


def test_ddp_on_cpu_with_two_processes(hopper_file, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "glmgym.cli", "agent", "train", "--dataset", "d4rl:hopper-medium-v2",
           "--steps", "4", "--batch-size", "8", "--hidden-size", "32", "--n-layer", "1",
           "--context-len", "5", "--eval-episodes", "0", "--no-progress", "--log-every", "2",
           "--precision", "fp32", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    state = json.loads((out / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["numpy_rng"]) == 2
    assert state["numpy_rng"][0] != state["numpy_rng"][1]  # each process draws its own windows
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # rank 0 logs alone


@pytest.mark.parametrize(("env_id", "refs", "expected"), [
    ("Hopper-v5", (15.0, 3220.5), (3600.0, 1800.0)),  # the shipped Hopper data: the paper's own
    ("HalfCheetah-v5", (-297.4, 9500.0), (9400.0, 4700.0)),  # an expert below D4RL's 12,135
    ("Walker2d-v5", (1.4, 4000.0), (4400.0, 2200.0)),
    ("Walker2d-v5", None, (5000.0, 2500.0)),  # no references in the data: the paper's targets
    ("Walker2d-v5", (50.0, 10.0), (5000.0, 2500.0)),  # an "expert" below random: ignored
])
def test_default_targets_follow_the_datasets_expert(env_id, refs, expected):
    from types import SimpleNamespace

    from glmgym.agents.train import default_target_returns

    metadata = {} if refs is None else {"ref_min_score": refs[0], "ref_max_score": refs[1]}
    assert default_target_returns(env_id, SimpleNamespace(metadata=metadata)) == expected


def test_paper_init_leaves_embeddings_and_head_at_linear_defaults():
    """`init="paper"`: the return/state/action embeddings and the action head keep nn.Linear's
    uniform(+-1/sqrt(fan_in)) init, as the paper's code and d3rlpy; the transformer is the same
    GPT-2 draw as with `init="gpt2"`, which gives every layer N(0, 0.02)."""
    from types import SimpleNamespace

    import torch

    from glmgym.agents.train import _build_model

    shapes = SimpleNamespace(state_dim=11, act_dim=3)
    paper, _ = _build_model(TrainConfig(init="paper", seed=3), shapes, torch.device("cpu"))
    gpt2, _ = _build_model(TrainConfig(init="gpt2", seed=3), shapes, torch.device("cpu"))
    heads = {"embed_return", "embed_state", "embed_action", "predict_action.0"}
    for name, layer in paper.named_modules():
        if name in heads:
            bound = layer.in_features**-0.5
            for p in (layer.weight, layer.bias):  # uniform in +-bound, not N(0, 0.02) / zeros
                assert p.abs().max() <= bound and p.std() > bound / 3, name
            assert gpt2.get_submodule(name).weight.std() < 0.03, name
    for name, p in paper.named_parameters():
        if name.rsplit(".", 1)[0] not in heads:
            assert torch.equal(p, gpt2.get_parameter(name)), name


def test_a_run_saved_before_init_and_windows_existed_resumes_with_their_old_behaviour(hopper_file, tmp_path):
    run = tmp_path / "old"
    train(TrainConfig(dataset="d4rl:hopper-medium-v2", steps=2, out=str(run), init="gpt2", windows="start",
                      **SMALL))
    saved = json.loads((run / "train_config.json").read_text())
    del saved["init"], saved["windows"]  # as runs of 2026-12-04 wrote it
    (run / "train_config.json").write_text(json.dumps(saved))
    # today's defaults (paper, end) mean "not given": the run keeps what it did; naming its old
    # values, as dt_quality.py --init gpt2 does, is no change either
    train(TrainConfig(steps=4, resume=str(run), progress=False))
    resumed = json.loads((run / "train_config.json").read_text())
    assert (resumed["init"], resumed["windows"], resumed["steps"]) == ("gpt2", "start", 4)
    train(TrainConfig(steps=6, init="gpt2", windows="start", resume=str(run), progress=False))
    assert json.loads((run / "train_config.json").read_text())["steps"] == 6
