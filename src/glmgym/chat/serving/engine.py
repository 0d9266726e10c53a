"""The serving engine: a bounded queue in front of a continuously batched model.

One worker thread owns the model. On every tick it

1. ends requests whose client left (`Job.cancel`) or that ran past `request_timeout`;
2. admits waiting requests in arrival order while the running batch has free rows (a request
   with `n` answers takes `n` rows; the head of the queue is never overtaken, so no request
   starves);
3. runs one step of the `RunningBatch`: one decoding step for every running row, whatever each
   row's options, and a few layers of the prompts' prefill (shortest remaining first, see
   `PrefillScheduler`); the step's prefill stops at the next layer when a request arrives that
   could join, so that it joins on the next tick instead of waiting for a long prefill to end;
4. turns each row's new token into text (the reference's post-processing, stop strings, token
   limits) and sends it to the request's event queue; finished rows leave the batch at once.

Requests beyond `max_queue` waiting or running are refused at once (`QueueFull`), and after
`drain()` new ones are refused with `Draining`: a server answers 429 or 503 instead of piling up
work. `tick()` is public so that tests can drive the scheduling step by step without a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glmgym.chat.config import GenerationConfig
from glmgym.chat.serving.batch import RunningBatch, TokenOut
from glmgym.chat.session import ChatGLM
from glmgym.chat.template import IncrementalDecoder, Reply
from glmgym.errors import GlmgymError

__all__ = ["Chunk", "Done", "Draining", "Engine", "EngineObserver", "Failed", "Job", "QueueFull",
           "answer_configs", "cut_at_stop"]


class QueueFull(Exception):
    """Every slot of the queue is taken."""


class Draining(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Chunk:
    """One new token of one answer."""

    index: int
    """Which of the request's `n` answers."""
    reply: Reply
    """The answer so far (post-processed and cut at a stop string)."""
    logprobs: tuple[TokenOut, ...] = ()
    """The new token with its log-probabilities, when the request asked for them."""


@dataclass(frozen=True)
class Done:
    """The end of one answer."""

    finish_reason: str
    """"stop" (the model ended its answer or a stop string was hit), "length" (out of tokens) or
    "cancelled" (the client left)."""
    index: int = 0
    """Which of the request's `n` answers."""


@dataclass(frozen=True)
class Failed:
    """The end of a whole request that failed."""

    message: str
    """What went wrong, for the client."""
    status: int
    """The HTTP status that fits: 400 (the request was at fault), 500 (the server was), 503 (the
    server shut down), 504 (the request ran past the time limit)."""


class EngineObserver:
    """Hooks for metrics; every method is called on the worker thread and does nothing here."""

    def prompt(self, tokens: int) -> None:
        """A request was admitted with a prompt of `tokens` tokens."""

    def first_token(self, seconds: float) -> None:
        """An answer's first token came `seconds` after its request was submitted."""

    def next_token(self, seconds: float) -> None:
        """An answer's next token came `seconds` after its previous one."""

    def finished(self, status: str) -> None:
        """A request ended: "ok", "cancelled", "timeout", "error" or "shutdown"."""


@dataclass
class _Answer:
    decoder: IncrementalDecoder
    """The answer's tokens (a stop token excluded) and their text."""
    generated: int = 0
    """Tokens generated (a stop token included)."""
    row: int | None = None
    last_at: float = 0.0
    done: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.decoder.tokens


@dataclass
class Job:
    """One request; its events arrive on `events` (an asyncio queue of the submitting loop).

    Events: `Chunk`s, then a `Done` for each of the `n` answers, or a single `Failed`.
    """

    prompt: list[int]
    gens: list[GenerationConfig]
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    query: str = ""
    history: list = field(default_factory=list)
    role: str = "user"
    answer_prefix: str = ""
    """Text the prompt already holds of the answer (a forced tool call's name line)."""
    raw: bool = False
    logprobs: int | None = None
    first_index: int = 0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    answers: list[_Answer] = field(default_factory=list)

    def emit(self, item: Chunk | Done | Failed, outbox: dict | None = None) -> None:
        """Send `item` to the client; with `outbox` ({loop: [(queue, item)]}), later, in one call
        per event loop (`_flush`): a woken event loop takes CPU from the model's threads, so it is
        woken once per step, not once per row."""
        if outbox is None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        else:
            outbox.setdefault(self.loop, []).append((self.events, item))

    def cancel(self) -> None:
        """Stop generating for this request at the next step (the client left)."""
        self.cancelled.set()


