import warnings

import pytest

from glmgym.chat.session import ChatGLM, HistoryTrimmedWarning, build_prompt, load, process_response


def test_prompt_for_zero_one_and_three_turns():
    assert build_prompt("你好") == "你好"
    assert build_prompt("q1", [("q0", "r0")]) == "[Round 0]\n问：q0\n答：r0\n[Round 1]\n问：q1\n答："
    three = build_prompt("now", [("a", "1"), ("b", "2"), ("c", "3")])
    assert three == ("[Round 0]\n问：a\n答：1\n[Round 1]\n问：b\n答：2\n[Round 2]\n问：c\n答：3\n"
                     "[Round 3]\n问：now\n答：")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  hello  ", "hello"),
        ("截至[[训练时间]]的数据", "截至2023年的数据"),
        ("你好,世界!真的?是的:好;", "你好，世界！真的？是的：好；"),
        ("English, stays: as is!", "English, stays: as is!"),
        ("中,a", "中，a"),
        ("a,中", "a，中"),
    ],
)
def test_response_post_processing(raw, clean):
    assert process_response(raw) == clean


def test_chat_and_stream_chat_call_shapes(tiny):
    bot = ChatGLM(*tiny, name="tiny")
    response, history = bot.chat("hello 你好", max_length=64, seed=0)
    assert isinstance(response, str) and history == [("hello 你好", response)]
    streamed = list(bot.stream_chat("again", history, max_length=256, max_new_tokens=6, seed=0))
    assert 1 <= len(streamed) <= 6
    final, final_history = streamed[-1]
    assert final_history[:1] == history and final_history[-1] == ("again", final)
    # same seed, same answer
    assert bot.chat("hello 你好", max_length=64, seed=0)[0] == response


def test_history_longer_than_the_context_is_trimmed_with_a_notice(tiny):
    bot = ChatGLM(*tiny)
    history = [(f"question number {i} 问题", "answer 回答 " * 5) for i in range(12)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, new_history = bot.chat("last", history, max_length=120, max_new_tokens=8, seed=0)
    assert any(issubclass(w.category, HistoryTrimmedWarning) for w in caught)
    assert new_history[-1][0] == "last"
    assert len(new_history) < len(history) + 1
    assert new_history[:-1] == history[len(history) - (len(new_history) - 1):]  # oldest dropped


def test_load_random_tiny_and_unknown_options():
    bot = load("random:tiny")
    assert bot.model.config.num_layers == 2
    assert bot.tokenizer.decode(bot.tokenizer.encode("ok")) == "ok"
    with pytest.raises(TypeError, match="unknown generation option"):
        bot.chat("x", beams=2)
