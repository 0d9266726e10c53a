"""Speed on one NVIDIA GPU: ChatGLM-6B decoding in bf16, INT8 and INT4 on the full-size random model
(and the cost of a speculative verifying forward over 1 + k tokens against one), DT training
steps/s, and vectorized vs sequential evaluation. Run by benchmarks/gpu_check.sh.

The GLM is built in GPU memory (random N(0, 0.02) weights, no checkpoint on disk); each quantized
format is made from a fresh copy with `quantize_model`, whose layers pick their CUDA kernels (and
check them against the dequantized weights) as `glmgym chat --quantize` does.

    python benchmarks/gpu_speed.py [--prompt 128] [--new 64] [--out benchmarks/results/gpu_speed.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


def random_glm(device: str):
    from glmgym.chat.config import PRESETS
    from glmgym.chat.model import GLMModel

    torch.manual_seed(0)
    with torch.device(device):
        model = GLMModel(PRESETS["chatglm-6b"]).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 0.02)
    return model.eval()


def decode_speed(model, prompt: int, new: int) -> dict:
    from glmgym.chat.generate import PromptBatch, decode_one_token, prefill
    from glmgym.chat.model import KVCache

    cfg = model.config
    ids = [*range(100, 100 + prompt - 2), cfg.gmask_token_id, cfg.bos_token_id]
    dev = model.lm_head.weight.device if hasattr(model.lm_head, "weight") else "cuda"
    with torch.inference_mode():
        cache = KVCache.empty(cfg, 1, prompt + new + 2, torch.bfloat16, dev)
        prefill(model, PromptBatch.build([ids[:8]], cfg.pad_token_id, device=dev), cache)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = prefill(model, PromptBatch.build([ids], cfg.pad_token_id, device=dev), cache)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        token = logits.argmax(-1, keepdim=True)
        for i in range(2):  # warm-up
            pos = torch.tensor([[[prompt - 2], [i + 2]]], device=dev)
            token = decode_one_token(model, token, pos, None, cache, prompt + i).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(2, new):
            pos = torch.tensor([[[prompt - 2], [i + 2]]], device=dev)
            token = decode_one_token(model, token, pos, None, cache, prompt + i).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        decode_s = (time.perf_counter() - t0) / (new - 2)
        verify = verify_cost(model, cache, prompt - 2, prompt + new - 10, dev)
        top = profile_step(model, token, cache, prompt - 2, prompt + new - 1, dev)
    return {"prefill_tokens_per_s": prompt / prefill_s, "decode_tokens_per_s": 1 / decode_s,
            "verify_ratio": verify, "gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
            "weights_on": sorted({str(p.device) for p in model.parameters()}), "decode_profile": top}


def profile_step(model, token, cache, mask_pos: int, start: int, dev, top: int = 8) -> list[dict]:
    """The ops that take a decoding step's time (torch.profiler over 3 steps at cache slot
    `start`): the `top` ops by self device time (self CPU time without a GPU), in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    from glmgym.chat.generate import decode_one_token

    cuda = torch.device(dev).type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    pos = torch.tensor([[[mask_pos], [start - mask_pos]]], device=dev)
    with profile(activities=activities) as prof:
        for _ in range(3):
            decode_one_token(model, token, pos, None, cache, start)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    return [{"op": e.key, "calls_per_step": e.count / 3, "ms_per_step": getattr(e, key, 0.0) / 3e3,
             "cpu_ms_per_step": e.self_cpu_time_total / 3e3} for e in events]


def verify_cost(model, cache, mask_pos: int, start: int, dev, rounds: int = 5) -> dict[int, float]:
    """Time of a forward over 1 + k tokens (speculative decoding's verifying step) against one token
    (k = 0), ChatGLM-6B positions, at cache slot `start`: medians of `rounds` turns over k."""
    times: dict[int, list[float]] = {k: [] for k in (0, 1, 2, 4, 8)}
    sync = torch.cuda.synchronize if torch.device(dev).type == "cuda" else (lambda: None)
    for r in range(rounds + 1):  # round 0 warms every shape up
        for k in times:
            ids = torch.full((1, k + 1), 100, device=dev)
            block = torch.arange(2, k + 3, device=dev)
            pos = torch.stack([torch.full_like(block, mask_pos), block])[None]  # [1, 2, k + 1]
            slots = torch.arange(start + k + 1, device=dev)
            mask = (slots[None, :] > start + torch.arange(k + 1, device=dev)[:, None])[None, None]
            sync()
            t0 = time.perf_counter()
            model(ids, pos, mask, kv_cache=cache, start=start)
            sync()
            if r:
                times[k].append(time.perf_counter() - t0)
    base = float(np.median(times[0]))
    return {k: float(np.median(v)) / base for k, v in times.items()}


