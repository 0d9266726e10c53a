"""ChatGLM2/3 and GLM-4 tokenizers and chat prompts against THUDM's tokenizer code.

The golden ids come from the reference code run on the small tokenizer files in `fixtures/`
(see `fixtures/make_tokenizer_fixtures.py`): a corpus of mixed Chinese, English, code, emoji and
whitespace, and chat prompts with history, a system message with tools, and tool observations.
"""

import json
from pathlib import Path

import pytest

from glmgym.chat.config import GenerationConfig
from glmgym.chat.formats import ChatFormat
from glmgym.chat.tokenizer_v2 import GLM2Tokenizer, GLM4Tokenizer, train_bpe_file
from glmgym.errors import GlmgymError

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "tokenizer_v2_golden.json").read_text())


@pytest.fixture(scope="module")
def sp3():
    return GLM2Tokenizer(FIXTURES / "glm2_tokenizer.model", roles=True)


@pytest.fixture(scope="module")
def bpe():
    return GLM4Tokenizer(FIXTURES / "glm4_tokenizer.model")


def test_chatglm3_tokenizes_and_decodes_the_corpus_as_the_reference(sp3):
    g = GOLDEN["chatglm3"]
    assert [sp3.tokenize(t) for t in GOLDEN["corpus"]] == g["ids"]
    assert [sp3.decode(i) for i in g["ids"]] == g["decoded"]
    assert sp3.stop_ids == g["stop"]
    # a role token's string typed by a user stays text
    assert sp3.command("<|user|>") not in sp3.tokenize("<|user|> hi")


@pytest.mark.parametrize("family", ["chatglm3", "glm4", "chatglm2"])
def test_chat_prompts_equal_the_reference(family, sp3, bpe):
    tok = {
        "chatglm3": sp3,
        "glm4": bpe,
        "chatglm2": GLM2Tokenizer(FIXTURES / "glm2_tokenizer.model", roles=False),
    }
    fmt = ChatFormat(family, tok[family])
    for chat in GOLDEN[family]["chats"]:
        history = [tuple(p) for p in chat["history"]] if family == "chatglm2" else chat["history"]
        got = fmt.prompt_ids(chat["query"], history, chat.get("role", "user"))
        assert got == chat["ids"], chat["query"]


def test_glm4_encodes_the_corpus_and_round_trips_it(bpe):
    assert [bpe.tokenize(t) for t in GOLDEN["corpus"]] == GOLDEN["glm4"]["ids"]
    for text in GOLDEN["corpus"]:
        assert bpe.decode(bpe.tokenize(text)) == text
    ids = [bpe.command("<|assistant|>"), *bpe.tokenize("name\n{}")]
    assert bpe.decode(ids) == "<|assistant|>name\n{}"
    assert bpe.token_text(bpe.command("<|user|>")) == "<|user|>"


def test_chatglm2_has_no_roles_and_stops_at_eos_only():
    tok = GLM2Tokenizer(FIXTURES / "glm2_tokenizer.model", roles=False)
    assert not tok.roles and tok.stop_ids == [tok.eos_id]
    with pytest.raises(GlmgymError, match="no control token"):
        tok.command("<|user|>")
    assert ChatFormat("chatglm2", tok).tools is False


def test_bad_tokenizer_files_get_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not base64 at all !!\n")
    with pytest.raises(GlmgymError, match="not a GLM-4 BPE file"):
        GLM4Tokenizer(bad)
    bad.write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(GlmgymError, match="ranks"):
        GLM4Tokenizer(bad)
    with pytest.raises(GlmgymError, match="not a SentencePiece model"):
        GLM2Tokenizer(bad)
    with pytest.raises(GlmgymError, match="does not exist"):
        GLM2Tokenizer(tmp_path / "missing.model")


def test_a_bpe_file_trained_here_loads_and_round_trips(tmp_path):
    path = train_bpe_file("hello world 你好 世界\n" * 30, tmp_path / "tokenizer.model", vocab_size=270)
    tok = GLM4Tokenizer(path)
    assert tok.vocab_size == 270 + 14
    assert tok.decode(tok.tokenize("hello 世界 😀")) == "hello 世界 😀"


def test_history_is_trimmed_keeping_the_system_message(sp3):
    fmt = ChatFormat("chatglm3", sp3)
    system = {"role": "system", "content": "be brief"}
    turns = [{"role": "user", "content": "问题" * 20}, {"role": "assistant", "content": "回答" * 20}] * 4
    full = len(fmt.prompt_ids("最后", [system, *turns]))
    cfg = GenerationConfig(max_length=full, max_new_tokens=10)
    with pytest.warns(UserWarning, match="dropped"):
        ids, kept = fmt.fit(10_000, "最后", [system, *turns], cfg)
    assert kept[0] == system and len(kept) < 9 and len(ids) + 10 <= full
    with pytest.raises(GlmgymError, match="exceeds"):
        fmt.fit(10_000, "最后", [system, *turns], cfg, trim=False)
