"""`glmgym chat`: a streaming terminal chat, or a one-shot answer with --prompt."""

from __future__ import annotations

import sys
import warnings

from glmgym.chat.config import ChatCLIConfig
from glmgym.chat.session import load_with
from glmgym.chat.template import HistoryTrimmedWarning
from glmgym.errors import GlmgymError

__all__ = ["run_chat"]

WELCOME = ("ChatGLM-6B ({name}). Type a message and press Enter; 'clear' resets the conversation, "
           "'stop' leaves, Ctrl-C interrupts a reply.\n"
           "欢迎使用 ChatGLM-6B：输入内容即可对话，clear 清空对话历史，stop 退出，Ctrl-C 打断回答。")


def run_chat(cfg: ChatCLIConfig) -> int:
    """Run the terminal chat (or the one-shot prompt); return the exit code."""

    bot = load_with(cfg)
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


