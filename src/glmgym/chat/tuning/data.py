"""Fine-tuning data as THUDM's `ptuning/main.py` builds it: JSON lines -> token ids and labels.

- Rows are JSON objects; the prompt and response columns are named by the caller (ADGEN:
  `content` / `summary`; chat data: `prompt` / `response`, with an optional history column of
  `[question, answer]` pairs rendered in the v1.1 `[Round i]` format).
- A training sequence is `a + [gMASK, <sop>] + b + [<eop>]` with `a` the prompt's ids cut to
  `max_source_length - 1` and `b` the answer's cut to `max_target_length - 2`; the labels are -100
  up to (not including) `<sop>`, then the ids themselves; padding (on the right) is -100.
- Positions are the GLM's 2D ones: positions count up to `[gMASK]` and stay there from `<sop>`
  on; block positions are 0 over the context and 1, 2, ... from `<sop>`. The attention mask is
  the prefix-LM one (the context attends both ways, causal from `<sop>`), True = masked as in
  `chat.model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from glmgym.chat.formats import ChatFormat
from glmgym.chat.template import build_prompt
from glmgym.chat.tokenizer import ChatGLMTokenizer
from glmgym.errors import GlmgymError

__all__ = ["EncodedExample", "TrainBatch", "encode_chat", "encode_example", "make_batch", "read_examples"]

IGNORE = -100
"""Label of positions that do not count in the loss."""


def read_examples(path: str | Path, prompt_column: str, response_column: str,
                  history_column: str | None = None) -> list[tuple[str, list, str]]:
    """(query, history, answer) triples from a JSON-lines file (history: (query, answer) pairs).

    Raises:
        GlmgymError: a missing or empty file, a line that is not a JSON object, a missing column.
    """
    path = Path(path)
    if not path.is_file():
        raise GlmgymError(f"data file {path} does not exist")
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GlmgymError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise GlmgymError(f"{path}:{n}: a row must be a JSON object")
        for column in (prompt_column, response_column, history_column):
            if column is not None and column not in row:
                raise GlmgymError(f"{path}:{n}: no column {column!r} (it has {', '.join(sorted(row))})")
        history = row[history_column] if history_column else None
        if history is not None and not (isinstance(history, list)
                                        and all(isinstance(t, list) and len(t) == 2 for t in history)):
            raise GlmgymError(f"{path}:{n}: {history_column!r} must be a list of [question, answer] pairs")
        query, answer = row[prompt_column], row[response_column]
        if not isinstance(query, str) or not isinstance(answer, str):
            raise GlmgymError(f"{path}:{n}: {prompt_column!r} and {response_column!r} must be strings")
        examples.append((query, [tuple(t) for t in history or []], answer))
    if not examples:
        raise GlmgymError(f"{path} holds no examples")
    return examples


@dataclass
class EncodedExample:
    """One training sequence."""

    input_ids: list[int]
    """v1: `a + [gMASK, <sop>] + b + [<eop>]`; v2: `prompt + answer + [eos]`."""
    context_len: int
    """v1: the index of `<sop>`; v2: the prompt's length. Labels start there."""
    truncated: bool
    """The prompt or the answer was cut to its maximum length."""
    causal: bool = False
    """For the v2 block (causal attention, 1D positions)."""


def encode_example(tokenizer: ChatGLMTokenizer, prompt: str, answer: str, max_source_length: int,
                   max_target_length: int) -> EncodedExample:
    """The reference's training sequence for one (prompt, answer) pair."""
    a, b = tokenizer.tokenize(prompt), tokenizer.tokenize(answer)
    truncated = len(a) > max_source_length - 1 or len(b) > max_target_length - 2
    a, b = a[: max_source_length - 1], b[: max_target_length - 2]
    ids = [*a, tokenizer.gmask_id, tokenizer.bos_id, *b, tokenizer.eos_id]
    return EncodedExample(ids, len(a) + 1, truncated)


