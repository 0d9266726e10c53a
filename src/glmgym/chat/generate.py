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
from glmgym.chat.sampling import RowSampling, sample  # noqa: F401 (RowSampling: the old import path)
from glmgym.chat.speculative import DraftStats, lookup_draft, verify
from glmgym.errors import GlmgymError

__all__ = ["GenerationConfig", "PromptBatch", "decode_one_token", "generate", "prefill"]


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

    def decode_positions(self, step: int, count: int = 1) -> torch.Tensor:
        """Positions of generated tokens `step` .. `step + count - 1` (0: the first), [B, 2, count]
        or [B, count]: v1's sit after <sop> ([gMASK]'s position, block positions from step + 2),
        v2's after the prompt."""
        i = torch.arange(step, step + count, device=self.lengths.device)
        if self.causal:
            return self.lengths[:, None] + i
        mask_pos = (self.context_len - 1)[:, None].expand(-1, count)
        return torch.stack([mask_pos, (i + 2).expand_as(mask_pos)], dim=1)

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


@torch.inference_mode()
def generate(model: GLMModel | GLM2Model, prompts: list[list[int]], cfg: GenerationConfig, *,
             eos_id: int | Sequence[int], pad_id: int, vocab_limit: int,
             stats: DraftStats | None = None) -> Iterator[list[list[int]]]:
    """Yield the new tokens of every prompt after each step (streaming; a step adds one token to
    each row, or several with `cfg.prompt_lookup_num_tokens`); a row stops at its first `eos_id`
    (one id, or several: the v2 chat models stop at a role token too).

    With prompt lookup, every row drafts from its own sequence; one forward verifies all rows'
    drafts and every row keeps as many tokens as the row that kept fewest (so the rows stay at one
    cache slot; each row's tokens are still exactly its own decoding's). `stats` counts the drafts.

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
    stops = set([eos_id] if isinstance(eos_id, int) else eos_id)
    seqs = [list(p) for p in prompts]  # each row's prompt and answer, where drafts are looked up
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    n = 0  # tokens generated per row (every row moves on together)
    logits = prefill(model, batch, cache)
    verified: list[list[int]] | None = None
    while True:
        if verified is None:  # a plain step: one token from the logits
            new = [[t] for t in sample(logits, cfg, vocab_limit, history, generator).tolist()]
        else:  # a verified step: as many tokens as the row that kept fewest
            m = min(len(verified[b]) for b in range(B) if not done[b])
            new = [row[:m] + [pad_id] * (m - len(row[:m])) for row in verified]
        for b, tokens in enumerate(new):
            if done[b]:
                new[b] = [pad_id] * len(tokens)
                continue
            for t in tokens:
                out[b].append(t)
                if t in stops:
                    done[b] = True
                    break
            seqs[b] += tokens
        n += len(new[0])
        yield out
        if all(done) or n >= steps:
            return
        fed = torch.tensor(new, device=device)  # [B, m]
        if cfg.repetition_penalty != 1.0:  # the only reader of the growing sequence
            history = torch.cat([history, fed], dim=1)
        start = P + T + n - 1  # cache slot of the last token
        drafts = [[] if done[b] else lookup_draft(seqs[b], cfg.prompt_lookup_num_tokens) for b in range(B)]
        # a forward emits at most K + 1 tokens: no more than the answer has room for
        K = min(max(map(len, drafts)), steps - n - 1)
        if K <= 0:
            if stats is not None:
                stats.sizes.append(0)
                stats.kept.append(0)
            km = None if key_masked is None else key_masked[:, : start + 1]
            logits = decode_one_token(model, fed[:, -1:], batch.decode_positions(n - 1), km, cache, start)
            verified = None
            continue
        lengths = [min(len(d), K) for d in drafts]
        draft_ids = torch.tensor([d[:K] + [pad_id] * (K - len(d[:K])) for d in drafts], device=device)
        ids = torch.cat([fed[:, -1:], draft_ids], dim=1)  # [B, K + 1]
        # causal over the new tokens; pad slots stay hidden
        slots = torch.arange(start + K + 1, device=device)
        mask = slots[None, :] > start + torch.arange(K + 1, device=device)[:, None]  # [K + 1, S]
        if key_masked is not None:
            mask = mask[None] | key_masked[:, None, : start + K + 1]
        mask = mask.expand(B, K + 1, start + K + 1)[:, None]
        logits = model(ids, batch.decode_positions(n - 1, K + 1), mask, kv_cache=cache, start=start)
        verified = verify(logits, draft_ids, lengths, [cfg] * B, vocab_limit,
                          history if cfg.repetition_penalty != 1.0 else None, generator)
        if stats is not None:
            stats.sizes.append(sum(lengths))
            stats.kept.append(sum(len(v) - 1 for v in verified))
