"""Where a decoded token's time goes: glmgym's CPU kernels against everything else.

Loads a checkpoint the way `glmgym chat` does (bf16 compute), prefills `--prompt` tokens, then
times `--new` greedy decode steps, with the time spent inside each `kernels.avx2` function summed
(the q4 / q8 block kernels, the bf16 lm_head and decoding attention); the rest is layer norms, rotary,
GELU, residuals and Python dispatch. Prints one line, with how much of the process's memory is on
2 MiB pages (the weights should be); the machine should be otherwise idle.
Any family member: ChatGLM-6B (2D positions after [gMASK] <sop>) or the v2 block (ChatGLM2/3,
GLM-4: 1D positions, causal).

    python benchmarks/chat_decode_split.py benchmarks/runs/chat_speed/int4-28l [--prompt 128] [--new 10]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=10)
    args = p.parse_args()

    import torch

    import glmgym.chat.kernels.avx2 as kernels
    from glmgym.chat.checkpoint import load_model
    from glmgym.chat.generate import PromptBatch, decode_one_token, prefill
    from glmgym.chat.model import KVCache

    spent: dict[str, float] = {}

    def timed(name: str):
        inner = getattr(kernels, name)

        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        setattr(kernels, name, call)  # the layers look the functions up at call time

    for name in ("q4_matmul", "q8_matmul", "bf16_matmul", "attend_decode"):
        timed(name)
    model = load_model(args.model_dir, torch.bfloat16)
    cfg = model.config
    v2 = cfg.version == 2
    ids = [*range(100, 100 + args.prompt)] if v2 else \
        [*range(100, 100 + args.prompt - 2), cfg.gmask_token_id, cfg.bos_token_id]
    P = len(ids)
    with torch.inference_mode():
        cache = KVCache.empty(cfg, 1, P + args.new + 3, torch.bfloat16, "cpu")
        batch = PromptBatch.build([ids], cfg.pad_token_id, causal=v2)
        token = prefill(model, batch, cache).argmax(-1, keepdim=True)

        def step(i: int) -> torch.Tensor:
            # the new token's position: [B, 1] (v2), or [B, 2, 1] position and block position (v1)
            pos = torch.tensor([[P + i]]) if v2 else torch.tensor([[[P - 2], [i + 2]]])
            return decode_one_token(model, token, pos, None, cache, P + i).argmax(-1, keepdim=True)

        for i in range(2):  # warm-up
            token = step(i)
        spent.clear()
        t0 = time.perf_counter()
        for i in range(2, 2 + args.new):
            token = step(i)
        per_token = (time.perf_counter() - t0) / args.new
    parts = {k: v / args.new * 1e3 for k, v in spent.items()}
    rest = per_token * 1e3 - sum(parts.values())
    print(f"{args.model_dir}: {per_token * 1e3:.0f} ms a token: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()) + f", everything else {rest:.1f} ms; "
          + huge_pages())


def huge_pages() -> str:
    """How much of this process's memory sits on 2 MiB pages (the weights should: see
    `kernels.avx2.hugepage_copy`)."""
    from _machine import smaps_gb  # beside this script (sys.path[0])

    try:
        return f"{smaps_gb('AnonHugePages'):.2f} of {smaps_gb('Rss'):.2f} GiB resident on huge pages"
    except OSError:  # no /proc/self/smaps_rollup (not Linux)
        return "huge pages unknown"

if __name__ == "__main__":
    main()
