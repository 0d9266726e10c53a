"""`glmgym chat`: a streaming terminal chat, or a one-shot answer with --prompt.

With ChatGLM3-6B and GLM-4, `--system` sets a system prompt and `--tools tools.json` gives the
model tools (OpenAI's shape): when it calls one, the call is shown and you type its result, which
goes back to the model as an observation, as the reference's tool demo does.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from glmgym.chat.config import ChatCLIConfig, GenerationConfig
from glmgym.chat.session import load_with
from glmgym.chat.template import HistoryTrimmedWarning
from glmgym.errors import GlmgymError

__all__ = ["read_tools", "run_chat"]

NAMES = {"chatglm": "ChatGLM-6B", "chatglm2": "ChatGLM2-6B", "chatglm3": "ChatGLM3-6B", "glm4": "GLM-4"}
WELCOME = ("{model} ({name}). Type a message and press Enter; 'clear' resets the conversation, "
           "'stop' leaves, Ctrl-C interrupts a reply.\n"
           "欢迎使用 {model}：输入内容即可对话，clear 清空对话历史，stop 退出，Ctrl-C 打断回答。")


def read_tools(path: str | Path) -> list[dict]:
    """A tools file: a JSON list of `{"type": "function", "function": {"name", ...}}`.

    Raises:
        GlmgymError: missing, not JSON, or not a list of functions.
    """
    path = Path(path)
    try:
        tools = json.loads(path.read_text())
    except FileNotFoundError:
        raise GlmgymError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GlmgymError(f"{path} is not valid JSON: {exc}") from None
    ok = isinstance(tools, list) and all(
        isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str) for t in tools)
    if not ok or not tools:
        raise GlmgymError(f'{path} must hold a list of tools: [{{"type": "function", "function": '
                          f'{{"name": ..., "parameters": ...}}}}, ...]')
    return tools


def run_chat(cfg: ChatCLIConfig) -> int:
    """Run the terminal chat (or the one-shot prompt); return the exit code."""

    tools = read_tools(cfg.tools) if cfg.tools else None  # before the model loads: bad files fail fast
    gen = {"max_length": cfg.max_length, "top_p": cfg.top_p, "temperature": cfg.temperature,
           "seed": cfg.seed, "prompt_lookup_num_tokens": cfg.prompt_lookup}
    GenerationConfig.of(gen)  # bad options fail before the model loads
    bot = load_with(cfg)
    if (tools or cfg.system) and not bot.format.roles:
        raise GlmgymError(f"{NAMES[bot.format.family]} has no system prompt or tools "
                          "(ChatGLM3-6B and GLM-4 have)")
    if bot.name.startswith("random:tiny"):
        print(f"note: {bot.name} is a tiny model with random weights; its answers are noise.",
              file=sys.stderr)

    def notice(message, category, *args, **kwargs):
        if issubclass(category, HistoryTrimmedWarning):
            print(f"\n[{message}]", file=sys.stderr)
        else:
            previous(message, category, *args, **kwargs)

    previous, warnings.showwarning = warnings.showwarning, notice
    try:
        return _converse(bot, cfg, gen, _start(bot, cfg.system, tools))
    finally:
        warnings.showwarning = previous  # the caller's handler again (run_chat is also a library call)


def _start(bot, system: str | None, tools: list[dict] | None) -> list:
    """The history a conversation starts from: the system message (with the tools), if any."""
    if not (system or tools):
        return []
    if not tools:
        return [{"role": "system", "content": system}]
    if bot.format.family == "glm4":
        return [{"role": "system", "content": system or "", "tools": tools}]
    # ChatGLM3 lists the functions themselves, after its tool-use system text
    return [{"role": "system", "content": system or "Answer the following questions as best as you can. "
             "You have access to the following tools:", "tools": [t["function"] for t in tools]}]


def _show(response) -> str:
    if isinstance(response, str):
        return response
    if "parameters" in response:
        return f"[calls {response['name']}({json.dumps(response['parameters'], ensure_ascii=False)})]"
    return f"[{response['name']}] {response.get('content', '')}"


def _converse(bot, cfg: ChatCLIConfig, gen: dict, start: list) -> int:
    """The one-shot answer or the interactive loop."""
    if cfg.prompt is not None:
        response, _ = bot.chat(cfg.prompt, start, **gen)
        print(_show(response))
        return 0
    model = NAMES[bot.format.family]
    print(WELCOME.format(model=model, name=bot.name))
    history: list = list(start)
    query, role = None, "user"
    while True:
        if query is None:
            try:
                query = input("\n用户 (you): ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print("\n(type 'stop' to leave)")
                query = None
                continue
            if query == "stop":
                return 0
            if query == "clear":
                history, query = list(start), None
                print("(history cleared / 对话历史已清空)")
                continue
            if not query:
                query = None
                continue
        print(f"{model}: ", end="", flush=True)
        shown, response = "", ""
        try:
            new_history = history
            for response, new_history in bot.stream_chat(query, history, role, **gen):  # noqa: B007
                text = response if isinstance(response, str) else ""  # a tool call shows when done
                # the post-processed text can change earlier characters: print only what extends it
                if text.startswith(shown):
                    print(text[len(shown):], end="", flush=True)
                    shown = text
            history = new_history
        except KeyboardInterrupt:
            # keep the partial answer in the conversation
            history = ([*history, (query, shown)] if not bot.format.roles else
                       [*history, {"role": role, "content": query},
                        {"role": "assistant", "metadata": "", "content": shown}])
            response = shown
            print(" [interrupted]", end="")
        except GlmgymError as exc:
            print(f"\n[{exc}]", file=sys.stderr)
        query, role = None, "user"
        if isinstance(response, dict):
            print(_show(response), end="")
            if "parameters" in response:  # ask for the tool's result and give it back to the model
                try:
                    query = input(f"\n{response['name']} → result (observation): ").strip() or "{}"
                    role = "observation"
                except (EOFError, KeyboardInterrupt):
                    query = None
        print(flush=True)
