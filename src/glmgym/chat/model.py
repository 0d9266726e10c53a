"""ChatGLM-6B (GLM v1) in plain PyTorch: blocks, 2D rotary embedding, prefix-LM mask, KV cache.

Faithful to THUDM's `modeling_chatglm.py` (v1.1), with these choices of ours:

- batch-first tensors ([B, T, ...]); the reference is sequence-first;
- attention through `F.scaled_dot_product_attention` with a boolean mask. The reference fills
  masked scores with -10000 (times layer_id + 1, because it scales q down by that factor first
  and the scores back up after the fill); with no fully masked row that is the same softmax;
- a preallocated KV cache (`KVCache`) written in place, gpt-fast style, instead of concatenating
  a growing tuple per step;
- a P-Tuning v2 prefix lives in the first `pre_seq_len` cache slots when generating; without a
  cache (training) its keys and values are concatenated in front of each layer's, so that
  gradients reach the prefix encoder.

Masks follow the reference's convention at the API: `attention_mask` is True where attention
is *not* allowed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glmgym.chat.config import GLM2Config, GLMConfig
from glmgym.chat.kernels import avx2
from glmgym.devices import native_bf16

__all__ = ["GLMBase", "GLMBlock", "GLMModel", "KVCache", "RotaryEmbedding", "write_cache"]

_CPU_NATIVE_BF16 = native_bf16(torch.device("cpu"))


@functools.cache
def _decode_kernels():
    """glmgym's AVX2 kernels module when they build here (decoding attention), else None."""

    return avx2 if avx2.load() is not None else None


def decode_attention(device: torch.device, dtype: torch.dtype, grouped: bool = False) -> Callable:
    """The fastest one-query attention (a decoding step) for this device and compute dtype,
    `attend(q, k, v, allowed) -> y` on [B, H, 1, d] queries; chosen once per layer and setting.
    `grouped`: the queries are [B, G, H/G, d], the query heads of each key/value group (the v2
    block's grouped-query attention). glmgym's one-query kernel does not take them: fp32 SDPA reads
    each key once for all of a group's queries, which beat the kernel reading it once per query
    head (ChatGLM3's 2 groups of 16 heads, 2 AVX2 cores: 159 against 194 us at 128 keys, 0.89
    against 1.28 ms at 1024).

    - CPU without native bf16 (AVX2), bf16 cache: bf16 matmuls run generic code there. glmgym's
      kernel reads the bf16 cache once in fp32 registers (one layer, 32 heads, 2 cores: 91 us at
      140 keys, 1.3 ms at 1024); without it, converting the cache to fp32 for SDPA (279 us and
      4.7 ms) beats bf16 SDPA and the matmul-softmax below.
    - CPU otherwise: a plain matmul-softmax beats SDPA's kernel, the more so the longer the cache
      (alone: 0.35 vs 2.9 ms at 1024 keys; a 4-layer INT4 decode step at 1024 cached tokens: 23.1
      vs 26.2 ms, no change at 128). The softmax runs in fp32.
    - GPU: SDPA.
    """
    if device.type != "cpu":
        return _attend_sdpa
    if dtype == torch.bfloat16 and not _CPU_NATIVE_BF16:
        kernels = None if grouped else _decode_kernels()
        return functools.partial(_attend_kernel, kernels) if kernels is not None else _attend_sdpa_fp32
    return _attend_matmul


def _attend_sdpa(q, k, v, allowed):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _attend_sdpa_fp32(q, k, v, allowed):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed).to(q.dtype)


def _attend_kernel(kernels, q, k, v, allowed):
    if k.stride(-1) == 1 and k.stride() == v.stride():  # the kernel's layout
        return kernels.attend_decode(q, k, v, allowed)
    return _attend_sdpa_fp32(q, k, v, allowed)


