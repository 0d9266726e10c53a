"""The later family through `glmgym.chat.load`: tiny random models of each member, chat and
stream_chat with the reference's history shapes, the observation role, and files on disk."""

import pytest

from glmgym.chat import load
from glmgym.chat.checkpoint import load_model, save_model
from glmgym.chat.session import load_tokenizer
from glmgym.errors import GlmgymError

FAMILIES = ["chatglm2", "chatglm3", "glm4"]


@pytest.fixture(scope="module", params=FAMILIES)
def bot(request):
    return load(f"random:tiny-{request.param}", device="cpu")


def test_chat_returns_the_reference_history_shape(bot):
    response, history = bot.chat("你好", max_new_tokens=6, do_sample=False)
    assert isinstance(response, str)
    if bot.format.family == "chatglm2":
        assert history == [("你好", response)]
    else:
        assert history[0] == {"role": "user", "content": "你好"} and history[-1]["role"] == "assistant"


def test_stream_chat_ends_where_chat_does(bot):
    final, history = bot.chat("hello world", max_new_tokens=8, do_sample=False)
    *_, (streamed, streamed_history) = bot.stream_chat("hello world", max_new_tokens=8, do_sample=False)
    assert streamed == final and streamed_history == history


def test_a_long_history_is_trimmed_to_the_context(bot):
    if bot.format.family == "chatglm2":
        history = [("问题 " * 200, "回答 " * 200)] * 6
    else:
        history = [
            {"role": "user", "content": "问题 " * 200},
            {"role": "assistant", "content": "回答 " * 200},
        ] * 6
    with pytest.warns(UserWarning, match="dropped"):
        _, kept = bot.chat("最后", history, max_new_tokens=4, do_sample=False)
    assert len(kept) < len(history) + 2


def test_the_observation_role_needs_chatglm3_or_glm4(bot):
    if bot.format.family == "chatglm2":
        with pytest.raises(GlmgymError, match="no 'observation' role"):
            bot.chat("{}", [], role="observation", max_new_tokens=2)
    else:
        _, history = bot.chat(
            '{"temperature": 20}', [], role="observation", max_new_tokens=2, do_sample=False
        )
        assert history[0] == {"role": "observation", "content": '{"temperature": 20}'}


def test_a_saved_checkpoint_loads_back_with_its_tokenizer(bot, tmp_path):
    out = save_model(bot.model, tmp_path / "ckpt", tokenizer=bot.tokenizer, max_shard_bytes=200_000)
    assert (out / "tokenizer.model").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    model = load_model(out, device="cpu")
    assert type(model) is type(bot.model) and model.config.family == bot.format.family
    tok = load_tokenizer(out)
    assert tok.tokenize("你好 world") == bot.tokenizer.tokenize("你好 world")
    a = bot.chat("hi", max_new_tokens=5, do_sample=False)[0]
    from glmgym.chat.session import ChatGLM

    assert ChatGLM(model, tok).chat("hi", max_new_tokens=5, do_sample=False)[0] == a


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 0)])  # (4, 0): THUDM's per-row INT4
def test_int8_and_int4_checkpoints_of_the_v2_block(bot, tmp_path, bits, group):
    import torch

    from glmgym.chat.checkpoint import quantize_checkpoint
    from glmgym.chat.generate import PromptBatch
    from glmgym.chat.quantize import QuantizedLinear

    src = save_model(bot.model, tmp_path / "float", tokenizer=bot.tokenizer)
    out = quantize_checkpoint(src, tmp_path / f"int{bits}", bits, group)
    model = load_model(out, dtype=torch.float32, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * model.config.num_layers and model.config.quantization_bit == bits
    assert (
        model.transformer.encoder.layers[0].self_attention.dense.bias is None
    )  # no bias where the reference has none
    on_load = load_model(src, dtype=torch.float32, device="cpu", quantize=bits, group_size=group)
    ids = [bot.tokenizer.prefix + bot.tokenizer.tokenize("你好 hello world")]
    batch = PromptBatch.build(ids, 0, causal=True)
    with torch.no_grad():
        ref, a, b = (
            m(batch.input_ids, batch.position_ids, batch.attention_mask())
            for m in (bot.model, model, on_load)
        )
    torch.testing.assert_close(a, b)  # quantized files and quantize-on-load agree
    assert (a - ref).abs().max() < 0.25 * ref.abs().max()
