"""Weight-only INT8 / INT4 quantization of ChatGLM-6B: file formats, kernels, the Linear swap.

Two schemes, both stored as `weight` + `weight_scale` (+ `weight_zero`) next to the float `bias`:

- **Per row** (`group_size=0`), THUDM's scheme, so that `chatglm-6b-int8` / `chatglm-6b-int4` load
  as they are: symmetric, one fp16 scale per output row, `scale = absmax / (2^(bits-1) - 1)` and
  `q = round(w / scale)` as int8. INT4 packs two signed nibbles per byte, the even column in the
  high nibble: `weight` is int8 [N, K/2].
- **Group-wise** (`group_size=G`, INT4 only), glmgym's own: asymmetric over groups of G input
  columns, `q = round((w - min) / scale)` in 0..15 with `scale = (max - min) / 15`; `weight` is
  uint8 [N, K/2] (same nibble order), `weight_scale` and `weight_zero` (the group minimum) are fp16
  [N, K/G].

At load `QuantizedLinear` picks a backend by device, bits and CPU capability (`select_backend`),
each the fastest measured there (`benchmarks/chat_speed.py`, docs/benchmarks):

- CPU with AVX-512 (`torch.backends.cpu.get_cpu_capability()`): the faster, timed on a layer of
  the shape at one row and cached per machine (`kernel_choice`), of glmgym's AVX2 kernels (below)
  and PyTorch's packed kernels, `torch._weight_int8pack_mm` on the int8 weight and per-row scales
  as stored, and `torch._weight_int4pack_mm_for_cpu`, whose format is asymmetric groups,
  `w = (q - 8) * scale + zero`: group-wise maps onto it with `zero = min + 8 * scale`; per row as
  one group spanning the row, with `q = q_signed + 8` and zero 0.
- CPU with AVX2 only: glmgym's own integer dot-product kernels (`kernels.avx2`, llama.cpp's method),
  about 2x faster there than PyTorch's kernels, which are vectorized for AVX-512 only. Without a C
  compiler to build them, PyTorch's kernels, with one warning line.
- CUDA: INT4 on PyTorch's tinygemm kernel `torch._weight_int4pack_mm` (Ampere and newer), INT8 on
  `torch._weight_int8pack_mm` where this torch has it for CUDA. Each is checked against the
  dequantized weight on the first layer; a failure falls back, with one warning line.
- Anywhere else (or a shape a kernel refuses): the stored tensors, dequantized per call (pure PyTorch).
"""

from __future__ import annotations

import functools
import itertools
import sys
from dataclasses import dataclass

import torch
from torch import nn

from glmgym.chat import kernel_choice
from glmgym.chat.kernels import avx2
from glmgym.chat.kernels.avx2 import pack_int4, tile_q4, unpack_int4
from glmgym.devices import cpu_capability
from glmgym.errors import GlmgymError

__all__ = [
    "QUANTIZED_LINEARS",
    "Bf16DecodeLinear",
    "QuantSpec",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "check_quantized",
    "dequantize_weight",
    "pack_int4",
    "quantize_model",
    "quantize_weight",
    "select_backend",
    "unpack_int4",
    "use_decode_kernels",
]

QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
"""The Linear layers of every ChatGLM-6B block that are quantized (THUDM's choice too); every
family member's full names are its config's `quantized_linears`."""
DEFAULT_GROUP_SIZE = 128
_KERNEL_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantSpec:
    """How a model's weights are quantized (recorded in config.json)."""

    bits: int
    """4 or 8."""
    group_size: int = 0
    """0: one scale per output row (THUDM's scheme); 32..256: INT4 asymmetric groups of this many
    input columns."""
    embeddings: bool = False
    """Also quantize the word embeddings and the tied lm_head (per row)."""

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise GlmgymError(f"quantization bits must be 4 or 8, not {self.bits}")
        if self.group_size and self.bits != 4:
            raise GlmgymError("--group-size applies to 4-bit quantization only (8-bit is per row)")
        if self.group_size and self.group_size not in _KERNEL_GROUP_SIZES:
            raise GlmgymError(f"group size must be one of {', '.join(map(str, _KERNEL_GROUP_SIZES))} "
                              f"(or 0 for one scale per row), not {self.group_size}")

    @classmethod
    def default(cls, bits: int, group_size: int | None = None, embeddings: bool = False) -> QuantSpec:
        """glmgym's defaults: INT8 per row, INT4 in groups of 128."""
        if group_size is None:
            group_size = DEFAULT_GROUP_SIZE if bits == 4 else 0
        return cls(bits, group_size, embeddings)

    def group_size_of(self, module: str) -> int:
        """The group size of one quantized module: the embeddings are always per row."""
        return 0 if module == "transformer.word_embeddings" else self.group_size

    @classmethod
    def from_config(cls, config) -> QuantSpec | None:
        """The spec of a checkpoint's `GLMConfig` (None when it holds float weights)."""
        if not config.quantization_bit:
            return None
        return cls(config.quantization_bit, config.quantization_group_size, config.quantization_embeddings)


