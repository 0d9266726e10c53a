"""The chat template and the answer's text as tokens arrive."""

import random

import pytest

from glmgym.chat.template import IncrementalDecoder, build_prompt, process_response

TEXTS = [
    "你好，我是 ChatGLM-6B。\n很高兴见到你！",
    "def f(x):\n\treturn  x  !=  y    # four spaces",
    "Emoji 🤖 and accents: café, naïve; 数学公式 a^2 + b^2 = c^2.",
    "   leading spaces, trailing ones   ",
    "\n\n多行\n\n文本\n",
]


def _check_stream(tokenizer, ids):
    dec = IncrementalDecoder(tokenizer)
    for i, token in enumerate(ids):
        text = dec.push(token)
        full = tokenizer.decode(ids[: i + 1])
        if full.endswith("\ufffd"):  # an unfinished character: held back, what came before is kept
            assert full.startswith(text)
        else:
            assert text == full, (ids[: i + 1], text, full)
    assert dec.finish() == tokenizer.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_decoding_the_whole_answer(tokenizer, text):
    ids = tokenizer.encode(text)
    _check_stream(tokenizer, [*ids[: len(ids) - 2], tokenizer.eos_id])  # as generated: no [gMASK] <sop>


def test_incremental_text_holds_for_any_token_sequence(tokenizer):
    rng = random.Random(0)
    vocab = tokenizer.vocab_size
    for _ in range(40):  # byte pieces, blanks, <n>, specials and padding in any order
        _check_stream(tokenizer, [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))])


def test_the_template_and_the_clean_up_are_the_references():
    assert build_prompt("hi") == "hi"
    assert build_prompt("q2", [("q1", "a1")]) == "[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答："
    assert process_response(" 你好,世界!  [[训练时间]] ") == "你好，世界！  2023年"
