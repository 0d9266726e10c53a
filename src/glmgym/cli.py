"""`glmgym` command line: thin wrappers over the pillars' Python API.

    glmgym agent train ...      train a Decision Transformer offline (see TrainConfig)
    glmgym agent evaluate ...   evaluate a checkpoint in a Gymnasium env (see EvalConfig)
    glmgym agent collect ...    SAC behavior policies -> D4RL-style datasets (see CollectConfig)
    glmgym agent datasets       list the datasets usable offline
    glmgym agent play ...       render an agent's episodes to a video (see PlayConfig)
    glmgym chat ...             chat with ChatGLM-6B (see ChatCLIConfig)
    glmgym chat quantize ...    write an INT8/INT4 checkpoint (see QuantizeConfig)
    glmgym chat serve ...       OpenAI-compatible API + web chat (see ServeConfig)
    glmgym chat finetune ...    P-Tuning v2 / LoRA / full fine-tuning (see FinetuneConfig)
    glmgym chat evaluate ...    BLEU-4 / Rouge of generated answers (see ChatEvalConfig)
    glmgym chat merge-lora ...  fold a LoRA adapter into a plain checkpoint (see MergeLoraConfig)

User errors print one line and exit with code 2; heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from glmgym import __version__
from glmgym._dataclass_cli import add_dataclass_arguments, dataclass_from_namespace
from glmgym.agents.config import CollectConfig, EvalConfig, PlayConfig, TrainConfig
from glmgym.chat.config import (
    ChatCLIConfig,
    ChatEvalConfig,
    FinetuneConfig,
    MergeLoraConfig,
    QuantizeConfig,
    ServeConfig,
)
from glmgym.errors import GlmgymError

__all__ = ["build_parser", "main"]


def _agent_train(args: argparse.Namespace) -> int:
    from glmgym.agents.train import train

    train(dataclass_from_namespace(TrainConfig, args))
    return 0


def _agent_evaluate(args: argparse.Namespace) -> int:
    from glmgym._io import atomic_write_json
    from glmgym.agents.checkpoint import latest_checkpoint
    from glmgym.agents.envs import RefScores, reference_scores
    from glmgym.agents.evaluate import conditioning, evaluate, format_report, sweep_targets
    from glmgym.agents.policy import Policy
    from glmgym.devices import resolve_device

    cfg = dataclass_from_namespace(EvalConfig, args)
    ckpt_dir = latest_checkpoint(cfg.checkpoint)
    policy = Policy.from_pretrained(ckpt_dir, device=resolve_device(cfg.device))
    extras = policy.extras
    env_id = cfg.env or extras.get("env_id")
    if not env_id:
        raise GlmgymError(f"{ckpt_dir} does not record its environment; pass --env ENV_ID")
    if not extras:
        warnings.warn(
            f"{ckpt_dir} has no glmgym.json (a plain transformers checkpoint): states are not "
            "normalized, reward scale 1000 and context 20 are assumed",
            stacklevel=1,
        )
    targets = cfg.target_returns or extras.get("target_returns")
    if cfg.sweep:
        targets = sweep_targets(extras, cfg.sweep)
    if not targets:
        raise GlmgymError(f"{ckpt_dir} records no target returns; pass --target-return R")
    recorded = extras.get("ref_scores")
    ref = RefScores(**recorded) if recorded and not cfg.env else reference_scores(env_id)
    report = evaluate(policy, env_id, targets, episodes=cfg.episodes, seed=cfg.seed, ref=ref)
    report["checkpoint"] = str(ckpt_dir)
    if len(targets) > 1:
        report["conditioning"] = conditioning(report)
    print(format_report(report))
    if cfg.json:
        atomic_write_json(cfg.json, report)
    if cfg.plot:
        from glmgym.agents.report import plot_return_vs_target

        mean = (extras.get("dataset_returns") or {}).get("mean")
        print(f"plot: {plot_return_vs_target(report, Path(cfg.plot), mean)}")
    return 0


def _agent_collect(args: argparse.Namespace) -> int:
    from glmgym.agents.collect import collect

    cfg = dataclass_from_namespace(CollectConfig, args)
    for level, path in collect(cfg).items():
        print(f"{level}: {path}")
    return 0


def _agent_datasets(args: argparse.Namespace) -> int:
    import json

    from glmgym.agents.catalog import format_catalog, list_datasets

    rows = list_datasets()
    print(json.dumps(rows, indent=2) if args.json else format_catalog(rows))
    return 0


def _agent_play(args: argparse.Namespace) -> int:
    from glmgym.agents.play import play

    result = play(dataclass_from_namespace(PlayConfig, args))
    returns = ", ".join(f"{r:.1f}" for r in result["returns"])
    print(f"{result['checkpoint']}: target {result['target_return']:.0f}, returns [{returns}], "
          f"{result['frames']} frames -> {result['video']}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from glmgym.chat.terminal import run_chat

    return run_chat(dataclass_from_namespace(ChatCLIConfig, args))


def _chat_quantize(args: argparse.Namespace) -> int:
    from glmgym.chat.checkpoint import quantize_checkpoint

    cfg = dataclass_from_namespace(QuantizeConfig, args)
    out = quantize_checkpoint(cfg.model, cfg.out, cfg.bits, cfg.group_size, cfg.embeddings)
    print(f"wrote {out}")
    return 0


def _chat_finetune(args: argparse.Namespace) -> int:
    from glmgym.chat.tuning.finetune import finetune

    finetune(dataclass_from_namespace(FinetuneConfig, args))
    return 0


def _chat_evaluate(args: argparse.Namespace) -> int:
    from glmgym.chat.tuning.predict import evaluate_generation, format_results

    cfg = dataclass_from_namespace(ChatEvalConfig, args)
    print(format_results(evaluate_generation(cfg), cfg.out))
    return 0


def _chat_merge_lora(args: argparse.Namespace) -> int:
    from glmgym.chat.session import merge_lora_checkpoint

    cfg = dataclass_from_namespace(MergeLoraConfig, args)
    import torch

    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    print(f"wrote {merge_lora_checkpoint(cfg.model, cfg.lora, cfg.out, dtype)}")
    return 0


def _chat_serve(args: argparse.Namespace) -> int:
    from glmgym.chat.serving.server import serve

    return serve(dataclass_from_namespace(ServeConfig, args))


def _command(subparsers, name: str, func, config: type | None = None, **texts) -> argparse.ArgumentParser:
    """Add a command whose options come from the `config` dataclass and that runs `func`."""
    p = subparsers.add_parser(name, **texts)
    if config is not None:
        add_dataclass_arguments(p, config)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The full `glmgym` argument parser."""

    parser = argparse.ArgumentParser(
        prog="glmgym",
        description="Decision Transformer agents for Gymnasium MuJoCo, and ChatGLM-6B inference.",
    )
    parser.add_argument("--version", action="version", version=f"glmgym {__version__}")
    pillars = parser.add_subparsers(dest="pillar", required=True, metavar="{agent,chat}")
    agent = pillars.add_parser("agent", help="Decision Transformer agents",
                               description="Decision Transformer agents.")
    cmds = agent.add_subparsers(dest="command", required=True,
                                metavar="{train,evaluate,collect,datasets,play}")
    _command(cmds, "train", _agent_train, TrainConfig, help="train a Decision Transformer offline",
             description="Train a Decision Transformer on an offline dataset and evaluate it. Dataset "
             "specs: embedded:NAME (shipped with glmgym), d4rl:NAME (in $D4RL_DATASET_DIR or "
             "~/.d4rl/datasets), d4rl:PATH.hdf5, minari:ID (local Minari store), "
             "random:ENV_ID[:EPISODES] (generated now with a random policy).")
    _command(cmds, "evaluate", _agent_evaluate, EvalConfig, help="evaluate a checkpoint in its environment",
             description="Run episodes of a checkpoint (a glmgym checkpoint, a run directory, or a "
             "transformers save_pretrained directory with --env) for each target return.")
    _command(cmds, "collect", _agent_collect, CollectConfig,
             help="collect D4RL-style datasets with SAC behavior policies",
             description="Train SAC (stable-baselines3) on a Gymnasium env and write datasets at the "
             "D4RL levels (random, medium, medium-replay, expert, medium-expert) as D4RL-layout HDF5. "
             "Rerun the same command to resume an interrupted collection.")
    p = _command(cmds, "datasets", _agent_datasets,
                 help="list embedded, D4RL-cache and local Minari datasets",
                 description="List the datasets usable offline: those shipped with glmgym, D4RL files in "
                 "$D4RL_DATASET_DIR (or ~/.d4rl/datasets) and the local Minari store, with statistics.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _command(cmds, "play", _agent_play, PlayConfig, help="render episodes of an agent to a video",
             description="Render episodes of a Decision Transformer (by default the shipped pretrained "
             "agent of --env, Hopper-v5 unless given) to a video file, headless (MUJOCO_GL=egl).")
    chat = _command(pillars, "chat", _chat, ChatCLIConfig, help="chat with ChatGLM-6B in the terminal",
                    description="Streaming terminal chat with ChatGLM-6B (history kept; 'clear' resets, "
                    "'stop' leaves, Ctrl-C interrupts a reply), or a one-shot answer with --prompt.")
    chat_cmds = chat.add_subparsers(dest="chat_command", required=False,
                                    metavar="{quantize,serve,finetune,evaluate,merge-lora}",
                                    title="other commands (without one: the terminal chat)")
    _command(chat_cmds, "quantize", _chat_quantize, QuantizeConfig,
             help="write an INT8/INT4 copy of a float checkpoint",
             description="Quantize the block weights of a float ChatGLM-6B checkpoint to INT8 (one scale "
             "per row, THUDM's scheme) or INT4 (groups of --group-size columns; 0 for THUDM's per-row "
             "scheme) and write safetensors + config.json + tokenizer, streaming tensor by tensor.")
    _command(chat_cmds, "serve", _chat_serve, ServeConfig,
             help="serve an OpenAI-compatible API, the api.py endpoint and a web chat",
             description="Serve ChatGLM-6B over HTTP: POST /v1/chat/completions (OpenAI-compatible, "
             "streaming), GET /v1/models, POST / (the reference api.py), GET /health, and a web chat "
             "at /ui. Binds 127.0.0.1 unless --host says otherwise.")
    _command(chat_cmds, "finetune", _chat_finetune, FinetuneConfig,
             help="fine-tune with P-Tuning v2, LoRA or all weights",
             description="Fine-tune ChatGLM-6B on JSON-lines data (THUDM's ptuning recipe): P-Tuning v2 "
             "(THUDM's checkpoint format), LoRA (PEFT's adapter format) or full fine-tuning, with "
             "exact --resume. Needs the finetune extra for LoRA: pip install 'glmgym[finetune]'.")
    _command(chat_cmds, "evaluate", _chat_evaluate, ChatEvalConfig,
             help="generate answers for a data file and score them (BLEU-4, Rouge)",
             description="Generate an answer for every row of a JSON-lines file (optionally with a "
             "P-Tuning checkpoint or a LoRA adapter) and score it against the reference answer as "
             "THUDM's ptuning does: BLEU-4 on characters, Rouge-1/2/L on jieba words. Writes "
             "generated_predictions.txt and predict_results.json.")
    _command(chat_cmds, "merge-lora", _chat_merge_lora, MergeLoraConfig,
             help="merge a LoRA adapter into a plain checkpoint",
             description="Fold a PEFT LoRA adapter into the float weights of a checkpoint and write a "
             "plain fp16 checkpoint (with the tokenizer) that glmgym chat and glmgym chat quantize take.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `glmgym` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GlmgymError as exc:
        print(f"glmgym: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("glmgym: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