_ROWS = 4096  # rows per chunk: bounds the fp32 / int32 temporaries of the embedding-sized weights


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = 0) -> dict[str, torch.Tensor]:
    """Quantize a float [N, K] weight into the stored tensors (see the module docstring).

    Rows are independent in both schemes, so the work goes `_ROWS` rows at a time.
    """
    if w.shape[0] <= _ROWS:
        return _quantize_rows(w, bits, group_size)
    out: dict[str, torch.Tensor] = {}
    for i in range(0, w.shape[0], _ROWS):
        part = _quantize_rows(w[i : i + _ROWS], bits, group_size)
        for k, v in part.items():  # written into preallocated outputs: no concatenated copies
            if k not in out:
                out[k] = torch.empty((w.shape[0], *v.shape[1:]), dtype=v.dtype)
            out[k][i : i + _ROWS] = v
    return out


def _quantize_rows(w: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    w = w.float()
    N, K = w.shape
    if group_size == 0:
        scale = (w.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)).half()
        q = torch.round(w / scale.float().clamp_min(1e-10)[:, None]).to(torch.int8)
        return {"weight": pack_int4(q) if bits == 4 else q, "weight_scale": scale}
    if K % group_size:
        raise GlmgymError(f"a weight with {K} input columns cannot be split into groups of {group_size}")
    g = w.view(N, K // group_size, group_size)  # [N, K] -> [N, groups, G]
    if bits == 8:  # symmetric groups (the AVX2 lm_head): code * scale, no zero point
        scale = (g.abs().amax(dim=-1) / 127).half()
        q = torch.round(g / scale.float().clamp_min(1e-10)[..., None]).to(torch.int8).view(N, K)
        return {"weight": q, "weight_scale": scale}
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).half()
    zero = lo.half()
    q = torch.round((g - zero.float()[..., None]) / scale.float().clamp_min(1e-10)[..., None])
    q = q.clamp_(0, 15).to(torch.uint8).view(N, K)
    return {"weight": pack_int4(q), "weight_scale": scale, "weight_zero": zero}


