"""`glmgym chat`: a streaming terminal chat, or a one-shot answer with --prompt."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

from glmgym.chat.config import GenerationConfig
from glmgym.errors import GlmgymError

__all__ = ["ChatCLIConfig", "QuantizeConfig", "run_chat", "set_threads"]

WELCOME = ("ChatGLM-6B ({name}). Type a message and press Enter; 'clear' resets the conversation, "
           "'stop' leaves, Ctrl-C interrupts a reply.\n"
           "欢迎使用 ChatGLM-6B：输入内容即可对话，clear 清空对话历史，stop 退出，Ctrl-C 打断回答。")


@dataclass
class ChatCLIConfig:
    """Options of `glmgym chat`."""

    model: str = "THUDM/chatglm-6b"
    """Checkpoint directory, hub id (from the local cache, or downloaded when online), or
    random:tiny (a tiny random model: its output is noise)."""
    dtype: str | None = field(default=None, metadata={"choices": ("float32", "bfloat16", "float16")})
    """Weights and compute dtype; default: bfloat16 where the hardware has it, else float32 on CPU."""
    device: str | None = None
    """Torch device; default: cuda when available, else cpu."""
    quantize: int | None = field(default=None, metadata={"choices": (4, 8)})
    """Quantize the block weights to INT4 or INT8 while loading (quantized checkpoints load as
    they are)."""
    threads: int | None = None
    """CPU threads for PyTorch; default: all physical cores."""
    prompt: str | None = field(default=None, metadata={"metavar": "TEXT"})
    """Answer this one message on stdout and exit."""
    max_length: int = GenerationConfig.max_length
    """Longest prompt + answer in tokens; older turns are dropped to fit."""
    top_p: float = GenerationConfig.top_p
    """Nucleus sampling mass."""
    temperature: float = GenerationConfig.temperature
    """Sampling temperature."""
    seed: int | None = None
    """Sampling seed, for reproducible answers."""
    ptuning_checkpoint: str | None = field(default=None, metadata={"metavar": "DIR"})
    """A P-Tuning v2 checkpoint (checkpoint-N/ of `glmgym chat finetune` or THUDM's ptuning)."""
    lora: str | None = field(default=None, metadata={"metavar": "DIR"})
    """A PEFT LoRA adapter, merged into the float weights at load (before --quantize)."""


@dataclass
class QuantizeConfig:
    """Options of `glmgym chat quantize`."""

    model: str = field(default="", metadata={"required": True, "metavar": "SRC"})
    """Float checkpoint directory or hub id (from the local cache)."""
    bits: int = field(default=4, metadata={"required": True, "choices": (4, 8)})
    """4 or 8."""
    out: str = field(default="", metadata={"required": True, "metavar": "DIR"})
    """Output directory (written atomically)."""
    group_size: int | None = field(default=None, metadata={"metavar": "G"})
    """INT4 group size: 32, 64, 128 or 256 (default 128), or 0 for one scale per row (THUDM's
    scheme, loadable by THUDM's code)."""
    embeddings: bool = False
    """Also quantize the word embeddings (and so the tied lm_head), per row."""


def set_threads(threads: int | None) -> None:
    """Use `threads` CPU threads (None keeps PyTorch's default, one per physical core)."""
    if threads is None:
        return
    if threads < 1:
        raise GlmgymError(f"--threads must be at least 1, not {threads}")
    import torch

    torch.set_num_threads(threads)


def run_chat(cfg: ChatCLIConfig) -> int:
    """Run the terminal chat (or the one-shot prompt); return the exit code."""
    from glmgym.chat.session import HistoryTrimmedWarning, load

    set_threads(cfg.threads)
    bot = load(cfg.model, dtype=cfg.dtype, device=cfg.device, quantize=cfg.quantize,
               ptuning_checkpoint=cfg.ptuning_checkpoint, lora=cfg.lora)
    gen = {"max_length": cfg.max_length, "top_p": cfg.top_p, "temperature": cfg.temperature,
           "seed": cfg.seed}
    if bot.name == "random:tiny":
        print("note: random:tiny is a tiny model with random weights; its answers are noise.",
              file=sys.stderr)

    def notice(message, category, *args, **kwargs):
        if issubclass(category, HistoryTrimmedWarning):
            print(f"\n[{message}]", file=sys.stderr)
        else:
            previous(message, category, *args, **kwargs)

    previous, warnings.showwarning = warnings.showwarning, notice
    try:
        return _converse(bot, cfg, gen)
    finally:
        warnings.showwarning = previous  # the caller's handler again (run_chat is also a library call)


def _converse(bot, cfg: ChatCLIConfig, gen: dict) -> int:
    """The one-shot answer or the interactive loop."""
    if cfg.prompt is not None:
        response, _ = bot.chat(cfg.prompt, **gen)
        print(response)
        return 0
    print(WELCOME.format(name=bot.name))
    history: list[tuple[str, str]] = []
    while True:
        try:
            query = input("\n用户 (you): ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(type 'stop' to leave)")
            continue
        if query == "stop":
            return 0
        if query == "clear":
            history = []
            print("(history cleared / 对话历史已清空)")
            continue
        if not query:
            continue
        print("ChatGLM-6B: ", end="", flush=True)
        shown = ""
        try:
            new_history = history
            for response, new_history in bot.stream_chat(query, history, **gen):  # noqa: B007
                # the post-processed text can change earlier characters: print only what extends it
                if response.startswith(shown):
                    print(response[len(shown):], end="", flush=True)
                    shown = response
            history = new_history
        except KeyboardInterrupt:
            history = [*history, (query, shown)]  # keep the partial answer in the conversation
            print(" [interrupted]", end="")
        except GlmgymError as exc:
            print(f"\n[{exc}]", file=sys.stderr)
        print(flush=True)


@dataclass
class MergeLoraConfig:
    """Options of `glmgym chat merge-lora`."""

    model: str = field(default="", metadata={"required": True, "metavar": "SRC"})
    """Float base checkpoint directory or hub id (from the local cache)."""
    lora: str = field(default="", metadata={"required": True, "metavar": "DIR"})
    """PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors or .bin)."""
    out: str = field(default="", metadata={"required": True, "metavar": "DIR"})
    """Output directory (written atomically): a plain float checkpoint with the base's other files
    (config keys such as auto_map, tokenizer files, its *.py)."""
    dtype: str | None = field(default=None, metadata={"choices": ("float16", "bfloat16", "float32")})
    """The merged weights' dtype; default: the base's."""
