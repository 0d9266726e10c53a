"""OpenAI's wire format, without a web framework: request models, option mapping, response,
logprobs and stream-chunk shapers.

`server.py` holds only the routes; everything a route returns is built here, so the shapes are
tested without a server (as llama.cpp keeps its `server` routes apart from its `utils` shapers).
Request models are pydantic classes (pydantic comes with the `serve` extra) made on first use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from glmgym.chat.config import MAX_DRAFT_TOKENS
from glmgym.chat.serving.batch import TokenOut
from glmgym.chat.serving.engine import Chunk, Done, Failed, Job
from glmgym.chat.session import Reply
from glmgym.errors import import_extra

__all__ = [
    "Answer",
    "ApiError",
    "ChatTurn",
    "LogprobShaper",
    "chat_completion",
    "chat_stream",
    "completion_stream",
    "error_body",
    "events",
    "gen_options",
    "reference_api_response",
    "request_models",
    "stop_strings",
    "text_completion",
    "to_chat",
    "to_chatglm",
    "usage",
]

_KINDS = {400: "invalid_request_error", 503: "service_unavailable", 504: "timeout_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape (`error_body`) with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}

    @classmethod
    def of(cls, event: Failed) -> ApiError:
        """The error a failed job answers with."""
        return cls(event.status, event.message, _KINDS.get(event.status, "server_error"))


def error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """`{"error": {...}}` as OpenAI sends it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@cache
def request_models() -> dict[str, type]:
    """The request bodies as pydantic models: Message, ChatCompletionRequest, CompletionRequest
    and ApiRequest (the reference api.py's body)."""
    import_extra("pydantic", "serve")
    from pydantic import BaseModel, ConfigDict, Field

    class FunctionCall(BaseModel):
        name: str
        arguments: str

    class ToolCall(BaseModel):
        id: str | None = None
        type: Literal["function"] = "function"
        function: FunctionCall

    class Message(BaseModel):
        role: Literal["system", "user", "assistant", "tool"]
        content: str | None = None
        tool_calls: list[ToolCall] | None = None
        tool_call_id: str | None = None
        name: str | None = None

    class Function(BaseModel):
        model_config = ConfigDict(extra="allow")
        name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
        description: str | None = None
        parameters: dict[str, Any] | None = None

    class Tool(BaseModel):
        type: Literal["function"]
        function: Function

    class FunctionName(BaseModel):
        name: str

    class NamedToolChoice(BaseModel):
        type: Literal["function"]
        function: FunctionName

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        stop: str | list[str] | None = Field(None, max_length=16)
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        prompt_lookup_num_tokens: int | None = Field(None, ge=0, le=MAX_DRAFT_TOKENS)  # glmgym's
        n: int = Field(1, ge=1, le=64)
        stream: bool = False
        stream_options: StreamOptions | None = None
        user: str | None = None  # accepted and ignored

        @property
        def include_usage(self) -> bool:
            return self.stream_options is not None and self.stream_options.include_usage

    class ChatCompletionRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=20)
        trim_history: bool = False
        tools: list[Tool] | None = Field(None, max_length=128)
        tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    class CompletionRequest(Sampling):
        prompt: str | list[str] = Field(min_length=1)
        max_tokens: int = Field(16, ge=1)
        logprobs: int | None = Field(None, ge=0, le=5)
        echo: bool = False

    class ApiRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        prompt: str
        history: list[tuple[str, str]] = []
        max_length: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0, le=1)
        temperature: float | None = Field(None, gt=0, le=2)

    return {"Message": Message, "ChatCompletionRequest": ChatCompletionRequest,
            "CompletionRequest": CompletionRequest, "ApiRequest": ApiRequest}


# ---------------------------------------------------------------------------------------------
# Requests -> ChatGLM


