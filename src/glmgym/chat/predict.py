"""`glmgym chat evaluate`: generate answers for a JSON-lines file and score them (BLEU-4, Rouge),
with THUDM's `ptuning/main.py --do_predict` outputs:

    OUT/generated_predictions.txt   one JSON object per line: {"labels", "predict"}
    OUT/predict_results.json        predict_bleu-4, predict_rouge-1/2/l, samples, speed
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmgym.errors import GlmgymError

__all__ = ["ChatEvalConfig", "evaluate_generation", "format_results"]


@dataclass
class ChatEvalConfig:
    """Options of `glmgym chat evaluate`."""

    model: str = field(default="", metadata={"required": True, "metavar": "DIR|ID"})
    """Checkpoint directory, hub id (from the local cache) or random:tiny."""
    file: str = field(default="", metadata={"required": True, "metavar": "FILE"})
    """JSON lines with the prompt and response columns."""
    out: str = field(default="", metadata={"required": True, "metavar": "DIR"})
    """Output directory (written atomically)."""
    prompt_column: str = "content"
    """Column of the prompt."""
    response_column: str = "summary"
    """Column of the reference answer."""
    history_column: str | None = None
    """Optional column of earlier [question, answer] turns."""
    ptuning_checkpoint: str | None = field(default=None, metadata={"metavar": "DIR"})
    """A P-Tuning v2 checkpoint to evaluate."""
    lora: str | None = field(default=None, metadata={"metavar": "DIR"})
    """A PEFT LoRA adapter to evaluate (merged at load)."""
    quantize: int | None = field(default=None, metadata={"choices": (4, 8)})
    """Quantize the block weights while loading."""
    max_source_length: int = 64
    """Prompt tokens kept."""
    max_target_length: int = 64
    """Longest generated answer, in tokens."""
    batch_size: int = 8
    """Prompts generated together."""
    do_sample: bool = True
    """Sample with top_p 0.7 and temperature 0.95 as the reference; --no-do-sample: greedy."""
    seed: int = 42
    """Sampling seed."""
    limit: int | None = None
    """Evaluate only the first N examples."""
    dtype: str | None = field(default=None, metadata={"choices": ("float32", "bfloat16", "float16")})
    """Compute dtype (default as glmgym chat)."""
    device: str | None = None
    """Torch device (default: cuda when available, else cpu)."""

    def __post_init__(self) -> None:
        if self.max_source_length < 1 or self.max_target_length < 1 or self.batch_size < 1:
            raise GlmgymError("--max-source-length, --max-target-length and --batch-size must be positive")
        if self.limit is not None and self.limit < 1:
            raise GlmgymError("--limit must be positive")


def evaluate_generation(cfg: ChatEvalConfig) -> dict[str, float]:
    """Generate, score, write the two output files; return the results."""
    from glmgym._io import atomic_dir
    from glmgym.chat.finetune_data import read_examples
    from glmgym.chat.metrics import generation_scores
    from glmgym.chat.session import load

    pairs = read_examples(cfg.file, cfg.prompt_column, cfg.response_column, cfg.history_column)
    pairs = pairs[: cfg.limit] if cfg.limit else pairs
    bot = load(cfg.model, dtype=cfg.dtype, device=cfg.device, quantize=cfg.quantize,
               ptuning_checkpoint=cfg.ptuning_checkpoint, lora=cfg.lora)
    tok = bot.tokenizer
    gen = {"max_new_tokens": cfg.max_target_length, "do_sample": cfg.do_sample, "seed": cfg.seed}
    predictions: list[str] = []
    generated = 0
    t0 = time.perf_counter()
    for i in range(0, len(pairs), cfg.batch_size):
        # prompts cut to max_source_length tokens, as the reference's eval preprocessing does
        chunk = pairs[i : i + cfg.batch_size]
        items = [(tok.decode(tok.tokenize(p)[: cfg.max_source_length]), []) for p, _ in chunk]
        replies = []
        for replies in bot.stream_batch(items, trim_history=True, **gen):  # noqa: B007 (the last step)
            pass
        predictions += [r.response for r in replies]
        generated += sum(r.completion_tokens for r in replies)
    seconds = time.perf_counter() - t0
    labels = [a for _, a in pairs]
    scores = generation_scores(predictions, labels)
    results = {f"predict_{k}": round(v, 4) for k, v in scores.items()}
    results |= {"predict_samples": len(pairs), "predict_runtime": round(seconds, 3),
                "predict_samples_per_second": round(len(pairs) / seconds, 3),
                "predict_tokens_per_second": round(generated / seconds, 3)}
    with atomic_dir(cfg.out) as tmp:
        lines = [json.dumps({"labels": label, "predict": pred}, ensure_ascii=False)
                 for label, pred in zip(labels, predictions, strict=True)]
        (tmp / "generated_predictions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / "predict_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_results(results: dict[str, float], out: str | Path) -> str:
    """One line per score, for the terminal."""
    keys = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")
    lines = [f"{k.removeprefix('predict_')}: {results[k]:.2f}" for k in keys]
    lines.append(f"{results['predict_samples']} samples, {results['predict_tokens_per_second']:.1f} "
                 f"generated tokens/s -> {out}")
    return "\n".join(lines)
