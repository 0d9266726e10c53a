"""OpenAI's wire format without a server: option mapping, responses, logprobs, stream chunks."""

import asyncio
import json

import pytest

from glmgym.chat.serving import openai_api as wire
from glmgym.chat.serving.batch import TokenOut
from glmgym.chat.serving.engine import Chunk, Done, Failed
from glmgym.chat.session import Reply


def test_sampling_fields_map_onto_generation_options():
    assert wire.gen_options(2048, 0, None, None, None) == {"max_length": 2048, "do_sample": False}
    assert wire.gen_options(2048, 0.5, 0.9, 7, 3, max_length=100) == {
        "max_length": 100, "temperature": 0.5, "top_p": 0.9, "max_new_tokens": 7, "seed": 3}
    assert wire.stop_strings("x") == ("x",)
    assert wire.stop_strings(["a", "b"]) == ("a", "b") and wire.stop_strings(None) == ()


def test_system_text_goes_in_front_of_the_first_user_turn_and_bad_orders_are_400():
    Message = wire.request_models()["Message"]
    query, history = wire.to_chatglm([Message(role="system", content="S"), Message(role="user", content="Q")])
    assert (query, history) == ("S\n\nQ", [])
    with pytest.raises(wire.ApiError) as err:
        wire.to_chatglm([Message(role="assistant", content="A"), Message(role="user", content="Q")])
    assert err.value.status == 400 and err.value.param == "messages[0]"


class _Tok:
    def token_text(self, token: int) -> str:
        return {1: "ab", 2: "c", 3: "zz"}[token]


def _reply(text, completion, ended=False):
    return Reply(text, [("q", text)], prompt_tokens=5, completion_tokens=completion, ended=ended)


def test_plain_responses_fold_answers_usage_and_logprobs():
    shape = wire.LogprobShaper(_Tok())
    answers = [wire.Answer(), wire.Answer()]
    answers[0].take(Chunk(0, _reply("ab", 1), (TokenOut(0, 1, -0.5, ((1, -0.5), (3, -2.0))),)))
    answers[0].take(Chunk(0, _reply("abc", 3, ended=True), (TokenOut(0, 2, -0.25),)))
    answers[0].take(Done("stop", 0))
    answers[1].take(Chunk(1, _reply("c", 1), ()))
    answers[1].take(Done("cancelled", 1))
    body = wire.chat_completion({"id": "x"}, answers, shape.chat)
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    # <eop> is not a completion token
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2 + 1, "total_tokens": 8}
    top = body["choices"][0]["logprobs"]["content"][0]
    assert top["token"] == "ab" and top["bytes"] == [97, 98] and top["top_logprobs"][1]["token"] == "zz"
    legacy = shape.legacy(answers[0].tokens, offset=10)
    assert legacy["tokens"] == ["ab", "c"] and legacy["text_offset"] == [10, 12]
    text = wire.text_completion({"id": "y"}, answers, None, prompt_tokens=9)
    assert text["object"] == "text_completion" and text["usage"]["prompt_tokens"] == 9
    assert text["choices"][1]["logprobs"] is None


class _Job:
    def __init__(self, items):
        self.events: asyncio.Queue = asyncio.Queue()
        for item in items:
            self.events.put_nowait(item)
        self.prompt = [0] * 4
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def _chunks(stream) -> list:
    async def run():
        return [item async for item in stream]

    lines = asyncio.run(run())
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_a_streamed_chat_holds_back_a_possible_stop_string_and_ends_with_usage():
    job = _Job([Chunk(0, _reply("Hel", 1)), Chunk(0, _reply("Hello E", 2)),
                Chunk(0, _reply("Hello", 3)), Done("stop", 0)])  # the stop string "END" cut the text
    chunks = _chunks(wire.chat_stream(job, 1, {"id": "c"}, ("END",), True, None))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:] if c["choices"])
    assert text == "Hello"  # "E" was never sent: it could have begun "END"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert job.cancelled  # the rows are freed when the stream ends


def test_a_streamed_completion_counts_offsets_and_a_failed_job_ends_in_an_error_chunk():
    shape = wire.LogprobShaper(_Tok())
    job = _Job([Chunk(0, _reply("ab", 1), (TokenOut(0, 1, -0.5),)),
                Chunk(0, _reply("abc", 2), (TokenOut(0, 2, -0.1),)), Done("length", 0)])
    chunks = _chunks(wire.completion_stream([job], 1, {"id": "t"}, (), False, shape.legacy))
    assert [c["choices"][0]["text"] for c in chunks] == ["ab", "c", ""]
    assert chunks[1]["choices"][0]["logprobs"]["text_offset"] == [2]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    failed = _Job([Failed("the request ran past the time limit", 504)])
    (error,) = _chunks(wire.completion_stream([failed], 1, {"id": "t"}, (), False, None))
    assert error == wire.error_body("the request ran past the time limit", "timeout_error")
