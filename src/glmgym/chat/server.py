"""`glmgym chat serve`: an OpenAI-compatible API, the reference's api.py endpoint and a web chat.

Routes (one FastAPI app, one model, one continuously batched `Engine` shared by all of them):

- `POST /`: the reference `api.py`: `{prompt, history, max_length?, top_p?, temperature?}` ->
  `{response, history, status, time}`. (`GET /` in a browser redirects to the web chat.)
- `GET /v1/models`, `POST /v1/chat/completions` (with `stream: true` as server-sent events ending
  with `data: [DONE]`): system messages are prepended to the first user message (ChatGLM-6B has no
  system role), user/assistant pairs become the history. Beyond the reference: `temperature`
  (0 = greedy), `top_p`, `max_tokens` (or `max_completion_tokens`), `stop` (a string or a list),
  `seed`, `n` (answers decoded as rows of one batch; seeds seed, seed + 1, ...), `logprobs` and
  `top_logprobs` (also when streaming) and `usage`; `user` is accepted and ignored;
  `trim_history: true` (glmgym's extension) drops the oldest turns instead of answering 400 when
  the prompt does not fit.
- `POST /v1/completions`: a raw prompt (a string or a list of them), no chat template and no
  post-processing, with `max_tokens` (default 16, as OpenAI's), `n`, `stop`, `seed`, `logprobs`
  (0..5 alternatives, the legacy shape) and streaming.
- `GET /health`: model name and queue length (503 while draining). `GET /metrics`: Prometheus
  metrics. `GET /openapi.json`: the schema.
- `/ui`: a Gradio chat (streaming, history, clear, sliders), through the same engine.

Log-probabilities are the model's own (log-softmax of its logits), before temperature, top-k/p
and penalties, as vLLM reports them by default.

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for bad requests
(invalid JSON and wrong types included), 401 without the API key when one is set, 429 with
Retry-After when the queue is full, 503 with Retry-After while the server drains on shutdown, 504
for a request that ran past `--request-timeout`.
"""


import asyncio
import json
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from glmgym.chat.batch import TokenOut
from glmgym.chat.config import GenerationConfig
from glmgym.chat.engine import Chunk, Done, Draining, Engine, Failed, Job, QueueFull, answer_configs
from glmgym.chat.session import ChatGLM, Reply
from glmgym.errors import GlmgymError, import_extra

__all__ = ["ServeConfig", "build_app", "serve", "to_chatglm"]

API_KEY_ENV = "GLMGYM_API_KEY"


@dataclass
class ServeConfig:
    """Options of `glmgym chat serve`."""

    model: str = "THUDM/chatglm-6b"
    """Checkpoint directory, hub id (local cache) or random:tiny (a tiny random model for demos)."""
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 keeps the server local, 0.0.0.0 exposes it."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = field(default=None, metadata={"metavar": "KEY"})
    """Require `Authorization: Bearer KEY` on the API routes and /metrics, and the key as the web
    chat's password (default: $GLMGYM_API_KEY; none when unset)."""
    max_queue: int = 32
    """Requests waiting or running at once; more get 429 at once."""
    max_batch: int = 8
    """Rows decoded together; waiting requests join the running batch between any two steps."""
    prefill_chunk: int = 512
    """Prompt tokens' worth of prefill per decoding step: a long prompt holds up the running rows
    for at most about this much work at a time."""
    request_timeout: float | None = field(default=None, metadata={"metavar": "SECONDS"})
    """End a request that runs longer than this (from its arrival) with a 504 error."""
    drain_seconds: float = 30.0
    """On SIGTERM or Ctrl-C: seconds to let running requests finish (new ones get 503) before
    the rest are cancelled and the server exits."""
    quantize: int | None = field(default=None, metadata={"choices": (4, 8)})
    """Quantize the block weights to INT4 or INT8 while loading."""
    dtype: str | None = field(default=None, metadata={"choices": ("float32", "bfloat16", "float16")})
    """Weights and compute dtype; default: bfloat16 where native, else float32 on CPU."""
    device: str | None = None
    """Torch device; default: cuda when available, else cpu."""
    threads: int | None = None
    """CPU threads for PyTorch; default: all physical cores."""
    ui: bool = True
    """Mount the Gradio web chat at /ui."""
    ptuning_checkpoint: str | None = field(default=None, metadata={"metavar": "DIR"})
    """A P-Tuning v2 checkpoint to serve with (its prefix is added to the model)."""
    lora: str | None = field(default=None, metadata={"metavar": "DIR"})
    """A PEFT LoRA adapter, merged into the float weights at load (before --quantize)."""


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}