def _int_values(weight: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(weight) if bits == 4 else weight


def dequantize_weight(t: dict[str, torch.Tensor], bits: int, group_size: int = 0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float [N, K] weight the stored tensors stand for (rows may be any subset)."""
    q = _int_values(t["weight"], bits)
    if group_size == 0:
        return q.to(dtype) * t["weight_scale"].to(dtype)[:, None]
    N, K = q.shape
    g = q.view(N, K // group_size, group_size).to(dtype)  # [N, K] -> [N, groups, G]
    w = g * t["weight_scale"].to(dtype)[..., None]
    if "weight_zero" in t:  # INT4 groups are asymmetric; INT8 groups (the AVX2 lm_head) are not
        w = w + t["weight_zero"].to(dtype)[..., None]
    return w.view(N, K)


def _expected_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> dict[str, tuple]:
    shapes = {"weight": (out_features, in_features * bits // 8), "weight_scale": (out_features,)}
    if group_size:
        groups = in_features // group_size
        shapes.update(weight_scale=(out_features, groups), weight_zero=(out_features, groups))
    return shapes


def check_quantized(name: str, t: dict[str, torch.Tensor], out_features: int, in_features: int,
                    bits: int, group_size: int) -> None:
    """Raise a GlmgymError naming `name` when stored tensors do not fit the layer."""
    shapes = _expected_shapes(out_features, in_features, bits, group_size)
    extra = sorted(set(t) - set(shapes))
    if extra:
        raise GlmgymError(f"{name} holds {', '.join(extra)}, which a {bits}-bit layer with group size "
                          f"{group_size} does not have (is config.json's quantization right?)")
    for key, shape in shapes.items():
        if key not in t:
            raise GlmgymError(f"{name}.{key} is missing from the quantized checkpoint")
        if tuple(t[key].shape) != shape:
            raise GlmgymError(f"{name}.{key} has shape {tuple(t[key].shape)}; a {bits}-bit layer of "
                              f"{in_features} -> {out_features} needs {shape}")


class QuantizedLinear(nn.Module):
    """A Linear layer with INT8 or INT4 weights; float activations, bias and output.

    Build it with `QuantizedLinear.from_tensors` (stored tensors) or `from_float` (an nn.Linear):
    they pick the backend once, at load, as an instance of its subclass (one class per kernel, as
    gpt-fast does), so a call runs its kernel without choosing again. `backend` names it.
    """

    def __new__(cls, *args, **kwargs):
        # QuantizedLinear(in, out, bits, group_size, backend, ...) builds the backend's subclass
        # (copy and pickle call __new__ with the subclass and no arguments)
        backend = args[4] if len(args) > 4 else kwargs.get("backend")
        return super().__new__(_BACKENDS[backend] if cls is QuantizedLinear and backend else cls)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 backend: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        self.kernel_group_size = _kernel_group(in_features, group_size)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], in_features: int, bias: torch.Tensor | None,
                     bits: int, group_size: int = 0, dtype: torch.dtype = torch.bfloat16,
                     device: torch.device | str = "cpu", kernels: bool = True) -> QuantizedLinear:
        """Wrap stored tensors (already checked), converted to the fastest backend for `device`."""
        device = torch.device(device)
        N = t["weight"].shape[0]
        bias = None if bias is None else bias.to(device=device, dtype=dtype)
        backend = (select_backend(bits, in_features, N, group_size, device, dtype=dtype) if kernels
                   else "dequant")
        layer = cls(in_features, N, bits, group_size, backend,
                    _backend_tensors(t, backend, bits, group_size, dtype, device), bias)
        if backend.startswith("cuda_") and not _cuda_kernel_checked(layer, t, dtype, device):
            tensors = {k: v.to(device) for k, v in t.items()}
            layer = cls(in_features, N, bits, group_size, "dequant", tensors, bias)
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int = 0, dtype: torch.dtype | None = None,
                   kernels: bool = True) -> QuantizedLinear:
        """Quantize an nn.Linear."""
        w = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_tensors(quantize_weight(w, bits, group_size), linear.in_features, bias, bits,
                                group_size, dtype or w.dtype, w.device, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, self.in_features))  # [..., K] -> [M, K] -> [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """`gelu(self(x))` with GELU's tanh approximation (a kernel may fuse it into its epilogue)."""
        return torch.nn.functional.gelu(self(x), approximate="tanh")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.t()` for x [M, K], in x's dtype, by this layer's kernel."""
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [out, in] (backend "dequant" only: the kernels keep other layouts)."""
        names = ("weight", "weight_scale", "weight_zero")
        stored = {k: getattr(self, k) for k in names if hasattr(self, k)}
        return dequantize_weight(stored, self.bits, self.group_size, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend}")


class _Int8Pack(QuantizedLinear):
    """PyTorch's `_weight_int8pack_mm` (CPU with AVX-512, CUDA): INT8 codes, a scale per row."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.contiguous(), self.weight, self.scales)


class _Int4PackCpu(QuantizedLinear):
    """PyTorch's `_weight_int4pack_mm_for_cpu` (CPU with AVX-512): tinygemm's packed INT4."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.weight, self.kernel_group_size,
                                                 self.scales_and_zeros)


class _Int4PackCuda(QuantizedLinear):
    """PyTorch's `_weight_int4pack_mm` (CUDA, Ampere and newer): tinygemm, bf16 activations."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), self.weight,
                                         self.kernel_group_size, self.scales_and_zeros).to(x.dtype)


class _Avx2(QuantizedLinear):
    """glmgym's own integer dot-product kernels (CPU with AVX2 only). The bias, the cast to the
    activations' dtype and, in `forward_gelu`, the GELU run in one pass over the kernel's fp32
    output (`avx2.epilogue`): rounded once to bf16 instead of after each op."""

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            return avx2.q4_matmul(x, self.weight, self.scale, self.zero, self.out_features,
                                  self.group_size or self.in_features)
        return avx2.q8_matmul(x, self.weight, self.scale, self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x).to(x.dtype)

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            y = super().forward(x)
            return torch.nn.functional.gelu(y, approximate="tanh") if gelu else y
        y = self._product(x.reshape(-1, self.in_features))  # [..., K] -> [M, K] -> [M, N] fp32
        return avx2.epilogue(y, self.bias, gelu, x.dtype).view(*x.shape[:-1], self.out_features)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        return self(x, gelu=True)


class _Dequant(QuantizedLinear):
    """The stored codes, dequantized per call: any device, and differentiable (fine-tuning on a
    quantized base)."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return _DequantizedMatmul.apply(x, self)
        return x @ self.dequantized(x.dtype).t()


_BACKENDS: dict[str, type[QuantizedLinear]] = {
    "int8pack": _Int8Pack, "cuda_int8pack": _Int8Pack, "int4pack": _Int4PackCpu,
    "cuda_int4pack": _Int4PackCuda, "avx2": _Avx2, "dequant": _Dequant,
}


class _DequantizedMatmul(torch.autograd.Function):
    """`x @ W.t()` with W dequantized in the forward and again in the backward.

    Plain autograd would keep every layer's dequantized float weight for the backward (the whole
    model in fp32: 24 GB for ChatGLM-6B); recomputing it holds one layer's at a time. The weight
    is frozen, so only the input gets a gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantized(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized(grad.dtype), None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """One line on stderr per distinct message and process (a library must not spam a chat)."""
    if message not in _warned:
        _warned.add(message)
        print(f"glmgym: warning: {message}", file=sys.stderr)


def select_backend(bits: int, in_features: int, out_features: int, group_size: int,
                   device: torch.device | str = "cpu", capability: str | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend a quantized layer of this shape runs on (see the module docstring).

    Args:
        bits, in_features, out_features, group_size: the layer.
        device: where it runs.
        capability: the CPU's vector capability as `torch.backends.cpu.get_cpu_capability()` names
            it ("AVX512", "AVX2", "DEFAULT", ...); None reads it (it honors ATEN_CPU_CAPABILITY).
        dtype: the activations' dtype (the timed choice on AVX-512 CPUs runs the kernels on it).

    Returns:
        "int8pack" / "int4pack" (PyTorch's CPU kernels), "avx2" (glmgym's), "cuda_int4pack",
        "cuda_int8pack", or "dequant".
    """
    device = torch.device(device)
    K, N = in_features, out_features
    if device.type == "cuda":
        if bits == 4 and hasattr(torch, "_weight_int4pack_mm") and _kernel_group(K, group_size) \
                and K % 128 == 0 and N % 8 == 0:  # tinygemm tiles: K in 128s (innerKTiles 8), N in 8s
            return "cuda_int4pack"
        if bits == 8 and hasattr(torch, "_weight_int8pack_mm"):
            return "cuda_int8pack"
        return "dequant"
    if device.type != "cpu":
        return "dequant"
    torch_kernel_ok = (hasattr(torch, "_weight_int8pack_mm") if bits == 8 else
                       hasattr(torch, "_weight_int4pack_mm_for_cpu") and _kernel_group(K, group_size) > 0
                       and N % 16 == 0)
    torch_kernel = ("int8pack" if bits == 8 else "int4pack") if torch_kernel_ok else "dequant"
    capability = (capability or cpu_capability()).upper()
    avx512 = capability.startswith("AVX512")  # such CPUs run AVX2 code too
    if capability != "AVX2" and not avx512:
        return torch_kernel
    if K % 32 or (bits == 4 and (K % 64 or group_size % 64)):  # the kernels' block and chunk sizes
        return torch_kernel
    if avx2.load() is None:
        if not avx512:
            _warn_once(f"INT{bits} layers run PyTorch's generic kernels, about 2x slower on this AVX2 CPU: "
                       f"glmgym's AVX2 kernels are not available ({avx2.unavailable_reason()})")
        return torch_kernel
    if avx512 and torch_kernel != "dequant":  # neither is known to win there: timed, once per machine
        return kernel_choice.choose(kernel_choice.machine_key(capability),
                                    f"int{bits} {K}x{N} g{group_size} {str(dtype).removeprefix('torch.')}",
                                    _timed_candidates(bits, K, N, group_size, dtype, (torch_kernel, "avx2")))
    return "avx2"


def _backend_tensors(t: dict[str, torch.Tensor], backend: str, bits: int, group_size: int,
                     dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Stored tensors -> the buffers of `backend`'s layer."""
    if backend in ("int8pack", "cuda_int8pack"):
        # a fresh copy: memory-mapped tensors from a file sit at arbitrary offsets, and the
        # kernel's vector loads need torch's aligned allocations (it crashes otherwise)
        return {"weight": t["weight"].to(device).clone(memory_format=torch.contiguous_format),
                "scales": t["weight_scale"].to(device, dtype).clone()}
    if backend == "int4pack":
        return _int4pack(t, group_size, dtype)
    if backend == "avx2":
        return _avx2_tensors(t, bits, group_size)
    if backend == "cuda_int4pack":
        return _cuda_int4pack(t, group_size, device)
    return {k: v.to(device) for k, v in t.items()}


def _timed_candidates(bits: int, K: int, N: int, group_size: int, dtype: torch.dtype,
                      backends: tuple[str, ...]) -> dict[str, object]:
    """For `kernel_choice.choose`: per backend, a builder of layers of this shape on random codes
    that returns one decoding call (a single row of activations), each call on the next of enough
    copies that the weights stream from memory (`kernel_choice.copies_to_stream`). Nothing is
    made until a builder runs (a cached choice needs none of it)."""
    @functools.cache
    def codes() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        shapes = _expected_shapes(N, K, bits, group_size)
        t = {"weight": torch.randint(0, 256, shapes["weight"], generator=gen, dtype=torch.uint8)}
        if not group_size:  # per row: signed codes (INT4: two signed nibbles a byte)
            t["weight"] = t["weight"].view(torch.int8)
        t["weight_scale"] = (torch.rand(shapes["weight_scale"], generator=gen) * 1e-2).half()
        if group_size:
            t["weight_zero"] = (-torch.rand(shapes["weight_zero"], generator=gen) * 8e-2).half()
        return t, torch.randn(1, K, generator=gen).to(dtype)

    def builder(backend: str):
        def build():
            t, x = codes()
            copies = kernel_choice.copies_to_stream(sum(v.numel() * v.element_size() for v in t.values()))
            cpu = torch.device("cpu")
            layers = [QuantizedLinear(K, N, bits, group_size, backend,
                                      _backend_tensors(t, backend, bits, group_size, dtype, cpu), None)
                      for _ in range(copies)]
            turn = itertools.cycle(layers)
            return lambda: next(turn).matmul(x)
        return build
    return {backend: builder(backend) for backend in backends}


def _kernel_group(K: int, group_size: int) -> int:
    """The INT4 kernel's group size (it takes 32..256): per row repeats the row's scale over groups."""
    if group_size:
        return group_size
    return next((g for g in reversed(_KERNEL_GROUP_SIZES) if K % g == 0), 0)


def _int4pack(t: dict[str, torch.Tensor], group_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Stored INT4 tensors -> the CPU kernel's packed weight and [groups, N, 2] scales and zeros."""
    N, K = t["weight"].shape[0], t["weight"].shape[1] * 2
    scale = t["weight_scale"].float()
    if group_size == 0:  # per row: the row's scale repeated over the kernel's groups, q + 8, zero 0
        scale = scale[:, None].expand(-1, K // _kernel_group(K, 0))  # [N] -> [N, groups]
        zero = torch.zeros_like(scale)
    else:
        zero = t["weight_zero"].float() + 8 * scale

    def pack(rows: slice) -> torch.Tensor:
        q = unpack_int4(t["weight"][rows]).to(torch.int32)  # [rows, K]
        if group_size == 0:
            q += 8
        return torch._convert_weight_to_int4pack_for_cpu(q, 1)

    # the kernel packs blocks of 64 rows, so chunks of _ROWS rows give the same bytes as one call
    packed = torch.empty(N, K // 2, dtype=torch.uint8)
    for i in range(0, N, _ROWS):
        packed[i : i + _ROWS] = pack(slice(i, i + _ROWS))
    scales_and_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(dtype).contiguous()  # [groups, N, 2]
    return {"weight": packed, "scales_and_zeros": scales_and_zeros}


def _avx2_tensors(t: dict[str, torch.Tensor], bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Stored tensors -> `kernels.avx2`' layout: INT8 codes and fp32 row scales, INT4 codes 0..15
    and fp32 scales and zeros, in tiles of `avx2.TILE_ROWS` rows (see `tile_q8`, `tile_q4`), copied
    into anonymous memory on huge pages where Linux gives them (a memory-mapped file would be paged
    in during the first tokens and read through 4 KiB pages)."""
    scale = t["weight_scale"].float()
    if bits == 8 and group_size:  # blocks of 32 (the lm_head's scheme): plain rows
        return {"weight": avx2.hugepage_copy(t["weight"]), "scale": scale.contiguous()}
    if bits == 8:
        return avx2.tile_q8(t["weight"], scale)

    if group_size == 0:  # per row, symmetric: one group spanning the row, codes q + 8, zero -8 * scale
        scale = scale[:, None]  # [N] -> [N, 1]
        return tile_q4(t["weight"], scale, -8 * scale, code_offset=8)
    return tile_q4(t["weight"], scale, t["weight_zero"].float())


def _cuda_int4pack(t: dict[str, torch.Tensor], group_size: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Stored INT4 tensors -> tinygemm's tiled weight (innerKTiles 8) and bf16 [groups, N, 2] scales
    and zeros (the same `(q - 8) * scale + zero` convention as the CPU kernel)."""
    K = t["weight"].shape[1] * 2
    scale = t["weight_scale"].float()
    if group_size == 0:
        scale = scale[:, None].expand(-1, K // _kernel_group(K, 0))  # [N] -> [N, groups]
        zero = torch.zeros_like(scale)
        codes = (unpack_int4(t["weight"]) + 8).to(torch.uint8)
    else:
        zero = t["weight_zero"].float() + 8 * scale
        codes = unpack_int4(t["weight"])
    packed = pack_int4(codes.to(device))  # uint8 [N, K/2], even column high, as the kernel reads it
    weight = torch._convert_weight_to_int4pack(packed, 8)
    scales_and_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(device, torch.bfloat16).contiguous()
    return {"weight": weight, "scales_and_zeros": scales_and_zeros}


def _cuda_kernel_checked(layer: QuantizedLinear, t: dict[str, torch.Tensor], dtype: torch.dtype,
                         device: torch.device) -> bool:
    """Run a CUDA kernel once against the dequantized weight; warn and return False if it fails or
    disagrees (kernel availability varies across GPUs and torch builds)."""
    key = (layer.backend, layer.in_features, layer.out_features, layer.group_size)
    if key not in _cuda_checked:
        x = torch.randn(2, layer.in_features, device=device, dtype=dtype)
        stored = {k: v.to(device) for k, v in t.items()}
        ref = x.float() @ dequantize_weight(stored, layer.bits, layer.group_size).t()
        try:
            bias, layer.bias = layer.bias, None
            y = layer(x).float()
            ok = bool(((y - ref).norm() / ref.norm()) < 0.02)
            reason = "its output disagrees with the dequantized weights"
        except RuntimeError as exc:
            ok, reason = False, str(exc).splitlines()[0]
        finally:
            layer.bias = bias
        _cuda_checked[key] = ok
        if not ok:
            _warn_once(f"{layer.backend} is unusable here ({reason}); INT{layer.bits} layers dequantize "
                       "their weights on every call instead (slower)")
    return _cuda_checked[key]


_cuda_checked: dict[tuple, bool] = {}


class Bf16DecodeLinear(nn.Module):
    """A bias-free bf16 Linear (the tied lm_head) that runs glmgym's AVX2 kernel for a few rows.

    PyTorch's bf16 matrix-vector product is emulated on AVX2 CPUs (no native bf16) and reads the
    weight at about half the memory speed; the kernel widens bf16 to fp32 in registers (on AVX-512
    with native bf16 it still beat PyTorch's at one row: 34-35 against 37-46 ms). Prefill
    (many rows) keeps `F.linear`. `weight` stays the same Parameter (the embeddings' tie holds).
    """

    MAX_ROWS = 8

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.MAX_ROWS * self.in_features or x.requires_grad:
            return nn.functional.linear(x, self.weight)
        y = avx2.bf16_matmul(x.reshape(-1, self.in_features), self.weight.detach())
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


INT8_HEAD_GROUP = 32
"""Columns per scale of the INT8 embeddings and lm_head that quantized models use on x86 CPUs."""


def use_decode_kernels(model: nn.Module, quantized: bool) -> nn.Module:
    """Make a bf16 model's lm_head cheap to decode with on an AVX2 or AVX-512 CPU where glmgym's
    kernels are built; elsewhere, or for another dtype, no change (and no warning: the head works
    either way). On a 2-core AVX-512 EPYC with native bf16, ChatGLM-6B's head at one row took 20-22
    ms as INT8 against 37-46 ms through PyTorch's bf16 linear (34-35 ms through `Bf16DecodeLinear`).

    - `quantized` (INT4 or INT8 blocks) with the head tied to the embeddings: both become one INT8
      copy in groups of `INT8_HEAD_GROUP` columns, as chatglm.cpp's q4_0/q8_0 quantize theirs. The
      v2 block's head is untied: it alone becomes INT8 (its embeddings stay bf16).
      ChatGLM-6B's head is then 0.60 GB read per decoded token instead of 1.07 GB, and the model
      0.47 GB smaller; the logits error on the random full-size model goes from 3.7% to 3.8% (INT8)
      and stays 24.7% (INT4). fp32 compute (asked for by name) keeps the float head.
    - otherwise the head becomes `Bf16DecodeLinear` (the same weight, read at memory speed).
    """
    head_name = model.config.head_name
    head = model.get_submodule(head_name)
    if (type(head) is not nn.Linear or head.weight.dtype != torch.bfloat16 or head.weight.device.type != "cpu"
            or head.in_features % 32 or not cpu_capability().startswith(("AVX2", "AVX512"))):
        return model
    if avx2.load() is None:
        return model
    parent, attr = _parent(model, head_name)
    tied = head.weight is model.get_submodule(model.config.embeddings_name).weight
    if quantized and (tied or not model.config.tied_head):  # v1 tied, or the v2 block's own head
        t = quantize_weight(head.weight.detach(), 8, INT8_HEAD_GROUP)
        codes, scale = avx2.hugepage_copy(t["weight"]), t["weight_scale"].float()  # [V, H] int8, [V, H / 32]
        if tied:
            emb_parent, emb_attr = _parent(model, model.config.embeddings_name)
            setattr(emb_parent, emb_attr, QuantizedEmbedding({"weight": codes, "weight_scale": scale}, 8,
                                                             torch.bfloat16, INT8_HEAD_GROUP))
        setattr(parent, attr, QuantizedLinear(head.in_features, head.out_features, 8, INT8_HEAD_GROUP, "avx2",
                                              {"weight": codes, "scale": scale}, None))
    else:
        setattr(parent, attr, Bf16DecodeLinear(head.weight))
    return model


class QuantizedEmbedding(nn.Module):
    """Quantized word embeddings, rows dequantized on lookup: per row as THUDM's
    `quantization_embeddings` stores them, or INT8 in groups (`use_decode_kernels`). The tied
    lm_head is a `QuantizedLinear` on the same tensors."""

    def __init__(self, t: dict[str, torch.Tensor], bits: int, dtype: torch.dtype,
                 group_size: int = 0) -> None:
        super().__init__()
        self.bits, self.dtype, self.group_size = bits, dtype, group_size
        self.register_buffer("weight", t["weight"])
        self.register_buffer("weight_scale", t["weight_scale"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = {"weight": self.weight[flat], "weight_scale": self.weight_scale[flat]}
        return dequantize_weight(rows, self.bits, self.group_size, self.dtype).view(*ids.shape, -1)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr


def quantize_model(model: nn.Module, spec: QuantSpec, kernels: bool = True) -> nn.Module:
    """Swap the block Linears of a float `GLMModel` for `QuantizedLinear`s, in place.

    One layer at a time, so the float and the quantized copies of the whole model never coexist.
    The model's config records the spec.
    """
    dtype = model.dtype
    for full in model.config.quantized_linears:
        parent, attr = _parent(model, full)
        setattr(parent, attr, QuantizedLinear.from_float(getattr(parent, attr), spec.bits,
                                                         spec.group_size, dtype, kernels))
    if spec.embeddings:
        if not model.config.tied_head:
            raise GlmgymError("quantized embeddings are a ChatGLM-6B (v1) scheme")
        emb = model.transformer.word_embeddings.weight.detach()
        t = quantize_weight(emb, spec.bits, 0)
        model.transformer.word_embeddings = QuantizedEmbedding(t, spec.bits, dtype)
        model.lm_head = QuantizedLinear.from_tensors(t, emb.shape[1], None, spec.bits, 0, dtype, emb.device,
                                                     kernels)
    elif kernels:
        use_decode_kernels(model, quantized=True)
    model.config.quantization_bit = spec.bits
    model.config.quantization_group_size = spec.group_size
    if model.config.version == 1:
        model.config.quantization_embeddings = spec.embeddings
    return model
