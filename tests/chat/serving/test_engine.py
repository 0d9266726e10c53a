"""The engine's scheduling against a scripted fake batch, driven tick by tick (no thread, no
sleeps): admission order, joining between steps, retirement, per-row options, stop strings,
cancellation, timeouts, errors, the bounded queue, draining and shutdown."""

import asyncio
from dataclasses import dataclass

import pytest

from glmgym.chat.config import GenerationConfig
from glmgym.chat.formats import ChatFormat
from glmgym.chat.serving.batch import TokenOut
from glmgym.chat.serving.engine import (
    Chunk,
    Done,
    Draining,
    Engine,
    EngineObserver,
    Failed,
    QueueFull,
    cut_at_stop,
)
from glmgym.chat.serving.prefill import PrefillScheduler
from glmgym.chat.template import fit_prompt
from glmgym.errors import GlmgymError

EOS, GMASK, SOP = 1, 2, 3
FAKE_LAYERS = 4


class FakeTokenizer:
    """One id per word (ids from 10 on), <eop> = 1."""

    eos_id = EOS

    def __init__(self) -> None:
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in text.split():
            if w not in self.words:
                self.words.append(w)
            ids.append(10 + self.words.index(w))
        return [*ids, GMASK, SOP]

    def decode(self, ids) -> str:
        return " ".join(self.words[i - 10] for i in ids if i >= 10)


@dataclass
class _Config:
    max_sequence_length: int = 128


class FakeBot:
    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.model = type("M", (), {"config": _Config()})()
        self.format = ChatFormat("chatglm", self.tokenizer)

    def config(self, gen):
        return GenerationConfig(**gen)

    def fit_prompt(self, query, history, cfg, trim=True, role="user"):
        return fit_prompt(self.tokenizer, self.model.config.max_sequence_length, query, history, cfg, trim)


class FakeBatch:
    """Each row answers its prompt's words, one per step, then <eop>. Prompts go through
    `FAKE_LAYERS` pretend layers under the real `PrefillScheduler`: the rows added before a step
    form one prefill group there, and a row's first token comes on the step its group finishes
    (with the default chunk, the first step after `add`). A prompt with 'fail' is refused by
    `add`; a step with a 'crash' row raises. `on_layer(group)` runs after each layer."""

    def __init__(self, bot, max_rows, chunk) -> None:
        self.bot, self.max_rows = bot, max_rows
        self.rows_: dict[int, list[int]] = {}  # row id -> tokens still to give
        self.added: list[tuple[str, list[GenerationConfig], int | None]] = []
        self.steps: list[list[int]] = []
        self.removed: list[int] = []
        self.next_id = 0
        self.prefill = PrefillScheduler(FAKE_LAYERS, chunk)
        self.waiting: list[int] = []  # rows added since the last step
        self.lengths: dict[int, int] = {}  # row -> prompt tokens
        self.groups: dict[int, list[int]] = {}  # prefill group -> its rows
        self.layers: list[tuple[int, ...]] = []  # per step: the group of each layer run
        self.on_layer = None

    @property
    def rows(self):
        return len(self.rows_)

    @property
    def free_rows(self):
        return self.max_rows - self.rows

    @property
    def decoding(self):
        return self.rows - len(self.waiting) - sum(map(len, self.groups.values()))

    def add(self, prompt, cfgs, logprobs=None):
        text = self.bot.tokenizer.decode(prompt)
        if "fail" in text.split():
            raise GlmgymError("prompt too long")
        if len(cfgs) > self.free_rows:
            raise AssertionError("the engine admitted more rows than are free")
        self.added.append((text, list(cfgs), logprobs))
        ids = []
        for _ in cfgs:
            self.rows_[self.next_id] = [t for t in prompt if t >= 10] + [EOS]
            self.lengths[self.next_id] = len(prompt)
            ids.append(self.next_id)
            self.next_id += 1
        self.waiting += ids
        return ids

    def remove(self, row):
        self.removed.append(row)
        self.rows_.pop(row, None)
        self.waiting = [r for r in self.waiting if r != row]
        for g, rows in list(self.groups.items()):
            rows[:] = [r for r in rows if r != row]
            if not rows:
                del self.groups[g]
                self.prefill.remove(g)

    def _layer(self, group):
        self.layers[-1] += (group,)
        if self.on_layer is not None:
            self.on_layer(group)

    def step(self, interrupt=None):
        self.steps.append(sorted(self.rows_))
        if any("crash" in self.bot.tokenizer.decode(t) for t in self.rows_.values()):
            raise RuntimeError("boom")
        if self.waiting:  # like RunningBatch: padded to the longest prompt
            g = min(self.waiting)
            self.groups[g], self.waiting = self.waiting, []
            self.prefill.add(g, len(self.groups[g]) * max(self.lengths[r] for r in self.groups[g]))
        prefilling = {r for rows in self.groups.values() for r in rows}
        decoding = [r for r in self.rows_ if r not in prefilling]
        self.layers.append(())
        landed = [r for g in self.prefill.step(self._layer, interrupt) for r in self.groups.pop(g)]
        return [TokenOut(r, toks.pop(0), -0.5, ((toks[0] if toks else EOS, -0.5),))
                for r, toks in self.rows_.items() if r in decoding or r in landed]


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def prompt(self, tokens):
        self.calls.append(("prompt", tokens))

    def first_token(self, seconds):
        self.calls.append(("first", seconds >= 0))

    def next_token(self, seconds):
        self.calls.append(("next", seconds >= 0))

    def finished(self, status):
        self.calls.append(("finished", status))


