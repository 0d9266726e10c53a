"""LoRA adapters and P-Tuning prefixes on disk: the files old and new PEFT read, adapters either
wrote, checks of the config against the tensors, and one clear error for every bad file."""

import json

import pytest
import torch

from glmgym.chat.adapters import read_lora_adapter, save_lora_weights
from glmgym.chat.session import load
from glmgym.cli import main
from glmgym.errors import GlmgymError

peft = pytest.importorskip("peft")

TARGETS = [f"transformer.layers.{i}.attention.query_key_value" for i in range(2)]


def _adapter(path, r=4, alpha=8.0, rank_in_tensors=None, files=("safetensors", "bin"), seed=0):
    """A LoRA adapter for random:tiny's query_key_value layers, written as glmgym writes one
    (config from PEFT's own LoraConfig); `files` picks which weight files stay."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    k = rank_in_tensors or r
    tensors = {}
    for name in TARGETS:  # A [r, in], B [out, r] of a Linear(128 -> 384)
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(k, 128, generator=g) * 0.1
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(384, k, generator=g) * 0.1
    save_lora_weights(path, tensors)
    peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["query_key_value"], bias="none",
                    task_type="CAUSAL_LM").save_pretrained(str(path))
    for suffix in ("safetensors", "bin"):
        if suffix not in files:
            (path / f"adapter_model.{suffix}").unlink()
    return path, tensors


def test_glmgym_writes_both_weight_files_and_current_peft_reads_them(tmp_path):
    from peft.utils import load_peft_weights
    from safetensors.torch import load_file

    path, tensors = _adapter(tmp_path / "a")
    st = load_file(str(path / "adapter_model.safetensors"))
    bin_ = torch.load(path / "adapter_model.bin", weights_only=True)  # what PEFT 0.3-0.5 read
    assert st.keys() == bin_.keys() == tensors.keys()
    assert all(torch.equal(st[k], bin_[k]) for k in st)
    config = peft.PeftConfig.from_pretrained(str(path))
    assert config.r == 4 and set(config.target_modules) == {"query_key_value"}
    read = load_peft_weights(str(path), device="cpu")
    assert read.keys() == st.keys() and all(torch.equal(read[k], st[k]) for k in st)


def test_an_adapter_with_only_a_bin_file_merges_like_the_safetensors_one(tmp_path):
    st_dir, tensors = _adapter(tmp_path / "st", files=("safetensors",))
    bin_dir, _ = _adapter(tmp_path / "bin", files=("bin",))
    assert read_lora_adapter(bin_dir).weights_file.name == "adapter_model.bin"
    a = load("random:tiny", dtype="float32", lora=str(st_dir)).model.state_dict()
    b = load("random:tiny", dtype="float32", lora=str(bin_dir)).model.state_dict()
    base = load("random:tiny", dtype="float32").model.state_dict()
    qkv = f"{TARGETS[0]}.weight"
    assert torch.equal(a[qkv], b[qkv]) and not torch.equal(a[qkv], base[qkv])
    A, B = (tensors[f"base_model.model.{TARGETS[0]}.lora_{p}.weight"] for p in "AB")
    torch.testing.assert_close(a[qkv] - base[qkv], (B @ A) * (8.0 / 4), rtol=1e-5, atol=1e-6)


def _cases(tmp_path):
    """(folder, what the message must say) for adapters and prefixes that must be refused."""
    cases = []
    d, _ = _adapter(tmp_path / "rank", r=8, rank_in_tensors=4)
    cases.append((d, f"says r=8, but the tensors of {TARGETS[0]} have rank 4"))
    d, _ = _adapter(tmp_path / "targets")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["dense"]}))
    cases.append((d, "which target_modules ['dense']"))
    d, _ = _adapter(tmp_path / "truncated", files=("safetensors",))
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((d, "cannot read"))
    d, _ = _adapter(tmp_path / "notjson")
    (d / "adapter_config.json").write_text("{not json")
    cases.append((d, "adapter_config.json is not a readable JSON file"))
    d, _ = _adapter(tmp_path / "nor")
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["r"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    cases.append((d, "r must be a positive number, not None"))
    d, _ = _adapter(tmp_path / "empty", files=("bin",))
    (d / "adapter_model.bin").write_bytes(b"")
    cases.append((d, "cannot read"))
    d = tmp_path / "nothing"
    d.mkdir()
    cases.append((d, "not a LoRA adapter"))
    return cases


def test_bad_adapters_get_one_clear_error_naming_the_file(tmp_path):
    for folder, message in _cases(tmp_path):
        with pytest.raises(GlmgymError) as err:
            load("random:tiny", dtype="float32", lora=str(folder))
        assert message in str(err.value), (folder.name, str(err.value))
        assert "\n" not in str(err.value)


def test_the_cli_answers_a_bad_adapter_with_one_line_and_exit_2(tmp_path, capsys):
    folder, _ = _adapter(tmp_path / "rank", r=8, rank_in_tensors=4)
    out = tmp_path / "merged"
    argv = ["chat", "merge-lora", "--model", "random:tiny", "--lora", str(folder), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "r=8" in err[0] and "Traceback" not in err[0]
    assert not out.exists()  # nothing half-written


def _prefix(path, state, config):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text(config)
    return path


def test_bad_prefixes_get_one_clear_error(tmp_path):
    emb = {"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 2 * 2 * 128)}
    ok = _prefix(tmp_path / "ok", emb, json.dumps({"pre_seq_len": 4}))
    assert load("random:tiny", dtype="float32", ptuning_checkpoint=str(ok)).model.prefix_len == 4
    wrong = {"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 100)}
    for folder, message in (
        (_prefix(tmp_path / "notjson", emb, "{oops"), "config.json is not a readable JSON file"),
        (_prefix(tmp_path / "shape", wrong, "{}"),
         "embedding.weight: (4, 100) where this model needs (4, 512)"),
    ):
        with pytest.raises(GlmgymError) as err:
            load("random:tiny", dtype="float32", ptuning_checkpoint=str(folder))
        assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_prefix_is_computed_in_the_models_dtype(tmp_path, dtype):
    """As THUDM's get_prompt: the prefix encoder's output is cast to the compute dtype (an fp32
    model keeps an fp32 prefix; it was rounded through fp16 before)."""
    g = torch.Generator().manual_seed(0)
    emb = {"transformer.prefix_encoder.embedding.weight": torch.randn(4, 2 * 2 * 128, generator=g)}
    folder = _prefix(tmp_path / "p", emb, json.dumps({"pre_seq_len": 4}))
    model = load("random:tiny", dtype="float32", ptuning_checkpoint=str(folder)).model
    k, v = model.prefix_kv(1, dtype)
    expected = emb["transformer.prefix_encoder.embedding.weight"].to(dtype).view(4, 4, 4, 32)
    assert k.dtype == dtype
    torch.testing.assert_close(k[0, 0], expected[:, 0].permute(1, 0, 2), rtol=0, atol=0)
    torch.testing.assert_close(v[0, 0], expected[:, 1].permute(1, 0, 2), rtol=0, atol=0)


def test_merge_lora_keeps_the_base_folders_files_and_dtype(tmp_path, capsys):
    from glmgym.chat.checkpoint import save_model

    bot = load("random:tiny", dtype="float32")
    base = save_model(bot.model.to(torch.bfloat16), tmp_path / "base", safetensors=False,
                      tokenizer=bot.tokenizer)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "modeling_chatglm.py").write_text("raise SystemExit('never imported by glmgym')\n")
    (base / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}))
    adapter, _ = _adapter(tmp_path / "lora")
    out = tmp_path / "merged"
    assert main(["chat", "merge-lora", "--model", str(base), "--lora", str(adapter), "--out", str(out)]) == 0
    files = {f.name for f in out.iterdir()}
    # the base's other files, as files; its weight format (.bin shards) and its dtype (bf16)
    assert {"modeling_chatglm.py", "tokenizer_config.json", "ice_text.model"} <= files
    assert any(n.endswith(".bin") for n in files) and not any(n.endswith(".safetensors") for n in files)
    merged = json.loads((out / "config.json").read_text())
    assert merged["auto_map"] == config["auto_map"] and merged["torch_dtype"] == "bfloat16"
    (shard,) = [f for f in out.iterdir() if f.name.endswith(".bin")]
    assert {t.dtype for t in torch.load(shard, weights_only=True).values()} == {torch.bfloat16}
    qkv = f"{TARGETS[0]}.weight"
    merged_qkv = load(str(out), dtype="float32").model.state_dict()[qkv]
    assert not torch.equal(merged_qkv, load(str(base), dtype="float32").model.state_dict()[qkv])
    assert main(["chat", "merge-lora", "--model", str(base), "--lora", str(adapter), "--out",
                 str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"
