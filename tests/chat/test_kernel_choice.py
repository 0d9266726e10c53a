"""The timed kernel choice of AVX-512 CPUs: the faster candidate wins, the choice is cached per
machine and layer, a broken cache costs only a new timing, and the chosen layer computes the same."""

import json

import pytest
import torch

import glmgym.chat.quantize as q
from glmgym.chat import kernel_choice
from glmgym.chat.kernels import avx2
from glmgym.chat.quantize import QuantizedLinear, dequantize_weight, quantize_weight


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "kernel_choice.json"  # in a folder that does not exist yet
    monkeypatch.setattr(kernel_choice, "cache_path", lambda: path)
    return path


def _scripted(costs: dict[str, float]):
    """Candidates whose calls advance a fake clock by their cost; and that clock."""
    now = [0.0]
    built = []

    def builder(name):
        def build():
            built.append(name)

            def call():
                now[0] += costs[name]
            return call
        return build
    return {name: builder(name) for name in costs}, (lambda: now[0]), built


def test_the_faster_candidate_is_chosen_and_remembered(cache):
    candidates, clock, built = _scripted({"int8pack": 3.0, "avx2": 1.0})
    assert kernel_choice.choose("cpu A", "int8 4096x4096 g0 bfloat16", candidates, clock) == "avx2"
    assert json.loads(cache.read_text()) == {"cpu A": {"int8 4096x4096 g0 bfloat16": {
        "choice": "avx2", "us_per_call": {"int8pack": 3e6, "avx2": 1e6}}}}
    assert built == ["int8pack", "avx2"]

    # a later load reads the choice back: nothing is built or timed
    candidates, clock, built = _scripted({"int8pack": 1.0, "avx2": 3.0})
    assert kernel_choice.choose("cpu A", "int8 4096x4096 g0 bfloat16", candidates, clock) == "avx2"
    assert built == []
    # another layer, or another machine, is timed on its own and kept beside the first
    assert kernel_choice.choose("cpu A", "int4 4096x4096 g128 bfloat16", candidates, clock) == "int8pack"
    assert kernel_choice.choose("cpu B", "int8 4096x4096 g0 bfloat16", candidates, clock) == "int8pack"
    choices = {machine: {layer: entry["choice"] for layer, entry in layers.items()}
               for machine, layers in json.loads(cache.read_text()).items()}
    assert choices == {
        "cpu A": {"int8 4096x4096 g0 bfloat16": "avx2", "int4 4096x4096 g128 bfloat16": "int8pack"},
        "cpu B": {"int8 4096x4096 g0 bfloat16": "int8pack"}}


def test_a_slow_round_does_not_decide(cache):
    """Rounds slowed by work beside the load (here one of a's, 50x) do not flip the choice."""
    now = [0.0]
    calls = {"a": 0}

    def a():
        calls["a"] += 1
        now[0] += 50.0 if calls["a"] == 5 else 1.0  # one spike in a's rounds

    def b():
        now[0] += 1.5
    winner = kernel_choice.choose("m", "layer", {"a": lambda: a, "b": lambda: b}, lambda: now[0])
    assert winner == "a"


