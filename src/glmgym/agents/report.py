"""A run's `report.md` and its plots: training loss, normalized score over training, and achieved
return versus target return."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmgym._io import atomic_write_text, read_json
from glmgym.errors import import_extra

__all__ = ["plot_return_vs_target", "write_report"]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def plot_return_vs_target(sweep: dict[str, Any], path: Path, dataset_mean: float | None = None) -> Path:
    """Draw the achieved return (mean ± std over episodes) against the target return of an
    `evaluate()` report to the PNG `path` (written atomically)."""
    matplotlib = import_extra("matplotlib", "agents")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = sorted(sweep["results"], key=lambda r: r["target_return"])
    x = [r["target_return"] for r in res]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.errorbar(x, [r["return_mean"] for r in res], yerr=[r["return_std"] for r in res],
                marker="o", capsize=3, label="achieved (mean ± std)")
    lim = [min(0, min(x)), max(x) * 1.05]
    ax.plot(lim, lim, "k--", lw=0.8, label="achieved = target")
    if dataset_mean is not None:
        ax.axhline(dataset_mean, color="gray", ls=":", label="dataset mean")
    ax.set(xlabel="target return", ylabel="episode return", title="return conditioning")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return path


def write_report(run_dir: Path, sweep: dict[str, Any] | None = None,
                 dataset: dict[str, Any] | None = None) -> Path:
    """Write plots (PNG) and `report.md` into `run_dir`; return the report path.

    Args:
        run_dir: a run directory with `log.jsonl` and `train_config.json`.
        sweep: an `evaluate()` report over several target returns (achieved vs target plot).
        dataset: the dataset's `summary()` (its mean return is drawn for comparison).
    """
    matplotlib = import_extra("matplotlib", "agents")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _records(run_dir)
    config = read_json(run_dir / "train_config.json")
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    images = []

    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*losses), lw=1)
        ax.set(xlabel="gradient step", ylabel="action MSE", title="training loss", yscale="log")
        ax.grid(alpha=0.3)
        _save(fig, run_dir / "loss.png")
        plt.close(fig)
        images.append(("Training loss", "loss.png"))

    score_key = "normalized_mean" if evals and all("normalized_mean" in e for e in evals) else "return_mean"
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        targets = sorted({res["target_return"] for e in evals for res in e["results"]})
        for target in targets:
            pts = [(e["step"], res[score_key]) for e in evals for res in e["results"]
                   if res["target_return"] == target]
            ax.plot(*zip(*pts), marker="o", label=f"target {target:.0f}")
        ax.set(xlabel="gradient step",
               ylabel="normalized score" if score_key == "normalized_mean" else "return",
               title="evaluation during training")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, run_dir / "score.png")
        plt.close(fig)
        images.append(("Evaluation during training", "score.png"))

    if sweep:
        plot_return_vs_target(sweep, run_dir / "return_vs_target.png",
                              dataset["return_mean"] if dataset else None)
        images.append(("Achieved return versus target return", "return_vs_target.png"))

    lines = [f"# Decision Transformer run: {config['dataset']}", ""]
    lines.append(f"- steps: {config['steps']} (preset {config.get('preset')}), batch {config['batch_size']}, "
                 f"K={config['context_len']}, hidden {config['hidden_size']}, {config['n_layer']} layers, "
                 f"precision {config['precision']}, seed {config['seed']}")
    if dataset:
        lines.append(f"- dataset: {dataset['episodes']} episodes, {dataset['transitions']} transitions, "
                     f"return {dataset['return_mean']:.1f} ± {dataset['return_std']:.1f} "
                     f"(min {dataset['return_min']:.1f}, max {dataset['return_max']:.1f})")
    if losses:
        lines.append(f"- final loss: {losses[-1][1]:.4f}")
    train_records = [r for r in records if "steps_per_s" in r]
    if train_records:
        speed = sum(r["steps_per_s"] for r in train_records) / len(train_records)
        lines.append(f"- mean training speed: {speed:.1f} steps/s")
    final_eval = run_dir / "eval.json"
    if final_eval.exists():
        report = read_json(final_eval)
        ref = report.get("reference_scores")
        lines += ["", "## Final evaluation", ""]
        if ref:
            lines.append(f"Normalized with the {ref['source']} reference returns "
                         f"{ref['min']:.1f} (score 0) and {ref['max']:.1f} (score 100).")
            lines.append("")
        lines.append("| target | episodes | return | normalized | length |")
        lines.append("|---:|---:|---:|---:|---:|")
        for r in report["results"]:
            norm = (f"{r['normalized_mean']:.1f} ± {r['normalized_std']:.1f}"
                    if "normalized_mean" in r else "-")
            lines.append(f"| {r['target_return']:.0f} | {r['episodes']} | {r['return_mean']:.1f} ± "
                         f"{r['return_std']:.1f} | {norm} | {r['length_mean']:.0f} |")
    if sweep:
        lines += ["", "## Return conditioning", "",
                  "| target | achieved return |", "|---:|---:|"]
        for r in sorted(sweep["results"], key=lambda r: r["target_return"]):
            lines.append(f"| {r['target_return']:.0f} | {r['return_mean']:.1f} ± {r['return_std']:.1f} |")
    for title, image in images:
        lines += ["", f"## {title}", "", f"![{title}]({image})"]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