_KINDS = {400: "invalid_request_error", 503: "service_unavailable", 504: "timeout_error"}


def _error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _failed(event: Failed) -> ApiError:
    return ApiError(event.status, event.message, _KINDS.get(event.status, "server_error"))


def _models():
    """Request/response models (pydantic is imported only when serving)."""
    import_extra("fastapi", "serve")
    from pydantic import BaseModel, ConfigDict, Field

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        stop: str | list[str] | None = Field(None, max_length=16)
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        n: int = Field(1, ge=1, le=64)
        stream: bool = False
        stream_options: StreamOptions | None = None
        user: str | None = None  # accepted and ignored

    class ChatCompletionRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=20)
        trim_history: bool = False

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

    return Message, ChatCompletionRequest, ApiRequest, CompletionRequest


def to_chatglm(messages) -> tuple[str, list[tuple[str, str]]]:
    """OpenAI messages -> (query, history). System text goes in front of the first user message.

    Raises:
        ApiError: empty messages, an assistant turn without a user turn before it, or no final
            user message.
    """
    system = "\n".join(m.content for m in messages if m.role == "system" and m.content.strip())
    history: list[tuple[str, str]] = []
    user: str | None = None
    for i, m in enumerate(messages):
        if m.role == "system":
            continue
        if not m.content.strip():
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


def _check_auth(api_key: str | None):
    from fastapi import Request

    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    return check


DISCONNECT_POLL_S = 0.5
"""How often a non-streamed request checks whether its client has left."""


@dataclass
class _Answer:
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


async def _events(jobs: list[Job], total: int) -> AsyncIterator[Chunk | Done]:
    """The events of a call's jobs (they share one queue) until all `total` answers are done.

    Raises:
        ApiError: a job failed.
    """
    done = 0
    events = jobs[0].events
    while done < total:
        event = await events.get()
        if isinstance(event, Failed):
            raise _failed(event)
        done += isinstance(event, Done)
        yield event