def answer_configs(cfg: GenerationConfig, n: int) -> list[GenerationConfig]:
    """The configs of `n` answers to one prompt: seeds seed, seed + 1, ... when `cfg` has one."""
    if cfg.seed is None:
        return [cfg] * n
    return [dataclasses.replace(cfg, seed=cfg.seed + i) for i in range(n)]


def _put_all(items: list[tuple[asyncio.Queue, Chunk | Done | Failed]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class Engine:
    """A continuously batched model behind a bounded FIFO queue (see the module docstring).

    Args:
        bot: the model and tokenizer.
        max_queue: requests waiting or running at once; more are refused with `QueueFull`.
        max_batch: rows decoded together (a request with `n` answers takes `n`).
        prefill_chunk: prompt tokens' worth of prefill per step (see `RunningBatch`).
        request_timeout: seconds a request may take from submission to its last token (None: no
            limit).
        observer: metrics hooks.
        backend: makes the running batch from (bot, max_batch, prefill_chunk); tests pass a fake.
        start: run the worker thread (False: call `tick()` yourself).
    """

    def __init__(self, bot: ChatGLM, max_queue: int = 16, max_batch: int = 8, prefill_chunk: int = 512,
                 request_timeout: float | None = None, observer: EngineObserver | None = None,
                 backend: Callable[..., Any] | None = None, start: bool = True) -> None:
        if max_queue < 1 or max_batch < 1 or prefill_chunk < 1:
            raise GlmgymError("max_queue, max_batch and prefill_chunk must be at least 1, not "
                              f"{max_queue}, {max_batch}, {prefill_chunk}")
        if request_timeout is not None and request_timeout <= 0:
            raise GlmgymError(f"request_timeout must be positive, not {request_timeout}")
        self.bot, self.tokenizer = bot, bot.tokenizer
        self._stops = frozenset(bot.format.stop_ids)
        self.context = bot.model.config.max_sequence_length
        self.max_queue, self.max_batch = max_queue, max_batch
        self.request_timeout = request_timeout
        self.observer = observer or EngineObserver()
        self._make_backend = backend or (lambda b, rows, chunk: RunningBatch(
            b.model, rows, eos_id=b.format.stop_ids, vocab_limit=b.tokenizer.vocab_size,
            prefill_chunk=chunk))
        self._backend_args = (bot, max_batch, prefill_chunk)
        self.backend = self._make_backend(*self._backend_args)
        self._queue: deque[Job] = deque()
        self._running: dict[int, tuple[Job, int]] = {}  # row id -> (job, answer index)
        self._jobs: list[Job] = []  # admitted, not finished
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # events of this tick, per loop
        self._ready = threading.Condition()
        self._closed = False
        self._draining = False
        self._shutdown: str | None = None
        self.served = 0
        self.cancelled = 0
        self.largest_batch = 0
        self._worker = None
        if start:
            self._worker = threading.Thread(target=self._run, name="glmgym-engine", daemon=True)
            self._worker.start()

    # -- the client side (any thread) --------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        return len(self._queue) + len(self._jobs)

    @property
    def waiting(self) -> int:
        """Requests not yet admitted."""
        return len(self._queue)

    @property
    def running_rows(self) -> int:
        """Rows in the running batch."""
        return self.backend.rows

    @property
    def draining(self) -> bool:
        """`drain()` was called: new requests are refused."""
        return self._draining

    def submit(self, prompt: list[int], gens: list[GenerationConfig] | GenerationConfig, *,
               stop: tuple[str, ...] = (), query: str = "", history: list = (), raw: bool = False,
               logprobs: int | None = None, first_index: int = 0, events: asyncio.Queue | None = None,
               role: str = "user", answer_prefix: str = "") -> Job:
        """Queue a request (call from the event loop that reads its events).

        Args:
            prompt: the prompt's token ids (ending with [gMASK] <sop>).
            gens: one config per answer (n answers: n configs), or one config.
            stop: strings that end an answer (not included in it).
            query: the chat turn's question, for each `Reply.history`.
            history: the turns kept in the prompt, for each `Reply.history`.
            raw: send the decoded text as it is (completions) instead of the chat post-processing.
            logprobs: None, or the number of top alternatives to report with each token.
            first_index: the index of the first answer in the events (several prompts of one API
                call number their answers in a row).
            events: the queue to send events to (several prompts of one call share one).
            role: the query's role (ChatGLM3/GLM-4: `observation` is a tool's result).
            answer_prefix: text of the answer the prompt already ends with (its tokens are in
                `prompt`), put in front of the decoded answer.

        Raises:
            QueueFull: `max_queue` requests are already waiting or running.
            Draining: the engine is shutting down.
            GlmgymError: more answers than `max_batch` rows.
        """
        gens = [gens] if isinstance(gens, GenerationConfig) else list(gens)
        if not 1 <= len(gens) <= self.max_batch:
            raise GlmgymError(f"n must be in 1..{self.max_batch} (--max-batch), not {len(gens)}")
        job = Job(list(prompt), gens, tuple(stop), asyncio.get_running_loop(), query, list(history), role,
                  answer_prefix, raw, logprobs, first_index,
                  answers=[_Answer(IncrementalDecoder(self.tokenizer)) for _ in gens])
        if events is not None:
            job.events = events
        with self._ready:
            if self._draining:
                raise Draining
            if self.pending >= self.max_queue:
                raise QueueFull
            self._queue.append(job)
            self._ready.notify()
        return job

    def chat(self, query: str, history: list, gen: dict[str, Any], *, n: int = 1,
             stop: tuple[str, ...] = (), trim_history: bool = True, logprobs: int | None = None,
             role: str = "user", answer_prefix: str = "") -> Job:
        """Fit a chat turn to the context (`ChatGLM.fit_prompt`) and submit it; `n` answers with
        seeds seed, seed + 1, ... when `gen` has a seed.

        Args:
            query: the message.
            history: the turns before it, as `ChatGLM.chat` takes them.
            gen: `GenerationConfig` fields.
            n: answers.
            stop: strings that end an answer.
            trim_history: drop the oldest turns when the prompt does not fit.
            logprobs: None, or the number of top alternatives to report with each token.
            role: `user`, or `observation` for a tool's result (ChatGLM3/GLM-4).
            answer_prefix: text the answer must start with (ChatGLM3/GLM-4: a tool call's name
                line, to force a call); its tokens end the prompt.

        Raises:
            GlmgymError: bad options, or a prompt that does not fit (and is not trimmed).
            QueueFull, Draining: as `submit`.
        """
        cfg = GenerationConfig.of(gen)
        ids, kept = self.bot.fit_prompt(query, history, cfg, trim_history, role)
        if answer_prefix:
            ids = ids + self.tokenizer.tokenize(answer_prefix)
        return self.submit(ids, answer_configs(cfg, n), stop=stop, query=query, history=kept,
                           logprobs=logprobs, role=role, answer_prefix=answer_prefix)

    def drain(self) -> None:
        """Refuse new requests from now on; those already taken go on."""
        with self._ready:
            self._draining = True

    def shutdown(self, message: str = "the server shut down before the answer was complete") -> None:
        """End every request, waiting or running, with `Failed(message, 503)` at the next tick."""
        with self._ready:
            self._draining = True
            self._shutdown = message
            self._ready.notify()

    def close(self) -> None:
        """Stop the worker after its current tick."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    # -- the worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._ready:
                while not (self._queue or self._jobs or self._closed or self._shutdown):
                    self._ready.wait()
                if self._closed:
                    return
            self.tick()

    def tick(self) -> None:
        """One scheduling step: expire, admit, step the batch, deliver (see the module docstring)."""
        try:
            self._tick()
        finally:
            self._flush()

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _tick(self) -> None:
        now = time.monotonic()
        self._expire(now)
        self._admit()
        if not self._running:
            return
        try:
            outs = self.backend.step(self._joinable)
        except GlmgymError as exc:
            self._fail_all(str(exc), 400)
            return
        except Exception as exc:  # the worker must outlive any one request
            self._fail_all(f"{type(exc).__name__}: {exc}", 500)
            return
        self.largest_batch = max(self.largest_batch, self.backend.decoding)
        now = time.monotonic()
        for out in outs:
            if out.row in self._running:
                self._deliver(out, now)

    def _joinable(self) -> bool:
        """A request waits that the running batch has room for (asked between prefill layers)."""
        queue = self._queue
        return bool(queue) and len(queue[0].gens) <= self.backend.free_rows

    def _expire(self, now: float) -> None:
        with self._ready:
            queued = list(self._queue)
        shutdown = self._shutdown
        for job in queued + self._jobs:
            if shutdown is not None:
                self._end(job, Failed(shutdown, 503), "shutdown")
            elif job.cancelled.is_set():
                for i, answer in enumerate(job.answers):
                    if not answer.done:
                        answer.done = True
                        job.emit(Done("cancelled", job.first_index + i), self._outbox)
                self._end(job, None, "cancelled")
            elif self.request_timeout is not None and now - job.submitted > self.request_timeout:
                self._end(job, Failed(f"the request took longer than the server's limit of "
                                      f"{self.request_timeout:g} s (--request-timeout)", 504), "timeout")

    def _admit(self) -> None:
        while True:
            with self._ready:
                if not self._queue or len(self._queue[0].gens) > self.backend.free_rows:
                    return
                job = self._queue.popleft()
            try:
                rows = self.backend.add(job.prompt, job.gens, job.logprobs)
            except GlmgymError as exc:
                self._jobs.append(job)
                self._end(job, Failed(str(exc), 400), "error")
                continue
            self._jobs.append(job)
            for i, row in enumerate(rows):
                job.answers[i].row = row
                self._running[row] = (job, i)
            self.observer.prompt(len(job.prompt))

    def _deliver(self, out: TokenOut, now: float) -> None:
        job, i = self._running[out.row]
        answer = job.answers[i]
        cfg = job.gens[i]
        ended = out.token in self._stops
        answer.generated += 1
        if not ended:  # a stop token is no part of the text (the v2 tokenizers would write its name)
            answer.decoder.push(out.token)  # appends the new piece; the answer is not decoded again
        if answer.generated == 1:
            self.observer.first_token(now - job.submitted)
        else:
            self.observer.next_token(now - answer.last_at)
        answer.last_at = now
        limit = min(cfg.max_length, self.context) - len(job.prompt)
        if cfg.max_new_tokens is not None:
            limit = min(limit, cfg.max_new_tokens)
        final = ended or answer.generated >= limit
        text = job.answer_prefix + (answer.decoder.finish() if final else answer.decoder.text)
        if job.raw:
            response, history = text, [*job.history, (job.query, text)]
        else:
            response, history = self.bot.format.answer(text, job.history, job.query, job.role, final)
        stopped = False
        if isinstance(response, str):
            response, stopped = cut_at_stop(response, job.stop)
            if stopped and isinstance(history[-1], tuple):  # (query, answer) histories hold the cut answer
                history = [*history[:-1], (job.query, response)]
        reply = Reply(response, history, len(job.prompt), answer.generated, ended)
        job.emit(Chunk(job.first_index + i, reply, (out,) if job.logprobs is not None else ()), self._outbox)
        if ended or stopped or answer.generated >= limit:
            answer.done = True
            self._release(answer)
            job.emit(Done("stop" if ended or stopped else "length", job.first_index + i), self._outbox)
            if all(a.done for a in job.answers):
                self._end(job, None, "ok")

    def _release(self, answer: _Answer) -> None:
        if answer.row is not None and answer.row in self._running:
            del self._running[answer.row]
            self.backend.remove(answer.row)

    def _end(self, job: Job, event: Failed | None, status: str) -> None:
        """Take `job` out of the queue and the batch; count it before its client hears the end,
        so that one that submits again at once, or reads the counters, sees the engine as it is."""
        with self._ready:
            if job in self._queue:
                self._queue.remove(job)
        for answer in job.answers:
            self._release(answer)
        if job in self._jobs:
            self._jobs.remove(job)
        self.served += 1
        self.cancelled += status == "cancelled"
        self.observer.finished(status)
        if event is not None:
            job.emit(event, self._outbox)

    def _fail_all(self, message: str, status: int) -> None:
        """The batch failed: end every admitted request and start from an empty batch."""
        self._running.clear()  # the batch is in an unknown state: no row is handed back to it
        for job in list(self._jobs):
            self._end(job, Failed(message, status), "error")
        self.backend = self._make_backend(*self._backend_args)