def to_chatglm(messages) -> tuple[str, list[tuple[str, str]]]:
    """OpenAI messages -> (query, history) of ChatGLM-6B / ChatGLM2-6B, which have no roles: system
    text goes in front of the first user message.

    Raises:
        ApiError: empty messages, an assistant turn without a user turn before it, no final user
            message, or tool messages (these models cannot call tools).
    """
    for i, m in enumerate(messages):
        if m.role == "tool" or m.tool_calls:
            raise ApiError(400, f"messages[{i}]: this model cannot call tools (ChatGLM3-6B and GLM-4 can)",
                           param=f"messages[{i}]")
    system = "\n".join(m.content for m in messages if m.role == "system" and (m.content or "").strip())
    history: list[tuple[str, str]] = []
    user: str | None = None
    for i, m in enumerate(messages):
        if m.role == "system":
            continue
        if not (m.content or "").strip():
            raise ApiError(400, f"messages[{i}] ({m.role}) is empty", param=f"messages[{i}].content")
        if m.role == "user":
            user = m.content if user is None else f"{user}\n{m.content}"
            continue
        if user is None:
            raise ApiError(400, f"messages[{i}]: an assistant message must follow a user message",
                           param=f"messages[{i}]")
        history.append((user, m.content))
        user = None
    if user is None:
        raise ApiError(400, "the last non-system message must come from the user", param="messages")
    if system:
        if history:
            history[0] = (f"{system}\n\n{history[0][0]}", history[0][1])
        else:
            user = f"{system}\n\n{user}"
    return user, history


CHATGLM3_TOOL_SYSTEM = ("Answer the following questions as best as you can. "
                        "You have access to the following tools:")
"""The system message ChatGLM3's own tool examples give the tools with."""


@dataclass
class ChatTurn:
    """An OpenAI chat request as a turn of a model with roles (ChatGLM3-6B, GLM-4)."""

    query: str
    """The last message's content."""
    history: list
    """The messages before it, in the reference's `chat` history shape."""
    role: str = "user"
    """`user`, or `observation` for a tool's result."""
    answer_prefix: str = ""
    """A forced tool call's name line (tool_choice names a function)."""
    tools: bool = False
    """Tools are in the prompt: an answer that calls one becomes `tool_calls`."""


def _tool_call_text(family: str, i: int, arguments: str) -> str:
    """An assistant's earlier call as the model wrote it: GLM-4 JSON, ChatGLM3 a code block."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        raise ApiError(400, f"messages[{i}].tool_calls: arguments are not JSON",
                       param=f"messages[{i}]") from None
    if family == "glm4":
        return json.dumps(args, ensure_ascii=False)
    if not isinstance(args, dict):
        raise ApiError(400, f"messages[{i}].tool_calls: arguments must be a JSON object",
                       param=f"messages[{i}]")
    return "```python\ntool_call(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")\n```"


def to_chat(messages, family: str, tools=None, tool_choice=None) -> ChatTurn:
    """OpenAI messages (with `tools` and `tool_choice`) -> a turn of ChatGLM3-6B or GLM-4.

    System messages come first (ChatGLM3 puts the tools in its system message; GLM-4 in one of its
    own); an assistant's `tool_calls` become its earlier call segments; `tool` messages are
    observations. `tool_choice`: `none` leaves the tools out of the prompt, `auto` and `required`
    put them in (the model decides; `required` cannot force a call), a named function puts only
    it in and starts the answer with its name.

    Raises:
        ApiError: a bad message order, a tool choice that names no given tool, or arguments that
            are not JSON.
    """
    functions = [t.function.model_dump(exclude_none=True) for t in tools or []]
    choice = tool_choice or ("auto" if functions else "none")
    prefix = ""
    if not isinstance(choice, str):
        named = [f for f in functions if f["name"] == choice.function.name]
        if not named:
            raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        functions, prefix = named, choice.function.name + "\n"
    elif choice == "none":
        functions = []
    elif choice == "required" and not functions:
        raise ApiError(400, "tool_choice is required but no tools were given", param="tool_choice")
    system = "\n".join(m.content for m in messages if m.role == "system" and (m.content or "").strip())
    history: list[dict] = []
    if functions:
        if family == "glm4":
            history.append({"role": "system", "content": system,
                            "tools": [{"type": "function", "function": f} for f in functions]})
        else:
            history.append({"role": "system", "content": system or CHATGLM3_TOOL_SYSTEM, "tools": functions})
    elif system:
        history.append({"role": "system", "content": system})
    rest = [(i, m) for i, m in enumerate(messages) if m.role != "system"]
    if not rest or rest[-1][1].role not in ("user", "tool"):
        raise ApiError(400, "the last non-system message must come from the user or a tool", param="messages")
    for i, m in rest[:-1]:
        if m.role == "assistant" and m.tool_calls:
            if (m.content or "").strip():
                history.append({"role": "assistant", "metadata": "", "content": m.content})
            for call in m.tool_calls:
                text = _tool_call_text(family, i, call.function.arguments)
                history.append({"role": "assistant", "metadata": call.function.name, "content": text})
            continue
        if not (m.content or "").strip():
            raise ApiError(400, f"messages[{i}] ({m.role}) is empty", param=f"messages[{i}].content")
        role = {"tool": "observation"}.get(m.role, m.role)
        history.append({"role": role, "content": m.content} if role != "assistant"
                       else {"role": "assistant", "metadata": "", "content": m.content})
    i, last = rest[-1]
    if not (last.content or "").strip():
        raise ApiError(400, f"messages[{i}] ({last.role}) is empty", param=f"messages[{i}].content")
    return ChatTurn(last.content, history, "observation" if last.role == "tool" else "user", prefix,
                    bool(functions))


def gen_options(context: int, temperature: float | None, top_p: float | None, max_tokens: int | None,
                seed: int | None, max_length: int | None = None, prompt_lookup: int = 0) -> dict[str, Any]:
    """Request sampling fields -> `GenerationConfig` fields (temperature 0 means greedy)."""
    gen: dict[str, Any] = {"max_length": max_length or context}
    if prompt_lookup:
        gen["prompt_lookup_num_tokens"] = prompt_lookup
    if temperature == 0:
        gen["do_sample"] = False
    elif temperature is not None:
        gen["temperature"] = temperature
    if top_p is not None:
        gen["top_p"] = top_p
    if max_tokens is not None:
        gen["max_new_tokens"] = max_tokens
    if seed is not None:
        gen["seed"] = seed
    return gen


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple (OpenAI takes a string or a list)."""
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


