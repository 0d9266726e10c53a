from pathlib import Path

import numpy as np
import pytest
import torch

from glmgym.chat.config import GLMConfig
from glmgym.chat.model import GLMModel, KVCache

FIXTURES = Path(__file__).parent / "fixtures"  # see fixtures/README.md (origin, license, layout)
FIXTURE_CFG = GLMConfig(vocab_size=5, hidden_size=32, num_attention_heads=8, num_layers=1,
                        inner_hidden_size=128, max_sequence_length=64, layernorm_epsilon=1e-5,
                        torch_dtype="float32")
WEIGHTS = [
    ("transformer.word_embeddings.weight", (5, 32)),
    ("transformer.layers.0.input_layernorm.weight", (32,)),
    ("transformer.layers.0.input_layernorm.bias", (32,)),
    ("transformer.layers.0.attention.query_key_value.weight", (96, 32)),
    ("transformer.layers.0.attention.query_key_value.bias", (96,)),
    ("transformer.layers.0.attention.dense.weight", (32, 32)),
    ("transformer.layers.0.attention.dense.bias", (32,)),
    ("transformer.layers.0.post_attention_layernorm.weight", (32,)),
    ("transformer.layers.0.post_attention_layernorm.bias", (32,)),
    ("transformer.layers.0.mlp.dense_h_to_4h.weight", (128, 32)),
    ("transformer.layers.0.mlp.dense_h_to_4h.bias", (128,)),
    ("transformer.layers.0.mlp.dense_4h_to_h.weight", (32, 128)),
    ("transformer.layers.0.mlp.dense_4h_to_h.bias", (32,)),
    ("transformer.final_layernorm.weight", (32,)),
    ("transformer.final_layernorm.bias", (32,)),
]


def _read_fixture(name: str, prefix: bool):
    """Parse the raw little-endian tensors (layout in the fixtures' README)."""
    raw = (FIXTURES / name).read_bytes()
    off = 0

    def take(dtype, shape):
        nonlocal off
        count = int(np.prod(shape))
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=off).reshape(shape)
        off += arr.nbytes
        return torch.from_numpy(arr.copy())

    prefix_kv = take("<f2", (2, 8, 5, 4)) if prefix else None
    weights = {name: take("<f4", shape) for name, shape in WEIGHTS}
    steps = []
    for n in (3, 1, 1):
        x = take("<i4", (n,))
        y = take("<f4", (n, 32) if n > 1 else (32,))
        steps.append((x.long(), y.reshape(n, 32)))
    assert off == len(raw)
    return weights, steps, prefix_kv


@pytest.mark.parametrize(("name", "prefix"), [("glm_model.data", False), ("glm_ptuning_v2_model.data", True)])
def test_reference_hidden_states_of_prefill_and_two_cached_steps(name, prefix):
    weights, steps, prefix_kv = _read_fixture(name, prefix)
    cfg = GLMConfig(**{**FIXTURE_CFG.__dict__, "pre_seq_len": 5 if prefix else None})
    model = GLMModel(cfg).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} | {k for k in missing if "prefix_encoder" in k}
    P = 5 if prefix else 0
    cache = KVCache.empty(cfg, 1, P + 8, torch.float32, "cpu")
    if prefix:  # the reference's prefix cache (already fp16-rounded): keys then values of layer 0
        cache.k[0, 0, :, :P] = prefix_kv[0].float()
        cache.v[0, 0, :, :P] = prefix_kv[1].float()
    masked = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    # the prefix slots are visible to every token
    mask1 = torch.cat([torch.zeros(3, P, dtype=torch.bool), masked], dim=1)[None, None]
    positions = [torch.tensor([[[0, 1, 1], [0, 0, 1]]]), torch.tensor([[[1], [2]]]),
                 torch.tensor([[[1], [3]]])]
    start = P
    with torch.no_grad():
        for i, ((x, y), pos) in enumerate(zip(steps, positions)):
            mask = mask1 if i == 0 else None
            h = model.hidden_states(x[None], pos, mask, kv_cache=cache, start=start)
            start += x.numel()
            assert (h[0] - y).abs().max().item() <= 1e-5, f"step {i + 1}"


