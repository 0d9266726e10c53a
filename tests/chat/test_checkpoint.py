import json
import os

import pytest
import torch

from glmgym.chat.checkpoint import load_model, resolve_model_dir, save_model
from glmgym.chat.session import load
from glmgym.errors import GlmgymError


def _logits(model, tok):
    from glmgym.chat.generate import PromptBatch, prefill
    from glmgym.chat.model import KVCache

    with torch.no_grad():
        batch = PromptBatch.build([tok.encode("hello 你好")], tok.pad_id)
        return prefill(model, batch, KVCache.empty(model.config, 1, 32, torch.float32, "cpu"))


@pytest.mark.parametrize("safetensors", [True, False])
def test_sharded_checkpoint_round_trip(tiny, sp_model, tmp_path, safetensors):
    model, tok = tiny
    out = save_model(model, tmp_path / "ckpt", safetensors=safetensors, max_shard_bytes=200_000)
    files = sorted(p.name for p in out.iterdir())
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    assert index in files
    shards = [f for f in files if f.endswith(".safetensors" if safetensors else ".bin")]
    assert len(shards) > 2 and shards[0].endswith(f"-00001-of-{len(shards):05d}." + shards[0].split(".")[-1])
    weight_map = json.loads((out / index).read_text())["weight_map"]
    assert "transformer.layers.0.attention.query_key_value.weight" in weight_map
    assert "lm_head.weight" in weight_map  # stored, like THUDM's files
    loaded = load_model(out, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight  # tied again
    assert torch.allclose(_logits(loaded, tok), _logits(model, tok), atol=1e-6)
    # the Python API on the same directory, with a tokenizer next to the weights
    (out / "ice_text.model").write_bytes(sp_model.read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 0}))
    bot = load(str(out), dtype="bfloat16")
    assert next(bot.model.parameters()).dtype == torch.bfloat16
    assert isinstance(bot.chat("hi", max_new_tokens=3, seed=0)[0], str)


def test_single_file_checkpoints_load(tiny, tmp_path):
    model, tok = tiny
    for safetensors in (True, False):
        out = save_model(model, tmp_path / f"single-{safetensors}", safetensors=safetensors)
        assert len([p for p in out.iterdir() if p.suffix in (".safetensors", ".bin")]) == 1
        assert torch.allclose(_logits(load_model(out, torch.float32), tok), _logits(model, tok), atol=1e-6)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bin_with_pickled_code_is_refused(tiny, tmp_path):
    model, _ = tiny
    out = save_model(model, tmp_path / "evil", safetensors=False)
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    state["extra"] = _Payload()
    torch.save(state, out / "pytorch_model.bin")
    with pytest.raises(GlmgymError, match="refusing to load"):
        load_model(out)


def test_bad_checkpoints(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(GlmgymError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nothing"))
    out = save_model(model, tmp_path / "ckpt", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (out / victim).unlink()
    with pytest.raises(GlmgymError, match="lacks shard"):
        load_model(out)
    cfg = json.loads((out / "config.json").read_text())
    (tmp_path / "other").mkdir()
    cfg["hidden_size"] = 256
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    save_model(model, tmp_path / "x")
    weights = (tmp_path / "x" / "model.safetensors").read_bytes()
    (tmp_path / "other" / "model.safetensors").write_bytes(weights)
    with pytest.raises(GlmgymError, match=r"config\.json implies"):
        load_model(tmp_path / "other")
    cfg["hidden_size"], cfg["position_encoding_2d"] = model.config.hidden_size, False
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GlmgymError, match="position_encoding_2d false is not a published configuration"):
        load_model(tmp_path / "other")


def test_hub_id_without_cache_or_network_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(GlmgymError, match="huggingface-cli download THUDM/chatglm-6b"):
        resolve_model_dir("THUDM/chatglm-6b")


def test_p_tuning_v2_checkpoint_loads_and_its_prefix_changes_the_answer(tiny, tmp_path):
    import dataclasses

    from glmgym.chat.generate import GenerationConfig, generate
    from glmgym.chat.model import GLMModel

    base, tok = tiny
    cfg = dataclasses.replace(base.config, pre_seq_len=4)
    tuned = GLMModel(cfg)
    tuned.load_state_dict(base.state_dict(), strict=False)
    torch.nn.init.normal_(tuned.transformer.prefix_encoder.embedding.weight, std=1.0)
    out = save_model(tuned, tmp_path / "ptuned")
    loaded = load_model(out, torch.float32)
    assert loaded.prefix_len == 4
    assert torch.equal(loaded.transformer.prefix_encoder.embedding.weight,
                       tuned.transformer.prefix_encoder.embedding.weight)
    from glmgym.chat.generate import PromptBatch, prefill
    from glmgym.chat.model import KVCache

    prompt = tok.encode("hello 你好")
    with torch.no_grad():
        cache = KVCache.empty(cfg, 1, 4 + len(prompt) + 1, torch.float32, "cpu")
        k, v = loaded.prefix_kv(1, torch.float32)
        cache.k[:, :, :, :4], cache.v[:, :, :, :4] = k, v
        with_prefix = prefill(loaded, PromptBatch.build([prompt], tok.pad_id), cache)
        without = prefill(base, PromptBatch.build([prompt], tok.pad_id),
                          KVCache.empty(base.config, 1, len(prompt) + 1, torch.float32, "cpu"))
    assert (with_prefix - without).abs().max() > 1e-3  # the prefix is attended to
    # and generation runs end to end with the prefix in the cache
    steps = list(generate(loaded, [prompt], GenerationConfig(max_new_tokens=4, seed=0), eos_id=-1,
                          pad_id=tok.pad_id, vocab_limit=tok.vocab_size))
    assert len(steps[-1][0]) == 4
