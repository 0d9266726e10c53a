"""ChatGLM speed and memory on this machine: glmgym in bf16, INT8 and INT4, and chatglm.cpp.

The model (`--model`: chatglm-6b, chatglm3-6b or glm-4-9b-chat) has the real shapes (ChatGLM-6B:
28 layers, hidden 4096, 32 heads, MLP 16384, vocab 130528; ChatGLM3-6B: the v2 block, 28 layers,
2 key/value groups, SwiGLU 13696, vocab 65024; GLM-4-9B: 40 such layers, vocab 151552) with
random weights: a fp16 checkpoint is written to `--workdir` tensor by tensor, each
tensor drawn from its own seed (so every format and chatglm.cpp convert the same weights). Then,
each in a fresh process:

- `glmgym chat quantize` (quantize_checkpoint) writes the INT8 / INT4 checkpoints: time and peak RSS;
- every format is loaded with `load_model` (as `glmgym chat` does): time, peak RSS while loading,
  resident size; then a `--prompt`-token prefill and `--new` greedy decode steps: tokens/s and peak
  RSS while generating (the peak is reset between the phases through /proc/self/clear_refs);
- chatglm.cpp (`--cpp-python`: a venv with `pip install chatglm-cpp`) converts the same fp16 weights
  to q4_0 / q8_0 with its own converter and runs the same prompt through `generate_next_token`.

The bandwidth bound: bytes of weights read per decoded token (blocks + lm_head) divided by the read
bandwidth measured here (summing a 4 GiB fp32 tensor with all threads: the median of 7 runs; the
best single run varied from 42 to 64 GiB/s between runs of this script, the median is steadier).
`--bounds-only` re-measures the bandwidth and recomputes the bound of every entry in the results.

Results go under `by_cpu[KIND]` of `--out` (ChatGLM-6B; the others under `models[MODEL].by_cpu`),
KIND being `avx2` or `avx512` as PyTorch dispatches here
(`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` measures an AVX-512
machine as `avx2`; build chatglm.cpp with ggml's AVX-512 options off for that run), with the CPU
flags seen; a run replaces only its own kind's entries.

    python benchmarks/chat_speed.py [--formats bf16 int8 int4 int4_rowwise int4_qe int8_qe] \\
        [--cpp-python /path/to/venv/bin/python] [--layers 28] [--prompt 128] [--new 16] [--rounds 3]

`--rounds N` measures every format N times in turn (A, B, A, B, ...) and keeps the median: on a
shared machine the speed drifts by tens of percent within minutes, and turns spread that over all.

The `fp32` entry of the results (if present) comes from an earlier run that timed 1- and 2-layer
fp32 models and extrapolated (28 fp32 layers do not fit in this machine's 24 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

from _machine import reset_peak_rss, status_gb  # beside this script (sys.path[0])

GIB = 2**30
FORMATS = {
    # name: (bits, group_size, embeddings); bf16 is the float baseline
    "bf16": (0, 0, False),
    "int8": (8, 0, False),
    "int4": (4, 128, False),
    "int4_rowwise": (4, 0, False),  # THUDM's scheme
    "int4_qe": (4, 128, True),  # embeddings / lm_head quantized too, as chatglm.cpp does
    "int8_qe": (8, 0, True),  # the same for INT8 (chatglm.cpp's q8_0 quantizes its lm_head too)
}
CPP_TYPES = {"chatglm_cpp_q4_0": "q4_0", "chatglm_cpp_q8_0": "q8_0"}
MODELS = ("chatglm-6b", "chatglm3-6b", "glm-4-9b-chat")
"""`--model` choices: glmgym's config presets of the same names."""


def _tensor(name: str, shape, torch):
    """The random value of one tensor: its own seed, N(0, 0.02); layer norms 1 and 0."""
    if "layernorm" in name:
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g) * 0.02


