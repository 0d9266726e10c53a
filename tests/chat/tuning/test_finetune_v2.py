"""Fine-tuning the later family: each member's training sequence, LoRA and P-Tuning v2 on tiny
random ChatGLM2/ChatGLM3/GLM-4 models, and the checkpoints loading back for chat."""

import json
from pathlib import Path

import pytest
import torch

from glmgym.chat.formats import ChatFormat
from glmgym.chat.session import load
from glmgym.chat.tokenizer_v2 import GLM2Tokenizer, GLM4Tokenizer
from glmgym.chat.tuning.data import encode_chat, make_batch
from glmgym.chat.tuning.finetune import FinetuneConfig, finetune

FIXTURES = Path(__file__).parents[1] / "fixtures"
COLORS = ["红色", "蓝色", "白色", "黑色"]


@pytest.fixture()
def train_file(tmp_path):
    rows = [{"content": f"类型#裙*颜色#{c}", "summary": f"这是一条{c}的裙子"} for c in COLORS]
    path = tmp_path / "train.json"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def test_training_sequences_follow_each_reference():
    sp2, sp3 = (GLM2Tokenizer(FIXTURES / "glm2_tokenizer.model", roles=r) for r in (False, True))
    bpe = GLM4Tokenizer(FIXTURES / "glm4_tokenizer.model")
    # ChatGLM2 (ptuning/main.py): [gMASK] sop + the round prompt, the answer, </s>; labels on the answer
    e = encode_chat(ChatFormat("chatglm2", sp2), "你好", [], "hello", 64, 64)
    prompt = [*sp2.prefix, *sp2.tokenize("[Round 1]\n\n问：你好\n\n答：")]
    assert e.input_ids == [*prompt, *sp2.tokenize("hello"), sp2.eos_id] and e.context_len == len(prompt)
    # ChatGLM3: up to <|assistant|>, then "\n" and the answer apart, </s>
    e = encode_chat(ChatFormat("chatglm3", sp3), "你好", [], "hello", 64, 64)
    prompt = ChatFormat("chatglm3", sp3).prompt_ids("你好")
    assert e.input_ids == [*prompt, *sp3.tokenize("\n"), *sp3.tokenize("hello"), sp3.eos_id]
    # GLM-4: "\n" + answer as one text, <|endoftext|>
    e = encode_chat(ChatFormat("glm4", bpe), "你好", [], "hello", 64, 64)
    assert e.input_ids[e.context_len - 1] == bpe.command("<|assistant|>")
    assert e.input_ids[e.context_len :] == [*bpe.tokenize("\nhello"), bpe.eos_id]
    # a long prompt is cut from the right but keeps <|assistant|>; a long answer keeps room for the end
    e = encode_chat(ChatFormat("glm4", bpe), "很长的问题" * 40, [], "很长的回答" * 40, 16, 8)
    assert e.truncated and e.context_len == 16 and e.input_ids[15] == bpe.command("<|assistant|>")
    assert len(e.input_ids) == 16 + 8 and e.input_ids[-1] == bpe.eos_id
    # batches of the v2 block: causal, 1D positions, labels from the answer on
    b = make_batch([e, encode_chat(ChatFormat("glm4", bpe), "hi", [], "yo", 16, 8)], bpe.pad_id)
    assert b.position_ids.shape == b.input_ids.shape and b.attention_mask[0, 0, 3, 4]
    assert (b.labels[0, :16] == -100).all() and (b.labels[0, 16:] == torch.tensor(e.input_ids[16:])).all()


@pytest.mark.parametrize("family,method", [("chatglm3", "lora"), ("glm4", "ptuning"), ("chatglm2", "lora")])
def test_finetuning_learns_and_its_checkpoint_loads_for_chat(family, method, train_file, tmp_path):
    cfg = FinetuneConfig(
        model=f"random:tiny-{family}",
        method=method,
        train_file=str(train_file),
        out=str(tmp_path / "run"),
        pre_seq_len=4,
        steps=8,
        batch_size=2,
        grad_accum=1,
        save_every=8,
        log_every=1,
        progress=False,
        learning_rate=2e-2 if method == "lora" else 5e-2,
    )
    run = finetune(cfg)
    losses = [
        r["loss"]
        for line in (run / "log.jsonl").read_text().splitlines()
        if "loss" in (r := json.loads(line))
    ]
    assert losses[-1] < losses[0]
    ckpt = run / "checkpoint-8"
    if method == "lora":
        from safetensors.torch import load_file

        keys = load_file(str(ckpt / "adapter_model.safetensors"))
        # the names PEFT gives the v2 block (ChatGLM2/3, GLM-4)
        assert (
            "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight"
            in keys
        )
        bot = load(f"random:tiny-{family}", lora=str(ckpt))
    else:
        bot = load(f"random:tiny-{family}", ptuning_checkpoint=str(ckpt))
        assert bot.model.prefix_len == 4
        # the generation path (prefix in the cache) equals the training path (prefix concatenated)
        e = encode_chat(bot.format, "类型#裙*颜色#红色", [], "", 64, 64)
        batch = make_batch([e], bot.tokenizer.pad_id, prefix_len=4)
        with torch.no_grad():
            trained = bot.model.eval()(batch.input_ids, batch.position_ids, batch.attention_mask)
        prompt = e.input_ids[: e.context_len]
        from glmgym.chat.generate import PromptBatch, prefill
        from glmgym.chat.model import KVCache

        pb = PromptBatch.build([prompt], 0, causal=True)
        cache = KVCache.empty(bot.model.config, 1, 4 + len(prompt), torch.float32, "cpu")
        k, v = bot.model.prefix_kv(1, torch.float32)
        cache.k[:, :, :, :4], cache.v[:, :, :, :4] = k, v
        with torch.no_grad():
            cached = prefill(bot.model, pb, cache)
        torch.testing.assert_close(cached[0], trained[0, len(prompt) - 1], atol=1e-5, rtol=1e-5)
    answer, _ = bot.chat("类型#裙*颜色#红色", max_new_tokens=8, do_sample=False)
    assert isinstance(answer, str)