def encode_chat(fmt: ChatFormat, query: str, history: list, answer: str, max_source_length: int,
                max_target_length: int) -> EncodedExample:
    """The training sequence of one chat turn in `fmt`'s family, as its reference fine-tuning builds it.

    - ChatGLM-6B: `encode_example` on the v1 prompt.
    - ChatGLM2-6B (THUDM's `ptuning/main.py`): `[gMASK] sop` + the `[Round i]` prompt, cut to
      `max_source_length` tokens in all; the answer cut to `max_target_length`; then `</s>`.
    - ChatGLM3-6B / GLM-4 (their fine-tuning demos): the prompt up to `<|assistant|>` (cut from
      the right, `<|assistant|>` kept), the assistant message's `\n` + answer cut to
      `max_target_length - 1`, then `</s>` / `<|endoftext|>`.
    """
    if fmt.family == "chatglm":
        return encode_example(fmt.tok, build_prompt(query, history), answer, max_source_length,
                              max_target_length)
    tok = fmt.tok
    a = fmt.prompt_ids(query, fmt.as_history(history))
    if fmt.family == "chatglm2":
        b = tok.tokenize(answer)
        truncated = len(a) > max_source_length or len(b) > max_target_length
        a, b = a[:max_source_length], b[:max_target_length]
    else:
        # the assistant message after its role token: ChatGLM3 tokenizes "\n" apart, GLM-4 with the text
        b = [*tok.tokenize("\n"), *tok.tokenize(answer)] if fmt.family == "chatglm3" else \
            tok.tokenize("\n" + answer)
        truncated = len(a) > max_source_length or len(b) > max_target_length - 1
        a = a if len(a) <= max_source_length else [*a[: max_source_length - 1], a[-1]]
        b = b[: max_target_length - 1]
    return EncodedExample([*a, *b, tok.eos_id], len(a), truncated, causal=True)


@dataclass
class TrainBatch:
    """Right-padded sequences with the GLM's positions, mask and labels."""

    input_ids: torch.Tensor
    """[B, L]."""
    position_ids: torch.Tensor
    """[B, 2, L]: positions and block positions (v1); [B, L] positions (v2, `causal`)."""
    attention_mask: torch.Tensor
    """[B, 1, L, prefix_len + L] bool, True = masked (prefix columns always visible)."""
    labels: torch.Tensor
    """[B, L]: the token each position's logits should predict one step earlier, or -100."""


def make_batch(examples: list[EncodedExample], pad_id: int, length: int | None = None,
               prefix_len: int = 0) -> TrainBatch:
    """Pad `examples` on the right to `length` (default: the longest) and build the GLM inputs:
    v1's prefix-LM over 2D positions, or (examples of the v2 block) causal attention over 1D ones."""
    L = length or max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    ctx = torch.tensor([e.context_len for e in examples])
    for i, e in enumerate(examples):  # ragged lists -> one padded tensor (B small)
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, e.context_len : n] = ids[i, e.context_len : n]
    r = torch.arange(L)[None, :]  # [1, L]
    if examples[0].causal:
        mask = ~torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(B, 1, L, L)
        if prefix_len:
            mask = torch.cat((torch.zeros(B, 1, L, prefix_len, dtype=torch.bool), mask), dim=-1)
        return TrainBatch(ids, r.expand(B, L).clone(), mask, labels)
    gmask_pos = (ctx - 1)[:, None]
    pos = torch.where(r < ctx[:, None], r, gmask_pos)
    block = torch.clamp(r - ctx[:, None] + 1, min=0)
    position_ids = torch.stack((pos, block), dim=1)  # [B, 2, L]
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None]  # [1, L, L]: key <= query
    seen = causal | (r[:, None, :] < ctx[:, None, None])  # the context is visible to everyone
    mask = ~seen[:, None]  # [B, 1, L, L], True = masked
    if prefix_len:
        mask = torch.cat((torch.zeros(B, 1, L, prefix_len, dtype=torch.bool), mask), dim=-1)
    return TrainBatch(ids, position_ids, mask, labels)
