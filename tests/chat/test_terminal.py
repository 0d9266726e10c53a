"""Drive `glmgym chat` through a pseudo-terminal, as a person would."""

import signal
import subprocess
import sys

import pexpect

from glmgym.cli import main

PROMPT = r"you\): "


def _default_sigint() -> None:
    # A shell that runs the suite in the background (`cmd &`) ignores SIGINT, and children inherit
    # that; the chat must see Ctrl-C as a person's terminal delivers it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(*args):
    return pexpect.spawn(
        sys.executable,
        ["-m", "glmgym.cli", "chat", "--model", "random:tiny", *args],
        encoding="utf-8",
        timeout=60,
        env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"},
        preexec_fn=_default_sigint,
    )


def test_interactive_chat_clear_interrupt_and_stop():
    child = _spawn("--seed", "0", "--max-length", "1800")
    child.expect("random weights")  # says that its output is noise
    child.expect("clear")  # the welcome line explains the commands
    child.expect(PROMPT)
    child.sendline("hello 你好")
    child.expect("ChatGLM-6B: ")
    child.expect(PROMPT)  # the streamed reply ended and the next prompt is shown
    child.sendline("clear")
    child.expect("history cleared")
    child.expect(PROMPT)
    # a long reply interrupted with Ctrl-C: the session survives. The random model may end a reply
    # (sample <eop>) before the signal lands; then the next prompt shows first, and we ask again.
    for _ in range(5):
        child.sendline("tell me a long story")
        child.expect("ChatGLM-6B: ")
        child.kill(signal.SIGINT)
        if child.expect([r"\[interrupted\]", PROMPT]) == 0:
            break
    else:
        raise AssertionError("no reply was still streaming when Ctrl-C arrived, in 5 tries")
    child.expect(PROMPT)
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_shot_prompt_prints_the_answer(capsys):
    argv = ["chat", "--model", "random:tiny", "--prompt", "hi", "--seed", "3", "--max-length", "48"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.strip()
    main(argv)
    assert capsys.readouterr().out == first  # seeded: reproducible
    greedy = ["chat", "--model", "random:tiny", "--prompt", "hi hi hi", "--temperature", "1e-6",
              "--max-length", "48"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    assert main([*greedy, "--prompt-lookup", "4"]) == 0
    assert capsys.readouterr().out == plain  # speculation changes the speed, not the answer
    assert main([*greedy, "--prompt-lookup", "99"]) == 2
    assert "prompt_lookup_num_tokens must be in 0..32" in capsys.readouterr().err


def test_missing_weights_say_how_to_get_them(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "glmgym.cli", "chat", "--prompt", "hi"],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "huggingface-cli download THUDM/chatglm-6b" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_quantize_and_threads_options(capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        argv = [
            "chat",
            "--model",
            "random:tiny",
            "--prompt",
            "hi",
            "--seed",
            "3",
            "--max-length",
            "48",
            "--quantize",
            "8",
            "--threads",
            "1",
        ]
        assert main(argv) == 0
        assert capsys.readouterr().out.strip()
        assert torch.get_num_threads() == 1
        assert main([*argv[:-1], "0"]) == 2
        assert "--threads must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_a_tool_call_in_the_terminal_asks_for_its_result(monkeypatch, capsys, tmp_path):
    import json

    from glmgym.chat.config import ChatCLIConfig
    from glmgym.chat.terminal import _converse, _start, read_tools

    from .serving.test_tools import CALL_TEXT, TOOLS, _scripted_bot

    bot = _scripted_bot("glm4", CALL_TEXT["glm4"])  # calls get_weather(city="北京") every turn
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(TOOLS))
    typed = iter(["北京天气？", '{"temperature": 22}'])  # then Ctrl-D at the next result and prompt

    def type_in(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", type_in)
    seen = []
    stream = bot.stream_chat
    monkeypatch.setattr(
        bot, "stream_chat", lambda q, h, role, **g: (seen.append((q, role)), stream(q, h, role, **g))[1]
    )
    cfg = ChatCLIConfig(model="scripted", temperature=0.01)
    assert _converse(bot, cfg, {"do_sample": False}, _start(bot, None, read_tools(tools_file))) == 0
    out = capsys.readouterr().out
    assert '[calls get_weather({"city": "北京"})]' in out
    # the typed result went back to the model as an observation
    assert seen == [("北京天气？", "user"), ('{"temperature": 22}', "observation")]


def test_system_prompts_and_tools_need_a_model_with_roles(tmp_path, capsys):
    bad = tmp_path / "tools.json"
    bad.write_text('{"not": "a list"}')
    assert main(["chat", "--model", "random:tiny-chatglm3", "--tools", str(bad), "--prompt", "hi"]) == 2
    assert "must hold a list of tools" in capsys.readouterr().err
    assert main(["chat", "--model", "random:tiny", "--system", "be brief", "--prompt", "hi"]) == 2
    assert "has no system prompt" in capsys.readouterr().err
    argv = [
        "chat",
        "--model",
        "random:tiny-glm4",
        "--system",
        "be brief",
        "--prompt",
        "hi",
        "--seed",
        "1",
        "--max-length",
        "64",
    ]
    assert main(argv) == 0