def _attend_matmul(q, k, v, allowed):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, 1, S]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class RotaryEmbedding(nn.Module):
    """Rotary tables for one half of a head (dim = head_dim / 2 with 2D positions)."""

    def __init__(self, dim: int, max_positions: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        # The reference builds inv_freq in fp16 (RotaryEmbedding(precision=torch.half)) and the
        # model's .float() later widens it: keep that rounding so fp32 results match bit for bit.
        inv_freq = inv_freq.half().float()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        # the sine with rotate-half's signs (the first half of the rotated vector is -x2), made
        # once here rather than over the whole table at every step
        signs = torch.cat((-torch.ones(dim // 2), torch.ones(dim // 2)))
        self.register_buffer("signed_sin", self.sin * signs, persistent=False)


def _apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """GLM's 2D rotary on x [..., d]: each half of a head rotates NeoX style (rotate-half) by its
    own table, `cos` and `signed_sin` [..., d] (the position's, then the block position's; the
    sine negated where rotate-half negates, see `GLMModel.rope`).

    One pass over both halves instead of a rotary per half and per tensor (the reference's
    chunk, negate, cat, multiply and cat): about 25 fewer small ops a layer, which a one-token
    decoding step of a small model pays for in dispatch. The values are the same bit for bit:
    (-a) * b and a * (-b) round alike.
    """
    quarters = x.unflatten(-1, (2, 2, x.shape[-1] // 4))  # [..., half, quarter, d/4]
    return x * cos + quarters.flip(-2).flatten(-3) * signed_sin


@dataclass
class KVCache:
    """Preallocated keys/values of every layer: [layers, B, kv_heads, max_len, head_dim] each
    (kv_heads: every head in v1, the key/value groups in v2)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, cfg: GLMConfig | GLM2Config, batch: int, max_len: int, dtype: torch.dtype,
              device: torch.device | str) -> KVCache:
        """Zeros for `max_len` positions (prefix slots included)."""
        shape = (cfg.num_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        k = torch.zeros(shape, dtype=dtype, device=device)
        return cls(k, torch.zeros_like(k))


def write_cache(cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                start: int | torch.Tensor, kv_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one layer's new keys and values [B, heads, T, d] into its cache and return the cache's
    keys and values up to `kv_len` (`start + T` for an int `start`).

    `start` is one slot for every row, or a [B] tensor of one slot per row (continuous batching:
    row b writes slots start[b] .. start[b] + T - 1; T > 1 verifies speculative drafts).
    """
    k_cache, v_cache = cache
    T = k.shape[2]
    if isinstance(start, int):
        k_cache[:, :, start : start + T] = k
        v_cache[:, :, start : start + T] = v
        kv_len = start + T
    else:
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
        slots = start[:, None] + torch.arange(T, device=k.device)  # [B, T]
        # advanced indices around a slice put their dims first: [B, T, heads, d] <- k [B, heads, T, d]
        k_cache[rows, :, slots] = k.transpose(1, 2)
        v_cache[rows, :, slots] = v.transpose(1, 2)
    return k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]


class SelfAttention(nn.Module):
    def __init__(self, cfg: GLMConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self._decode: dict[tuple, Callable] = {}  # (device, dtype) -> one-query attention

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        allowed: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        start: int | torch.Tensor,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        H, d = self.num_heads, self.head_dim
        # The fused projection is interleaved per head: [B, T, H, 3d] -> [B, T, H, 3, d] (q, k, v).
        qkv = self.query_key_value(x).view(B, T, H, 3, d)
        # 2D rotary of q and k together: the first half of each head rotates by position, the
        # second by block position (`rope`'s [B, T, 1, 1, d] tables).
        q, k = _apply_rotary_2d(qkv[:, :, :, :2], *rope).unbind(3)  # [B, T, H, d] each
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, :, 2].transpose(1, 2)  # [B, H, T, d]
        if cache is not None:
            k, v = write_cache(cache, k, v, start, kv_len)
        elif prefix is not None:  # training: [B, H, P, d] prefix keys/values in front, no rotary
            k, v = torch.cat((prefix[0], k), dim=2), torch.cat((prefix[1], v), dim=2)
        if T == 1:  # decoding: the path picked for this device and dtype (see `decode_attention`)
            key = (q.device, q.dtype)
            attend = self._decode.get(key)
            if attend is None:
                attend = self._decode[key] = decode_attention(q.device, q.dtype)
            y = attend(q, k, v, allowed)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))  # [B, H, T, d] -> [B, T, C]


class MLP(nn.Module):
    def __init__(self, cfg: GLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.inner_hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference's gelu_impl is the tanh approximation. A quantized layer applies it in its
        # kernel's epilogue (`QuantizedLinear.forward_gelu`); LoRA-wrapped and float ones do not.
        up = self.dense_h_to_4h
        fused = getattr(up, "forward_gelu", None)
        h = fused(x) if fused is not None else F.gelu(up(x), approximate="tanh")
        return self.dense_4h_to_h(h)


class GLMBlock(nn.Module):
    """`x = ln1(h); h = x * alpha + attn(x); m = ln2(h); out = m * alpha + mlp(m)`.

    Note the residual is the *normalized* input scaled by alpha = sqrt(2 * 28), as in the
    reference (a GLM "DeepNorm"-style residual), not the raw input.
    """

    def __init__(self, cfg: GLMConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = SelfAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)
        self.alpha = math.sqrt(2 * cfg.num_residual_layers)

    def forward(self, h, rope, allowed, cache, start, prefix=None, kv_len=None):
        x = self.input_layernorm(h)
        h = x * self.alpha + self.attention(x, rope, allowed, cache, start, prefix, kv_len)
        m = self.post_attention_layernorm(h)
        return m * self.alpha + self.mlp(m)


class PrefixEncoder(nn.Module):
    """P-Tuning v2: prefix token i -> the keys and values of every layer at prefix slot i."""

    def __init__(self, cfg: GLMConfig) -> None:
        super().__init__()
        out = cfg.num_layers * cfg.hidden_size * 2
        if cfg.prefix_projection:
            self.embedding = nn.Embedding(cfg.pre_seq_len, cfg.hidden_size)
            self.trans = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh(),
                                       nn.Linear(cfg.hidden_size, out))
        else:
            self.embedding = nn.Embedding(cfg.pre_seq_len, out)
            self.trans = None

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        x = self.embedding(prefix)
        return self.trans(x) if self.trans is not None else x


class Transformer(nn.Module):
    """`transformer.*` of the checkpoint: embeddings, blocks, final layer norm, prefix encoder."""

    def __init__(self, cfg: GLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        if cfg.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(cfg)


class GLMBase(nn.Module):
    """What both GLM generations share: the P-Tuning v2 prefix and the stepping API (`embed`,
    `run_layers`, `head`; `forward` is the three in a row). A server runs them apart, a prompt a
    few layers per step (see `serving/batch.py`).

    A generation gives its `layers`, `word_embeddings`, `final_norm`, `output_layer`, `rope`
    (position ids -> the tables its blocks take) and `new_prefix_encoder`.
    """

    config: GLMConfig | GLM2Config

    @property
    def prefix_len(self) -> int:
        """Cache slots taken by the P-Tuning v2 prefix (0 without)."""
        return self.config.pre_seq_len or 0

    def prefix_kv(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys and values: [layers, B, kv_heads, pre_seq_len, head_dim] each."""
        cfg = self.config
        enc = self.transformer.prefix_encoder
        tokens = torch.arange(cfg.pre_seq_len, device=enc.embedding.weight.device)
        # the reference casts the prefix to the model's compute dtype (get_prompt's `dtype`, the
        # input embeddings' dtype): an fp32 model keeps an fp32 prefix
        kv = enc(tokens).to(dtype)
        # [P, layers * 2 * G * d] -> [layers * 2, G, P, d]: keys at 2i, values at 2i + 1
        kv = kv.view(cfg.pre_seq_len, cfg.num_layers * 2, cfg.kv_heads, cfg.head_dim)
        kv = F.dropout(kv, 0.1, self.training)  # the reference's prefix dropout (training only)
        kv = kv.permute(1, 2, 0, 3)
        k, v = kv[0::2], kv[1::2]
        return k.unsqueeze(1).expand(-1, batch, -1, -1, -1), v.unsqueeze(1).expand(-1, batch, -1, -1, -1)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, hidden] of `input_ids` [B, T]."""
        return self.word_embeddings(input_ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., vocab] of the last layer's hidden states [..., hidden] (final norm, then
        the output layer)."""
        return self.output_layer(self.final_norm(h))

    def run_layers(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv_cache: KVCache | None,
        start: int | torch.Tensor,
        layers: range,
    ) -> torch.Tensor:
        """Hidden states [B, T, hidden] through `layers` only (arguments as `hidden_states`).

        A prompt can go through the model a few layers at a time, so that a server decodes the
        running rows in between (GLM's prompt attends both ways: it cannot be cut into token
        chunks without changing its keys and values, but it can be cut between layers).
        """
        rope = self.rope(position_ids, h.dtype)
        allowed = None if attention_mask is None else ~attention_mask
        kv_len = None if isinstance(start, int) else int(start.max()) + h.shape[1]
        prefix_k = prefix_v = None
        if kv_cache is None and self.prefix_len:
            # training: the prefix from the encoder, concatenated in every layer (no cache)
            prefix_k, prefix_v = self.prefix_kv(h.shape[0], h.dtype)
        for i in layers:
            cache = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            prefix = None if prefix_k is None else (prefix_k[i], prefix_v[i])
            h = self.layers[i](h, rope, allowed, cache, start, prefix, kv_len)
        return h

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Final hidden states [B, T, hidden] (after the final norm).

        Args:
            input_ids: [B, T] token ids.
            position_ids: [B, 2, T] positions and block positions (v1); [B, T] positions (v2).
            attention_mask: [B or 1, 1, T, S] bool, True where attention is NOT allowed; S is
                start + T (cache slots 0..start+T-1, prefix included), or P + T without a cache
                for a P-Tuning v2 model (the prefix first). None: no mask at all (v1: full
                attention; v2 prompts need their causal mask, a one-token step none).
            kv_cache: cache to read slots [0, start) from and write [start, start+T) to.
            start: cache slot of the first input token; or a [B] tensor of one slot per row
                (rows of different lengths decoding together), S is then max(start) + T and the
                mask must hide each row's slots past its own.
        """
        h = self.run_layers(self.embed(input_ids), position_ids, attention_mask, kv_cache, start,
                            range(self.config.num_layers))
        return self.final_norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with `last_only`); arguments as `hidden_states`."""
        h = self.hidden_states(input_ids, position_ids, attention_mask, kv_cache, start)
        if last_only:
            h = h[:, -1:]
        return self.output_layer(h)


class GLMModel(GLMBase):
    """ChatGLM-6B: `transformer` + tied `lm_head`; parameter names match THUDM's checkpoints.

    Example:
        >>> import torch
        >>> from glmgym.chat.config import PRESETS
        >>> model = GLMModel(PRESETS["tiny"]).eval()
        >>> ids = torch.tensor([[5, 6, 7, 1001, 1004]])  # text, [gMASK], <sop>
        >>> pos = torch.tensor([[[0, 1, 2, 3, 3], [0, 0, 0, 0, 1]]])
        >>> model(ids, pos).shape
        torch.Size([1, 5, 1024])
    """

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.word_embeddings.weight  # tied, as in the reference
        rot_dim = config.head_dim // 2  # each half of a head rotates by its own position
        self.rotary = RotaryEmbedding(rot_dim, config.max_sequence_length + 1)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (of activations, layer norms and the KV cache), also for quantized models."""
        return self.transformer.final_layernorm.weight.dtype

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks."""
        return self.transformer.layers

    @property
    def word_embeddings(self) -> nn.Module:
        """The token embedding."""
        return self.transformer.word_embeddings

    @property
    def final_norm(self) -> nn.Module:
        """The norm after the last block."""
        return self.transformer.final_layernorm

    @property
    def output_layer(self) -> nn.Module:
        """hidden -> logits (the lm_head, tied to the embeddings)."""
        return self.lm_head

    def new_prefix_encoder(self) -> PrefixEncoder:
        """A fresh P-Tuning v2 prefix encoder for the config's `pre_seq_len` (fp32, on the model's
        device, as the reference keeps it)."""
        return PrefixEncoder(self.config).to(self.transformer.final_layernorm.weight.device)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, 2, T] -> the cosine and the signed sine tables of `_apply_rotary_2d`,
        [B, T, 1, 1, head_dim] each: over a head's first half those of the positions, over its
        second half those of the block positions; the sine negated on each half's first quarter
        (rotate-half puts -x2 there)."""
        r = self.rotary
        p = position_ids.transpose(1, 2)  # [B, 2, T] -> [B, T, 2 (pos, block)]
        # [B, T, 2, d/2] -> [B, T, 1, 1, d]
        cos = r.cos[p].flatten(-2)[:, :, None, None].to(dtype)
        sin = r.signed_sin[p].flatten(-2)[:, :, None, None].to(dtype)
        return cos, sin
