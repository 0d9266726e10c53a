"""`glmgym chat serve`: an OpenAI-compatible API, the reference's api.py endpoint and a web chat.

Routes (one FastAPI app, one model, one `Engine` queue shared by all of them):

- `POST /`: the reference `api.py`: `{prompt, history, max_length?, top_p?, temperature?}` ->
  `{response, history, status, time}`. (`GET /` in a browser redirects to the web chat.)
- `GET /v1/models`, `POST /v1/chat/completions` (with `stream: true` as server-sent events ending
  with `data: [DONE]`): system messages are prepended to the first user message (ChatGLM-6B has no
  system role), user/assistant pairs become the history. Beyond the reference: `temperature`
  (0 = greedy), `top_p`, `max_tokens`, `stop`, `seed` and `usage`; `trim_history: true` (glmgym's
  extension) drops the oldest turns instead of answering 400 when the prompt does not fit.
- `GET /health`: model name and queue length. `GET /openapi.json`: the schema.
- `/ui`: a Gradio chat (streaming, history, clear, sliders), through the same queue.

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for bad requests
(invalid JSON and wrong types included), 401 without the API key when one is set, 429 with
Retry-After when the queue is full.
"""


import asyncio
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from glmgym.chat.config import GenerationConfig
from glmgym.chat.engine import Done, Engine, Job, QueueFull
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
    """Require `Authorization: Bearer KEY` on the API routes and the key as the web chat's
    password (default: $GLMGYM_API_KEY; none when unset)."""
    max_queue: int = 8
    """Requests waiting or running at once; more get 429 at once."""
    max_batch: int = 4
    """Unseeded requests with the same options that are decoded together in one batch."""
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


def _error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _models():
    """Request/response models (pydantic is imported only when serving)."""
    import_extra("fastapi", "serve")
    from pydantic import BaseModel, ConfigDict, Field

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class ChatCompletionRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        messages: list[Message] = Field(min_length=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        max_tokens: int | None = Field(None, ge=1)
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        n: int = Field(1, ge=1, le=1)
        trim_history: bool = False

    class ApiRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        prompt: str
        history: list[tuple[str, str]] = []
        max_length: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0, le=1)
        temperature: float | None = Field(None, gt=0, le=2)

    return Message, ChatCompletionRequest, ApiRequest


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


def build_app(bot: ChatGLM, max_queue: int = 8, api_key: str | None = None, ui: bool = True,
              max_batch: int = 4):
    """The FastAPI app serving `bot` (see the module docstring); `app.state.engine` is its queue."""
    import_extra("fastapi", "serve")
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

    _, ChatCompletionRequest, ApiRequest = _models()
    engine = Engine(bot, max_queue, max_batch)
    model_id = bot.name.rstrip("/").rsplit("/", 1)[-1] or "chatglm-6b"
    context = bot.model.config.max_sequence_length
    auth = [Depends(_check_auth(api_key))]
    app = FastAPI(title="glmgym ChatGLM-6B server", version="1",
                  description="OpenAI-compatible chat completions, the api.py endpoint, a web chat.")
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

    def submit(query: str, history, gen: dict[str, Any], stop=(), trim: bool = True) -> Job:
        """Validate the options and the prompt length, then queue (400 / 429 on failure)."""
        try:
            bot.fit_prompt(query, history, bot.config(gen), trim)  # before a stream's 200 is sent
        except GlmgymError as exc:
            raise ApiError(400, str(exc)) from None
        try:
            return engine.submit(query, history, gen, stop, trim)
        except QueueFull:
            raise ApiError(429, f"the server is busy ({engine.max_queue} requests queued); retry later",
                           "rate_limit_error", headers={"Retry-After": "1"}) from None

    async def finish(job: Job, request: Request) -> tuple[Reply | None, str]:
        """Wait for the job's end; a client that has gone (checked twice a second) cancels it."""
        last = None
        checked = time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    event = None
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise ApiError(499, "client disconnected")
                if event is None:
                    continue
                if isinstance(event, Reply):
                    last = event
                elif isinstance(event, Done):
                    return last, event.finish_reason
                else:
                    raise ApiError(400 if event.user_error else 500, event.message,
                                   "invalid_request_error" if event.user_error else "server_error")
        finally:
            job.cancel()

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

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/" if ui else "/docs")

    @app.post("/", dependencies=auth, summary="The reference api.py endpoint")
    async def reference_api(req: ApiRequest, request: Request) -> dict[str, Any]:
        if not req.prompt.strip():
            raise ApiError(400, "prompt is empty", param="prompt")
        gen = gen_options(req.temperature, req.top_p, None, None, req.max_length)
        job = submit(req.prompt, [tuple(h) for h in req.history], gen)
        reply, _ = await finish(job, request)
        response = reply.response if reply else ""
        history = [list(h) for h in (reply.history if reply else [*req.history, (req.prompt, "")])]
        return {"response": response, "history": history, "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "glmgym"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "queue": engine.pending, "max_queue": engine.max_queue,
                "served": engine.served}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        query, history = to_chatglm(req.messages)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        gen = gen_options(req.temperature, req.top_p, req.max_tokens, req.seed)
        job = submit(query, history, gen, stop, req.trim_history)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_sse(job, meta, stop, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        reply, reason = await finish(job, request)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": reason,
                             "message": {"role": "assistant", "content": reply.response if reply else ""}}],
                "usage": _usage(reply)}

    if ui:
        app = _mount_ui(app, engine, api_key)
    return app


