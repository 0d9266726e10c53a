"""The bad-file matrix: every command that reads a file, fed missing, empty, truncated, wrong-kind,
wrong-key and wrong-shape files. Each case must end with one line on stderr that names the file,
exit status 2, no traceback, and no output left behind."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from glmgym.cli import main
from tests.conftest import write_d4rl


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One valid file of every kind, to break copies of."""
    from safetensors.torch import save_file

    from glmgym.agents import TrainConfig, train
    from glmgym.chat.adapters import save_lora_weights
    from glmgym.chat.checkpoint import save_model
    from glmgym.chat.session import load

    root = tmp_path_factory.mktemp("good")
    bot = load("random:tiny", dtype="float32")
    save_model(bot.model, root / "model", tokenizer=bot.tokenizer)
    save_model(bot.model, root / "model-bin", safetensors=False, tokenizer=bot.tokenizer)
    lora = root / "lora"
    lora.mkdir()
    tensors = {}
    for i in range(2):
        name = f"base_model.model.transformer.layers.{i}.attention.query_key_value"
        tensors[f"{name}.lora_A.weight"] = torch.zeros(4, 128)
        tensors[f"{name}.lora_B.weight"] = torch.zeros(384, 4)
    save_lora_weights(lora, tensors)
    (lora / "adapter_model.bin").unlink()  # the .safetensors alone: its faults have no fallback
    (lora / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query_key_value"]})
    )
    pt = root / "ptuning"
    pt.mkdir()
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 512)}, pt / "pytorch_model.bin")
    (pt / "config.json").write_text(json.dumps({"pre_seq_len": 4}))
    write_d4rl(root / "data.hdf5")
    train(
        TrainConfig(
            dataset=f"d4rl:{root / 'data.hdf5'}",
            env="Hopper-v5",
            steps=2,
            hidden_size=16,
            n_layer=1,
            context_len=4,
            batch_size=4,
            warmup_steps=1,
            eval_episodes=0,
            progress=False,
            precision="fp32",
            save_every=2,
            out=str(root / "agent"),
        )
    )
    (root / "chat.json").write_text(
        "".join(json.dumps({"content": f"q {i}", "summary": "a"}) + "\n" for i in range(3))
    )
    save_file({"x": torch.zeros(2)}, str(root / "other.safetensors"))
    from glmgym.chat.checkpoint import quantize_checkpoint
    from glmgym.chat.tuning.finetune import FinetuneConfig, finetune

    quantize_checkpoint(root / "model", root / "model-int8", 8)
    save_model(bot.model, root / "model-sharded", max_shard_bytes=200_000, tokenizer=bot.tokenizer)
    finetune(FinetuneConfig(model="random:tiny", train_file=str(root / "chat.json"), prompt_column="content",
                            response_column="summary", method="lora", steps=1, save_every=1, progress=False,
                            out=str(root / "finetune")))
    return root


def _agent_ckpt(root: Path) -> Path:
    return sorted((root / "checkpoints").glob("step_*"))[-1]


# reader: (artifact to copy, the file in it to break, argv given the copy and an output path)
# the commands that read each kind of file, given the (broken) copy and an output path
def _quantize(d, out):
    return ["chat", "quantize", "--model", str(d), "--bits", "8", "--out", str(out)]


def _chat(d, out):
    return ["chat", "--model", str(d), "--prompt", "hi", "--max-length", "24"]


def _merge(d, out):
    return ["chat", "merge-lora", "--model", "random:tiny", "--lora", str(d), "--out", str(out)]


def _ptuning(d, out):
    return ["chat", "--model", "random:tiny", "--ptuning-checkpoint", str(d), "--prompt", "hi",
            "--max-length", "24"]


def _finetune(f, out):
    return ["chat", "finetune", "--model", "random:tiny", "--train-file", str(f), "--prompt-column",
            "content", "--response-column", "summary", "--steps", "1", "--no-progress", "--out", str(out)]


def _finetune_resume(d, out):
    train_file = json.loads((d / "finetune_config.json").read_text())["train_file"]
    return ["chat", "finetune", "--resume", str(d), "--model", "random:tiny", "--train-file", train_file,
            "--steps", "2", "--no-progress"]


def _chat_evaluate(f, out):
    return ["chat", "evaluate", "--model", "random:tiny", "--file", str(f), "--prompt-column", "content",
            "--response-column", "summary", "--max-target-length", "2", "--out", str(out)]


def _agent_train(f, out):
    return ["agent", "train", "--dataset", f"d4rl:{f}", "--env", "Hopper-v5", "--steps", "1",
            "--eval-episodes", "0", "--no-progress", "--out", str(out)]


def _agent_evaluate(d, out):
    return ["agent", "evaluate", "--checkpoint", str(_agent_ckpt(d)), "--episodes", "1"]


