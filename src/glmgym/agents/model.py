"""Decision Transformer (Chen et al., 2021) as a plain `nn.Module`.

The module tree and parameter names follow Hugging Face's `DecisionTransformerModel` so that
checkpoints map one to one (see `checkpoint.py`); the projections are `nn.Linear` (weights
[out, in]) where HF uses GPT-2's `Conv1D` ([in, out]), and the checkpoint code transposes them.
Attention goes through `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glmgym.agents.checkpoint import CheckpointFiles, read_checkpoint, write_checkpoint
from glmgym.agents.config import DTConfig
from glmgym.errors import GlmgymError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["DecisionTransformer"]

class Dropout(nn.Module):
    """`nn.Dropout` with a cheaper random draw on CPU (same distribution up to p's rounding).

    PyTorch's CPU dropout draws one Bernoulli sample per element from its mt19937 generator
    (bernoulli_; MKL's vectorized generator is used on Intel CPUs only), and with the scaling
    and masking it costs 5.3 ms for the draws alone on a [64, 60, 128] activation on an AVX2 AMD
    EPYC. Here one 64-bit word of numpy's PCG64 makes four 16-bit draws, each kept when >= p (p
    rounded to a multiple of 1/65536): 0.6 ms for the same draws. With dropout on every block
    this was about a tenth of a training step. The PCG64 stream is seeded by one draw from
    torch's generator, so `torch.manual_seed` and a resumed torch RNG state still fix every mask.
    CUDA keeps PyTorch's fused kernel. Deviation from the reference: the random stream differs
    from torch's dropout (the distribution does not).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return x * keep_mask(x, self.p)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A [x.shape] tensor of 0 and 1/(1-p), each entry 0 with probability p (CPU, see `Dropout`)."""
    n = x.numel()
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # torch's RNG fixes the stream
    words = np.random.PCG64(seed).random_raw((n + 3) // 4)  # uint64, four 16-bit draws each
    draws = torch.from_numpy(words.view(np.int16)[:n]).view(x.shape)
    threshold = round(p * 65536) - 32768
    keep = torch.tensor(1.0 / (1.0 - p), dtype=x.dtype)
    return torch.where(draws >= threshold, keep, torch.zeros((), dtype=x.dtype))  # one pass


_ACTIVATIONS = {
    # in place: c_fc's output is not needed by its backward (ReLU's uses its own output), and a
    # fresh [B, 3K, 4h] buffer costs more than the ReLU itself on CPU (MLP.forward keeps it 2D)
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: DTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_dropout = Dropout(cfg.resid_pdrop)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, queries: slice | None = None
    ) -> torch.Tensor:
        """Attend from the tokens selected by `queries` (default: all) to all tokens of `x`."""
        B, T, C = x.shape
        hd = C // self.n_head
        w, b = self.c_attn.weight, self.c_attn.bias  # fused [3C, C]: rows are q, then k, then v
        if queries is None:
            q, k, v = self.c_attn(x).split(C, dim=2)
        else:
            # Only some outputs are needed (the last block): project q for those tokens only.
            q = F.linear(x[:, queries], w[:C], b[:C])
            k, v = F.linear(x, w[C:], b[C:]).split(C, dim=2)
        Tq = q.shape[1]
        # [B, T, C] -> [B, n_head, T, head_dim]
        q = q.view(B, Tq, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)
        if self.training and self.attn_pdrop > 0 and x.device.type == "cpu":
            # SDPA's CPU training path is the math one with torch's slower dropout: written out,
            # with `keep_mask`, a step is faster (and the math is the same).
            if attn_mask is None:
                attn_mask = torch.ones(Tq, T, dtype=torch.bool, device=x.device).tril(T - Tq)
            att = (q @ k.transpose(-1, -2)) * hd**-0.5  # [B, n_head, Tq, T]
            att = att.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1)
            y = (att * keep_mask(att, self.attn_pdrop)) @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.attn_pdrop if self.training else 0.0,
                is_causal=attn_mask is None,
            )
        y = y.transpose(1, 2).reshape(B, Tq, C)  # [B, n_head, Tq, head_dim] -> [B, Tq, C]
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: DTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.inner_size)
        self.act = _ACTIVATIONS[cfg.activation_function]()
        self.c_proj = nn.Linear(cfg.inner_size, cfg.hidden_size)
        self.dropout = Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, h] -> [B*T, h]: c_fc's output is then a plain matrix, not a view, so the in-place
        # ReLU costs autograd nothing; on a view it adds a CopySlices whose backward zero-fills and
        # copies a [B*T, 4h] gradient (two 8 MB passes a block at batch 64, K=20 on CPU)
        h = self.act(self.c_fc(x.reshape(-1, x.shape[-1])))
        return self.dropout(self.c_proj(h).view(*x.shape[:-1], -1))


