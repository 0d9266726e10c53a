"""Prompt-lookup speculative decoding: draft tokens copied from earlier in the sequence, checked by
one forward over all of them.

A decoding step reads every weight of the model to produce one token, and on a CPU that read is
most of the step. A forward over the last token and k drafted ones reads the weights once for
k + 1 positions. The drafts come from the sequence itself (prompt lookup, as in Hugging Face's
`prompt_lookup_num_tokens`): the tokens that followed the latest earlier occurrence of the
sequence's last n tokens. Answers that quote their prompt, edit code or fill a template repeat
long runs of it.

Exact, as `verify` checks the drafts:

- a greedy row keeps a draft token only where it is the argmax of the processed scores, so its
  output is plain greedy decoding's;
- a sampled row keeps draft token d with probability p(d) and otherwise draws from p with d
  removed, renormalized (speculative sampling with a draft distribution that is one point,
  Leviathan et al. 2023): every token is distributed as p, given the tokens before it.

Either way each forward yields at least one token: the model's own after the last kept draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from glmgym.chat.config import GenerationConfig
from glmgym.chat.sampling import RowSampling, process_logits

__all__ = ["MAX_NGRAM", "DraftStats", "lookup_draft", "verify"]

MAX_NGRAM = 3
"""The longest tail of the sequence looked up (then shorter ones, down to one token)."""


@dataclass
class DraftStats:
    """What speculation did, forward by forward (rows summed)."""

    sizes: list[int] = field(default_factory=list)
    """Draft tokens verified by each decoding forward (0: a plain one-token step)."""
    kept: list[int] = field(default_factory=list)
    """Draft tokens kept of each."""

    @property
    def forwards(self) -> int:
        """Decoding forwards (prefill not counted)."""
        return len(self.sizes)

    @property
    def drafted(self) -> int:
        """Draft tokens verified."""
        return sum(self.sizes)

    @property
    def accepted(self) -> int:
        """Draft tokens kept."""
        return sum(self.kept)

    @property
    def acceptance(self) -> float:
        """Kept / verified draft tokens (0 when none was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


def lookup_draft(tokens: Sequence[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to `k` tokens that followed an earlier occurrence of the last n tokens of `tokens` (the
    latest one with k tokens after it, else the earliest), trying n = max_ngram first, then
    shorter tails; [] when no tail occurs earlier.

    Example:
        >>> lookup_draft([5, 6, 7, 8, 9, 5, 6], k=2)
        [7, 8]
    """
    L = len(tokens)
    if k <= 0 or L < 2:
        return []
    seq = torch.tensor(tokens)
    for n in range(min(max_ngram, L - 1), 0, -1):
        tail = seq[L - n:]
        # windows starting at 0 .. L - n - 1: every earlier occurrence with at least one token after it
        windows = seq[: L - 1].unfold(0, n, 1)  # [L - n, n]
        hits = (windows == tail).all(dim=1).nonzero()[:, 0]
        if len(hits):
            # the latest occurrence with k tokens after it; else the earliest (the most tokens
            # after it: in a run that repeats, the latest is followed by the tail alone)
            full = hits[hits <= L - n - k]
            i = int(full[-1] if len(full) else hits[0]) + n
            return list(tokens[i : i + k])
    return []


def _draft_history(previous: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """[B, N] seen ids and [B, K] drafts -> [B * (K + 1), N + K]: what the repetition penalty sees
    at each verified position (position i has seen the first i drafts; the rest of the row is
    padded with the row's first id, which it has seen already: penalized once)."""
    B, K = drafts.shape
    seen = torch.arange(K, device=drafts.device)[None, :] < torch.arange(K + 1, device=drafts.device)[:, None]
    extra = torch.where(seen[None], drafts[:, None, :], previous[:, :1, None])  # [B, K + 1, K]
    full = torch.cat([previous[:, None, :].expand(B, K + 1, -1), extra], dim=2)
    return full.reshape(B * (K + 1), -1)


def verify(logits: torch.Tensor, drafts: torch.Tensor, lengths: Sequence[int],
           cfgs: Sequence[GenerationConfig], vocab_limit: int, previous: torch.Tensor | None = None,
           generator: torch.Generator | Sequence[torch.Generator | None] | None = None) -> list[list[int]]:
    """The tokens each row keeps after a forward over its last token and its drafts.

    Args:
        logits: [B, K + 1, V]: position i scores the token after draft i (position 0: after the
            last kept token).
        drafts: [B, K] drafted ids; row b's first `lengths[b]` are real, the rest padding.
        lengths: each row's number of real drafts (0 .. K).
        cfgs: each row's sampling options.
        vocab_limit: ids from here on are never picked.
        previous: [B, N] ids each row has seen before the drafts (for the repetition penalty).
        generator: one generator for all rows, or one per row (None: torch's global one).

    Returns:
        Per row, its kept drafts and then one token of the model's own (1 .. lengths[b] + 1 ids).
    """
    B, K1, V = logits.shape
    opts = RowSampling.of([c for c in cfgs for _ in range(K1)], logits.device)
    seen = None if previous is None or not opts.any_penalty else _draft_history(previous, drafts)
    scores, x = process_logits(logits.reshape(B * K1, V), opts, vocab_limit, seen)
    best = scores.argmax(dim=-1).view(B, K1).tolist()
    probs = None if x is None else x.softmax(dim=-1)  # [S, V], rows of opts.sampled_rows
    where = {int(r): i for i, r in enumerate(opts.sampled_rows.tolist())}
    gens = list(generator) if isinstance(generator, Sequence) else [generator] * B
    drafted = drafts.tolist()
    out = []
    for b in range(B):
        d, n = drafted[b], lengths[b]
        kept: list[int] = []
        if b * K1 not in where:  # greedy: keep drafts while they are the argmax
            while len(kept) < n and best[b][len(kept)] == d[len(kept)]:
                kept.append(d[len(kept)])
            out.append([*kept, best[b][len(kept)]])
            continue
        p = probs[where[b * K1] : where[b * K1] + K1]  # [K + 1, V]
        u = torch.rand(n, generator=gens[b], device=logits.device).tolist() if n else []
        for i in range(n):
            if u[i] < float(p[i, d[i]]):
                kept.append(d[i])
                continue
            rest = p[i].clone()
            rest[d[i]] = 0.0  # rejected: draw from p without d (p - q, clipped at 0, renormalized)
            if float(rest.sum()) <= 0.0:  # p(d) rounded to 1: d is the only choice
                kept.append(d[i])
                continue
            out.append([*kept, int(torch.multinomial(rest, 1, generator=gens[b]))])
            break
        else:  # every draft kept: the model's token after the last one comes for free
            out.append([*kept, int(torch.multinomial(p[n], 1, generator=gens[b]))])
    return out