def _agent_resume(d, out):
    return ["agent", "train", "--resume", str(d), "--steps", "3", "--no-progress"]


# reader: (artifact to copy, the file in it to break (None: the artifact itself), its command)
READERS = {
    "model config.json": ("model", "config.json", _quantize),
    "model safetensors": ("model", "model.safetensors", _quantize),
    "model .bin shard": ("model-bin", "pytorch_model.bin", _chat),
    "tokenizer model": ("model", "ice_text.model", _chat),
    "LoRA config": ("lora", "adapter_config.json", _merge),
    "LoRA weights": ("lora", "adapter_model.safetensors", _merge),
    "P-Tuning weights": ("ptuning", "pytorch_model.bin", _ptuning),
    "P-Tuning config": ("ptuning", "config.json", _ptuning),
    "fine-tuning data": ("chat.json", None, _finetune),
    "agent dataset": ("data.hdf5", None, _agent_train),
    "agent config.json": ("agent", "config.json", _agent_evaluate),
    "agent weights": ("agent", "model.safetensors", _agent_evaluate),
    "agent glmgym.json": ("agent", "glmgym.json", _agent_evaluate),
    "agent trainer state": ("agent", "trainer_state.json", _agent_resume),
    "agent run config": ("agent", "train_config.json", _agent_resume),
    "fine-tuning resume state": ("finetune", "trainer_state.json", _finetune_resume),
    "evaluation data": ("chat.json", None, _chat_evaluate),
    "quantized weights": ("model-int8", "model.safetensors", _chat),
    "shard index": ("model-sharded", "model.safetensors.index.json", _chat),
}

FAULTS = ("missing", "empty", "truncated", "wrong kind")
# a P-Tuning checkpoint's config.json is optional (the prefix's length comes from its weights)
# and a sharded checkpoint without its index loads every shard it finds
OPTIONAL = {("P-Tuning config", "missing"), ("shard index", "missing")}


def _break(path: Path, fault: str, good_root: Path) -> None:
    if fault == "missing":
        path.unlink()
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: max(1, len(data) // 2)])
    elif path.suffix == ".json" or path.name.endswith(".jsonl"):  # wrong kind: binary where JSON goes
        shutil.copy(good_root / "other.safetensors", path)
    else:  # wrong kind: JSON where a binary file goes
        path.write_text(json.dumps({"not": "a tensor file"}))


def _find(root: Path, name: str) -> Path:
    hits = sorted(root.rglob(name))
    assert hits, f"{name} not in {root}"
    return hits[-1]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("reader", list(READERS))
def test_a_bad_file_gets_one_line_naming_it_and_exit_2(good, tmp_path, capsys, reader, fault):
    artifact, name, argv = READERS[reader]
    copy = tmp_path / artifact
    (shutil.copytree if (good / artifact).is_dir() else shutil.copy)(good / artifact, copy)
    target = copy if name is None else _find(copy, name)
    _break(target, fault, good)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(argv(copy, out))
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    if (reader, fault) in OPTIONAL:
        assert rc == 0, err
        return
    assert rc == 2, (reader, fault, err)
    errors = [line for line in err if line.startswith("glmgym: error:")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert target.name in errors[0] or str(target.parent.name) in errors[0], errors[0]
    assert not out.exists()


def test_wrong_keys_and_shapes(good, tmp_path, capsys):
    """Files of the right kind whose contents do not fit."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(good / "model" / "model.safetensors"))
    model, shaped = tmp_path / "model", tmp_path / "shaped"
    for folder, tensors in ((model, {k + "_renamed" if "layers.0." in k else k: v for k, v in state.items()}),
                            (shaped, {k: v[:-1] if k.endswith("final_layernorm.weight") else v
                                      for k, v in state.items()})):
        shutil.copytree(good / "model", folder)
        save_file(tensors, str(folder / "model.safetensors"))
    data, nokey = tmp_path / "short-actions.hdf5", tmp_path / "no-rewards.hdf5"
    write_d4rl(data, actions=np.zeros((5, 3), np.float32))
    write_d4rl(nokey, rewards=None)
    cols = tmp_path / "columns.json"
    cols.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    cases = [(_quantize(model, tmp_path / "q"), "do not match its config.json"),
             (_chat(shaped, None), "final_layernorm"),
             (_agent_train(data, tmp_path / "run"), "actions"),
             (_agent_train(nokey, tmp_path / "run2"), "rewards"),
             (_finetune(cols, tmp_path / "ft"), "content")]
    for argv, fragment in cases:
        capsys.readouterr()
        rc = main(argv)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glmgym: error:")]
        assert rc == 2 and len(err) == 1 and fragment in err[0], (argv, err)
    assert not any((tmp_path / n).exists() for n in ("q", "run", "run2", "ft"))
