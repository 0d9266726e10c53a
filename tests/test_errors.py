"""Missing extras: one line naming the extra to install, exit code 2, no traceback."""

import sys

import pytest

from glmgym.cli import main
from glmgym.errors import GlmgymError, import_extra


def test_import_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    with pytest.raises(GlmgymError, match=r"needs sentencepiece.*pip install 'glmgym\[chat\]'"):
        import_extra("sentencepiece", "chat")
    assert import_extra("json", "chat") is sys.modules["json"]


def test_chat_without_the_chat_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    from glmgym.chat.tokenizer import ChatGLMTokenizer

    with pytest.raises(GlmgymError, match=r"glmgym\[chat\]"):
        ChatGLMTokenizer(tmp_path / "ice_text.model")
    assert main(["chat", "--model", "random:tiny", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'glmgym[chat]'" in err[0]


def test_agent_commands_without_the_agents_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "h5py", None)
    assert main(["agent", "datasets"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'glmgym[agents]'" in err[0]
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    from glmgym.agents.envs import make_vector_env

    with pytest.raises(GlmgymError, match=r"glmgym\[agents\]"):
        make_vector_env("Hopper-v5", 1)
