"""glmgym's x86 low-bit matmul kernels: build once with the system C compiler, call through ctypes.

PyTorch's packed low-bit CPU kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) are
vectorized for AVX-512 only; on AVX2 CPUs they run a generic path about 2x slower than
llama.cpp-style integer dot products. `lowbit_avx2.c` beside this module implements those (see its
header). On CPUs with AVX-512 VNNI the three low-bit products (q4, q8 in tiles and in rows) run
`lowbit_avx512.c` instead: the same layouts and activations, `vpdpbusd` dot products, and several
activation rows per read of the weights (`vnni()`; `GLMGYM_KERNELS=avx2` keeps the AVX2 products).
The files have no Python or torch headers, so each compiles in about a second, with `$CC`
(default `cc`), into `$GLMGYM_CACHE/kernels` (default `~/.cache/glmgym/kernels`), named by the hash
of its sources and flags. Without a compiler nothing breaks: `load()` returns None,
`unavailable_reason()` says why, and the quantized layers use PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import torch

from glmgym._io import atomic_path
from glmgym.devices import cpu_capability

__all__ = ["TILE_ROWS", "attend_decode", "bf16_matmul", "epilogue", "hugepage_copy", "load", "pack_int4",
           "q4_matmul", "q8_matmul", "source_digest", "tile_q4", "tile_q8", "unavailable_reason",
           "unpack_int4", "vnni"]

_SOURCE = Path(__file__).with_name("lowbit_avx2.c")
_SOURCE_VNNI = Path(__file__).with_name("lowbit_avx512.c")
_HEADER = Path(__file__).with_name("lowbit_common.h")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC"]
_FLAGS_VNNI = [*_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
_reason: str | None = None
TILE_ROWS = 4  # ROWS in kernels/lowbit_common.h: output rows per tile of a q4 or q8 weight
_CHUNK_ROWS = 4096  # rows repacked at a time: bounds the temporaries for embedding-sized weights


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] nibbles (int8 in -8..7, or uint8 in 0..15) -> [N, K/2], even column in the high nibble."""
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 input gives signed nibbles, uint8 gives 0..15. [N, K/2] -> [N, K]."""
    if packed.dtype == torch.int8:
        high, low = packed >> 4, (packed << 4) >> 4  # arithmetic shifts sign-extend
    else:
        high, low = packed >> 4, packed & 0x0F
    return torch.stack((high, low), dim=-1).flatten(-2)  # [N, K/2, 2] -> [N, K]


_HUGE_PAGE = 2 << 20


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` that Linux may back with 2 MiB pages: fresh anonymous memory,
    aligned to 2 MiB and advised `MADV_HUGEPAGE` before the copy touches it. Elsewhere, or under
    2 MiB, a plain copy.

    The kernels stream every weight once per decoded token; through 4 KiB pages each 4 KiB costs a
    TLB miss. On a 2-core AVX2 EPYC whose THP is in `madvise` mode (the common default) ChatGLM-6B's
    INT4 blocks then took 207-217 ms a token against 219-226, and a token 296-309 ms against
    309-318 (3 interleaved runs). A fresh mapping is used because PyTorch's allocator may hand out
    heap memory that is already touched, which advice no longer changes (0.99 of the 3.27 GB
    of weights stayed on small pages that way).
    """
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    if not sys.platform.startswith("linux") or nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t.clone()
    # private: a shared anonymous mapping is shmem, whose huge pages follow another switch
    area = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)  # advice only: with THP off nothing changes
    pad = -torch.frombuffer(area, dtype=torch.uint8, count=1).data_ptr() % _HUGE_PAGE
    # the tensor's storage keeps `area` alive; the mapping goes with the last reference
    out = torch.frombuffer(area, dtype=torch.uint8, count=nbytes, offset=pad)
    return out.view(t.dtype).view(t.shape).copy_(t)


@cache
def source_digest() -> str:
    """The first 12 hex digits of the sha256 of the kernels' C sources (both files and their header)."""
    return hashlib.sha256(b"".join(f.read_bytes() for f in (_SOURCE, _SOURCE_VNNI, _HEADER))).hexdigest()[:12]


def _cache_dir() -> Path:
    root = os.environ.get("GLMGYM_CACHE") or Path.home() / ".cache" / "glmgym"
    return Path(root) / "kernels"


