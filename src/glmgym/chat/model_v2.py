"""The second-generation GLM block (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat) in plain PyTorch.

Equal to THUDM's `modeling_chatglm.py` of those models (the three share the block): RMSNorm,
SwiGLU, grouped-query attention over `multi_query_group_num` key/value groups, rotary embedding on
the first half of each head (interleaved pairs), causal attention over 1D positions, an untied
output layer. Our choices, as in `model.py`:

- batch-first tensors ([B, T, ...]); the reference is sequence-first;
- the KV cache (`KVCache`, preallocated, written in place) stores the groups only, [.., G, S, d];
  the reference expands them to every head before attending, we attend per group (SDPA's
  `enable_gqa`, or the query heads of a group as one [H/G]-row query when decoding on a CPU);
- the same stepping API as the v1 model (`embed`, `run_layers`, `head`), position ids [B, T]
  instead of v1's [B, 2, T], and the same mask convention (True where attention is not allowed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from glmgym.chat.config import GLM2Config
from glmgym.chat.model import GLMBase, decode_attention, write_cache

__all__ = ["GLM2Block", "GLM2Model", "RMSNorm", "rotary_tables"]


class RMSNorm(nn.Module):
    """`w * x / rms(x)` with the mean square in fp32, as the reference."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)).to(x.dtype)


def _norm(cfg: GLM2Config) -> nn.Module:
    return (
        RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        if cfg.rmsnorm
        else nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
    )


def rotary_tables(cfg: GLM2Config, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, head_dim / 4] for the rotary half of a head (fp32).

    ChatGLM3-32k/128k and GLM-4 scale the base by `rope_ratio`; ChatGLM2-6B-32k divides the
    positions by it instead (each reference does one or the other).
    """
    rot = cfg.head_dim // 2
    base = 10000.0 * (cfg.rope_ratio if cfg.family != "chatglm2" else 1.0)
    theta = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    t = torch.arange(positions, dtype=torch.float32)
    if cfg.family == "chatglm2":
        t = t / cfg.rope_ratio
    angles = torch.outer(t, theta)  # [P, rot / 2]
    return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, d]; cos/sin: [B, T, 1, d/4]. Rotates the pairs (x[2i], x[2i+1]) of the
    first half of each head; the second half passes."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.unflatten(-1, (-1, 2))  # [B, T, heads, rot/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((out, x_pass), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: GLM2Config) -> None:
        super().__init__()
        self.num_heads, self.groups, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        qkv = (self.num_heads + 2 * self.groups) * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, qkv, bias=cfg.add_bias_linear or cfg.add_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.add_bias_linear)
        self._decode: dict[tuple, Callable] = {}

    def forward(self, x, rope, allowed, cache, start, prefix=None, kv_len=None):
        B, T, _ = x.shape
        H, G, d = self.num_heads, self.groups, self.head_dim
        # [B, T, (H + 2G) d] -> q [B, H, T, d], k and v [B, G, T, d] (queries, then keys, then values);
        # q and k rotate together, [B, T, H + G, d] (half the small ops of a decoding step's rotary)
        qk, v = self.query_key_value(x).split([(H + G) * d, G * d], dim=-1)
        q, k = _apply_rotary(qk.view(B, T, H + G, d), *rope).split([H, G], dim=2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, G, d).transpose(1, 2)
        if cache is not None:
            k, v = write_cache(cache, k, v, start, kv_len)
        elif prefix is not None:  # training: the prefix's keys/values in front, no rotary
            k, v = torch.cat((prefix[0], k), dim=2), torch.cat((prefix[1], v), dim=2)
        if T == 1 and x.device.type == "cpu":
            # decoding: the H/G query heads of a group read its keys once, as one [H/G]-row query
            key = (q.device, q.dtype)
            attend = self._decode.get(key)
            if attend is None:
                attend = self._decode[key] = decode_attention(q.device, q.dtype, grouped=G != H)
            y = attend(q.view(B, G, H // G, d), k, v, allowed).reshape(B, H, 1, d)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=G != H)
        return self.dense(y.transpose(1, 2).reshape(B, T, H * d))  # [B, H, T, d] -> [B, T, H d]


class MLP(nn.Module):
    def __init__(self, cfg: GLM2Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=cfg.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # SwiGLU
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLM2Block(nn.Module):
    """Pre-norm block: `h = h + attn(norm(h)); h = h + mlp(norm(h))`."""

    def __init__(self, cfg: GLM2Config) -> None:
        super().__init__()
        self.post_norm_residual = cfg.apply_residual_connection_post_layernorm
        self.input_layernorm = _norm(cfg)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, h, rope, allowed, cache, start, prefix=None, kv_len=None):
        x = self.input_layernorm(h)
        y = self.self_attention(x, rope, allowed, cache, start, prefix, kv_len)
        h = (x if self.post_norm_residual else h) + y
        m = self.post_attention_layernorm(h)
        return (m if self.post_norm_residual else h) + self.mlp(m)


class PrefixEncoder(nn.Module):
    """P-Tuning v2 of the v2 models: prefix token i -> every layer's key/value groups at slot i."""

    def __init__(self, cfg: GLM2Config) -> None:
        super().__init__()
        kv_size = cfg.num_layers * cfg.head_dim * cfg.kv_heads * 2
        self.embedding = nn.Embedding(cfg.pre_seq_len, kv_size)
        # the v2 reference's projection maps kv_size -> hidden -> kv_size (v1: hidden -> hidden -> out)
        self.trans = (
            nn.Sequential(nn.Linear(kv_size, cfg.hidden_size), nn.Tanh(), nn.Linear(cfg.hidden_size, kv_size))
            if cfg.prefix_projection
            else None
        )

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        x = self.embedding(prefix)
        return self.trans(x) if self.trans is not None else x