def build_app(bot: ChatGLM, max_queue: int = 32, api_key: str | None = None, ui: bool = True,
              max_batch: int = 8, prefill_chunk: int = 512, request_timeout: float | None = None):
    """The FastAPI app serving `bot` (see the module docstring); `app.state.engine` is its engine."""
    import_extra("fastapi", "serve")
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

    from glmgym.chat.server_metrics import PrometheusObserver

    _, ChatCompletionRequest, ApiRequest, CompletionRequest = _models()
    metrics = PrometheusObserver()
    engine = Engine(bot, max_queue, max_batch, prefill_chunk, request_timeout, metrics)
    metrics.bind(engine)
    tok = bot.tokenizer
    model_id = bot.name.rstrip("/").rsplit("/", 1)[-1] or "chatglm-6b"
    context = bot.model.config.max_sequence_length
    auth = [Depends(_check_auth(api_key))]
    app = FastAPI(title="glmgym ChatGLM-6B server", version="1",
                  description="OpenAI-compatible chat completions and completions, the api.py endpoint, "
                              "Prometheus metrics, a web chat.")
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(_error_body(exc.message, exc.kind, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        return JSONResponse(_error_body(message, "invalid_request_error", where or None), 400)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # never a bare traceback page
        return JSONResponse(_error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)

    def gen_options(temperature, top_p, max_tokens, seed, max_length=None) -> dict[str, Any]:
        gen: dict[str, Any] = {"max_length": max_length or context}
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

    def queued(start):
        """Run `start()` (which submits to the engine): 400 / 429 / 503 on failure."""
        try:
            return start()
        except GlmgymError as exc:
            raise ApiError(400, str(exc)) from None
        except QueueFull:
            metrics.refused("rejected")
            raise ApiError(429, f"the server is busy ({engine.max_queue} requests queued); retry later",
                           "rate_limit_error", headers={"Retry-After": "1"}) from None
        except Draining:
            metrics.refused("unavailable")
            raise ApiError(503, "the server is shutting down; retry on another one or later",
                           "service_unavailable", headers={"Retry-After": "5"}) from None

    async def gather(jobs: list[Job], total: int, request: Request) -> list[_Answer]:
        """Wait for every answer; a client that has gone (checked every `DISCONNECT_POLL_S`)
        cancels the jobs.

        One task reads the events to the end while this one watches the client: a timeout on the
        read itself would cancel the event generator and end it early (empty answers).
        """
        answers = [_Answer() for _ in range(total)]

        async def collect() -> None:
            async for event in _events(jobs, total):
                answers[event.index].take(event)

        reader = asyncio.ensure_future(collect())
        try:
            while not (await asyncio.wait({reader}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    raise ApiError(499, "client disconnected")
            reader.result()  # a failed job: its ApiError
            return answers
        finally:
            reader.cancel()
            for job in jobs:
                job.cancel()

    def token_entry(token: int, logprob: float) -> dict[str, Any]:
        text = tok.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def chat_logprobs(tokens: list[TokenOut]) -> dict[str, Any]:
        return {"content": [{**token_entry(t.token, t.logprob),
                             "top_logprobs": [token_entry(i, lp) for i, lp in t.top]} for t in tokens]}

    def legacy_logprobs(tokens: list[TokenOut], offset: int = 0) -> dict[str, Any]:
        texts = [tok.token_text(t.token) for t in tokens]
        offsets = [offset + sum(len(x) for x in texts[:i]) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{tok.token_text(i): lp for i, lp in t.top} for t in tokens],
                "text_offset": offsets}

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/" if ui else "/docs")

    @app.post("/", dependencies=auth, summary="The reference api.py endpoint")
    async def reference_api(req: ApiRequest, request: Request) -> dict[str, Any]:
        if not req.prompt.strip():
            raise ApiError(400, "prompt is empty", param="prompt")
        gen = gen_options(req.temperature, req.top_p, None, None, req.max_length)
        job = queued(lambda: engine.chat(req.prompt, [tuple(h) for h in req.history], gen))
        (answer,) = await gather([job], 1, request)
        reply = answer.reply
        response = reply.response if reply else ""
        history = [list(h) for h in (reply.history if reply else [*req.history, (req.prompt, "")])]
        return {"response": response, "history": history, "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "glmgym"}]}

    @app.get("/health")
    async def health():
        body = {"status": "draining" if engine.draining else "ok", "model": model_id,
                "queue": engine.pending, "max_queue": engine.max_queue, "served": engine.served}
        return JSONResponse(body, 503 if engine.draining else 200)

    @app.get("/metrics", dependencies=auth, include_in_schema=False)
    async def prometheus_metrics():
        page, content_type = metrics.exposition()
        return Response(page, media_type=content_type)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        query, history = to_chatglm(req.messages)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        gen = gen_options(req.temperature, req.top_p, req.max_completion_tokens or req.max_tokens, req.seed)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        job = queued(lambda: engine.chat(query, history, gen, n=req.n, stop=stop,
                                         trim_history=req.trim_history, logprobs=logprobs))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            events = _sse_chat(job, req.n, meta, stop, usage, chat_logprobs if req.logprobs else None)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        answers = await gather([job], req.n, request)
        choices = []
        for i, a in enumerate(answers):
            choice = {"index": i, "finish_reason": _reason(a.finish_reason),
                      "message": {"role": "assistant", "content": a.reply.response if a.reply else ""},
                      "logprobs": chat_logprobs(a.tokens) if req.logprobs else None}
            choices.append(choice)
        return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(answers)}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        gen = gen_options(req.temperature, req.top_p, req.max_tokens, req.seed)
        if len(prompts) * req.n > engine.max_queue * engine.max_batch:
            raise ApiError(400, f"{len(prompts)} prompts x n {req.n} is more than the server holds",
                           param="prompt")

        def start() -> list[Job]:
            cfg = bot.config(gen)
            events: asyncio.Queue = asyncio.Queue()
            jobs: list[Job] = []
            try:
                for p, text in enumerate(prompts):
                    ids = tok.encode(text)
                    if len(ids) + 1 > min(cfg.max_length, context):
                        raise GlmgymError(f"prompt {p} has {len(ids)} tokens; the context is {context}")
                    jobs.append(engine.submit(ids, answer_configs(cfg, req.n), stop=stop, raw=True,
                                              first_index=p * req.n, events=events, logprobs=req.logprobs))
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise
            return jobs

        jobs = queued(start)
        total = len(prompts) * req.n
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_sse_completion(jobs, total, meta, stop, usage,
                                                     legacy_logprobs if req.logprobs is not None else None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        answers = await gather(jobs, total, request)
        choices = [{"index": i, "text": a.reply.response if a.reply else "",
                    "finish_reason": _reason(a.finish_reason),
                    "logprobs": legacy_logprobs(a.tokens) if req.logprobs is not None else None}
                   for i, a in enumerate(answers)]
        usage = _usage(answers, prompt_tokens=sum(len(j.prompt) for j in jobs))
        return {**meta, "object": "text_completion", "choices": choices, "usage": usage}

    if ui:
        app = _mount_ui(app, engine, api_key)
    return app


def _reason(finish_reason: str | None) -> str:
    """OpenAI's finish reasons: "stop" or "length" (a cancelled answer is cut short: "length")."""
    return "stop" if finish_reason == "stop" else "length"


def _usage(answers: list[_Answer], prompt_tokens: int | None = None) -> dict[str, int]:
    """OpenAI's usage block over every answer; <eop> is not counted as a completion token."""
    replies = [a.reply for a in answers if a.reply is not None]
    if prompt_tokens is None:  # n answers of one prompt: the prompt once
        prompt_tokens = replies[0].prompt_tokens if replies else 0
    completion = sum(r.completion_tokens - int(r.ended) for r in replies)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


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


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(jobs: list[Job], total: int, stop: tuple[str, ...], chunk, usage_chunk) -> AsyncIterator[str]:
    """Server-sent events of a streamed call; its jobs are cancelled if the client leaves.

    `chunk(index, text, tokens, finish_reason)` makes one event; `usage_chunk(answers)` the last
    one (or None).
    """
    streamer = _Streamer(total, stop)
    answers = [_Answer() for _ in range(total)]
    pending: list[list[TokenOut]] = [[] for _ in range(total)]
    try:
        async for event in _events(jobs, total):
            a = answers[event.index]
            a.take(event)
            if isinstance(event, Chunk):
                pending[event.index] += event.logprobs
                text = streamer.delta(event.index, event.reply.response)
                if text or (pending[event.index] and not streamer.hold):
                    yield chunk(event.index, text, pending[event.index], None)
                    pending[event.index] = []
            else:
                text = streamer.delta(event.index, a.reply.response if a.reply else "", final=True)
                yield chunk(event.index, text, pending[event.index], _reason(event.finish_reason))
                pending[event.index] = []
        if usage_chunk is not None:
            yield usage_chunk(answers)
    except ApiError as exc:
        yield _data(_error_body(exc.message, exc.kind))
    finally:
        for job in jobs:  # a disconnect cancels this generator: stop the model and free the rows
            job.cancel()
    yield "data: [DONE]\n\n"


def _sse_chat(job: Job, n: int, meta: dict[str, Any], stop: tuple[str, ...], usage: bool,
              logprobs) -> AsyncIterator[str]:
    """A streamed chat completion: a role chunk per answer, content deltas, a finish chunk each.

    With `usage` (stream_options.include_usage), a last chunk without choices carries usage.
    """

    def chunk(index: int, text: str, tokens: list[TokenOut], reason: str | None) -> str:
        choice = {"index": index, "delta": {"content": text} if text else {}, "finish_reason": reason}
        if logprobs is not None:
            choice["logprobs"] = logprobs(tokens) if tokens else None
        return _data({**meta, "object": "chat.completion.chunk", "choices": [choice]})

    def usage_chunk(answers):
        return _data({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(answers)})

    async def stream():
        for i in range(n):
            yield _data({**meta, "object": "chat.completion.chunk",
                         "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}]})
        async for item in _sse([job], n, stop, chunk, usage_chunk if usage else None):
            yield item

    return stream()


def _sse_completion(jobs: list[Job], total: int, meta: dict[str, Any], stop: tuple[str, ...], usage: bool,
                    logprobs) -> AsyncIterator[str]:
    """A streamed completion: text deltas per answer, then a finish chunk each."""
    offsets = [0] * total

    def chunk(index: int, text: str, tokens: list[TokenOut], reason: str | None) -> str:
        choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
        if logprobs is not None and tokens:
            choice["logprobs"] = logprobs(tokens, offsets[index])
        offsets[index] += len(text)
        return _data({**meta, "object": "text_completion", "choices": [choice]})

    def usage_chunk(answers):
        prompt_tokens = sum(len(j.prompt) for j in jobs)
        return _data({**meta, "object": "text_completion", "choices": [],
                      "usage": _usage(answers, prompt_tokens)})

    return _sse(jobs, total, stop, chunk, usage_chunk if usage else None)


def _history_pairs(history) -> list[tuple[str, str]]:
    """Gradio's message list -> (user, assistant) pairs."""

    def text(content) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        return str(content or "")

    pairs, user = [], None
    for m in history or []:
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (m.role, m.content)
        if role == "user":
            user = text(content)
        elif role == "assistant" and user is not None:
            pairs.append((user, text(content)))
            user = None
    return pairs


def _mount_ui(app, engine: Engine, api_key: str | None):
    import gradio as gr

    async def respond(message, history, max_length, top_p, temperature):
        query = message if isinstance(message, str) else str(message.get("text", ""))
        if not query.strip():
            return
        gen = {"max_length": int(max_length), "top_p": float(top_p), "temperature": float(temperature)}
        try:
            job = engine.chat(query, _history_pairs(history), gen, trim_history=True)
        except QueueFull:
            raise gr.Error("The server is busy; try again in a moment.") from None
        except Draining:
            raise gr.Error("The server is shutting down.") from None
        except GlmgymError as exc:
            raise gr.Error(str(exc)) from None
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, Chunk):
                    yield event.reply.response
                elif isinstance(event, Done):
                    return
                else:
                    raise gr.Error(event.message)
        finally:
            job.cancel()

    context, defaults = engine.bot.model.config.max_sequence_length, GenerationConfig()
    with gr.Blocks(title="ChatGLM-6B (glmgym)") as demo:
        gr.ChatInterface(
            respond,
            title="ChatGLM-6B",
            description=f"glmgym serving {engine.bot.name}. Replies stream as they are generated.",
            additional_inputs=[
                gr.Slider(16, context, value=min(defaults.max_length, context), step=1,
                          label="Maximum length", render=False),
                gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, label="Top P", render=False),
                gr.Slider(0.01, 1.5, value=defaults.temperature, step=0.01, label="Temperature",
                          render=False),
            ],
            additional_inputs_accordion=gr.Accordion("Generation", open=True, render=False),
            concurrency_limit=engine.max_queue,
        )
    auth = None if api_key is None else (lambda user, password: secrets.compare_digest(password, api_key))
    return gr.mount_gradio_app(app, demo, path="/ui", auth=auth, footer_links=[])


def serve(cfg: ServeConfig) -> int:
    """Load the model and run the server until interrupted."""
    import importlib.util

    needed = ["fastapi", "uvicorn", *(["gradio"] if cfg.ui else [])]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise GlmgymError(f"glmgym chat serve needs {', '.join(missing)}: pip install 'glmgym[serve]'")
    import uvicorn

    from glmgym.chat.session import load
    from glmgym.chat.terminal import set_threads

    if not 0 < cfg.port < 65536:
        raise GlmgymError(f"--port must be in 1..65535, not {cfg.port}")
    if cfg.max_queue < 1 or cfg.max_batch < 1 or cfg.prefill_chunk < 1:
        raise GlmgymError(f"--max-queue, --max-batch and --prefill-chunk must be at least 1, not "
                          f"{cfg.max_queue}, {cfg.max_batch}, {cfg.prefill_chunk}")
    if (cfg.request_timeout is not None and cfg.request_timeout <= 0) or cfg.drain_seconds < 0:
        raise GlmgymError("--request-timeout must be positive and --drain-seconds at least 0")
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    set_threads(cfg.threads)
    bot = load(cfg.model, dtype=cfg.dtype, device=cfg.device, quantize=cfg.quantize,
               ptuning_checkpoint=cfg.ptuning_checkpoint, lora=cfg.lora)
    app = build_app(bot, cfg.max_queue, api_key, cfg.ui, cfg.max_batch, cfg.prefill_chunk,
                    cfg.request_timeout)
    where = f"http://{cfg.host}:{cfg.port}"
    print(f"serving {bot.name} on {where} (API: {where}/v1, web chat: {where}/ui"
          f"{', API key required' if api_key else ''})", flush=True)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                            timeout_graceful_shutdown=5)
    _draining_server(uvicorn.Server, app.state.engine, cfg.drain_seconds)(config).run()
    print("server stopped", flush=True)
    return 0


def _draining_server(base, engine: Engine, drain_seconds: float):
    """A uvicorn server class that drains `engine` on SIGTERM / Ctrl-C before it stops.

    The first signal stops admissions (503 with Retry-After, /health answers 503 too) and lets the
    running requests finish for up to `drain_seconds`; the rest then end with a 503 error and the
    server exits 0. A second Ctrl-C stops at once. (uvicorn would stop listening at once and re-raise
    the signal after its shutdown, which exits non-zero.)
    """

    class DrainingServer(base):
        draining = False

        def handle_exit(self, sig: int, frame) -> None:
            if self.draining:  # a second signal: stop now
                self.force_exit = self.force_exit or sig == signal.SIGINT
                self.should_exit = True
                return
            self.draining = True
            print(f"draining: finishing {engine.pending} request(s) for up to {drain_seconds:g} s",
                  flush=True)
            threading.Thread(target=self._drain, name="glmgym-drain", daemon=True).start()

        def _drain(self) -> None:
            engine.drain()
            deadline = time.monotonic() + drain_seconds
            while engine.pending and time.monotonic() < deadline:
                time.sleep(0.05)
            if engine.pending:
                engine.shutdown()
                while engine.pending and time.monotonic() < deadline + 5:
                    time.sleep(0.05)
            engine.close()
            self.should_exit = True

    return DrainingServer
