"""The running batch on the tiny random model: rows that join and leave between steps answer as
they would alone, the cache moves instead of recomputing, and options are per row."""

import pytest
import torch

from glmgym.chat.config import GenerationConfig
from glmgym.chat.generate import PromptBatch, generate
from glmgym.chat.serving.batch import RunningBatch
from glmgym.chat.session import load
from glmgym.errors import GlmgymError

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=12)


@pytest.fixture(scope="module", params=["random:tiny", "random:tiny-glm4"])
def bot(request):
    """ChatGLM-6B's block (prefix-LM, 2D positions) and the v2 block (causal, grouped queries)."""
    return load(request.param, dtype="float32")


def _alone(bot, prompt, cfg=GREEDY):
    tok = bot.tokenizer
    *_, last = generate(bot.model, [prompt], cfg, eos_id=bot.format.stop_ids, pad_id=tok.pad_id,
                        vocab_limit=tok.vocab_size)
    return last[0]


def _batch(bot, max_rows=4, chunk=512):
    tok = bot.tokenizer
    return RunningBatch(bot.model, max_rows, eos_id=bot.format.stop_ids, vocab_limit=tok.vocab_size,
                        prefill_chunk=chunk)


def _collect(batch, wanted, steps=200, schedule=None, limit=12):
    """Step until every row has `limit` tokens or ended; `schedule[step]` adds rows then."""
    got: dict[int, list[int]] = {}
    for step in range(steps):
        for prompt, cfgs in (schedule or {}).get(step, []):
            ids = batch.add(prompt, cfgs)
            wanted.extend(ids)
        for t in batch.step():
            got.setdefault(t.row, []).append(t.token)
            if t.token in batch.eos_id or len(got[t.row]) == limit:
                batch.remove(t.row)
        if not batch.rows and step > max(schedule or {0: 0}):
            break
    return got


def test_rows_joining_and_leaving_answer_as_alone(bot):
    prompts = [bot.format.prompt_ids(q) for q in ("你好", "Tell me a long story about cats", "1 2 3", "x")]
    alone = [_alone(bot, p) for p in prompts]
    batch = _batch(bot)
    ids: list[int] = []
    # rows arrive at different steps: each joins a running batch of rows of other lengths
    got = _collect(batch, ids, schedule={0: [(prompts[0], [GREEDY])], 2: [(prompts[1], [GREEDY])],
                                         3: [(prompts[2], [GREEDY]), (prompts[3], [GREEDY])]})
    assert [got[i] for i in ids] == alone
    assert batch.rows == 0 and batch._cache is None  # an idle batch holds no cache


