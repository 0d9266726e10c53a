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
    return pexpect.spawn(sys.executable, ["-m", "glmgym.cli", "chat", "--model", "random:tiny", *args],
                         encoding="utf-8", timeout=60, env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"},
                         preexec_fn=_default_sigint)


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


def test_missing_weights_say_how_to_get_them(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "glmgym.cli", "chat", "--prompt", "hi"],
                          capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "huggingface-cli download THUDM/chatglm-6b" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_quantize_and_threads_options(capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        argv = ["chat", "--model", "random:tiny", "--prompt", "hi", "--seed", "3", "--max-length", "48",
                "--quantize", "8", "--threads", "1"]
        assert main(argv) == 0
        assert capsys.readouterr().out.strip()
        assert torch.get_num_threads() == 1
        assert main([*argv[:-1], "0"]) == 2
        assert "--threads must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
