"""The serving engine against a scripted fake model: batching, order, stop strings, cancellation,
errors and the bounded queue. Deterministic: the fake model waits on events the test sets, and the
test awaits each job's events (no sleeps, no polling)."""

import asyncio
import threading

import pytest

from glmgym.chat.engine import Done, Engine, Failed, QueueFull, cut_at_stop
from glmgym.chat.session import Reply
from glmgym.errors import GlmgymError


class FakeBot:
    """Answers each query with its words, one word per step; a query 'hold' blocks the worker
    until `release` is set; 'fail' and 'crash' raise."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()

    def stream_batch(self, items, trim_history=True, **gen):
        queries = [q for q, _ in items]
        self.batches.append(queries)
        if "hold" in queries:
            self.release.wait(timeout=30)
        if "fail" in queries:
            raise GlmgymError("prompt too long")
        if "crash" in queries:
            raise RuntimeError("boom")
        limit = gen.get("max_new_tokens", 100)
        words = [q.split() for q in queries]
        for step in range(1, max(map(len, words)) + 1):
            n = min(step, limit)
            yield [Reply(" ".join(w[:n]), [*h, (q, " ".join(w[:n]))], 3, n, n >= len(w))
                   for w, (q, h) in zip(words, items)]
            if step >= limit:
                return


async def _events(job) -> list:
    """Every event of a job, up to its Done or Failed."""
    out = []
    while not out or isinstance(out[-1], Reply):
        out.append(await asyncio.wait_for(job.events.get(), timeout=30))
    return out


def _run(coro):
    return asyncio.run(coro)


def test_unseeded_requests_behind_the_head_share_a_batch_in_order():
    async def main():
        bot = FakeBot()
        engine = Engine(bot, max_queue=8, max_batch=3)
        hold = engine.submit("hold", [], {"seed": 1})  # keeps the worker busy while the rest queue
        jobs = [engine.submit(q, [], {"top_p": 0.7}) for q in ("a b", "c", "d e f", "g")]
        other = engine.submit("h", [], {"top_p": 0.5})
        seeded = engine.submit("i", [], {"seed": 2, "top_p": 0.7})
        bot.release.set()
        results = [await _events(j) for j in (hold, *jobs, other, seeded)]
        engine.close()
        return bot, engine, results

    bot, engine, results = _run(main())
    # the head runs alone (seeded); then up to max_batch compatible requests, in arrival order
    assert bot.batches == [["hold"], ["a b", "c", "d e f"], ["g"], ["h"], ["i"]]
    assert engine.largest_batch == 3 and engine.served == 7 and engine.pending == 0
    a = results[1]
    assert [e.response for e in a[:-1]] == ["a", "a b"]  # a row leaves the batch when it ends
    assert a[-1] == Done("stop")
    assert results[2][-1] == Done("stop") and results[2][0].response == "c"


def test_stop_strings_cut_the_answer_and_finish_it():
    async def main():
        bot = FakeBot()
        engine = Engine(bot)
        job = engine.submit("one two STOP three", [("q", "r")], {}, stop=("STOP",))
        events = await _events(job)
        engine.close()
        return events

    events = _run(main())
    last_reply = events[-2]
    assert last_reply.response == "one two "
    assert last_reply.history == [("q", "r"), ("one two STOP three", "one two ")]
    assert events[-1] == Done("stop")


def test_running_out_of_tokens_is_length():
    async def main():
        engine = Engine(FakeBot())
        events = await _events(engine.submit("a b c d", [], {"max_new_tokens": 2}))
        engine.close()
        return events

    events = _run(main())
    assert events[-2].response == "a b" and events[-1] == Done("length")


def test_a_request_cancelled_while_queued_never_reaches_the_model():
    async def main():
        bot = FakeBot()
        engine = Engine(bot)
        hold = engine.submit("hold", [], {"seed": 0})
        gone = engine.submit("gone", [], {"seed": 1})
        gone.cancel()
        bot.release.set()
        results = await _events(hold), await _events(gone)
        engine.close()
        return bot, engine, results

    bot, engine, (_, gone) = _run(main())
    assert gone == [Done("cancelled")]
    assert ["gone"] not in bot.batches and engine.cancelled == 1


def test_errors_end_each_row_of_the_batch_and_the_worker_keeps_serving():
    async def main():
        bot = FakeBot()
        engine = Engine(bot)
        hold = engine.submit("hold", [], {"seed": 0})
        fail = [engine.submit(q, [], {}) for q in ("fail", "x")]
        crash = engine.submit("crash", [], {"seed": 3})
        after = engine.submit("still here", [], {"seed": 4})
        bot.release.set()
        results = [await _events(j) for j in (hold, *fail, crash, after)]
        engine.close()
        return results

    _, fail, x, crash, after = _run(main())
    assert fail == [Failed("prompt too long", True)] and x == [Failed("prompt too long", True)]
    assert crash == [Failed("RuntimeError: boom", False)]
    assert after[-1] == Done("stop") and after[-2].response == "still here"


def test_a_full_queue_refuses_at_once_and_frees_slots_as_requests_end():
    async def main():
        bot = FakeBot()
        engine = Engine(bot, max_queue=2)
        hold = engine.submit("hold", [], {"seed": 0})
        second = engine.submit("b", [], {})
        with pytest.raises(QueueFull):
            engine.submit("c", [], {})
        bot.release.set()
        await _events(hold)
        await _events(second)
        third = engine.submit("c", [], {})  # slots are free again
        events = await _events(third)
        engine.close()
        return events

    assert _run(main())[-1] == Done("stop")


def test_bad_engine_sizes_and_stop_cutting():
    with pytest.raises(GlmgymError, match="at least 1"):
        Engine(FakeBot(), max_queue=0)
    assert cut_at_stop("abc<x>def<y>", ("<y>", "<x>", "")) == ("abc", True)
    assert cut_at_stop("abc", ("z",)) == ("abc", False)
