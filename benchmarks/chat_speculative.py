"""Prompt-lookup speculative decoding on this machine: what verifying k drafts costs on the full-size
model, how many drafts a trained model keeps on a grounded task, and the speedup of both together.

- `cost`: ChatGLM-6B (or `--model`) with random full-size weights, INT4 and INT8 as `chat_speed.py`
  writes them (its checkpoints are reused from `--workdir`, or written first): after a
  `--prompt`-token prefill, one forward over the last token and k = 0..8 drafts, timed in turns
  (k = 0, 1, ..., 8, 0, 1, ...) for `--rounds` rounds; the median of each k, and its ratio to k = 0.
- `accept`: the small GLM of `finetune_quality.py` (4 layers, width 256, its ADGEN-style corpus,
  here with pieces of at most two characters) trained from random weights on a grounded task: the
  prompt is a product description, the answer quotes three of its clauses in a fixed order after
  a short heading. Every dev prompt is answered
  greedily with prompt lookup off and with k = 2, 4, 8: the answers must be equal; the drafts
  kept, the tokens per decoding forward (the prefill's first token not counted) and the
  wall-clock speed are recorded.
- the projection for the full-size model: each decoding forward of the `accept` runs costs what
  the `cost` part measured for its draft count, so the full-size model's time per decoded token
  is sum(cost(k_i)) / tokens against cost(0) per token.

Results go under `by_cpu[KIND]` of `--out`, with the CPU flags seen.

    python benchmarks/chat_speculative.py cost [--model chatglm-6b] [--formats int4 int8] [--rounds 5]
    python benchmarks/chat_speculative.py accept [--steps 1000] [--train-only]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_facts
from chat_speed import FORMATS, prompt_ids, quantize_child, write_random_checkpoint
from finetune_quality import CLAUSES, COLORS, FITS, MATERIALS, STYLES, TYPES, WORDS, save_small_glm

DRAFTS = range(0, 9)
LOOKUPS = (2, 4, 8)
QUOTED = ("fit", "color", "style")


def cost_child(model_dir: Path, prompt: int, rounds: int) -> dict:
    """ms of one forward over 1 + k tokens after a `prompt`-token prefill, k = 0..8 (medians)."""
    import torch

    from glmgym.chat.checkpoint import load_model
    from glmgym.chat.generate import PromptBatch, prefill
    from glmgym.chat.model import KVCache

    model = load_model(model_dir, torch.bfloat16)
    cfg = model.config
    causal = cfg.version == 2
    batch = PromptBatch.build([prompt_ids(cfg, prompt)], cfg.pad_token_id, causal=causal)
    P = batch.input_ids.shape[1]
    times: dict[int, list[float]] = {k: [] for k in DRAFTS}
    with torch.inference_mode():
        cache = KVCache.empty(cfg, 1, P + max(DRAFTS) + 1, torch.bfloat16, "cpu")
        prefill(model, batch, cache)
        for r in range(rounds + 1):  # round 0 warms every shape up
            for k in DRAFTS:
                ids = torch.randint(0, 60000, (1, k + 1))
                pos = batch.decode_positions(0, k + 1)
                slots = torch.arange(P + k + 1)
                mask = (slots[None, :] > P + torch.arange(k + 1)[:, None])[None, None]  # causal
                t0 = time.perf_counter()
                model(ids, pos, mask, kv_cache=cache, start=P)
                if r:
                    times[k].append((time.perf_counter() - t0) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {"ms": ms, "ratio": {k: ms[k] / ms[0] for k in DRAFTS}, "threads": torch.get_num_threads(),
            "prompt": prompt, "rounds": rounds}


def grounded_example(rng: random.Random) -> dict[str, str]:
    """A description (an opener, four clauses in random order) and an answer that quotes three of
    its clauses, always in the order fit, color, style."""
    kind = rng.choice(list(TYPES))
    a = {"type": TYPES[kind], "color": rng.choice(COLORS), "material": rng.choice(MATERIALS),
         "style": rng.choice(STYLES), "fit": rng.choice(FITS)}
    words = {k: rng.choice(v) for k, v in WORDS.items()}
    clauses = {k: rng.choice(CLAUSES[k]).format(**a, **words) for k in CLAUSES}
    order = rng.sample(list(CLAUSES), k=4)
    opener = rng.choice(["这款{type}", "一款{type}", "{type}"]).format(**a)
    text = opener + "，" + "，".join(clauses[k] for k in order) + "。"
    return {"content": text, "summary": f"{a['type']}要点：" + "；".join(clauses[k] for k in QUOTED) + "。"}


def accept_part(args, work: Path) -> dict:


    from glmgym.chat.config import GenerationConfig
    from glmgym.chat.generate import generate
    from glmgym.chat.session import load
    from glmgym.chat.speculative import DraftStats
    from glmgym.chat.tokenizer import ChatGLMTokenizer, train_sentencepiece
    from glmgym.chat.tuning.finetune import FinetuneConfig, finetune

    ckpt = work / "grounded" / f"checkpoint-{args.steps}"
    rng = random.Random(0)
    train = [grounded_example(rng) for _ in range(args.train)]
    dev = [grounded_example(rng) for _ in range(args.dev)]
    if not ckpt.exists():
        work.mkdir(parents=True, exist_ok=True)
        data = work / "grounded_train.json"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train), encoding="utf-8")
        lines = [r[k] for r in train for k in ("content", "summary")]
        # pieces of at most two characters, as ChatGLM's are about: a quoted clause is several
        # tokens (with longer pieces this corpus makes each clause one token, nothing to draft)
        model_file = train_sentencepiece(lines, work / "ice_text", vocab_size=600, max_piece_length=2)
        tok = ChatGLMTokenizer(model_file)
        save_small_glm(tok, work / "random-init", layers=4, width=256)
        t0 = time.perf_counter()
        finetune(FinetuneConfig(
            out=str(work / "grounded"), model=str(work / "random-init"), train_file=str(data), method="full",
            prompt_column="content", response_column="summary", batch_size=16, grad_accum=1,
            max_source_length=40, max_target_length=32, learning_rate=1e-3, steps=args.steps,
            save_every=args.steps, device="cpu", precision="fp32", progress=False, log_every=50, seed=0))
        print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.train_only:
        raise SystemExit(0)

    bot = load(str(ckpt), dtype="float32")
    tok = bot.tokenizer
    prompts = [bot.fit_prompt(r["content"], [], GenerationConfig())[0] for r in dev]

    def answer_all(k: int) -> tuple[list[list[int]], DraftStats, float]:
        stats, answers = DraftStats(), []
        gen = GenerationConfig(do_sample=False, max_new_tokens=64, prompt_lookup_num_tokens=k)
        t0 = time.perf_counter()
        for ids in prompts:
            *_, last = generate(bot.model, [ids], gen, eos_id=bot.format.stop_ids, pad_id=tok.pad_id,
                                vocab_limit=tok.vocab_size, stats=stats)
            answers.append(last[0])
        return answers, stats, time.perf_counter() - t0

    answer_all(0)  # warm-up
    plain, _, plain_s = answer_all(0)
    tokens = sum(map(len, plain))
    decoded = tokens - len(plain)  # each answer's first token comes from the prefill
    quoted = sum(tok.decode([t for t in a if t not in bot.format.stop_ids]) == r["summary"]
                 for a, r in zip(plain, dev))
    out = {"dev": len(dev), "tokens": tokens, "decoded": decoded, "exact_answers": quoted,
           "plain_tokens_per_s": tokens / plain_s, "steps": args.steps, "by_k": {}}
    print(f"plain: {tokens / plain_s:.0f} tok/s, {quoted}/{len(dev)} answers equal the reference", flush=True)
    for k in LOOKUPS:
        answers, stats, seconds = answer_all(k)
        if answers != plain:
            raise SystemExit(f"k={k}: the answers differ from plain greedy decoding")
        out["by_k"][k] = {"acceptance": stats.acceptance, "tokens_per_forward": decoded / stats.forwards,
                          "forwards": stats.forwards, "drafted": stats.drafted, "accepted": stats.accepted,
                          "sizes": stats.sizes, "tokens_per_s": tokens / seconds,
                          "speedup": plain_s / seconds}
        print(f"k={k}: acceptance {stats.acceptance:.2f}, {decoded / stats.forwards:.2f} tokens per forward, "
              f"{tokens / seconds:.0f} tok/s ({plain_s / seconds:.2f}x)", flush=True)
    return out


def project(accept: dict, cost: dict) -> dict:
    """The full-size model's speedup: the accept runs' forwards at the cost part's prices."""
    out = {}
    for fmt, c in cost.items():
        ratio = {int(k): v for k, v in c["ratio"].items()}
        out[fmt] = {}
        for k, run in accept["by_k"].items():
            spent = sum(ratio[min(s, max(ratio))] for s in run["sizes"])  # in units of one plain step
            out[fmt][k] = accept["decoded"] / spent  # plain decoding: one step per decoded token
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["cost", "accept", "child"])
    p.add_argument("--model", default="chatglm-6b")
    p.add_argument("--formats", nargs="+", default=["int4", "int8"])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000, help="training steps of the grounded model")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--dev", type=int, default=50)
    p.add_argument("--train-only", action="store_true", help="accept: train the grounded model and stop")
    p.add_argument("--workdir", default="benchmarks/runs")
    p.add_argument("--out", default="benchmarks/results/chat_speculative.json")
    p.add_argument("--dir", help=argparse.SUPPRESS)  # child: the checkpoint
    args = p.parse_args()
    if args.part == "child":
        print(json.dumps(cost_child(Path(args.dir), args.prompt, args.rounds)))
        return

    from glmgym._io import atomic_write_json

    facts = machine_facts()
    kind = facts["torch_cpu_capability"].lower() if not facts.get("simulated_by") else "avx2"
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    entry = results.setdefault("by_cpu", {}).setdefault(kind, {})
    if args.part == "cost":
        base = Path(args.workdir) / "chat_speed" / args.model
        src = base / "random-fp16-28l"
        if not src.exists():
            write_random_checkpoint(src, 28, args.model)
        costs = entry.setdefault("cost", {}).setdefault(args.model, {})
        for fmt in args.formats:
            bits, group, embeddings = FORMATS[fmt]
            qdir = base / f"{fmt}-28l"
            if not qdir.exists():
                quantize_child(src, qdir, bits, group, embeddings)
            line = subprocess.run([sys.executable, __file__, "child", "--dir", str(qdir), "--prompt",
                                   str(args.prompt), "--rounds", str(args.rounds)],
                                  check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            costs[fmt] = json.loads(line) | {"date": time.strftime("%Y-%m-%d")}
            print(fmt, {k: round(v, 2) for k, v in costs[fmt]["ratio"].items()}, flush=True)
    else:
        entry["accept"] = accept_part(args, Path(args.workdir) / "chat_speculative") | {
            "date": time.strftime("%Y-%m-%d")}
    if "accept" in entry and "cost" in entry:
        entry["projected_speedup"] = {m: project(entry["accept"], c) for m, c in entry["cost"].items()}
        print("projected speedup:", json.dumps(entry["projected_speedup"]), flush=True)
    entry["machine"] = facts
    atomic_write_json(out_path, results)


if __name__ == "__main__":
    main()
