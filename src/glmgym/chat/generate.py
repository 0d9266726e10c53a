"""Generation as small functions (gpt-fast style): `prefill -> decode_one_token -> generate`.

Prompts are left-padded to one length; the KV cache is preallocated for the longest sequence the
call may produce. Sampling follows Hugging Face's processors in the reference's order:
NaN/Inf guard, repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from glmgym.chat.config import GenerationConfig
from glmgym.chat.model import GLMModel, KVCache
from glmgym.chat.model_v2 import GLM2Model
from glmgym.errors import GlmgymError

__all__ = ["GenerationConfig", "PromptBatch", "RowSampling", "decode_one_token", "generate", "prefill",
           "sample"]


@dataclass
class PromptBatch:
    """Padded prompts with their positions and mask: ChatGLM-6B's 2D positions and prefix-LM mask,
    or the v2 block's 1D positions and causal mask (`causal`). The one builder for `generate`'s
    left-padded batches and the server's right-padded prefill groups."""

    input_ids: torch.Tensor
    """[B, T]."""
    position_ids: torch.Tensor
    """[B, 2, T]: positions, block positions (v1); [B, T] positions (causal, v2)."""
    pad: torch.Tensor
    """[B] number of left pad tokens (0 when padded on the right)."""
    context_len: torch.Tensor
    """[B] tokens before <sop> (the bidirectional context), pads excluded; 0 when causal."""
    lengths: torch.Tensor
    """[B] prompt tokens, pads excluded."""
    causal: bool = False
    """The v2 block: causal attention over 1D positions."""

    @classmethod
    def build(cls, prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu",
              left: bool = True, causal: bool = False) -> PromptBatch:
        """Pad prompts on the left (or the right) and derive positions: a v1 prompt ends with
        [gMASK] <sop>; a `causal` (v2) one is any sequence, its positions count its tokens."""
        T = max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        pad = T - lengths if left else torch.zeros_like(lengths)
        ids = torch.tensor([[pad_id] * (T - len(p)) + list(p) if left else list(p) + [pad_id] * (T - len(p))
                            for p in prompts])
        r = torch.arange(T)[None, :] - pad[:, None]  # index within the real tokens, < 0 at left pads
        if causal:  # the reference's left pads take position 0, as its tokenizer writes them
            return cls(ids.to(device), r.clamp(min=0).to(device), pad.to(device),
                       torch.zeros_like(lengths).to(device), lengths.to(device), True)
        ctx = lengths - 1  # <sop> is the last prompt token
        mask_pos = (ctx - 1)[:, None]  # [gMASK] just before <sop>
        pos = torch.where(r < ctx[:, None], r, mask_pos).clamp(min=0)
        block = (r - ctx[:, None] + 1).clamp(min=0)
        return cls(ids.to(device), torch.stack([pos, block], 1).to(device), pad.to(device), ctx.to(device),
                   lengths.to(device))

    def decode_positions(self, step: int) -> torch.Tensor:
        """Positions of the `step`-th generated token (0: the first), [B, 2, 1] or [B, 1]: v1's
        sits after <sop> ([gMASK]'s position, block position step + 2), v2's after the prompt."""
        if self.causal:
            return (self.lengths + step)[:, None]
        mask_pos = self.context_len - 1
        return torch.stack([mask_pos, torch.full_like(mask_pos, step + 2)], dim=1)[:, :, None]

    def attention_mask(self, prefix_len: int = 0) -> torch.Tensor:
        """[B, 1, T, P + T] bool, True = masked: prefix-LM (causal for v2) over real tokens, pads
        see themselves."""
        B, T = self.input_ids.shape
        device = self.input_ids.device
        i = torch.arange(T, device=device)
        r = i[None, :] - self.pad[:, None]  # [B, T]
        real = (r >= 0) & (r < self.lengths[:, None])
        key_ctx = (r >= 0) & (r < self.context_len[:, None])
        allowed = (i[None, None, :] <= i[None, :, None]) | key_ctx[:, None, :]  # [B, Tq, Tk]
        allowed = allowed & real[:, None, :]
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)  # no empty pad rows
        prefix = torch.ones(B, T, prefix_len, dtype=torch.bool, device=device)
        return ~torch.cat([prefix, allowed], dim=2)[:, None]