def linear_speeds(reps: int = 20) -> dict:
    """bf16 `F.linear` at ChatGLM-6B's four layer shapes, 1 and 128 rows, as the model calls it
    ([1, T, K] input with bias) and in simpler forms (2D, no bias, a bare `mm`): the weight's
    GB/s and the TFLOP/s, medians of `reps` timed calls. Tells a slow cuBLAS path (bias epilogue,
    3D input) from a slow model around it."""
    import torch.nn.functional as F

    out = {"preferred_blas": str(torch.backends.cuda.preferred_blas_library())}
    g = torch.Generator(device="cuda").manual_seed(0)
    for K, N in [(4096, 12288), (4096, 4096), (4096, 16384), (16384, 4096)]:
        w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
        b = torch.randn(N, device="cuda", generator=g).bfloat16()
        for M in (1, 128):
            x = torch.randn(1, M, K, device="cuda", generator=g).bfloat16()
            forms = {"linear_3d_bias": (F.linear, (x, w, b)), "linear_2d_bias": (F.linear, (x[0], w, b)),
                     "linear_2d": (F.linear, (x[0], w)), "mm": (torch.mm, (x[0], w.t()))}
            for name, (fn, fn_args) in forms.items():
                for _ in range(3):
                    fn(*fn_args)
                times = []
                for _ in range(reps):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(*fn_args)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                t = float(np.median(times))
                out[f"{K}x{N}/M{M}/{name}"] = {"ms": t * 1e3, "weight_gb_per_s": w.numel() * 2 / t / 1e9,
                                               "tflops": 2 * M * N * K / t / 1e12}
    worst = min((v for k, v in out.items() if k.endswith("linear_3d_bias") and "/M1/" in k),
                key=lambda v: v["weight_gb_per_s"])
    rows128 = ", ".join(f"{k.split('/')[0]} {v['tflops']:.0f} TFLOP/s" for k, v in out.items()
                        if k.endswith("/M128/linear_3d_bias"))
    print(f"bf16 linear as the model calls it: one row as low as {worst['weight_gb_per_s']:.0f} GB/s of "
          f"weights; 128 rows: {rows128}", flush=True)
    return out


def chat_speeds(prompt: int, new: int) -> dict:
    from glmgym.chat.quantize import QuantSpec, quantize_model

    out = {}
    for name, bits in [("bf16", 0), ("int8", 8), ("int4", 4)]:
        torch.cuda.reset_peak_memory_stats()
        model = random_glm("cuda")
        if bits:
            quantize_model(model, QuantSpec.default(bits))
            torch.cuda.empty_cache()
        entry = decode_speed(model, prompt, new)
        entry["backend"] = getattr(model.transformer.layers[0].mlp.dense_h_to_4h, "backend", "bf16")
        out[name] = entry
        ratio = ", ".join(f"k={k}: {v:.2f}" for k, v in entry["verify_ratio"].items())
        print(f"chat {name} ({entry['backend']}): prefill {entry['prefill_tokens_per_s']:.0f} tok/s, "
              f"decode {entry['decode_tokens_per_s']:.1f} tok/s; verifying k drafts / one step: {ratio}",
              flush=True)
        ops = "; ".join(f"{e['op']} {e['ms_per_step']:.2f} ms ({e['calls_per_step']:.0f}x)"
                        for e in entry["decode_profile"][:4])
        print(f"  weights on {', '.join(entry['weights_on'])}; a step's top ops: {ops}", flush=True)
        del model
        torch.cuda.empty_cache()
    return out


def dt_speeds(steps: int) -> dict:
    from dt_speed import hopper_like_dataset
    from glmgym.agents import DecisionTransformer, DTConfig
    from glmgym.agents.data import WindowSampler
    from glmgym.agents.train import train_step

    cfg = DTConfig(state_dim=11, act_dim=3, max_ep_len=1000)
    ds = hopper_like_dataset()
    sampler = WindowSampler(ds, 20, *ds.state_stats(), 1000.0, 1000, np.random.default_rng(0))
    batches = [sampler.sample(64) for _ in range(steps + 10)]
    device = torch.device("cuda")
    out = {}
    for name, bf16 in [("fp32", False), ("bf16_autocast", True)]:
        torch.manual_seed(0)
        model = DecisionTransformer(cfg).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        for b in batches[:10]:
            train_step(model, params, opt, sched, b, device, bf16, 0.25)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches[10:]:
            train_step(model, params, opt, sched, b, device, bf16, 0.25)
        torch.cuda.synchronize()
        out[name] = steps / (time.perf_counter() - t0)
        print(f"dt train {name}: {out[name]:.1f} steps/s", flush=True)
    return out


def eval_ratio(episodes: int) -> dict:
    try:
        import gymnasium  # noqa: F401
        import mujoco  # noqa: F401
    except ImportError as exc:
        print(f"dt evaluation skipped: {exc}")
        return {"skipped": str(exc)}
    from glmgym.agents import DecisionTransformer, DTConfig
    from glmgym.agents.evaluate import Policy, rollout

    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig(state_dim=17, act_dim=6, max_ep_len=1000)).cuda()
    policy = Policy(model, np.zeros(17, np.float32), np.ones(17, np.float32), 1000.0, 20)
    speeds = {}
    for name, num_envs in [("vectorized", None), ("sequential", 1)]:
        t0 = time.perf_counter()
        r = rollout(policy, "HalfCheetah-v5", 6000.0, episodes, seed=0, num_envs=num_envs)
        speeds[name] = float(r["env_steps"]) / (time.perf_counter() - t0)
    speeds["ratio"] = speeds["vectorized"] / speeds["sequential"]
    print(f"dt eval: vectorized {speeds['vectorized']:.0f} vs sequential {speeds['sequential']:.0f} "
          f"env steps/s ({speeds['ratio']:.2f}x)", flush=True)
    return speeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--dt-steps", type=int, default=200)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/gpu_speed.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_speed.py needs an NVIDIA GPU")
    result = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "config": {"prompt_tokens": args.prompt, "new_tokens": args.new, "dt_steps": args.dt_steps,
                         "eval_episodes": args.episodes}}
    result["bf16_linear"] = linear_speeds()
    result["chat"] = chat_speeds(args.prompt, args.new)
    result["dt_train_steps_per_s"] = dt_speeds(args.dt_steps)
    result["dt_eval_env_steps_per_s"] = eval_ratio(args.episodes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
