"""Decision Transformer speed: training steps/s (glmgym vs transformers) and evaluation env steps/s.

One run, one machine, one config (K=20, hidden 128, 3 layers, 1 head, batch 64, dropout 0.1,
AdamW, grad clip 0.25). Both models train with glmgym's `train_step` on the same batches drawn by
`WindowSampler` from a hopper-shaped dataset; transformers' `DecisionTransformerModel` is wrapped
to take the same arguments. Evaluation: `rollout` of 10 episodes in one vector env versus the same
10 episodes one at a time (HalfCheetah-v5: fixed 1000-step episodes, so both do the same work).

With `--d3rlpy-python` (a venv with d3rlpy, as for `dt_quality.py`) it also times whole training
runs, end to end, on `embedded:hopper-medium`: glmgym's `train()` against d3rlpy's
`DecisionTransformer.fit` (`_d3rlpy_runner.py`, the table's hyperparameters), the same number of
steps (`--run-steps`), the same threads. glmgym's time includes loading the data and writing its
checkpoint; d3rlpy's is its `fit` call alone, so the comparison leans d3rlpy's way.

Results go under `by_cpu[KIND]` (`avx2` or `avx512`, as PyTorch dispatches here; simulate AVX2 on
an AVX-512 machine with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`),
with the CPU flags seen. Where bf16 is emulated (no AVX512-BF16) the bf16 variants are timed over
a tenth of the steps: they are that slow.

    python benchmarks/dt_speed.py [--steps 60] [--d3rlpy-python /tmp/d3rlpy/bin/python]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from glmgym._io import atomic_write_json
from glmgym.agents import DecisionTransformer, DTConfig
from glmgym.agents.data import OfflineDataset, WindowSampler, embedded_datasets
from glmgym.agents.evaluate import Policy, rollout
from glmgym.agents.train import TrainConfig, make_optimizer, train, train_step
from glmgym.devices import native_bf16


class HFAdapter(torch.nn.Module):
    """transformers' model behind glmgym's call signature."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, states, actions, returns_to_go, timesteps, attention_mask=None):
        return self.hf(states=states, actions=actions, returns_to_go=returns_to_go,
                       timesteps=timesteps, attention_mask=attention_mask).action_preds


def hopper_like_dataset(seed: int = 0) -> OfflineDataset:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, 1000, size=60)
    n = int(lengths.sum())
    timeouts = np.zeros(n, bool)
    timeouts[np.cumsum(lengths) - 1] = True
    return OfflineDataset("bench", rng.normal(size=(n, 11)).astype(np.float32),
                          rng.uniform(-1, 1, (n, 3)).astype(np.float32),
                          rng.uniform(0, 3, n).astype(np.float32), np.zeros(n, bool), timeouts)


