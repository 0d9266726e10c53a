"""Fine-tuning ChatGLM-6B: P-Tuning v2, LoRA (through PEFT) and full fine-tuning.

`finetune(FinetuneConfig) -> run directory`, as THUDM's `ptuning/main.py` trains (sequences and
labels in `tuning.data`, AdamW with a linear decay to 0, gradient accumulation), with glmgym's
run layout::

    OUT/finetune_config.json
    OUT/log.jsonl                     loss, learning rate, tokens/s
    OUT/loss.png
    OUT/checkpoint-N/                 written atomically, every --save-every steps and at the end

What a checkpoint holds, in the format users already have:

- P-Tuning v2: `pytorch_model.bin` with only `transformer.prefix_encoder.*` (THUDM's key names,
  loadable by THUDM's code) and `config.json` with `pre_seq_len` / `prefix_projection`;
- LoRA: PEFT's `adapter_config.json` + `adapter_model.safetensors` and `.bin` (the same tensors; keys
  `base_model.model.transformer.layers.N.attention.query_key_value.lora_A.weight`), loadable with
  `peft.PeftModel.from_pretrained` on the official model;
- full: a plain checkpoint (`glmgym chat --model OUT/checkpoint-N`);
- and `trainer_state.json` + `trainer_state.pt` (optimizer, schedule, RNG): `--resume OUT`
  continues exactly (N steps + resume + N steps give the weights of 2N steps).

The base model is frozen for P-Tuning and LoRA, and may be quantized (`--quantize 4|8`): the
quantized layers then dequantize per call, so gradients flow through them to their inputs (and to
LoRA's A and B, which PEFT's own LoRA layer wraps around glmgym's `QuantizedLinear`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from glmgym._io import atomic_dir, atomic_path, atomic_write_json
from glmgym.chat.adapters import read_lora_adapter, save_lora_weights
from glmgym.chat.checkpoint import build_model, load_model, save_model
from glmgym.chat.config import FinetuneConfig
from glmgym.chat.quantize import QuantizedLinear
from glmgym.chat.session import load
from glmgym.chat.tuning.data import encode_chat, make_batch, read_examples
from glmgym.devices import resolve_device
from glmgym.distributed import ProcessGroup
from glmgym.errors import GlmgymError, import_extra
from glmgym.runs import (
    TRAINER_STATE_JSON,
    TRAINER_STATE_PT,
    check_world_size,
    new_run_dir,
    resume_config,
    use_bf16,
)

__all__ = ["FinetuneConfig", "finetune"]

# options that may change when resuming (anything else would change the run's math)
_RESUMABLE = ("steps", "save_every", "progress", "device", "out", "resume", "eval_every", "validation_file")


def _state_for(model, method: str) -> dict[str, Any]:
    """The tensors a checkpoint of `method` keeps, under their checkpoint names."""
    if method == "ptuning":
        return {k: v.detach().cpu() for k, v in model.state_dict().items()
                if k.startswith("transformer.prefix_encoder.")}
    if method == "lora":
        from peft import get_peft_model_state_dict

        return {f"base_model.model.{k}": v.detach().cpu().contiguous()
                for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    return {}


def _save(path: Path, cfg: FinetuneConfig, bot, optimizer_state: dict, scheduler, step: int, losses: list,
          rng_states: list, model_state: dict | None = None) -> Path:
    """One checkpoint, atomically (see the module docstring for what it holds); rank 0 calls it
    with every process's torch RNG state (and, under FSDP, the gathered model state)."""
    import torch


    model = bot.model
    if model_state is not None:  # FSDP: a plain model around the gathered full tensors
        with torch.device("meta"):
            model = build_model(bot.model.config)
        model.load_state_dict(model_state, assign=True)
        if model.config.tied_head:
            model.lm_head.weight = model.transformer.word_embeddings.weight
    with atomic_dir(path) as tmp:
        if cfg.method == "ptuning":
            torch.save(_state_for(model, "ptuning"), tmp / "pytorch_model.bin")
            (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        elif cfg.method == "lora":

            save_lora_weights(tmp, _state_for(model, "lora"))
            _lora_config(cfg, bot).save_pretrained(str(tmp))
        else:
            save_model(model, tmp, tokenizer=bot.tokenizer)
        (tmp / TRAINER_STATE_JSON).write_text(json.dumps({"step": step, "method": cfg.method,
                                                          "world_size": len(rng_states),
                                                          "losses": losses}) + "\n")
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "torch_rng": rng_states}, tmp / TRAINER_STATE_PT)
    return path


