"""Answers of the later family: plain text, multi-segment answers and tool calls (ChatGLM3's code
block, GLM-4's JSON), parsed without running the model's output."""

from pathlib import Path

import pytest

from glmgym.chat.formats import ChatFormat, parse_tool_call
from glmgym.chat.tokenizer_v2 import GLM2Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
SYSTEM = {"role": "system", "content": "", "tools": TOOLS}


@pytest.fixture(scope="module")
def fmt3():
    return ChatFormat("chatglm3", GLM2Tokenizer(FIXTURES / "glm2_tokenizer.model"))


def test_a_plain_answer_is_stripped_and_kept_in_the_history(fmt3):
    response, history = fmt3.answer("\n 你好！[[训练时间]]  ", [], "hi")
    assert response == "你好！2023年"
    assert history == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "metadata": "", "content": "你好！2023年"},
    ]


def test_chatglm3_tool_calls_parse_as_literal_keyword_arguments(fmt3):
    text = "get_weather\n```python\ntool_call(city='北京', days=3, units=[\"c\"])\n```"
    response, history = fmt3.answer(text, [SYSTEM], "北京天气")
    assert response == {"name": "get_weather", "parameters": {"city": "北京", "days": 3, "units": ["c"]}}
    assert history[-1] == {"role": "assistant", "metadata": "get_weather", "content": text.split("\n", 1)[1]}


@pytest.mark.parametrize(
    "code",
    [
        "tool_call(city=__import__('os').system('echo hi'))",  # the reference would eval this
        "tool_call('positional')",
        "open('x').read()",
        "tool_call(**{'a': 1})",
        "tool_call(city=",
    ],
)
def test_chatglm3_tool_calls_never_run_code(code):
    call = parse_tool_call("chatglm3", "get_weather", f"```python\n{code}\n```")
    assert call.arguments is None and call.name == "get_weather"


def test_glm4_tool_calls_are_json_and_unfinished_calls_stay_raw():
    fmt = ChatFormat("glm4", None)
    response, _ = fmt.answer('get_weather\n{"city": "上海"}', [SYSTEM], "上海天气")
    assert response == {"name": "get_weather", "parameters": {"city": "上海"}}
    # while streaming (not final), and when the JSON is broken, the raw text is given
    assert fmt.answer('get_weather\n{"city": "上', [SYSTEM], "q", final=False)[0] == {
        "name": "get_weather",
        "content": '{"city": "上',
    }
    assert fmt.answer("get_weather\n{oops", [SYSTEM], "q")[0] == {"name": "get_weather", "content": "{oops"}
    # without tools in the history a named segment is an answer with metadata, as the reference
    assert fmt.answer("note\ntext", [], "q")[0] == {"name": "note", "content": "text"}


def test_an_answer_of_several_assistant_segments_keeps_each(fmt3):
    text = "get_weather\n```python\ntool_call(city='a')\n```<|assistant|>\n好的"
    response, history = fmt3.answer(text, [SYSTEM], "q")
    assert response == "好的"
    assert [m["role"] for m in history] == ["system", "user", "assistant", "assistant"]
