"""Does `torch.compile` pay for ChatGLM-6B decoding on this CPU? Eager vs compiled decode step.

A 2-layer, full-width ChatGLM-6B (vocab cut to 8192 so the lm_head does not dominate) with random
weights, quantized to INT4 (groups of 128) as glmgym runs it; the decode step
(`decode_one_token`) timed eagerly, then compiled with `torch.compile(dynamic=True)` (the cache
position changes every step), then eagerly again. Prints ms per token and writes
`benchmarks/results/chat_compile.json`.

    python benchmarks/chat_compile.py
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from glmgym._io import atomic_write_json
from glmgym.chat.config import PRESETS
from glmgym.chat.generate import PromptBatch, decode_one_token, prefill
from glmgym.chat.model import GLMModel, KVCache, RotaryEmbedding
from glmgym.chat.quantize import QuantSpec, quantize_model


def main() -> None:
    cfg = dataclasses.replace(PRESETS["chatglm-6b"], num_layers=2, vocab_size=8192, mask_token_id=8000,
                              gmask_token_id=8001, bos_token_id=8004, eos_token_id=8005)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GLMModel(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.rotary = RotaryEmbedding(cfg.head_dim // 2, cfg.max_sequence_length + 1)
    model.lm_head.weight = model.transformer.word_embeddings.weight
    quantize_model(model.eval(), QuantSpec(4, 128))
    ids = [*range(10, 136), cfg.gmask_token_id, cfg.bos_token_id]
    P = len(ids)

    def ms_per_token(step, n: int = 16) -> float:
        with torch.inference_mode():
            cache = KVCache.empty(cfg, 1, P + n + 8, torch.bfloat16, "cpu")
            token = prefill(model, PromptBatch.build([ids], cfg.pad_token_id), cache).argmax(-1, keepdim=True)
            for i in range(3):  # warm-up (and compilation)
                step(model, token, torch.tensor([[[P - 2], [i + 2]]]), None, cache, P + i)
            t0 = time.perf_counter()
            for i in range(n):
                pos = torch.tensor([[[P - 2], [i + 5]]])
                token = step(model, token, pos, None, cache, P + 3 + i).argmax(-1, keepdim=True)
            return (time.perf_counter() - t0) / n * 1e3

    eager = ms_per_token(decode_one_token)
    t0 = time.perf_counter()
    compiled = ms_per_token(torch.compile(decode_one_token, dynamic=True))
    compile_s = time.perf_counter() - t0
    eager_again = ms_per_token(decode_one_token)
    result = {"eager_ms_per_token": eager, "compiled_ms_per_token": compiled,
              "eager_again_ms_per_token": eager_again, "compile_and_run_seconds": compile_s,
              "layers": 2, "vocab_size": 8192, "format": "int4 group 128, bf16 activations",
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d")}
    print(f"eager {eager:.2f} ms/token, compiled {compiled:.2f} ms/token (compile + run {compile_s:.0f} s), "
          f"eager again {eager_again:.2f} ms/token")
    atomic_write_json(Path("benchmarks/results/chat_compile.json"), result)


if __name__ == "__main__":
    main()