def _build(compiler: str, source: Path, flags: list[str], out: Path) -> str | None:
    """Compile into a temp file beside `out`, then rename (concurrent builders never see half a
    file). Returns the compiler's complaint, or None on success."""
    try:
        with atomic_path(out, suffix=".so.tmp") as tmp:
            proc = subprocess.run([compiler, *flags, str(source), "-o", str(tmp)], capture_output=True,
                                  text=True)
            if proc.returncode:
                raise _BuildFailed((proc.stderr.strip().splitlines() or ["failed"])[-1])
    except OSError as exc:  # $CC names no runnable program
        return exc.strerror or str(exc)
    except _BuildFailed as exc:
        return str(exc)
    return None


class _BuildFailed(Exception):
    pass


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _library(compiler: str, source: Path, flags: list[str]) -> tuple[ctypes.CDLL | None, str | None]:
    """`source` built with `flags` (cached by the hash of the sources, compiler and flags) and
    loaded, with OpenMP first (threads from torch's own libgomp), then single-threaded (e.g. a clang
    without libomp). Returns the library, or None and the last complaint."""
    sources = source.read_bytes() + _HEADER.read_bytes()
    error = None
    for fl in ([*flags, "-fopenmp"], flags):
        tag = hashlib.sha256(sources + " ".join([compiler, *fl]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"{source.stem}-{tag}.so"
        error = None if path.exists() else _build(compiler, source, fl, path)
        if error is None:
            try:
                return ctypes.CDLL(str(path)), None
            except OSError as exc:
                error = str(exc)
    return None, error


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None when they cannot be built here."""
    global _reason
    compiler = _compiler()
    if compiler is None:
        _reason = "no C compiler found (set $CC or install gcc)"
        return None
    lib, error = _library(compiler, _SOURCE, _FLAGS)
    if lib is None:
        _reason = f"{compiler} could not build {_SOURCE.name}: {error}"
        return None
    _declare(lib)
    return lib


@cache
def vnni() -> ctypes.CDLL | None:
    """The AVX-512 VNNI products (`lowbit_avx512.c`), or None: where CPUID lacks AVX-512 F/BW/VL or
    VNNI, where PyTorch is told to act as an AVX2 machine (`ATEN_CPU_CAPABILITY=avx2`, to measure
    one), where `GLMGYM_KERNELS=avx2`, or where the compiler cannot build them (the AVX2 products
    then serve)."""
    base = load()
    if (base is None or not base.glmgym_cpu_has_avx512_vnni() or not cpu_capability().startswith("AVX512")
            or os.environ.get("GLMGYM_KERNELS", "").lower() == "avx2"):
        return None
    lib, _ = _library(_compiler(), _SOURCE_VNNI, _FLAGS_VNNI)
    if lib is not None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.glmgym_q4_matmul_vnni.argtypes = [p, i32, i64, i64, p, p, p, i64, i64, p, i32]
        lib.glmgym_q8t_matmul_vnni.argtypes = [p, i32, i64, i64, p, p, i64, p, i32]
        lib.glmgym_q8_matmul_vnni.argtypes = [p, i32, i64, i64, p, p, i64, p, i32]
        for f in (lib.glmgym_q4_matmul_vnni, lib.glmgym_q8t_matmul_vnni, lib.glmgym_q8_matmul_vnni):
            f.restype = i32
    return lib


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None when the kernels are available or not yet tried)."""
    return _reason


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.glmgym_q4_matmul.argtypes = [p, i32, i64, i64, p, p, p, i64, i64, p, i32]
    lib.glmgym_q8_matmul.argtypes = [p, i32, i64, i64, p, p, i64, p, i32]
    lib.glmgym_q8t_matmul.argtypes = [p, i32, i64, i64, p, p, i64, p, i32]
    lib.glmgym_bf16_matmul.argtypes = [p, i64, i64, p, i64, p, i32]
    lib.glmgym_attn_decode.argtypes = [p, i32, i64, i64, p, p, i64, i64, i64, i64, i64, i64, i64,
                                       p, i64, ctypes.c_float, p, i32, i32]
    lib.glmgym_epilogue.argtypes = [p, i64, i64, p, i32, i32, i32, p, i32]
    lib.glmgym_cpu_has_avx512_vnni.argtypes = []
    for f in (lib.glmgym_q4_matmul, lib.glmgym_q8_matmul, lib.glmgym_q8t_matmul, lib.glmgym_bf16_matmul,
              lib.glmgym_attn_decode, lib.glmgym_epilogue, lib.glmgym_cpu_has_avx512_vnni):
        f.restype = i32


def epilogue(y: torch.Tensor, bias: torch.Tensor | None, gelu: bool, dtype: torch.dtype) -> torch.Tensor:
    """A quantized layer's output from its kernel's fp32 product y [M, N] (contiguous) in one pass:
    `y + bias` (bias: contiguous fp32 or bf16 [N], or None), then GELU's tanh approximation when
    `gelu`, in `dtype` (fp32: written over y; bf16: rounded to nearest even, as a cast is)."""
    lib = load()
    M, N = y.shape
    out = y if dtype == torch.float32 else torch.empty(M, N, dtype=torch.bfloat16)
    if bias is not None and (bias.dtype not in (torch.float32, torch.bfloat16) or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    lib.glmgym_epilogue(y.data_ptr(), M, N, None if bias is None else bias.data_ptr(),
                        int(bias is not None and bias.dtype == torch.bfloat16), int(gelu),
                        int(dtype == torch.bfloat16), out.data_ptr(), torch.get_num_threads())
    return out


def _acts(x: torch.Tensor) -> torch.Tensor:
    """[M, K] activations in a layout the kernels read: contiguous fp32 or bf16."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return x.contiguous()


def _check(rc: int, name: str) -> None:
    if rc:
        raise RuntimeError(f"{name} failed ({'out of memory' if rc == -1 else 'bad shape'})")


def tile_q4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
            code_offset: int = 0) -> dict[str, torch.Tensor]:
    """glmgym's stored INT4 weight -> the q4 kernel's tiles.

    Args:
        packed: uint8 [N, K/2], two signed codes per byte as `quantize.pack_int4` writes them.
        scale, zero: fp32 [N, groups]; the weight is (code + code_offset) * scale + zero.
        code_offset: added to the stored codes to make them 0..15 (0 for glmgym's grouped INT4,
            whose codes already are; 8 for the symmetric per-row scheme).

    Returns:
        `weight`: uint8 [T, K/64, TILE_ROWS, 32] with T = ceil(N / TILE_ROWS): per tile, chunk by
        chunk, the TILE_ROWS rows' 64 columns (byte j = column j in the low nibble, column j + 32
        in the high one); `scale`, `zero`: fp32 [T, groups, TILE_ROWS]. Rows past N are zero.
    """
    N, K, R = packed.shape[0], packed.shape[1] * 2, TILE_ROWS
    T = -(-N // R)
    weight = torch.zeros(T * R, K // 2, dtype=torch.uint8)
    for i in range(0, N, _CHUNK_ROWS):
        codes = (unpack_int4(packed[i : i + _CHUNK_ROWS]) + code_offset).to(torch.uint8)
        halves = codes.view(-1, K // 64, 2, 32)  # [rows, K] -> [rows, chunks, halves, 32]
        weight[i : i + codes.shape[0]] = (halves[:, :, 0] | (halves[:, :, 1] << 4)).view(-1, K // 2)
    weight = weight.view(T, R, K // 64, 32).transpose(1, 2).contiguous()  # rows inside each chunk

    def tiles(v: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(T * R, v.shape[1], dtype=torch.float32)
        padded[:N] = v
        return padded.view(T, R, -1).transpose(1, 2).contiguous()  # [T*R, G] -> [T, G, R]

    return {"weight": hugepage_copy(weight), "scale": tiles(scale), "zero": tiles(zero)}


def tile_q8(weight: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """An INT8 weight with one scale per row -> the q8 kernel's tiles.

    Args:
        weight: int8 [N, K] codes, K a multiple of 32.
        scale: [N] row scales.

    Returns:
        `weight`: int8 [T, K/32, TILE_ROWS, 32] with T = ceil(N / TILE_ROWS): per tile, block by
        block of 32 columns, the TILE_ROWS rows' codes; `scale`: fp32 [T * TILE_ROWS]. Rows past N
        are zero.
    """
    (N, K), R = weight.shape, TILE_ROWS
    T = -(-N // R)
    padded = torch.zeros(T * R, K, dtype=torch.int8)
    padded[:N] = weight
    tiles = padded.view(T, R, K // 32, 32).transpose(1, 2)  # [T, R, blocks, 32] -> [T, blocks, R, 32]
    scales = torch.zeros(T * R, dtype=torch.float32)
    scales[:N] = scale.float()
    return {"weight": hugepage_copy(tiles), "scale": scales}


def q4_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              out_features: int, group_size: int) -> torch.Tensor:
    """[M, K] @ a tiled q4 weight -> [M, N] fp32.

    Args:
        x: [M, K] activations (fp32 or bf16; others are converted), K a multiple of 64.
        weight, scale, zero: the tiles `tile_q4` returns.
        out_features: N.
        group_size: columns per scale/zero group: a multiple of 64 dividing K.
    """
    fast = vnni()
    x = _acts(x)
    M, K = x.shape
    y = torch.empty(M, out_features, dtype=torch.float32)
    kernel = fast.glmgym_q4_matmul_vnni if fast is not None else load().glmgym_q4_matmul
    rc = kernel(x.data_ptr(), x.dtype == torch.bfloat16, M, K, weight.data_ptr(), scale.data_ptr(),
                zero.data_ptr(), out_features, group_size, y.data_ptr(), torch.get_num_threads())
    _check(rc, "q4_matmul")
    return y


def q8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              out_features: int | None = None) -> torch.Tensor:
    """[M, K] @ an INT8 weight -> [M, N] fp32.

    Args:
        x: [M, K] activations (fp32 or bf16; others are converted), K a multiple of 32.
        weight: the tiles `tile_q8` returns (one scale per row), or int8 [N, K] rows with fp32
            [N, K / 32] scales, one per block of 32 columns (the INT8 lm_head, whose rows the
            embeddings look up).
        scale: the scales that go with `weight`.
        out_features: N (tiles only: they are padded to whole tiles).
    """
    lib = load()
    x = _acts(x)
    M, K = x.shape
    if weight.dim() == 4:
        N = out_features
        y = torch.empty(M, N, dtype=torch.float32)
        fast = vnni()
        kernel = fast.glmgym_q8t_matmul_vnni if fast is not None else lib.glmgym_q8t_matmul
        rc = kernel(x.data_ptr(), x.dtype == torch.bfloat16, M, K, weight.data_ptr(), scale.data_ptr(), N,
                    y.data_ptr(), torch.get_num_threads())
    else:
        N = weight.shape[0]
        if tuple(scale.shape) != (N, K // 32):
            raise ValueError(f"q8_matmul: a weight in rows takes [N, K/32] scales, got {tuple(scale.shape)}")
        y = torch.empty(M, N, dtype=torch.float32)
        fast = vnni() if N % TILE_ROWS == 0 else None  # it takes the rows four at a time
        kernel = fast.glmgym_q8_matmul_vnni if fast is not None else lib.glmgym_q8_matmul
        rc = kernel(x.data_ptr(), x.dtype == torch.bfloat16, M, K, weight.data_ptr(), scale.data_ptr(), N,
                    y.data_ptr(), torch.get_num_threads())
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


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of one query per row and head over a bf16 key/value cache.

    Args:
        q: [B, H, 1, d] queries (any float dtype; fp32 and bf16 with unit stride over d are read in
            place), d a multiple of 8 up to 256.
        k, v: [B, H, S, d] bf16 keys and values with unit stride over d (a slice of the cache).
        allowed: None, or bool broadcastable to [B, 1, 1, S]: True where a position may be attended.

    Returns:
        [B, H, 1, d] in q's dtype: `softmax(q k^T / sqrt(d)) v`, computed in fp32.
    """
    lib = load()
    B, H, S, d = k.shape
    if k.stride() != v.stride() or k.stride(-1) != 1 or {k.dtype, v.dtype} != {torch.bfloat16}:
        raise ValueError("attend_decode needs bf16 keys and values of one layout, unit stride over d")
    if q.shape != (B, H, 1, d):
        raise ValueError(f"attend_decode: queries {tuple(q.shape)} do not fit keys {tuple(k.shape)}")
    qk = q if q.dtype in (torch.float32, torch.bfloat16) and q.stride(-1) == 1 else q.float().contiguous()
    mask = None
    if allowed is not None:
        mask = allowed.expand(B, 1, 1, S).reshape(B, S).to(torch.uint8).contiguous()  # [B, 1, 1, S] -> [B, S]
    out_bf16 = q.dtype == torch.bfloat16
    y = torch.empty(B, H, 1, d, dtype=torch.bfloat16 if out_bf16 else torch.float32)
    sb, sh, ss, _ = k.stride()
    rc = lib.glmgym_attn_decode(qk.data_ptr(), int(qk.dtype == torch.bfloat16), qk.stride(0), qk.stride(1),
                                k.data_ptr(), v.data_ptr(), B, H, S, d, sb, sh, ss,
                                None if mask is None else mask.data_ptr(), S, d**-0.5, y.data_ptr(),
                                int(out_bf16), torch.get_num_threads())
    _check(rc, "attend_decode")
    return y if y.dtype == q.dtype else y.to(q.dtype)
