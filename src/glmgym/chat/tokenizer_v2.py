"""Tokenizers of the later ChatGLM family: ChatGLM2/3's SentencePiece model and GLM-4's BPE file.

Both behave as THUDM's tokenizer code does: the text vocabulary first, then the control tokens
(`[MASK] [gMASK] [sMASK] sop eop` in ChatGLM2, plus the role tokens `<|system|> <|user|>
<|assistant|> <|observation|>` in ChatGLM3; GLM-4's fourteen from `<|endoftext|>` on). A control
token's string typed in a message is encoded as plain text (the reference's default too), so a
user cannot end a turn or change role from inside a message. `decode` writes control tokens by
name, as the reference does, so that an answer of several assistant segments can be split.

GLM-4's `tokenizer.model` is a tiktoken file (base64 token, rank per line) read with `tiktoken`.
"""

from __future__ import annotations

import base64
from pathlib import Path

from glmgym.errors import GlmgymError, import_extra

__all__ = [
    "GLM4_PATTERN",
    "GLM2Tokenizer",
    "GLM4Tokenizer",
    "load_tokenizer_v2",
    "train_bpe_file",
    "train_sentencepiece_v2",
]

ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
CHATGLM2_SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
GLM4_SPECIAL = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    *ROLES,
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""GLM-4's pre-tokenization pattern (its tokenizer code's `pat_str`)."""


class _Vocab:
    """What the chat code needs of every v2 tokenizer, over `_text_ids` / `_text_decode`."""

    special: dict[str, int]
    file_name = "tokenizer.model"

    def command(self, name: str) -> int:
        """The id of a control token (`[gMASK]`, `<|user|>`, ...)."""
        try:
            return self.special[name]
        except KeyError:
            raise GlmgymError(f"this tokenizer has no control token {name!r}") from None

    @property
    def roles(self) -> bool:
        """The tokenizer has role tokens (ChatGLM3, GLM-4): tools and system prompts."""
        return "<|user|>" in self.special

    def decode(self, ids) -> str:
        """Text of `ids`, control tokens written by name (the reference's `decode`)."""
        names = {v: k for k, v in self.special.items()}
        out, run = [], []
        for i in map(int, ids):
            if i in names:
                out.append(self._text_decode(run))
                out.append(names[i])
                run = []
            else:
                run.append(i)
        out.append(self._text_decode(run))
        return "".join(out)

    def batch_encode(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Texts padded on the left to one length; returns (ids, number of pad tokens)."""
        encoded = [self.tokenize(t) for t in texts]
        width = max(len(e) for e in encoded)
        pads = [width - len(e) for e in encoded]
        return [[self.pad_id] * p + e for p, e in zip(pads, encoded)], pads


class GLM2Tokenizer(_Vocab):
    """ChatGLM2-6B / ChatGLM3-6B: SentencePiece (`tokenizer.model`) plus control tokens after it.

    Args:
        model_file: the SentencePiece model.
        roles: add ChatGLM3's role tokens (False: ChatGLM2).
    """

    def __init__(self, model_file: str | Path, roles: bool = True) -> None:
        spm = import_extra("sentencepiece", "chat")
        self.path = Path(model_file)
        if not self.path.is_file():
            raise GlmgymError(f"tokenizer model {self.path} does not exist")
        self._bytes = self.path.read_bytes()  # kept: `save` writes them (the file may be temporary)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self._bytes)
        except (RuntimeError, OSError) as exc:
            raise GlmgymError(f"{self.path} is not a SentencePiece model: {exc}") from None
        n = self.sp.vocab_size()
        names = CHATGLM2_SPECIAL + (ROLES if roles else ())
        self.special = {name: n + i for i, name in enumerate(names)}
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.unk_id()  # the reference pads with <unk>
        self.bos_id = self.special["sop"]

    @property
    def vocab_size(self) -> int:
        """Ids below this are tokens; larger model rows are never produced."""
        return self.sp.vocab_size() + len(self.special)

    @property
    def prefix(self) -> list[int]:
        """`[gMASK] sop`, the start of every prompt."""
        return [self.special["[gMASK]"], self.special["sop"]]

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer: </s>, and ChatGLM3's next-turn role tokens."""
        return [self.eos_id] + (
            [self.special["<|user|>"], self.special["<|observation|>"]] if self.roles else []
        )

    def tokenize(self, text: str) -> list[int]:
        """Ids of `text` (no control tokens)."""
        return self.sp.encode(text)

    def _text_decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids) if ids else ""

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (control tokens by name), for logprobs."""
        i = int(token_id)
        names = {v: k for k, v in self.special.items()}
        if i in names:
            return names[i]
        if not 0 <= i < self.sp.vocab_size() or i in (self.eos_id, self.sp.bos_id(), self.pad_id):
            return ""
        piece = self.sp.id_to_piece(i)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
        return piece.replace("\u2581", " ")

    def save(self, directory: Path) -> None:
        """Write `tokenizer.model` into `directory`."""
        (Path(directory) / self.file_name).write_bytes(self._bytes)


class GLM4Tokenizer(_Vocab):
    """GLM-4-9B-chat: byte-level BPE ranks (`tokenizer.model`, tiktoken format) plus control tokens.

    Args:
        model_file: the ranks file, one `base64(token) rank` per line.
    """

    def __init__(self, model_file: str | Path) -> None:
        tiktoken = import_extra("tiktoken", "chat")
        self.path = Path(model_file)
        if not self.path.is_file():
            raise GlmgymError(f"tokenizer model {self.path} does not exist")
        ranks: dict[bytes, int] = {}
        n = 0
        try:
            self._bytes = self.path.read_bytes()  # kept: `save` writes them (the file may be temporary)
            for n, line in enumerate(self._bytes.decode().splitlines(), 1):  # noqa: B007 (n: for the error)
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, UnicodeDecodeError) as exc:
            raise GlmgymError(f"{self.path} is not a GLM-4 BPE file (line {n}: {exc})") from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise GlmgymError(f"{self.path}: the ranks are not 0..{len(ranks) - 1}, each once")
        self.special = {name: len(ranks) + i for i, name in enumerate(GLM4_SPECIAL)}
        self.enc = tiktoken.Encoding(
            name=f"glm4:{self.path}", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=self.special
        )
        self._n_text = len(ranks)
        self.eos_id = self.pad_id = self.special["<|endoftext|>"]
        self.bos_id = self.special["<sop>"]

    @property
    def vocab_size(self) -> int:
        """Ids below this are tokens; larger model rows are never produced."""
        return self._n_text + len(self.special)

    @property
    def prefix(self) -> list[int]:
        """`[gMASK] <sop>`, the start of every prompt."""
        return [self.special["[gMASK]"], self.special["<sop>"]]

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer (GLM-4's config lists the same three)."""
        return [self.eos_id, self.special["<|user|>"], self.special["<|observation|>"]]

    def tokenize(self, text: str) -> list[int]:
        """Ids of `text`; control-token strings in it stay plain text."""
        return self.enc.encode(text, disallowed_special=())

    def _text_decode(self, ids: list[int]) -> str:
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace") if ids else ""

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (control tokens by name), for logprobs."""
        i = int(token_id)
        if not 0 <= i < self.vocab_size:
            return ""
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        """Write `tokenizer.model` into `directory`."""
        (Path(directory) / self.file_name).write_bytes(self._bytes)


def load_tokenizer_v2(model_dir: str | Path, family: str) -> GLM2Tokenizer | GLM4Tokenizer:
    """The tokenizer of a ChatGLM2/3 or GLM-4 checkpoint folder (`tokenizer.model`)."""
    path = Path(model_dir) / "tokenizer.model"
    if not path.is_file():
        raise GlmgymError(f"{model_dir} has no tokenizer.model (the {family} tokenizer)")
    if family == "glm4":
        return GLM4Tokenizer(path)
    return GLM2Tokenizer(path, roles=family == "chatglm3")


def train_sentencepiece_v2(lines: list[str], prefix: str | Path, vocab_size: int = 500) -> Path:
    """Train a small SentencePiece model laid out as ChatGLM2/3's (<unk> 0, <s> 1, </s> 2, byte
    fallback), for tests and demos. Returns the `.model` path."""
    spm = import_extra("sentencepiece", "chat")
    prefix = Path(prefix)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        split_digits=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
    )
    return prefix.with_suffix(".model")


def train_bpe_file(text: str, path: str | Path, vocab_size: int = 400) -> Path:
    """Train a small byte-level BPE with GLM-4's pattern (tiktoken's trainer) and write it in
    GLM-4's `tokenizer.model` format, for tests and demos."""
    import_extra("tiktoken", "chat")
    from tiktoken._educational import bpe_train

    ranks = bpe_train(text, vocab_size, GLM4_PATTERN, visualise=None)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
