"""The faster of two CPU kernels for a quantized layer's shape, timed once per machine and cached.

On AVX2-only CPUs glmgym's own kernels (`kernels.avx2`) are about 2x faster than PyTorch's, which
are vectorized for AVX-512 only, so the choice there is fixed. On AVX-512 CPUs neither is known in
advance to win: PyTorch's kernels use the wider vectors, glmgym's AVX2 kernels the integer dot
product and fewer bytes per token (on a 2-core AVX-512 EPYC glmgym's won every ChatGLM-6B shape,
INT4 by 1.2-1.6x, INT8 by 1.02-1.13x). There `quantize.select_backend` asks this module, which times
both on a layer of the shape at one row (a decoded token: where a chat spends its time), cycling
through enough copies of it that the weights come from memory as in decoding, picks the faster and
remembers it in `$GLMGYM_CACHE/kernel_choice.json` (default `~/.cache/glmgym`), keyed by the CPU's
model name, its capability, PyTorch's version, a digest of glmgym's kernel source and the thread
count. A later load reads the choice back instead of timing again.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from glmgym._io import atomic_write_json
from glmgym.chat.kernels import avx2

__all__ = ["cache_path", "choose", "copies_to_stream", "machine_key"]

ROUNDS = 7
"""Interleaved timing rounds per candidate. The fastest round counts: work beside a load (or a
thread descheduled mid-call) only ever adds time, so the minimum is the kernel's own cost."""
CALLS = 3
"""Kernel calls per round."""


def cache_path() -> Path:
    """Where the choices are kept: `$GLMGYM_CACHE/kernel_choice.json`."""
    root = os.environ.get("GLMGYM_CACHE") or Path.home() / ".cache" / "glmgym"
    return Path(root) / "kernel_choice.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs; 32 MiB where it cannot be read)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 * 2**20)


def copies_to_stream(layer_bytes: int) -> int:
    """How many copies of a layer make its timing read memory, not cache, as decoding does (each
    layer's weights are read once a token): together twice the last-level cache, at most 64."""
    return max(1, min(64, -(-2 * last_level_cache_bytes() // max(layer_bytes, 1))))


def machine_key(capability: str) -> str:
    """What a timing holds for: the CPU model, its capability, PyTorch's version, glmgym's kernels
    (a digest of their source: a changed kernel is timed again, and whether the AVX-512 VNNI products
    run), the threads."""
    kernels = avx2.source_digest() + (" vnni" if avx2.vnni() is not None else "")
    return (f"{_cpu_model()} | {capability} | torch {torch.__version__} | glmgym kernels "
            f"{kernels} | {torch.get_num_threads()} threads")


def _read() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: time again and write a fresh one
        return {}
    return data if isinstance(data, dict) else {}


def choose(machine: str, layer: str, candidates: dict[str, Callable[[], Callable[[], object]]],
           timer: Callable[[], float] = time.perf_counter) -> str:
    """The name of the fastest candidate for `layer` on `machine`, timed once and cached.

    Args:
        machine: `machine_key(...)`.
        layer: the layer's shape and format, e.g. "int8 4096x16384 g0".
        candidates: name -> a builder that makes the layer in that kernel's layout and returns a
            call that runs it once (built only when the choice is not cached).
        timer: the clock (tests pass a scripted one).

    Returns:
        A key of `candidates`. A cached choice that is no longer among them is timed again.
    """
    layers = _read().get(machine)
    cached = layers.get(layer) if isinstance(layers, dict) else None
    if isinstance(cached, dict) and cached.get("choice") in candidates:
        return cached["choice"]
    calls = {name: build() for name, build in candidates.items()}
    for call in calls.values():  # warm: first-touch page faults, lazy kernel setup
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():  # interleaved, so that a busy spell hits both
            t0 = timer()
            for _ in range(CALLS):
                call()
            times[name].append(timer() - t0)
    best = min(times, key=lambda name: min(times[name]))
    data = _read()  # again: another process may have added its own choices meanwhile
    # the winner, and each candidate's time a call in microseconds (for whoever wonders why)
    if not isinstance(data.get(machine), dict):
        data[machine] = {}
    data[machine][layer] = {
        "choice": best, "us_per_call": {name: round(min(t) / CALLS * 1e6, 1) for name, t in times.items()}}
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_path(), data)
    except OSError:  # a read-only home: choose again next time
        pass
    return best
