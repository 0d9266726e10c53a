"""Generation as small functions (gpt-fast style): `prefill -> decode_one_token -> generate`.

Prompts are left-padded to one length; the KV cache is preallocated for the longest sequence the
call may produce. Sampling follows Hugging Face's processors in the reference's order:
NaN/Inf guard, repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from glmgym.chat.config import GenerationConfig
from glmgym.chat.model import GLMModel, KVCache
from glmgym.errors import GlmgymError

__all__ = ["GenerationConfig", "PromptBatch", "decode_one_token", "generate", "prefill", "sample"]


@dataclass
class PromptBatch:
    """Left-padded prompts with ChatGLM's 2D positions and prefix-LM mask."""

    input_ids: torch.Tensor
    """[B, T]."""
    position_ids: torch.Tensor
    """[B, 2, T]: positions, block positions."""
    pad: torch.Tensor
    """[B] number of left pad tokens."""
    context_len: torch.Tensor
    """[B] tokens before <sop> (the bidirectional context), pads excluded."""

    @classmethod
    def build(cls, prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> PromptBatch:
        """Pad prompts (each ending with [gMASK] <sop>) on the left and derive positions."""
        T = max(len(p) for p in prompts)
        pad = torch.tensor([T - len(p) for p in prompts])
        ids = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts])
        ctx = torch.tensor([len(p) - 1 for p in prompts])  # <sop> is the last prompt token
        r = torch.arange(T)[None, :] - pad[:, None]  # index within the real tokens, < 0 at pads
        mask_pos = (ctx - 1)[:, None]  # [gMASK] just before <sop>
        pos = torch.where(r < ctx[:, None], r, mask_pos).clamp(min=0)
        block = (r - ctx[:, None] + 1).clamp(min=0)
        return cls(ids.to(device), torch.stack([pos, block], 1).to(device), pad.to(device), ctx.to(device))

    def attention_mask(self, prefix_len: int = 0) -> torch.Tensor:
        """[B, 1, T, P + T] bool, True = masked: prefix-LM over real tokens, pads see themselves."""
        B, T = self.input_ids.shape
        device = self.input_ids.device
        i = torch.arange(T, device=device)
        r = i[None, :] - self.pad[:, None]  # [B, T]
        real = r >= 0
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


def sample(logits: torch.Tensor, cfg: GenerationConfig, vocab_limit: int,
           previous: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row of `logits` [B, V]; never an id >= vocab_limit."""
    logits = logits.float()
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bad.any():  # the reference's InvalidScoreLogitsProcessor: zeros, and token 5 made likely
        logits[bad] = 0.0
        logits[bad, 5] = 5e4
    logits[:, vocab_limit:] = float("-inf")  # rows past the tokenizer's pieces are unused
    if cfg.repetition_penalty != 1.0 and previous is not None:
        seen = logits.gather(1, previous)
        seen = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
        logits = logits.scatter(1, previous, seen)
    # below 1e-5 the tempered distribution is a point mass to fp32 precision (and 1/T overflows)
    if not cfg.do_sample or cfg.temperature < 1e-5:
        return logits.argmax(dim=-1)
    # shift the max to 0 first: a small temperature then gives -inf, never inf - inf = NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely ones already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        drop[:, 0] = False  # also when top_p rounds to 0 in fp32
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate(model: GLMModel, prompts: list[list[int]], cfg: GenerationConfig, *, eos_id: int,
             pad_id: int, vocab_limit: int) -> Iterator[list[list[int]]]:
    """Yield the new tokens of every prompt after each step (streaming); stops at <eop>.

    Raises:
        GlmgymError: a prompt leaves no room for an answer within max_length.
    """
    device = next(model.parameters()).device
    dtype = model.dtype
    batch = PromptBatch.build(prompts, pad_id, device)
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
    mask_pos = batch.context_len - 1
    for step in range(steps):
        token = sample(logits, cfg, vocab_limit, history, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for b, t in enumerate(token.tolist()):
            if not done[b]:
                out[b].append(t)
        done |= token == eos_id
        yield out
        if bool(done.all()) or step == steps - 1:
            return
        if cfg.repetition_penalty != 1.0:  # the only reader of the growing sequence
            history = torch.cat([history, token[:, None]], dim=1)
        # the new token sits after <sop>: position = [gMASK]'s index, block position = step + 2
        pos = torch.stack([mask_pos, torch.full_like(mask_pos, step + 2)], dim=1)[:, :, None]
        start = P + T + step
        km = None if key_masked is None else key_masked[:, : start + 1]
        logits = decode_one_token(model, token[:, None], pos, km, cache, start)
