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
from glmgym.chat.config import ModelOptions, load_config
from glmgym.chat.formats import format_for
from glmgym.chat.generate import GenerationConfig, generate
from glmgym.chat.model import GLMModel
from glmgym.chat.model_v2 import GLM2Model
from glmgym.chat.quantize import QuantSpec, quantize_model
from glmgym.chat.template import (
    HistoryTrimmedWarning,
    IncrementalDecoder,
    Reply,
    build_prompt,
    fit_prompt,
    process_response,
)
from glmgym.chat.tiny import TINY_FAMILIES, build_tiny, build_tiny_v2
from glmgym.chat.tokenizer import ChatGLMTokenizer
from glmgym.chat.tokenizer_v2 import load_tokenizer_v2
from glmgym.devices import resolve_device, set_threads
from glmgym.errors import GlmgymError

__all__ = [
    "ChatGLM", "HistoryTrimmedWarning", "Reply", "build_prompt", "load", "load_with", "merge_lora_checkpoint",
    "process_response",
]

class ChatGLM:
    """A loaded family member (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat): `chat`,
    `stream_chat` with the reference's call shapes, and the `.model` / `.tokenizer` underneath.

    The history is what the reference's `chat` returns: (query, answer) pairs for ChatGLM-6B and
    ChatGLM2-6B, `{"role", "content", ...}` messages for ChatGLM3-6B and GLM-4 (whose answer is a
    dict `{"name", "parameters"}` when the model calls a tool; see `formats.ChatFormat.answer`).
    """

    def __init__(self, model: GLMModel | GLM2Model, tokenizer, name: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.format = format_for(model.config, tokenizer)

    def config(self, gen: dict) -> GenerationConfig:
        """A `GenerationConfig` from keyword options (TypeError on unknown ones)."""
        return GenerationConfig.of(gen)

    def fit_prompt(self, query: str, history: list, cfg: GenerationConfig, trim: bool = True,
                   role: str = "user") -> tuple[list[int], list]:
        """Prompt ids and the history they hold (the oldest turns dropped to fit, see
        `template.fit_prompt`)."""
        context = self.model.config.max_sequence_length
        if role != "user" and not self.format.roles:
            raise GlmgymError(f"{self.format.family} has no {role!r} role (ChatGLM3-6B and GLM-4 have)")
        if self.model.config.version == 1:
            return fit_prompt(self.tokenizer, context, query, history, cfg, trim)
        return self.format.fit(context, query, history, cfg, trim, role)

    def stream_batch(self, items: list[tuple[str, list]], trim_history: bool = True,
                     role: str = "user", **gen: Any) -> Iterator[list[Reply]]:
        """Answer several conversations in one left-padded batch; yield one `Reply` per row per step.

        A row that has ended keeps its last reply while the others go on.

        Args:
            items: (query, history) per conversation.
            trim_history: drop the oldest turns when a prompt does not fit; False raises instead.
            role: the queries' role (ChatGLM3/GLM-4: `observation` feeds a tool's result back).
            **gen: `GenerationConfig` options, shared by the rows.

        Raises:
            GlmgymError: a prompt does not fit the context (and trimming is off or not enough).
        """
        cfg = self.config(gen)
        fitted = [self.fit_prompt(q, list(h or []), cfg, trim_history, role) for q, h in items]
        tok = self.tokenizer
        stops = self.format.stop_ids
        decoders = [IncrementalDecoder(tok) for _ in items]

        def replies(new: list[list[int]], final: bool) -> list[Reply]:
            out = []
            for (query, _), (ids, kept), tokens, dec in zip(items, fitted, new, decoders):
                ended = bool(tokens) and tokens[-1] in stops
                for token in tokens[len(dec.tokens):len(tokens) - ended]:  # the new token, not a stop
                    dec.push(token)
                done = ended or final
                text = dec.finish() if done else dec.text
                response, history = self.format.answer(text, kept, query, role, done)
                out.append(Reply(response, history, len(ids), len(tokens), ended))
            return out

        new: list[list[int]] = [[] for _ in items]
        for new in generate(self.model, [ids for ids, _ in fitted], cfg, eos_id=stops,
                            pad_id=tok.pad_id, vocab_limit=tok.vocab_size):
            yield replies(new, final=False)
        # an answer cut by the length limit: once more as final (its last bytes, if cut inside a
        # character; its unfinished first line, for the v2 formats)
        cut = any(not (tokens and tokens[-1] in stops) for tokens in new)
        if any(dec.held_back for dec in decoders) or (cut and self.format.roles):
            yield replies(new, final=True)

    def stream_reply(self, query: str, history: list | None = None, trim_history: bool = True,
                     role: str = "user", **gen) -> Iterator[Reply]:
        """Like `stream_chat`, with token counts and whether a stop token ended the answer.

        Raises:
            GlmgymError: the prompt does not fit the context (and trimming is off or not enough).
        """
        for replies in self.stream_batch([(query, history or [])], trim_history, role, **gen):
            yield replies[0]

    def stream_chat(self, query: str, history: list | None = None, role: str = "user",
                    **gen: Any) -> Iterator[tuple[str | dict, list]]:
        """Yield `(response_so_far, history with this turn)` while generating.

        Args:
            query: the message.
            history: the history `chat` returned (None: a new conversation).
            role: `user`; ChatGLM3-6B and GLM-4 also take `observation` (a tool's result).
            **gen: the fields of `GenerationConfig` (its defaults are the reference's).
        """
        for reply in self.stream_reply(query, history, role=role, **gen):
            yield reply.response, reply.history

    def chat(self, query: str, history: list | None = None, role: str = "user",
             **gen) -> tuple[str | dict, list]:
        """Answer `query`; return `(response, history with this turn)` as the reference's `chat`."""
        response, new_history = "", list(history or [])
        for response, new_history in self.stream_chat(query, history, role, **gen):  # noqa: B007
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
    if path_or_id == "random:tiny" or path_or_id.removeprefix("random:tiny-") in TINY_FAMILIES:
        family = path_or_id.removeprefix("random:tiny").lstrip("-")
        model, tokenizer = build_tiny_v2(family) if family else build_tiny()
        model = model.to(device=device, dtype=dtype or torch.float32)
        name = path_or_id
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
    if quantize and (lora or name.startswith("random:tiny")):
        quantize_model(model, QuantSpec.default(quantize, group_size), kernels)
    if ptuning_checkpoint:
        load_ptuning(model, ptuning_checkpoint)
    return ChatGLM(model, tokenizer, name)


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of a checkpoint directory: ChatGLM-6B's `ice_text.model` (v1.0's id offset
    from the config), ChatGLM2/3's SentencePiece or GLM-4's BPE `tokenizer.model`."""

    model_dir = Path(model_dir)
    config = load_config(model_dir / "config.json")
    if config.version == 2:
        return load_tokenizer_v2(model_dir, config.family)
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