def prefill(model: GLMModel, batch: PromptBatch, cache: KVCache) -> torch.Tensor:
    """Run the prompts; return next-token logits [B, vocab]."""
    P = model.prefix_len
    return model(batch.input_ids, batch.position_ids, batch.attention_mask(P), kv_cache=cache,
                 start=P, last_only=True)[:, -1]


def decode_one_token(model: GLMModel, token: torch.Tensor, position_ids: torch.Tensor,
                     key_masked: torch.Tensor | None, cache: KVCache, start: int) -> torch.Tensor:
    """One cached step: token [B, 1] at cache slot `start`; returns logits [B, vocab].

    `key_masked` [B, start + 1] is True at pad slots (None when no sequence is padded).
    """
    mask = None if key_masked is None else key_masked[:, None, None, :]
    return model(token, position_ids, mask, kv_cache=cache, start=start)[:, -1]


@dataclass
class RowSampling:
    """Sampling options of each row of a batch, as [B] tensors (rows may differ in every option),
    with what the rows have in common worked out once (a decoding step then skips the checks)."""

    temperature: torch.Tensor
    """[B] float."""
    top_k: torch.Tensor
    """[B] long (0: off)."""
    top_p: torch.Tensor
    """[B] float."""
    repetition_penalty: torch.Tensor
    """[B] float (1: off)."""
    sampled_rows: torch.Tensor
    """[S] long: the rows that sample (the others are greedy)."""
    any_top_k: bool
    """Some sampled row has top_k > 0."""
    any_top_p: bool
    """Some sampled row has top_p < 1."""
    any_penalty: bool
    """Some row has a repetition penalty."""

    @classmethod
    def of(cls, cfgs: list[GenerationConfig], device: torch.device | str = "cpu") -> RowSampling:
        """The options of `cfgs`, one per row."""
        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        # below 1e-5 the tempered distribution is a point mass to fp32 precision (and 1/T overflows)
        sampled = [i for i, c in enumerate(cfgs) if c.do_sample and c.temperature >= 1e-5]
        return cls(t([c.temperature for c in cfgs], torch.float32),
                   t([c.top_k for c in cfgs], torch.long), t([c.top_p for c in cfgs], torch.float32),
                   t([c.repetition_penalty for c in cfgs], torch.float32), t(sampled, torch.long),
                   any(cfgs[i].top_k > 0 for i in sampled), any(cfgs[i].top_p < 1.0 for i in sampled),
                   any(c.repetition_penalty != 1.0 for c in cfgs))


