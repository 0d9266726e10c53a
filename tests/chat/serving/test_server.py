"""`glmgym chat serve` on a tiny random model, loopback only."""

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from glmgym.chat.serving.server import build_app, to_chatglm
from glmgym.chat.session import load

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def bot():
    return load("random:tiny", dtype="float32")


@contextmanager
def live_server(app):
    """Run `app` with uvicorn on a free loopback port; yield its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _wait_idle(engine, timeout=20.0):
    deadline = time.time() + timeout
    while engine.pending and time.time() < deadline:
        time.sleep(0.02)
    return engine.pending == 0


def test_messages_map_onto_chatglm_history():
    from glmgym.chat.serving.openai_api import request_models

    Message = request_models()["Message"]
    msgs = [Message(role="system", content="Be brief."), Message(role="user", content="Hi"),
            Message(role="assistant", content="Hello!"), Message(role="user", content="Who are you?")]
    query, history = to_chatglm(msgs)
    assert query == "Who are you?"
    assert history == [("Be brief.\n\nHi", "Hello!")]
    assert to_chatglm(msgs[:2]) == ("Be brief.\n\nHi", [])


def test_openai_client_plain_streamed_and_error(bot):
    import openai
    app = build_app(bot, max_queue=4, ui=False)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["random:tiny"]
        kwargs = {"model": "random:tiny", "max_tokens": 6, "seed": 3, "temperature": 0.8,
                  "messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "你好"}]}
        plain = client.chat.completions.create(**kwargs)
        choice = plain.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert 0 < plain.usage.completion_tokens <= 6
        assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
        # the same seed gives the same answer, streamed in pieces
        chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        chunks = chunks[:-1]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == choice.message.content
        assert chunks[-1].choices[0].finish_reason == choice.finish_reason
        assert sum(1 for c in chunks if c.choices[0].delta.content) >= 2  # it really streamed
        # greedy (temperature 0) is deterministic without a seed
        greedy = {**kwargs, "temperature": 0, "seed": None}
        a = client.chat.completions.create(**greedy).choices[0].message.content
        assert client.chat.completions.create(**greedy).choices[0].message.content == a
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "  "}])
        assert "empty" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError, match="exceeds the context"):
            client.chat.completions.create(model="m", max_tokens=250,
                                           messages=[{"role": "user", "content": "hello " * 20}])


def test_prompt_lookup_per_request_and_as_the_server_default_gives_the_same_answers():
    import openai
    import torch

    bot = load("random:tiny", dtype="float32")
    torch.manual_seed(0)
    with torch.no_grad():  # wider weights than the default: greedy answers that are not empty
        for p in bot.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    kwargs = {"model": "m", "max_tokens": 24, "temperature": 0,
              "messages": [{"role": "user", "content": "copy: 1 2 3 4 5 1 2 3 4 5 1 2 3"}]}
    answers = []
    for default in (0, 6):
        with live_server(build_app(bot, max_queue=4, ui=False, prompt_lookup=default)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            for extra in ({}, {"prompt_lookup_num_tokens": 4}, {"prompt_lookup_num_tokens": 0}):
                plain = client.chat.completions.create(**kwargs, extra_body=extra)
                answers.append(plain.choices[0].message.content)
                chunks = client.chat.completions.create(**kwargs, extra_body=extra, stream=True)
                answers.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
            with pytest.raises(openai.BadRequestError, match="prompt_lookup_num_tokens"):
                client.chat.completions.create(**kwargs, extra_body={"prompt_lookup_num_tokens": 33})
    assert len(answers[0]) > 10 and len(set(answers)) == 1


def test_stop_strings_and_reference_api(bot):
    from fastapi.testclient import TestClient

    with TestClient(build_app(bot, ui=False)) as c:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "seed": 0}
        full = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert len(full) > 2
        stop = full[1:3]
        cut = c.post("/v1/chat/completions", json={**body, "stop": [stop]}).json()["choices"][0]
        assert cut["message"]["content"] == full[: full.index(stop)]
        assert cut["finish_reason"] == "stop"
        r = c.post("/", json={"prompt": "你好", "history": [["hi", "hello"]], "max_length": 200,
                                "top_p": 0.5})
        data = r.json()
        assert r.status_code == 200 and data["status"] == 200
        assert data["history"][0] == ["hi", "hello"] and data["history"][-1] == ["你好", data["response"]]
        assert time.strptime(data["time"], "%Y-%m-%d %H:%M:%S")
        # long conversations: 400 by default, trimmed when asked for
        turns = [{"role": r, "content": "word " * 30} for _ in range(6) for r in ("user", "assistant")]
        long = {"messages": [*turns, {"role": "user", "content": "last"}], "max_tokens": 8}
        assert c.post("/v1/chat/completions", json=long).status_code == 400
        assert c.post("/v1/chat/completions", json={**long, "trim_history": True}).status_code == 200


def test_logprobs_n_and_openai_aliases_through_the_official_client(bot):
    import openai

    app = build_app(bot, max_queue=4, ui=False)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        kwargs = {"model": "m", "messages": [{"role": "user", "content": "hello there"}],
                  "max_completion_tokens": 5, "user": "someone", "stop": ["\u0000never"]}
        greedy = client.chat.completions.create(**kwargs, temperature=0, logprobs=True, top_logprobs=3)
        (choice,) = greedy.choices
        content = choice.logprobs.content
        assert 0 < len(content) == greedy.usage.completion_tokens + (choice.finish_reason == "stop") <= 5
        for entry in content:
            # greedy: the chosen token is the most likely one; alternatives come most likely first
            assert entry.top_logprobs[0].token == entry.token
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
            assert entry.logprob <= 0 and [t.logprob for t in entry.top_logprobs] == sorted(
                [t.logprob for t in entry.top_logprobs], reverse=True)
            assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        # streamed: the same tokens and log-probabilities arrive with the deltas
        streamed = [c for c in client.chat.completions.create(**kwargs, temperature=0, logprobs=True,
                                                              stream=True) if c.choices]
        tokens = [e for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        pairs = [(e.token, round(e.logprob, 4)) for e in content]
        assert [(e.token, round(e.logprob, 4)) for e in tokens] == pairs
        # n answers of one prompt, decoded as rows of one batch, with seeds 11 and 12
        many = client.chat.completions.create(**kwargs, n=3, seed=11, temperature=1.5)
        assert [c.index for c in many.choices] == [0, 1, 2]
        assert many.usage.prompt_tokens == greedy.usage.prompt_tokens
        second = client.chat.completions.create(**kwargs, n=2, seed=12, temperature=1.5)
        assert second.choices[0].message.content == many.choices[1].message.content
        streamed_n = list(client.chat.completions.create(**kwargs, n=2, seed=11, temperature=1.5,
                                                         stream=True))
        for i in range(2):
            text = "".join(c.choices[0].delta.content or "" for c in streamed_n if c.choices[0].index == i)
            assert text == many.choices[i].message.content
            assert sum(1 for c in streamed_n if c.choices[0].index == i and c.choices[0].finish_reason) == 1


def test_completions_take_a_raw_prompt(bot):
    import openai

    app = build_app(bot, max_queue=8, ui=False)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        one = client.completions.create(model="m", prompt="Once upon a time", temperature=0, logprobs=2)
        (choice,) = one.choices
        assert one.object == "text_completion" and choice.finish_reason in ("stop", "length")
        assert one.usage.prompt_tokens == len(bot.tokenizer.encode("Once upon a time"))
        assert one.usage.completion_tokens <= 16  # OpenAI's default max_tokens
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
        # the raw text, without the chat template: the same as the model's own greedy continuation
        from glmgym.chat.config import GenerationConfig
        from glmgym.chat.generate import generate

        tok = bot.tokenizer
        cfg = GenerationConfig(do_sample=False, max_new_tokens=16)
        *_, ids = generate(bot.model, [tok.encode("Once upon a time")], cfg, eos_id=tok.eos_id,
                           pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
        assert choice.text == tok.decode(ids[0])
        # several prompts, n answers each, numbered in a row
        batch = client.completions.create(model="m", prompt=["a", "b"], n=2, max_tokens=3, seed=1)
        assert [c.index for c in batch.choices] == [0, 1, 2, 3]
        streamed = list(client.completions.create(model="m", prompt="Once upon a time", temperature=0,
                                                  stream=True))
        assert "".join(c.choices[0].text for c in streamed) == choice.text
        with pytest.raises(openai.BadRequestError, match="echo"):
            client.completions.create(model="m", prompt="x", echo=True)


def test_metrics_in_prometheus_format(bot):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    with TestClient(build_app(bot, max_queue=2, ui=False, api_key="k")) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/health").status_code == 200  # health needs no key
        key = {"Authorization": "Bearer k"}
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        usage = c.post("/v1/chat/completions", json=body, headers=key).json()["usage"]
        r = c.get("/metrics", headers=key)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert samples[("glmgym_requests_total", (("status", "ok"),))] == 1
    assert samples[("glmgym_prompt_tokens_total", ())] == usage["prompt_tokens"]
    generated = samples[("glmgym_generated_tokens_total", ())]
    assert generated in (usage["completion_tokens"], usage["completion_tokens"] + 1)  # + <eop>
    assert samples[("glmgym_time_to_first_token_seconds_count", ())] == 1
    assert samples[("glmgym_time_per_output_token_seconds_count", ())] == generated - 1
    assert samples[("glmgym_queue_length", ())] == 0 and samples[("glmgym_running_rows", ())] == 0


def test_a_request_past_the_timeout_gets_504(bot, monkeypatch):
    from fastapi.testclient import TestClient

    app = build_app(bot, ui=False, request_timeout=0.3)
    _slow_steps(monkeypatch, app.state.engine, 0.05)
    body = {"messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 200}
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 504 and "--request-timeout" in r.json()["error"]["message"]
        streamed = c.post("/v1/chat/completions", json={**body, "stream": True}).text
        assert '"timeout_error"' in streamed and streamed.endswith("data: [DONE]\n\n")
        ok = c.post("/v1/chat/completions", json={**body, "max_tokens": 2})
        assert ok.status_code == 200


def test_a_draining_server_answers_503_with_retry_after(bot):
    from fastapi.testclient import TestClient

    app = build_app(bot, ui=False)
    with TestClient(app) as c:
        app.state.engine.drain()
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "service_unavailable"
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"


def test_sigterm_drains_the_live_server_and_exits_0(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "glmgym.cli", "chat", "serve", "--model", "random:tiny", "--no-ui",
         "--port", str(port), "--max-batch", "1", "--drain-seconds", "1", "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.time() < deadline, server.stdout.read()
            time.sleep(0.1)

        async def clients():
            # greedy on the tiny model: 240 tokens without <eop>, about 0.3 s each
            body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 240,
                    "temperature": 0, "stream": True}
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                async def one():  # the stream's events, up to [DONE]
                    events = []
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                events.append(line[6:])
                    return events

                # 12 requests of up to 240 tokens, one row at a time: seconds of work
                tasks = [asyncio.create_task(one()) for _ in range(12)]
                while not (await client.get("/health")).json()["served"] and not all(t.done() for t in tasks):
                    await asyncio.sleep(0.02)
                server.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                late = await client.post("/v1/chat/completions", json={**body, "stream": False})
                return late, await asyncio.gather(*tasks)

        late, streams = asyncio.run(clients())
        assert server.wait(30) == 0
        output = server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
    assert late.status_code == 503 and late.headers["retry-after"]
    assert "draining" in output and "server stopped" in output
    ends = [json.loads(s[-2]) for s in streams]
    finished = [e for e in ends if "choices" in e and e["choices"][0]["finish_reason"]]
    cut = [e for e in ends if "error" in e]
    assert len(finished) + len(cut) == 12 and finished and cut  # some ended, the rest were cut at 1 s
    assert all("shut down" in e["error"]["message"] for e in cut)
    assert all(s[-1] == "[DONE]" for s in streams)


@pytest.mark.parametrize(("body", "fragment"), [
    (b"{not json", "JSON"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "assistant"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_requests_get_openai_shaped_4xx(bot, body, fragment):
    from fastapi.testclient import TestClient

    with TestClient(build_app(bot, ui=False)) as c:
        if isinstance(body, bytes):
            r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and fragment.lower() in error["message"].lower()


def test_api_key_is_required_when_set(bot, monkeypatch):
    from fastapi.testclient import TestClient

    with TestClient(build_app(bot, api_key="s3cret", ui=False)) as c:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = c.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert c.get("/v1/models", headers=headers).status_code == 401
            assert c.post("/", json={"prompt": "x"}, headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/chat/completions", json=body, headers=ok).status_code == 200
        assert c.get("/health").json()["status"] == "ok"


def test_web_chat_asks_for_the_api_key(bot):
    from fastapi.testclient import TestClient

    with TestClient(build_app(bot, api_key="k3y", ui=True)) as c:
        assert c.get("/ui/config").status_code == 401
        assert c.post("/ui/login", data={"username": "me", "password": "wrong"}).status_code == 400
        assert c.post("/ui/login", data={"username": "me", "password": "k3y"}).status_code == 200
        assert c.get("/ui/config").status_code == 200


def test_32_concurrent_clients_get_an_answer_or_429_and_the_server_stays_healthy(bot):
    app = build_app(bot, max_queue=4, ui=False)
    engine = app.state.engine

    async def one(client, i):
        body = {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 24, "seed": i}
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code == 429:
            assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
            return "busy"
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
        return "ok"

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    with live_server(app) as url:
        outcomes = asyncio.run(run(url))
        assert set(outcomes) <= {"ok", "busy"}
        assert outcomes.count("ok") >= 4 and outcomes.count("busy") >= 1
        assert _wait_idle(engine)
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["queue"] == 0
        assert engine.served == outcomes.count("ok")
        # still serving after the burst
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "again"}], "max_tokens": 3})
        assert r.status_code == 200


def _slow_steps(monkeypatch, engine, seconds=0.05):
    """`seconds` per batch step: a long answer is still running when its client leaves."""
    real = engine.backend.step

    def slow(interrupt=None):
        time.sleep(seconds)
        return real(interrupt)

    monkeypatch.setattr(engine.backend, "step", slow)


def test_a_client_that_leaves_mid_stream_frees_its_slot(bot, monkeypatch):
    app = build_app(bot, max_queue=1, ui=False)
    engine = app.state.engine
    _slow_steps(monkeypatch, engine)
    body = {"messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 200,
            "stream": True}
    with live_server(app) as url:
        with httpx.Client(base_url=url, timeout=30) as client, \
                client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            busy = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
            assert busy.status_code == 429  # the only slot is taken
        # leaving the `with` closed the connection after one chunk
        assert _wait_idle(engine, timeout=10)
        assert engine.cancelled == 1
        monkeypatch.undo()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200


def test_a_non_streaming_client_that_times_out_frees_its_slot(bot, monkeypatch):
    app = build_app(bot, max_queue=1, ui=False)
    engine = app.state.engine
    _slow_steps(monkeypatch, engine)
    body = {"messages": [{"role": "user", "content": "a long answer please"}], "max_tokens": 200}
    with live_server(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
        assert _wait_idle(engine, timeout=10)  # noticed within the server's 0.5 s poll
        assert engine.cancelled == 1


def test_requests_join_the_running_batch_and_answer_as_alone(bot, monkeypatch):
    app = build_app(bot, max_queue=8, max_batch=4, ui=False)
    engine = app.state.engine
    real = engine.backend.step
    gate = threading.Event()

    def gated(interrupt=None):  # the first step waits until every request has arrived
        gate.wait(10)
        return real(interrupt)

    def body(i):  # greedy: deterministic, so batched and lone answers must agree
        options = [{"temperature": 0}, {"temperature": 0, "top_p": 0.3}, {"temperature": 0, "stop": "zz"},
                   {"temperature": 0, "seed": 5}][i]
        return {"messages": [{"role": "user", "content": f"question number {i} " * (i + 1)}],
                "max_tokens": 10 + i, **options}

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=body(i))) for i in range(4)]
            while engine.pending < 4:
                await asyncio.sleep(0.01)
            gate.set()
            return [r.json()["choices"][0]["message"]["content"] for r in await asyncio.gather(*tasks)]

    monkeypatch.setattr(engine.backend, "step", gated)
    with live_server(app) as url:
        batched = asyncio.run(burst(url))
        # every request was in the batch at once, whatever its options
        assert engine.largest_batch == 4
        alone = [httpx.post(f"{url}/v1/chat/completions", json=body(i), timeout=60)
                 .json()["choices"][0]["message"]["content"] for i in range(4)]
    assert batched == alone


def test_openapi_fuzzing_finds_no_server_error(bot):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    app = build_app(bot, max_queue=64, ui=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []

    def fuzz(operation) -> None:
        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def one(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = min(case.body["max_tokens"], 8)  # keep answers short
            response = case.call()
            try:
                case.validate_response(response, checks=[not_a_server_error])
            except Exception as exc:
                failures.append(f"{operation.label}: {exc}")

        one()

    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /", "POST /v1/chat/completions", "GET /health"}
    for operation in operations:
        fuzz(operation)
    assert not failures, failures[:3]


def test_web_chat_streams_a_reply_in_headless_chromium(bot):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is needed (.ci/run installs it: apt-get install chromium)"
    app = build_app(bot, max_queue=4, ui=True)
    with live_server(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")  # redirects to /ui/
            page.wait_for_selector("textarea", timeout=60_000)
            page.fill("textarea", "hello there")
            page.keyboard.press("Enter")
            page.wait_for_selector('[data-testid="user"]', timeout=30_000)
            bot_message = page.wait_for_selector('[data-testid="bot"]', timeout=30_000)
            page.wait_for_function(
                "() => { const b = document.querySelector('[data-testid=\"bot\"]');"
                " return b && b.innerText.trim().length > 0; }", timeout=30_000)
            assert "hello there" in page.inner_text('[data-testid="user"]')
            assert bot_message.inner_text().strip()
        finally:
            browser.close()
    assert app.state.engine.served >= 1


def test_serve_cli_rejects_bad_options(capsys):
    from glmgym.cli import main

    assert main(["chat", "serve", "--model", "random:tiny", "--max-queue", "0"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert main(["chat", "serve", "--model", "random:tiny", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["chat", "serve", "--model", "random:tiny", "--prompt-lookup", "33"]) == 2
    assert "--prompt-lookup" in capsys.readouterr().err


def test_serve_defaults_bind_loopback():
    from glmgym.chat.serving.server import ServeConfig

    assert ServeConfig().host == "127.0.0.1"


def test_serve_cli_builds_the_app_with_the_key_from_the_environment(monkeypatch, capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    from glmgym.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.update(
        app=self.config.app, host=self.config.host, port=self.config.port))
    monkeypatch.setenv("GLMGYM_API_KEY", "from-env")
    assert main(["chat", "serve", "--model", "random:tiny", "--no-ui", "--port", "9123"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 9123)
    assert "API key required" in capsys.readouterr().out
    with TestClient(seen["app"]) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_serve_without_the_serve_extras_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from glmgym.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["chat", "serve", "--model", "random:tiny"]) == 2
    assert "pip install 'glmgym[serve]'" in capsys.readouterr().err


def _assemble_stream(body: str) -> dict:
    """A streamed response (server-sent events) folded into the shape of the plain one, as a
    client library does: texts and logprob lists joined per choice, the last finish reason."""
    choices: dict[int, dict] = {}
    usage = None
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for data in map(json.loads, events[:-1]):
        assert "error" not in data, data
        usage = data.get("usage") or usage
        for c in data["choices"]:
            got = choices.setdefault(c["index"], {"index": c["index"], "text": "", "finish_reason": None,
                                                  "logprobs": None})
            got["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
            got["finish_reason"] = c["finish_reason"] or got["finish_reason"]
            if c.get("logprobs"):
                if got["logprobs"] is None:
                    got["logprobs"] = {k: [] for k in c["logprobs"]}
                for k, v in c["logprobs"].items():
                    got["logprobs"][k] += v
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def _plain_shape(body: dict) -> dict:
    """A plain response in the fields `_assemble_stream` gives."""
    choices = [{"index": c["index"], "text": c["text"] if "text" in c else c["message"]["content"],
                "finish_reason": c["finish_reason"], "logprobs": c["logprobs"]} for c in body["choices"]]
    return {"choices": choices, "usage": body["usage"]}


@pytest.fixture(scope="module")
def deep_bot():
    """A tiny model six layers deep: with a small --prefill-chunk, prompts take one, two or six
    prefill steps."""
    from glmgym.chat.session import ChatGLM
    from glmgym.chat.tiny import build_tiny

    model, tokenizer = build_tiny(seed=1, num_layers=6)
    return ChatGLM(model, tokenizer, "random:deep")


@pytest.mark.parametrize(("repeats", "steps"), [(1, 1), (5, 2), (100, 6)])
def test_plain_and_streamed_answers_are_equal_field_by_field(deep_bot, monkeypatch, repeats, steps):
    from fastapi.testclient import TestClient

    import glmgym.chat.serving.server as server

    # the plain path watches for a disconnect while it waits: a watch that fires between any two
    # events must not end the answer early (it did: empty answers after a prefill longer than 0.5 s)
    monkeypatch.setattr(server, "DISCONNECT_POLL_S", 0.001)
    text = " ".join(["hello world"] * repeats)
    # prefill steps at --prefill-chunk 8: layers per step = 8 * 6 // prompt tokens
    assert -(-6 // max(1, 8 * 6 // len(deep_bot.tokenizer.encode(text)))) == steps
    chat = {"messages": [{"role": "user", "content": text}], "max_tokens": 6, "n": 2, "seed": 5,
            "temperature": 0.9, "logprobs": True, "top_logprobs": 2,
            "stream_options": {"include_usage": True}}
    completion = {"prompt": text, "max_tokens": 5, "n": 2, "seed": 3, "logprobs": 2, "stop": ["\x00"],
                  "stream_options": {"include_usage": True}}
    with TestClient(build_app(deep_bot, ui=False, prefill_chunk=8)) as c:
        for route, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
            plain = c.post(route, json=body)
            assert plain.status_code == 200, plain.text
            streamed = c.post(route, json={**body, "stream": True})
            assert streamed.status_code == 200
            got, want = _assemble_stream(streamed.text), _plain_shape(plain.json())
            assert got == want
            usage = want["usage"]
            assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
            for choice in want["choices"]:
                assert choice["text"] and choice["finish_reason"] in ("stop", "length")
        # a stop string cuts both paths at the same place
        full = _plain_shape(c.post("/v1/chat/completions", json={**chat, "n": 1}).json())
        stop = full["choices"][0]["text"][1:3]
        cut = {**chat, "n": 1, "stop": [stop]}
        plain = _plain_shape(c.post("/v1/chat/completions", json=cut).json())
        assert plain == _assemble_stream(c.post("/v1/chat/completions", json={**cut, "stream": True}).text)
        whole = full["choices"][0]["text"]
        assert plain["choices"][0]["finish_reason"] == "stop"
        assert plain["choices"][0]["text"] == whole[: whole.index(stop)]
