"""`glmgym chat evaluate`: generate answers for a JSON-lines file and score them (BLEU-4, Rouge),
with THUDM's `ptuning/main.py --do_predict` outputs:

    OUT/generated_predictions.txt   one JSON object per line: {"labels", "predict"}
    OUT/predict_results.json        predict_bleu-4, predict_rouge-1/2/l, samples, speed
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from glmgym._io import atomic_dir
from glmgym.chat.config import ChatEvalConfig
from glmgym.chat.session import load_with
from glmgym.chat.template import build_prompt
from glmgym.chat.tuning.data import read_examples
from glmgym.chat.tuning.scores import generation_scores

__all__ = ["ChatEvalConfig", "evaluate_generation", "format_results"]


def evaluate_generation(cfg: ChatEvalConfig) -> dict[str, float]:
    """Generate, score, write the two output files; return the results."""

    examples = read_examples(cfg.file, cfg.prompt_column, cfg.response_column, cfg.history_column)
    examples = examples[: cfg.limit] if cfg.limit else examples
    bot = load_with(cfg)
    tok = bot.tokenizer
    gen = {"max_new_tokens": cfg.max_target_length, "do_sample": cfg.do_sample, "seed": cfg.seed}
    predictions: list[str] = []
    generated = 0
    t0 = time.perf_counter()
    def cut(text: str) -> str:  # to max_source_length tokens, as the reference's eval preprocessing
        return tok.decode(tok.tokenize(text)[: cfg.max_source_length])

    for i in range(0, len(examples), cfg.batch_size):
        chunk = examples[i : i + cfg.batch_size]
        if bot.model.config.version == 1:  # the v1 reference cuts the whole rendered prompt
            items = [(cut(build_prompt(q, h)), []) for q, h, _ in chunk]
        else:
            items = [(cut(q), h) for q, h, _ in chunk]
        replies = []
        for replies in bot.stream_batch(items, trim_history=True, **gen):  # noqa: B007 (the last step)
            pass
        predictions += [r.response for r in replies]
        generated += sum(r.completion_tokens for r in replies)
    seconds = time.perf_counter() - t0
    labels = [a for *_, a in examples]
    scores = generation_scores(predictions, labels)
    results = {f"predict_{k}": round(v, 4) for k, v in scores.items()}
    results |= {"predict_samples": len(examples), "predict_runtime": round(seconds, 3),
                "predict_samples_per_second": round(len(examples) / seconds, 3),
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
