"""ChatGLM-6B speed on this machine: prefill tokens/s, decode tokens/s and peak RSS.

The model has the real ChatGLM-6B shapes (hidden 4096, 32 heads, MLP 16384, vocab 130528) with
random weights. A full 28-layer fp32 model needs ~28 GB, more than this machine has, so the
benchmark times full-width models of `--layers` layers and of 1 layer, derives the cost of one
layer and of the rest (embedding, final norm, lm_head), and extrapolates to 28 layers. Both the
measured and the extrapolated figures are written, with the layer counts.

    python benchmarks/chat_speed.py [--layers 2] [--prompt 128] [--new 16] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

FULL_LAYERS = 28


def measure(layers: int, dtype_name: str, prompt: int, new: int) -> dict:
    """Run in a fresh process (clean peak RSS): build, prefill, decode."""
    from glmgym.chat.config import PRESETS
    from glmgym.chat.generate import PromptBatch, decode_one_token, prefill
    from glmgym.chat.model import GLMModel, KVCache, RotaryEmbedding

    dtype = getattr(torch, dtype_name)
    cfg = dataclasses.replace(PRESETS["chatglm-6b"], num_layers=layers)
    with torch.device("meta"):
        model = GLMModel(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    model.rotary = RotaryEmbedding(cfg.head_dim // 2, cfg.max_sequence_length + 1)
    model.lm_head.weight = model.transformer.word_embeddings.weight
    model.eval()
    text = torch.randint(0, 130000, (prompt - 2,), generator=g).tolist()
    ids = [*text, cfg.gmask_token_id, cfg.bos_token_id]
    batch = PromptBatch.build([ids], cfg.pad_token_id)
    with torch.inference_mode():
        cache = KVCache.empty(cfg, 1, prompt + new + 1, dtype, "cpu")
        prefill(model, PromptBatch.build([ids[:8]], cfg.pad_token_id), cache)  # warm-up
        t0 = time.perf_counter()
        logits = prefill(model, batch, cache)
        prefill_s = time.perf_counter() - t0
        token = logits.argmax(-1, keepdim=True)
        pos = torch.tensor([[[prompt - 2], [2]]])
        decode_one_token(model, token, pos, None, cache, prompt)  # warm-up
        t0 = time.perf_counter()
        for i in range(new):
            pos = torch.tensor([[[prompt - 2], [i + 2]]])
            logits = decode_one_token(model, token, pos, None, cache, prompt + i)
            token = logits.argmax(-1, keepdim=True)
        decode_s = (time.perf_counter() - t0) / new
    return {"layers": layers, "dtype": dtype_name, "prefill_s": prefill_s, "decode_s_per_token": decode_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "weight_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="full-width layers to time (>= 2)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=16, help="decoded tokens")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--out", default="benchmarks/results/chat_speed.json")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(measure(int(args._child[0]), args._child[1], args.prompt, args.new)))
        return

    def child(layers: int, dtype: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--_child", str(layers), dtype, "--prompt",
                              str(args.prompt), "--new", str(args.new)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    for dtype in args.dtypes:
        one, many = child(1, dtype), child(args.layers, dtype)
        n = args.layers
        layer_prefill = (many["prefill_s"] - one["prefill_s"]) / (n - 1)
        layer_decode = (many["decode_s_per_token"] - one["decode_s_per_token"]) / (n - 1)
        layer_rss = (many["peak_rss_gb"] - one["peak_rss_gb"]) / (n - 1)
        full_prefill = one["prefill_s"] + (FULL_LAYERS - 1) * layer_prefill
        full_decode = one["decode_s_per_token"] + (FULL_LAYERS - 1) * layer_decode
        key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
        result[key] = {
            "layers_measured": [1, n],
            "prefill_tokens_per_s": args.prompt / full_prefill,
            "decode_tokens_per_s": 1.0 / full_decode,
            "peak_rss_gb": one["peak_rss_gb"] + (FULL_LAYERS - 1) * layer_rss,
            "extrapolated_to_layers": FULL_LAYERS,
            "measured": {"1_layer": one, f"{n}_layers": many},
        }
        print(f"{key}: prefill {args.prompt / full_prefill:.1f} tok/s, decode {1 / full_decode:.3f} tok/s, "
              f"peak RSS {result[key]['peak_rss_gb']:.1f} GB (extrapolated to 28 layers from 1 and {n})")
    result["config"] = {"prompt_tokens": args.prompt, "new_tokens": args.new,
                        "machine": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "date": time.strftime("%Y-%m-%d")}
    from glmgym._io import atomic_write_json

    atomic_write_json(out_path, result)


if __name__ == "__main__":
    main()