def _engine(**kw) -> Engine:
    bot = FakeBot()
    return Engine(bot, backend=FakeBatch, start=False, **kw)


def _submit(engine, text, **gen_and_kw):
    kw = {k: gen_and_kw.pop(k) for k in ("stop", "logprobs", "n", "trim_history") if k in gen_and_kw}
    return engine.chat(text, [], gen_and_kw, **kw)


async def _ticks(engine, n=1):
    for _ in range(n):
        engine.tick()
    await asyncio.sleep(0)  # deliver the events the ticks sent


def _drain(job) -> list:
    out = []
    while not job.events.empty():
        out.append(job.events.get_nowait())
    return out


def _texts(events, index=0):
    return [e.reply.response for e in events if isinstance(e, Chunk) and e.index == index]


def test_requests_join_between_steps_and_leave_when_done():
    async def main():
        engine = _engine(max_batch=2)
        a, b, c = (_submit(engine, t) for t in ("a1 a2 a3", "b1", "c1 c2"))
        await _ticks(engine)  # a and b take both rows; c waits
        assert engine.backend.steps == [[0, 1]] and engine.waiting == 1
        await _ticks(engine)  # b ends (<eop>): its row frees at once ...
        await _ticks(engine)  # ... and c joins the running batch on the next step
        steps = list(engine.backend.steps)
        events = [_drain(j) for j in (a, b, c)]
        await _ticks(engine, 5)
        events = [e + _drain(j) for e, j in zip(events, (a, b, c))]
        return engine, steps, events

    engine, steps, (a, b, c) = asyncio.run(main())
    assert steps == [[0, 1], [0, 1], [0, 2]]
    assert _texts(a) == ["a1", "a1 a2", "a1 a2 a3", "a1 a2 a3"] and a[-1] == Done("stop")
    assert _texts(b) == ["b1", "b1"] and b[-1] == Done("stop")
    assert _texts(c) == ["c1", "c1 c2", "c1 c2"] and c[-1] == Done("stop")
    assert engine.backend.removed == [1, 0, 2] and engine.pending == 0 and engine.served == 3


def test_the_head_of_the_queue_is_never_overtaken():
    async def main():
        engine = _engine(max_batch=3)
        first = _submit(engine, "x y z w")
        wide = _submit(engine, "n", n=3)  # needs every row: waits for the first to finish
        small = _submit(engine, "s")  # would fit now, but stays behind `wide`
        await _ticks(engine, 2)
        before = [t for t, *_ in engine.backend.added]
        await _ticks(engine, 10)
        return engine, before, [_drain(j) for j in (first, wide, small)]

    engine, before, (_, wide, small) = asyncio.run(main())
    assert before == ["x y z w"]
    assert [t for t, *_ in engine.backend.added] == ["x y z w", "n", "s"]
    assert sorted(e.index for e in wide if isinstance(e, Done)) == [0, 1, 2]
    assert small[-1] == Done("stop")


