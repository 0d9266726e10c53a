import pytest

from glmgym.chat import kernel_choice
from glmgym.chat.tiny import build_tiny, tiny_corpus
from glmgym.chat.tokenizer import ChatGLMTokenizer, train_sentencepiece


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A small SentencePiece model with ChatGLM's pieces, trained on mixed zh/en text."""
    return train_sentencepiece(tiny_corpus(400, seed=1), tmp_path_factory.mktemp("sp") / "ice_text")


@pytest.fixture(scope="session")
def tokenizer(sp_model):
    return ChatGLMTokenizer(sp_model)


@pytest.fixture(scope="session")
def tiny():
    return build_tiny(seed=0)


@pytest.fixture(autouse=True)
def kernel_choices_in_tmp(tmp_path, monkeypatch):
    """A test that acts as an AVX-512 CPU times its kernels into its own cache, not the user's."""
    monkeypatch.setattr(kernel_choice, "cache_path", lambda: tmp_path / "kernel_choice.json")