def train_speed(model: torch.nn.Module, batches, bf16: bool, warmup: int = 5) -> float:
    """Timed steps/s over batches[warmup:], after `warmup` untimed steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-4, 1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 10_000, 1.0))
    model.train()
    device = torch.device("cpu")
    for b in batches[:warmup]:
        train_step(model, params, opt, sched, b, device, bf16, 0.25)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        train_step(model, params, opt, sched, b, device, bf16, 0.25).item()
    return (len(batches) - warmup) / (time.perf_counter() - t0)


def run_seconds_vs_d3rlpy(d3rlpy_python: str, steps: int) -> dict:
    """Wall seconds of one whole training run of `steps` steps, glmgym vs d3rlpy, on hopper-medium."""
    sys.path.insert(0, str(Path(__file__).parent))
    from dt_quality import run_d3rlpy

    path = embedded_datasets()["hopper-medium"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(TrainConfig(dataset="embedded:hopper-medium", steps=steps, warmup_steps=1000, seed=0,
                          eval_episodes=0, save_every=steps, out=f"{tmp}/run", progress=False))
        glmgym_s = time.perf_counter() - t0
    # dt_quality's d3rlpy launcher, with no evaluation episodes: its training time alone
    d3rlpy_s = run_d3rlpy(path, "Hopper-v5", SimpleNamespace(d3rlpy_python=d3rlpy_python, steps=steps,
                          warmup=1000, episodes=0), "dt", 0, [])["train_seconds"]
    print(f"run of {steps} steps: glmgym {glmgym_s:.0f} s, d3rlpy {d3rlpy_s:.0f} s", flush=True)
    return {"steps": steps, "dataset": "embedded:hopper-medium", "threads": torch.get_num_threads(),
            "glmgym_seconds": glmgym_s, "d3rlpy_seconds": d3rlpy_s, "glmgym_vs_d3rlpy": glmgym_s / d3rlpy_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per variant")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the training variants this many times in turn; medians are kept")
    parser.add_argument("--d3rlpy-python", help="python of a venv with d3rlpy: also time whole runs")
    parser.add_argument("--run-steps", type=int, default=1000, help="steps of each whole run")
    parser.add_argument("--out", default="benchmarks/results/dt_speed.json")
    args = parser.parse_args()

    from transformers import DecisionTransformerConfig, DecisionTransformerModel
    from transformers import __version__ as hf_version

    cfg = DTConfig(state_dim=11, act_dim=3, hidden_size=128, n_layer=3, n_head=1, max_ep_len=1000,
                   n_positions=1024)
    ds = hopper_like_dataset()
    sampler = WindowSampler(ds, 20, *ds.state_stats(), 1000.0, 1000, np.random.default_rng(0))
    batches = [sampler.sample(64) for _ in range(args.steps + 5)]

    def glmgym_model():
        torch.manual_seed(0)
        m = DecisionTransformer(cfg)
        for unused in (m.predict_state, m.predict_return, m.encoder.wte):  # as train() does
            unused.requires_grad_(False)
        return m

    def hf_model():
        torch.manual_seed(0)
        return HFAdapter(DecisionTransformerModel(DecisionTransformerConfig(**cfg.to_dict())))

    per_round: dict[str, list[float]] = {}
    default_bf16 = native_bf16(torch.device("cpu"))
    variants = [("glmgym_fp32", glmgym_model, False), ("hf_fp32", hf_model, False),
                ("glmgym_bf16", glmgym_model, True), ("hf_bf16", hf_model, True)]
    for r in range(args.rounds):  # A, B, A, B, ...: drifts in machine speed hit both alike
        for name, make, bf16 in variants:
            if bf16 and not default_bf16 and r > 0:
                continue  # emulated bf16 (20x slower): one short round is enough to show it
            timed = batches if not bf16 or default_bf16 else batches[: 5 + max(3, args.steps // 10)]
            per_round.setdefault(name, []).append(train_speed(make(), timed, bf16))
            print(f"train {name}: {per_round[name][-1]:.2f} steps/s", flush=True)
    speeds = {name: float(np.median(v)) for name, v in per_round.items()}
    speeds["glmgym_default"] = speeds["glmgym_bf16" if default_bf16 else "glmgym_fp32"]

    torch.manual_seed(0)
    cheetah = DecisionTransformer(DTConfig(state_dim=17, act_dim=6, max_ep_len=1000))
    policy = Policy(cheetah, np.zeros(17, np.float32), np.ones(17, np.float32), 1000.0, 20)
    eval_speed = {}
    for name, num_envs in [("vectorized", None), ("sequential", 1)]:
        t0 = time.perf_counter()
        r = rollout(policy, "HalfCheetah-v5", 6000.0, args.episodes, seed=0, num_envs=num_envs)
        eval_speed[name] = float(r["env_steps"]) / (time.perf_counter() - t0)
        print(f"eval {name}: {eval_speed[name]:.0f} env steps/s", flush=True)

    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import cpu_kind, machine_facts

    result = {
        "train_steps_per_s": speeds,
        "train_steps_per_s_per_round": per_round,
        "rounds": args.rounds,
        "eval_env_steps_per_s": eval_speed,
        "ratios": {
            "train_default_vs_hf_fp32": speeds["glmgym_default"] / speeds["hf_fp32"],
            "train_fp32_vs_hf_fp32": speeds["glmgym_fp32"] / speeds["hf_fp32"],
            "train_bf16_vs_hf_bf16": speeds["glmgym_bf16"] / speeds["hf_bf16"],
            "eval_vectorized_vs_sequential": eval_speed["vectorized"] / eval_speed["sequential"],
        },
        "glmgym_default_precision": "bf16" if default_bf16 else "fp32",
        **({"run_seconds_vs_d3rlpy": run_seconds_vs_d3rlpy(args.d3rlpy_python, args.run_steps)}
           if args.d3rlpy_python else {}),
        "config": {"context_len": 20, "hidden_size": 128, "n_layer": 3, "n_head": 1, "batch_size": 64,
                   "timed_steps": args.steps, "eval_env": "HalfCheetah-v5",
                   "eval_episodes": args.episodes},
        "machine": {**machine_facts(), "transformers": hf_version},
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    everything = json.loads(out.read_text()) if out.exists() else {}
    everything.setdefault("by_cpu", {})[cpu_kind()] = result
    atomic_write_json(out, everything)
    print(f"wrote {args.out} (by_cpu.{cpu_kind()})")


if __name__ == "__main__":
    main()
