"""CUDA paths of both pillars: run with `pytest -m cuda` on a GPU machine (benchmarks/gpu_check.sh).

The default test run deselects them (pyproject's addopts); without a GPU they skip.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (4, 32), (4, 0), (8, 0)])
@pytest.mark.parametrize(("M", "N", "K"), [(1, 256, 512), (5, 96, 1024), (64, 4096, 4096)])
def test_quantized_layers_use_a_cuda_kernel_that_computes_the_stored_weights(bits, group_size, M, N, K):
    from glmgym.chat.quantize import QuantizedLinear, dequantize_weight, quantize_weight, select_backend

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    t = quantize_weight(w, bits, group_size)
    layer = QuantizedLinear.from_tensors(t, K, None, bits, group_size, torch.bfloat16, "cuda")
    expected = select_backend(bits, K, N, group_size, "cuda")
    # the load-time check may refuse a kernel this GPU or torch build lacks: then it dequantizes
    assert layer.backend in (expected, "dequant")
    if torch.cuda.get_device_capability() >= (8, 0) and bits == 4:
        assert layer.backend == "cuda_int4pack"  # tinygemm runs on Ampere and newer
    ref = x.float() @ dequantize_weight(t, bits, group_size).t()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert _rel(y, ref) < 1e-2  # bf16 activations and output


def test_quantized_model_generates_on_cuda():
    from glmgym.chat.session import load

    bot = load("random:tiny", quantize=4, device="cuda")
    assert bot.model.lm_head.weight.device.type == "cuda"
    response, history = bot.chat("你好", max_new_tokens=4, seed=0)
    assert history[-1] == ("你好", response)


def test_decision_transformer_trains_with_bf16_autocast_on_cuda(hopper_file, tmp_path):
    import json

    from glmgym.agents import TrainConfig, train

    run = train(TrainConfig(dataset="d4rl:hopper-medium-v2", steps=6, hidden_size=32, n_layer=2,
                            context_len=5, batch_size=8, warmup_steps=2, eval_episodes=0,
                            progress=False, log_every=2, out=str(tmp_path / "run"), device="cuda"))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in records)
    # auto precision picks bf16 autocast on a GPU with native bf16
    from glmgym.devices import native_bf16

    assert native_bf16(torch.device("cuda")) == torch.cuda.is_bf16_supported(including_emulation=False)
