"""Load on `glmgym chat serve`: throughput and time to first token for 1, 4 and 16 clients.

Each model is served by the real CLI in a subprocess on 127.0.0.1; an asyncio client keeps
`concurrency` streaming chat completions in flight until `--requests` have completed, each asking
for `--max-tokens` tokens (sampled, without a seed, so that the server may batch them), and reads
usage from the last chunk (`stream_options.include_usage`). Models: `random:tiny`, and `mid`, a
random GLM of 8 layers of width 1024 (MLP 4096, 16 heads) over the tiny tokenizer, written to
`--workdir` first.

`--short-under-long R` measures, on the mid model, the time to first token of a short streamed
request alone and sent 0.3 s after a ~720-token prompt (R rounds each; medians), and checks that a
non-streamed answer to a prompt that spans several prefill steps equals the streamed one.

`--soak-seconds S` then keeps `--soak-concurrency` clients busy on the mid model for S seconds and
records the server's resident memory (VmRSS) every 10 s, and how every request ended.

    python benchmarks/serve_load.py [--concurrency 1 4 16] [--requests 32] [--max-tokens 32]
        [--max-batch N] [--short-under-long 5] [--soak-seconds 600 --soak-concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_facts, status_gb


def write_mid_model(out: Path) -> Path:
    import torch

    from glmgym.chat.checkpoint import save_model
    from glmgym.chat.model import GLMModel
    from glmgym.chat.tiny import build_tiny, tiny_corpus
    from glmgym.chat.tokenizer import train_sentencepiece

    if (out / "config.json").exists():
        return out
    tiny, _ = build_tiny()
    cfg = dataclasses.replace(tiny.config, hidden_size=1024, num_layers=8, num_attention_heads=16,
                              inner_hidden_size=4096, max_sequence_length=1024)
    torch.manual_seed(0)
    model = GLMModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                # tied embeddings of std 0.02 at width 1024 make a random model repeat its input token
                # (which decodes to nothing here); a smaller std keeps its output varied
                p.normal_(0, 0.002 if "word_embeddings" in name else 0.02)
            elif name.endswith("bias"):
                p.zero_()
    save_model(model, out)
    train_sentencepiece(tiny_corpus(seed=0), out / "ice_text")  # the tokenizer build_tiny trains
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 20  # 723 tokens on the tiny tokenizer


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int, content: str | None = None,
                      logprobs: bool = False) -> dict:
    """One streamed chat completion. `ttft`: the first chunk with text; with `logprobs`, also
    `first_token_s`: the first chunk with a token (a token can decode to no text yet)."""
    content = f"Tell me about topic {i}." if content is None else content
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "logprobs": logprobs,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = first_token = None
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": "stream error", "message": chunk["error"]["message"]}
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"]:
                choice = chunk["choices"][0]
                if first_token is None and (choice["delta"].get("content") or choice.get("logprobs")):
                    first_token = time.perf_counter() - t0
                if first is None and choice["delta"].get("content"):
                    first = time.perf_counter() - t0
    return {"status": 200, "ttft": first, "first_token_s": first_token, "seconds": time.perf_counter() - t0,
            "tokens": usage["completion_tokens"] if usage else 0,
            "prompt_tokens": usage["prompt_tokens"] if usage else 0}


async def plain_vs_streamed(client: httpx.AsyncClient, content: str) -> dict:
    """The same seeded request non-streamed and streamed: content, finish reason and usage."""
    body = {"model": "m", "max_tokens": 8, "temperature": 1.0, "seed": 7,
            "messages": [{"role": "user", "content": content}]}
    plain = (await client.post("/v1/chat/completions", json=body)).json()
    got = {"content": plain["choices"][0]["message"]["content"],
           "finish_reason": plain["choices"][0]["finish_reason"], "usage": plain["usage"]}
    streamed = {"content": "", "finish_reason": None, "usage": None}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                streamed["usage"] = chunk.get("usage") or streamed["usage"]
                for c in chunk["choices"]:
                    streamed["content"] += c["delta"].get("content") or ""
                    streamed["finish_reason"] = c["finish_reason"] or streamed["finish_reason"]
    return {"plain": got, "streamed": streamed, "equal": got == streamed}


async def short_under_long(url: str, rounds: int) -> dict:
    """A short request's time to first token alone and sent 0.3 s after a long prompt (medians);
    and non-streamed answers against streamed ones for prompts of 74 and 723 tokens."""
    alone, under, long_done, long_prompt = [], [], [], 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_request(client, 10_000, 4)  # warm-up
        for r in range(rounds):
            alone.append(await one_request(client, r, 4, logprobs=True))
            long_task = asyncio.create_task(one_request(client, 0, 4, LONG_PROMPT))
            await asyncio.sleep(0.3)
            under.append(await one_request(client, 100 + r, 4, logprobs=True))
            long_r = await long_task
            long_done.append(long_r["seconds"])
            long_prompt = long_r["prompt_tokens"]
        checks = {}
        for repeats in (2, 20):
            text = "the quick brown fox jumps over the lazy dog " * repeats
            check = await plain_vs_streamed(client, text)
            checks[str(check["plain"]["usage"]["prompt_tokens"])] = check

    def median(runs: list[dict], key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return float(np.median(values)) if values else None

    a, u = median(alone, "first_token_s"), median(under, "first_token_s")
    return {"rounds": rounds, "long_prompt_tokens": long_prompt, "short_sent_after_s": 0.3,
            "first_token_alone_s": a, "first_token_under_long_s": u, "ratio": u / a,
            "first_text_alone_s": median(alone, "ttft"), "first_text_under_long_s": median(under, "ttft"),
            "first_token_alone_per_round": [r["first_token_s"] for r in alone],
            "first_token_under_long_per_round": [r["first_token_s"] for r in under],
            "first_text_alone_per_round": [r["ttft"] for r in alone],
            "first_text_under_long_per_round": [r["ttft"] for r in under],
            "long_request_seconds_per_round": long_done,
            "plain_vs_streamed": checks}


async def load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    counter = iter(range(requests))

    async def worker(client):
        for i in counter:
            results.append(await one_request(client, i, max_tokens))

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_request(client, 10_000, 4)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": requests, "completed": len(ok),
            "rejected": len(results) - len(ok), "wall_seconds": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else None,
            "ttft_p95_s": float(np.percentile(ttft, 95)) if ttft else None,
            "mean_completion_tokens": tokens / max(len(ok), 1)}


async def soak(url: str, pid: int, concurrency: int, seconds: float, max_tokens: int) -> dict:
    """`concurrency` clients in a loop for `seconds`; the server's RSS every 10 s."""
    outcomes: dict[str, int] = {}
    tokens = 0
    deadline = time.perf_counter() + seconds
    rss = [(0.0, status_gb("VmRSS", pid))]

    async def worker(client, w):
        nonlocal tokens
        i = 0
        while time.perf_counter() < deadline:
            try:
                r = await one_request(client, w * 1_000_000 + i, max_tokens)
            except httpx.HTTPError as exc:
                r = {"status": type(exc).__name__}
            outcomes[str(r["status"])] = outcomes.get(str(r["status"]), 0) + 1
            tokens += r.get("tokens", 0)
            i += 1

    async def sampler():
        t0 = time.perf_counter()
        while time.perf_counter() < deadline:
            await asyncio.sleep(10)
            rss.append((time.perf_counter() - t0, status_gb("VmRSS", pid)))

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(sampler(), *(worker(client, w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    rss.append((wall, status_gb("VmRSS", pid)))
    return {"concurrency": concurrency, "seconds": wall, "outcomes": outcomes, "tokens_per_s": tokens / wall,
            "rss_start_gb": rss[0][1], "rss_end_gb": rss[-1][1], "rss_max_gb": max(r for _, r in rss),
            "rss_samples": [[round(t, 1), round(r, 4)] for t, r in rss]}


class Server:
    """`glmgym chat serve` in a subprocess on a free loopback port (PYTHONPATH=`src`: another
    checkout's glmgym, for a before/after comparison)."""

    def __init__(self, model: str, max_queue: int, max_batch: int | None, src: str | None = None,
                 threads: int | None = None) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        cmd = [sys.executable, "-m", "glmgym.cli", "chat", "serve", "--model", model,
               "--port", self.url.rsplit(":", 1)[1], "--max-queue", str(max_queue), "--no-ui",
               "--dtype", "float32"]
        if max_batch:
            cmd += ["--max-batch", str(max_batch)]
        env = {**os.environ, **({"PYTHONPATH": src} if src else {})}
        if threads:  # read by PyTorch at start-up, so that the baseline (no --threads flag) gets it too
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)

    def __enter__(self) -> Server:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise SystemExit(f"server did not start: {self.proc.stdout.read()[-2000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def _median_runs(rounds: list[list[dict]]) -> list[dict]:
    """Per concurrency: the median of each figure over the rounds, and the per-round values."""
    out = []
    for runs in zip(*rounds):
        keys = ("tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p95_s")
        merged = {**runs[0], **{k: float(np.median([r[k] for r in runs])) for k in keys}}
        merged.update({f"{k}_per_round": [r[k] for r in runs] for k in keys})
        merged["completed"] = sum(r["completed"] for r in runs)
        merged["rejected"] = sum(r["rejected"] for r in runs)
        out.append(merged)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="completed requests per measurement")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--models", nargs="*", default=["tiny", "mid"], choices=["tiny", "mid"])
    p.add_argument("--workdir", default="benchmarks/runs/serve_load")
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    p.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: its own)")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch threads of every server (OMP_NUM_THREADS; default: PyTorch's)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every measurement; medians are reported")
    p.add_argument("--baseline-src", default=None, metavar="DIR",
                   help="also serve from this checkout's src/ (its default options), interleaved by round")
    p.add_argument("--short-under-long", type=int, default=0, metavar="ROUNDS",
                   help="a short request's TTFT alone and under a long prompt, on the mid model (0: skip)")
    p.add_argument("--soak-seconds", type=float, default=0, help="then a soak on the mid model (0: none)")
    p.add_argument("--soak-concurrency", type=int, default=8)
    args = p.parse_args()
    work = Path(args.workdir)
    max_queue = max(args.concurrency) * 2
    result: dict = {}
    variants = [("glmgym", None, args.max_batch)]
    if args.baseline_src:
        variants.append(("baseline", str(Path(args.baseline_src).resolve()), None))
    for name in args.models:
        model = "random:tiny" if name == "tiny" else str(write_mid_model(work / "mid"))
        rounds: dict[str, list[list[dict]]] = {label: [] for label, *_ in variants}
        for _ in range(args.rounds):
            for label, src, max_batch in variants:  # interleaved: drifts in machine speed hit both
                with Server(model, max_queue, max_batch, src, args.threads) as server:
                    runs = []
                    for c in args.concurrency:
                        r = asyncio.run(load(server.url, c, args.requests, args.max_tokens))
                        runs.append(r)
                        print(f"{label} {name} x{c}: {r['requests_per_s']:.2f} req/s, "
                              f"{r['tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_s']:.3f} s "
                              f"p95 {r['ttft_p95_s']:.3f} s", flush=True)
                    rounds[label].append(runs)
        result[name] = {"model": model, "runs": _median_runs(rounds["glmgym"])}
        if args.baseline_src:
            result.setdefault("baseline", {"src": args.baseline_src})[name] = {
                "model": model, "runs": _median_runs(rounds["baseline"])}
    if args.short_under_long:
        model = str(write_mid_model(work / "mid"))
        for label, src, max_batch in variants:
            with Server(model, max_queue, max_batch, src, args.threads) as server:
                r = asyncio.run(short_under_long(server.url, args.short_under_long))
            equal = {n: c["equal"] for n, c in r["plain_vs_streamed"].items()}
            print(f"{label} mid short under a {r['long_prompt_tokens']}-token prompt: first token "
                  f"{r['first_token_under_long_s']:.3f} s vs {r['first_token_alone_s']:.3f} s alone "
                  f"({r['ratio']:.2f}x); plain == streamed by prompt tokens: {equal}", flush=True)
            result.setdefault("short_under_long", {})[label] = r
    if args.soak_seconds:
        mid = str(write_mid_model(work / "mid"))
        with Server(mid, max_queue, args.max_batch, None, args.threads) as server:
            r = asyncio.run(soak(server.url, server.proc.pid, args.soak_concurrency, args.soak_seconds,
                                 args.max_tokens))
        print(f"soak x{args.soak_concurrency} {r['seconds']:.0f} s: {r['outcomes']}, RSS "
              f"{r['rss_start_gb']:.3f} -> {r['rss_end_gb']:.3f} GiB (max {r['rss_max_gb']:.3f})", flush=True)
        result["soak"] = r
    result["config"] = {"max_tokens": args.max_tokens, "requests": args.requests, "dtype": "float32",
                        "max_batch": args.max_batch or "server default", "rounds": args.rounds,
                        "threads": args.threads or "PyTorch's default",
                        "date": time.strftime("%Y-%m-%d"), **machine_facts(),
                        "note": "server and client share this machine's CPUs"}
    from glmgym._io import atomic_write_json

    atomic_write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
