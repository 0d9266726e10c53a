"""Sampling as the reference's logits processors do it, per row: NaN/Inf guard, repetition
penalty, temperature, top-k, top-p; each row may have its own options and its own generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmgym.chat.config import GenerationConfig

__all__ = ["RowSampling", "process_logits", "sample"]


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
    all_sampled: bool = False
    """Every row samples (`sampled_rows` is 0..B-1): the sampled rows need no gather."""
    sampled_temperature: torch.Tensor | float = 1.0
    """The sampled rows' temperatures: [S, 1], or one float when they all have the same (the
    common case: the step then does fewer tensor ops)."""
    sampled_top_p: torch.Tensor | float = 1.0
    """The sampled rows' top_p: [S, 1], or one float when they all have the same."""

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
                   any(c.repetition_penalty != 1.0 for c in cfgs), len(sampled) == len(cfgs),
                   _column_or_float([cfgs[i].temperature for i in sampled], device),
                   _column_or_float([cfgs[i].top_p for i in sampled], device))


def _column_or_float(values: list[float], device) -> torch.Tensor | float:
    """One float when every row has the same value (as fp32 rounds it), else an [S, 1] column."""
    column = torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1)
    return float(column[0]) if len(set(values)) == 1 else column


def process_logits(logits: torch.Tensor, opts: RowSampling, vocab_limit: int,
                   previous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's logits processors, for every row of `logits` [B, V] (not modified).

    Returns:
        The scores [B, V] after the NaN/Inf guard, the vocabulary limit and the repetition
        penalty (a greedy row picks their argmax), and the sampled rows' (`opts.sampled_rows`)
        tempered, top-k and top-p filtered scores [S, V] (their softmax is what a row draws
        from), or None when no row samples.
    """
    logits = logits.float().clone()
    # a row's sum is finite unless the row holds a NaN or an infinity (or overflows: then the
    # exact test decides); one reduction instead of a full-size mask on every step
    if not bool(torch.isfinite(logits.sum(dim=-1)).all()):
        bad = ~torch.isfinite(logits).all(dim=-1)
        # the reference's InvalidScoreLogitsProcessor: zeros, and token 5 made likely
        logits[bad] = 0.0
        logits[bad, 5] = 5e4
    logits[:, vocab_limit:] = float("-inf")  # rows past the tokenizer's pieces are unused
    if previous is not None and opts.any_penalty:
        penalty = opts.repetition_penalty[:, None]
        seen = logits.gather(1, previous)
        seen = torch.where(seen > 0, seen / penalty, seen * penalty)
        logits = logits.scatter(1, previous, seen)
    rows = opts.sampled_rows
    if not len(rows):
        return logits, None
    x = logits if opts.all_sampled else logits[rows]
    # shift the max to 0 first: a small temperature then gives -inf, never inf - inf = NaN
    x = (x - x.max(dim=-1, keepdim=True).values) / opts.sampled_temperature
    if opts.any_top_k:
        top_k = opts.top_k[rows]
        k = top_k.clamp(1, x.shape[-1])
        kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        x = x.masked_fill((top_k[:, None] > 0) & (x < kth), float("-inf"))
    if opts.any_top_p:
        x = _top_p(x, opts.sampled_top_p)
    return logits, x


TOP_P_CANDIDATES = 1024
"""Top-p looks among this many most likely tokens first (a full sort of a 130k vocabulary is tens
of ms a token on a CPU); when they do not reach top_p it sorts them all."""


def _top_p(x: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Keep each row's smallest set of most likely tokens whose mass reaches top_p ([S, 1], or one
    float below 1 for every row): a token is dropped when the more likely ones already reach it
    (the first always stays)."""
    per_row = isinstance(top_p, torch.Tensor)
    n = min(TOP_P_CANDIDATES, x.shape[-1])
    if n < x.shape[-1]:
        probs = x.softmax(dim=-1)
        cand_p, cand_i = probs.topk(n, dim=-1)  # [S, n], most likely first
        reached = cand_p.sum(dim=-1, keepdim=True) >= top_p
        if bool((reached | (top_p >= 1.0) if per_row else reached).all()):
            # every token outside the candidates has at least their mass before it: dropped
            drop = cand_p.cumsum(dim=-1) - cand_p >= top_p
            if per_row:
                drop &= top_p < 1.0
            drop[:, 0] = False
            kept = x.gather(1, cand_i).masked_fill(drop, float("-inf"))
            kept = torch.full_like(x, float("-inf")).scatter(1, cand_i, kept)
            return torch.where(top_p >= 1.0, x, kept) if per_row else kept  # rows without top-p keep all
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p
    if per_row:
        drop &= top_p < 1.0
    drop[:, 0] = False  # also when top_p rounds to 0 in fp32
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)


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
    scores, x = process_logits(logits, opts, vocab_limit, previous)
    if x is None:
        return scores.argmax(dim=-1)
    rows = opts.sampled_rows
    probs = x.softmax(dim=-1)
    gens = generator if isinstance(generator, list) else [generator] * B
    if opts.all_sampled and all(g is gens[0] for g in gens):  # one draw, no greedy rows to pick
        return torch.multinomial(probs, 1, generator=gens[0]).squeeze(1)
    tokens = scores.argmax(dim=-1)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows.tolist()):
        groups.setdefault(id(gens[row]), []).append(i)
    for members in groups.values():
        picked = torch.multinomial(probs[members], 1, generator=gens[int(rows[members[0]])]).squeeze(1)
        tokens[rows[members]] = picked
    return tokens
