import pytest
import torch

from glmgym.chat.generate import GenerationConfig, PromptBatch, generate, prefill
from glmgym.chat.model import KVCache
from glmgym.chat.sampling import sample
from glmgym.errors import GlmgymError


def _logits(probs):
    return torch.log(torch.tensor([probs]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = _logits([0.5, 0.3, 0.15, 0.05])
    cfg = GenerationConfig(top_p=0.7, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, cfg, 4, generator=g) for _ in range(3000)])
    counts = torch.bincount(draws.flatten(), minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() / 3000 - 0.5 / 0.8) < 0.03


def test_top_k_temperature_greedy_and_seed():
    logits = _logits([0.1, 0.2, 0.3, 0.4])
    top1 = GenerationConfig(top_k=1, top_p=1.0)
    assert all(sample(logits, top1, 4).item() == 3 for _ in range(20))
    assert sample(logits, GenerationConfig(do_sample=False), 4).item() == 3
    top2 = GenerationConfig(top_k=2, top_p=1.0, temperature=1.0)
    assert {sample(logits, top2, 4).item() for _ in range(200)} == {2, 3}
    cfg = GenerationConfig(top_p=1.0, temperature=5.0)
    a = [sample(logits, cfg, 4, generator=torch.Generator().manual_seed(7)).item() for _ in range(5)]
    assert len(set(a)) == 1  # the same seed draws the same token


def test_nan_guard_and_vocab_limit():
    nan = torch.tensor([[float("nan")] + [0.0] * 9])
    assert sample(nan, GenerationConfig(), 10).item() == 5  # the reference's fallback token
    logits = torch.zeros(1, 10)
    logits[0, 8:] = 100.0  # rows past the tokenizer's pieces
    assert all(sample(logits, GenerationConfig(top_p=1.0), 8).item() < 8 for _ in range(50))


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    cfg = GenerationConfig(do_sample=False, repetition_penalty=1.5)
    assert sample(logits, cfg, 3, previous=torch.tensor([[0]])).item() == 1


def test_bad_generation_options():
    with pytest.raises(GlmgymError):
        GenerationConfig(top_p=0)
    with pytest.raises(GlmgymError):
        GenerationConfig(temperature=0)


def test_prompt_positions_follow_the_reference():
    batch = PromptBatch.build([[10, 11, 12, 1, 2]], pad_id=0)  # 3 text tokens, [gMASK], <sop>
    assert batch.position_ids[0].tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 0, 1]]
    masked = batch.attention_mask()[0, 0]
    assert not masked[:, :4].any()  # the context is visible to every token
    assert masked[:4, 4].all() and not masked[4, 4]  # only <sop> sees itself


