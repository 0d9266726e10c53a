import pytest

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
