"""`random:tiny`: a tiny random ChatGLM with a freshly trained tokenizer, for demos and tests of
the plumbing. Its answers are noise."""

from __future__ import annotations

import dataclasses
import random
import tempfile
from pathlib import Path

import torch

from glmgym.chat.config import PRESETS
from glmgym.chat.model import GLMModel
from glmgym.chat.tokenizer import ChatGLMTokenizer, train_sentencepiece

__all__ = ["build_tiny", "tiny_corpus"]

_EN = ("the model answers questions about reinforcement learning and language with short clear "
       "sentences hello world thanks please what how why when where who is are was were do does "
       "agent reward policy transformer token decoder encoder return state action value").split(" ")
_ZH = list("你好世界今天天气很好我们一起学习机器学习模型训练时间强化学习语言中文英文"
           "问题回答谢谢请什么为何怎么")


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
    for name, p in model.named_parameters():  # N(0, 0.02) like the reference's init
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
    return model.eval(), tokenizer
