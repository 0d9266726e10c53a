"""Memory and time of one fine-tuning step on the full-size ChatGLM-6B (random weights), INT4 base.

Each method runs in a fresh process: the fp16 checkpoint of `chat_speed.py` (`--model-dir`) is
loaded as `glmgym chat finetune` loads it (block weights quantized to INT4 while loading, frozen,
dequantized per call so that gradients reach the inputs; the rest in the compute dtype), the
method's weights are added, and one optimizer step runs on one sequence of `--source` prompt and
`--target` answer tokens (THUDM's default 64 + 64, batch 1). Reported: peak RSS while loading, peak
RSS during the step (reset in between through /proc/self/clear_refs), and the step's time.
THUDM states 6.7 GB of GPU memory for P-Tuning v2 at INT4 with these settings.

    python benchmarks/finetune_memory.py [--model-dir benchmarks/runs/chat_speed/random-fp16-28l]
        [--methods ptuning lora] [--out benchmarks/results/finetune_memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def child(model_dir: str, method: str, bits: int, source: int, target: int) -> dict:
    import torch

    from _machine import peak_rss_gb, reset_peak_rss  # beside this script (sys.path[0])
    from glmgym.chat.session import load
    from glmgym.chat.tuning.data import EncodedExample
    from glmgym.chat.tuning.finetune import FinetuneConfig, _optimizer_step, _prepare
    from glmgym.devices import native_bf16
    from glmgym.distributed import ProcessGroup

    cfg = FinetuneConfig(model=model_dir, train_file="unused", method=method, quantize=bits,
                         max_source_length=source, max_target_length=target, batch_size=1, grad_accum=1)
    dtype = torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32
    t0 = time.perf_counter()
    bot = load(model_dir, dtype=dtype, device="cpu", quantize=bits, kernels=False)
    params = _prepare(bot, cfg)
    load_s, load_peak = time.perf_counter() - t0, peak_rss_gb()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tok = bot.tokenizer
    ids = [*range(100, 100 + source - 1), tok.gmask_id, tok.bos_id, *range(200, 200 + target - 2), tok.eos_id]
    example = EncodedExample(ids, source, False)
    reset_peak_rss()
    bot.model.train()
    t0 = time.perf_counter()
    loss, _ = _optimizer_step(bot.model, params, optimizer, scheduler, [[example]], tok.pad_id,
                              source + target, bot.model.prefix_len, torch.device("cpu"),
                              ProcessGroup(torch.device("cpu")))
    return {"method": method, "bits": bits, "compute_dtype": str(dtype), "load_seconds": load_s,
            "load_peak_rss_gb": load_peak, "step_seconds": time.perf_counter() - t0,
            "step_peak_rss_gb": peak_rss_gb(), "trained_parameters": sum(p.numel() for p in params),
            "loss": loss, "sequence": source + target, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="benchmarks/runs/chat_speed/random-fp16-28l")
    p.add_argument("--methods", nargs="+", default=["ptuning", "lora"], choices=["ptuning", "lora"])
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--source", type=int, default=64)
    p.add_argument("--target", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/finetune_memory.json")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(child(args.model_dir, args._method, args.bits, args.source, args.target)))
        return
    if not (Path(args.model_dir) / "config.json").is_file():
        sys.exit(f"{args.model_dir} has no checkpoint: run benchmarks/chat_speed.py first (it writes it)")
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_facts
    from glmgym._io import atomic_write_json

    results: dict = {"config": {**{k: v for k, v in vars(args).items() if not k.startswith("_")},
                                "date": time.strftime("%Y-%m-%d"), **machine_facts()}}
    for method in args.methods:
        cmd = [sys.executable, __file__, "--_child", "--_method", method, "--model-dir", args.model_dir,
               "--bits", str(args.bits), "--source", str(args.source), "--target", str(args.target)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[method]
        print(f"{method}: load {r['load_seconds']:.0f} s (peak {r['load_peak_rss_gb']:.2f} GiB), one step "
              f"{r['step_seconds']:.0f} s, peak RSS during the step {r['step_peak_rss_gb']:.2f} GiB",
              flush=True)
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
