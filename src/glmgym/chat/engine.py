"""A bounded, in-order request queue in front of one model: the serving engine.

One worker thread runs the model, one request at a time, in arrival order (the model is compute
bound on a CPU, and requests carry their own sampling options, so they are not batched). Requests
beyond `max_queue` waiting or running are refused at once (`QueueFull`): a server answers 429
instead of piling up work. A request whose client went away is cancelled between two tokens,
which frees its slot.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from glmgym.chat.session import ChatGLM, History, Reply
from glmgym.errors import GlmgymError

__all__ = ["Engine", "Job", "QueueFull"]


class QueueFull(Exception):
    """Every slot of the queue is taken."""


@dataclass
class Job:
    """One chat request; its events arrive on `events` (an asyncio queue of the submitting loop).

    Events: `Reply` (each step), then exactly one of `("done", finish_reason)` or
    `("error", message, is_user_error)`.
    """

    query: str
    history: History
    gen: dict[str, Any]
    stop: tuple[str, ...]
    trim_history: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        """Stop generating at the next token (the client left)."""
        self.cancelled.set()


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class Engine:
    """The model behind a bounded FIFO queue, run by one worker thread."""

    def __init__(self, bot: ChatGLM, max_queue: int = 8) -> None:
        if max_queue < 1:
            raise GlmgymError(f"--max-queue must be at least 1, not {max_queue}")
        self.bot = bot
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # waiting + running
        self.served = 0
        self.cancelled = 0
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
        self._jobs.put(job)
        return job

    def close(self) -> None:
        """Stop the worker after the current request."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._serve(job)
            except GlmgymError as exc:
                job.emit(("error", str(exc), True))
            except Exception as exc:  # the worker must outlive any one request
                job.emit(("error", f"{type(exc).__name__}: {exc}", False))
            finally:
                with self._lock:
                    self._pending -= 1
                    self.served += 1

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        reason = "length"
        for reply in self.bot.stream_reply(job.query, job.history, job.trim_history, **job.gen):
            text, stopped = cut_at_stop(reply.response, job.stop)
            if stopped:
                reply = Reply(text, [*reply.history[:-1], (job.query, text)], reply.prompt_tokens,
                              reply.completion_tokens, reply.ended)
            job.emit(reply)
            if reply.ended or stopped:
                reason = "stop"
                break
            if job.cancelled.is_set():
                reason = "cancelled"
                with self._lock:
                    self.cancelled += 1
                break
        job.emit(("done", reason))