def test_a_long_prompt_is_prefilled_a_few_layers_per_step(bot):
    short, long = bot.format.prompt_ids("hi"), bot.format.prompt_ids(" ".join(["word"] * 12))
    batch = _batch(bot, chunk=len(long) // 2)  # one layer of the tiny model's two per step
    first = batch.add(short, [GREEDY])[0]
    assert [t.row for t in batch.step()] == [first]  # a short prompt lands in one step
    second = batch.add(long, [GREEDY])[0]
    steps = []
    for _ in range(3):
        steps.append([t.row for t in batch.step()])
    # the running row decodes on every step while the long prompt goes through the layers
    assert steps == [[first], [first, second], [first, second]]
    batch.remove(first)
    batch.remove(second)


def test_seeded_rows_do_not_depend_on_the_batch(bot):
    prompt = bot.format.prompt_ids("seeded")
    cfg = GenerationConfig(temperature=0.9, top_p=0.8, top_k=50, max_new_tokens=12, seed=7)
    alone_ids: list[int] = []
    alone = _collect(_batch(bot), alone_ids, schedule={0: [(prompt, [cfg])]})
    busy = _batch(bot, max_rows=6)
    ids: list[int] = []
    noisy = GenerationConfig(temperature=1.5, top_p=1.0, max_new_tokens=12)
    got = _collect(busy, ids, schedule={0: [(bot.format.prompt_ids("other"), [noisy, noisy])],
                                        1: [(prompt, [cfg])], 2: [(bot.format.prompt_ids("z"), [GREEDY])]})
    assert got[ids[2]] == alone[alone_ids[0]]
    # ... and equals the seeded single-request generation
    assert alone[alone_ids[0]] == _alone(bot, prompt, cfg)[:12]


def test_n_answers_share_one_prefill_and_differ_by_seed(bot):
    prompt = bot.format.prompt_ids("many")
    cfgs = [GenerationConfig(temperature=1.5, top_p=1.0, seed=s, max_new_tokens=8) for s in (1, 2, 3)]
    batch = _batch(bot)
    ids = batch.add(prompt, cfgs)
    assert batch.rows == 3 and batch.free_rows == 1
    first = batch.step()
    assert [t.row for t in first] == ids
    got = _collect(batch, [], limit=8)
    for i in ids:
        got[i] = [next(t.token for t in first if t.row == i), *got.get(i, [])]
        batch.remove(i)
    answers = [tuple(got[i][:8]) for i in ids]
    assert len(set(answers)) > 1  # different seeds, different answers from one prompt


def test_logprobs_are_the_model_distribution(bot):
    prompt = bot.format.prompt_ids("log")
    batch = _batch(bot)
    row = batch.add(prompt, [GREEDY], logprobs=3)[0]
    (out,) = batch.step()
    b = PromptBatch.build([prompt], 0, causal=bot.model.config.version == 2)
    with torch.no_grad():
        logits = bot.model(b.input_ids, b.position_ids, b.attention_mask())[0, -1]
    logits[bot.tokenizer.vocab_size:] = float("-inf")
    logp = logits.log_softmax(-1)
    assert out.row == row and out.token == int(logp.argmax())
    assert out.logprob == pytest.approx(float(logp.max()), abs=1e-4)
    assert [t for t, _ in out.top] == logp.topk(3).indices.tolist()
    assert out.top[0][1] == pytest.approx(out.logprob, abs=1e-6) and out.top[1][1] <= out.top[0][1]


def test_removing_a_middle_row_moves_the_last_into_its_slot(bot):
    prompts = [bot.format.prompt_ids(q) for q in ("a", "bb bb", "ccc ccc ccc")]
    alone = [_alone(bot, p) for p in prompts]
    batch = _batch(bot)
    ids = [batch.add(p, [GREEDY])[0] for p in prompts]
    got = {i: [] for i in ids}
    for t in batch.step():
        got[t.row].append(t.token)
    batch.remove(ids[0])  # the first slot frees; the third row's cache moves there
    for _ in range(11):
        for t in batch.step():
            got[t.row].append(t.token)
    assert got[ids[1]] == alone[1][: len(got[ids[1]])] and got[ids[2]] == alone[2][: len(got[ids[2]])]
    assert len(got[ids[2]]) == 12


def test_bad_rows_are_refused(bot):
    batch = _batch(bot, max_rows=2)
    with pytest.raises(GlmgymError, match="3 rows asked for, 2 free"):
        batch.add(bot.format.prompt_ids("a"), [GREEDY] * 3)
    with pytest.raises(GlmgymError, match="the prompt has 1 tokens"):
        batch.add([5], [GREEDY])
    with pytest.raises(GlmgymError, match="at least 1"):
        _batch(bot, max_rows=0)


@pytest.fixture(scope="module")
def deep():
    """A tiny model six layers deep, so that prompts spend several steps in prefill."""
    from glmgym.chat.session import ChatGLM
    from glmgym.chat.tiny import build_tiny

    return ChatGLM(*build_tiny(seed=1, num_layers=6), "random:deep")


def test_a_short_prompt_overtakes_a_long_prefill_and_both_answer_as_alone(deep):
    long = deep.tokenizer.encode(" ".join(["hello world"] * 60))  # 122 tokens
    short = deep.tokenizer.encode("hi")
    alone = [_alone(deep, p) for p in (long, short)]
    batch = _batch(deep, chunk=40)  # 40 * 6 // 122: one layer of the long prompt a step
    ids: list[int] = []
    got = _collect(batch, ids, schedule={0: [(long, [GREEDY])], 2: [(short, [GREEDY])]})
    assert [got[i] for i in ids] == alone
    # step by step: the short prompt lands on the step it arrives, before the long one
    batch, seen = _batch(deep, chunk=40), []
    long_id = batch.add(long, [GREEDY])[0]
    for _ in range(2):
        seen.append([t.row for t in batch.step()])
    short_id = batch.add(short, [GREEDY])[0]
    for _ in range(6):
        seen.append([t.row for t in batch.step()])
    assert seen[:3] == [[], [], [short_id]]
    first_long = next(i for i, rows in enumerate(seen) if long_id in rows)
    assert first_long <= 2 * 6  # the long one still lands in bounded time
    assert all(short_id in rows for rows in seen[3:])  # the short row decodes on every step


def test_an_interrupted_step_stops_after_one_layer_and_a_cancelled_prefill_stops(deep):
    batch = _batch(deep)
    prompt = deep.tokenizer.encode("hello world hello")
    row = batch.add(prompt, [GREEDY])[0]
    layers = []
    original = deep.model.run_layers

    def counting(*args):
        layers.append(tuple(args[-1]))
        return original(*args)

    deep.model.run_layers = counting
    try:
        assert batch.step(lambda: True) == []  # a request waits: one layer, then the step ends
        assert layers == [(0,)]
        batch.remove(row)  # its only row left: the rest of its prefill is not run
        assert batch.step() == [] and layers == [(0,)] and batch.rows == 0
    finally:
        del deep.model.run_layers