def sample(logits: torch.Tensor, cfg: GenerationConfig | RowSampling, vocab_limit: int,
           previous: torch.Tensor | None = None,
           generator: torch.Generator | list[torch.Generator | None] | None = None) -> torch.Tensor:
    """Pick the next token of each row of `logits` [B, V]; never an id >= vocab_limit.

    Args:
        logits: [B, V] next-token logits (not modified).
        cfg: one `GenerationConfig` for every row, or a `RowSampling` with each row's options.
        vocab_limit: ids from here on are never picked.
        previous: [B, N] ids each row has seen, for the repetition penalty (a row may repeat one
            of its ids as padding: a repeated id is penalized once).
        generator: one generator for all rows, or one per row (None: torch's global one). Rows
            that share a generator draw in one call, so a row with its own generator draws the
            same whatever else is in the batch.
    """
    B = logits.shape[0]
    opts = cfg if isinstance(cfg, RowSampling) else RowSampling.of([cfg] * B, logits.device)
    logits = logits.float().clone()
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bad.any():  # the reference's InvalidScoreLogitsProcessor: zeros, and token 5 made likely
        logits[bad] = 0.0
        logits[bad, 5] = 5e4
    logits[:, vocab_limit:] = float("-inf")  # rows past the tokenizer's pieces are unused
    if previous is not None and opts.any_penalty:
        penalty = opts.repetition_penalty[:, None]
        seen = logits.gather(1, previous)
        seen = torch.where(seen > 0, seen / penalty, seen * penalty)
        logits = logits.scatter(1, previous, seen)
    tokens = logits.argmax(dim=-1)
    rows = opts.sampled_rows
    if not len(rows):
        return tokens
    x = logits[rows]
    # shift the max to 0 first: a small temperature then gives -inf, never inf - inf = NaN
    x = (x - x.max(dim=-1, keepdim=True).values) / opts.temperature[rows, None]
    if opts.any_top_k:
        top_k = opts.top_k[rows]
        k = top_k.clamp(1, x.shape[-1])
        kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        x = x.masked_fill((top_k[:, None] > 0) & (x < kth), float("-inf"))
    if opts.any_top_p:
        top_p = opts.top_p[rows, None]
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        # drop a token when the more likely ones already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1.0)
        drop[:, 0] = False  # also when top_p rounds to 0 in fp32
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)
    probs = x.softmax(dim=-1)
    gens = generator if isinstance(generator, list) else [generator] * B
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows.tolist()):
        groups.setdefault(id(gens[row]), []).append(i)
    for members in groups.values():
        picked = torch.multinomial(probs[members], 1, generator=gens[int(rows[members[0]])]).squeeze(1)
        tokens[rows[members]] = picked
    return tokens


@torch.inference_mode()
def generate(model: GLMModel | GLM2Model, prompts: list[list[int]], cfg: GenerationConfig, *,
             eos_id: int | Sequence[int], pad_id: int, vocab_limit: int) -> Iterator[list[list[int]]]:
    """Yield the new tokens of every prompt after each step (streaming); a row stops at its
    first `eos_id` (one id, or several: the v2 chat models stop at a role token too).

    Raises:
        GlmgymError: a prompt leaves no room for an answer within max_length.
    """
    device = next(model.parameters()).device
    dtype = model.dtype
    batch = PromptBatch.build(prompts, pad_id, device, causal=model.config.version == 2)
    B, T = batch.input_ids.shape
    limit = min(cfg.max_length, model.config.max_sequence_length)
    longest = max(len(p) for p in prompts)
    if longest >= limit:
        raise GlmgymError(f"the prompt has {longest} tokens; max_length {limit} leaves no room for an answer")
    steps = limit - longest if cfg.max_new_tokens is None else min(cfg.max_new_tokens, limit - longest)
    P = model.prefix_len
    cache = KVCache.empty(model.config, B, P + T + steps, dtype, device)
    if P:
        k, v = model.prefix_kv(B, dtype)
        cache.k[:, :, :, :P] = k
        cache.v[:, :, :, :P] = v
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    key_masked = None
    if bool((batch.pad > 0).any()):
        key_masked = torch.zeros(B, P + T + steps, dtype=torch.bool, device=device)
        key_masked[:, P:P + T] = torch.arange(T, device=device)[None, :] < batch.pad[:, None]
    history = batch.input_ids
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = prefill(model, batch, cache)
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
    for step in range(steps):
        token = sample(logits, cfg, vocab_limit, history, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for b, t in enumerate(token.tolist()):
            if not done[b]:
                out[b].append(t)
        done |= torch.isin(token, stops)
        yield out
        if bool(done.all()) or step == steps - 1:
            return
        if cfg.repetition_penalty != 1.0:  # the only reader of the growing sequence
            history = torch.cat([history, token[:, None]], dim=1)
        pos = batch.decode_positions(step)
        start = P + T + step
        km = None if key_masked is None else key_masked[:, : start + 1]
        logits = decode_one_token(model, token[:, None], pos, km, cache, start)
