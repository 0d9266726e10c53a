"""The v2 block (ChatGLM2/3, GLM-4) against THUDM's official modeling code.

The golden files come from the reference code on tiny random models (see
`fixtures/make_glm2_fixtures.py`): prefill, cached decoding steps, a cached multi-token chunk, a
P-Tuning v2 prefix, the long-context rotary variants, and the reference's greedy generation.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from glmgym.chat.config import GenerationConfig, GLM2Config
from glmgym.chat.generate import PromptBatch, generate
from glmgym.chat.model import KVCache
from glmgym.chat.model_v2 import GLM2Model

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["glm2_chatglm2", "glm2_chatglm2_32k", "glm2_chatglm3", "glm2_glm4", "glm2_chatglm3_ptuning"]


def _load(name):
    path = FIXTURES / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    tensors = load_file(str(path))
    golden = {k.removeprefix("golden."): v for k, v in tensors.items() if k.startswith("golden.")}
    model = GLM2Model(GLM2Config.from_dict(config)).eval()
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("golden.")}, strict=True)
    return model, golden


@pytest.mark.parametrize("name", CASES)
def test_prefill_cached_steps_and_chunks_equal_the_reference(name):
    model, g = _load(name)
    P = model.prefix_len
    ids = g["prefill_ids"]
    B, T = ids.shape
    cache = KVCache.empty(model.config, B, P + 16, torch.float32, "cpu")
    if P:
        k, v = model.prefix_kv(B, torch.float32)
        cache.k[:, :, :, :P], cache.v[:, :, :, :P] = k, v
    batch = PromptBatch.build(ids.tolist(), 0, causal=True)
    with torch.no_grad():
        logits = model(ids, batch.position_ids, batch.attention_mask(P), kv_cache=cache, start=P)
        torch.testing.assert_close(logits, g["prefill_logits"], atol=1e-5, rtol=0)
        for step in range(2):
            logits = model(
                g[f"step{step}_ids"], torch.full((B, 1), T + step), None, kv_cache=cache, start=P + T + step
            )
            torch.testing.assert_close(logits, g[f"step{step}_logits"], atol=1e-5, rtol=0)
        # three tokens at once on a cache: causal among themselves, all of the cache before them
        S = P + T + 2
        mask = ~torch.ones(3, S + 3, dtype=torch.bool).tril(S)[None, None]
        pos = torch.arange(T + 2, T + 5)[None].repeat(B, 1)
        logits = model(g["chunk_ids"], pos, mask, kv_cache=cache, start=S)
        torch.testing.assert_close(logits, g["chunk_logits"], atol=1e-5, rtol=0)


def test_the_kv_cache_holds_the_key_value_groups_only():
    model, _ = _load("glm2_chatglm3")
    cache = KVCache.empty(model.config, 2, 10, torch.float32, "cpu")
    cfg = model.config
    assert cache.k.shape == (cfg.num_layers, 2, cfg.multi_query_group_num, 10, cfg.kv_channels)
    assert cfg.multi_query_group_num < cfg.num_attention_heads


@pytest.mark.parametrize("name", ["glm2_chatglm2", "glm2_chatglm3", "glm2_glm4"])
def test_greedy_generation_equals_the_reference_token_for_token(name):
    model, g = _load(name)
    prompt = g["greedy_prompt"][0].tolist()
    want = g["greedy_tokens"][0].tolist()
    cfg = GenerationConfig(do_sample=False, max_new_tokens=len(want), max_length=64)
    *_, out = generate(model, [prompt], cfg, eos_id=127, pad_id=0, vocab_limit=128)
    assert out[0] == want[: len(out[0])] and (len(out[0]) == len(want) or out[0][-1] == 127)
    # a left-padded batch: the short row decodes as it would alone
    *_, both = generate(model, [prompt, prompt[2:]], cfg, eos_id=127, pad_id=0, vocab_limit=128)
    *_, alone = generate(model, [prompt[2:]], cfg, eos_id=127, pad_id=0, vocab_limit=128)
    assert both[0] == out[0] and both[1] == alone[0]


def test_bf16_logits_stay_close_to_fp32():
    model, g = _load("glm2_glm4")
    ids = g["prefill_ids"]
    batch = PromptBatch.build(ids.tolist(), 0, causal=True)
    with torch.no_grad():
        ref = model(ids, batch.position_ids, batch.attention_mask())
        low = model.to(torch.bfloat16)(ids, batch.position_ids, batch.attention_mask()).float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("name", ["glm2_chatglm3", "glm2_glm4"])
def test_bf16_cached_steps_follow_the_bf16_forward_over_the_whole_sequence(name):
    """bf16 decoding on the CPU takes the grouped one-query path (glmgym's kernel where bf16 is not
    native): each cached step's logits stay as close to the fp32 reference as the uncached bf16
    forward over the whole sequence does."""
    model, g = _load(name)
    model = model.to(torch.bfloat16)
    ids = g["prefill_ids"]
    B, T = ids.shape
    full = torch.cat([ids, g["step0_ids"], g["step1_ids"]], dim=1)
    cache = KVCache.empty(model.config, B, T + 4, torch.bfloat16, "cpu")
    prompt, both = (PromptBatch.build(x.tolist(), 0, causal=True) for x in (ids, full))
    with torch.no_grad():
        model(ids, prompt.position_ids, prompt.attention_mask(), kv_cache=cache, start=0)
        steps = [model(g[f"step{s}_ids"], torch.full((B, 1), T + s), None, kv_cache=cache, start=T + s)
                 for s in range(2)]
        whole = model(full, both.position_ids, both.attention_mask())
    for s in range(2):
        ref = g[f"step{s}_logits"][:, -1]
        err_step = (steps[s][:, -1].float() - ref).abs().max()
        err_whole = (whole[:, T + s].float() - ref).abs().max()
        assert err_step <= max(2 * err_whole, 0.02 * ref.abs().max())