def test_options_are_per_row_and_n_answers_get_consecutive_seeds():
    async def main():
        engine = _engine(max_batch=4)
        _submit(engine, "a", temperature=0.3, top_p=0.5)
        _submit(engine, "b", do_sample=False, max_new_tokens=3)
        _submit(engine, "c", seed=7, n=2, logprobs=2)
        await _ticks(engine)
        return engine.backend.added

    added = asyncio.run(main())
    (_, (a,), _), (_, (b,), _), (_, c, logprobs) = added
    assert (a.temperature, a.top_p, a.seed) == (0.3, 0.5, None)
    assert (b.do_sample, b.max_new_tokens) == (False, 3)
    assert [g.seed for g in c] == [7, 8] and logprobs == 2


def test_stop_strings_token_limits_and_logprobs():
    async def main():
        engine = _engine()
        stop = _submit(engine, "one two STOP three", stop=("STOP",))
        short = _submit(engine, "a b c d", max_new_tokens=2, logprobs=1)
        await _ticks(engine, 6)
        return engine, _drain(stop), _drain(short)

    engine, stop, short = asyncio.run(main())
    assert _texts(stop)[-1] == "one two " and stop[-1] == Done("stop")
    assert _texts(short) == ["a", "a b"] and short[-1] == Done("length")
    assert [e.logprobs[0].logprob for e in short if isinstance(e, Chunk)] == [-0.5, -0.5]
    assert not any(e.logprobs for e in stop if isinstance(e, Chunk))  # not asked for
    assert engine.pending == 0


def test_cancelled_requests_leave_the_queue_or_the_batch_at_the_next_tick():
    async def main():
        engine = _engine(max_batch=1)
        running = _submit(engine, "r1 r2 r3 r4")
        queued = _submit(engine, "q1")
        await _ticks(engine)
        queued.cancel()
        running.cancel()
        await _ticks(engine)
        return engine, _drain(running), _drain(queued)

    engine, running, queued = asyncio.run(main())
    assert queued == [Done("cancelled")]
    assert _texts(running) == ["r1"] and running[-1] == Done("cancelled")
    assert [t for t, *_ in engine.backend.added] == ["r1 r2 r3 r4"]  # the queued one never ran
    assert engine.backend.removed == [0] and engine.cancelled == 2 and engine.pending == 0


def test_a_request_past_the_timeout_ends_with_504():
    async def main():
        engine = _engine(request_timeout=30)
        slow = _submit(engine, "s1 s2 s3")
        fine = _submit(engine, "f1 f2 f3")
        await _ticks(engine)
        slow.submitted -= 31  # as if it had arrived 31 s ago
        await _ticks(engine)
        return engine, _drain(slow), _drain(fine)

    engine, slow, fine = asyncio.run(main())
    assert isinstance(slow[-1], Failed) and slow[-1].status == 504
    assert "--request-timeout" in slow[-1].message
    assert _texts(fine) == ["f1", "f1 f2"]  # the other row goes on
    assert engine.backend.removed == [0]


def test_errors_end_their_requests_and_the_engine_keeps_serving():
    async def main():
        engine = _engine()
        fail = _submit(engine, "fail here")
        crash = _submit(engine, "crash now")
        other = _submit(engine, "other")
        await _ticks(engine)
        after = _submit(engine, "still here")
        await _ticks(engine, 4)
        return [_drain(j) for j in (fail, crash, other, after)]

    fail, crash, other, after = asyncio.run(main())
    assert fail == [Failed("prompt too long", 400)]  # refused alone
    assert crash == [Failed("RuntimeError: boom", 500)] and other == [Failed("RuntimeError: boom", 500)]
    assert _texts(after)[-1] == "still here" and after[-1] == Done("stop")  # a fresh batch


def test_a_full_queue_refuses_and_frees_slots_as_requests_end():
    async def main():
        engine = _engine(max_queue=2, max_batch=1)
        first, second = _submit(engine, "a"), _submit(engine, "b")
        with pytest.raises(QueueFull):
            _submit(engine, "c")
        with pytest.raises(GlmgymError, match=r"n must be in 1\.\.1"):
            _submit(engine, "d", n=2)
        await _ticks(engine, 2)  # the first ends
        third = _submit(engine, "c")
        await _ticks(engine, 4)
        return [_drain(j)[-1] for j in (first, second, third)]

    assert asyncio.run(main()) == [Done("stop")] * 3