def test_a_broken_or_stale_cache_is_timed_again_and_rewritten(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    candidates, clock, built = _scripted({"int4pack": 2.0, "avx2": 1.0})
    assert kernel_choice.choose("m", "layer", candidates, clock) == "avx2"
    assert json.loads(cache.read_text())["m"]["layer"]["choice"] == "avx2"
    # a machine's entry of the wrong kind is replaced
    cache.write_text(json.dumps({"m": ["not", "a", "dict"]}))
    assert kernel_choice.choose("m", "layer", candidates, clock) == "avx2"
    assert json.loads(cache.read_text())["m"]["layer"]["choice"] == "avx2"
    # a cached name that is no longer a candidate (another torch build, say) is timed again
    cache.write_text(json.dumps({"m": {"layer": {"choice": "gone"}}}))
    candidates, clock, built = _scripted({"int4pack": 1.0, "avx2": 2.0})
    assert kernel_choice.choose("m", "layer", candidates, clock) == "int4pack"
    assert built == ["int4pack", "avx2"]
    assert not [p for p in cache.parent.iterdir() if p.name != cache.name]  # no temp file left


def test_the_machine_key_names_the_cpu_torch_kernels_and_threads(monkeypatch):
    key = kernel_choice.machine_key("AVX512")
    assert "AVX512" in key and torch.__version__ in key and f"{torch.get_num_threads()} threads" in key
    assert avx2.source_digest() in key
    monkeypatch.setattr(avx2, "source_digest", lambda: "edited")  # a changed kernel is timed again
    assert kernel_choice.machine_key("AVX512") != key


needs_kernels = pytest.mark.skipif(
    not torch.backends.cpu.get_cpu_capability().upper().startswith(("AVX2", "AVX512")) or avx2.load() is None,
    reason="glmgym's AVX2 kernels need an x86-64 CPU with AVX2 and a C compiler")


@needs_kernels
@pytest.mark.parametrize(("bits", "group_size"), [(8, 0), (4, 128), (4, 0)])
def test_on_an_avx512_cpu_layers_time_both_kernels_and_compute_the_same(bits, group_size, cache,
                                                                        monkeypatch):
    """Both kernels run on this CPU (PyTorch's on its generic path where AVX-512 is missing), so the
    choice is timed for real; whichever wins, the layer computes the stored weights."""
    monkeypatch.setattr(q, "cpu_capability", lambda: "AVX512")
    K, N = 256, 48
    g = torch.Generator().manual_seed(bits + group_size)
    w = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(3, K, generator=g).bfloat16()
    t = quantize_weight(w, bits, group_size)
    ref = x.float() @ dequantize_weight(t, bits, group_size).t()
    torch_kernel = "int8pack" if bits == 8 else "int4pack"
    layer = QuantizedLinear.from_tensors(t, K, None, bits, group_size, torch.bfloat16)
    assert layer.backend in (torch_kernel, "avx2")
    (machine, choices), = json.loads(cache.read_text()).items()
    assert "AVX512" in machine and list(choices) == [f"int{bits} {K}x{N} g{group_size} bfloat16"]
    assert choices[f"int{bits} {K}x{N} g{group_size} bfloat16"]["choice"] == layer.backend
    # each possible outcome computes the layer (activations rounded to int8 by glmgym's kernels)
    for forced in (torch_kernel, "avx2"):
        monkeypatch.setattr(kernel_choice, "choose", lambda machine, name, candidates, f=forced: f)
        chosen = QuantizedLinear.from_tensors(t, K, None, bits, group_size, torch.bfloat16)
        assert chosen.backend == forced
        y = chosen(x)
        assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2, forced


def test_timings_stream_the_weights_from_memory_as_decoding_does(monkeypatch):
    """A layer that fits the cache is timed over copies that together do not."""
    monkeypatch.setattr(kernel_choice, "last_level_cache_bytes", lambda: 32 * 2**20)
    assert kernel_choice.copies_to_stream(8 * 2**20) == 8  # 64 MiB in all
    assert kernel_choice.copies_to_stream(64 * 2**20) == 1
    assert kernel_choice.copies_to_stream(1000) == 64  # capped


def test_the_last_level_cache_is_read_or_assumed():
    size = kernel_choice.last_level_cache_bytes()
    assert 2**20 <= size <= 2**31


@needs_kernels
def test_a_cached_choice_builds_and_times_nothing(cache, monkeypatch):
    """Every layer of a model asks again; only the first of each shape may pay for the timing."""
    built = []
    real = q._backend_tensors
    monkeypatch.setattr(q, "_backend_tensors", lambda *a, **k: built.append(a[1]) or real(*a, **k))
    monkeypatch.setattr(torch, "randint", lambda *a, **k: built.append("codes") or torch.zeros(
        a[2], dtype=k.get("dtype")))
    first = q.select_backend(8, 256, 48, 0, "cpu", "AVX512")
    assert "codes" in built and {"int8pack", "avx2"} <= set(built)
    built.clear()
    assert q.select_backend(8, 256, 48, 0, "cpu", "AVX512") == first
    assert built == []