def write_random_checkpoint(out: Path, layers: int, model: str = "chatglm-6b") -> None:
    """fp16 safetensors shards of ~1 GiB, config.json and a small tokenizer of the model's kind."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from glmgym._io import atomic_dir, atomic_write_json
    from glmgym.chat.checkpoint import build_model
    from glmgym.chat.config import PRESETS
    from glmgym.chat.tiny import tiny_corpus
    from glmgym.chat.tokenizer import train_sentencepiece
    from glmgym.chat.tokenizer_v2 import train_bpe_file, train_sentencepiece_v2

    cfg = dataclasses.replace(PRESETS[model], num_layers=layers)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()
                  if k != "lm_head.weight" and not k.startswith("rope_")}
    with atomic_dir(out) as tmp:
        shard, size, n = {}, 0, 0
        for name, shape in shapes.items():
            shard[name] = _tensor(name, shape, torch).half()
            size += shard[name].numel() * 2
            if size >= GIB:
                n += 1
                save_file(shard, str(tmp / f"model-{n:05d}.safetensors"))
                shard, size = {}, 0
        if shard:
            n += 1
            save_file(shard, str(tmp / f"model-{n:05d}.safetensors"))
        atomic_write_json(tmp / "config.json", cfg.to_dict())
        if cfg.version == 1:
            train_sentencepiece(tiny_corpus(400), tmp / "ice_text")
        elif cfg.family == "glm4":
            train_bpe_file("\n".join(tiny_corpus(100)), tmp / "tokenizer.model", vocab_size=400)
        else:
            train_sentencepiece_v2(tiny_corpus(400), tmp / "tokenizer", vocab_size=1000)


def quantize_child(src: Path, out: Path, bits: int, group: int, embeddings: bool) -> dict:
    from glmgym.chat.checkpoint import quantize_checkpoint

    t0 = time.perf_counter()
    quantize_checkpoint(src, out, bits, group, embeddings)
    return {"quantize_seconds": time.perf_counter() - t0, "quantize_peak_rss_gb": status_gb("VmHWM")}


def measure_child(model_dir: Path, prompt: int, new: int, logits_out: Path) -> dict:
    """Load, prefill, decode; memory and timings."""
    import torch

    from glmgym.chat.checkpoint import load_model
    from glmgym.chat.generate import PromptBatch, decode_one_token, prefill
    from glmgym.chat.model import KVCache

    t0 = time.perf_counter()
    model = load_model(model_dir, torch.bfloat16)
    load_s = time.perf_counter() - t0
    load_peak, resident = status_gb("VmHWM"), status_gb("VmRSS")

    def nbytes(module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    # per decoded token every block weight and the lm_head are read once (the embedding: one row)
    cfg = model.config
    bytes_per_token = nbytes(model.layers) + nbytes(model.get_submodule(cfg.head_name))
    ids = prompt_ids(cfg, prompt)
    causal = cfg.version == 2
    reset_peak_rss()
    with torch.inference_mode():
        cache = KVCache.empty(cfg, 1, prompt + new + 1, torch.bfloat16, "cpu")
        prefill(model, PromptBatch.build([ids[:8]], cfg.pad_token_id, causal=causal), cache)  # warm-up
        batch = PromptBatch.build([ids], cfg.pad_token_id, causal=causal)
        t0 = time.perf_counter()
        logits = prefill(model, batch, cache)
        prefill_s = time.perf_counter() - t0
        torch.save(logits.float().clone(), logits_out)
        token = logits.argmax(-1, keepdim=True)
        decode_one_token(model, token, batch.decode_positions(0), None, cache, prompt)  # warm-up
        t0 = time.perf_counter()
        for i in range(new):
            pos = batch.decode_positions(i)
            token = decode_one_token(model, token, pos, None, cache, prompt + i).argmax(-1, keepdim=True)
        decode_s = (time.perf_counter() - t0) / new
    # which kernel each quantized layer runs (on AVX-512 CPUs a timed choice per layer shape);
    # glmgym's own ("avx2") run their AVX-512 VNNI products where the CPU has them
    from glmgym.chat.kernels import avx2

    backends = Counter(getattr(m, "backend", None) for m in model.modules())
    backends.pop(None, None)
    if backends.get("avx2") and avx2.vnni() is not None:
        backends["avx2 (VNNI products)"] = backends.pop("avx2")
    return {"load_seconds": load_s, "load_peak_rss_gb": load_peak, "resident_gb": resident,
            "generate_peak_rss_gb": status_gb("VmHWM"), "weights_gb": nbytes(model) / GIB,
            "bytes_per_token_gb": bytes_per_token / GIB, "prefill_tokens_per_s": prompt / prefill_s,
            "decode_tokens_per_s": 1.0 / decode_s, "threads": torch.get_num_threads(),
            **({"backends": dict(backends)} if backends else {})}


def prompt_ids(cfg, prompt: int) -> list[int]:
    """The benchmark's prompt: random text ids (seed 0), ending with `[gMASK] <sop>` for v1 (v2
    prompts need nothing at the end). Reads attributes only: chatglm.cpp's venv calls it too."""
    import torch

    g = torch.Generator().manual_seed(0)
    if getattr(cfg, "version", 1) == 1 and hasattr(cfg, "gmask_token_id"):
        text = torch.randint(0, 130000, (prompt - 2,), generator=g).tolist()
        return [*text, cfg.gmask_token_id, cfg.bos_token_id]
    return torch.randint(0, 60000, (prompt,), generator=g).tolist()