def _lora_config(cfg: FinetuneConfig, bot):
    peft = import_extra("peft", "finetune")
    return peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=[t.strip() for t in cfg.lora_targets.split(",") if t.strip()],
                           bias="none", task_type="CAUSAL_LM", base_model_name_or_path=bot.name)


def _prepare(bot, cfg: FinetuneConfig) -> list:
    """Freeze what the method does not train, add its new weights; return the trained parameters."""
    import torch


    model = bot.model
    if cfg.method == "full":
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params
    model.requires_grad_(False)
    if cfg.method == "ptuning":
        if model.config.pre_seq_len:
            raise GlmgymError(f"{bot.name} already has a P-Tuning prefix; fine-tune its base model")
        model.config.pre_seq_len, model.config.prefix_projection = cfg.pre_seq_len, cfg.prefix_projection
        torch.manual_seed(cfg.seed)
        model.transformer.prefix_encoder = model.new_prefix_encoder()  # fp32, as the reference
        return list(model.transformer.prefix_encoder.parameters())
    peft = import_extra("peft", "finetune")

    lora = _lora_config(cfg, bot)
    linear = (torch.nn.Linear, QuantizedLinear)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear)}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise GlmgymError(f"--lora-targets {', '.join(missing)}: no such Linear layer in the model "
                          f"(it has {', '.join(sorted(names))})")
    # a quantized base: PEFT's own LoRA layer around glmgym's QuantizedLinear (its forward is
    # base(x) + B(A(dropout(x))) * scale, which needs nothing from the base but a forward)
    lora._register_custom_module({QuantizedLinear: peft.tuners.lora.Linear})
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")  # QuantizedLinear, as above
        peft.inject_adapter_in_model(lora, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def _batches(examples: list, cfg: FinetuneConfig, step: int, rng_seed: int) -> list[list]:
    """The micro-batches of optimizer step `step` (0-based): epochs of a seeded permutation, so
    the order is a function of the step and a resumed run sees the same data."""
    import numpy as np

    per_step = cfg.batch_size * cfg.grad_accum
    first = step * per_step
    out: list = []
    for j in range(first, first + per_step):
        epoch, k = divmod(j, len(examples))
        order = np.random.default_rng([rng_seed, epoch]).permutation(len(examples))
        out.append(examples[order[k]])
    return [out[i : i + cfg.batch_size] for i in range(0, per_step, cfg.batch_size)]


def _loss_sum(model, batch, device) -> tuple[Any, int]:
    """Summed cross-entropy of the next token over the labelled positions, and their count."""
    import torch.nn.functional as F

    logits = model(batch.input_ids.to(device), batch.position_ids.to(device),
                   batch.attention_mask.to(device))
    shift = logits[:, :-1].float()  # position t predicts token t + 1
    target = batch.labels[:, 1:].to(device)
    loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((target != -100).sum())


def _labelled(examples: list) -> int:
    """Labelled positions of a micro-batch after the shift (every token from `<sop>` on)."""
    return sum(len(e.input_ids) - e.context_len for e in examples)


def _plot(run_dir: Path, losses: list[tuple[int, float]]) -> None:
    if not losses:
        return
    matplotlib = import_extra("matplotlib", "finetune")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    with atomic_path(run_dir / "loss.png", suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _resume_config(cfg: FinetuneConfig) -> tuple[FinetuneConfig, Path]:
    run_dir = Path(cfg.resume)
    ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    ckpt = ckpts[-1] if ckpts else None
    return resume_config(cfg, run_dir, "finetune_config.json", ckpt, _RESUMABLE), ckpt


def _validation_loss(model, examples: list, batch_size: int, pad_id: int, length: int, device) -> float:
    """Mean next-token loss per labelled token over `examples` (no dropout, no gradient)."""
    import torch


    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            loss_sum, n = _loss_sum(model, make_batch(examples[i : i + batch_size], pad_id, length,
                                                      model.prefix_len), device)
            total, count = total + loss_sum.item(), count + n
    model.train()
    return total / max(count, 1)


def _full_states(model, optimizer, fsdp: bool) -> tuple[dict | None, dict]:
    """(full model state or None, full optimizer state); under FSDP every process must call it."""
    if not fsdp:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=full), get_optimizer_state_dict(model, optimizer, options=full)


def _optimizer_step(train_model, params, optimizer, scheduler, micro_batches: list, pad_id: int,
                    length: int, prefix_len: int, device, group: ProcessGroup) -> tuple[float, int]:
    """One optimizer step over `micro_batches`; returns (mean loss per labelled token, tokens).

    Under torchrun each process takes its share of every micro-batch; the loss is the summed
    cross-entropy over the global count of labelled tokens (known to every process), times the
    world size because DDP averages gradients, so the step equals the single-process one.
    """
    import torch


    optimizer.zero_grad(set_to_none=True)
    total, tokens = 0.0, 0
    for micro in micro_batches:
        n_all = _labelled(micro) * len(micro_batches)  # the step's mean is over every micro-batch
        shard = micro[group.rank :: group.world]
        loss_sum, n = _loss_sum(train_model, make_batch(shard, pad_id, length, prefix_len), device)
        (loss_sum * group.world / n_all).backward()
        total += loss_sum.item() / n_all
        tokens += n
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    return group.sum(total), tokens


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune; return the run directory (see the module docstring).

    Raises:
        GlmgymError: bad data, options or run directory (before anything is written).
    """
    import torch
    from tqdm.auto import tqdm


    resume_ckpt = None
    if cfg.resume:
        cfg, resume_ckpt = _resume_config(cfg)
    device = resolve_device(cfg.device)
    pairs = read_examples(cfg.train_file, cfg.prompt_column, cfg.response_column, cfg.history_column)
    val_pairs = read_examples(cfg.validation_file, cfg.prompt_column, cfg.response_column,
                              cfg.history_column) if cfg.validation_file else []
    run_dir = new_run_dir(cfg.out, f"finetune-{cfg.method}", resume_ckpt is not None)
    group = ProcessGroup(device)
    if cfg.batch_size % group.world:
        raise GlmgymError(f"--batch-size {cfg.batch_size} is not divisible by {group.world} processes")
    bf16 = use_bf16(cfg.precision, device)
    # a quantized base dequantizes per call (kernels=False): autograd then reaches the inputs
    bot = load(cfg.model, dtype=torch.bfloat16 if bf16 else torch.float32, device=device,
               quantize=cfg.quantize, kernels=False)

    def encode(examples: list) -> list:
        return [encode_chat(bot.format, q, h, a, cfg.max_source_length, cfg.max_target_length)
                for q, h, a in examples]

    examples, val_examples = encode(pairs), encode(val_pairs)
    params = _prepare(bot, cfg)
    model = bot.model
    if cfg.gradient_checkpointing:
        _checkpoint_blocks(model)
    fsdp = group.world > 1 and cfg.method == "full"
    if fsdp:  # full fine-tuning under torchrun: each process keeps a shard of every block (FSDP2)
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / cfg.steps))
    torch.manual_seed(cfg.seed + 1 + 7919 * group.rank)  # dropout stream, one per process
    step, losses = 0, []
    if resume_ckpt is not None:
        step, losses = _load_state(resume_ckpt, cfg, model, optimizer, scheduler, group, fsdp)
        if step >= cfg.steps:
            raise GlmgymError(f"the run is already at step {step}; pass a larger --steps to continue it")
    train_model = model
    if group.world > 1 and not fsdp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    log_path = run_dir / "log.jsonl"
    if group.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "finetune_config.json", dataclasses.asdict(cfg) | {"resume": None})
        if resume_ckpt is not None and log_path.exists():  # drop records past the resumed step
            kept = [ln for ln in log_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
            log_path.write_text("".join(ln + "\n" for ln in kept))
        print(f"{cfg.method} on {bot.name}: {len(examples)} examples ({sum(e.truncated for e in examples)} "
              f"truncated), {sum(p.numel() for p in params):,} trained parameters, "
              f"{'bf16' if bf16 else 'fp32'} base, device {device}, {group.world} process(es) -> {run_dir}")
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and group.main), desc="finetune",
               unit="step", mininterval=0.5 if sys.stderr.isatty() else 15.0)
    t0, tokens, ckpt = time.perf_counter(), 0, None
    length = cfg.max_source_length + cfg.max_target_length  # the reference pads to this
    try:
        while step < cfg.steps:
            loss, n = _optimizer_step(train_model, params, optimizer, scheduler,
                                      _batches(examples, cfg, step, cfg.seed), bot.tokenizer.pad_id,
                                      length, model.prefix_len, device, group)
            step, tokens = step + 1, tokens + n
            bar.update(1)
            if not math.isfinite(loss):
                raise GlmgymError(f"the loss became {loss} at step {step}; lower --learning-rate")
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                record = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": group.sum(tokens) / (now - t0)}
                if group.main:
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                losses.append((step, loss))
                bar.set_postfix(loss=f"{loss:.4f}")
                t0, tokens = now, 0
            if val_examples and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                eval_loss = _validation_loss(model, val_examples, cfg.batch_size, bot.tokenizer.pad_id,
                                             length, device)
                if group.main:
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
                bar.write(f"step {step}: validation loss {eval_loss:.4f}")
            if step % cfg.save_every == 0 or step == cfg.steps:
                rng_states = group.gather(torch.get_rng_state())
                model_state, optimizer_state = _full_states(model, optimizer, fsdp)
                if group.main:
                    ckpt = _save(run_dir / f"checkpoint-{step}", cfg, bot, optimizer_state, scheduler, step,
                                 losses, rng_states, model_state)
                group.barrier()
    finally:
        bar.close()
        group.close()
    if group.main:
        _plot(run_dir, losses)
        print(f"checkpoint: {ckpt}")
    return run_dir


def _load_state(ckpt: Path, cfg: FinetuneConfig, model, optimizer, scheduler, group,
                fsdp: bool = False) -> tuple[int, list]:
    """Trained weights, optimizer, schedule and this process's RNG of a checkpoint; returns
    (step, losses)."""
    import torch

    state = check_world_size(ckpt, group.world)
    if cfg.method == "ptuning":
        weights = torch.load(ckpt / "pytorch_model.bin", map_location="cpu", weights_only=True)
    elif cfg.method == "lora":

        lora = read_lora_adapter(ckpt)
        weights = {f"base_model.model.{name}.lora_{part}.weight": t
                   for name, ab in lora.pairs.items() for part, t in zip("AB", ab)}
    else:

        weights = load_model(ckpt, torch.float32).state_dict()
    pt = torch.load(ckpt / TRAINER_STATE_PT, map_location="cpu", weights_only=True)
    if fsdp:  # every process takes its shards of the full tensors
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=full)
        set_optimizer_state_dict(model, optimizer, pt["optimizer"], options=full)
    else:
        _load_trained(model, cfg.method, weights)
        optimizer.load_state_dict(pt["optimizer"])
    scheduler.load_state_dict(pt["scheduler"])
    torch.set_rng_state(pt["torch_rng"][group.rank])
    return int(state["step"]), [tuple(x) for x in state.get("losses", [])]


def _load_trained(model, method: str, weights: dict) -> None:
    """Copy a checkpoint's trained tensors into `model` (in place, keeping the optimizer's params)."""
    import torch

    own = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in weights.items():
            if method == "lora":
                key = key.removeprefix("base_model.model.")
                for part in ("lora_A", "lora_B"):  # PEFT's saved names drop the adapter's name
                    key = key.replace(f".{part}.weight", f".{part}.default.weight")
            if key not in own:
                if method == "full" and key == "lm_head.weight":
                    continue  # tied to the embeddings
                raise GlmgymError(f"the checkpoint's {key} does not fit the model")
            own[key].copy_(value)


def _checkpoint_blocks(model) -> None:
    """Recompute each GLM block in the backward pass instead of keeping its activations."""
    import torch.utils.checkpoint as cp

    for block in model.layers:
        forward = block.forward

        def checkpointed(*args, _f=forward, **kwargs):
            return cp.checkpoint(_f, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