# ---------------------------------------------------------------------------------------------
# Engine events -> answers


@dataclass
class Answer:
    """What one of a call's answers has become, from its events."""

    reply: Reply | None = None
    finish_reason: str | None = None
    tokens: list[TokenOut] = field(default_factory=list)

    def take(self, event: Chunk | Done) -> None:
        """Fold one event of this answer in (the streamed and the plain paths both use this)."""
        if isinstance(event, Chunk):
            self.reply = event.reply
            self.tokens += event.logprobs
        else:
            self.finish_reason = event.finish_reason

    @property
    def text(self) -> str:
        """The answer's text so far (a tool call's as the model wrote it: name line, arguments)."""
        return _text(self.reply.response) if self.reply else ""

    def tool_call(self, tools: bool) -> dict[str, Any] | None:
        """The answer as one of OpenAI's `tool_calls` when it called a given tool and its
        arguments parse (the id is made from the answer's arguments, the same every time)."""
        r = self.reply.response if self.reply else None
        if not (tools and isinstance(r, dict) and "parameters" in r):
            return None
        arguments = json.dumps(r["parameters"], ensure_ascii=False)
        digest = hashlib.sha256(f"{r['name']}\n{arguments}".encode()).hexdigest()[:24]
        return {"id": f"call_{digest}", "type": "function",
                "function": {"name": r["name"], "arguments": arguments}}


def _text(response: str | dict) -> str:
    if isinstance(response, str):
        return response
    if "parameters" in response:
        return f"{response['name']}\n{json.dumps(response['parameters'], ensure_ascii=False)}"
    return f"{response['name']}\n{response.get('content', '')}"


async def events(jobs: list[Job], total: int) -> AsyncIterator[Chunk | Done]:
    """The events of a call's jobs (they share one queue) until all `total` answers are done.

    Raises:
        ApiError: a job failed.
    """
    done = 0
    queue = jobs[0].events
    while done < total:
        event = await queue.get()
        if isinstance(event, Failed):
            raise ApiError.of(event)
        done += isinstance(event, Done)
        yield event


def finish_reason(reason: str | None) -> str:
    """OpenAI's finish reasons: "stop" or "length" (a cancelled answer is cut short: "length");
    "tool_calls" is the chat shaper's, for an answer that calls a tool."""
    return "stop" if reason == "stop" else "length"


