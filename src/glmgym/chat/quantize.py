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

At run time `QuantizedLinear` picks a backend by device and bits:

- CPU INT8: `torch._weight_int8pack_mm` on the int8 weight and per-row scales, as stored.
- CPU INT4: `torch._weight_int4pack_mm_for_cpu`. Its format is asymmetric groups,
  `w = (q - 8) * scale + zero`, so both schemes map onto it exactly: group-wise with
  `zero = min + 8 * scale`; per row as one group spanning the row, with `q = q_signed + 8` and zero 0.
- Anywhere else (CUDA, or a shape a kernel refuses): the stored tensors, dequantized per call
  (pure PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glmgym.errors import GlmgymError

__all__ = [
    "QUANTIZED_LINEARS",
    "QuantSpec",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "check_quantized",
    "dequantize_weight",
    "pack_int4",
    "quantize_model",
    "quantize_weight",
    "unpack_int4",
]

QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
"""The Linear layers of every block that are quantized (THUDM's choice too)."""
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
    w = g * t["weight_scale"].to(dtype)[..., None] + t["weight_zero"].to(dtype)[..., None]
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

    Build it with `QuantizedLinear.from_tensors` (stored tensors) or `from_float` (an nn.Linear).
    """

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
        if kernels and device.type == "cpu" and _kernel_ok(bits, in_features, N, group_size):
            if bits == 8:
                # a fresh copy: memory-mapped tensors from a file sit at arbitrary offsets, and the
                # kernel's vector loads need torch's aligned allocations (it crashes otherwise)
                tensors = {"weight": t["weight"].to(device).clone(memory_format=torch.contiguous_format),
                           "scales": t["weight_scale"].to(dtype).clone()}
                return cls(in_features, N, bits, group_size, "int8pack", tensors, bias)
            return cls(in_features, N, bits, group_size, "int4pack", _int4pack(t, group_size, dtype), bias)
        tensors = {k: v.to(device) for k, v in t.items()}
        return cls(in_features, N, bits, group_size, "dequant", tensors, bias)

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
        x2 = x.reshape(-1, self.in_features)  # [..., K] -> [M, K]
        if self.backend == "int8pack":
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales)
        elif self.backend == "int4pack":
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight, self.kernel_group_size,
                                                  self.scales_and_zeros)
        else:
            names = ("weight", "weight_scale", "weight_zero")
            stored = {k: getattr(self, k) for k in names if hasattr(self, k)}
            y = x2 @ dequantize_weight(stored, self.bits, self.group_size, x.dtype).t()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend}")


def _kernel_ok(bits: int, K: int, N: int, group_size: int) -> bool:
    if bits == 8:
        return hasattr(torch, "_weight_int8pack_mm")
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and _kernel_group(K, group_size) > 0 and N % 16 == 0


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


class QuantizedEmbedding(nn.Module):
    """Word embeddings stored per row quantized (THUDM's `quantization_embeddings`); rows dequantized
    on lookup. The tied lm_head is a `QuantizedLinear` built from the same tensors."""

    def __init__(self, t: dict[str, torch.Tensor], bits: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.bits, self.dtype = bits, dtype
        self.register_buffer("weight", t["weight"])
        self.register_buffer("weight_scale", t["weight_scale"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = {"weight": self.weight[flat], "weight_scale": self.weight_scale[flat]}
        return dequantize_weight(rows, self.bits, 0, self.dtype).view(*ids.shape, -1)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr


def quantize_model(model: nn.Module, spec: QuantSpec, kernels: bool = True) -> nn.Module:
    """Swap the block Linears of a float `GLMModel` for `QuantizedLinear`s, in place.

    One layer at a time, so the float and the quantized copies of the whole model never coexist.
    The model's config records the spec.
    """
    dtype = model.dtype
    for i, _ in enumerate(model.transformer.layers):
        for name in QUANTIZED_LINEARS:
            full = f"transformer.layers.{i}.{name}"
            parent, attr = _parent(model, full)
            setattr(parent, attr, QuantizedLinear.from_float(getattr(parent, attr), spec.bits,
                                                             spec.group_size, dtype, kernels))
    if spec.embeddings:
        emb = model.transformer.word_embeddings.weight.detach()
        t = quantize_weight(emb, spec.bits, 0)
        model.transformer.word_embeddings = QuantizedEmbedding(t, spec.bits, dtype)
        model.lm_head = QuantizedLinear.from_tensors(t, emb.shape[1], None, spec.bits, 0, dtype, emb.device,
                                                     kernels)
    model.config.quantization_bit = spec.bits
    model.config.quantization_group_size = spec.group_size
    model.config.quantization_embeddings = spec.embeddings
    return model
