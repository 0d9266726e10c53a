"""glmgym's Decision Transformer training step against d3rlpy's, on the same windows.

    python benchmarks/dt_step_parity.py --dataset DATA.hdf5 --d3rlpy-python VENV/bin/python --steps 200
    python benchmarks/dt_step_parity.py --dataset DATA.hdf5 --d3rlpy-python VENV/bin/python \\
        --train 10000 --seed 0 --run-dir RUNS/walker2d-medium-expert-d3rlpy-steps-seed0

d3rlpy 2.8.1 builds its DT as the table's runs configure it and takes `--steps` gradient steps
with its own `update` on windows drawn once (`_d3rlpy_steps.py`, in d3rlpy's virtual environment,
dropout off so that the steps are deterministic). glmgym then takes the same steps: d3rlpy's
initial weights in glmgym's network (`_d3rlpy_convert.py`: LayerNorm epsilon 0.003, no position
embedding), the same windows cut by glmgym's `WindowSampler`, d3rlpy's loss (squared error summed
over the action's dimensions, averaged over every slot of the batch, padding included) and
glmgym's AdamW, warmup and 0.25 gradient clip. The two runs' losses at every step and their weights
at the end are compared, beside a control: glmgym against itself from initial weights that differ
by one float32 step each, which shows how far float rounding alone carries two runs apart in as many
steps. Equal steps leave the recipes (the init, the loss reduction, the
transformer's details) and the random streams as the only differences between the two DTs.

`--train N` then trains that network from d3rlpy's initial weights for seed `--seed` with
glmgym's own window sampler and dropout and d3rlpy's loss for N steps, and writes a glmgym run
folder (`dt_heldout.py` evaluates it): d3rlpy's DT, recipe and all, trained by glmgym's code.
Results go to `--out` (one entry per dataset and seed, kept across calls).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _d3rlpy_convert import glmgym_model  # beside this script (sys.path[0])
from _machine import cpu_kind
from glmgym._io import atomic_write_json, read_json
from glmgym.agents.data import WindowBatch, WindowSampler, load_dataset
from glmgym.agents.envs import reference_scores
from glmgym.agents.train import _data_extras, default_target_returns, make_optimizer

RESULTS = Path(__file__).parent / "results"
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP, BATCH = 1e-4, 1e-4, 0.25, 64


def d3rlpy_steps(args, prefix: Path, steps: int, dropout: bool) -> dict[str, dict[str, np.ndarray]]:
    """Run `_d3rlpy_steps.py` in d3rlpy's venv; its initial weights, final weights and steps."""
    cmd = [args.d3rlpy_python, str(Path(__file__).with_name("_d3rlpy_steps.py")), "--dataset",
           str(args.dataset), "--steps", str(steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--out", str(prefix), *([] if dropout else ["--no-dropout"])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"d3rlpy's steps failed:\n{proc.stderr[-3000:]}")
    out = {}
    for part in ("init", "final", "steps"):
        with np.load(f"{prefix}.{part}.npz", allow_pickle=False) as z:
            out[part] = dict(z)
    return out


def network(arrays: dict[str, np.ndarray], dropout: bool):
    """d3rlpy's weights in glmgym's network, set up to train as d3rlpy's: the position embedding
    (zero: d3rlpy has none) and the heads the paper does not train frozen, dropout as asked."""
    model, facts = glmgym_model(arrays)
    if not dropout:
        for m in model.modules():
            if hasattr(m, "p"):
                m.p = 0.0
            if hasattr(m, "attn_pdrop"):
                m.attn_pdrop = 0.0
    for frozen in (model.encoder.wpe, model.encoder.wte, model.predict_state, model.predict_return):
        frozen.requires_grad_(False)
    model.train()
    return model, facts, [p for p in model.parameters() if p.requires_grad]


def d3rlpy_loss(pred: torch.Tensor, batch: WindowBatch) -> torch.Tensor:
    """d3rlpy's loss: squared error summed over the action's dimensions, masked, averaged over all
    B x K slots (padding counts in the denominator). glmgym's own loss averages over the real
    slots and the dimensions (`train_step`)."""
    mask = torch.from_numpy(batch.attention_mask).float()
    err = ((pred - torch.from_numpy(batch.actions)) ** 2).sum(-1)
    return (err * mask).mean()


def step(model, params, optimizer, scheduler, batch: WindowBatch) -> float:
    """One gradient step as glmgym's `train_step` takes it, with d3rlpy's loss."""
    pred = model(torch.from_numpy(batch.states), torch.from_numpy(batch.actions),
                 torch.from_numpy(batch.returns_to_go), torch.from_numpy(batch.timesteps),
                 torch.from_numpy(batch.attention_mask))
    loss = d3rlpy_loss(pred, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def trainer(arrays: dict[str, np.ndarray], dataset, dropout: bool, seed: int, warmup: int):
    """d3rlpy's weights in glmgym's network with glmgym's AdamW, warmup and window sampler."""
    model, facts, params = network(arrays, dropout)
    optimizer = make_optimizer(params, LEARNING_RATE, WEIGHT_DECAY)
    warmup = max(warmup, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 1.0))
    sampler = WindowSampler(dataset, facts["context_len"], facts["state_mean"], facts["state_std"],
                            facts["reward_scale"], model.config.max_ep_len, np.random.default_rng(seed),
                            "end")
    return model, facts, params, optimizer, scheduler, sampler


def parity(args, dataset) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d3 = d3rlpy_steps(args, Path(tmp) / "d3rlpy", args.steps, dropout=False)
    if not np.array_equal(d3["steps"]["lengths"], dataset.lengths):
        raise SystemExit("d3rlpy and glmgym split the data into different episodes")

    def replay(init: dict[str, np.ndarray]):
        model, _, params, optimizer, scheduler, sampler = trainer(init, dataset, False, args.seed,
                                                                  args.warmup)
        return model, np.array([step(model, params, optimizer, scheduler, sampler.ending_at(ep, t))
                                for ep, t in zip(d3["steps"]["episode"], d3["steps"]["step"])])

    model, losses = replay(d3["init"])
    # the control: glmgym against itself from initial weights moved by a rounding error (each
    # weight one float32 step up or down), to show how far rounding alone carries two runs apart
    rng = np.random.default_rng(1)
    nudged = {k: np.nextafter(v, rng.choice([-np.inf, np.inf], v.shape).astype(v.dtype))
              if not k.startswith("__") else v for k, v in d3["init"].items()}
    _, control = replay(nudged)
    theirs, _ = glmgym_model(d3["final"])
    ours, final = model.state_dict(), theirs.state_dict()
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    diffs = {k: float((ours[k] - final[k]).abs().max()) for k in trained}
    rel = {k: diffs[k] / max(float(final[k].abs().max()), 1e-12) for k in diffs}
    worst = max(rel, key=rel.get)
    gap = np.abs(losses - d3["steps"]["loss"]) / d3["steps"]["loss"]
    control_gap = np.abs(control - losses) / losses
    print(f"loss at step 1: glmgym {losses[0]:.6f}, d3rlpy {d3['steps']['loss'][0]:.6f}; "
          f"largest relative loss gap over {len(losses)} steps {gap.max():.2e}; "
          f"weights after: largest gap {max(diffs.values()):.2e} ({worst}: {rel[worst]:.2e} of its max); "
          f"glmgym against itself from weights one float step apart: largest loss gap "
          f"{control_gap.max():.2e}")
    return {"mode": "parity", "steps": len(losses), "dropout": False,
            "loss_glmgym": losses.round(7).tolist(), "loss_d3rlpy": d3["steps"]["loss"].round(7).tolist(),
            "loss_control": control.round(7).tolist(), "control_max_rel_gap": float(control_gap.max()),
            "loss_max_rel_gap": float(gap.max()), "weights_max_abs_gap": max(diffs.values()),
            "weights_max_rel_gap": rel[worst], "weights_worst": worst,
            "versions": {"d3rlpy": str(d3["steps"]["d3rlpy"]), "torch_d3rlpy": str(d3["steps"]["torch"]),
                         "torch": torch.__version__}}


def train(args, dataset) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d3 = d3rlpy_steps(args, Path(tmp) / "d3rlpy", 0, dropout=True)
    torch.manual_seed(args.seed * 7919 + 1)  # dropout stream, as glmgym's trainer seeds it
    model, facts, params, optimizer, scheduler, sampler = trainer(d3["init"], dataset, True, args.seed,
                                                                  args.warmup)
    t0, log = time.perf_counter(), []
    for s in range(1, args.train + 1):
        loss = step(model, params, optimizer, scheduler, sampler.sample(BATCH))
        if s % 500 == 0:
            log.append({"step": s, "loss": round(loss, 6)})
            print(f"step {s}: loss {loss:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    env_id = args.env
    data = _data_extras(dataset, env_id, reference_scores(env_id, dataset.metadata),
                        default_target_returns(env_id, dataset))
    extras = {**data, **facts, "max_ep_len": model.config.max_ep_len, "trained_by": "glmgym, d3rlpy's recipe"}
    model.save_pretrained(args.run_dir / "checkpoints" / f"step_{args.train:07d}", extras=extras)
    atomic_write_json(args.run_dir / "train_config.json", {
        "dataset": f"d4rl:{args.dataset}", "env": env_id, "steps": args.train, "seed": args.seed,
        "windows": "end", "init": "d3rlpy-recipe", "loss": "d3rlpy's", "context_len": facts["context_len"],
        "reward_scale": facts["reward_scale"], "max_ep_len": model.config.max_ep_len})
    return {"mode": "train", "steps": args.train, "train_seconds": round(seconds, 1), "loss": log,
            "run": args.run_dir.name, "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, required=True, help="a D4RL-layout HDF5 file")
    p.add_argument("--env", default="Walker2d-v5")
    p.add_argument("--d3rlpy-python", required=True, help="python of a venv with d3rlpy")
    p.add_argument("--steps", type=int, default=200, help="parity: gradient steps compared")
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=0, metavar="N", help="train N steps instead (see above)")
    p.add_argument("--run-dir", type=Path, help="with --train: the run folder to write")
    p.add_argument("--out", type=Path, default=RESULTS / "dt_step_parity.json")
    args = p.parse_args()
    if args.train and args.run_dir is None:
        p.error("--train needs --run-dir")
    dataset = load_dataset(f"d4rl:{args.dataset}")
    entry = train(args, dataset) if args.train else parity(args, dataset)
    results = read_json(args.out) if args.out.exists() else {"runs": {}}
    results["machine"] = cpu_kind()
    results["runs"][f"{dataset.name}/{entry['mode']}/seed{args.seed}"] = entry
    atomic_write_json(args.out, results)


if __name__ == "__main__":
    sys.exit(main())