def usage(answers: list[Answer], prompt_tokens: int | None = None) -> dict[str, int]:
    """OpenAI's usage block over every answer; <eop> is not counted as a completion token."""
    replies = [a.reply for a in answers if a.reply is not None]
    if prompt_tokens is None:  # n answers of one prompt: the prompt once
        prompt_tokens = replies[0].prompt_tokens if replies else 0
    completion = sum(r.completion_tokens - int(r.ended) for r in replies)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


class LogprobShaper:
    """Token log-probabilities in OpenAI's two shapes (chat's and the legacy completions')."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.tok.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def chat(self, tokens: list[TokenOut]) -> dict[str, Any]:
        """`choices[i].logprobs` of a chat completion."""
        return {"content": [{**self._entry(t.token, t.logprob),
                             "top_logprobs": [self._entry(i, lp) for i, lp in t.top]} for t in tokens]}

    def legacy(self, tokens: list[TokenOut], offset: int = 0) -> dict[str, Any]:
        """`choices[i].logprobs` of a completion; `offset`: characters of the answer before these."""
        texts = [self.tok.token_text(t.token) for t in tokens]
        offsets = [offset + sum(len(x) for x in texts[:i]) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{self.tok.token_text(i): lp for i, lp in t.top} for t in tokens],
                "text_offset": offsets}


# ---------------------------------------------------------------------------------------------
# Whole responses


def chat_completion(meta: dict[str, Any], answers: list[Answer],
                    logprobs: Callable[[list[TokenOut]], dict] | None, tools: bool = False) -> dict[str, Any]:
    """A `chat.completion` object; `meta`: id, created, model. With `tools` (given to the model),
    an answer that calls one is a message with `tool_calls` and finish reason "tool_calls"."""
    choices = []
    for i, a in enumerate(answers):
        call = a.tool_call(tools)
        message = {"role": "assistant", "content": None, "tool_calls": [call]} if call else \
            {"role": "assistant", "content": a.text}
        choices.append({"index": i, "finish_reason": "tool_calls" if call else finish_reason(a.finish_reason),
                        "message": message, "logprobs": logprobs(a.tokens) if logprobs else None})
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(answers)}


def text_completion(meta: dict[str, Any], answers: list[Answer], logprobs: Callable | None,
                    prompt_tokens: int) -> dict[str, Any]:
    """A `text_completion` object; `meta`: id, created, model."""
    choices = [{"index": i, "text": a.text, "finish_reason": finish_reason(a.finish_reason),
                "logprobs": logprobs(a.tokens) if logprobs else None} for i, a in enumerate(answers)]
    return {**meta, "object": "text_completion", "choices": choices,
            "usage": usage(answers, prompt_tokens)}


def reference_api_response(answer: Answer, prompt: str, history: list, now: str) -> dict[str, Any]:
    """The reference api.py's answer: response, history, status, time."""
    reply = answer.reply
    turns = reply.history if reply else [*history, (prompt, "")]
    return {"response": answer.text, "history": [h if isinstance(h, dict) else list(h) for h in turns],
            "status": 200, "time": now}


# ---------------------------------------------------------------------------------------------
# Server-sent events


class _Streamer:
    """The text of each answer sent so far: only what extends it is sent, and the last
    characters that could still become a stop string are held back."""

    def __init__(self, total: int, stop: tuple[str, ...]) -> None:
        self.sent = [""] * total
        self.hold = max((len(s) for s in stop), default=1) - 1

    def delta(self, index: int, text: str, final: bool = False) -> str:
        safe = text if final or not self.hold else text[: len(text) - self.hold]
        sent = self.sent[index]
        # post-processing may rewrite earlier characters: send only what extends the text
        if len(safe) > len(sent) and safe.startswith(sent):
            self.sent[index] = safe
            return safe[len(sent):]
        return ""


