"""`glmgym chat serve`: an OpenAI-compatible API, the reference's api.py endpoint and a web chat.

Routes (one FastAPI app, one model, one continuously batched `Engine` shared by all of them):

- `POST /`: the reference `api.py`: `{prompt, history, max_length?, top_p?, temperature?}` ->
  `{response, history, status, time}`. (`GET /` in a browser redirects to the web chat.)
- `GET /v1/models`, `POST /v1/chat/completions` (with `stream: true` as server-sent events ending
  with `data: [DONE]`): for ChatGLM-6B and ChatGLM2-6B, which have no roles, system messages are
  prepended to the first user message and user/assistant pairs become the history; ChatGLM3-6B
  and GLM-4 take the messages as they are, with `tools` and `tool_choice` (auto, none, required
  or a named function), assistant `tool_calls` and `tool` messages (observations); an answer
  that calls a tool comes back as `tool_calls` (finish reason "tool_calls"; when streamed, as
  one delta with the call's id and name and one with its arguments). `tools` sent to a model
  without tool calls is a 400. Beyond the reference: `temperature`
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
import os
import secrets
import signal
import threading
import time
import uuid

from glmgym.chat.config import MAX_DRAFT_TOKENS, ServeConfig
from glmgym.chat.serving import openai_api as wire
from glmgym.chat.serving.engine import Draining, Engine, Job, QueueFull, answer_configs
from glmgym.chat.serving.openai_api import Answer, ApiError, error_body, request_models, to_chatglm
from glmgym.chat.serving.prometheus import PrometheusObserver
from glmgym.chat.serving.webui import mount_ui
from glmgym.chat.session import ChatGLM, load_with
from glmgym.errors import GlmgymError, import_extra

__all__ = ["ServeConfig", "build_app", "serve", "to_chatglm"]

API_KEY_ENV = "GLMGYM_API_KEY"
DISCONNECT_POLL_S = 0.5
"""How often a non-streamed request checks whether its client has left."""


def build_app(bot: ChatGLM, max_queue: int = 32, api_key: str | None = None, ui: bool = True,
              max_batch: int = 8, prefill_chunk: int = 512, request_timeout: float | None = None,
              prompt_lookup: int = 0):
    """The FastAPI app serving `bot` (see the module docstring); `app.state.engine` is its engine.
    `prompt_lookup`: draft tokens per step for requests that do not set `prompt_lookup_num_tokens`."""
    import_extra("fastapi", "serve")
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import StreamingResponse


    models = request_models()
    ApiRequest, ChatCompletionRequest = models["ApiRequest"], models["ChatCompletionRequest"]
    CompletionRequest = models["CompletionRequest"]
    metrics = PrometheusObserver()
    engine = Engine(bot, max_queue, max_batch, prefill_chunk, request_timeout, metrics)
    metrics.bind(engine)
    calls = _Calls(engine, metrics)
    shape = wire.LogprobShaper(bot.tokenizer)
    model_id = bot.name.rstrip("/").rsplit("/", 1)[-1] or "chatglm-6b"
    context = bot.model.config.max_sequence_length
    auth = [Depends(_check_auth(api_key))]

    def _lookup(req) -> int:
        return prompt_lookup if req.prompt_lookup_num_tokens is None else req.prompt_lookup_num_tokens

    app = FastAPI(title="glmgym ChatGLM-6B server", version="1",
                  description="OpenAI-compatible chat completions and completions, the api.py endpoint, "
                              "Prometheus metrics, a web chat.")
    app.state.engine = engine
    _answer_errors(app)
    _service_routes(app, engine, metrics, model_id, auth)
    sse = {"media_type": "text/event-stream", "headers": {"Cache-Control": "no-cache"}}

    def meta(prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}

    @app.post("/", dependencies=auth, summary="The reference api.py endpoint")
    async def reference_api(req: ApiRequest, request: Request) -> dict:
        if not req.prompt.strip():
            raise ApiError(400, "prompt is empty", param="prompt")
        gen = wire.gen_options(context, req.temperature, req.top_p, None, None, req.max_length, prompt_lookup)
        job = calls.start(lambda: engine.chat(req.prompt, [tuple(h) for h in req.history], gen))
        (answer,) = await calls.gather([job], 1, request)
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        return wire.reference_api_response(answer, req.prompt, req.history, now)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if bot.format.tools:
            turn = wire.to_chat(req.messages, bot.format.family, req.tools, req.tool_choice)
        elif req.tools:
            raise ApiError(400, f"{model_id} is a {bot.format.family} model, which cannot call tools "
                                "(ChatGLM3-6B and GLM-4 can)", param="tools")
        else:
            turn = wire.ChatTurn(*to_chatglm(req.messages))
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        stop, logprobs = wire.stop_strings(req.stop), shape.chat if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        gen = wire.gen_options(context, req.temperature, req.top_p, max_tokens, req.seed,
                               prompt_lookup=_lookup(req))
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = calls.start(lambda: engine.chat(turn.query, turn.history, gen, n=req.n, stop=stop,
                                              trim_history=req.trim_history, logprobs=top, role=turn.role,
                                              answer_prefix=turn.answer_prefix))
        if req.stream:
            stream = wire.chat_stream(job, req.n, meta("chatcmpl"), stop, req.include_usage, logprobs,
                                      turn.tools)
            return StreamingResponse(stream, **sse)
        answers = await calls.gather([job], req.n, request)
        return wire.chat_completion(meta("chatcmpl"), answers, logprobs, turn.tools)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        stop, logprobs = wire.stop_strings(req.stop), shape.legacy if req.logprobs is not None else None
        gen = wire.gen_options(context, req.temperature, req.top_p, req.max_tokens, req.seed,
                               prompt_lookup=_lookup(req))
        jobs = calls.start(lambda: _submit_prompts(engine, bot, prompts, gen, req.n, stop, req.logprobs))
        total = len(prompts) * req.n
        if req.stream:
            stream = wire.completion_stream(jobs, total, meta("cmpl"), stop, req.include_usage, logprobs)
            return StreamingResponse(stream, **sse)
        answers = await calls.gather(jobs, total, request)
        return wire.text_completion(meta("cmpl"), answers, logprobs, sum(len(j.prompt) for j in jobs))

    return _web_chat(app, engine, api_key, ui)


def _web_chat(app, engine: Engine, api_key: str | None, ui: bool):
    """`GET /` leads to the web chat (mounted at /ui when `ui`), else to the API docs."""
    from fastapi.responses import RedirectResponse

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/" if ui else "/docs")

    if not ui:
        return app

    return mount_ui(app, engine, api_key)


def _service_routes(app, engine: Engine, metrics, model_id: str, auth: list) -> None:
    """/v1/models, /health and /metrics."""
    from fastapi.responses import JSONResponse, Response

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict:
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "glmgym"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        body = {"status": "draining" if engine.draining else "ok", "model": model_id,
                "queue": engine.pending, "max_queue": engine.max_queue, "served": engine.served}
        return JSONResponse(body, 503 if engine.draining else 200)

    @app.get("/metrics", dependencies=auth, include_in_schema=False)
    async def prometheus_metrics():
        page, content_type = metrics.exposition()
        return Response(page, media_type=content_type)


def _answer_errors(app) -> None:
    """Every error in OpenAI's shape, never a bare traceback page."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        return JSONResponse(error_body(message, "invalid_request_error", where or None), 400)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)


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


