"""The results pages' tables and plots, made from `benchmarks/results/*.json` only.

    python benchmarks/report.py            # writes docs/results/*.md and docs/img/*.png

`docs/benchmarks.md` includes the tables (pymdownx.snippets) and shows the plots; a test makes
them again and checks the committed tables are what the results say. Each speed figure is shown
under the CPU kind it was measured on; nothing here measures anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KINDS = {"avx2": "AVX2 only", "avx512": "AVX-512 + bf16"}
DT_ROWS = [
    f"{family}-{level}"
    for family in ("halfcheetah", "hopper", "walker2d")
    for level in ("medium", "medium-replay", "medium-expert")
]
CHAT_FORMATS = {
    "bf16": "bf16",
    "int8": "INT8 (per row)",
    "int4": "INT4, groups of 128 (default)",
    "int4_rowwise": "INT4 per row (THUDM's scheme)",
    "int4_qe": "INT4 + INT4 embeddings/lm_head",
    "chatglm_cpp_q4_0": "chatglm.cpp q4_0",
    "chatglm_cpp_q8_0": "chatglm.cpp q8_0",
}


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _score(entry: dict | None) -> str:
    if not entry:
        return "—"
    n = len(entry.get("seeds", []))
    return f"{entry['normalized_score_mean']:.1f} ± {entry['normalized_score_std']:.1f}" + (
        f" ({n})" if n else ""
    )


# ---------------------------------------------------------------------------------------------
# Decision Transformer table


# glmgym DT columns beside dt_quality.json's own runs (start windows, GPT-2 init): label, short
# name and the per-environment result files of runs with that training recipe
GLMGYM_VARIANTS = (
    ("glmgym DT, end windows, GPT-2 init (before)", "end windows, GPT-2 init", "dt_windows_end_*.json"),
    ("glmgym DT, end windows, paper init (default)", "end windows, paper init", "dt_init_paper_*.json"),
)


def welch_t(a: dict, b: dict) -> float | None:
    """Welch's t of two summaries' means (a - b), from their std over seeds (numpy's, ddof 0,
    turned into the sample deviation) and seed counts; None below two seeds on either side."""
    na, nb = len(a.get("seeds", [])), len(b.get("seeds", []))
    if na < 2 or nb < 2:
        return None
    var = sum(e["normalized_score_std"] ** 2 / (n - 1) for e, n in ((a, na), (b, nb)))  # s^2 / n
    diff = a["normalized_score_mean"] - b["normalized_score_mean"]
    return diff / var**0.5 if var > 0 else None


def _variant_rows(pattern: str, data: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """glmgym's DT summaries per dataset from the result files matching `pattern`; and per
    dataset the device its runs trained on (the GPU's name, or the CPU kind).

    Raises SystemExit when a file ran a dataset on other data than `data` (dt_quality.json's
    entries) did: a row must compare methods on the same file."""
    rows: dict[str, dict] = {}
    devices: dict[str, str] = {}
    for path in sorted(RESULTS.glob(pattern)):
        for name, entry in json.loads(path.read_text()).get("datasets", {}).items():
            sha = entry["config"]["dataset_sha256"]
            if name in data and data[name]["config"]["dataset_sha256"] != sha:
                raise SystemExit(f"{path.name}: {name} ran on other data ({sha[:12]}) than in "
                                 f"dt_quality.json ({data[name]['config']['dataset_sha256'][:12]})")
            if "glmgym_dt" in entry:
                rows[name] = entry["glmgym_dt"]
                runs = [r for k, r in entry["runs"].items() if k.startswith("glmgym_dt/")]
                devices[name] = " / ".join(sorted({r.get("gpu") or f"{r['cpu'].upper()} CPU" for r in runs}))
    return rows, devices


def dt_table(out: Path, img: Path) -> None:
    result = _load("dt_quality.json")
    if result is None:
        return
    data = result["datasets"]
    variants = [(label, short, *_variant_rows(pattern, data)) for label, short, pattern in GLMGYM_VARIANTS]

    def d3rlpy(name: str) -> dict | None:
        return data.get(name, {}).get("d3rlpy_dt")

    # every column as a function of the dataset's name -> its summary (or None)
    columns = [
        ("data mean", lambda n: data.get(n, {}).get("dataset")),
        ("BC", lambda n: data.get(n, {}).get("bc")),
        ("d3rlpy DT", d3rlpy),
        ("glmgym DT, start windows (before)", lambda n: data.get(n, {}).get("glmgym_dt")),
        *((label, rows.get) for label, _, rows, _ in variants),
    ]
    default = variants[-1][2].get  # the last variant is train's default recipe

    def against_d3rlpy(name: str) -> str:
        """The default's lead over d3rlpy's DT, and Welch's t of it: is a row's gap seed noise?"""
        a, b = default(name), d3rlpy(name)
        if not a or not b:
            return "—"
        t = welch_t(a, b)
        return f"{a['normalized_score_mean'] - b['normalized_score_mean']:+.1f}" + (
            f" ({t:+.1f})" if t is not None else "")

    lines = ["| dataset | " + " | ".join(label for label, _ in columns) + " | default − d3rlpy (Welch's t) |",
             "|---|" + "---:|" * (len(columns) + 1)]
    for name in DT_ROWS:
        cells = [_fmt(get(name)["normalized_score_mean"]) if c == 0 and get(name) else _score(get(name))
                 for c, (_, get) in enumerate(columns)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {against_d3rlpy(name)} |")

    def mean_over(names: list[str], get) -> str:
        scores = [get(n) for n in names]
        return _fmt(sum(e["normalized_score_mean"] for e in scores) / len(names)) if all(scores) else "—"

    lines.append("| **average** | " + " | ".join(mean_over(DT_ROWS, get) for _, get in columns) + " | |")

    def spread(get) -> str:
        """A column's seed spread over the rows: the root mean square of its rows' std over seeds
        (three seeds give each row's std too loosely to compare methods row by row)."""
        scores = [get(n) for n in DT_ROWS]
        if not all(e and len(e.get("seeds", [])) > 1 for e in scores):
            return "—"
        return _fmt((sum(e["normalized_score_std"] ** 2 for e in scores) / len(scores)) ** 0.5)

    narrower = sum(default(n)["normalized_score_std"] <= d3rlpy(n)["normalized_score_std"]
                   for n in DT_ROWS if default(n) and d3rlpy(n))
    lines.append("| seed std, root mean square over the rows | "
                 + " | ".join(spread(get) for _, get in columns)
                 + f" | default's std ≤ d3rlpy's on {narrower} of {len(DT_ROWS)} rows |")
    row_sets: dict[tuple, list[str]] = {}  # the same rows for every column while some are not rerun
    for _, short, rows, _ in variants:
        if 0 < len(rows) < len(DT_ROWS):
            row_sets.setdefault(tuple(n for n in DT_ROWS if n in rows), []).append(short)
    for names, shorts in row_sets.items():  # one line per set of rows, however many columns share it
        lines.append(f"| average of the {len(names)} rows with {' and with '.join(shorts)} | "
                     + " | ".join(mean_over(list(names), get) for _, get in columns) + " | |")
    trained_on = []
    for _, short, _, devices in variants:
        by_device: dict[str, list[str]] = {}
        for name in DT_ROWS:
            if name in devices:
                by_device.setdefault(devices[name], []).append(name)
        if by_device:
            trained_on.append(f"{short[0].upper()}{short[1:]}: " + "; ".join(f"{', '.join(names)} on {dev}"
                                                         for dev, names in by_device.items()))
    by_refs: dict[str, list[str]] = {}  # the rows of one pair of references, in table order
    for name in DT_ROWS:
        refs = data.get(name, {}).get("config", {}).get("reference_scores")
        if refs:
            by_refs.setdefault(f"{refs['min']:.1f} / {refs['max']:.1f}", []).append(name)
    lines += [
        "",
        "Normalized score (mean ± std over training seeds, their number in brackets), each DT at "
        "its best of three target returns; 10k gradient steps, 10 evaluation episodes per seed and "
        "target. A dash: not run on the row's current file. Start windows (kzl's cut) were "
        "glmgym's default until 2026-12-05, GPT-2's N(0, 0.02) init of the embeddings and the "
        "action head until 2026-12-06. The newer columns trained in fp32. " + ". ".join(trained_on) + ". "
        "The last column: the default's mean minus d3rlpy's, and Welch's t from the seeds' sample "
        "deviations: with three seeds a side, |t| below 2.78 (the two-sided 5% bound at 4 degrees "
        "of freedom, the most Welch's test allows there) cannot tell the two apart."
        + (" Each row is normalized by its file's references, the random policy's and the expert "
           "policy's mean return in the collection run it was cut from; rows of one environment "
           "from different runs have different scales: "
           + "; ".join(f"{', '.join(names)} {refs}" for refs, names in by_refs.items()) + "."
           if by_refs else ""),
    ]
    (out / "dt_table.md").write_text("\n".join(lines) + "\n")

    shown = [(label, get) for label, get in columns if any(get(n) for n in DT_ROWS)]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(shown)
    for c, (label, get) in enumerate(shown):
        entries = [get(name) for name in DT_ROWS]
        means = [e["normalized_score_mean"] if e else 0.0 for e in entries]
        stds = [e.get("normalized_score_std", 0.0) if e else 0.0 for e in entries]
        xs = [i + (c - (len(shown) - 1) / 2) * width for i in range(len(DT_ROWS))]
        ax.bar(xs, means, width, yerr=stds, label=label, capsize=2)
    ax.set_xticks(range(len(DT_ROWS)), [n.replace("-", "\n", 1) for n in DT_ROWS], fontsize=8)
    ax.set_ylabel("normalized score")
    ax.set_ylim(top=135)
    ax.legend(fontsize=7, ncols=3, loc="upper left")
    ax.set_title("Decision Transformer, nine datasets (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(img / "dt_table.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# ChatGLM-6B decode speed


def chat_speed(out: Path, img: Path) -> None:
    result = _load("chat_speed.json")
    if result is None:
        return
    by_cpu = result["by_cpu"]
    kinds = [k for k in KINDS if k in by_cpu]
    lines = [
        "| decode tok/s (prefill tok/s) | " + " | ".join(KINDS[k] for k in kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]
    for key, label in CHAT_FORMATS.items():
        cells = []
        for k in kinds:
            r = by_cpu[k].get(key)
            cells.append(
                "—"
                if not r or "decode_tokens_per_s" not in r
                else f"{r['decode_tokens_per_s']:.2f} ({r['prefill_tokens_per_s']:.1f})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    setups = []
    for k in kinds:
        cfg = by_cpu[k].get("config", {})
        flags = ", ".join(cfg.get("cpu_flags", [])) or "flags not recorded"
        setups.append(
            f"{KINDS[k]}: {cfg.get('cpu', 'x86_64')} ({flags}), {cfg.get('threads', '?')} threads, "
            f"{cfg.get('date', '?')}"
        )
    lines += ["", "ChatGLM-6B (28 layers), 128-token prompt, 16 new tokens. " + "; ".join(setups) + "."]
    (out / "chat_speed.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(9, 3.6))
    keys = list(CHAT_FORMATS)
    width = 0.8 / len(kinds)
    for c, k in enumerate(kinds):
        vals = [by_cpu[k].get(key, {}).get("decode_tokens_per_s", 0.0) for key in keys]
        ax.barh(
            [i + (c - (len(kinds) - 1) / 2) * width for i in range(len(keys))], vals, width, label=KINDS[k]
        )
    ax.set_yticks(range(len(keys)), [CHAT_FORMATS[k] for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s (2 cores)")
    ax.legend(fontsize=8)
    ax.set_title("ChatGLM-6B decode speed per CPU kind")
    fig.tight_layout()
    fig.savefig(img / "chat_speed.png", dpi=110)
    plt.close(fig)
    family_speed(result.get("models", {}), out)


FAMILY_NAMES = {"chatglm3-6b": "ChatGLM3-6B", "glm-4-9b-chat": "GLM-4-9B-chat"}


def family_speed(models: dict, out: Path) -> None:
    """The later family's decode speed (`chat_speed.py --model`): one row per model and format."""
    lines = [
        "| model | format | CPU kind | decode tok/s (rounds) | % of bound | prefill tok/s | resident GiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    setups = []
    for model, entry in models.items():
        for kind, result in entry.get("by_cpu", {}).items():
            for key, label in CHAT_FORMATS.items():
                r = result.get(key)
                if not r or "decode_tokens_per_s" not in r:
                    continue
                rounds = ", ".join(f"{x:.2f}" for x in r.get("decode_tokens_per_s_per_round", []))
                lines.append(
                    f"| {FAMILY_NAMES.get(model, model)} | {label} | {KINDS.get(kind, kind)} | "
                    f"{r['decode_tokens_per_s']:.2f} ({rounds}) | {100 * r['fraction_of_bound']:.0f}% | "
                    f"{r['prefill_tokens_per_s']:.1f} | {r['resident_gb']:.2f} |"
                )
            cfg = result.get("config", {})
            if cfg:
                flags = ", ".join(cfg.get("cpu_flags", [])) or "flags not recorded"
                setups.append(
                    f"{FAMILY_NAMES.get(model, model)} on {KINDS.get(kind, kind)}: {cfg.get('layers')} "
                    f"layers, {cfg.get('prompt_tokens')}-token prompt, {cfg.get('new_tokens')} new tokens, "
                    f"{cfg.get('cpu', 'x86_64')} ({flags}), {cfg.get('threads', '?')} threads, "
                    f"{cfg.get('date', '?')}"
                )
    if len(lines) == 2:
        return
    lines += ["", "Median of the rounds (each format measured in turn per round). " + "; ".join(setups) + "."]
    (out / "family_speed.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Serving under load


def serve_load(out: Path, img: Path) -> None:
    result = _load("serve_load.json")
    if result is None:
        return
    models = [m for m in ("tiny", "mid") if m in result]
    lines = [
        "| model | clients | tokens/s | requests/s | first token p50 (s) | p95 (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        for r in result[m]["runs"]:
            lines.append(
                f"| {m} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                f"{r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} |"
            )
    cfg = result.get("config", {})
    lines += [
        "",
        f"{cfg.get('requests', '?')} requests of {cfg.get('max_tokens', '?')} tokens per client count, "
        f"{cfg.get('dtype', '?')}, `--max-batch {cfg.get('max_batch', '?')}`, median of "
        f"{cfg.get('rounds', '?')} rounds; {cfg.get('cpu', 'x86_64')} "
        f"({', '.join(cfg.get('cpu_flags', []))}), {cfg.get('date', '?')}.",
    ]
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.2))
    for ax, m in zip(axes if len(models) > 1 else [axes], models):
        runs = result[m]["runs"]
        ax.plot([r["concurrency"] for r in runs], [r["tokens_per_s"] for r in runs], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{m} model")
        ax.set_ylim(bottom=0)
    fig.suptitle("Continuous batching: throughput against clients")
    fig.tight_layout()
    fig.savefig(img / "serve_load.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def finetune(out: Path, img: Path) -> None:
    quality, memory = _load("finetune_quality.json"), _load("finetune_memory.json")
    lines: list[str] = []
    if quality is not None:
        lines += [
            "| method | BLEU-4 | Rouge-1 | Rouge-L | train s | peak RSS (GiB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m in ("unadapted", "ptuning", "lora", "full"):
            r = quality.get(m)
            if r:
                lines.append(
                    f"| {m} | {r['bleu-4']:.1f} | {r['rouge-1']:.1f} | {r['rouge-l']:.1f} | "
                    f"{_fmt(r.get('train_seconds'))} | {_fmt(r.get('peak_rss_gb'), 2)} |"
                )
        c = quality["config"]
        lines += [
            "",
            f"A {c['layers']}-layer, width-{c['width']} GLM pretrained for {c['pretrain_steps']} "
            f"steps, then adapted for {c['adapt_steps']} steps on {c['task_train']} examples and scored "
            f"on {c['task_dev']}; {c.get('cpu', 'x86_64')} ({', '.join(c.get('cpu_flags', []))}), "
            f"{c.get('date', '?')}.",
            "",
        ]
    if memory is not None:
        lines += [
            "| 28 layers, INT4 base | load peak (GiB) | step peak (GiB) | step s | trained parameters |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in memory["config"]["methods"]:
            r = memory[m]
            lines.append(
                f"| {m} | {r['load_peak_rss_gb']:.2f} | {r['step_peak_rss_gb']:.2f} | "
                f"{r['step_seconds']:.0f} | {r['trained_parameters']:,} |"
            )
        c = memory["config"]
        lines += [
            "",
            f"One optimizer step of {c['source']}+{c['target']} tokens on ChatGLM-6B's shape; "
            f"{c.get('cpu', 'x86_64')}, {c.get('date', '?')}.",
        ]
    if lines:
        (out / "finetune.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Decision Transformer training speed


def dt_speed(out: Path, img: Path) -> None:
    result = _load("dt_speed.json")
    if result is None:
        return
    by_cpu = result["by_cpu"]
    kinds = [k for k in KINDS if k in by_cpu]
    rows = [
        ("transformers `DecisionTransformerModel`, fp32", "hf_fp32"),
        ("glmgym, fp32", "glmgym_fp32"),
        ("transformers, bf16 autocast", "hf_bf16"),
        ("glmgym, bf16 autocast", "glmgym_bf16"),
    ]
    lines = [
        "| training steps/s | " + " | ".join(KINDS[k] for k in kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]
    for label, key in rows:
        lines.append(
            f"| {label} | " + " | ".join(f"{by_cpu[k]['train_steps_per_s'][key]:.2f}" for k in kinds) + " |"
        )
    lines.append(
        "| glmgym's default (`--precision auto`) against transformers' fp32 | "
        + " | ".join(
            f"{by_cpu[k]['glmgym_default_precision']}: "
            f"**{by_cpu[k]['ratios']['train_default_vs_hf_fp32']:.2f}x**"
            for k in kinds
        )
        + " |"
    )
    lines.append(
        "| evaluation env steps/s, 10 episodes vectorized (one at a time) | "
        + " | ".join(
            "{vectorized:.0f} ({sequential:.0f})".format(**by_cpu[k]["eval_env_steps_per_s"]) for k in kinds
        )
        + " |"
    )
    cfg = by_cpu[kinds[0]]["config"]
    lines += [
        "",
        f"K={cfg['context_len']}, hidden {cfg['hidden_size']}, {cfg['n_layer']} layers, batch "
        f"{cfg['batch_size']}, 2 threads; evaluation on {cfg['eval_env']}.",
    ]
    (out / "dt_speed.md").write_text("\n".join(lines) + "\n")


def _schedule(sc: dict) -> str:
    # runs recorded before TrainConfig.init existed started from GPT-2's init
    return f"{sc['steps']} steps, {sc['warmup_steps']} warmup, {sc.get('init', 'gpt2')} init"


def quickstart(out: Path, img: Path) -> None:
    """`quickstart_schedule.py`: the Quickstart recipe's score along its run, per schedule and seed."""
    result = _load("quickstart_schedule.json")
    if result is None:
        return
    scheds = result["schedules"]
    steps = sorted({int(s) for sc in scheds.values() for s in sc["by_step"]})
    lines = [
        "| steps | " + " | ".join(f"{_schedule(sc)}: mean ± std (per seed)" for sc in scheds.values()) + " |",
        "|---:|" + "---:|" * len(scheds),
    ]
    for step in steps:
        cells = []
        for sc in scheds.values():
            e = sc["by_step"].get(str(step))
            cells.append("" if e is None else f"{e['normalized_mean']:.1f} ± {e['normalized_std']:.1f} "
                         f"({', '.join(f'{x:.1f}' for x in e['per_seed'])})")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"`{result['dataset']}`, normalized return at target {result['target_return']:.0f}, "
        f"{result['eval_episodes']} episodes per evaluation, seeds {', '.join(map(str, result['seeds']))}. "
        "The learning rate is constant after warmup, so each row is also the final score of a run "
        "of that length with that warmup.",
    ]
    (out / "quickstart.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for sc in scheds.values():
        x = sorted(int(s) for s in sc["by_step"])
        mean = np.array([sc["by_step"][str(s)]["normalized_mean"] for s in x])
        std = np.array([sc["by_step"][str(s)]["normalized_std"] for s in x])
        line, = ax.plot(x, mean, marker="o", ms=3, label=_schedule(sc))
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("gradient steps")
    ax.set_ylabel("normalized return (mean ± std over seeds)")
    ax.set_title(f"{result['dataset']}: score along the run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "quickstart_schedule.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Return conditioning: achieved against target return


_INIT_NAMES = {"gpt2": "GPT-2 init", "paper": "paper init", "ptime": "paper init, timestep x 7",
               "ronly": "GPT-2 init, return at default",
               "psum": "paper init, loss summed over action dims", "d3rlpy": "d3rlpy DT",
               "dlike": "paper init, d3rlpy's transformer details",
               "d3rlpy-weights": "d3rlpy DT's weights, run by glmgym",
               "d3rlpy-recipe": "d3rlpy DT's recipe and initial weights, trained by glmgym"}


def dt_sweep(out: Path, img: Path) -> None:
    result = _load("dt_sweep.json")
    if not result:
        return
    for r in result.values():
        r.setdefault("init", "gpt2")  # entries made before `--init` existed
    runs = sorted(
        result.items(), key=lambda kv: (kv[1]["dataset"], kv[1]["windows"], kv[1]["init"], kv[1]["seed"])
    )
    lines = [
        "| dataset | windows | init | seed | steps | slope | spread (return) | achieved at each target |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for _, r in runs:
        curve = ", ".join(f"{t:.0f}: {a:.0f}" for t, a in zip(r["targets"], r["achieved"]))
        lines.append(
            f"| {r['dataset']} | {r['windows']} | {_INIT_NAMES[r['init']]} | {r['seed']} | {r['steps']} | "
            f"{r['slope']:.2f} | "
            f"{r['spread']:+.0f} | {curve} |"
        )
    lines += [
        "",
        "Each checkpoint evaluated at targets from its data's worst episode return to 1.25x its best, "
        f"{runs[0][1]['episodes']} episodes each; slope: least-squares achieved return per unit of "
        "target; spread: achieved at the highest target minus at the lowest.",
    ]
    (out / "dt_sweep.md").write_text("\n".join(lines) + "\n")

    datasets = sorted({r["dataset"] for _, r in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        top = 0.0
        for _, r in runs:
            if r["dataset"] != name:
                continue
            # Solid: today's default (end windows, paper init); the older recipes dashed/dotted.
            style = "--" if r["windows"] == "start" else ("-" if r["init"] == "paper" else ":")
            ax.plot(
                r["targets"],
                r["achieved"],
                style,
                marker="o",
                ms=3,
                label=f"{r['windows']}, {_INIT_NAMES[r['init']]}, seed {r['seed']}, {r['steps'] // 1000}k",
            )
            top = max(top, *r["targets"])
        ax.plot([0, top], [0, top], color="grey", lw=0.8, label="achieved = target")
        data = next((r["dataset_returns"] for _, r in runs if r["dataset"] == name), None)
        if data:
            ax.axhline(data["mean"], color="black", lw=0.8, ls=":", label="data mean")
        ax.set_title(name)
        ax.set_xlabel("target return")
        ax.set_ylabel("achieved return")
        ax.legend(fontsize=7)
    fig.suptitle("Return conditioning: achieved against target return")
    fig.tight_layout()
    fig.savefig(img / "dt_sweep.png", dpi=110)
    plt.close(fig)


def dt_variant(out: Path, img: Path) -> None:
    """`dt_variant.py`: target max (a return-aligned variant) against the table's fixed target on
    held-out episodes."""
    runs: dict[str, list[dict]] = {}
    for _, r in sorted((_load("dt_variant.json") or {}).items()):
        runs.setdefault(r["dataset"], []).append(r)
    if not runs:
        return
    lines = [
        "| dataset | seeds | fixed target | fixed target: score | target max: score "
        "| max − fixed, per seed |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, rows in sorted(runs.items()):
        fixed, best = np.array([r["fixed"] for r in rows]), np.array([r["max"] for r in rows])
        per_seed = ", ".join(f"{b - f:+.1f}" for f, b in zip(fixed, best))
        lines.append(
            f"| {name} | {len(rows)} | {rows[0]['fixed_target']:.0f} | "
            f"{fixed.mean():.1f} ± {fixed.std():.1f} | {best.mean():.1f} ± {best.std():.1f} | {per_seed} |"
        )
    r0 = next(iter(runs.values()))[0]
    lines += [
        "",
        f"Normalized score, mean ± std over training seeds; each seed over the same {r0['episodes']} "
        f"held-out episodes (seeds {r0['episode_seeds'][0]}–{r0['episode_seeds'][1]}) for both "
        "targets. The fixed target is the one the DT table reports (its best of three, chosen on "
        "episode seeds 0–9). Target max conditions each step on the larger of the carried-over "
        "target and an estimate of the best return reachable from the state (an expectile-0.99 "
        "regression of the return-to-go on the training data). Same transformers: the end-window "
        "runs of the table, 10k steps.",
    ]
    (out / "dt_variant.md").write_text("\n".join(lines) + "\n")


def dt_heldout(out: Path, img: Path) -> None:
    """`dt_heldout.py`: runs of each training recipe on the same held-out episodes; the GPT-2-init
    end-window runs from `dt_variant.py`'s fixed-target figures (the same episodes)."""
    groups: dict[tuple[str, str, float], list[tuple[int, float]]] = {}
    seeds_of_episodes = None
    for r in (_load("dt_heldout.json") or {}).values():
        seeds_of_episodes = r["episode_seeds"]
        for target, res in r["results"].items():
            groups.setdefault((r["dataset"], r["init"], float(target)), []).append(
                (r["seed"], res["normalized_mean"]))
    if not groups:
        return
    for r in (_load("dt_variant.json") or {}).values():
        if r["episode_seeds"] == seeds_of_episodes and any(k[0] == r["dataset"] for k in groups):
            groups.setdefault((r["dataset"], "gpt2", r["fixed_target"]), []).append((r["seed"], r["fixed"]))
    lines = ["| dataset | target | recipe | per seed | mean ± std |", "|---|---:|---|---|---:|"]
    for (name, init, target), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1])):
        scores = np.array([score for _, score in sorted(rows)])
        per_seed = ", ".join(f"{x:.1f}" for x in scores)
        lines.append(f"| {name} | {target:.0f} | {_INIT_NAMES[init]} | {per_seed} | "
                     f"{scores.mean():.1f} ± {scores.std():.1f} |")
    lines += [
        "",
        "Normalized score of each training seed's final checkpoint (end windows, 10k steps) over "
        f"the same held-out episodes (episode seeds {seeds_of_episodes[0]}–{seeds_of_episodes[1]}), "
        "not the table's ten; mean ± std over seeds. GPT-2 init: `dt_variant.py`'s fixed-target "
        "figures of the table's end-window runs (at 4844 only). Timestep x 7: the paper init with the "
        "timestep embedding drawn from N(0, 1/sqrt(3 x state_dim)) instead of N(0, 0.02). Loss "
        "summed over action dims: d3rlpy's reduction, so that the 0.25 clip binds as in d3rlpy. "
        "d3rlpy's transformer details: the paper init with d3rlpy's LayerNorm epsilon (0.003) in the "
        "blocks, its residual projections at N(0, 0.02) unscaled, and no position embedding. "
        "d3rlpy DT: d3rlpy 2.8.1 trained as in the table, evaluated on the same episodes. d3rlpy DT's "
        "weights, run by glmgym: the same trained models converted to glmgym checkpoints "
        "(`_d3rlpy_convert.py`) and evaluated by glmgym's loop (the seeds whose weights were kept: "
        "3 and 4 on walker2d-medium-expert).",
    ]
    (out / "dt_heldout.md").write_text("\n".join(lines) + "\n")


def dt_tokens(out: Path, img: Path) -> None:
    """`dt_tokens.py`: how far the return-to-go and the timestep move the normalized tokens, at
    initialization and after training, per dataset and recipe (mean over seeds)."""
    result = _load("dt_tokens.json")
    if not result:
        return
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in result.values():
        groups.setdefault((r["dataset"], r["init"]), []).append(r)

    def mean(rows: list[dict], when: str, what: str) -> str:
        values = [r[when][what] for r in rows if r[when]]
        return f"{np.mean(values):.2f}" if values else "—"

    lines = ["| dataset | recipe | seeds | time shift at init | after 10k steps | return shift at init "
             "| after 10k steps |", "|---|---|---:|---:|---:|---:|---:|"]
    for (name, init), rows in sorted(groups.items()):
        lines.append(f"| {name} | {_INIT_NAMES[init]} | {len(rows)} | "
                     f"{mean(rows, 'at_init', 'time_shift')} | "
                     f"{mean(rows, 'trained', 'time_shift')} | {mean(rows, 'at_init', 'return_shift')} | "
                     f"{mean(rows, 'trained', 'return_shift')} |")
    times = next(iter(result.values()))["times"]
    lines += [
        "",
        "RMS change per component of a token after the embedding LayerNorm (which leaves tokens at "
        f"RMS 1 before its gain): time shift, a state token between timesteps {times[0]} and "
        f"{times[1]} (256 random normalized states); return shift, the return token at timestep "
        f"{times[0]} between the data's mean and best episode return. At init: a fresh model of the "
        "run's recipe and seed (a dash: an ablation arm whose code was removed, or d3rlpy's model, "
        "whose init is the paper init). `benchmarks/dt_tokens.py`.",
    ]
    (out / "dt_tokens.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# One NVIDIA GPU: benchmarks/gpu_check.sh


def gpu_speed(out: Path, img: Path) -> None:
    """`gpu_speed.py`: chat decode/prefill per format on the full-size random ChatGLM-6B, the cost
    of verifying k drafts, DT training and evaluation speed."""
    r = _load("gpu_speed.json")
    if r is None:
        return
    ks = list(next(iter(r["chat"].values()))["verify_ratio"])
    lines = [
        "| format | kernel | prefill tok/s | decode tok/s | "
        + " | ".join(f"verify k={k}" for k in ks if k != "0") + " |",
        "|---|---|---:|---:|" + "---:|" * (len(ks) - 1),
    ]
    for name, e in r["chat"].items():
        ratios = " | ".join(f"{e['verify_ratio'][k]:.2f}" for k in ks if k != "0")
        lines.append(f"| {name} | {e['backend']} | {e['prefill_tokens_per_s']:.0f} | "
                     f"{e['decode_tokens_per_s']:.1f} | {ratios} |")
    dt, ev, c = r["dt_train_steps_per_s"], r["dt_eval_env_steps_per_s"], r["config"]
    lines += [
        "",
        f"{r['gpu']}, torch {r['torch']}, {r['date']}. ChatGLM-6B with random weights, "
        f"{c['prompt_tokens']}-token prompt, {c['new_tokens']} new tokens, batch 1, eager PyTorch; "
        "verify k: the time of one forward over 1 + k tokens over that of one token. "
        f"DT training (hopper shapes, batch 64): {dt['fp32']:.1f} steps/s in fp32, "
        f"{dt['bf16_autocast']:.1f} with bf16 autocast"
        + (f"; evaluation of {c['eval_episodes']} HalfCheetah episodes: {ev['vectorized']:.0f} env "
           f"steps/s vectorized against {ev['sequential']:.0f} one episode at a time ({ev['ratio']:.1f}x)."
           if "ratio" in ev else "."),
    ]
    (out / "gpu_speed.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Speculative decoding (prompt lookup)

KERNEL_NAMES = {"avx2": "glmgym AVX2", "vnni": "glmgym AVX-512 VNNI", "torch": "PyTorch"}
KERNEL_LAYERS = {"qkv": "query-key-value", "dense": "attention output", "h_to_4h": "MLP in",
                 "4h_to_h": "MLP out"}


def chat_kernels(out: Path, img: Path) -> None:
    """`chat_kernels.py`: microseconds of one low-bit product per layer shape, row count and kernel."""
    result = _load("chat_kernels.json")
    if not result:
        return
    lines = []
    for kind, entry in result.get("by_cpu", {}).items():
        facts = entry.get("machine", {})
        rows = entry["rows"]
        held = ", held to AVX2 (ATEN_CPU_CAPABILITY=avx2)" if facts.get("simulated_by") else ""
        lines += [
            f"**One product of a ChatGLM-6B layer, {KINDS.get(kind, kind)}** (microseconds; M rows of "
            "activations: 1 a decoded token, 2-9 a token and its drafts, 128 a prefill):",
            "",
            "| format | layer (K x N) | kernel | " + " | ".join(f"M = {m}" for m in rows) + " |",
            "|---|---|---|" + "---:|" * len(rows),
        ]
        for name, layer in entry["layers"].items():
            fmt, shape = name.split(" ", 1)
            where = f"{KERNEL_LAYERS.get(shape, shape)} ({layer['K']}x{layer['N']})"
            for kernel, us in layer["us"].items():
                times = " | ".join(f"{us[str(m)]:.0f}" for m in rows)
                name = KERNEL_NAMES.get(kernel, kernel)
                lines.append(f"| {CHAT_FORMATS.get(fmt, fmt)} | {where} | {name} | {times} |")
        lines += [
            "",
            f"Fastest of {entry['rounds']} interleaved rounds, each call on the next of enough copies of the "
            f"layer that its weights come from memory; {facts.get('cpu', 'x86_64')} "
            f"({', '.join(facts.get('cpu_flags', []))}), {facts.get('threads', '?')} threads, "
            f"{entry['date']}{held}.",
            "",
        ]
    (out / "chat_kernels.md").write_text("\n".join(lines).rstrip() + "\n")


SPEC_MODELS = {"chatglm-6b": "ChatGLM-6B", **FAMILY_NAMES}


def speculative(out: Path, img: Path) -> None:
    """`chat_speculative.py`: the cost of verifying k drafts on the full-size model, the drafts a
    trained model keeps on a grounded task, and the speedup of both together."""
    result = _load("chat_speculative.json")
    if not result:
        return
    lines = []
    for kind, entry in result.get("by_cpu", {}).items():
        facts = entry.get("machine", {})
        flags = ", ".join(facts.get("cpu_flags", []))
        where = f"{facts.get('cpu', 'x86_64')} ({flags}), {facts.get('threads', '?')} threads"
        cost, accept = entry.get("cost", {}), entry.get("accept")
        if cost:
            lines += [
                f"**Cost of a verifying forward, {KINDS.get(kind, kind)}** (random full-size weights, "
                "time of one forward over the last token and k drafts, relative to k = 0):",
                "",
                "| model | format | k = 0 (ms) | k = 1 | k = 2 | k = 4 | k = 8 |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
            # on AVX-512 VNNI CPUs, also the same forwards on the AVX2 products (GLMGYM_KERNELS=avx2)
            for costs, note in ((cost, ""), (entry.get("cost_avx2_products", {}), ", AVX2 products")):
                for model, formats in costs.items():
                    for fmt, c in formats.items():
                        ratios = " | ".join(f"{c['ratio'][str(k)]:.2f}" for k in (1, 2, 4, 8))
                        label = f"{SPEC_MODELS.get(model, model)} | {CHAT_FORMATS.get(fmt, fmt)}{note}"
                        lines.append(f"| {label} | {c['ms']['0']:.0f} | {ratios} |")
            dates = sorted({c.get("date", "?") for f in cost.values() for c in f.values()})
            first = next(c for f in cost.values() for c in f.values())
            lines += [
                "",
                f"After a {first['prompt']}-token prompt, median of {first['rounds']} rounds (k = 0..8 "
                f"in turn); {where}, {', '.join(dates)}.",
                "",
            ]
        if accept:
            projected = entry.get("projected_speedup", {})
            heads = [
                f"{SPEC_MODELS.get(m, m)} {CHAT_FORMATS.get(f, f)}" for m, fs in projected.items() for f in fs
            ]
            lines += [
                f"**Drafts kept on a grounded task, {KINDS.get(kind, kind)}** (the small GLM, greedy, "
                f"{accept['dev']} prompts, {accept['tokens']} tokens; answers equal to plain decoding):",
                "",
                "| k | drafts kept | tokens per forward | small GLM speedup (measured) | "
                + " | ".join(f"{h} (projected)" for h in heads)
                + " |",
                "|---:|---:|---:|---:|" + "---:|" * len(heads),
            ]
            for k, r in accept["by_k"].items():
                proj = [fs[f][k] for fs in projected.values() for f in fs]
                lines.append(
                    f"| {k} | {100 * r['acceptance']:.0f}% | {r['tokens_per_forward']:.2f} | "
                    f"{r['speedup']:.2f}x | " + " | ".join(f"{x:.2f}x" for x in proj) + " |"
                )
            lines += [
                "",
                f"Plain greedy decoding of the small GLM: {accept['plain_tokens_per_s']:.0f} tokens/s; "
                f"{accept['exact_answers']}/{accept['dev']} answers equal the reference answer; "
                f"{where}, {accept.get('date', '?')}. Projected: the same forwards at the full-size "
                "model's measured cost of each draft count.",
                "",
            ]
    if not lines:
        return
    (out / "speculative.md").write_text("\n".join(lines).rstrip() + "\n")

    curves = [
        (f"{SPEC_MODELS.get(m, m)} {CHAT_FORMATS.get(f, f)} ({KINDS.get(kind, kind)})", c["ratio"])
        for kind, e in result["by_cpu"].items()
        for m, fs in e.get("cost", {}).items()
        for f, c in fs.items()
    ]
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for label, ratio in curves:
            ks = sorted(int(k) for k in ratio)
            ax.plot(ks, [ratio[str(k)] for k in ks], marker="o", ms=3, label=label)
        ks = range(0, 9)
        ax.plot(ks, [k + 1 for k in ks], color="grey", lw=0.8, ls=":", label="k + 1 plain steps")
        ax.set_xlabel("draft tokens verified (k)")
        ax.set_ylabel("forward time / one-token step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img / "speculative.png", dpi=110)
        plt.close(fig)


def dt_average(out: Path, img: Path) -> None:
    """`dt_average.py`: one run's trained weights at its last checkpoints, and the mean of those
    weights, on the same held-out episodes."""
    result = _load("dt_average.json")
    if not result:
        return
    lines = ["| dataset | recipe | seed | target | per checkpoint | their mean score "
             "| mean of their weights |", "|---|---|---:|---:|---|---:|---:|"]
    for r in sorted(result.values(), key=lambda r: (r["dataset"], r["recipe"], r["seed"])):
        scores = [r["checkpoints"][str(s)]["normalized_mean"] for s in r["steps"]]
        lines.append(f"| {r['dataset']} | {r['recipe']} | {r['seed']} | {r['target']:.0f} | "
                     f"{', '.join(f'{x:.1f}' for x in scores)} | {np.mean(scores):.1f} | "
                     f"{r['mean_of_weights']['normalized_mean']:.1f} |")
    r0 = next(iter(result.values()))
    steps = ", ".join(f"{s // 1000}k" for s in r0["steps"])
    lines += ["", f"Normalized score of each checkpoint's trained weights (steps {steps}) and of the "
              "uniform mean of those weights, on the same held-out episodes (episode seeds "
              f"{r0['episode_seeds'][0]}–{r0['episode_seeds'][1]}) at one target. Runs of 10k steps, "
              "end windows. Their mean score: the average of the checkpoints' scores, what a run "
              "stopped at one of them scores on average."]
    (out / "dt_average.md").write_text("\n".join(lines) + "\n")


def dt_step_parity(out: Path, img: Path) -> None:
    """`dt_step_parity.py`: glmgym's training steps against d3rlpy's own on the same windows."""
    result = _load("dt_step_parity.json")
    runs = {k: r for k, r in (result or {}).get("runs", {}).items() if r["mode"] == "parity"}
    if not runs:
        return
    lines = ["| dataset | gradient steps | loss: largest relative gap | weights after: largest gap "
             "| control: loss gap | d3rlpy | torch |", "|---|---:|---:|---:|---:|---|---|"]
    for key, r in sorted(runs.items()):
        v = r["versions"]
        lines.append(f"| {key.split('/')[0]} | {r['steps']} | {r['loss_max_rel_gap']:.1e} | "
                     f"{r['weights_max_abs_gap']:.1e} | {r['control_max_rel_gap']:.1e} | {v['d3rlpy']} "
                     f"| {v['torch']} |")
    lines += ["", "d3rlpy's DT (its initial weights, its `update`) and glmgym's network, window cut, "
              "AdamW, warmup and clip from the same initial weights, on the same windows, with "
              "d3rlpy's loss and dropout off. Largest relative gap: over every step's loss; weights "
              "after: the largest absolute difference of any trained parameter after the last step. "
              "Control: glmgym against itself, each initial weight moved by one float32 step, the "
              "largest relative gap between the two runs' losses."]
    (out / "dt_step_parity.md").write_text("\n".join(lines) + "\n")
    import matplotlib.pyplot as plt

    key, r = sorted(runs.items())[0]
    ours, theirs = np.array(r["loss_glmgym"]), np.array(r["loss_d3rlpy"])
    steps = np.arange(1, len(ours) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 4.8), sharex=True)
    top.plot(steps, theirs, lw=2.5, color="0.7", label="d3rlpy 2.8.1")
    top.plot(steps, ours, lw=0.8, color="C0", label="glmgym")
    top.set_ylabel("training loss")
    top.set_yscale("log")
    top.legend(fontsize=8)
    top.set_title(f"{key.split('/')[0]}: the same training steps")
    bottom.semilogy(steps, np.maximum(np.abs(ours - theirs) / theirs, 1e-9), lw=0.8, color="C0",
                    label="glmgym against d3rlpy")
    control = np.array(r["loss_control"])
    bottom.semilogy(steps, np.maximum(np.abs(control - ours) / ours, 1e-9), lw=0.8, color="C1",
                    label="glmgym against itself, weights one float step apart")
    bottom.legend(fontsize=7)
    bottom.set_ylabel("relative loss gap")
    bottom.set_xlabel("gradient step")
    fig.tight_layout()
    fig.savefig(img / "dt_step_parity.png", dpi=110)
    plt.close(fig)


MAKERS = (dt_table, dt_sweep, dt_variant, dt_heldout, dt_tokens, dt_average, dt_step_parity,
          chat_speed, chat_kernels, serve_load, finetune, dt_speed, quickstart, speculative,
          gpu_speed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", default=str(ROOT / "docs" / "results"), help="where the markdown tables go")
    p.add_argument("--plots", default=str(ROOT / "docs" / "img"), help="where the PNG plots go")
    args = p.parse_args(argv)
    out, img = Path(args.tables), Path(args.plots)
    out.mkdir(parents=True, exist_ok=True)
    img.mkdir(parents=True, exist_ok=True)
    for make in MAKERS:
        make(out, img)
    print(f"tables in {out}, plots in {img}")


if __name__ == "__main__":
    main()
