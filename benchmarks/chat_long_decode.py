"""Decoding speed after a long prompt, with and without glmgym's AVX2 decoding-attention kernel.

Loads a checkpoint the way `glmgym chat` does (bf16 compute), prefills `--prompt` tokens, then
decodes greedily, alternating every `--tokens` tokens between the kernel and the path it replaced
(fp32 SDPA on an fp32 copy of the bf16 cache), for `--rounds` rounds, in one process: the same
weights, cache and machine state for both. Prints each path's tok/s per round and its median.
Only meaningful on a CPU without native bf16 (AVX2), where the kernel is used; the machine should
be otherwise idle.

    python benchmarks/chat_long_decode.py benchmarks/runs/chat_speed/int4-28l [--prompt 1024]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=6, help="timed tokens per path and round")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    import torch

    import glmgym.chat.model as glm
    from glmgym.chat.checkpoint import load_model
    from glmgym.chat.generate import PromptBatch, decode_one_token, prefill
    from glmgym.chat.model import KVCache

    kernels = glm._decode_kernels()
    if kernels is None or glm._CPU_NATIVE_BF16:
        raise SystemExit("the decoding-attention kernel is not used on this machine: nothing to compare")
    model = load_model(args.model_dir, torch.bfloat16)
    cfg = model.config
    ids = [*range(100, 100 + args.prompt - 2), cfg.gmask_token_id, cfg.bos_token_id]
    P = len(ids)
    steps = args.rounds * 2 * (args.tokens + 1)
    speeds: dict[str, list[float]] = {"kernel": [], "fp32 SDPA": []}
    with torch.inference_mode():
        cache = KVCache.empty(cfg, 1, P + steps + 1, torch.bfloat16, "cpu")
        t0 = time.perf_counter()
        token = prefill(model, PromptBatch.build([ids], cfg.pad_token_id), cache).argmax(-1, keepdim=True)
        print(f"prefill of {P} tokens: {time.perf_counter() - t0:.1f} s", flush=True)
        i = 0

        def step() -> None:
            nonlocal token, i
            pos = torch.tensor([[[P - 2], [i + 2]]])
            token = decode_one_token(model, token, pos, None, cache, P + i).argmax(-1, keepdim=True)
            i += 1

        for _ in range(args.rounds):
            for name, chosen in (("kernel", kernels), ("fp32 SDPA", None)):
                glm._decode_kernels = lambda chosen=chosen: chosen  # the model looks it up per call
                step()  # one untimed step after each switch
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    step()
                speeds[name].append(args.tokens / (time.perf_counter() - t0))
    for name, v in speeds.items():
        print(f"{name}: {' '.join(f'{x:.2f}' for x in v)} tok/s, median {sorted(v)[(len(v) - 1) // 2]:.2f}")


if __name__ == "__main__":
    main()
