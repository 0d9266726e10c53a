"""Each family member's chat format: its prompt, where an answer ends, and what the answer means.

- ChatGLM-6B: `template.build_prompt` (`[Round i]\\n问：q\\n答：a\\n`), history of (query, answer)
  pairs, the reference's punctuation clean-up (`template.process_response`).
- ChatGLM2-6B: `[gMASK] sop` + `[Round i]\\n\\n问：q\\n\\n答：a\\n\\n` rounds from 1, history of pairs.
- ChatGLM3-6B and GLM-4: `[gMASK] sop` + one message per turn, `<|role|>` + `metadata\\n` +
  content, then `<|assistant|>`; history of `{"role", "content", "metadata"?, "tools"?}` dicts as
  the reference's `chat` keeps it. Tools live in a first system message (ChatGLM3: its content +
  the tools as indented JSON; GLM-4: a fixed preamble and one section per function). An answer
  whose first line is not blank is a tool call: ChatGLM3 writes the function's name, then a code
  block `tool_call(key=value, ...)`; GLM-4 the name, then the arguments as JSON.

We deviate from the reference in one place: ChatGLM3's reference `eval`s the model's code block
to read the arguments; we parse it (`ast`) and accept keyword arguments with literal values only,
so the model's output never runs as code.
"""

from __future__ import annotations

import ast
import json
import warnings
from dataclasses import dataclass
from typing import Any

from glmgym.chat.config import GenerationConfig
from glmgym.chat.template import HistoryTrimmedWarning, build_prompt, process_response
from glmgym.errors import GlmgymError

__all__ = ["ChatFormat", "ToolCall", "format_for", "parse_tool_call"]