class _Calls:
    """A route's way into the engine: admission errors as API errors, and waiting for answers."""

    def __init__(self, engine: Engine, metrics) -> None:
        self.engine, self.metrics = engine, metrics

    def start(self, submit):
        """Run `submit()` (which submits to the engine): 400 / 429 / 503 on failure."""
        try:
            return submit()
        except GlmgymError as exc:
            raise ApiError(400, str(exc)) from None
        except QueueFull:
            self.metrics.refused("rejected")
            raise ApiError(429, f"the server is busy ({self.engine.max_queue} requests queued); "
                           "retry later", "rate_limit_error", headers={"Retry-After": "1"}) from None
        except Draining:
            self.metrics.refused("unavailable")
            raise ApiError(503, "the server is shutting down; retry on another one or later",
                           "service_unavailable", headers={"Retry-After": "5"}) from None

    async def gather(self, jobs: list[Job], total: int, request) -> list[Answer]:
        """Wait for every answer; a client that has gone (checked every `DISCONNECT_POLL_S`)
        cancels the jobs.

        One task reads the events to the end while this one watches the client: a timeout on the
        read itself would cancel the event generator and end it early (empty answers).
        """
        answers = [Answer() for _ in range(total)]

        async def collect() -> None:
            async for event in wire.events(jobs, total):
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


def _submit_prompts(engine: Engine, bot: ChatGLM, prompts: list[str], gen: dict, n: int,
                    stop: tuple[str, ...], logprobs: int | None) -> list[Job]:
    """Raw prompts (no chat template) as jobs sharing one event queue; all or none are submitted.

    Raises:
        GlmgymError: more answers than the server holds, or a prompt longer than the context.
    """
    context = bot.model.config.max_sequence_length
    if len(prompts) * n > engine.max_queue * engine.max_batch:
        raise GlmgymError(f"{len(prompts)} prompts x n {n} is more than the server holds")
    cfg = bot.config(gen)
    events: asyncio.Queue = asyncio.Queue()
    jobs: list[Job] = []
    try:
        for p, text in enumerate(prompts):
            ids = bot.tokenizer.encode(text)
            if len(ids) + 1 > min(cfg.max_length, context):
                raise GlmgymError(f"prompt {p} has {len(ids)} tokens; the context is {context}")
            jobs.append(engine.submit(ids, answer_configs(cfg, n), stop=stop, raw=True, first_index=p * n,
                                      events=events, logprobs=logprobs))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    return jobs


def serve(cfg: ServeConfig) -> int:
    """Load the model and run the server until interrupted."""
    import importlib.util

    needed = ["fastapi", "uvicorn", *(["gradio"] if cfg.ui else [])]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise GlmgymError(f"glmgym chat serve needs {', '.join(missing)}: pip install 'glmgym[serve]'")
    import uvicorn


    if not 0 < cfg.port < 65536:
        raise GlmgymError(f"--port must be in 1..65535, not {cfg.port}")
    if cfg.max_queue < 1 or cfg.max_batch < 1 or cfg.prefill_chunk < 1:
        raise GlmgymError(f"--max-queue, --max-batch and --prefill-chunk must be at least 1, not "
                          f"{cfg.max_queue}, {cfg.max_batch}, {cfg.prefill_chunk}")
    if (cfg.request_timeout is not None and cfg.request_timeout <= 0) or cfg.drain_seconds < 0:
        raise GlmgymError("--request-timeout must be positive and --drain-seconds at least 0")
    if not 0 <= cfg.prompt_lookup <= MAX_DRAFT_TOKENS:
        raise GlmgymError(f"--prompt-lookup must be in 0..{MAX_DRAFT_TOKENS}, not {cfg.prompt_lookup}")
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    bot = load_with(cfg)
    app = build_app(bot, cfg.max_queue, api_key, cfg.ui, cfg.max_batch, cfg.prefill_chunk,
                    cfg.request_timeout, cfg.prompt_lookup)
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
