import pytest

from glmgym.chat.tokenizer import SPECIAL_TOKENS, ChatGLMTokenizer
from glmgym.errors import GlmgymError

ROUND_TRIPS = [
    "hello world",
    "line one\nline two\n\nline four",
    "tab\tseparated\tvalues",
    "two  spaces, five     spaces, eighty" + " " * 80 + "end, ninety" + " " * 90 + "end",
    "你好，世界！今天天气很好。",
    "mixed 中文 and English: 强化学习 reinforcement learning",
    "emoji 🙂🚀 and 表情 😀",
    "  leading and trailing  ",
    "code:\n    if x:\n\treturn 1",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[-2:] == [tokenizer.gmask_id, tokenizer.bos_id]
    assert tokenizer.decode(ids) == text


def test_text_rules_use_chatglm_pieces(tokenizer):
    sp = tokenizer.sp
    assert ChatGLMTokenizer.preprocess("a\nb\tc   d") == "a<n>b<|tab|>c<|blank_3|>d"
    ids = tokenizer.tokenize("a\nb")
    assert sp.piece_to_id("<n>") in ids
    assert sp.piece_to_id("<|blank_4|>") in tokenizer.tokenize("x    y")
    # 85 spaces: one 80-run piece and one 5-run piece, as the reference's loop from 80 down
    pieces = [sp.id_to_piece(i) for i in tokenizer.tokenize("a" + " " * 85 + "b")]
    assert "<|blank_80|>" in pieces and "<|blank_5|>" in pieces


def test_special_tokens_and_offset(sp_model):
    v11 = ChatGLMTokenizer(sp_model)
    v10 = ChatGLMTokenizer(sp_model, num_image_tokens=20000)
    assert v10.gmask_id == v11.gmask_id + 20000 and v10.eos_id == v11.eos_id + 20000
    assert [v11.sp.id_to_piece(i) for i in sorted(v11.special_ids)] == list(SPECIAL_TOKENS)
    text = "你好 hello"
    assert [i - 20000 for i in v10.encode(text)] == v11.encode(text)
    assert v10.decode(v10.encode(text)) == text
    assert v10.vocab_size == v11.vocab_size + 20000


def test_batch_pads_on_the_left(tokenizer):
    ids, pads = tokenizer.batch_encode(["short", "a much longer prompt here"])
    assert len(ids[0]) == len(ids[1])
    assert pads[0] > 0 and pads[1] == 0
    assert ids[0][:pads[0]] == [tokenizer.pad_id] * pads[0]
    assert tokenizer.decode(ids[0]) == "short"


def test_not_a_chatglm_tokenizer(tmp_path):
    with pytest.raises(GlmgymError, match="does not exist"):
        ChatGLMTokenizer(tmp_path / "absent.model")
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(GlmgymError, match="not a SentencePiece model"):
        ChatGLMTokenizer(tmp_path / "junk.model")


def test_special_token_strings_typed_by_a_user_stay_plain_text(tokenizer):
    """Deviation (a): the reference turns "<eop>" in a message into the control token."""
    text = "say <eop> and [gMASK] or <sop>[MASK] now"
    ids = tokenizer.tokenize(text)
    assert tokenizer.special_ids.isdisjoint(ids)
    assert tokenizer.decode(ids) == text
    prompt = tokenizer.encode(text)
    assert prompt.count(tokenizer.gmask_id) == 1 and prompt[-2:] == [tokenizer.gmask_id, tokenizer.bos_id]


@pytest.mark.parametrize("text", ["a , b", "x != y", "it ' s", "end .", "f(a , b) ?"])
def test_decode_keeps_spaces_before_punctuation(tokenizer, text):
    """Deviation (b): the reference's clean-up would give "a, b" and "x!= y"."""
    assert tokenizer.decode(tokenizer.encode(text)) == text