def _usage(reply: Reply | None) -> dict[str, int]:
    """OpenAI's usage block; <eop> is not counted as a completion token."""
    prompt_tokens = 0 if reply is None else reply.prompt_tokens
    completion = 0 if reply is None else reply.completion_tokens - int(reply.ended)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


async def _sse(job: Job, meta: dict[str, Any], stop: tuple[str, ...],
               usage: bool = False) -> AsyncIterator[str]:
    """Server-sent events of one streamed completion; the job is cancelled if the client leaves.

    With `usage` (stream_options.include_usage), a last chunk without choices carries usage.
    """

    def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    hold = max((len(s) for s in stop), default=1) - 1  # text that may still become a stop string
    sent = ""
    last = ""
    reply = None
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if isinstance(event, Reply):
                reply, last = event, event.response
                safe = last[: len(last) - hold] if hold else last
                # post-processing may rewrite earlier characters: send only what extends the text
                if len(safe) > len(sent) and safe.startswith(sent):
                    yield chunk({"content": safe[len(sent):]})
                    sent = safe
            elif isinstance(event, Done):
                if len(last) > len(sent) and last.startswith(sent):
                    yield chunk({"content": last[len(sent):]})
                yield chunk({}, "stop" if event.finish_reason == "stop" else "length")
                if usage:
                    body = {**meta, "object": "chat.completion.chunk", "choices": [],
                            "usage": _usage(reply)}
                    yield f"data: {json.dumps(body)}\n\n"
                break
            else:
                kind = "invalid_request_error" if event.user_error else "server_error"
                yield f"data: {json.dumps(_error_body(event.message, kind))}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a disconnect cancels this generator: stop the model and free the slot


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
            job = engine.submit(query, _history_pairs(history), gen, trim_history=True)
        except QueueFull:
            raise gr.Error("The server is busy; try again in a moment.") from None
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, Reply):
                    yield event.response
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
    if cfg.max_queue < 1 or cfg.max_batch < 1:
        raise GlmgymError(f"--max-queue and --max-batch must be at least 1, not {cfg.max_queue}, "
                          f"{cfg.max_batch}")
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    set_threads(cfg.threads)
    bot = load(cfg.model, dtype=cfg.dtype, device=cfg.device, quantize=cfg.quantize,
               ptuning_checkpoint=cfg.ptuning_checkpoint, lora=cfg.lora)
    app = build_app(bot, cfg.max_queue, api_key, cfg.ui, cfg.max_batch)
    where = f"http://{cfg.host}:{cfg.port}"
    print(f"serving {bot.name} on {where} (API: {where}/v1, web chat: {where}/ui"
          f"{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0
