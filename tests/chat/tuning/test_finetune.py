"""Fine-tuning: the reference's sequences and labels, checkpoints in THUDM's and PEFT's formats,
exact resume, learning, a quantized frozen base, and clear errors for bad data."""

import json

import pytest
import torch

from glmgym.chat.session import load
from glmgym.chat.template import build_prompt
from glmgym.chat.tuning.data import encode_example, make_batch, read_examples
from glmgym.chat.tuning.finetune import FinetuneConfig, _prepare, finetune
from glmgym.cli import main
from glmgym.errors import GlmgymError

COLORS = ["红色", "蓝色", "白色", "黑色", "绿色", "黄色"]


@pytest.fixture()
def train_file(tmp_path):
    rows = [{"content": f"类型#裙*颜色#{c}", "summary": f"这是一条{c}的裙子"} for c in COLORS]
    path = tmp_path / "train.json"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def _cfg(train_file, out, **kw):
    base = dict(model="random:tiny", train_file=str(train_file), out=str(out), pre_seq_len=4,
                steps=6, batch_size=2, grad_accum=2, save_every=3, log_every=1, progress=False)
    return FinetuneConfig(**(base | kw))


def _log(run):
    """The training records of a run's log (validation records apart)."""
    return [r for line in (run / "log.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]


def test_sequences_and_labels_follow_the_reference():
    tok = load("random:tiny").tokenizer
    e = encode_example(tok, "类型#裙" * 20, "这是裙子" * 20, max_source_length=8, max_target_length=6)
    assert e.truncated and len(e.input_ids) == 7 + 2 + 4 + 1  # a[:S-1] + [gMASK, sop] + b[:T-2] + [eop]
    assert e.input_ids[7:9] == [tok.gmask_id, tok.bos_id] and e.input_ids[-1] == tok.eos_id
    assert e.context_len == 8
    short = encode_example(tok, "裙", "红", 64, 64)
    b = make_batch([e, short], tok.pad_id, length=20, prefix_len=3)
    assert b.input_ids.shape == (2, 20) and b.attention_mask.shape == (2, 1, 20, 23)
    # labels: -100 up to <sop>, then the ids (<sop> itself included), padding -100
    assert (b.labels[0, :8] == -100).all() and b.labels[0, 8].item() == tok.bos_id
    assert b.labels[0, 8:14].tolist() == e.input_ids[8:] and (b.labels[0, 14:] == -100).all()
    # 2D positions: count to [gMASK], then stay; block positions 1, 2, ... from <sop>
    assert b.position_ids[0, 0, :10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7]
    assert b.position_ids[0, 1, :10].tolist() == [0] * 8 + [1, 2]
    mask = b.attention_mask[0, 0]
    assert not mask[:, :3].any()  # the prefix is visible to every token
    assert not mask[0, 3:11].any() and mask[0, 11]  # the context sees itself both ways, not the answer
    assert not mask[9, 3:13].any() and mask[9, 13]  # causal from <sop> on


@pytest.mark.parametrize(("text", "message"), [
    ("", "holds no examples"),
    ('{"content": "a"}\n', "no column 'summary'"),
    ("not json\n", "not JSON"),
    ('["a", "b"]\n', "must be a JSON object"),
    ('{"content": "a", "summary": 3}\n', "must be strings"),
])
def test_bad_data_gets_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(GlmgymError, match=message):
        read_examples(path, "content", "summary")


def test_chat_rows_render_their_history(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"prompt": "q2", "response": "a2", "history": [["q1", "a1"]]}) + "\n")
    [(query, history, answer)] = read_examples(path, "prompt", "response", "history")
    assert (query, history, answer) == ("q2", [("q1", "a1")], "a2")
    assert build_prompt(query, history) == "[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答："


def test_ptuning_saves_only_the_prefix_in_thudms_layout_and_it_reloads(train_file, tmp_path):
    run = finetune(_cfg(train_file, tmp_path / "pt", learning_rate=5e-2, prefix_projection=True))
    ckpt = run / "checkpoint-6"
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    assert state and all(k.startswith("transformer.prefix_encoder.") for k in state)
    names = {"transformer.prefix_encoder.embedding.weight", "transformer.prefix_encoder.trans.0.weight"}
    assert names <= set(state)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["pre_seq_len"] == 4 and config["prefix_projection"] is True
    assert (run / "loss.png").is_file() and len(_log(run)) == 6
    # the base did not change: only the prefix trained
    bot = load("random:tiny")
    fresh = _cfg(train_file, tmp_path / "unused", prefix_projection=True)
    _prepare(bot, fresh)
    before = bot.model.transformer.prefix_encoder.embedding.weight.clone()
    bot.model.load_state_dict(state, strict=False)
    assert not torch.equal(before, bot.model.transformer.prefix_encoder.embedding.weight)


