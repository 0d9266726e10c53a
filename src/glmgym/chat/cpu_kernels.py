"""glmgym's AVX2 low-bit matmul kernels: build once with the system C compiler, call through ctypes.

PyTorch's packed low-bit CPU kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) are
vectorized for AVX-512 only; on AVX2 CPUs they run a generic path about 2x slower than
llama.cpp-style integer dot products. `kernels/lowbit_avx2.c` implements those (see its header).
It has no Python or torch headers, so it compiles in about a second, with `$CC` (default `cc`),
into `$GLMGYM_CACHE/kernels` (default `~/.cache/glmgym/kernels`), named by the hash of its source
and flags. Without a compiler nothing breaks: `load()` returns None, `unavailable_reason()` says
why, and the quantized layers use PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

__all__ = ["bf16_matmul", "load", "q4_matmul", "q8_matmul", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("kernels") / "lowbit_avx2.c"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC"]
_reason: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("GLMGYM_CACHE") or Path.home() / ".cache" / "glmgym"
    return Path(root) / "kernels"


def _build(compiler: str, flags: list[str], out: Path) -> str | None:
    """Compile into a temp file beside `out`, then rename (concurrent builders never see half a
    file). Returns the compiler's complaint, or None on success."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        try:
            proc = subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        except OSError as exc:  # $CC names no runnable program
            return exc.strerror or str(exc)
        if proc.returncode:
            return (proc.stderr.strip().splitlines() or ["failed"])[-1]
        os.replace(tmp, out)
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None when they cannot be built here."""
    global _reason
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _reason = "no C compiler found (set $CC or install gcc)"
        return None
    source = _SOURCE.read_bytes()
    # with OpenMP first (threads from torch's own libgomp), then single-threaded (e.g. a clang
    # without libomp)
    for flags in ([*_FLAGS, "-fopenmp"], _FLAGS):
        tag = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"lowbit_avx2-{tag}.so"
        error = None if path.exists() else _build(compiler, flags, path)
        if error is None:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                error = str(exc)
            else:
                _declare(lib)
                return lib
    _reason = f"{compiler} could not build {_SOURCE.name}: {error}"
    return None


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None when the kernels are available or not yet tried)."""
    return _reason


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.glmgym_q4_matmul.argtypes = [p, i32, i64, i64, p, p, p, i64, i64, p, i32]
    lib.glmgym_q8_matmul.argtypes = [p, i32, i64, i64, p, p, i64, p, i32]
    lib.glmgym_bf16_matmul.argtypes = [p, i64, i64, p, i64, p, i32]
    for f in (lib.glmgym_q4_matmul, lib.glmgym_q8_matmul, lib.glmgym_bf16_matmul):
        f.restype = i32


def _acts(x: torch.Tensor) -> torch.Tensor:
    """[M, K] activations in a layout the kernels read: contiguous fp32 or bf16."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return x.contiguous()


def _check(rc: int, name: str) -> None:
    if rc:
        raise RuntimeError(f"{name} failed ({'out of memory' if rc == -1 else 'bad shape'})")


def q4_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """[M, K] @ a q4 weight -> [M, N] fp32.

    Args:
        x: [M, K] activations (fp32 or bf16; others are converted).
        weight: uint8 [N, K/2] in blocks of 32 columns (see `pack_q4_blocks`).
        scale: fp32 [N, K/group_size]; zero: fp32 [N, K/group_size] (w = code * scale + zero).
        group_size: a multiple of 32 dividing K.
    """
    lib = load()
    x = _acts(x)
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    rc = lib.glmgym_q4_matmul(x.data_ptr(), x.dtype == torch.bfloat16, M, K, weight.data_ptr(),
                              scale.data_ptr(), zero.data_ptr(), N, group_size, y.data_ptr(),
                              torch.get_num_threads())
    _check(rc, "q4_matmul")
    return y


def q8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[M, K] @ an int8 [N, K] weight with fp32 per-row `scale` [N] -> [M, N] fp32."""
    lib = load()
    x = _acts(x)
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    rc = lib.glmgym_q8_matmul(x.data_ptr(), x.dtype == torch.bfloat16, M, K, weight.data_ptr(),
                              scale.data_ptr(), N, y.data_ptr(), torch.get_num_threads())
    _check(rc, "q8_matmul")
    return y


def bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[M, K] @ a bf16 [N, K] weight -> [M, N] fp32, at memory speed for small M (the lm_head)."""
    lib = load()
    x = x.float().contiguous()
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    rc = lib.glmgym_bf16_matmul(x.data_ptr(), M, K, weight.data_ptr(), N, y.data_ptr(),
                                torch.get_num_threads())
    _check(rc, "bf16_matmul")
    return y