class Embedding(nn.Module):
    def __init__(self, cfg: GLM2Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)


class Encoder(nn.Module):
    def __init__(self, cfg: GLM2Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLM2Block(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = _norm(cfg) if cfg.post_layer_norm else nn.Identity()


class Transformer(nn.Module):
    """`transformer.*` of the checkpoint."""

    def __init__(self, cfg: GLM2Config) -> None:
        super().__init__()
        self.embedding = Embedding(cfg)
        self.encoder = Encoder(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)
        if cfg.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(cfg)


class GLM2Model(GLMBase):
    """ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B-chat; parameter names match THUDM's checkpoints.

    Example:
        >>> import torch
        >>> from glmgym.chat.config import GLM2Config
        >>> cfg = GLM2Config(num_layers=2, padded_vocab_size=256, hidden_size=64, ffn_hidden_size=96,
        ...                  kv_channels=16, num_attention_heads=4, seq_length=128)
        >>> model = GLM2Model(cfg).eval()
        >>> ids = torch.tensor([[5, 6, 7]])
        >>> model(ids, torch.arange(3)[None]).shape
        torch.Size([1, 3, 256])
    """

    def __init__(self, config: GLM2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.set_rotary()

    def set_rotary(self, device: torch.device | None = None) -> None:
        """(Re)build the rotary tables (on `device`; after building on the meta device, say)."""
        cos, sin = rotary_tables(self.config, self.config.seq_length + 1)
        self.register_buffer("rope_cos", cos if device is None else cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin if device is None else sin.to(device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (of activations, norms and the KV cache), also for quantized models."""
        return self.transformer.encoder.layers[0].input_layernorm.weight.dtype

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks."""
        return self.transformer.encoder.layers

    @property
    def word_embeddings(self) -> nn.Module:
        """The token embedding."""
        return self.transformer.embedding.word_embeddings

    @property
    def final_norm(self) -> nn.Module:
        """The norm after the last block (identity without `post_layer_norm`)."""
        return self.transformer.encoder.final_layernorm

    @property
    def output_layer(self) -> nn.Module:
        """hidden -> logits (untied)."""
        return self.transformer.output_layer

    def new_prefix_encoder(self) -> PrefixEncoder:
        """A fresh P-Tuning v2 prefix encoder for the config's `pre_seq_len` (fp32, on the model's
        device, as the reference keeps it)."""
        return PrefixEncoder(self.config).to(self.transformer.embedding.word_embeddings.weight.device)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [B, T] -> cos and sin [B, T, 1, d/4]."""
        return (self.rope_cos[position_ids].unsqueeze(2).to(dtype),
                self.rope_sin[position_ids].unsqueeze(2).to(dtype))
