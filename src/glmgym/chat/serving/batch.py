"""The running batch of a server: rows join and leave between decoding steps (continuous batching).

A `RunningBatch` owns one KV cache of `[layers, rows, heads, slots, head_dim]` and three kinds of
row: waiting for their prompt to run, prefilling, and decoding. Each `step()`:

1. gathers the rows that arrived since the last step into a new prefill group (their prompts
   padded on the right to one length);
2. decodes one token for every decoding row, each at its own cache slot (`start` per row); rows
   that asked for prompt lookup (`prompt_lookup_num_tokens`) send their drafts along in the same
   forward, and each keeps as many tokens as its own drafts earned (see `speculative.py`);
3. runs a few layers of the prefill groups in flight, as `PrefillScheduler` decides (shortest
   remaining first, no starvation, at most `prefill_chunk` prompt tokens' worth of work per
   step, cut short after any layer when a request is waiting). Prefill is cut between layers,
   not between tokens: GLM's prompt attends both ways, so a token chunk would change the keys
   and values of the tokens before it;
4. when a group has gone through every layer, copies each row's keys and values into the cache
   (only its real tokens: no padding is kept) and samples its first token.

A row that leaves frees its cache slot at once: the last row moves into it (a copy of its keys
and values, no recompute), so the decoding rows are always `cache[:, :n]`; a prompt group whose
rows all left stops prefilling. The cache grows in rows and slots as needed and is released when
the batch is empty.

Sampling options are per row (`RowSampling`), and a seeded row draws from its own generator, so
its answer does not depend on what else is in the batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from glmgym.chat.config import GenerationConfig
from glmgym.chat.generate import PromptBatch
from glmgym.chat.model import GLMModel, KVCache
from glmgym.chat.model_v2 import GLM2Model
from glmgym.chat.sampling import RowSampling, sample
from glmgym.chat.serving.prefill import PrefillScheduler
from glmgym.chat.speculative import lookup_draft, verify
from glmgym.errors import GlmgymError

__all__ = ["RunningBatch", "TokenOut"]


@dataclass(frozen=True)
class TokenOut:
    """One generated token of one row."""

    row: int
    """The row id `add` returned."""
    token: int
    """The token id."""
    logprob: float | None = None
    """Its log-probability under the model (before temperature, top-k/p and penalties), when the
    row asked for logprobs."""
    top: tuple[tuple[int, float], ...] = ()
    """The `top_logprobs` most likely (token, log-probability) pairs, most likely first."""


@dataclass
class _Row:
    id: int
    prompt: list[int]
    cfg: GenerationConfig
    generator: torch.Generator | None
    logprobs: int | None  # None: no logprobs; k: the chosen token's and the top k
    tokens: list[int] = field(default_factory=list)  # generated so far
    length: int = 0  # cache slots in use (prefix + prompt + fed tokens)

    @property
    def mask_pos(self) -> int:
        return len(self.prompt) - 2  # v1: [gMASK] sits just before <sop>, the last prompt token


@dataclass(eq=False)  # compared and hashed by identity: the scheduler's key
class _Group:
    """Prompts in flight through the layers: hidden states between chunks."""

    members: list[tuple[list[_Row], int]]  # each prompt's rows (n > 1: several) and its length
    h: torch.Tensor  # [G, T, hidden]
    position_ids: torch.Tensor  # [G, 2, T] (v1) or [G, T] (v2)
    mask: torch.Tensor  # [G, 1, T, P + T], True = masked
    cache: KVCache  # [layers, G, heads, P + T, d]
    next_layer: int = 0


class RunningBatch:
    """Rows of one model that join and leave between steps (see the module docstring).

    Args:
        model: the model (eval mode; any dtype, quantized or not).
        max_rows: rows decoding, prefilling and waiting at once.
        eos_id: the end-of-answer token(s) (v1: <eop>; the v2 models also stop at role tokens).
        vocab_limit: ids from here on are never sampled.
        prefill_chunk: prompt tokens' worth of prefill work per step (at least one layer).
    """

    def __init__(self, model: GLMModel | GLM2Model, max_rows: int, *, eos_id: int | list[int],
                 vocab_limit: int, prefill_chunk: int = 512) -> None:
        if max_rows < 1 or prefill_chunk < 1:
            raise GlmgymError(f"max_rows and prefill_chunk must be at least 1, not {max_rows}, "
                              f"{prefill_chunk}")
        self.model = model
        self.max_rows, self.prefill_chunk = max_rows, prefill_chunk
        self.eos_id, self.vocab_limit = eos_id, vocab_limit
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.max_slots = model.prefix_len + model.config.max_sequence_length
        self.causal = model.config.version == 2  # the v2 block: causal, 1D positions
        self._ids = itertools.count()
        self._waiting: list[list[_Row]] = []  # rows of one prompt (n > 1 shares a prefill)
        self._prefill: PrefillScheduler[_Group] = PrefillScheduler(model.config.num_layers, prefill_chunk)
        self._groups: list[_Group] = []  # in flight, in arrival order
        self._decoding: list[_Row] = []  # row i lives in cache slot i
        self._cache: KVCache | None = None
        self._options: tuple[tuple[int, ...], RowSampling | None] = ((), None)  # of the last rows sampled

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Rows waiting, prefilling or decoding."""
        prefilling = sum(len(rows) for g in self._groups for rows, _ in g.members)
        return sum(map(len, self._waiting)) + prefilling + len(self._decoding)

    @property
    def free_rows(self) -> int:
        """Rows that can still be added."""
        return self.max_rows - self.rows

    @property
    def decoding(self) -> int:
        """Rows past their prompt, generating a token per step."""
        return len(self._decoding)

    def add(self, prompt: list[int], cfgs: list[GenerationConfig], logprobs: int | None = None) -> list[int]:
        """Queue one prompt answered `len(cfgs)` times (n > 1: the prompt runs once); return the
        row ids, in the order of `cfgs`.

        Args:
            prompt: token ids, ending with [gMASK] <sop>.
            cfgs: each answer's options (only the sampling fields and the seed are read here; the
                caller decides when a row has had enough tokens).
            logprobs: None, or how many top alternatives to report with each token (0..20).

        Raises:
            GlmgymError: not enough free rows, or a prompt without room for an answer.
        """
        if len(cfgs) > self.free_rows:
            raise GlmgymError(f"{len(cfgs)} rows asked for, {self.free_rows} free")
        if len(prompt) < 2 or len(prompt) >= self.model.config.max_sequence_length:
            raise GlmgymError(f"the prompt has {len(prompt)} tokens; the model takes 2 to "
                              f"{self.model.config.max_sequence_length - 1}")
        rows = []
        for cfg in cfgs:
            gen = None
            if cfg.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
            rows.append(_Row(next(self._ids), list(prompt), cfg, gen, logprobs))
        self._waiting.append(rows)
        return [r.id for r in rows]

    @torch.inference_mode()
    def remove(self, row_id: int) -> None:
        """Drop a row wherever it is (finished, cancelled); a decoding row frees its slot now."""
        for rows in self._waiting:
            rows[:] = [r for r in rows if r.id != row_id]
        self._waiting = [rows for rows in self._waiting if rows]
        for g in list(self._groups):
            # the prompt stays in the group's tensors (they are shared); its row does not land
            for rows, _ in g.members:
                rows[:] = [r for r in rows if r.id != row_id]
            if not any(rows for rows, _ in g.members):  # nobody waits for it: stop its prefill
                self._groups.remove(g)
                self._prefill.remove(g)
        for i, row in enumerate(self._decoding):
            if row.id == row_id:
                last = len(self._decoding) - 1
                if i != last:  # the last row moves into the free slot: a copy, not a recompute
                    n = self._decoding[last].length
                    self._cache.k[:, i, :, :n] = self._cache.k[:, last, :, :n]
                    self._cache.v[:, i, :, :n] = self._cache.v[:, last, :, :n]
                    self._decoding[i] = self._decoding[last]
                self._decoding.pop()
                break
        if not self.rows:
            self._cache = None  # an idle server holds no cache

    # -- the step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, interrupt: Callable[[], bool] | None = None) -> list[TokenOut]:
        """One decoding step and a few layers of the prefill groups in flight; the new tokens.

        Args:
            interrupt: asked between prefill layers; True (say, a request waits to join) ends the
                step's prefill there, after at least one layer.
        """
        if self._waiting:
            self._start_group()
        out = self._decode() if self._decoding else []
        for g in self._prefill.step(self._run_layer, interrupt):
            out += self._land(g)
        return out

    def _start_group(self) -> None:
        waiting, self._waiting = self._waiting, []
        prompts = [rows[0].prompt for rows in waiting]
        G, T, P = len(prompts), max(map(len, prompts)), self.model.prefix_len
        # padded on the right, so that every prompt's tokens sit at the cache slots they keep
        batch = PromptBatch.build(prompts, 0, self.device, left=False, causal=self.causal)
        cache = KVCache.empty(self.model.config, G, P + T, self.dtype, self.device)
        if P:
            cache.k[:, :, :, :P], cache.v[:, :, :, :P] = self.model.prefix_kv(G, self.dtype)
        group = _Group(
            members=[(rows, len(p)) for rows, p in zip(waiting, prompts)],
            h=self.model.embed(batch.input_ids),
            position_ids=batch.position_ids,
            mask=batch.attention_mask(P),
            cache=cache,
        )
        self._groups.append(group)
        self._prefill.add(group, G * T)

    def _run_layer(self, g: _Group) -> None:
        layers = range(g.next_layer, g.next_layer + 1)
        g.h = self.model.run_layers(g.h, g.position_ids, g.mask, g.cache, self.model.prefix_len, layers)
        g.next_layer = layers.stop

    def _land(self, g: _Group) -> list[TokenOut]:
        """`g` has gone through every layer: its rows start decoding with their first token."""
        self._groups.remove(g)
        G = g.h.shape[0]
        landed = [(gi, row) for gi, (rows, _) in enumerate(g.members) for row in rows]
        if not landed:
            return []
        last = torch.tensor([n - 1 for _, n in g.members], device=self.device)
        logits = self.model.head(g.h[torch.arange(G, device=self.device), last])  # [G, vocab]
        for gi, row in landed:
            row.length = self.model.prefix_len + g.members[gi][1]
        self._ensure(len(self._decoding) + len(landed), max(r.length + 1 for _, r in landed))
        for gi, row in landed:
            slot = len(self._decoding)
            self._cache.k[:, slot, :, :row.length] = g.cache.k[:, gi, :, :row.length]
            self._cache.v[:, slot, :, :row.length] = g.cache.v[:, gi, :, :row.length]
            self._decoding.append(row)
        return self._sample([r for _, r in landed], logits[[gi for gi, _ in landed]])

    def _decode(self) -> list[TokenOut]:
        rows = self._decoding
        n = len(rows)
        drafts = [self._draft(r) for r in rows]
        K = max(map(len, drafts))
        self._ensure(n, max(r.length for r in rows) + 1 + K)
        # per row: the last token, its position and block position (v1: a generated token sits
        # after <sop>: [gMASK]'s position, 1 + its index; v2: its index in the sequence), its cache
        # slot; one tensor, then views
        if self.causal:
            state = torch.tensor([[r.tokens[-1], len(r.prompt) + len(r.tokens) - 1, r.length] for r in rows],
                                 device=self.device)
            tokens, pos, slots = state[:, :1], state[:, 1:2], state[:, 2]  # [n, 1], [n, 1], [n]
        else:
            state = torch.tensor([[r.tokens[-1], r.mask_pos, len(r.tokens) + 1, r.length] for r in rows],
                                 device=self.device)
            tokens, pos, slots = state[:, :1], state[:, 1:3, None], state[:, 3]  # [n, 1], [n, 2, 1], [n]
        cache = KVCache(self._cache.k[:, :n], self._cache.v[:, :n])
        lengths = [r.length for r in rows]
        if K:
            return self._verify(rows, drafts, K, tokens, pos, slots, cache)
        if min(lengths) == max(lengths):  # one length: a plain slice, no mask
            logits = self.model(tokens, pos, None, kv_cache=cache, start=lengths[0])[:, -1]
        else:
            S = max(lengths) + 1
            masked = torch.arange(S, device=self.device)[None, :] > slots[:, None]  # [n, S]
            logits = self.model(tokens, pos, masked[:, None, None, :], kv_cache=cache, start=slots)[:, -1]
        for r in rows:
            r.length += 1
        return self._sample(rows, logits)

    def _draft(self, row: _Row) -> list[int]:
        """Prompt-lookup drafts of a row that asked for them, no more than its answer has room for
        (a verifying forward yields up to one token more than it drafted)."""
        k = row.cfg.prompt_lookup_num_tokens
        if not k:
            return []
        room = min(row.cfg.max_length, self.model.config.max_sequence_length) - len(row.prompt)
        if row.cfg.max_new_tokens is not None:
            room = min(room, row.cfg.max_new_tokens)
        k = min(k, room - len(row.tokens) - 1, self.max_slots - row.length - 1)
        return lookup_draft(row.prompt + row.tokens, k) if k > 0 else []

    def _verify(self, rows: list[_Row], drafts: list[list[int]], K: int, tokens: torch.Tensor,
                pos: torch.Tensor, slots: torch.Tensor, cache: KVCache) -> list[TokenOut]:
        """One forward over each row's last token and its drafts (padded to K); each row keeps
        its own share (`verify`) and moves on by as many cache slots."""
        n = len(rows)
        i = torch.arange(K + 1, device=self.device)
        padded = torch.tensor([d + [0] * (K - len(d)) for d in drafts], device=self.device)
        ids = torch.cat([tokens, padded], dim=1)  # [n, K + 1]
        pos = pos + (i if self.causal else torch.stack([torch.zeros_like(i), i]))  # [n, K+1] or [n, 2, K+1]
        S = int(slots.max()) + K + 1
        masked = torch.arange(S, device=self.device)[None, None, :] > (slots[:, None] + i)[:, :, None]
        logits = self.model(ids, pos, masked[:, None], kv_cache=cache, start=slots)  # [n, K + 1, V]
        kept = verify(logits, ids[:, 1:], [len(d) for d in drafts], [r.cfg for r in rows], self.vocab_limit,
                      self._previous(rows), [r.generator for r in rows])
        for r, ks in zip(rows, kept):
            r.length += len(ks)  # the fed token and the kept drafts: their keys and values stand
        out = []
        for j in range(max(map(len, kept))):  # position by position, each row's j-th new token
            at = [b for b in range(n) if len(kept[b]) > j]
            out += self._emit([rows[b] for b in at], logits[at, j], [kept[b][j] for b in at])
        return out

    def _previous(self, rows: list[_Row]) -> torch.Tensor | None:
        """[n, N] ids each row has seen, for the repetition penalty (None when no row has one)."""
        if all(r.cfg.repetition_penalty == 1.0 for r in rows):
            return None
        seqs = [r.prompt + r.tokens for r in rows]
        width = max(map(len, seqs))
        # pad with each row's own first id: a repeated id is penalized once
        return torch.tensor([s + [s[0]] * (width - len(s)) for s in seqs], device=self.device)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[TokenOut]:
        key = tuple(r.id for r in rows)
        if self._options[0] != key:  # the rows changed: their options once, not every step
            self._options = (key, RowSampling.of([r.cfg for r in rows], self.device))
        picked = sample(logits, self._options[1], self.vocab_limit, self._previous(rows),
                        [r.generator for r in rows]).tolist()
        return self._emit(rows, logits, picked)

    def _emit(self, rows: list[_Row], logits: torch.Tensor, picked: list[int]) -> list[TokenOut]:
        """Append each row's new token; with logprobs, score it by `logits` [n, V]."""
        want = [i for i, r in enumerate(rows) if r.logprobs is not None]
        lp = top = None
        if want:
            scores = logits[want].float()
            scores[:, self.vocab_limit:] = float("-inf")
            logp = scores.log_softmax(dim=-1)
            k = max(rows[i].logprobs for i in want)
            top = logp.topk(k, dim=-1) if k else None
            lp = logp.gather(1, torch.tensor([[picked[i]] for i in want], device=self.device))[:, 0]
        out = []
        for i, (row, token) in enumerate(zip(rows, picked)):
            row.tokens.append(token)
            if row.logprobs is None:
                out.append(TokenOut(row.id, token))
                continue
            j = want.index(i)
            pairs = ()
            if top is not None and row.logprobs:
                k = row.logprobs
                pairs = tuple(zip(top.indices[j, :k].tolist(), top.values[j, :k].tolist()))
            out.append(TokenOut(row.id, token, float(lp[j]), pairs))
        return out

    def _ensure(self, rows: int, slots: int) -> None:
        """Grow the cache (doubling, up to the limits) to hold `rows` rows of `slots` slots."""
        if slots > self.max_slots:
            raise GlmgymError(f"a row needs {slots} cache slots; the model has {self.max_slots}")
        c = self._cache
        have_rows, have_slots = (0, 0) if c is None else (c.k.shape[1], c.k.shape[3])
        if rows <= have_rows and slots <= have_slots:
            return
        new_rows = min(self.max_rows, max(rows, 2 * have_rows))
        new_slots = min(self.max_slots, max(slots, 2 * have_slots, 64))
        grown = KVCache.empty(self.model.config, new_rows, new_slots, self.dtype, self.device)
        if c is not None:
            grown.k[:, :have_rows, :, :have_slots] = c.k
            grown.v[:, :have_rows, :, :have_slots] = c.v
        self._cache = grown
