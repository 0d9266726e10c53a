"""`random:tiny`: a tiny random ChatGLM with a freshly trained tokenizer, for demos and tests of
the plumbing. Its answers are noise."""

from __future__ import annotations

import dataclasses
import random
import tempfile
from pathlib import Path

import torch

from glmgym.chat.config import PRESETS, GLM2Config
from glmgym.chat.model import GLMModel
from glmgym.chat.model_v2 import GLM2Model
from glmgym.chat.tokenizer import ChatGLMTokenizer, train_sentencepiece
from glmgym.chat.tokenizer_v2 import (
    GLM2Tokenizer,
    GLM4Tokenizer,
    load_tokenizer_v2,
    train_bpe_file,
    train_sentencepiece_v2,
)

__all__ = ["TINY_FAMILIES", "build_tiny", "build_tiny_v2", "init_random_weights", "tiny_corpus"]

TINY_FAMILIES = ("chatglm2", "chatglm3", "glm4")
"""Families of `random:tiny-<family>` (plain `random:tiny` is ChatGLM-6B's v1 block)."""

_EN = ("the model answers questions about reinforcement learning and language with short clear "
       "sentences hello world thanks please what how why when where who is are was were do does "
       "agent reward policy transformer token decoder encoder return state action value").split(" ")
_ZH = list("你好世界今天天气很好我们一起学习机器学习模型训练时间强化学习语言中文英文"
           "问题回答谢谢请什么为何怎么")


def init_random_weights(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """GPT-style random weights, in place: matrices N(0, std), biases zero (norm weights stay 1)."""
    for name, p in model.named_parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
    return model


def tiny_corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Mixed English/Chinese lines with punctuation, tabs, newlines and runs of spaces."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        en = " ".join(rng.choices(_EN, k=rng.randint(3, 10)))
        zh = "".join(rng.choices(_ZH, k=rng.randint(3, 12)))
        sep = rng.choice(["，", "。", "！", "？", ", ", ": ", "\n", "\t", "    ", "  "])
        out.append(f"{en}{sep}{zh} {i % 100}")
    return out


def build_tiny(seed: int = 0, vocab_size: int = 1000, num_layers: int | None = None
               ) -> tuple[GLMModel, ChatGLMTokenizer]:
    """A random tiny GLM (preset `tiny`, or `num_layers` deep) and a tokenizer trained on
    `tiny_corpus()`."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = ChatGLMTokenizer(train_sentencepiece(tiny_corpus(seed=seed), Path(tmp) / "tiny",
                                                         vocab_size=vocab_size))
    cfg = dataclasses.replace(
        PRESETS["tiny"], vocab_size=max(PRESETS["tiny"].vocab_size, tokenizer.vocab_size),
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, mask_token_id=tokenizer.mask_id,
        gmask_token_id=tokenizer.gmask_id, pad_token_id=tokenizer.pad_id,
        num_layers=num_layers or PRESETS["tiny"].num_layers)
    torch.manual_seed(seed)
    model = GLMModel(cfg)
    init_random_weights(model)  # N(0, 0.02) like the reference's init
    return model.eval(), tokenizer


def build_tiny_v2(family: str, seed: int = 0,
                  num_layers: int = 2) -> tuple[GLM2Model, GLM2Tokenizer | GLM4Tokenizer]:
    """A random tiny v2-block model of `family` (chatglm2, chatglm3 or glm4) and its tokenizer,
    trained on `tiny_corpus()` (SentencePiece for ChatGLM2/3, BPE for GLM-4)."""
    corpus = tiny_corpus(seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        if family == "glm4":
            # tiktoken's trainer is pure Python: a small corpus and vocabulary keep it to a second
            train_bpe_file("\n".join(corpus[:100]), Path(tmp) / "tokenizer.model", vocab_size=400)
        else:
            train_sentencepiece_v2(corpus, Path(tmp) / "tokenizer", vocab_size=1000)
        tokenizer = load_tokenizer_v2(tmp, family)
    eos = tokenizer.stop_ids if family == "glm4" else tokenizer.eos_id  # GLM-4's config lists three
    cfg = GLM2Config(num_layers=num_layers, padded_vocab_size=-(-tokenizer.vocab_size // 64) * 64,
                     hidden_size=128, ffn_hidden_size=256, kv_channels=32, num_attention_heads=4,
                     multi_query_group_num=2, seq_length=2048, eos_token_id=eos,
                     pad_token_id=tokenizer.pad_id, torch_dtype="float32", glmgym_family=family,
                     rope_ratio=500.0 if family == "glm4" else 1.0)
    torch.manual_seed(seed)
    model = GLM2Model(cfg)
    init_random_weights(model)
    return model.eval(), tokenizer
