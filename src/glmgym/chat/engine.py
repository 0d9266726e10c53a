"""A bounded, in-order request queue in front of one model: the serving engine.

One worker thread runs the model. Requests are taken in arrival order; a request without a seed
is batched with the unseeded requests right behind it that share its generation options (up to
`max_batch`), so concurrent users share each decode step: on a CPU, decoding reads every weight
once per step whatever the batch, so a batch of 4 costs far less than 4 steps. Seeded requests run
alone, so a seed gives the same answer however busy the server is. Requests beyond `max_queue`
waiting or running are refused at once (`QueueFull`): a server answers 429 instead of piling up
work. A request whose client went away stops being served at the next token and frees its slot.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from glmgym.chat.session import ChatGLM, History, Reply
from glmgym.errors import GlmgymError

__all__ = ["Done", "Engine", "Failed", "Job", "QueueFull", "cut_at_stop"]


class QueueFull(Exception):
    """Every slot of the queue is taken."""


@dataclass(frozen=True)
class Done:
    """The last event of a request that ended normally."""

    finish_reason: str
    """"stop" (the model ended its answer or a stop string was hit), "length" (out of tokens) or
    "cancelled" (the client left)."""


@dataclass(frozen=True)
class Failed:
    """The last event of a request that failed."""

    message: str
    """What went wrong, for the client."""
    user_error: bool
    """True: the request was at fault (a 400); False: the server was (a 500)."""


@dataclass
class Job:
    """One chat request; its events arrive on `events` (an asyncio queue of the submitting loop).

    Events: a `Reply` per generated token, then exactly one `Done` or `Failed`.
    """

    query: str
    history: History
    gen: dict[str, Any]
    stop: tuple[str, ...]
    trim_history: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Reply | Done | Failed) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        """Stop generating for this request at the next token (the client left)."""
        self.cancelled.set()

    @property
    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share a batch; None (a seeded request) runs alone."""
        if self.gen.get("seed") is not None:
            return None
        return (tuple(sorted(self.gen.items())), self.trim_history)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class Engine:
    """The model behind a bounded FIFO queue, run by one worker thread."""

    def __init__(self, bot: ChatGLM, max_queue: int = 8, max_batch: int = 4) -> None:
        if max_queue < 1 or max_batch < 1:
            raise GlmgymError(f"max_queue and max_batch must be at least 1, not {max_queue}, {max_batch}")
        self.bot = bot
        self.max_queue, self.max_batch = max_queue, max_batch
        self._queue: deque[Job | None] = deque()
        self._ready = threading.Condition()
        self._lock = threading.Lock()
        self._pending = 0  # waiting + running
        self.served = 0
        self.cancelled = 0
        self.largest_batch = 0
        self._worker = threading.Thread(target=self._run, name="glmgym-engine", daemon=True)
        self._worker.start()

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        return self._pending

    def submit(self, query: str, history: History, gen: dict[str, Any], stop: tuple[str, ...] = (),
               trim_history: bool = True) -> Job:
        """Queue a request (call from the event loop that reads its events).

        Raises:
            QueueFull: `max_queue` requests are already waiting or running.
        """
        job = Job(query, list(history), gen, tuple(stop), trim_history, asyncio.get_running_loop())
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull
            self._pending += 1
        with self._ready:
            self._queue.append(job)
            self._ready.notify()
        return job

    def close(self) -> None:
        """Stop the worker after the current batch."""
        with self._ready:
            self._queue.append(None)
            self._ready.notify()

    def _next_batch(self) -> list[Job] | None:
        """The head of the queue and the compatible requests right behind it (order kept)."""
        with self._ready:
            while not self._queue:
                self._ready.wait()
            first = self._queue.popleft()
            if first is None:
                return None
            batch = [first]
            key = first.batch_key
            while (key is not None and len(batch) < self.max_batch and self._queue
                   and self._queue[0] is not None and self._queue[0].batch_key == key):
                batch.append(self._queue.popleft())
            return batch

    def _finish(self, job: Job, event: Done | Failed) -> None:
        # the slot is free and counted before the client hears the end: one that submits again at
        # once, or reads the counters, sees the engine as it is
        with self._lock:
            self._pending -= 1
            self.served += 1
            self.cancelled += event == Done("cancelled")
        job.emit(event)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = []
            for job in batch:
                if job.cancelled.is_set():
                    self._finish(job, Done("cancelled"))
                else:
                    live.append(job)
            if not live:
                continue
            self.largest_batch = max(self.largest_batch, len(live))
            open_jobs = dict(enumerate(live))
            try:
                self._serve(live, open_jobs)
            except GlmgymError as exc:
                for job in open_jobs.values():
                    self._finish(job, Failed(str(exc), True))
            except Exception as exc:  # the worker must outlive any one request
                for job in open_jobs.values():
                    self._finish(job, Failed(f"{type(exc).__name__}: {exc}", False))

    def _serve(self, live: list[Job], open_jobs: dict[int, Job]) -> None:
        """Stream the batch; `open_jobs` loses each row as it finishes (what is left gets errors)."""
        first = live[0]
        items = [(job.query, job.history) for job in live]
        for replies in self.bot.stream_batch(items, first.trim_history, **first.gen):
            for i, job in list(open_jobs.items()):
                reply = replies[i]
                text, stopped = cut_at_stop(reply.response, job.stop)
                if stopped:
                    reply = Reply(text, [*reply.history[:-1], (job.query, text)], reply.prompt_tokens,
                                  reply.completion_tokens, reply.ended)
                job.emit(reply)
                answered = reply.ended or stopped
                if answered or job.cancelled.is_set():
                    del open_jobs[i]
                    self._finish(job, Done("stop" if answered else "cancelled"))
            if not open_jobs:
                return
        for i, job in list(open_jobs.items()):
            del open_jobs[i]
            self._finish(job, Done("length"))
