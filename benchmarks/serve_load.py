"""Load on `glmgym chat serve`: throughput and time to first token for 1, 4 and 16 clients.

Each model is served by the real CLI in a subprocess on 127.0.0.1; an asyncio client keeps
`concurrency` streaming chat completions in flight until `--requests` have completed, each asking
for `--max-tokens` tokens (sampled, without a seed, so that the server may batch them), and reads
usage from the last chunk (`stream_options.include_usage`). Models: `random:tiny`, and `mid`, a
random GLM of 8 layers of width 1024 (MLP 4096, 16 heads) over the tiny tokenizer, written to
`--workdir` first.

    python benchmarks/serve_load.py [--concurrency 1 4 16] [--requests 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np


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


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": f"Tell me about topic {i}."}],
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    return {"status": 200, "ttft": first, "seconds": time.perf_counter() - t0,
            "tokens": usage["completion_tokens"] if usage else 0}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="completed requests per measurement")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    p.add_argument("--workdir", default="benchmarks/runs/serve_load")
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = p.parse_args()
    work = Path(args.workdir)
    result: dict = {}
    for name in args.models:
        model = "random:tiny" if name == "tiny" else str(write_mid_model(work / "mid"))
        port = _free_port()
        cmd = [sys.executable, "-m", "glmgym.cli", "chat", "serve", "--model", model, "--port", str(port),
               "--max-queue", str(max(args.concurrency) * 2), "--no-ui", "--dtype", "float32"]
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start: {server.stdout.read()[-2000:]}")
                time.sleep(0.2)
            runs = []
            for c in args.concurrency:
                r = asyncio.run(load(url, c, args.requests, args.max_tokens))
                runs.append(r)
                print(f"{name} x{c}: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, "
                      f"TTFT p50 {r['ttft_p50_s']:.3f} s p95 {r['ttft_p95_s']:.3f} s", flush=True)
            result[name] = {"model": model, "runs": runs}
        finally:
            server.terminate()
            server.wait(30)
    import torch

    result["config"] = {"max_tokens": args.max_tokens, "requests": args.requests, "dtype": "float32",
                        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                        "note": "server and client share this machine's CPUs"}
    from glmgym._io import atomic_write_json

    atomic_write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
