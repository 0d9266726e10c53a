"""Prompt-lookup speculative decoding: drafts, the acceptance rule, and exactness end to end (greedy
output equal to plain decoding, sampling that keeps the model's distribution)."""

import dataclasses

import pytest
import torch

from glmgym.chat.config import PRESETS, GenerationConfig, GLM2Config
from glmgym.chat.generate import generate
from glmgym.chat.model import GLMModel
from glmgym.chat.model_v2 import GLM2Model
from glmgym.chat.serving.batch import RunningBatch
from glmgym.chat.speculative import DraftStats, lookup_draft, verify

V2 = GLM2Config(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
                ffn_hidden_size=96, padded_vocab_size=300, seq_length=256)


def test_lookup_draft_takes_the_latest_longest_match():
    assert lookup_draft([5, 6, 7, 8, 9, 5, 6], k=2) == [7, 8]
    # the 3-gram (1, 2, 3) occurs once, followed by 4; the 1-gram 3 occurs later, followed by 9
    assert lookup_draft([1, 2, 3, 4, 3, 9, 1, 2, 3], k=3) == [4, 3, 9]
    assert lookup_draft([1, 2, 3, 9, 3], k=4) == [9, 3]  # the only earlier 3
    assert lookup_draft([1, 7, 1, 8, 1], k=1) == [8]  # the latest occurrence with k tokens after it
    assert lookup_draft([1, 7, 1, 8, 1], k=3) == [7, 1, 8]  # none has 3 after it: the earliest
    assert lookup_draft([4, 4, 4, 4, 4], k=3) == [4, 4]  # a match may run into the tail itself
    assert lookup_draft([1, 2, 3], k=4) == [] and lookup_draft([1], k=4) == []
    assert lookup_draft([1, 2, 1], k=0) == []


def test_greedy_verification_keeps_drafts_while_they_are_the_argmax():
    logits = torch.full((2, 4, 10), -5.0)
    for b, best in enumerate([[3, 4, 5, 6], [7, 8, 1, 2]]):
        logits[b, torch.arange(4), best] = 5.0
    drafts = torch.tensor([[3, 4, 0], [7, 9, 1]])
    cfgs = [GenerationConfig(do_sample=False)] * 2
    assert verify(logits, drafts, [3, 3], cfgs, 10) == [[3, 4, 5], [7, 8]]
    logits[0, 2, 0] = 9.0  # the third draft is now the argmax too: all kept, and one more
    assert verify(logits, drafts, [3, 1], cfgs, 10) == [[3, 4, 0, 6], [7, 8]]
    assert verify(logits, drafts, [0, 0], cfgs, 10) == [[3], [7]]  # no drafts: the model's token


def test_sampled_verification_keeps_the_model_distribution():
    """The kept tokens are distributed as the model's own samples would be: the first token as p0,
    the second (after a kept first draft) as p1 - whatever the drafts were."""
    torch.manual_seed(0)
    p0 = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = torch.stack([p0.log(), p1.log(), p1.log()])[None].expand(4000, -1, -1)
    cfg = GenerationConfig(top_p=1.0, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    for drafts in ([0, 3], [2, 1], [3, 3]):  # a likely, a middling and an unlikely first draft
        rows = verify(logits, torch.tensor([drafts] * 4000), [2] * 4000, [cfg] * 4000, 4, generator=g)
        first = torch.bincount(torch.tensor([r[0] for r in rows]), minlength=4) / 4000
        assert torch.allclose(first, p0, atol=0.03), (drafts, first)
        kept = [r for r in rows if len(r) > 1]  # the first draft was kept: the next token is p1's
        assert abs(len(kept) / 4000 - p0[drafts[0]]) < 0.03
        second = torch.bincount(torch.tensor([r[1] for r in kept]), minlength=4) / len(kept)
        assert torch.allclose(second, p1, atol=0.06), (drafts, second)


def _model(cfg):
    """A small random model whose greedy answers partly repeat (default-initialized ones repeat one
    token, much wider weights never): drafts are then both kept and rejected."""
    torch.manual_seed(0)
    model = (GLMModel if cfg.version == 1 else GLM2Model)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3 if cfg.version == 1 else 0.1)
    return model


