"""Tool calls through the OpenAI-compatible server, with the official `openai` client, streamed and
not, on scripted tiny ChatGLM3 and GLM-4 models (the real layers run; the logits are replaced by
a script, so that the model writes a tool call in its own format)."""

import json

import pytest
import torch

from glmgym.chat.serving.server import build_app
from glmgym.chat.session import ChatGLM, load

from .test_server import live_server

openai = pytest.importorskip("openai")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL_TEXT = {  # what each model writes when it calls get_weather(city="北京")
    "chatglm3": "get_weather\n```python\ntool_call(city='北京')\n```",
    "glm4": 'get_weather\n{"city": "北京"}',
}


class Scripted:
    """Makes a model answer every prompt with `script` under greedy decoding: each position's
    logits put their mass on the script's token for that position (the layers still run, so the
    cache and batching are exercised). One conversation at a time: the last prompt's length
    tells where the answer starts."""

    def __init__(self, model, script: list[int], end: int) -> None:
        self.model, self.script, self.end, self.start = model, script, end, 0
        embed, head, forward = model.embed, model.head, model.forward

        def scripted_embed(ids):
            if ids.shape[1] > 1:  # a prompt (the running batch pads on the right: one prompt, no pads)
                self.start = ids.shape[1]
            return embed(ids)

        def scripted_head(h):
            return self._logits(head(h), torch.zeros(h.shape[0], dtype=torch.long))

        def scripted_forward(input_ids, position_ids, *args, **kw):
            logits = forward(input_ids, position_ids, *args, **kw)
            if input_ids.shape[1] > 1:  # a prompt through generate(): its last token is the start
                self.start = input_ids.shape[1]
                k = torch.zeros(logits.shape[0], dtype=torch.long)
            else:  # the token at position p is the answer's (p - start)-th: the next is one on
                k = position_ids.reshape(position_ids.shape[0], -1)[:, -1] - self.start + 1
            last = self._logits(logits[:, -1], k)
            return torch.cat([logits[:, :-1], last[:, None]], dim=1)

        model.embed, model.head, model.forward = scripted_embed, scripted_head, scripted_forward

    def _logits(self, logits, k):
        out = torch.full_like(logits, -30.0)
        for b, i in enumerate(k.tolist()):
            out[b, self.script[i] if i < len(self.script) else self.end] = 30.0
        return out


def _scripted_bot(family: str, text: str) -> ChatGLM:
    bot = load(f"random:tiny-{family}", dtype="float32")
    tok = bot.tokenizer
    Scripted(bot.model, tok.tokenize(text), tok.stop_ids[0])
    return bot


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_a_tool_call_comes_back_as_tool_calls_streamed_and_not(family):
    bot = _scripted_bot(family, CALL_TEXT[family])
    with live_server(build_app(bot, ui=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "北京天气怎么样？"}]
        r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"city": "北京"}

        chunks = list(
            client.chat.completions.create(
                model="m", messages=messages, tools=TOOLS, temperature=0, stream=True
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert not any(d.content for d in deltas)  # no text of the call leaks as content
        calls = [tc for d in deltas for tc in d.tool_calls or []]
        assert [tc.index for tc in calls] == [0, 0]
        assert calls[0].id == call.id and calls[0].function.name == "get_weather"
        assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "北京"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # the call and its result fed back: the next prompt holds them in the model's format
        follow = [
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22}'},
        ]
        r = client.chat.completions.create(model="m", messages=follow, tools=TOOLS, temperature=0)
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"  # the script again
        prompt = bot.tokenizer.decode(
            bot.format.prompt_ids(
                '{"temperature": 22}',
                [
                    {"role": "system", "content": "", "tools": TOOLS},
                    {"role": "user", "content": messages[0]["content"]},
                    {
                        "role": "assistant",
                        "metadata": "get_weather",
                        "content": CALL_TEXT[family].split("\n", 1)[1],
                    },
                ],
                role="observation",
            )
        )
        assert "<|observation|>" in prompt and "get_weather" in prompt


def test_tool_choice_none_named_and_a_plain_answer():
    bot = _scripted_bot("glm4", "\n晴天")  # a plain answer: an empty first line, then the text
    with live_server(build_app(bot, ui=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, temperature=0)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "晴天"
        assert not r.choices[0].message.tool_calls
        streamed = client.chat.completions.create(
            model="m", messages=messages, tools=TOOLS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "晴天"
        r = client.chat.completions.create(
            model="m", messages=messages, tools=TOOLS, tool_choice="none", temperature=0
        )
        assert r.choices[0].message.content == "晴天"
        with pytest.raises(openai.BadRequestError, match="not in tools"):
            client.chat.completions.create(
                model="m",
                messages=messages,
                tools=TOOLS,
                temperature=0,
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
        with pytest.raises(openai.BadRequestError, match="last non-system message"):
            client.chat.completions.create(
                model="m", messages=[*messages, {"role": "assistant", "content": "x"}]
            )


def test_a_named_tool_choice_forces_the_call():
    bot = _scripted_bot("glm4", '{"city": "上海"}')  # the arguments only: the name line is forced
    with live_server(build_app(bot, ui=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "上海？"}],
            tools=TOOLS,
            temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "上海"}


@pytest.mark.parametrize("name", ["random:tiny", "random:tiny-chatglm2"])
def test_models_without_tool_calls_refuse_tools_with_a_400(name):
    bot = load(name, dtype="float32")
    with live_server(build_app(bot, ui=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="cannot call tools"):
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS
            )
        with pytest.raises(openai.BadRequestError, match="cannot call tools"):
            client.chat.completions.create(
                model="m",
                messages=[
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "x", "content": "{}"},
                ],
            )
        models = client.models.list()
        assert [m.id for m in models.data] == [name]