def test_cached_decoding_equals_full_recomputation():
    torch.manual_seed(0)
    cfg = GLMConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, num_layers=2,
                    inner_hidden_size=64, max_sequence_length=64)
    model = GLMModel(cfg).eval()
    ids = torch.randint(0, 50, (1, 10))
    ctx = 5  # tokens 0..4 are the bidirectional context, 5.. are generated
    pos = torch.stack([torch.where(torch.arange(10) < ctx, torch.arange(10), torch.tensor(ctx - 1)),
                       torch.clamp(torch.arange(10) - ctx + 1, min=0)])[None]
    i = torch.arange(10)
    masked = ~((i[None, :] <= i[:, None]) | (i[None, :] < ctx))  # prefix-LM
    with torch.no_grad():
        full = model(ids, pos, masked[None, None])
        cache = KVCache.empty(cfg, 1, 10, torch.float32, "cpu")
        first = model(ids[:, :6], pos[..., :6], masked[None, None, :6, :6], kv_cache=cache, start=0)
        steps = [first]
        for t in range(6, 10):
            steps.append(model(ids[:, t:t + 1], pos[..., t:t + 1], None, kv_cache=cache, start=t))
    np.testing.assert_allclose(torch.cat(steps, 1).numpy(), full.numpy(), atol=1e-5)


@pytest.mark.parametrize(("native_bf16", "kernel"), [(True, False), (False, True), (False, False)])
def test_bf16_cached_decoding_follows_fp32_on_every_cpu_attention_path(native_bf16, kernel, monkeypatch):
    """Single-query attention has one path for CPUs with native bf16 and two without: glmgym's
    AVX2 kernel on the bf16 cache, or (no compiler) fp32 SDPA on a converted copy."""
    import glmgym.chat.model as glm
    from glmgym.chat.kernels import avx2

    monkeypatch.setattr(glm, "_CPU_NATIVE_BF16", native_bf16)
    if kernel:
        if avx2.load() is None:
            pytest.skip(f"glmgym's kernels do not build here: {avx2.unavailable_reason()}")
        calls = []
        monkeypatch.setattr(glm, "_decode_kernels", lambda: _Counting(avx2, calls))
    else:
        monkeypatch.setattr(glm, "_decode_kernels", lambda: None)
    torch.manual_seed(0)
    cfg = GLMConfig(vocab_size=50, hidden_size=64, num_attention_heads=4, num_layers=2,
                    inner_hidden_size=128, max_sequence_length=64)
    model = GLMModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 9))
    pos = torch.stack([torch.arange(9), torch.zeros(9, dtype=torch.long)])[None].expand(2, -1, -1)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, :2] = True  # the second row is left-padded: its pad keys are masked in every step

    def decode(m, dtype):
        cache = KVCache.empty(cfg, 2, 9, dtype, "cpu")
        with torch.no_grad():
            m(ids[:, :5], pos[..., :5], pad[:, None, None, :5].expand(-1, -1, 5, -1), kv_cache=cache)
            return torch.cat([m(ids[:, t:t + 1], pos[..., t:t + 1], pad[:, None, None, :t + 1],
                                kv_cache=cache, start=t).float() for t in range(5, 9)], 1)

    ref = decode(model, torch.float32)
    out = decode(model.to(torch.bfloat16), torch.bfloat16)
    assert ((out - ref).norm() / ref.norm()).item() < 0.03
    if kernel:
        assert len(calls) == 4 * cfg.num_layers  # every decoding step of every layer


class _Counting:
    """A stand-in for the kernels module that counts `attend_decode` calls."""

    def __init__(self, module, calls: list) -> None:
        self.module, self.calls = module, calls

    def attend_decode(self, *args):
        self.calls.append(args[1].shape)
        return self.module.attend_decode(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_2d_rotary_equals_the_reference_per_half_rotary(dtype):
    # the reference: each half of a head rotates by its own table (positions, block positions),
    # NeoX style: x * cos + cat(-x2, x1) * sin, for q and k apart
    from glmgym.chat.model import RotaryEmbedding, _apply_rotary_2d

    B, T, H, d = 2, 7, 3, 16
    model = GLMModel(GLMConfig(vocab_size=64, hidden_size=H * d, num_layers=1, num_attention_heads=H,
                               inner_hidden_size=32, max_sequence_length=50))
    assert isinstance(model.rotary, RotaryEmbedding)
    g = torch.Generator().manual_seed(0)
    position_ids = torch.randint(0, 50, (B, 2, T), generator=g)
    qk = torch.randn(B, T, H, 2, d, generator=g).to(dtype)
    got = _apply_rotary_2d(qk, *model.rope(position_ids, dtype))

    def rotate(x, p):  # x [B, T, H, 2, d/2], p [B, T]
        cos = model.rotary.cos[p][:, :, None, None].to(dtype)
        sin = model.rotary.sin[p][:, :, None, None].to(dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    first, second = qk.chunk(2, dim=-1)
    expected = torch.cat((rotate(first, position_ids[:, 0]), rotate(second, position_ids[:, 1])), dim=-1)
    assert torch.equal(got, expected)