def _prompts(cfg):
    base = torch.randint(10, 200, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    tail = [cfg.gmask_token_id, cfg.bos_token_id] if cfg.version == 1 else []
    return [base * 3 + tail, [3] * 5 + base[:5] * 2 + tail]  # rows of two lengths: left pads


def _vocab(cfg):
    return cfg.vocab_size if cfg.version == 1 else cfg.padded_vocab_size


@pytest.mark.parametrize("cfg", [PRESETS["tiny"], dataclasses.replace(PRESETS["tiny"], pre_seq_len=4), V2],
                         ids=["v1", "v1-ptuning", "v2"])
@pytest.mark.parametrize("options", [{"do_sample": False}, {"do_sample": False, "repetition_penalty": 1.3},
                                     {"top_k": 1, "temperature": 0.7}], ids=["greedy", "penalty", "top_k_1"])
def test_generation_with_prompt_lookup_equals_plain_decoding(cfg, options):
    model, V = _model(cfg), _vocab(cfg)
    prompts = _prompts(cfg)

    def run(prompts, k, stats=None):
        gen = GenerationConfig(max_new_tokens=48, prompt_lookup_num_tokens=k, **options)
        return list(generate(model, prompts, gen, eos_id=[V - 1], pad_id=0, vocab_limit=V, stats=stats))

    plain = run(prompts, 0)[-1]
    assert len(set(plain[0])) > 4  # the answers vary
    stats = DraftStats()
    assert run(prompts, 4, stats)[-1] == plain  # both rows at once (left pads)
    alone = [run([p], 4, stats) for p in prompts]
    assert [steps[-1][0] for steps in alone] == plain
    assert min(len(steps) for steps in alone) < 48  # steps that gave several tokens
    assert 0 < stats.accepted < stats.drafted


def test_seeded_sampling_with_prompt_lookup_is_reproducible_and_stays_in_the_vocabulary():
    model = _model(V2)
    gen = GenerationConfig(max_new_tokens=40, prompt_lookup_num_tokens=6, seed=11, temperature=0.5, top_p=0.9)
    runs = [list(generate(model, _prompts(V2), gen, eos_id=[299], pad_id=0, vocab_limit=250))[-1]
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(0 <= t < 250 for row in runs[0] for t in row)


@pytest.mark.parametrize("cfg", [PRESETS["tiny"], V2], ids=["v1", "v2"])
def test_running_batch_rows_with_prompt_lookup_answer_as_alone(cfg):
    """Rows that draft and rows that do not share the batch; each keeps its own count of drafts,
    and its tokens, logprobs included, are plain decoding's."""
    model, V = _model(cfg), _vocab(cfg)
    prompts = [*_prompts(cfg), _prompts(cfg)[0][5:]]
    batch = RunningBatch(model, 4, eos_id=[V - 1], vocab_limit=V)
    rows = {}
    for i, p in enumerate(prompts):
        lookup = 0 if i == 1 else 5
        gen = GenerationConfig(do_sample=False, max_new_tokens=30, prompt_lookup_num_tokens=lookup)
        rows[batch.add(p, [gen], logprobs=2)[0]] = i
    got: dict[int, list] = {i: [] for i in rows.values()}
    several = False
    for _ in range(100):
        outs = batch.step()
        several |= len(outs) > batch.decoding
        for o in outs:
            got[rows[o.row]].append(o)
        for row, i in rows.items():
            if len(got[i]) >= 30 and row in [r.id for r in batch._decoding]:
                batch.remove(row)
        if not batch.rows:
            break
    assert several  # some step gave a row more than one token
    plain = RunningBatch(model, 4, eos_id=[V - 1], vocab_limit=V)
    for i, p in enumerate(prompts):
        row = plain.add(p, [GenerationConfig(do_sample=False)], logprobs=2)[0]
        alone = []
        while len(alone) < 30:
            alone += plain.step()
        plain.remove(row)
        assert [o.token for o in got[i][:30]] == [o.token for o in alone[:30]]
        for a, b in zip(got[i][:30], alone[:30]):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_bad_prompt_lookup_is_refused():
    from glmgym.errors import GlmgymError

    with pytest.raises(GlmgymError, match="prompt_lookup_num_tokens"):
        GenerationConfig(prompt_lookup_num_tokens=-1)
    with pytest.raises(GlmgymError, match="prompt_lookup_num_tokens"):
        GenerationConfig(prompt_lookup_num_tokens=33)