def test_lora_adapter_is_peft_format_and_loads_with_peft(train_file, tmp_path):
    peft = pytest.importorskip("peft")
    run = finetune(_cfg(train_file, tmp_path / "lora", method="lora", learning_rate=1e-2))
    ckpt = run / "checkpoint-6"
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 32
    assert adapter["target_modules"] == ["query_key_value"]
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    assert "base_model.model.transformer.layers.0.attention.query_key_value.lora_A.weight" in weights
    # PEFT's own loader puts the adapter into a fresh model: same outputs as the trained one
    bot = load("random:tiny")
    peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=32, target_modules=["query_key_value"]),
                                 bot.model)
    plain = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    result = peft.set_peft_model_state_dict(bot.model, plain)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    loaded = {n: p for n, p in bot.model.named_parameters() if "lora_B" in n}
    assert loaded and all(p.abs().sum() > 0 for p in loaded.values())  # trained B is not the zero init
    losses = [r["loss"] for r in _log(run)]
    assert losses[-1] < losses[0]


def test_an_interrupted_run_resumes_exactly(train_file, tmp_path, monkeypatch):
    import glmgym.chat.tuning.finetune as ft

    whole = finetune(_cfg(train_file, tmp_path / "whole", method="lora", learning_rate=1e-2))
    save = ft._save

    def save_then_stop(path, *args):
        save(path, *args)
        raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(ft, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(train_file, tmp_path / "part", method="lora", learning_rate=1e-2))
    monkeypatch.setattr(ft, "_save", save)
    resumed = finetune(FinetuneConfig(model="random:tiny", train_file=str(train_file),
                                      resume=str(tmp_path / "part"), progress=False))
    from safetensors.torch import load_file

    a = load_file(str(whole / "checkpoint-6" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "checkpoint-6" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _log(whole)] == [r["loss"] for r in _log(resumed)]
    with pytest.raises(GlmgymError, match="cannot change --learning-rate"):
        finetune(FinetuneConfig(model="random:tiny", train_file=str(train_file), steps=9,
                                learning_rate=1.0, resume=str(tmp_path / "part")))


def test_full_finetuning_learns_and_writes_a_loadable_checkpoint(train_file, tmp_path):
    run = finetune(_cfg(train_file, tmp_path / "full", method="full", learning_rate=1e-3, steps=10,
                        save_every=10))
    losses = [r["loss"] for r in _log(run)]
    assert losses[-1] < losses[0] - 0.5
    bot = load(str(run / "checkpoint-10"))  # a plain checkpoint: weights, config, tokenizer
    assert bot.tokenizer.encode("裙") == load("random:tiny").tokenizer.encode("裙")


def test_ptuning_and_lora_train_on_a_frozen_int4_base(train_file, tmp_path):
    run = finetune(_cfg(train_file, tmp_path / "q4", quantize=4, learning_rate=5e-2, steps=3, save_every=3))
    state = torch.load(run / "checkpoint-3" / "pytorch_model.bin", weights_only=True)
    assert set(state) == {"transformer.prefix_encoder.embedding.weight"}
    run = finetune(_cfg(train_file, tmp_path / "q4-lora", method="lora", quantize=4, learning_rate=5e-2))
    losses = [r["loss"] for r in _log(run)]
    assert losses[-1] < losses[0]
    from safetensors.torch import load_file

    weights = load_file(str(run / "checkpoint-6" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.layers.1.attention.query_key_value.lora_B.weight" in weights
    # the adapter merges into the float base like any other
    assert load("random:tiny", lora=str(run / "checkpoint-6"), quantize=4).model.config.quantization_bit == 4


def test_finetune_cli_and_its_errors(train_file, tmp_path, capsys):
    assert main(["chat", "finetune", "--model", "random:tiny", "--train-file", str(train_file),
                 "--method", "lora", "--steps", "2", "--grad-accum", "1", "--save-every", "2",
                 "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert (tmp_path / "cli" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert main(["chat", "finetune", "--model", "random:tiny", "--train-file", str(train_file),
                 "--out", str(tmp_path / "cli")]) == 2  # an earlier run's directory
    assert main(["chat", "finetune", "--model", "random:tiny", "--train-file", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["chat", "finetune", "--model", "random:tiny", "--train-file", str(train_file),
                 "--method", "lora", "--lora-targets", "nope", "--out", str(tmp_path / "y")]) == 2
    assert main(["chat", "finetune", "--model", "random:tiny", "--train-file", str(train_file),
                 "--method", "full", "--quantize", "4", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "does not exist" in err and "no such Linear layer" in err
    assert "--quantize works with --method ptuning or lora" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _logits(bot, text="类型#裙*颜色#红色"):
    """Last-position logits of a prompt through the generation path (KV cache, prefix in it)."""
    from glmgym.chat.generate import PromptBatch, prefill
    from glmgym.chat.model import KVCache

    ids = bot.tokenizer.encode(text)
    model = bot.model.eval()
    cfg = model.config
    with torch.no_grad():
        cache = KVCache.empty(cfg, 1, model.prefix_len + len(ids) + 1, torch.float32, "cpu")
        if model.prefix_len:
            k, v = model.prefix_kv(1, torch.float32)
            cache.k[:, :, :, : model.prefix_len], cache.v[:, :, :, : model.prefix_len] = k, v
        return prefill(model, PromptBatch.build([ids], bot.tokenizer.pad_id), cache)[0]


@pytest.fixture()
def lora_run(train_file, tmp_path):
    return finetune(_cfg(train_file, tmp_path / "lora", method="lora", learning_rate=5e-2))


def test_merged_and_unmerged_lora_give_the_same_logits(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    ckpt = lora_run / "checkpoint-6"
    unmerged = load("random:tiny")
    peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=32, target_modules=["query_key_value"]),
                                 unmerged.model)
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    peft.set_peft_model_state_dict(unmerged.model, {k.removeprefix("base_model.model."): v
                                                    for k, v in weights.items()})
    merged = load("random:tiny", lora=str(ckpt))
    base = _logits(load("random:tiny"))
    a, b = _logits(unmerged), _logits(merged)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, base, atol=1e-3)
    # merge-lora writes a plain checkpoint with the same model (fp16 on disk)
    out = tmp_path / "merged"
    assert main(["chat", "merge-lora", "--model", "random:tiny", "--lora", str(ckpt), "--out", str(out)]) == 0
    reloaded = load(str(out), dtype="float32")
    assert torch.allclose(_logits(reloaded), b, atol=2e-2)
    assert main(["chat", "quantize", "--model", str(out), "--bits", "4", "--out", str(tmp_path / "q4")]) == 0


def test_a_ptuning_checkpoint_loads_for_chat_and_matches_training(train_file, tmp_path):
    from glmgym.chat.tuning.data import EncodedExample, make_batch

    run = finetune(_cfg(train_file, tmp_path / "pt", learning_rate=5e-2))
    bot = load("random:tiny", ptuning_checkpoint=str(run / "checkpoint-6"))
    assert bot.model.prefix_len == 4
    # the generation path (prefix in the cache) equals the training path (prefix concatenated)
    text = "类型#裙*颜色#红色"
    ids = bot.tokenizer.encode(text)
    e = EncodedExample(ids, len(ids) - 1, truncated=False)
    batch = make_batch([e], bot.tokenizer.pad_id, prefix_len=4)
    with torch.no_grad():
        trained = bot.model.eval()(batch.input_ids, batch.position_ids, batch.attention_mask)[0, -1]
    assert torch.allclose(_logits(bot, text), trained, atol=1e-5)
    response, _ = bot.chat("你好", max_length=40, do_sample=False)
    assert isinstance(response, str)


def test_adapters_given_the_wrong_way_get_clear_errors(lora_run, train_file, tmp_path):
    pt = finetune(_cfg(train_file, tmp_path / "pt", steps=1, save_every=1)) / "checkpoint-1"
    lora = lora_run / "checkpoint-6"
    with pytest.raises(GlmgymError, match="a LoRA adapter"):
        load("random:tiny", ptuning_checkpoint=str(lora))
    with pytest.raises(GlmgymError, match="a P-Tuning checkpoint"):
        load("random:tiny", lora=str(pt))
    bad = tmp_path / "bad-lora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(str(lora / "adapter_model.safetensors"))
    save_file({k: v[:, :-1].contiguous() if "lora_A" in k else v for k, v in weights.items()},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(GlmgymError, match="do not fit"):
        load("random:tiny", lora=str(bad))


def test_generation_scores_match_hand_computed_values():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    from glmgym.chat.tuning.scores import generation_scores

    same = generation_scores(["这是一条红色的裙子"], ["这是一条红色的裙子"])
    assert same["rouge-1"] == pytest.approx(100) and same["bleu-4"] == pytest.approx(100)
    pred, label = "这是一条蓝色的裙子", "这是一条红色的裙子"
    s = generation_scores([pred, ""], [label, label])
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3) * 100
    assert s["bleu-4"] == pytest.approx(bleu / 2)  # the empty prediction scores 0
    assert 0 < s["rouge-l"] < 50


def test_evaluate_writes_thudms_prediction_files(lora_run, train_file, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["chat", "evaluate", "--model", "random:tiny", "--lora", str(lora_run / "checkpoint-6"),
                 "--file", str(train_file), "--out", str(out), "--max-target-length", "8",
                 "--batch-size", "4", "--no-do-sample"]) == 0
    rows = [json.loads(line) for line in (out / "generated_predictions.txt").read_text().splitlines()]
    assert len(rows) == len(COLORS) and rows[0]["labels"] == "这是一条红色的裙子" and "predict" in rows[0]
    results = json.loads((out / "predict_results.json").read_text())
    assert results["predict_samples"] == len(COLORS)
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"} <= set(results)
    assert "bleu-4:" in capsys.readouterr().out
    assert main(["chat", "evaluate", "--model", "random:tiny", "--file", str(train_file), "--out",
                 str(tmp_path / "e2"), "--response-column", "nope"]) == 2
    assert not (tmp_path / "e2").exists()


def test_two_processes_agree_with_one(train_file, tmp_path):
    """torchrun with 2 CPU processes (gloo, DDP): each takes half of every micro-batch, and the
    adapter after 3 steps equals the single-process one (no dropout, so both runs are the same math).
    fp32 throughout: on a CPU with native bf16, `auto` would train in bf16, whose rounding differs
    between a whole batch and two halves by more than this test's tolerance."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["--model", "random:tiny", "--train-file", str(train_file), "--method", "lora", "--lora-dropout",
            "0", "--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--save-every", "3",
            "--learning-rate", "1e-2", "--precision", "fp32", "--no-progress"]
    assert main(["chat", "finetune", *args, "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "glmgym.cli", "chat", "finetune", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    one = load_file(str(tmp_path / "one" / "checkpoint-3" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "checkpoint-3" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    l1, l2 = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["loss"] for r in l1] == pytest.approx([r["loss"] for r in l2], rel=1e-5)


def test_full_finetuning_with_fsdp_on_two_processes_agrees_with_one(train_file, tmp_path):
    """Full fine-tuning under torchrun shards every block (FSDP2, gloo); the gathered checkpoint
    equals the single-process one, and an FSDP run resumes."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["--model", "random:tiny", "--train-file", str(train_file), "--method", "full", "--steps", "3",
            "--batch-size", "2", "--grad-accum", "2", "--save-every", "2", "--learning-rate", "1e-3",
            "--precision", "fp32", "--no-progress"]  # fp32: see the test above
    assert main(["chat", "finetune", *args, "--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "glmgym.cli", "chat", "finetune"]
    proc = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "checkpoint-3" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "checkpoint-3" / "model.safetensors"))
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    l1, l2 = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["loss"] for r in l1] == pytest.approx([r["loss"] for r in l2], rel=1e-5)
    # resume the FSDP run from its step-2 checkpoint: the same step-3 weights
    import shutil

    shutil.rmtree(tmp_path / "two" / "checkpoint-3")
    resume = ["--model", "random:tiny", "--train-file", str(train_file), "--resume", str(tmp_path / "two"),
              "--no-progress"]
    proc = subprocess.run([*torchrun, *resume], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = load_file(str(tmp_path / "two" / "checkpoint-3" / "model.safetensors"))
    assert all(torch.allclose(two[k], again[k], atol=1e-6) for k in two)


def test_validation_loss_is_logged_and_falls(train_file, tmp_path):
    run = finetune(_cfg(train_file, tmp_path / "val", method="full", learning_rate=1e-3, steps=8,
                        save_every=8, validation_file=str(train_file), eval_every=4))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    with pytest.raises(GlmgymError, match="does not exist"):
        finetune(_cfg(train_file, tmp_path / "v2", validation_file=str(tmp_path / "missing.json")))
    assert not (tmp_path / "v2").exists()