def cpp_child(src: Path, ggml_path: Path, ggml_type: str, prompt: int, new: int) -> dict:
    """chatglm.cpp: convert with its own converter (once), then load and time. Imports only what a
    chatglm-cpp venv has (no glmgym)."""
    import types
    from collections.abc import Mapping

    import chatglm_cpp
    import sentencepiece as spm
    from safetensors import safe_open

    result = {"chatglm_cpp_version": getattr(chatglm_cpp, "__version__", "?")}
    raw_config = json.loads((src / "config.json").read_text())
    v2 = "multi_query_group_num" in raw_config
    if not ggml_path.exists():
        from chatglm_cpp.convert import ChatGLM3Converter, ChatGLM4Converter, ChatGLMConverter, GGMLType

        files = sorted(src.glob("model-*.safetensors"))
        where = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                where.update(dict.fromkeys(h.keys(), f))

        class LazyState(Mapping):  # reads one tensor at a time: the converter never holds the model
            def __getitem__(self, name):
                name = "transformer.word_embeddings.weight" if name == "lm_head.weight" else name
                with safe_open(str(where[name]), framework="pt") as h:
                    return h.get_tensor(name)

            def __iter__(self):
                return iter(where)

            def __len__(self):
                return len(where)

        config = types.SimpleNamespace(**raw_config)
        model = types.SimpleNamespace(config=config, state_dict=LazyState)
        glm4 = raw_config.get("glmgym_family") == "glm4"
        if glm4:  # the converter reads the BPE file; it stores one end token
            converter = ChatGLM4Converter
            config.eos_token_id = config.eos_token_id[0]
            tokenizer = types.SimpleNamespace(vocab_file=str(src / "tokenizer.model"))
        elif v2:
            converter = ChatGLM3Converter
            sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
            tokenizer = types.SimpleNamespace(tokenizer=types.SimpleNamespace(sp_model=sp))
        else:
            converter = ChatGLMConverter
            sp = spm.SentencePieceProcessor(model_file=str(src / "ice_text.model"))
            tokenizer = types.SimpleNamespace(sp_tokenizer=types.SimpleNamespace(
                text_tokenizer=types.SimpleNamespace(sp=sp)))
        t0 = time.perf_counter()
        tmp = ggml_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            converter.convert(f, model, tokenizer, GGMLType[ggml_type.upper()])
        tmp.rename(ggml_path)
        result["convert_seconds"] = time.perf_counter() - t0
    reset_peak_rss()
    t0 = time.perf_counter()
    pipe = chatglm_cpp.Pipeline(str(ggml_path), max_length=prompt + new + 8)
    result.update(load_seconds=time.perf_counter() - t0, load_peak_rss_gb=status_gb("VmHWM"),
                  resident_gb=status_gb("VmRSS"), weights_gb=ggml_path.stat().st_size / GIB,
                  bytes_per_token_gb=ggml_path.stat().st_size / GIB)
    ids = prompt_ids(types.SimpleNamespace(version=2 if v2 else 1, **raw_config), prompt)
    gen = chatglm_cpp._C.GenerationConfig()
    gen.max_length, gen.max_new_tokens, gen.do_sample = prompt + new + 8, new + 4, False
    model = pipe.model
    reset_peak_rss()
    model.generate_next_token(ids[:8], None, gen, 0, 8)  # warm-up (a separate context: n_past 0)
    t0 = time.perf_counter()
    nxt = model.generate_next_token(ids, None, gen, 0, len(ids))
    prefill_s = time.perf_counter() - t0
    seq = [*ids, nxt]
    seq.append(model.generate_next_token(seq, None, gen, len(seq) - 1, len(ids)))  # warm-up step
    t0 = time.perf_counter()
    for _ in range(new):
        nxt = model.generate_next_token(seq, None, gen, len(seq) - 1, len(ids))
        seq.append(nxt)
    decode_s = (time.perf_counter() - t0) / new
    result.update(prefill_tokens_per_s=prompt / prefill_s, decode_tokens_per_s=1.0 / decode_s,
                  generate_peak_rss_gb=status_gb("VmHWM"))
    return result