def sse_data(body: dict[str, Any]) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(jobs: list[Job], total: int, stop: tuple[str, ...], chunk, usage_chunk,
               hold_calls: bool = False) -> AsyncIterator[str]:
    """Server-sent events of a streamed call; its jobs are cancelled if the client leaves.

    `chunk(index, text, tokens, finish_reason, answer)` makes one event (or several);
    `usage_chunk(answers)` the last one (or None). `hold_calls`: an answer that is becoming a
    tool call sends nothing until it ends (its arguments are whole only then).
    """
    streamer = _Streamer(total, stop)
    answers = [Answer() for _ in range(total)]
    pending: list[list[TokenOut]] = [[] for _ in range(total)]
    try:
        async for event in events(jobs, total):
            a = answers[event.index]
            a.take(event)
            if isinstance(event, Chunk):
                pending[event.index] += event.logprobs
                response = event.reply.response
                held = hold_calls and isinstance(response, dict)
                text = streamer.delta(event.index, "" if held else _text(response))
                if text or (pending[event.index] and not streamer.hold):
                    yield chunk(event.index, text, pending[event.index], None, a)
                    pending[event.index] = []
            else:
                text = "" if a.tool_call(hold_calls) else streamer.delta(event.index, a.text, final=True)
                yield chunk(event.index, text, pending[event.index], finish_reason(event.finish_reason), a)
                pending[event.index] = []
        if usage_chunk is not None:
            yield usage_chunk(answers)
    except ApiError as exc:
        yield sse_data(error_body(exc.message, exc.kind))
    finally:
        for job in jobs:  # a disconnect cancels this generator: stop the model and free the rows
            job.cancel()
    yield "data: [DONE]\n\n"


def chat_stream(job: Job, n: int, meta: dict[str, Any], stop: tuple[str, ...], include_usage: bool,
                logprobs: Callable | None, tools: bool = False) -> AsyncIterator[str]:
    """A streamed chat completion: a role chunk per answer, content deltas, a finish chunk each.

    With `tools` (given to the model), an answer that calls one streams no content: when it ends,
    one `tool_calls` delta with the call's id, type and name, one with its arguments (a JSON
    string), then the finish chunk with reason "tool_calls", as OpenAI's stream does. With
    `include_usage` (stream_options.include_usage), a last chunk without choices carries usage.
    """

    def event(choice: dict) -> str:
        return sse_data({**meta, "object": "chat.completion.chunk", "choices": [choice]})

    def chunk(index: int, text: str, tokens: list[TokenOut], reason: str | None, answer: Answer) -> str:
        call = answer.tool_call(tools) if reason is not None else None
        head = ""
        if call is not None:
            fn = call["function"]
            named = {"index": 0, "id": call["id"], "type": "function",
                     "function": {"name": fn["name"], "arguments": ""}}
            head = event({"index": index, "finish_reason": None, "delta": {"tool_calls": [named]}})
            head += event({"index": index, "finish_reason": None, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": fn["arguments"]}}]}})
            reason = "tool_calls"
        choice = {"index": index, "delta": {"content": text} if text else {}, "finish_reason": reason}
        if logprobs is not None:
            choice["logprobs"] = logprobs(tokens) if tokens else None
        return head + event(choice)

    def usage_chunk(answers):
        return sse_data({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage(answers)})

    async def stream():
        for i in range(n):
            yield sse_data({**meta, "object": "chat.completion.chunk",
                            "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
        async for item in _sse([job], n, stop, chunk, usage_chunk if include_usage else None, tools):
            yield item

    return stream()


def completion_stream(jobs: list[Job], total: int, meta: dict[str, Any], stop: tuple[str, ...],
                      include_usage: bool, logprobs: Callable | None) -> AsyncIterator[str]:
    """A streamed completion: text deltas per answer, then a finish chunk each."""
    offsets = [0] * total

    def chunk(index: int, text: str, tokens: list[TokenOut], reason: str | None, answer: Answer) -> str:
        choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
        if logprobs is not None and tokens:
            # offsets count the tokens' own texts, as the plain answer's do: a chunk's text can
            # lag its tokens (an unfinished character waits for its next bytes)
            choice["logprobs"] = logprobs(tokens, offsets[index])
            offsets[index] += sum(len(t) for t in choice["logprobs"]["tokens"])
        return sse_data({**meta, "object": "text_completion", "choices": [choice]})

    def usage_chunk(answers):
        prompt_tokens = sum(len(j.prompt) for j in jobs)
        return sse_data({**meta, "object": "text_completion", "choices": [],
                         "usage": usage(answers, prompt_tokens)})

    return _sse(jobs, total, stop, chunk, usage_chunk if include_usage else None)
