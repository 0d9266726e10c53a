import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from glmgym.cli import main
from tests.conftest import write_d4rl

TINY = ["--hidden-size", "32", "--n-layer", "1", "--context-len", "5", "--batch-size", "8",
        "--no-progress"]


@pytest.mark.parametrize("argv", [
    [], ["agent"], ["agent", "train"], ["agent", "evaluate"], ["agent", "collect"], ["agent", "datasets"],
    ["agent", "play"], ["chat"], ["chat", "quantize"], ["chat", "serve"], ["chat", "finetune"],
    ["chat", "evaluate"], ["chat", "merge-lora"],
])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: glmgym" in out
    if argv == ["agent", "train"]:
        assert "--resume DIR" in out and "Dataset spec" in out and "default: 64" in out
    if argv == ["agent", "evaluate"]:
        assert "--target-return R [R ...]" in out and "--checkpoint DIR" in out
    expected = {  # one option of each command, with its help text from the config dataclass
        "agent collect": "--levels", "agent datasets": "--json", "agent play": "--video",
        "chat": "--quantize {4,8}", "chat quantize": "--group-size G", "chat serve": "--max-queue",
        "chat finetune": "--method {ptuning,lora,full}", "chat evaluate": "--ptuning-checkpoint DIR",
        "chat merge-lora": "--lora DIR",
    }
    if " ".join(argv) in expected:
        assert expected[" ".join(argv)] in out


def test_train_then_evaluate_through_the_cli(hopper_file, tmp_path, capsys):
    rc = main(["agent", "train", "--dataset", "d4rl:hopper-medium-v2", "--steps", "20",
               "--eval-every", "10", "--eval-episodes", "2", "--out", "run", *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "checkpoint: run/checkpoints/step_0000020" in out
    rc = main(["agent", "evaluate", "--checkpoint", "run", "--episodes", "2",
               "--target-return", "500", "--json", "eval.json"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "Hopper-v5" in table and "500" in table
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["checkpoint"].endswith("step_0000020")
    assert [r["target_return"] for r in report["results"]] == [500.0]
    assert len(report["results"][0]["returns"]) == 2


def test_evaluate_accepts_a_plain_transformers_directory_with_env(tmp_path, capsys):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    DecisionTransformerModel(DecisionTransformerConfig(state_dim=11, act_dim=3, hidden_size=32,
                                                       max_ep_len=1000)).save_pretrained(tmp_path / "hf")
    assert main(["agent", "evaluate", "--checkpoint", str(tmp_path / "hf"), "--episodes", "1",
                 "--target-return", "100"]) == 2
    assert "does not record its environment; pass --env" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="states are not normalized"):
        rc = main(["agent", "evaluate", "--checkpoint", str(tmp_path / "hf"), "--env", "Hopper-v5",
                   "--episodes", "1", "--target-return", "100"])
    assert rc == 0


def _bad_inputs(tmp_path):
    walker = write_d4rl(tmp_path / "walker.hdf5", obs_dim=17, act_dim=6)
    nan = write_d4rl(tmp_path / "nan.hdf5", lengths=[10],
                     observations=np.full((10, 11), np.nan, np.float32))
    nokeys = tmp_path / "nokeys.hdf5"
    with h5py.File(nokeys, "w") as f:
        f.create_dataset("obs", data=np.zeros((3, 2)))
    empty = write_d4rl(tmp_path / "empty.hdf5", lengths=[1], observations=np.zeros((0, 11), np.float32),
                       actions=np.zeros((0, 3), np.float32), rewards=np.zeros(0, np.float32),
                       terminals=np.zeros(0, bool), timeouts=np.zeros(0, bool))
    (tmp_path / "noconfig").mkdir()
    return [
        (["agent", "train", "--dataset", f"d4rl:{tmp_path / 'missing.hdf5'}"], "does not exist"),
        (["agent", "train", "--dataset", f"d4rl:{nokeys}"], "missing key(s) observations"),
        (["agent", "train", "--dataset", f"d4rl:{walker}", "--env", "Hopper-v5"], "pass the right --env"),
        (["agent", "train", "--dataset", f"d4rl:{nan}", "--env", "Hopper-v5"], "NaN"),
        (["agent", "train", "--dataset", f"d4rl:{empty}", "--env", "Hopper-v5"], "empty"),
        (["agent", "train", "--dataset", f"d4rl:{walker}", "--env", "Hoper-v5"], "cannot create environment"),
        (["agent", "train", "--steps", "0"], "--steps must be positive"),
        (["agent", "evaluate", "--checkpoint", str(tmp_path / "noconfig")], "it has no config.json"),
    ]


def test_bad_input_gives_one_clear_message_and_exit_code_2(tmp_path, capsys):
    for argv, message in _bad_inputs(tmp_path):
        rc = main([*argv, *TINY] if argv[1] == "train" else argv)
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert message in err, (argv, err)
        assert err.startswith("glmgym: error:") and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "glmgym.cli", "agent", "evaluate", "--checkpoint",
                           str(tmp_path / "absent")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"glmgym: error: checkpoint directory {tmp_path / 'absent'} does not exist"
    ]


def test_existing_run_directory_is_never_overwritten(hopper_file, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = main(["agent", "train", "--dataset", "d4rl:hopper-medium-v2", "--out", str(out), *TINY])
    assert rc == 2
    assert "already holds files" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_failed_evaluation_leaves_an_existing_json_untouched(tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")
    rc = main(["agent", "evaluate", "--checkpoint", str(tmp_path / "nope"), "--json", "report.json"])
    assert rc == 2
    assert (tmp_path / "report.json").read_text() == "{}"
