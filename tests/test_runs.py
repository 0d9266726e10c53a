"""Run folders and trainer state: the rules both trainers share."""

import json
from dataclasses import dataclass

import pytest

from glmgym.errors import GlmgymError
from glmgym.runs import TRAINER_STATE_JSON, check_world_size, new_run_dir, resume_config


@dataclass
class Options:
    lr: float = 1e-3
    steps: int = 10
    out: str | None = None
    resume: str | None = None


def test_a_new_run_never_writes_into_a_folder_that_holds_files(tmp_path):
    (tmp_path / "run").mkdir()
    assert new_run_dir(str(tmp_path / "run"), "x", resuming=False) == tmp_path / "run"  # empty: fine
    (tmp_path / "run" / "log.jsonl").write_text("")
    with pytest.raises(GlmgymError, match="already holds files"):
        new_run_dir(str(tmp_path / "run"), "x", resuming=False)
    assert new_run_dir(str(tmp_path / "run"), "x", resuming=True) == tmp_path / "run"
    assert new_run_dir(None, "dt-hopper", resuming=False).parts[:1] == ("runs",)


def test_resume_needs_the_runs_options_a_checkpoint_and_unchanged_math(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint-5"
    with pytest.raises(GlmgymError, match=r"has no opts\.json"):
        resume_config(Options(), run, "opts.json", ckpt, ("steps",))
    run.mkdir()
    (run / "opts.json").write_text(json.dumps({"lr": 0.5, "steps": 10, "out": None, "resume": None}))
    with pytest.raises(GlmgymError, match="no checkpoint yet"):
        resume_config(Options(), run, "opts.json", None, ("steps",))
    ckpt.mkdir()
    with pytest.raises(GlmgymError, match=r"trainer_state\.json is missing"):
        resume_config(Options(), run, "opts.json", ckpt, ("steps",))
    (ckpt / TRAINER_STATE_JSON).write_text("{broken")
    with pytest.raises(GlmgymError, match="not a readable JSON file"):
        resume_config(Options(), run, "opts.json", ckpt, ("steps",))
    (ckpt / TRAINER_STATE_JSON).write_text(json.dumps({"step": 5, "world_size": 2}))
    cfg = resume_config(Options(steps=20, resume=str(run)), run, "opts.json", ckpt, ("steps",))
    assert (cfg.lr, cfg.steps, cfg.out) == (0.5, 20, str(run))  # the run's lr, the new steps
    with pytest.raises(GlmgymError, match="cannot change --lr"):
        resume_config(Options(lr=0.1), run, "opts.json", ckpt, ("steps",))
    with pytest.raises(GlmgymError, match="written by 2 processes"):
        check_world_size(ckpt, 1)
    assert check_world_size(ckpt, 2)["step"] == 5
