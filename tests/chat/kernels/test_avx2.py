"""glmgym's AVX2 kernels against exact references, the backend choice per capability, the fallback."""

import pytest
import torch
import torch.nn.functional as F

from glmgym.chat import kernel_choice
from glmgym.chat.kernels import avx2
from glmgym.chat.quantize import (
    QuantizedLinear,
    dequantize_weight,
    quantize_weight,
    select_backend,
)

# every x86-64 CPU PyTorch dispatches to AVX2 or AVX-512 code has AVX2 (CI's machines all do)
needs_kernels = pytest.mark.skipif(
    not torch.backends.cpu.get_cpu_capability().upper().startswith(("AVX2", "AVX512")),
    reason="the AVX2 kernels need an x86-64 CPU with AVX2")


def _quantized_acts(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """What the kernels compute with: x rounded to int8 per block (scale absmax / 127); the INT8
    kernel uses blocks of 32, the INT4 kernel blocks of 64."""
    M, K = x.shape
    b = x.float().view(M, K // block, block)  # [M, K] -> [M, blocks, block]
    d = b.abs().amax(-1, keepdim=True) / 127
    return (torch.round(b / torch.where(d > 0, d, 1)) * d).view(M, K)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


SHAPES = [(1, 37, 128), (3, 5, 256), (17, 64, 384), (2, 1, 512), (4, 9, 320)]  # (M, N, K), odd ones too
CASES = [(bits, g, *shape) for bits, g in [(4, 64), (4, 128), (4, 0), (8, 0), (8, 32)]
         for shape in SHAPES if not g or shape[2] % g == 0]


@needs_kernels
@pytest.mark.parametrize(("bits", "group_size", "M", "N", "K"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_kernels_compute_the_stored_weights_on_int8_activations(bits, group_size, M, N, K, dtype):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    w = torch.randn(N, K, generator=g) * 0.02
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    t = quantize_weight(w, bits, group_size)
    if not (bits == 8 and group_size):  # INT8 groups exist for the AVX2 lm_head only
        layer = QuantizedLinear.from_tensors(t, K, None, bits, group_size, dtype)
        # on AVX-512 the choice is timed and cached: asked again with the same dtype, it is read back
        assert layer.backend == select_backend(bits, K, N, group_size, dtype=dtype)
    from glmgym.chat.quantize import _avx2_tensors

    avx2 = QuantizedLinear(K, N, bits, group_size, "avx2", _avx2_tensors(t, bits, group_size), None)
    y = avx2(x)
    assert y.shape == (M, N) and y.dtype == dtype
    # exact up to float summation order against the dequantized weights on quantized activations
    exact = _quantized_acts(x, 64 if bits == 4 else 32) @ dequantize_weight(t, bits, group_size).t()
    assert _rel(y, exact) < (1e-5 if dtype == torch.float32 else 1e-2)
    # and close to the float activations (activation rounding only)
    ref = x.float() @ dequantize_weight(t, bits, group_size).t()
    assert _rel(y, ref) < 2e-2


@needs_kernels
def test_int8_kernel_handles_the_full_code_range():
    """-128 cannot come out of glmgym's quantizer but can be in a file; the sign trick must hold."""
    N, K = 8, 64
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    w[0, :32] = -128
    scale = torch.rand(N) + 0.5
    x = torch.randn(3, K)
    tiles = avx2.tile_q8(w, scale)
    y = avx2.q8_matmul(x, tiles["weight"], tiles["scale"], N)
    exact = _quantized_acts(x) @ (w.float() * scale[:, None]).t()
    assert _rel(y, exact) < 1e-5
    blocks = scale[:, None].expand(N, K // 32).contiguous()  # the lm_head's layout: rows, a scale per 32
    assert _rel(avx2.q8_matmul(x, w, blocks), exact) < 1e-5


@pytest.fixture
def kernels_env(monkeypatch):
    """Switch between the AVX-512 VNNI and the AVX2 products (`GLMGYM_KERNELS`), as a load would."""
    def use(name: str) -> None:
        monkeypatch.setenv("GLMGYM_KERNELS", name)
        avx2.vnni.cache_clear()
    yield use
    monkeypatch.delenv("GLMGYM_KERNELS", raising=False)
    avx2.vnni.cache_clear()


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize(("bits", "group_size", "N", "K"), [
    (4, 64, 5, 192), (4, 128, 37, 384), (4, 0, 9, 320), (8, 0, 5, 96), (8, 0, 37, 4096),
    (8, 32, 12, 128), (8, 32, 5, 64)])  # INT8 in rows with block scales: the lm_head
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vnni_products_equal_the_avx2_products(bits, group_size, N, K, M, dtype, kernels_env):
    """Same layouts, same int8 activations, same integer sums: the two agree for every row count (the
    VNNI products take activation rows four at a time, then the rest), odd tile counts included."""
    kernels_env("")
    if avx2.vnni() is None:
        pytest.skip("this CPU has no AVX-512 VNNI (or it is told to act as AVX2)")
    g = torch.Generator().manual_seed(M * 100 + N)
    t = quantize_weight(torch.randn(N, K, generator=g) * 0.02, bits, group_size)
    from glmgym.chat.quantize import _avx2_tensors

    layer = QuantizedLinear(K, N, bits, group_size, "avx2", _avx2_tensors(t, bits, group_size), None)
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    x[0, -(64 if K >= 128 else 32):] = 0  # an all-zero activation block (scale 0), not the whole row
    y_vnni = layer.matmul(x)
    kernels_env("avx2")
    assert avx2.vnni() is None
    y_avx2 = layer.matmul(x)
    assert y_vnni.shape == (M, N)
    assert _rel(y_vnni, y_avx2) < 1e-6
    exact = _quantized_acts(x, 64 if bits == 4 else 32) @ dequantize_weight(t, bits, group_size).t()
    assert _rel(y_vnni, exact) < (1e-5 if dtype == torch.float32 else 1e-2)


@needs_kernels
def test_vnni_int8_product_holds_the_full_code_range(kernels_env):
    kernels_env("")
    if avx2.vnni() is None:
        pytest.skip("this CPU has no AVX-512 VNNI (or it is told to act as AVX2)")
    N, K = 8, 128
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    w[1, :] = -128  # |w| = 128 does not fit a signed byte: the sign must move onto x
    w[2, :] = 127
    scale = torch.rand(N) + 0.5
    x = torch.randn(6, K)
    tiles = avx2.tile_q8(w, scale)
    exact = _quantized_acts(x) @ (w.float() * scale[:, None]).t()
    assert _rel(avx2.q8_matmul(x, tiles["weight"], tiles["scale"], N), exact) < 1e-5


def test_vnni_products_are_off_where_the_cpu_acts_as_avx2(kernels_env, monkeypatch):
    kernels_env("avx2")
    assert avx2.vnni() is None  # asked to keep the AVX2 products
    kernels_env("")
    monkeypatch.setattr(avx2, "cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    avx2.vnni.cache_clear()
    assert avx2.vnni() is None


@needs_kernels
def test_a_compiler_without_avx512_flags_keeps_the_avx2_products(kernels_env, monkeypatch, tmp_path):
    kernels_env("")
    monkeypatch.setattr(avx2, "_FLAGS_VNNI", [*avx2._FLAGS, "-mno-such-flag"])
    monkeypatch.setenv("GLMGYM_CACHE", str(tmp_path))
    avx2.vnni.cache_clear()
    assert avx2.vnni() is None
    assert not list(tmp_path.rglob("lowbit_avx512*"))  # no half-built file left behind
    t = quantize_weight(torch.randn(8, 128) * 0.02, 4, 64)
    tiles = avx2.tile_q4(t["weight"], t["weight_scale"].float(), t["weight_zero"].float())
    x = torch.randn(3, 128)
    y = avx2.q4_matmul(x, tiles["weight"], tiles["scale"], tiles["zero"], 8, 64)
    assert _rel(y, _quantized_acts(x, 64) @ dequantize_weight(t, 4, 64).t()) < 1e-5


@pytest.mark.parametrize("N", [1, 4, 5, 4098])
def test_int8_tiles_interleave_four_rows_block_by_block(N):
    K = 96
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    t = avx2.tile_q8(w, torch.arange(N) + 1.0)
    T = -(-N // avx2.TILE_ROWS)
    assert t["weight"].shape == (T, K // 32, avx2.TILE_ROWS, 32) and t["scale"].shape == (T * avx2.TILE_ROWS,)
    n = N - 1
    assert torch.equal(t["weight"][n // 4, 2, n % 4], w[n, 64:96])  # row n's third block
    assert t["scale"][n] == N and (t["scale"][N:] == 0).all()
    rows = t["weight"].transpose(1, 2).reshape(T * avx2.TILE_ROWS, K)  # back to rows
    assert torch.equal(rows[:N], w) and (rows[N:] == 0).all()


@needs_kernels
def test_int8_kernel_refuses_groups_other_than_rows_and_blocks_of_32():
    w = torch.zeros(4, 128, dtype=torch.int8)
    with pytest.raises(ValueError, match="K/32"):
        avx2.q8_matmul(torch.randn(1, 128), w, torch.ones(4, 2))  # groups of 64


@needs_kernels
@pytest.mark.parametrize(("B", "H", "S", "d", "slots"), [(1, 32, 140, 128, 200), (3, 4, 17, 64, 17),
                                                         (2, 3, 1, 8, 5), (2, 2, 1029, 24, 1100)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_fp32_sdpa_on_a_bf16_cache_slice(B, H, S, d, slots, masked):
    g = torch.Generator().manual_seed(B * 100 + S)
    k_cache, v_cache = (torch.randn(B, H, slots, d, generator=g).bfloat16() for _ in range(2))
    k, v = k_cache[:, :, :S], v_cache[:, :, :S]  # the cache's first S slots, as the model reads them
    q = torch.randn(B, H, 1, d, generator=g).bfloat16()
    allowed = None
    if masked:
        allowed = torch.rand(B, 1, 1, S, generator=g) > 0.4
        allowed[..., -1] = True  # the token itself is always visible
    y = avx2.attend_decode(q, k, v, allowed)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed)
    assert y.shape == (B, H, 1, d) and y.dtype == torch.bfloat16
    assert _rel(y, ref) < 1e-2  # bf16 output rounding
    assert _rel(avx2.attend_decode(q.float(), k, v, allowed).float(), ref) < 1e-6


@needs_kernels
@pytest.mark.parametrize(("B", "H", "S", "d"), [(1, 32, 140, 128), (2, 3, 9, 24), (1, 2, 1, 8)])
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float32])
def test_decode_attention_reads_queries_in_place_where_the_rotary_leaves_them(B, H, S, d, qdtype):
    """Queries strided as the rotary leaves them ([B, 1, heads, 2, d] unbound, then transposed) are
    read without a copy, and a bf16 query gets its result rounded once, as a cast of fp32 is."""
    g = torch.Generator().manual_seed(S * d + H)
    k, v = (torch.randn(B, H, S + 3, d, generator=g).bfloat16()[:, :, :S] for _ in range(2))
    q = torch.randn(B, 1, H, 2, d, generator=g).to(qdtype).unbind(3)[0].transpose(1, 2)  # [B, H, 1, d]
    assert not q.is_contiguous()
    allowed = torch.rand(B, 1, 1, S, generator=g) > 0.3
    allowed[..., -1] = True
    for mask in (None, allowed):
        y = avx2.attend_decode(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        assert y.shape == (B, H, 1, d) and y.dtype == qdtype
        assert _rel(y.float(), ref) < (1e-2 if qdtype == torch.bfloat16 else 1e-6)
        if qdtype == torch.bfloat16:
            assert torch.equal(y, avx2.attend_decode(q.float(), k, v, mask).to(torch.bfloat16))
    with pytest.raises(ValueError, match="do not fit"):
        avx2.attend_decode(torch.zeros(B, H, 1, d + 8).bfloat16(), k, v)


@needs_kernels
def test_decode_attention_keeps_sharp_softmaxes_exact():
    """Scores far apart (exp underflows to 0 for all but one key) and a masked-out maximum."""
    H, S, d = 2, 40, 16
    k = torch.randn(1, H, S, d).bfloat16()
    v = torch.randn(1, H, S, d).bfloat16()
    q = (k[:, :, 7:8].float() * 200).bfloat16()  # key 7 dominates by hundreds
    allowed = torch.ones(1, 1, 1, S, dtype=torch.bool)
    allowed[..., 7] = False
    for mask in (None, allowed):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        assert _rel(avx2.attend_decode(q.float(), k, v, mask), ref) < 1e-5
    with pytest.raises(ValueError, match="bf16"):
        avx2.attend_decode(q, k.float(), v.float())


@needs_kernels
def test_bf16_matmul_matches_float():
    w = torch.randn(50, 72).bfloat16()
    x = torch.randn(2, 72)
    assert _rel(avx2.bf16_matmul(x, w), x @ w.float().t()) < 1e-5


@pytest.mark.parametrize(("capability", "bits", "expected"), [
    ("AVX512", 4, "timed: int4pack, avx2"), ("AVX512", 8, "timed: int8pack, avx2"),
    ("AVX512_BF16", 4, "timed: int4pack, avx2"),
    ("DEFAULT", 4, "int4pack"), ("DEFAULT", 8, "int8pack"),  # no AVX2: PyTorch's generic kernels
    ("AVX2", 4, "avx2"), ("AVX2", 8, "avx2"),
])
def test_backend_choice_per_cpu_capability(capability, bits, expected, monkeypatch):
    monkeypatch.setattr(avx2, "load", lambda: object())  # as if built
    monkeypatch.setattr(avx2, "vnni", lambda: None)
    # AVX-512: the faster of both, timed (tests/chat/test_kernel_choice.py times them for real)
    monkeypatch.setattr(kernel_choice, "choose",
                        lambda machine, layer, candidates: "timed: " + ", ".join(candidates))
    group = 128 if bits == 4 else 0
    assert select_backend(bits, 4096, 4096, group, "cpu", capability) == expected


def test_backend_choice_on_cuda_and_for_shapes_the_kernels_refuse(monkeypatch):
    monkeypatch.setattr(avx2, "load", lambda: object())
    assert select_backend(4, 4096, 12288, 128, "cuda") == "cuda_int4pack"
    assert select_backend(4, 4096, 12288, 0, "cuda") == "cuda_int4pack"  # per row as kernel groups
    assert select_backend(4, 4100, 12288, 0, "cuda") == "dequant"  # K not in tiles of 128
    assert select_backend(8, 4096, 4096, 0, "cuda") == "cuda_int8pack"
    assert select_backend(4, 4096, 12288, 128, "meta") == "dequant"
    assert select_backend(8, 100, 64, 0, "cpu", "AVX2") == "int8pack"  # K not in blocks of 32
    assert select_backend(4, 100, 24, 0, "cpu", "AVX2") == "dequant"  # neither kernel fits
    assert select_backend(4, 512, 64, 32, "cpu", "AVX2") == "int4pack"  # groups below a 64-column chunk
    assert select_backend(4, 96, 64, 0, "cpu", "AVX2") == "int4pack"  # K not in chunks of 64


def test_without_a_compiler_avx2_falls_back_to_torch_kernels_with_one_warning(monkeypatch, tmp_path, capsys):
    import glmgym.chat.quantize as q

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("GLMGYM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(q, "_warned", set())
    avx2.load.cache_clear()
    try:
        assert avx2.load() is None
        assert "could not build" in avx2.unavailable_reason()
        assert select_backend(4, 256, 32, 128, "cpu", "AVX2") == "int4pack"
        assert select_backend(8, 256, 32, 0, "cpu", "AVX2") == "int8pack"
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all("2x slower" in line and "could not build" in line for line in err)
        assert not list((tmp_path / "cache").rglob("*.so*"))  # no half-built file left behind
        # the layer still works, on PyTorch's kernel
        w = torch.randn(32, 256) * 0.02
        t = quantize_weight(w, 4, 128)
        layer = QuantizedLinear.from_tensors(t, 256, None, 4, 128, torch.float32)
        x = torch.randn(2, 256)
        assert _rel(layer(x), x @ dequantize_weight(t, 4, 128).t()) < 1e-5
    finally:
        avx2.load.cache_clear()


@needs_kernels
def test_kernels_build_into_the_cache_once(monkeypatch, tmp_path):
    monkeypatch.setenv("GLMGYM_CACHE", str(tmp_path))
    avx2.load.cache_clear()
    try:
        assert avx2.load() is not None
        built = list((tmp_path / "kernels").glob("lowbit_avx2-*.so"))
        assert len(built) == 1
        mtime = built[0].stat().st_mtime_ns
        avx2.load.cache_clear()
        assert avx2.load() is not None
        assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    finally:
        avx2.load.cache_clear()


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_bf16_lm_head_uses_the_kernel_on_x86_vector_cpus_and_stays_tied(monkeypatch, capability):
    from glmgym.chat.config import PRESETS
    from glmgym.chat.model import GLMModel
    from glmgym.chat.quantize import Bf16DecodeLinear, use_decode_kernels

    model = GLMModel(PRESETS["tiny"]).to(torch.bfloat16).eval()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert type(use_decode_kernels(model, quantized=False).lm_head) is torch.nn.Linear
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    x = torch.randn(1, 3, 128).bfloat16()
    ref = model.lm_head(x)
    head = use_decode_kernels(model, quantized=False).lm_head
    if avx2.load() is None:  # no compiler: the plain Linear stays, silently
        assert type(head) is torch.nn.Linear
        return
    assert isinstance(head, Bf16DecodeLinear)
    assert head.weight is model.transformer.word_embeddings.weight
    assert "lm_head.weight" in model.state_dict()
    assert _rel(head(x), ref) < 1e-2
    many = torch.randn(2, 40, 128).bfloat16()  # more rows than the kernel takes: F.linear
    assert torch.equal(head(many), torch.nn.functional.linear(many, head.weight))


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_quantized_models_share_one_int8_copy_for_embeddings_and_lm_head_on_x86(monkeypatch, capability):
    from glmgym.chat.config import PRESETS
    from glmgym.chat.model import GLMModel
    from glmgym.chat.quantize import INT8_HEAD_GROUP, QuantizedEmbedding, use_decode_kernels

    model = GLMModel(PRESETS["tiny"]).to(torch.bfloat16).eval()
    model.lm_head.weight = model.transformer.word_embeddings.weight  # tied, as load_model leaves it
    w = model.lm_head.weight.detach().float()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    tied = model.transformer.word_embeddings.weight
    assert use_decode_kernels(model, quantized=True).lm_head.weight is tied
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if avx2.load() is None:  # no compiler: the float head stays, silently
        assert type(use_decode_kernels(model, quantized=True).lm_head) is torch.nn.Linear
        return
    use_decode_kernels(model, quantized=True)
    head, emb = model.lm_head, model.transformer.word_embeddings
    assert isinstance(head, QuantizedLinear) and isinstance(emb, QuantizedEmbedding)
    assert head.weight is emb.weight and head.weight.dtype == torch.int8  # one copy for both
    assert head.scale.shape == (w.shape[0], w.shape[1] // INT8_HEAD_GROUP)
    ids = torch.tensor([[0, 5, w.shape[0] - 1]])
    looked_up = emb(ids)
    assert looked_up.dtype == torch.bfloat16 and looked_up.shape == (1, 3, w.shape[1])
    assert _rel(looked_up[0], w[ids[0]]) < 1e-2  # INT8 in groups of 32: well under 1% of error
    x = torch.randn(2, 3, w.shape[1]).bfloat16()
    y = head(x)
    assert y.shape == (2, 3, w.shape[0]) and _rel(y, x.float() @ w.t()) < 2e-2


def test_an_untied_or_float_lm_head_keeps_its_weights(monkeypatch):
    from glmgym.chat.config import PRESETS
    from glmgym.chat.model import GLMModel
    from glmgym.chat.quantize import use_decode_kernels

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    model = GLMModel(PRESETS["tiny"]).eval()  # fp32: asked for by name, the float head stays
    use_decode_kernels(model, quantized=True)
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.transformer.word_embeddings) is torch.nn.Embedding
    model = GLMModel(PRESETS["tiny"]).to(torch.bfloat16).eval()
    untied = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.lm_head.weight = untied
    use_decode_kernels(model, quantized=True)
    assert type(model.transformer.word_embeddings) is torch.nn.Embedding
    if avx2.load() is not None:
        assert model.lm_head.weight is untied  # Bf16DecodeLinear on the head's own weight


@needs_kernels
@pytest.mark.parametrize(("M", "N"), [(1, 16384), (1, 13), (3, 100), (2, 8), (5, 4099)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_epilogue_adds_the_bias_applies_gelu_and_casts_in_one_pass(M, N, gelu, with_bias):
    g = torch.Generator().manual_seed(M * N)
    y = torch.randn(M, N, generator=g) * 4
    y[0, : min(N, 6)] = torch.tensor([0.0, -0.0, 30.0, -30.0, 1e-30, -200.0])[: min(N, 6)]
    bias = torch.randn(N, generator=g) if with_bias else None
    ref = y if bias is None else y + bias
    ref = F.gelu(ref, approximate="tanh") if gelu else ref
    fp32 = avx2.epilogue(y.clone(), bias, gelu, torch.float32)
    assert fp32.dtype == torch.float32 and fp32.shape == (M, N)
    torch.testing.assert_close(fp32, ref, rtol=2e-6, atol=1e-6)
    bf16 = avx2.epilogue(y.clone(), bias, gelu, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    if not gelu:  # a plain sum rounds exactly as PyTorch's cast does
        assert torch.equal(bf16, ref.to(torch.bfloat16))
    else:
        # within one bf16 step of the cast of PyTorch's GELU (values near a rounding tie), or 1e-6
        # where PyTorch's 1 + tanh(u) cancels to 0 for x below about -5 and the sigmoid form keeps
        # the tiny true value
        ulp = (ref.abs() * 2.0**-7).clamp(min=1e-6)
        assert bool(((bf16.float() - ref.to(torch.bfloat16).float()).abs() <= ulp).all())
        # (below about -3 PyTorch's cancellation costs it more than a bf16 step: compare above)
        accurate = (y if bias is None else y + bias) > -3
        assert (bf16 == ref.to(torch.bfloat16))[accurate].float().mean() > 0.99
    nan = avx2.epilogue(torch.full((1, 9), float("nan")), None, gelu, torch.bfloat16)
    assert bool(nan.isnan().all())
    if bias is not None:  # a bf16 bias (a bf16 model's own) is read as its exact fp32 value
        b16 = bias.bfloat16()
        assert torch.equal(avx2.epilogue(y.clone(), b16, gelu, torch.bfloat16),
                           avx2.epilogue(y.clone(), b16.float(), gelu, torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_layer_with_bias_and_fused_gelu_follows_the_unfused_ops(dtype):
    from glmgym.chat.quantize import _avx2_tensors

    g = torch.Generator().manual_seed(0)
    K, N = 256, 300
    t = quantize_weight(torch.randn(N, K, generator=g) * 0.02, 4, 64)
    bias = (torch.randn(N, generator=g) * 0.1).to(dtype)
    layer = QuantizedLinear(K, N, 4, 64, "avx2", _avx2_tensors(t, 4, 64), bias)
    x = (torch.randn(2, 3, K, generator=g)).to(dtype)
    product = avx2.q4_matmul(x.reshape(-1, K), layer.weight, layer.scale, layer.zero, N, 64).view(2, 3, N)
    y = layer(x)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-3}
    torch.testing.assert_close(y.float(), product + bias.float(), **tol)
    gelu = F.gelu(product + bias.float(), approximate="tanh")
    torch.testing.assert_close(layer.forward_gelu(x).float(), gelu, **tol)


@pytest.mark.parametrize("shape", [(3, 5), (1024, 1024), (700, 3001)])  # under and over 2 MiB
def test_hugepage_copy_is_a_contiguous_equal_copy(shape):
    x = torch.randint(-128, 128, shape, dtype=torch.int8).t()  # not contiguous
    y = avx2.hugepage_copy(x)
    assert y.is_contiguous() and y.dtype == x.dtype and torch.equal(y, x)
    assert y.data_ptr() != x.data_ptr()
    f = torch.randn(shape)
    assert torch.equal(avx2.hugepage_copy(f), f)


def test_every_kernel_source_ships_in_the_package():
    """An installed (non-editable) glmgym builds the kernels from the files its wheel carries: each
    C source and header beside `kernels/avx2.py` must match the package data of pyproject.toml."""
    import fnmatch
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    # the package-data line itself (tomllib is 3.11+, glmgym supports 3.10)
    line = re.search(r'^"glmgym\.chat\.kernels" = (\[.*\])$', (root / "pyproject.toml").read_text(), re.M)
    assert line, "pyproject.toml has no package data for glmgym.chat.kernels"
    globs = json.loads(line.group(1))
    sources = [p for p in avx2._SOURCE.parent.iterdir() if p.suffix in (".c", ".h")]
    assert {avx2._SOURCE, avx2._SOURCE_VNNI, avx2._HEADER} <= set(sources)
    for path in sources:
        assert any(fnmatch.fnmatch(path.name, g) for g in globs), f"{path.name} is not in the package data"
