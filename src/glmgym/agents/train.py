"""Offline training of a Decision Transformer: `train(TrainConfig) -> run directory`.

Run directory layout::

    OUT/train_config.json            the TrainConfig of the run
    OUT/log.jsonl                    one JSON record per log step and per evaluation
    OUT/tb/                          TensorBoard events (when tensorboard is installed)
    OUT/checkpoints/step_000100/     HF-compatible checkpoint + trainer state, written atomically
    OUT/eval.json                    the last evaluation report

Resuming restores weights, optimizer, LR schedule, step and every RNG (batch sampler per process,
torch CPU/CUDA), so N steps + resume + N steps gives the same weights as 2N steps in one run.
Multi-GPU (or multi-process CPU) through `torchrun`: DistributedDataParallel, one shard of the
batch per process, rank 0 logs, evaluates and saves.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmgym._io import atomic_write_json, atomic_write_text
from glmgym.agents.checkpoint import latest_checkpoint
from glmgym.agents.config import DTConfig, TrainConfig
from glmgym.agents.data import OfflineDataset, WindowBatch, WindowSampler
from glmgym.agents.envs import (
    D4RL_REF_SCORES,
    PAPER_TARGET_RETURNS,
    RefScores,
    env_family,
    env_id_for_dataset,
    make_vector_env,
    reference_scores,
)
from glmgym.agents.evaluate import evaluate, format_report
from glmgym.agents.model import DecisionTransformer
from glmgym.agents.policy import Policy
from glmgym.agents.report import write_report
from glmgym.agents.rollouts import open_dataset
from glmgym.devices import resolve_device
from glmgym.distributed import ProcessGroup
from glmgym.errors import GlmgymError
from glmgym.runs import (
    TRAINER_STATE_JSON,
    TRAINER_STATE_PT,
    check_world_size,
    new_run_dir,
    resume_config,
    use_bf16,
)

__all__ = ["default_target_returns", "make_optimizer", "train", "train_step"]

# Options that may change when resuming; any other difference would silently change the run.
_RESUMABLE_OVERRIDES = ("steps", "eval_every", "eval_episodes", "save_every", "log_every",
                        "progress", "device", "target_returns")
# what runs saved before these options existed did (both defaults have changed since)
_OLDER_RUNS = {"windows": "start", "init": "gpt2"}


def default_target_returns(env_id: str, dataset: OfflineDataset) -> tuple[float, ...]:
    """The target returns `train` evaluates at when none are given.

    The paper's targets for the MuJoCo families, moved onto the dataset's own scale when it
    has reference scores (glmgym's collections): the paper's target sits at the same normalized
    score under the dataset's references as under D4RL's (hopper's 3600 is 111 there), rounded to
    two significant digits. Data without references keep the paper's; other envs get the best
    return in the data and half of it.

    Args:
        env_id: the Gymnasium env the agent is evaluated in.
        dataset: the training data (its metadata's reference scores, or its episode returns).

    Returns:
        The target returns, highest first.
    """
    family = env_family(env_id)
    if family in PAPER_TARGET_RETURNS:
        paper = PAPER_TARGET_RETURNS[family]
        ref = reference_scores(env_id, dataset.metadata)
        if ref is None or ref.source != "dataset" or ref.max <= ref.min:
            return paper
        d4rl = D4RL_REF_SCORES[family]
        target = ref.min + (paper[0] - d4rl.min) / (d4rl.max - d4rl.min) * (ref.max - ref.min)
        target = float(f"{target:.2g}")
        return (target, target / 2)
    best = float(dataset.episode_returns().max())
    return (best, best / 2)


@dataclasses.dataclass
class _Inputs:
    """What `train` checks before it writes anything."""

    cfg: TrainConfig
    resume_ckpt: Path | None
    dataset: OfflineDataset
    env_id: str
    run_dir: Path
    targets: tuple[float, ...]
    ref: RefScores | None


def _check_inputs(cfg: TrainConfig) -> _Inputs:
    """Resolve the resume point, the dataset, the env and the run directory (user errors here)."""
    resume_ckpt: Path | None = None
    if cfg.resume:
        resume_ckpt = latest_checkpoint(cfg.resume)
        run = resume_ckpt.parent.parent
        cfg = resume_config(cfg, run, "train_config.json", resume_ckpt, _RESUMABLE_OVERRIDES, _OLDER_RUNS)
    dataset = open_dataset(cfg.dataset, download=cfg.download)
    env_id = cfg.env or env_id_for_dataset(dataset.name, dataset.env_id)
    if cfg.eval_episodes > 0 or cfg.env:
        probe = make_vector_env(env_id, 1)
        obs_shape, act_shape = probe.single_observation_space.shape, probe.single_action_space.shape
        probe.close()
        if obs_shape != (dataset.state_dim,) or act_shape != (dataset.act_dim,):
            raise GlmgymError(
                f"dataset {dataset.name} has states of size {dataset.state_dim} and actions of size "
                f"{dataset.act_dim}, but {env_id} has {obs_shape} and {act_shape}; pass the right --env"
            )
    run_dir = new_run_dir(cfg.out, f"dt-{dataset.name.replace('/', '-')}", resume_ckpt is not None)
    targets = cfg.target_returns or default_target_returns(env_id, dataset)
    return _Inputs(cfg, resume_ckpt, dataset, env_id, run_dir, tuple(targets),
                   reference_scores(env_id, dataset.metadata))


def _build_model(cfg: TrainConfig, dataset: OfflineDataset,
                 device: torch.device) -> tuple[DecisionTransformer, list[torch.Tensor]]:
    """The paper's network for the dataset's shapes, and the parameters it trains."""
    torch.manual_seed(cfg.seed)
    model_cfg = DTConfig(
        state_dim=dataset.state_dim, act_dim=dataset.act_dim, hidden_size=cfg.hidden_size,
        max_ep_len=cfg.max_ep_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_positions=3 * cfg.context_len, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
    )
    model = DecisionTransformer(model_cfg)
    if cfg.init == "paper":
        # The paper's code (kzl/decision-transformer) builds these layers beside transformers'
        # GPT2Model, and d3rlpy after its weight init, so both leave them at nn.Linear's default;
        # DecisionTransformerModel (and `DecisionTransformer`) gives them GPT-2's N(0, 0.02). The
        # return-to-go's embedding, Linear(1, h), then starts ~30x smaller than the reference's,
        # and on halfcheetah-medium-replay the agent scored 25.4 against d3rlpy's 28.8 (28.6 with
        # this init; docs/agents/training.md). Done after the GPT-2 init so that the
        # transformer's weights are the same draws either way.
        for layer in (model.embed_return, model.embed_state, model.embed_action, model.predict_action[0]):
            layer.reset_parameters()
        # The timestep embedding stays at N(0, 0.02), as d3rlpy leaves it (kzl's code: nn.Embedding's
        # N(0, 1)). Beside the state tokens (std 0.58) it starts ~30x weaker and barely grows in
        # 10k steps: part of this init's deficit on walker2d-medium-expert. Drawn at GPT-2's ratio
        # to the state instead, it gained 12 points there (held-out) and lost 45 on
        # hopper-medium-replay, so it stays (docs/benchmarks.md).
    model = model.to(device)
    # Heads the paper does not train, and GPT-2's unused token embedding: frozen, so that DDP
    # does not wait for their gradients (the optimizer would skip them anyway: no grad).
    for unused in (model.predict_state, model.predict_return, model.encoder.wte):
        unused.requires_grad_(False)
    return model, [p for p in model.parameters() if p.requires_grad]


class _RunLog:
    """Rank 0's log: `train_config.json`, `log.jsonl` and TensorBoard (other ranks: no-ops)."""

    def __init__(self, run: _Inputs, main: bool, resumed_step: int | None) -> None:
        self.path = run.run_dir / "log.jsonl"
        self.main, self.writer = main, None
        if not main:
            return
        run.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.run_dir / "train_config.json", dataclasses.asdict(run.cfg) | {"resume": None})
        if resumed_step is not None and self.path.exists():  # drop records past the resumed step
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resumed_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        self.writer = _tensorboard(run.run_dir / "tb")

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _evaluate(policy: Policy, run: _Inputs, step: int, log: _RunLog) -> dict[str, Any]:
    """Evaluate at the run's targets; write `eval.json` and a log record."""
    cfg = run.cfg
    report = evaluate(policy, run.env_id, run.targets, episodes=cfg.eval_episodes, seed=cfg.seed, ref=run.ref)
    policy.model.train()
    atomic_write_json(run.run_dir / "eval.json", report)
    best = max(report["results"], key=lambda e: e["return_mean"])
    record = {"step": step, "event": "eval", "return_mean": best["return_mean"],
              "target_return": best["target_return"]}
    if "normalized_mean" in best:
        record["normalized_mean"] = best["normalized_mean"]
    record["results"] = [{k: v for k, v in e.items() if k not in ("returns", "lengths", "seeds")}
                         for e in report["results"]]
    log(record)
    return report


def _save(path: Path, step: int, model, optimizer, scheduler, rng, ddp: ProcessGroup, device: torch.device,
          extras: dict[str, Any]) -> Path:
    """A checkpoint with the trainer state of every process (rank 0 writes it, atomically)."""
    states = ddp.gather({"numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
    if ddp.main:
        pt = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
              "torch_rng": [s["torch_rng"] for s in states], "cuda_rng": [s["cuda_rng"] for s in states]}
        model.save_pretrained(path, extras=extras, extra_files={
            TRAINER_STATE_JSON: {"step": step, "world_size": ddp.world,
                                 "numpy_rng": [s["numpy_rng"] for s in states]},
            TRAINER_STATE_PT: lambda p: torch.save(pt, p),
        })
    ddp.barrier()
    return path


def _final_sweep(policy: Policy, run: _Inputs, last_report: dict | None) -> dict[str, Any]:
    """Achieved against target return for the report: the run's targets plus a sweep over the
    dataset's range of returns, written to `eval_sweep.json`."""
    cfg = run.cfg
    best = float(run.dataset.episode_returns().max())
    targets = sorted({*map(float, run.targets), *np.round(np.linspace(0.25, 1.25, 5) * best)})
    # the final evaluation already ran the run's own targets on the same episode seeds (and
    # evaluation is deterministic): only the other targets are rolled out again
    done = {e["target_return"]: e for e in (last_report or {"results": []})["results"]}
    sweep = evaluate(policy, run.env_id, [t for t in targets if t not in done], episodes=cfg.eval_episodes,
                     seed=cfg.seed, ref=run.ref)
    sweep["results"] = sorted([*sweep["results"], *(done[t] for t in targets if t in done)],
                              key=lambda e: e["target_return"])
    atomic_write_json(run.run_dir / "eval_sweep.json", sweep)
    return sweep


def train(cfg: TrainConfig) -> Path:
    """Train a Decision Transformer; return the run directory.

    Raises:
        GlmgymError: bad dataset, env, options or run directory (before anything is written).
    """
    from tqdm.auto import tqdm


    device = resolve_device(cfg.device)
    run = _check_inputs(cfg)
    cfg, dataset = run.cfg, run.dataset
    ddp = ProcessGroup(device)
    if cfg.batch_size % ddp.world:
        raise GlmgymError(f"--batch-size {cfg.batch_size} is not divisible by {ddp.world} processes")
    state_mean, state_std = dataset.state_stats()
    extras = {
        **_data_extras(dataset, run.env_id, run.ref, run.targets),
        "state_mean": state_mean, "state_std": state_std, "reward_scale": cfg.reward_scale,
        "context_len": cfg.context_len, "max_ep_len": cfg.max_ep_len,
    }
    model, params = _build_model(cfg, dataset, device)
    optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 1.0))
    rng = np.random.default_rng([cfg.seed, ddp.rank])
    torch.manual_seed(cfg.seed * 7919 + 1 + ddp.rank)  # dropout stream, distinct per process
    step = 0
    if run.resume_ckpt is not None:
        step = _load_trainer_state(run.resume_ckpt, model, optimizer, scheduler, rng, ddp, device)
    if step >= cfg.steps:
        raise GlmgymError(f"the run is already at step {step}; pass a larger --steps to continue it")
    sampler = WindowSampler(dataset, cfg.context_len, state_mean, state_std, cfg.reward_scale,
                            cfg.max_ep_len, rng, cfg.windows)
    train_model: torch.nn.Module = model
    if ddp.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    bf16 = use_bf16(cfg.precision, device)
    log = _RunLog(run, ddp.main, step if run.resume_ckpt is not None else None)
    policy = Policy(model, state_mean, state_std, cfg.reward_scale, cfg.context_len)

    model.train()
    if ddp.main:
        print(f"training on {dataset.name} ({dataset.num_episodes} episodes, "
              f"{dataset.num_transitions} transitions), env {run.env_id}, device {device}, "
              f"{'bf16 autocast' if bf16 else 'fp32'}, {ddp.world} process(es) -> {run.run_dir}")
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and ddp.main),
               desc="train", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15.0)
    t_log, steps_since, last_report = time.perf_counter(), 0, None
    try:
        while step < cfg.steps:
            loss = train_step(train_model, params, optimizer, scheduler,
                              sampler.sample(cfg.batch_size // ddp.world), device, bf16, cfg.grad_clip)
            step += 1
            steps_since += 1
            bar.update(1)
            final = step == cfg.steps
            if step % cfg.log_every == 0 or final:
                now = time.perf_counter()
                loss_value = loss.item()  # the only host sync of the loop
                log({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                     "steps_per_s": steps_since / (now - t_log)})
                bar.set_postfix(loss=f"{loss_value:.4f}")
                t_log, steps_since = now, 0
            due = final or (cfg.eval_every and step % cfg.eval_every == 0)
            if cfg.eval_episodes > 0 and ddp.main and due:
                last_report = _evaluate(policy, run, step, log)
                bar.write(f"step {step}: " + format_report(last_report).replace("\n", "\n  "))
            if final or step % cfg.save_every == 0:
                ckpt = _save(run.run_dir / "checkpoints" / f"step_{step:07d}", step, model, optimizer,
                             scheduler, rng, ddp, device, extras)
    finally:
        bar.close()
        log.close()
        ddp.close()
    if ddp.main:
        sweep = _final_sweep(policy, run, last_report) if cfg.eval_episodes > 0 else None
        print(f"report: {write_report(run.run_dir, sweep, dataset.summary())}")
        print(f"checkpoint: {ckpt}")
        print(f"evaluate it: glmgym agent evaluate --checkpoint {ckpt}")
    return run.run_dir


def _data_extras(dataset: OfflineDataset, env_id: str, ref: RefScores | None,
                 targets: tuple[float, ...]) -> dict[str, Any]:
    """What a checkpoint's `glmgym.json` records about its training data and evaluation: env,
    dataset, reference scores, the data's episode returns and the target returns."""
    returns = dataset.episode_returns()
    return {
        "env_id": env_id, "dataset": dataset.name, "dataset_source": dataset.source,
        "target_returns": list(targets),
        "ref_scores": None if ref is None else dataclasses.asdict(ref),
        "dataset_returns": {k: float(getattr(returns, k)()) for k in ("min", "mean", "max")},
    }


def make_optimizer(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The paper's AdamW, as PyTorch's fused kernel where this torch has one for the device (one
    pass over the parameters instead of a dozen small ops each: a training step on 2 AVX2 cores
    went from 6.6 to 7.1 steps/s)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_step(model: torch.nn.Module, params: list[torch.Tensor], optimizer, scheduler,
               batch: WindowBatch, device: torch.device, bf16: bool, grad_clip: float) -> torch.Tensor:
    """One gradient step on a batch of windows; returns the loss (not synced to the host)."""
    states = torch.from_numpy(batch.states).to(device, non_blocking=True)
    actions = torch.from_numpy(batch.actions).to(device, non_blocking=True)
    rtg = torch.from_numpy(batch.returns_to_go).to(device, non_blocking=True)
    timesteps = torch.from_numpy(batch.timesteps).to(device, non_blocking=True)
    mask = torch.from_numpy(batch.attention_mask).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = model(states, actions, rtg, timesteps, mask)
    # MSE over the real (unpadded) steps only, as the reference's boolean indexing does. d3rlpy
    # sums over action dims instead, so its 0.25 clip binds every step (glmgym's, after warmup,
    # never); on walker2d-medium-expert that reduction scored no better (docs/benchmarks.md).
    m = mask.unsqueeze(-1).float()
    loss = ((pred.float() - actions) ** 2 * m).sum() / (m.sum() * pred.shape[-1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


def _load_trainer_state(ckpt: Path, model, optimizer, scheduler, rng, ddp: ProcessGroup, device) -> int:
    state_json = check_world_size(ckpt, ddp.world)
    loaded = DecisionTransformer.from_pretrained(ckpt, device=device)
    model.load_state_dict(loaded.state_dict())
    pt = torch.load(ckpt / TRAINER_STATE_PT, map_location=device, weights_only=True)
    optimizer.load_state_dict(pt["optimizer"])
    scheduler.load_state_dict(pt["scheduler"])
    rng.bit_generator.state = state_json["numpy_rng"][ddp.rank]
    torch.set_rng_state(pt["torch_rng"][ddp.rank].cpu())
    if device.type == "cuda" and pt["cuda_rng"][ddp.rank] is not None:
        torch.cuda.set_rng_state(pt["cuda_rng"][ddp.rank].cpu(), device)
    return int(state_json["step"])


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))