def test_drain_refuses_new_requests_and_shutdown_ends_the_rest_with_503():
    async def main():
        engine = _engine(max_batch=1)
        running, waiting = _submit(engine, "r1 r2 r3"), _submit(engine, "w")
        await _ticks(engine)
        engine.drain()
        with pytest.raises(Draining):
            _submit(engine, "late")
        await _ticks(engine)  # the taken requests go on while draining
        engine.shutdown()
        await _ticks(engine)
        return engine, _drain(running), _drain(waiting)

    engine, running, waiting = asyncio.run(main())
    assert _texts(running) == ["r1", "r1 r2"]
    assert running[-1].status == 503 and waiting[-1].status == 503 and engine.pending == 0


def test_the_observer_sees_prompts_tokens_and_ends():
    async def main():
        rec = Recorder()
        engine = Engine(FakeBot(), backend=FakeBatch, start=False, observer=rec)
        _submit(engine, "p q")
        await _ticks(engine, 3)
        job2 = _submit(engine, "z")
        job2.cancel()
        await _ticks(engine)
        return rec.calls

    assert asyncio.run(main()) == [("prompt", 4), ("first", True), ("next", True), ("next", True),
                                   ("finished", "ok"), ("finished", "cancelled")]


def test_the_worker_thread_serves_and_closes():
    async def main():
        engine = Engine(FakeBot(), backend=FakeBatch)
        job = _submit(engine, "threaded answer")
        events = []
        while not events or not isinstance(events[-1], Done):
            events.append(await asyncio.wait_for(job.events.get(), timeout=30))
        engine.close()
        return events

    assert _texts(asyncio.run(main()))[-1] == "threaded answer"


def test_bad_engine_sizes_and_stop_cutting():
    with pytest.raises(GlmgymError, match="at least 1"):
        _engine(max_queue=0)
    with pytest.raises(GlmgymError, match="positive"):
        _engine(request_timeout=0)
    assert cut_at_stop("abc<x>def<y>", ("<y>", "<x>", "")) == ("abc", True)
    assert cut_at_stop("abc", ("z",)) == ("abc", False)


def test_a_short_request_arriving_during_a_long_prefill_goes_next():
    async def main():
        engine = _engine(max_batch=4, prefill_chunk=16)
        long = _submit(engine, " ".join(f"w{i}" for i in range(30)))  # 32 tokens: 2 layers a step
        fake, arrived = engine.backend, []
        # the short request arrives while the first step runs the long prompt's first layer
        fake.on_layer = lambda group: arrived or arrived.append(_submit(engine, "quick"))
        await _ticks(engine)
        fake.on_layer = None
        await _ticks(engine)  # the short prompt's whole prefill, then its first token
        after_short = [_drain(long), _drain(arrived[0])]
        await _ticks(engine, 3)
        return fake.layers, after_short, _drain(long)

    layers, (long_before, short), long_after = asyncio.run(main())
    # the long prompt's step ends after the layer in progress (one of the two it had); the short
    # prompt (row 1) goes through all four layers on the next step, which stops there (the rest of
    # the long one does not fit in its budget); the long one goes on at the step after
    assert layers == [(0,), (1, 1, 1, 1), (0, 0), (0,), ()]
    assert long_before == [] and _texts(short) == ["quick"]
    assert _texts(long_after)[0] == "w0"


def test_a_stream_of_short_requests_does_not_starve_a_long_prefill():
    async def main():
        engine = _engine(max_batch=8, prefill_chunk=16)
        long = _submit(engine, " ".join(f"w{i}" for i in range(62)))  # 64 tokens: 1 layer a step
        shorts, firsts, long_first = [], {}, None
        for tick in range(1, 16):
            if tick > 1:  # a new short request before every step from the second on
                shorts.append((tick, _submit(engine, f"s{tick}")))
            await _ticks(engine)
            if long_first is None and _texts(_drain(long)):
                long_first = tick
            for submitted, job in shorts:
                if submitted not in firsts and _texts(_drain(job)):
                    firsts[submitted] = tick
        return long_first, firsts, len(shorts)

    long_first, firsts, n = asyncio.run(main())
    # the long prompt advances at least every other step: its 4 layers in at most 8 steps
    assert long_first is not None and long_first <= 2 * FAKE_LAYERS
    # ... and every short one still gets its first token within a few steps of arriving
    assert len(firsts) >= n - 2
    assert max(first - submitted for submitted, first in firsts.items()) <= 3
