import copy
import json
import shutil

import numpy as np
import pytest
import torch

from glmgym.chat import kernel_choice
from glmgym.chat.checkpoint import load_model, quantize_checkpoint, save_model
from glmgym.chat.quantize import (
    QUANTIZED_LINEARS,
    QuantizedLinear,
    QuantSpec,
    dequantize_weight,
    pack_int4,
    quantize_model,
    quantize_weight,
    select_backend,
    unpack_int4,
)
from glmgym.chat.session import load
from glmgym.cli import main
from glmgym.errors import GlmgymError

# Documented accuracy bounds (relative L2 error of a layer's output on N(0, 1) inputs, for
# N(0, 0.02) weights): INT8 per row < 2%, INT4 per row < 25%, INT4 groups of 128 < 15%.
LAYER_BOUNDS = {(8, 0): 0.02, (4, 0): 0.25, (4, 128): 0.15}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(n_out=256, n_in=512, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out)
    torch.nn.init.normal_(lin.weight, 0, 0.02)
    return lin


def _logits(model, ids=(5, 6, 7, 8, 9, 10, 1001, 1004)):
    from glmgym.chat.generate import PromptBatch, prefill
    from glmgym.chat.model import KVCache

    with torch.no_grad():
        return prefill(model, PromptBatch.build([list(ids)], 3),
                       KVCache.empty(model.config, 1, 16, model.dtype, "cpu"))


def test_int4_packing_puts_the_even_column_in_the_high_nibble():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    packed = pack_int4(q)
    # 0x1E = (1 << 4) | (-2 & 0xF); 0x78 = (7 << 4) | (-8 & 0xF), read as signed bytes
    assert packed.view(torch.uint8).tolist() == [[0x1E, 0x78]]
    assert torch.equal(unpack_int4(packed), q)
    u = torch.randint(0, 16, (5, 8), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(u)), u)


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
@pytest.mark.parametrize(("bits", "group_size"), list(LAYER_BOUNDS))
def test_quantized_linear_is_within_its_bound_and_kernels_match_the_fallback(bits, group_size, capability,
                                                                            monkeypatch):
    # PyTorch's kernels (on AVX-512, where they win the timed choice) run on any x86 CPU, so both
    # choices are tested here
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(kernel_choice, "choose", lambda machine, layer, candidates: next(iter(candidates)))
    lin = _linear()
    x = torch.randn(3, 5, 512)
    ref = lin(x)
    fast = QuantizedLinear.from_float(lin, bits, group_size, torch.float32)
    slow = QuantizedLinear.from_float(lin, bits, group_size, torch.float32, kernels=False)
    expected = "avx2" if capability == "AVX2" else ("int8pack" if bits == 8 else "int4pack")
    assert fast.backend == expected
    assert slow.backend == "dequant"
    assert fast(x).shape == ref.shape
    assert _rel(fast(x), ref) < LAYER_BOUNDS[(bits, group_size)]
    # PyTorch's packed kernels compute the stored weights exactly; glmgym's AVX2 kernels on int8
    # activations (per block of 32), which costs well under 1% here
    assert _rel(fast(x), slow(x)) < (1e-2 if expected == "avx2" else 1e-5)
    # bf16 activations run through the kernels too
    assert _rel(QuantizedLinear.from_float(lin, bits, group_size, torch.bfloat16)(x.bfloat16()), ref) < \
        LAYER_BOUNDS[(bits, group_size)] + 0.02


def test_group_wise_int4_is_more_accurate_than_per_row():
    lin = _linear()
    w = lin.weight.detach()
    err = {g: _rel(dequantize_weight(quantize_weight(w, 4, g), 4, g), w) for g in (0, 32, 128, 256)}
    assert err[32] < err[128] < err[0]
    assert err[256] < err[0]


def test_quantized_models_logits_error(tiny):
    model, _ = tiny
    ref = _logits(model)
    errors = {}
    for bits, group in [(8, 0), (4, 128), (4, 0)]:
        q = quantize_model(copy.deepcopy(model), QuantSpec(bits, group))
        assert isinstance(q.transformer.layers[0].attention.query_key_value, QuantizedLinear)
        assert q.config.quantization_bit == bits
        errors[(bits, group)] = _rel(_logits(q), ref)
    assert errors[(8, 0)] < 0.01
    assert errors[(4, 128)] < 0.10
    assert errors[(4, 0)] < 0.15
    assert errors[(8, 0)] < errors[(4, 128)]


