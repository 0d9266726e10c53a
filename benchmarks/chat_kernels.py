"""Time glmgym's low-bit products per ChatGLM-6B layer shape and rows of activations, against PyTorch's.

For each shape (K x N: query-key-value, attention output, the two MLP layers), each format (INT4 in
groups of 128, INT8 in rows) and each row count M (1: a decoded token; 2-9: a token and its drafts
in speculative decoding, or a batch of decoding rows; 128: a prefill), the microseconds of one
product, in turns over the kernels:

- `avx2`: glmgym's AVX2 products (`lowbit_avx2.c`);
- `vnni`: glmgym's AVX-512 VNNI products (`lowbit_avx512.c`; only where the CPU has them);
- `torch`: PyTorch's packed kernel (`_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`).

Each call runs on the next of enough copies of the layer that its weights come from memory, as in
decoding (`kernel_choice.copies_to_stream`); the fastest of `--rounds` rounds counts. Results go
under `by_cpu[KIND]` of `--out`, with the CPU flags seen.

    python benchmarks/chat_kernels.py [--rows 1 2 3 5 9 128] [--formats int4 int8] [--rounds 7]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_kind, machine_facts
from glmgym._io import atomic_write_json
from glmgym.chat import kernel_choice, quantize
from glmgym.chat.kernels import avx2

SHAPES = {"qkv": (4096, 12288), "dense": (4096, 4096), "h_to_4h": (4096, 16384), "4h_to_h": (16384, 4096)}
FORMATS = {"int4": (4, 128), "int8": (8, 0)}


def _use_vnni(on: bool) -> None:
    os.environ["GLMGYM_KERNELS"] = "" if on else "avx2"
    avx2.vnni.cache_clear()
    avx2.vnni()  # looked up here, outside the timing


def _layers(bits: int, group: int, K: int, N: int, backend: str) -> list[quantize.QuantizedLinear]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen) * 0.02
    t = quantize.quantize_weight(w, bits, group)
    nbytes = sum(v.numel() * v.element_size() for v in t.values())
    cpu = torch.device("cpu")
    # each copy built as a load builds it (the kernels' tiles on huge pages), each read from memory
    return [quantize.QuantizedLinear(K, N, bits, group, backend,
                                     quantize._backend_tensors(t, backend, bits, group, torch.bfloat16, cpu),
                                     None)
            for _ in range(kernel_choice.copies_to_stream(nbytes))]


def time_shape(bits: int, group: int, K: int, N: int, rows: list[int], rounds: int,
               kernels: list[str]) -> dict[str, dict[int, float]]:
    """us per product for each kernel and row count (fastest round of 3 calls each)."""
    torch_name = "int4pack" if bits == 4 else "int8pack"
    built = {"avx2": _layers(bits, group, K, N, "avx2")}
    if "torch" in kernels:
        built["torch"] = _layers(bits, group, K, N, torch_name)
    out: dict[str, dict[int, float]] = {k: {} for k in kernels}
    for M in rows:
        x = torch.randn(M, K).to(torch.bfloat16)
        turns = {k: itertools.cycle(built["torch" if k == "torch" else "avx2"]) for k in kernels}
        best = {k: float("inf") for k in kernels}
        for r in range(rounds + 1):  # round 0 warms up
            for k in kernels:
                if k != "torch":
                    _use_vnni(k == "vnni")
                t0 = time.perf_counter()
                for _ in range(3):
                    next(turns[k]).matmul(x)
                if r:
                    best[k] = min(best[k], (time.perf_counter() - t0) / 3 * 1e6)
        for k in kernels:
            out[k][M] = round(best[k], 1)
        print(f"  M={M}: " + ", ".join(f"{k} {best[k]:.0f} us" for k in kernels), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 5, 9, 128])
    p.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=["int4", "int8"])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch's kernels out")
    p.add_argument("--out", default="benchmarks/results/chat_kernels.json")
    args = p.parse_args()
    if avx2.load() is None:
        sys.exit(f"glmgym's kernels do not build here: {avx2.unavailable_reason()}")
    kernels = ["avx2"] + (["vnni"] if avx2.vnni() is not None else [])
    if not args.no_torch and cpu_kind() == "avx512":
        kernels.append("torch")
    results: dict[str, dict] = {}
    for fmt in args.formats:
        bits, group = FORMATS[fmt]
        for name in args.shapes:
            K, N = SHAPES[name]
            print(f"{fmt} {name} ({K}x{N})", flush=True)
            results[f"{fmt} {name}"] = {"K": K, "N": N, "us": time_shape(bits, group, K, N, args.rows,
                                                                      args.rounds, kernels)}
    out_path = Path(args.out)
    data = json.loads(out_path.read_text()) if out_path.exists() else {}
    data.setdefault("by_cpu", {})[cpu_kind()] = {
        "layers": results, "rows": args.rows, "rounds": args.rounds,
        "date": time.strftime("%Y-%m-%d"), "machine": machine_facts()}
    atomic_write_json(out_path, data)


if __name__ == "__main__":
    main()
