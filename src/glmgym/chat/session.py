"""Chat on top of generation: prompts with history, streaming, the reference's post-processing.

`load()` is the Python entry point: `glmgym.chat.load("THUDM/chatglm-6b")` (or a directory, or
`random:tiny`) returns a `ChatGLM` with the reference's `chat` / `stream_chat` call shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from glmgym._io import read_json
from glmgym.chat.adapters import load_ptuning, merge_lora
from glmgym.chat.checkpoint import DTYPES, load_model, resolve_model_dir, save_model
from glmgym.chat.config import ModelOptions
from glmgym.chat.generate import GenerationConfig, generate
from glmgym.chat.model import GLMModel
from glmgym.chat.quantize import QuantSpec, quantize_model
from glmgym.chat.template import (
    History,
    HistoryTrimmedWarning,
    IncrementalDecoder,
    Reply,
    build_prompt,
    fit_prompt,
    process_response,
)
from glmgym.chat.tiny import build_tiny
from glmgym.chat.tokenizer import ChatGLMTokenizer
from glmgym.devices import resolve_device, set_threads
from glmgym.errors import GlmgymError

__all__ = [
    "ChatGLM", "HistoryTrimmedWarning", "Reply", "build_prompt", "load", "load_with", "merge_lora_checkpoint",
    "process_response",
]

class ChatGLM:
    """A loaded ChatGLM-6B: `chat`, `stream_chat`, and the `.model` / `.tokenizer` underneath."""

    def __init__(self, model: GLMModel, tokenizer: ChatGLMTokenizer, name: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name

    def config(self, gen: dict) -> GenerationConfig:
        """A `GenerationConfig` from keyword options (TypeError on unknown ones)."""
        return GenerationConfig.of(gen)

    def fit_prompt(self, query: str, history: History, cfg: GenerationConfig,
                   trim: bool = True) -> tuple[list[int], History]:
        """`template.fit_prompt` for this model: prompt ids and the history they hold."""
        return fit_prompt(self.tokenizer, self.model.config.max_sequence_length, query, history, cfg, trim)

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
        decoders = [IncrementalDecoder(tok) for _ in items]

        def replies(new: list[list[int]], final: bool) -> list[Reply]:
            out = []
            for (query, _), (ids, kept), tokens, dec in zip(items, fitted, new, decoders):
                for token in tokens[len(dec.tokens):]:  # the row's new token (none once it ended)
                    dec.push(token)
                ended = bool(tokens) and tokens[-1] == tok.eos_id
                response = process_response(dec.finish() if ended or final else dec.text)
                out.append(Reply(response, [*kept, (query, response)], len(ids), len(tokens), ended))
            return out

        new: list[list[int]] = [[] for _ in items]
        for new in generate(self.model, [ids for ids, _ in fitted], cfg, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, vocab_limit=tok.vocab_size):
            yield replies(new, final=False)
        if any(dec.held_back for dec in decoders):  # an answer cut inside a character: its last bytes
            yield replies(new, final=True)

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

    device = resolve_device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise GlmgymError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if path_or_id == "random:tiny":

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


def load_with(options: ModelOptions) -> ChatGLM:
    """`load` as a command's `ModelOptions` ask (threads set first)."""
    set_threads(options.threads)
    return load(options.model, dtype=options.dtype, device=options.device, quantize=options.quantize,
                ptuning_checkpoint=options.ptuning_checkpoint, lora=options.lora)


def merge_lora_checkpoint(model: str | Path, lora: str | Path, out_dir: str | Path,
                          dtype: torch.dtype | None = None) -> Path:
    """Write a plain float checkpoint of `model` with the LoRA adapter `lora` merged in (what
    `glmgym chat quantize` then takes), usable wherever the base folder was: the base's other
    files come along as files (its config.json keys glmgym does not use, such as `auto_map`;
    tokenizer files; its own `*.py`, copied, never imported), and the weights are written in the
    base's format (`.safetensors`, or `.bin` shards for a base that has only those).

    Args:
        model: the float base: a directory, hub id (local cache) or random:tiny.
        lora: the PEFT adapter directory.
        out_dir: the new folder (written atomically).
        dtype: the weights' dtype (default: the base's `torch_dtype`, else fp16 as THUDM's).

    Raises:
        GlmgymError: a quantized base, or an adapter that does not fit the model.
    """
    base_dir = None if str(model) == "random:tiny" else resolve_model_dir(str(model))
    base_config: dict = {}
    if base_dir is not None and (base_dir / "config.json").is_file():
        base_config = read_json(base_dir / "config.json")
    if dtype is None:
        dtype = getattr(torch, str(base_config.get("torch_dtype", "float16")), torch.float16)
    bot = load(str(model), dtype=torch.float32, device="cpu", lora=lora)  # merged in fp32
    safetensors = base_dir is None or any(base_dir.glob("*.safetensors")) or not any(base_dir.glob("*.bin"))
    out = save_model(bot.model.to(dtype), out_dir, safetensors=safetensors, tokenizer=bot.tokenizer,
                     base_dir=base_dir)
    return out