def test_batch_of_two_prompts_equals_two_single_runs(tiny):
    model, tok = tiny
    prompts = [tok.encode("short one"), tok.encode("a longer prompt with more words 中文")]
    assert len(prompts[0]) != len(prompts[1])
    with torch.no_grad():
        batch = PromptBatch.build(prompts, tok.pad_id)
        both = prefill(model, batch, KVCache.empty(model.config, 2, 64, torch.float32, "cpu"))
        for i, p in enumerate(prompts):
            single = prefill(model, PromptBatch.build([p], tok.pad_id),
                             KVCache.empty(model.config, 1, 64, torch.float32, "cpu"))
            assert (both[i] - single[0]).abs().max() < 1e-4
    cfg = GenerationConfig(do_sample=False, max_new_tokens=8)
    kw = dict(eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
    together = list(generate(model, prompts, cfg, **kw))[-1]
    for i, p in enumerate(prompts):
        assert list(generate(model, [p], cfg, **kw))[-1][0] == together[i]


def test_generation_stops_at_eop_and_at_max_length(tiny):
    model, tok = tiny
    prompt = tok.encode("hello")
    kw = dict(pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
    first = list(generate(model, [prompt], GenerationConfig(do_sample=False, max_new_tokens=3),
                          eos_id=tok.eos_id, **kw))[-1][0]
    assert len(first) == 3
    # declare the first greedy token to be <eop>: generation stops right there
    out = list(generate(model, [prompt], GenerationConfig(do_sample=False, max_new_tokens=3),
                        eos_id=first[0], **kw))
    assert len(out) == 1 and out[-1][0] == [first[0]]
    total = len(list(generate(model, [prompt], GenerationConfig(do_sample=False, max_length=len(prompt) + 4),
                              eos_id=-1, **kw)))
    assert total == 4
    with pytest.raises(GlmgymError, match="no room"):
        list(generate(model, [prompt], GenerationConfig(max_length=len(prompt)), eos_id=-1, **kw))


def test_tiny_temperatures_never_sample_from_nan():
    from glmgym.chat.generate import GenerationConfig
    from glmgym.chat.sampling import sample

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    for t in (1e-117, 1e-6, 1e-3):
        token = sample(logits, GenerationConfig(temperature=t, top_p=0.95), vocab_limit=4)
        assert token.tolist() == [1]
    # a top_p that rounds to 0 in fp32 keeps the most likely token
    assert sample(logits, GenerationConfig(top_p=1e-100), vocab_limit=4).tolist() == [1]


def test_top_p_among_the_candidates_keeps_what_a_full_sort_keeps(monkeypatch):
    from glmgym.chat import sampling

    g = torch.Generator().manual_seed(0)
    V = 5000
    x = torch.randn(5, V, generator=g) * torch.tensor([[8.0], [4.0], [6.0], [3.0], [0.1]])
    x[3, :3000] = float("-inf")
    top_p = torch.tensor([[0.7], [0.95], [1.0], [0.8], [0.9]])
    sorts = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort",
                        lambda self, *a, **k: sorts.append(1) or real_sort(self, *a, **k))
    fast = sampling._top_p(x[:4], top_p[:4])  # peaked rows and a top_p 1 row: the candidates reach it
    flat = sampling._top_p(x[4:], top_p[4:])  # a flat row: 1024 candidates do not, so a full sort
    assert len(sorts) == 1
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", V)  # every token a candidate: the full sort
    full = sampling._top_p(x, top_p)
    both = torch.cat([fast, flat])
    assert torch.equal(torch.isfinite(both), torch.isfinite(full))
    assert torch.equal(both[torch.isfinite(both)], full[torch.isfinite(full)])
    kept = torch.isfinite(full).sum(dim=-1).tolist()
    assert 1 <= kept[0] < kept[1] < 1024 and kept[2] == V and kept[4] > 1024


def test_a_row_with_an_infinity_falls_back_like_the_reference():
    logits = torch.zeros(2, 10)
    logits[1, 3] = float("inf")
    cfg = GenerationConfig(do_sample=False)
    assert sample(logits, cfg, 10).tolist()[1] == 5  # zeros, then token 5 made likely
    big = torch.full((1, 10), 3e38)  # its sum overflows, yet every value is finite
    big[0, 7] = 3.3e38
    assert sample(big, cfg, 10).item() == 7


@pytest.mark.parametrize("V", [40, 5000])  # a full sort, and the candidates' path
def test_one_top_p_for_every_row_filters_as_per_row_values_do(V):
    from glmgym.chat import sampling

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, V, generator=g) * torch.tensor([[8.0], [3.0], [0.5]])
    for p in (0.3, 0.9):
        column = sampling._top_p(x, torch.full((3, 1), p))
        one = sampling._top_p(x, p)
        assert torch.equal(one, column)


def test_rows_sharing_their_options_draw_as_the_reference_does():
    # the one-draw path (every row samples, one generator) and the general one (a greedy row
    # beside) give the sampled rows the same tokens, and both match the reference's recipe
    from glmgym.chat.sampling import RowSampling

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 300, generator=g) * 4
    cfg = GenerationConfig(top_p=0.8, temperature=0.7)
    opts = RowSampling.of([cfg] * 3)
    assert opts.all_sampled and isinstance(opts.sampled_top_p, float)
    fast = sample(logits, opts, 300, generator=torch.Generator().manual_seed(5))
    scores = (logits - logits.max(dim=-1, keepdim=True).values) / 0.7
    s, order = scores.sort(dim=-1, descending=True)
    probs = s.softmax(dim=-1)
    s = s.masked_fill(probs.cumsum(dim=-1) - probs >= 0.8, float("-inf"))
    reference = torch.full_like(scores, float("-inf")).scatter(1, order, s).softmax(dim=-1)
    expected = torch.multinomial(reference, 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    assert torch.equal(fast, expected)
    mixed = RowSampling.of([cfg, cfg, GenerationConfig(do_sample=False)])
    assert not mixed.all_sampled
    general = sample(logits, mixed, 300, generator=torch.Generator().manual_seed(5))
    rows2 = torch.multinomial(reference[:2], 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    assert torch.equal(general[:2], rows2) and general[2] == logits[2].argmax()