GLM4_TOOLS_PREAMBLE = (
    "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
"""The system text GLM-4's chat template puts before the tool descriptions."""
GLM4_TOOL_NOTE = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


@dataclass
class ToolCall:
    """A function call the model asked for."""

    name: str
    """The function's name (the answer's first line)."""
    arguments: dict[str, Any] | None
    """The parsed arguments; None while the call is still being written or when they do not parse."""
    raw: str
    """The arguments as the model wrote them (ChatGLM3: the code block; GLM-4: JSON)."""


def parse_tool_call(family: str, name: str, body: str) -> ToolCall:
    """Read the arguments of a tool call answer (`body`: what follows the name line)."""
    if family == "glm4":
        try:
            args = json.loads(body)
        except json.JSONDecodeError:
            args = None
        return ToolCall(name, args if isinstance(args, dict) else None, body)
    # ChatGLM3: ```python\ntool_call(k=v, ...)\n``` -> the lines between the fences
    lines = body.strip().split("\n")
    code = "\n".join(lines[1:-1]) if len(lines) >= 3 else body
    args = None
    try:
        call = ast.parse(code.strip(), mode="eval").body
        is_call = (
            isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
        )
        if is_call and not call.args and all(k.arg for k in call.keywords):
            args = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        args = None
    return ToolCall(name, args, body)


class ChatFormat:
    """A family member's chat format (see the module docstring); `format_for(config)` picks it.

    Args:
        family: `chatglm`, `chatglm2`, `chatglm3` or `glm4`.
        tokenizer: the model's tokenizer.
    """

    def __init__(self, family: str, tokenizer) -> None:
        self.family, self.tok = family, tokenizer
        self.roles = family in ("chatglm3", "glm4")

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer."""
        return [self.tok.eos_id] if self.family == "chatglm" else self.tok.stop_ids

    @property
    def tools(self) -> bool:
        """The model can call tools."""
        return self.roles

    # -- prompts ---------------------------------------------------------------------------------

    def prompt_ids(self, query: str, history: list | tuple = (), role: str = "user") -> list[int]:
        """The prompt of `query` after `history`, as token ids."""
        tok = self.tok
        if self.family == "chatglm":
            return tok.encode(build_prompt(query, history))
        if self.family == "chatglm2":
            text = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, 1))
            return [*tok.prefix, *tok.tokenize(text + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答：")]
        ids = list(tok.prefix)
        for item in history:
            ids += self._message(item)
        ids += self._message({"role": role, "content": query})  # GLM-4 skips an empty one, as its template
        return [*ids, tok.command("<|assistant|>")]

    def as_history(self, history) -> list:
        """`history` in this format's shape: (query, answer) pairs become user and assistant
        messages for ChatGLM3/GLM-4 (a convenience; their reference takes messages only)."""
        if not self.roles:
            return list(history)
        out: list[dict] = []
        for item in history:
            if isinstance(item, dict):
                out.append(item)
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                out += [{"role": "user", "content": item[0]},
                        {"role": "assistant", "metadata": "", "content": item[1]}]
            else:
                raise GlmgymError(f"a history item must be a message dict or a (query, answer) pair, "
                                  f"not {item!r}")
        return out

    def _message(self, item: dict) -> list[int]:
        role = item.get("role")
        if role not in ("system", "user", "assistant", "observation"):
            raise GlmgymError(
                f"a message's role must be system, user, assistant or observation, not {role!r}"
            )
        content, metadata, tools = item.get("content") or "", item.get("metadata") or "", item.get("tools")
        tok = self.tok
        if not isinstance(content, str):  # an assistant's tool call kept in the history
            content = json.dumps(content, ensure_ascii=False)
        if self.family == "chatglm3":
            if role == "system" and tools:
                content = content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
            return [tok.command(f"<|{role}|>"), *tok.tokenize(f"{metadata}\n"), *tok.tokenize(content)]
        # GLM-4's chat template renders text and tokenizes what lies between control tokens as one
        # piece (so `metadata\ncontent` is one text, unlike ChatGLM3's two)
        ids: list[int] = []
        if tools:  # the tools become a system message of their own, before this one
            text = GLM4_TOOLS_PREAMBLE + "\n\n# 可用工具"
            for tool in tools:
                fn = (
                    tool.get("function")
                    if isinstance(tool, dict) and tool.get("type") == "function"
                    else None
                )
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise GlmgymError(
                        "each tool must be {'type': 'function', 'function': {'name': ..., ...}}"
                    )
                # one newline before `##`: Hugging Face renders the template with trim_blocks, which
                # eats the first of the two that follow a block tag there
                text += f"\n## {fn['name']}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}{GLM4_TOOL_NOTE}"
            ids += [tok.command("<|system|>"), *tok.tokenize("\n" + text)]
        if content:
            ids += [tok.command(f"<|{role}|>"), *tok.tokenize(f"{metadata}\n{content}")]
        return ids

    def fit(
        self,
        context: int,
        query: str,
        history: list,
        cfg: GenerationConfig,
        trim: bool = True,
        role: str = "user",
    ) -> tuple[list[int], list]:
        """Prompt ids and the history they hold; the oldest turns go (a system message stays) until
        the prompt leaves room for the answer. See `template.fit_prompt` for the rules."""
        limit = min(cfg.max_length, context)
        room = cfg.max_new_tokens or (min(256, limit // 4) if trim else 1)
        history, dropped = self.as_history(history), 0
        while True:
            ids = self.prompt_ids(query, history, role)
            if len(ids) + room <= limit:
                break
            if not trim:
                raise GlmgymError(
                    f"the prompt has {len(ids)} tokens; with {room} new tokens it exceeds "
                    f"the context of {limit} tokens (shorten the history or ask for trimming)"
                )
            first = (
                1 if history and isinstance(history[0], dict) and history[0].get("role") == "system" else 0
            )
            if len(history) <= first:
                break
            history.pop(first)
            dropped += 1
        if dropped:
            warnings.warn(
                HistoryTrimmedWarning(
                    f"dropped the {dropped} oldest turn(s) of the history to fit max_length {limit}"
                ),
                stacklevel=4,
            )
        if len(ids) >= limit:
            raise GlmgymError(f"the query alone has {len(ids)} tokens, more than max_length {limit} allows")
        return ids, history

    # -- answers ---------------------------------------------------------------------------------

    def answer(
        self, text: str, history: list, query: str, role: str = "user", final: bool = True
    ) -> tuple[str | dict, list]:
        """What the answer `text` (the decoded tokens before the stop token) means, and the history
        with this turn added: the reference's `process_response`.

        Returns a string, or for a tool call `{"name", "parameters"}` (`{"name", "content"}` while
        the call is unfinished, when its arguments do not parse, or without tools in the history).
        """
        if self.family == "chatglm":
            response = process_response(text)
            return response, [*history, (query, response)]
        if self.family == "chatglm2":
            response = text.strip().replace("[[训练时间]]", "2023年")
            return response, [*history, (query, response)]
        history = [*history, {"role": role, "content": query}]
        content: str | dict = ""
        has_tools = bool(history) and history[0].get("role") == "system" and bool(history[0].get("tools"))
        segments = text.split("<|assistant|>")
        for j, segment in enumerate(segments):
            if not final and j == len(segments) - 1 and "\n" not in segment:
                content = ""  # its first line is not finished: a tool's name, or an answer's start
                break
            metadata, _, body = segment.partition("\n") if "\n" in segment else ("", "", segment)
            if not metadata.strip():
                content = body.strip().replace("[[训练时间]]", "2023年")
                history.append({"role": "assistant", "metadata": metadata, "content": content})
                continue
            history.append({"role": "assistant", "metadata": metadata, "content": body})
            call = parse_tool_call(self.family, metadata.strip(), body) if has_tools and final else None
            if call is not None and call.arguments is not None:
                content = {"name": call.name, "parameters": call.arguments}
            else:
                content = {"name": metadata.strip(), "content": body}
        return content, history


def format_for(config, tokenizer) -> ChatFormat:
    """The chat format of a model's config (its `family`)."""
    return ChatFormat(config.family, tokenizer)