def _thudm_int4(w: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """THUDM's scheme, written independently: int8 rounding, then nibble pairs by hand."""
    scale = (w.abs().max(dim=-1).values / 7).half()
    q = torch.round(w / scale[:, None].float()).to(torch.int8).numpy()
    u = q.astype(np.uint8) & 0x0F
    packed = ((u[:, 0::2] << 4) | u[:, 1::2]).astype(np.uint8).view(np.int8)
    return packed, scale


def test_thudm_int4_and_int8_checkpoints_load_and_match_their_dequantized_weights(tiny, tmp_path):
    model, _ = tiny
    state = {k: v.clone().half() for k, v in model.state_dict().items()}
    deq_state = dict(state)
    int8_state = dict(state)
    for i in range(model.config.num_layers):
        for name in QUANTIZED_LINEARS:
            key = f"transformer.layers.{i}.{name}.weight"
            w = state[key].float()
            packed, scale = _thudm_int4(w)
            state[key] = torch.from_numpy(packed)
            state[key + "_scale"] = scale
            q = torch.from_numpy(packed.view(np.uint8))
            hi = (q >> 4).to(torch.int8)
            lo = (q & 0x0F).to(torch.int8)
            nib = torch.stack((hi, lo), -1).flatten(-2)
            nib = torch.where(nib > 7, nib - 16, nib)  # sign of each nibble
            deq_state[key] = nib.float() * scale[:, None].float()
            s8 = (w.abs().max(dim=-1).values / 127).half()
            int8_state[key] = torch.round(w / s8[:, None].float()).to(torch.int8)
            int8_state[key + "_scale"] = s8
    for bits, st in [(4, state), (8, int8_state)]:
        out = tmp_path / f"int{bits}"
        out.mkdir()
        cfg = {**model.config.to_dict(), "quantization_bit": bits, "torch_dtype": "float16"}
        (out / "config.json").write_text(json.dumps(cfg))
        torch.save(st, out / "pytorch_model.bin")
        q = load_model(out, torch.float32)
        layer = q.transformer.layers[1].mlp.dense_4h_to_h
        assert isinstance(layer, QuantizedLinear) and layer.bits == bits and layer.group_size == 0
        eye = torch.eye(layer.in_features)
        w_seen = layer(eye) - layer.bias  # row j of the output is column j of W^T
        key = "transformer.layers.1.mlp.dense_4h_to_h.weight"
        if bits == 4:
            expected = deq_state[key].float()
        else:
            expected = int8_state[key].float() * int8_state[key + "_scale"].float()[:, None]
        torch.testing.assert_close(w_seen.t(), expected, rtol=0, atol=1e-6)
    # the int4 model equals a float model holding the dequantized weights
    float_dir = tmp_path / "deq"
    float_dir.mkdir()
    (float_dir / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(deq_state, float_dir / "pytorch_model.bin")
    torch.testing.assert_close(_logits(load_model(tmp_path / "int4", torch.float32)),
                               _logits(load_model(float_dir, torch.float32)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bf16_checkpoints_on_avx2_decode_with_an_int8_head(bits, tiny, tmp_path, monkeypatch):
    from glmgym.chat.kernels import avx2
    from glmgym.chat.quantize import QuantizedEmbedding

    model, _ = tiny
    src = save_model(model, tmp_path / "src")
    out = quantize_checkpoint(src, tmp_path / f"q{bits}", bits)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    plain = load_model(out, torch.bfloat16)
    assert plain.lm_head.weight is plain.transformer.word_embeddings.weight  # tied bf16, untouched
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    if avx2.load() is None:
        pytest.skip(f"glmgym's kernels do not build here: {avx2.unavailable_reason()}")
    fast = load_model(out, torch.bfloat16)
    head, emb = fast.lm_head, fast.transformer.word_embeddings
    assert isinstance(head, QuantizedLinear) and (head.bits, head.group_size, head.backend) == (8, 32, "avx2")
    assert isinstance(emb, QuantizedEmbedding) and emb.weight is head.weight
    # the same model up to the head's INT8 rounding and the kernels' int8 activations
    assert _rel(_logits(fast), _logits(load_model(out, torch.bfloat16, kernels=False))) < 0.03


def test_quantize_checkpoint_streams_to_a_loadable_checkpoint(tiny, sp_model, tmp_path):
    model, _ = tiny
    src = save_model(model, tmp_path / "src", max_shard_bytes=300_000)
    shutil.copy(sp_model, src / "ice_text.model")
    out = quantize_checkpoint(src, tmp_path / "q4", 4, max_shard_bytes=200_000)
    cfg = json.loads((out / "config.json").read_text())
    recorded = (cfg["quantization_bit"], cfg["quantization_group_size"], cfg["quantization_embeddings"])
    assert recorded == (4, 128, False)
    assert (out / "ice_text.model").is_file()
    assert (out / "model.safetensors.index.json").is_file()  # several shards at this shard size
    assert not list(out.glob("part-*"))
    from_disk = load_model(out, torch.float32)
    in_memory = quantize_model(copy.deepcopy(model), QuantSpec(4, 128))
    torch.testing.assert_close(_logits(from_disk), _logits(in_memory), rtol=1e-5, atol=1e-5)
    # quantize on load gives the same model without writing anything
    torch.testing.assert_close(_logits(load_model(src, torch.float32, quantize=4)), _logits(in_memory),
                               rtol=1e-5, atol=1e-5)
    # int8 with quantized embeddings: the tied lm_head is quantized too
    q8 = load_model(quantize_checkpoint(src, tmp_path / "q8e", 8, embeddings=True), torch.float32)
    assert isinstance(q8.lm_head, QuantizedLinear)
    assert _rel(_logits(q8), _logits(model)) < 0.02
    bot = load(str(tmp_path / "q8e"), dtype="float32")
    assert isinstance(bot.chat("你好", max_new_tokens=4, seed=0)[0], str)


def test_quantize_bad_input(tiny, tmp_path, capsys):
    model, _ = tiny
    src = save_model(model, tmp_path / "src")
    with pytest.raises(GlmgymError, match="4-bit quantization only"):
        QuantSpec(8, 128)
    with pytest.raises(GlmgymError, match="group size must be one of"):
        QuantSpec(4, 100)
    q = quantize_checkpoint(src, tmp_path / "q", 4, group_size=0)
    with pytest.raises(GlmgymError, match="already 4-bit quantized"):
        quantize_checkpoint(q, tmp_path / "qq", 8)
    assert not (tmp_path / "qq").exists()
    with pytest.raises(GlmgymError, match="cannot be loaded as 8-bit"):
        load_model(q, quantize=8)
    with pytest.raises(GlmgymError, match="kernel-specific"):
        save_model(load_model(q), tmp_path / "again")
    # a config that lies about the scheme: per-row tensors read as groups of 32
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_group_size"] = 32
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GlmgymError, match=r"weight_zero is missing|weight_scale has shape"):
        load_model(q)
    # CLI: one line, exit 2, nothing written
    assert main(["chat", "quantize", "--model", str(src), "--bits", "8", "--group-size", "64",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4-bit quantization only" in err
    assert not (tmp_path / "bad").exists()
    assert main(["chat", "quantize", "--model", str(src), "--bits", "8", "--out", str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["quantization_bit"] == 8


def test_chat_loads_random_tiny_quantized():
    bot = load("random:tiny", quantize=4)
    layer = bot.model.transformer.layers[0].mlp.dense_h_to_4h
    # on AVX-512 the choice is timed once and cached: asking again with the layer's dtype reads it back
    assert layer.backend == select_backend(4, 128, 512, 128, dtype=bot.model.dtype)
    response, history = bot.chat("你好", max_new_tokens=4, seed=0)
    assert history[-1] == ("你好", response)


def test_int8_weights_at_unaligned_offsets_are_copied_for_the_kernel():
    """Memory-mapped safetensors put tensors at arbitrary offsets; the int8 kernel crashed on them."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from glmgym.chat.quantize import QuantizedLinear\n"
        "torch.backends.cpu.get_cpu_capability = lambda: 'AVX512'  # PyTorch's int8 kernel on any CPU\n"
        "import glmgym.chat.kernel_choice as kc\n"
        "kc.choose = lambda machine, layer, candidates: 'int8pack'  # as if it won the timing\n"
        "N = K = 1024\n"
        "buf = torch.randint(-127, 127, (N * K + 1,), dtype=torch.int8)\n"
        "t = {'weight': buf[1:].view(N, K), 'weight_scale': torch.rand(N).half()}\n"
        "layer = QuantizedLinear.from_tensors(t, K, None, 8, 0, torch.bfloat16)\n"
        "assert layer.backend == 'int8pack'\n"
        "x = torch.randn(8, K).bfloat16()\n"
        "ref = x.float() @ (t['weight'].float() * t['weight_scale'].float()[:, None]).t()\n"
        "err = ((layer(x).float() - ref).norm() / ref.norm()).item()\n"
        "assert err < 1e-2, err\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-500:])


@pytest.mark.parametrize(("bits", "group_size"), [(8, 0), (4, 0), (4, 128)])
def test_quantizing_in_row_chunks_changes_nothing(monkeypatch, bits, group_size):
    import glmgym.chat.quantize as q

    lin = _linear(n_out=336, n_in=256)  # 336 rows: chunks of 64 leave a last chunk of 16
    whole = QuantizedLinear.from_float(lin, bits, group_size, torch.float32)
    stored = quantize_weight(lin.weight.detach(), bits, group_size)
    monkeypatch.setattr(q, "_ROWS", 64)
    chunked = QuantizedLinear.from_float(lin, bits, group_size, torch.float32)
    for key, value in quantize_weight(lin.weight.detach(), bits, group_size).items():
        assert torch.equal(value, stored[key])
    for name, buf in whole.named_buffers():
        assert torch.equal(buf, dict(chunked.named_buffers())[name]), name


def test_gradients_flow_through_a_frozen_quantized_layer_to_its_input():
    """Fine-tuning on a quantized base: the input gets the gradient of the dequantized product, the
    weight none (it is codes), and the dequantized weight is recomputed, not kept."""
    from glmgym.chat.quantize import QuantizedLinear, dequantize_weight, quantize_weight

    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.02
    t = quantize_weight(w, 4, 32)
    layer = QuantizedLinear.from_tensors(t, 64, torch.zeros(48), 4, 32, torch.float32, kernels=False)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    def graph(fn):  # the autograd node types below `fn`
        return [type(fn).__name__] + [n for f, _ in fn.next_functions if f is not None for n in graph(f)]

    assert any("DequantizedMatmul" in name for name in graph(y.grad_fn))
    (y ** 2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ((x_ref @ dequantize_weight(t, 4, 32).t()) ** 2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    with torch.no_grad():  # inference keeps the plain path
        assert layer(x).grad_fn is None