def read_bandwidth_gb_per_s() -> float:
    """Sum a 4 GiB fp32 tensor with all threads; the median of 7 runs, in GiB/s."""
    import statistics

    import torch

    x = torch.ones(GIB, dtype=torch.float32)
    x.sum()
    return x.numel() * 4 / statistics.median(_timed(x.sum) for _ in range(7)) / GIB


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--cpp-python", default=None, help="python of a venv with chatglm-cpp")
    p.add_argument("--model", default="chatglm-6b", choices=MODELS, help="the model's shapes")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the real model's)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=16, help="decoded tokens")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every format this many times, in turn; keep the median")
    p.add_argument("--workdir", default="benchmarks/runs/chat_speed")
    p.add_argument("--out", default="benchmarks/results/chat_speed.json")
    p.add_argument("--bounds-only", action="store_true",
                   help="re-measure the bandwidth and recompute every entry's bound; run nothing else")
    p.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layers is None:
        args.layers = 40 if args.model == "glm-4-9b-chat" else 28
    work = Path(args.workdir) if args.model == "chatglm-6b" else Path(args.workdir) / args.model
    if args._child:
        kind, *rest = args._child
        if kind == "random":
            write_random_checkpoint(Path(rest[0]), args.layers, args.model)
            out = {}
        elif kind == "quantize":
            out = quantize_child(Path(rest[0]), Path(rest[1]), *FORMATS[rest[2]])
        elif kind == "measure":
            out = measure_child(Path(rest[0]), args.prompt, args.new, Path(rest[1]))
        else:
            out = cpp_child(Path(rest[0]), Path(rest[1]), rest[2], args.prompt, args.new)
        print(json.dumps(out))
        return

    def child(*argv: str, python: str = sys.executable) -> dict:
        cmd = [python, __file__, "--model", args.model, "--layers", str(args.layers), "--prompt",
               str(args.prompt), "--new", str(args.new), "--_child", *argv]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import cpu_kind, machine_facts

    out_path = Path(args.out)
    everything = json.loads(out_path.read_text()) if out_path.exists() else {}
    home = everything if args.model == "chatglm-6b" else \
        everything.setdefault("models", {}).setdefault(args.model, {})
    result = home.setdefault("by_cpu", {}).setdefault(cpu_kind(), {})
    print(f"measuring as CPU kind {cpu_kind()!r}")
    bandwidth = read_bandwidth_gb_per_s()
    print(f"read bandwidth: {bandwidth:.1f} GiB/s")
    if args.bounds_only:
        for entry in result.values():
            if isinstance(entry, dict) and "bytes_per_token_gb" in entry:
                entry["bandwidth_gb_per_s"] = bandwidth
                entry["decode_bound_tokens_per_s"] = bandwidth / entry["bytes_per_token_gb"]
                entry["fraction_of_bound"] = entry["decode_tokens_per_s"] / entry["decode_bound_tokens_per_s"]
        from glmgym._io import atomic_write_json

        atomic_write_json(out_path, everything)
        return
    src = work / f"random-fp16-{args.layers}l"
    if not (src / "config.json").exists():
        print(f"writing random fp16 weights to {src} ...", flush=True)
        child("random", str(src))

    def finish(key: str, entry: dict) -> None:
        entry["bandwidth_gb_per_s"] = bandwidth
        entry["decode_bound_tokens_per_s"] = bandwidth / entry["bytes_per_token_gb"]
        entry["fraction_of_bound"] = entry["decode_tokens_per_s"] / entry["decode_bound_tokens_per_s"]
        entry["peak_rss_gb"] = max(entry["load_peak_rss_gb"], entry["generate_peak_rss_gb"])
        entry["layers"] = args.layers
        result[key] = entry
        print(f"{key}: prefill {entry['prefill_tokens_per_s']:.1f} tok/s, decode "
              f"{entry['decode_tokens_per_s']:.2f} tok/s ({entry['fraction_of_bound']:.0%} of the "
              f"{entry['decode_bound_tokens_per_s']:.2f} bound), resident {entry['resident_gb']:.2f} GiB, "
              f"peak {entry['peak_rss_gb']:.2f} GiB", flush=True)
        from glmgym._io import atomic_write_json

        atomic_write_json(out_path, everything)

    ref_logits = work / "logits-bf16.pt"

    def measure_glmgym(name: str) -> dict:
        bits, group, emb = FORMATS[name]
        entry: dict = {"bits": bits or 16, "group_size": group, "quantized_embeddings": emb}
        model_dir = src
        if bits:
            model_dir = work / f"{name}-{args.layers}l"
            if not (model_dir / "config.json").exists():
                entry.update(child("quantize", str(src), str(model_dir), name))
            else:
                entry.update({k: v for k, v in result.get(name, {}).items() if k.startswith("quantize_")})
        logits = work / f"logits-{name}.pt"
        entry.update(child("measure", str(model_dir), str(logits)))
        if ref_logits.exists() and name != "bf16":
            a, b = torch.load(logits), torch.load(ref_logits)
            entry["logits_rel_error_vs_bf16"] = ((a - b).norm() / b.norm()).item()
        return entry

    def measure_cpp(ggml_type: str) -> dict:
        return child("cpp", str(src), str(work / f"{ggml_type}-{args.layers}l.ggml"), ggml_type,
                     python=args.cpp_python)

    jobs = [(name, lambda name=name: measure_glmgym(name)) for name in args.formats]
    if args.cpp_python:
        jobs += [(key, lambda t=ggml_type: measure_cpp(t)) for key, ggml_type in CPP_TYPES.items()]
    # rounds run every job once in turn, so a slow spell of a shared machine hits all of them; each
    # entry keeps its median round (by decode speed) and every round's speeds
    runs: dict[str, list[dict]] = {key: [] for key, _ in jobs}
    for r in range(args.rounds):
        for key, job in jobs:
            try:
                entry = job()
            except RuntimeError as exc:
                if not key.startswith("chatglm_cpp"):
                    raise
                result["chatglm_cpp_error"] = str(exc)[-1000:]
                print(f"{key}: failed: {str(exc)[-500:]}")
                continue
            result.pop("chatglm_cpp_error", None)
            runs[key].append(entry)
            ordered = sorted(runs[key], key=lambda e: e["decode_tokens_per_s"])
            median = dict(ordered[(len(ordered) - 1) // 2])
            median["rounds"] = len(ordered)
            for speed in ("decode_tokens_per_s", "prefill_tokens_per_s"):
                median[f"{speed}_per_round"] = [e[speed] for e in runs[key]]
            print(f"round {r + 1}/{args.rounds} ", end="")
            finish(key, median)
    result["config"] = {"prompt_tokens": args.prompt, "new_tokens": args.new, "layers": args.layers,
                        "date": time.strftime("%Y-%m-%d"), **machine_facts()}
    from glmgym._io import atomic_write_json

    atomic_write_json(out_path, everything)


if __name__ == "__main__":
    main()