class Block(nn.Module):
    """Pre-LayerNorm GPT-2 block."""

    def __init__(self, cfg: DTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, queries: slice | None = None
    ) -> torch.Tensor:
        """Transform all tokens, or only those selected by `queries` (they still see all)."""
        h = self.attn(self.ln_1(x), attn_mask, queries)
        x = (x if queries is None else x[:, queries]) + h
        return x + self.mlp(self.ln_2(x))


class GPTEncoder(nn.Module):
    """GPT-2 over input embeddings; `wte` is never used but kept so checkpoint keys match HF."""

    def __init__(self, cfg: DTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.hidden_size)
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)

    def forward(
        self, inputs_embeds: torch.Tensor, attn_mask: torch.Tensor | None, outputs: slice | None = None
    ) -> torch.Tensor:
        """Encode [B, T, h] embeddings; return the final states of the tokens in `outputs` (all)."""
        # HF's DecisionTransformerModel passes position_ids of zeros, so every token gets wpe[0];
        # time enters through the timestep embedding instead. We add the same row to match it.
        x = self.drop(inputs_embeds + self.wpe.weight[0])
        *first, last = self.h
        for block in first:
            x = block(x, attn_mask)
        # The last block runs only for the tokens whose outputs are wanted: a causal model's
        # other outputs cannot influence them (saves ~2/3 of the last block).
        if outputs is not None:
            T = inputs_embeds.shape[1]
            if attn_mask is None:
                attn_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            attn_mask = attn_mask[..., outputs, :]
        return self.ln_f(last(x, attn_mask, outputs))


