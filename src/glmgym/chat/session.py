"""Chat on top of generation: prompts with history, streaming, the reference's post-processing.

`load()` is the Python entry point: `glmgym.chat.load("THUDM/chatglm-6b")` (or a directory, or
`random:tiny`) returns a `ChatGLM` with the reference's `chat` / `stream_chat` call shapes.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from glmgym._io import read_json
from glmgym.chat.generate import GenerationConfig, generate
from glmgym.chat.model import GLMModel
from glmgym.chat.tokenizer import ChatGLMTokenizer
from glmgym.errors import GlmgymError

__all__ = ["ChatGLM", "HistoryTrimmedWarning", "Reply", "build_prompt", "load", "process_response"]

History = list[tuple[str, str]]
_PUNCT = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")]


class HistoryTrimmedWarning(UserWarning):
    """The oldest turns of a conversation were dropped to fit the context."""


def build_prompt(query: str, history: History | None = None) -> str:
    """The v1.1 chat prompt: the raw query without history, else numbered rounds."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def process_response(response: str) -> str:
    """The reference's clean-up: strip, date placeholder, full-width punctuation next to CJK."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_p, full in _PUNCT:
        response = re.sub(rf"([\u4e00-\u9fff]){ascii_p}", rf"\1{full}", response)
        response = re.sub(rf"{ascii_p}([\u4e00-\u9fff])", rf"{full}\1", response)
    return response


@dataclass
class Reply:
    """One streaming step of `ChatGLM.stream_reply`."""

    response: str
    """The post-processed answer so far."""
    history: History
    """The history kept for the prompt, plus (query, response)."""
    prompt_tokens: int
    """Tokens of the prompt."""
    completion_tokens: int
    """Tokens generated so far (<eop> included once reached)."""
    ended: bool
    """The model emitted <eop>."""


class ChatGLM:
    """A loaded ChatGLM-6B: `chat`, `stream_chat`, and the `.model` / `.tokenizer` underneath."""

    def __init__(self, model: GLMModel, tokenizer: ChatGLMTokenizer, name: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name

    def config(self, gen: dict) -> GenerationConfig:
        """A `GenerationConfig` from keyword options (TypeError on unknown ones)."""
        names = {f.name for f in fields(GenerationConfig)}
        unknown = set(gen) - names
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        return GenerationConfig(**gen)

    def fit_prompt(self, query: str, history: History, cfg: GenerationConfig,
                   trim: bool = True) -> tuple[list[int], History]:
        """Prompt ids and the history they hold; the oldest turns are dropped (with a
        `HistoryTrimmedWarning`) until the prompt leaves room for the answer.

        Raises:
            GlmgymError: the prompt does not fit, and `trim` is off or dropping turns is not enough.
        """
        limit = min(cfg.max_length, self.model.config.max_sequence_length)
        # trimming keeps room for a useful answer; without it, any room is enough unless asked for more
        room = cfg.max_new_tokens or (min(256, limit // 4) if trim else 1)
        history = list(history)
        dropped = 0
        while True:
            ids = self.tokenizer.encode(build_prompt(query, history))
            if len(ids) + room <= limit:
                break
            if not trim:
                raise GlmgymError(f"the prompt has {len(ids)} tokens; with {room} new tokens it exceeds "
                                  f"the context of {limit} tokens (shorten the history or ask for trimming)")
            if not history:
                break
            history.pop(0)
            dropped += 1
        if dropped:
            message = f"dropped the {dropped} oldest turn(s) of the history to fit max_length {limit}"
            warnings.warn(HistoryTrimmedWarning(message), stacklevel=3)
        if len(ids) >= limit:
            raise GlmgymError(f"the query alone has {len(ids)} tokens, more than max_length {limit} allows")
        return ids, history

    def stream_batch(self, items: list[tuple[str, History]], trim_history: bool = True,
                     **gen: Any) -> Iterator[list[Reply]]:
        """Answer several conversations in one left-padded batch; yield one `Reply` per row per step.

        A row that has ended keeps its last reply while the others go on.

        Args:
            items: (query, history) per conversation.
            trim_history: drop the oldest turns when a prompt does not fit; False raises instead.
            **gen: `GenerationConfig` options, shared by the rows.

        Raises:
            GlmgymError: a prompt does not fit the context (and trimming is off or not enough).
        """
        cfg = self.config(gen)
        fitted = [self.fit_prompt(q, list(h or []), cfg, trim_history) for q, h in items]
        tok = self.tokenizer
        for new in generate(self.model, [ids for ids, _ in fitted], cfg, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, vocab_limit=tok.vocab_size):
            replies = []
            for (query, _), (ids, kept), tokens in zip(items, fitted, new):
                response = process_response(tok.decode(tokens))
                replies.append(Reply(response, [*kept, (query, response)], len(ids), len(tokens),
                                     bool(tokens) and tokens[-1] == tok.eos_id))
            yield replies

    def stream_reply(self, query: str, history: History | None = None, trim_history: bool = True,
                     **gen) -> Iterator[Reply]:
        """Like `stream_chat`, with token counts and whether <eop> ended the answer (for servers).

        Raises:
            GlmgymError: the prompt does not fit the context (and trimming is off or not enough).
        """
        for replies in self.stream_batch([(query, history or [])], trim_history, **gen):
            yield replies[0]

    def stream_chat(self, query: str, history: History | None = None, **gen) -> Iterator[tuple[str, History]]:
        """Yield `(response_so_far, history + [(query, response_so_far)])` while generating.

        Generation options: the fields of `GenerationConfig` (its defaults are the reference's).
        """
        for reply in self.stream_reply(query, history, **gen):
            yield reply.response, reply.history

    def chat(self, query: str, history: History | None = None, **gen) -> tuple[str, History]:
        """Answer `query`; return `(response, history + [(query, response)])`."""
        response, new_history = "", [*(history or []), (query, "")]
        for response, new_history in self.stream_chat(query, history, **gen):  # noqa: B007
            pass
        return response, new_history


def load(path_or_id: str = "THUDM/chatglm-6b", dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, quantize: int | None = None,
         group_size: int | None = None, kernels: bool = True, ptuning_checkpoint: str | Path | None = None,
         lora: str | Path | None = None) -> ChatGLM:
    """Load ChatGLM-6B from a directory, a hub id (cache first) or `random:tiny`.

    Args:
        path_or_id: checkpoint directory, hub id such as THUDM/chatglm-6b, or random:tiny (a tiny
            random model with a generated tokenizer: its output is noise, for plumbing tests).
        dtype: float32, bfloat16 or float16 (default: `checkpoint.default_dtype`: bf16 where native;
            on CPU otherwise fp32, or bf16 for a quantized model on an AVX2 CPU).
        device: torch device (default: cuda when available, else cpu).
        quantize: 4 or 8 to quantize the block weights while loading (a checkpoint that is
            already quantized loads as it is, whatever this says).
        group_size: INT4 group size with `quantize` (default 128; 0: one scale per row).
        kernels: False runs quantized layers by dequantizing per call, which autograd
            differentiates (fine-tuning on a quantized base); True picks the fastest kernel.
        ptuning_checkpoint: a P-Tuning v2 checkpoint directory whose prefix to add.
        lora: a PEFT LoRA adapter directory to merge into the float weights (before `quantize`).

    Raises:
        GlmgymError: missing or malformed files, or an adapter that does not fit the model.
    """
    from glmgym.chat.adapters import load_ptuning, merge_lora
    from glmgym.chat.checkpoint import DTYPES, load_model, resolve_model_dir
    from glmgym.chat.quantize import QuantSpec, quantize_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise GlmgymError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if path_or_id == "random:tiny":
        from glmgym.chat.tiny import build_tiny

        model, tokenizer = build_tiny()
        model = model.to(device=device, dtype=dtype or torch.float32)
        name = "random:tiny"
    else:
        model_dir = resolve_model_dir(path_or_id)
        # a LoRA merge needs float weights: load them, merge, then quantize
        model = load_model(model_dir, dtype, device, quantize=None if lora else quantize,
                           group_size=group_size, kernels=kernels)
        tokenizer, name = load_tokenizer(model_dir), str(model_dir)
    if lora:
        if QuantSpec.from_config(model.config):
            raise GlmgymError(f"{name} is quantized; a LoRA adapter merges into a float checkpoint "
                              "(add --quantize to quantize after the merge)")
        merge_lora(model, lora)
    if quantize and (lora or name == "random:tiny"):
        quantize_model(model, QuantSpec.default(quantize, group_size), kernels)
    if ptuning_checkpoint:
        load_ptuning(model, ptuning_checkpoint)
    return ChatGLM(model, tokenizer, name)


def load_tokenizer(model_dir: str | Path) -> ChatGLMTokenizer:
    """The tokenizer of a checkpoint directory (ice_text.model; v1.0's id offset from config)."""

    model_dir = Path(model_dir)
    offset = None
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        offset = read_json(tok_cfg).get("num_image_tokens")
    if offset is None:  # v1.0 configs put <sop> at 150004 (20000 image tokens in front)
        cfg = read_json(model_dir / "config.json")
        offset = 20000 if cfg.get("bos_token_id") == 150004 else 0
    return ChatGLMTokenizer(model_dir / "ice_text.model", num_image_tokens=int(offset))