class DecisionTransformer(nn.Module):
    """Decision Transformer: (return-to-go, state, action) tokens -> a causal GPT -> actions.

    Example:
        >>> import torch
        >>> from glmgym.agents import DecisionTransformer, DTConfig
        >>> model = DecisionTransformer(DTConfig(state_dim=11, act_dim=3)).eval()
        >>> B, K = 2, 20
        >>> actions = model(torch.randn(B, K, 11), torch.zeros(B, K, 3), torch.ones(B, K, 1),
        ...                 torch.arange(K).expand(B, K))
        >>> actions.shape
        torch.Size([2, 20, 3])
    """

    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_timestep = nn.Embedding(config.max_ep_len, h)
        self.embed_return = nn.Linear(1, h)
        self.embed_state = nn.Linear(config.state_dim, h)
        self.embed_action = nn.Linear(config.act_dim, h)
        self.embed_ln = nn.LayerNorm(h)  # HF uses the default eps here, not layer_norm_epsilon
        self.encoder = GPTEncoder(config)
        # predict_state / predict_return are not trained (as in the paper) but kept for HF parity.
        self.predict_state = nn.Linear(h, config.state_dim)
        self.predict_action = nn.Sequential(
            nn.Linear(h, config.act_dim), *([nn.Tanh()] if config.action_tanh else [])
        )
        self.predict_return = nn.Linear(h, 1)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections (1/sqrt(2 * n_layer)).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the action at every timestep of the window.

        Args:
            states: [B, K, state_dim] normalized states.
            actions: [B, K, act_dim] actions (the last one is a placeholder at inference).
            returns_to_go: [B, K, 1] scaled returns-to-go.
            timesteps: [B, K] integer timesteps within the episode.
            attention_mask: [B, K], 1 for real steps and 0 for (left) padding; None: all real.

        Returns:
            [B, K, act_dim] action predictions; the one at step t sees steps <= t only.
        """
        # Tokens 1, 4, 7, ... are the state tokens s_t; their outputs predict a_t. Only those
        # are computed in the last block ([B, K, h]); HF computes all 3K and then slices.
        return self._predict(states, actions, returns_to_go, timesteps, attention_mask, slice(1, None, 3))

    def predict_last_action(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """The action for the last step of unpadded windows, [B, act_dim] (inference).

        Equal to `forward(...)[:, -1]`, but the last block runs for that one token only.
        """
        K = states.shape[1]
        out = slice(3 * K - 2, 3 * K - 1)  # the state token of the last step
        return self._predict(states, actions, returns_to_go, timesteps, None, out)[:, 0]

    def _predict(self, states, actions, returns_to_go, timesteps, attention_mask, outputs: slice):
        B, K = states.shape[:2]
        time_emb = self.embed_timestep(timesteps)
        # (R_1, s_1, a_1, R_2, s_2, a_2, ...): [B, K, 3, h] -> [B, 3K, h]
        tokens = torch.stack(
            (
                self.embed_return(returns_to_go) + time_emb,
                self.embed_state(states) + time_emb,
                self.embed_action(actions) + time_emb,
            ),
            dim=2,
        ).reshape(B, 3 * K, -1)
        tokens = self.embed_ln(tokens)
        x = self.encoder(tokens, _attention_bias(attention_mask, K, tokens.device), outputs)
        return self.predict_action(x)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> DecisionTransformer:
        """Load the network of a checkpoint directory (glmgym's or transformers').

        The network expects normalized states; `Policy.from_pretrained` loads it together with the
        checkpoint's state mean/std, reward scale and context length, ready for `evaluate`.

        Raises:
            GlmgymError: missing or malformed files, or weights that do not fit `config.json`.
        """
        return cls.from_checkpoint_files(read_checkpoint(path), device)

    @classmethod
    def from_checkpoint_files(cls, files: CheckpointFiles,
                              device: str | torch.device = "cpu") -> DecisionTransformer:
        """Build the network from files `read_checkpoint` has read (names and shapes checked)."""
        with torch.device("meta"):
            model = cls(files.config)
        expected, state = model.state_dict(), files.state
        missing, unexpected = set(expected) - set(state), set(state) - set(expected)
        if missing or unexpected:
            raise GlmgymError(
                f"weights in {files.path} do not match config.json: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        for name, ref in expected.items():
            if tuple(state[name].shape) != tuple(ref.shape):
                raise GlmgymError(
                    f"weights in {files.path} do not match config.json: {name} has shape "
                    f"{tuple(state[name].shape)}, expected {tuple(ref.shape)}"
                )
        model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
        return model.to(device).eval()

    def save_pretrained(self, path: str | Path, extras: dict | None = None,
                        extra_files: dict | None = None) -> Path:
        """Write `config.json` + `model.safetensors` in HF layout (atomically); see
        `write_checkpoint` for `extras` (`glmgym.json`) and `extra_files`."""
        return write_checkpoint(path, self.config, self.state_dict(), extras, extra_files)


def _attention_bias(attention_mask: torch.Tensor | None, K: int, device: torch.device):
    """Boolean [B, 1, 3K, 3K] mask (True = may attend), or None for the plain causal fast path."""
    if attention_mask is None:
        return None
    keys = attention_mask.bool().repeat_interleave(3, dim=1)  # [B, K] -> [B, 3K], one per token
    causal = torch.ones(3 * K, 3 * K, dtype=torch.bool, device=device).tril()
    # Every token may also see itself. That changes nothing for real tokens and keeps fully
    # padded rows from producing NaNs (their outputs are never used: no loss, no action).
    eye = torch.eye(3 * K, dtype=torch.bool, device=device)
    return (causal & (keys[:, None, None, :] | eye))
