"""ChatGLM's tokenizer: SentencePiece (`ice_text.model`) plus ChatGLM's text rules.

- every `encode` appends `[gMASK] <sop>` (the prompt ends there and the answer starts);
- `\\n` is written as the piece `<n>`, a tab as `<|tab|>`, a run of 2..80 spaces as `<|blank_N|>`;
- special tokens [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK> are pieces of the
  model (ids 130000..130007 in v1.1); v1.0 checkpoints put 20000 image tokens in front of the text
  vocabulary, so every id is shifted by `num_image_tokens`;
- batches are padded on the left.

Two deliberate deviations from the reference (THUDM's Hugging Face tokenizer):

- special-token strings in the text (a user typing `<eop>` or `[gMASK]`) are encoded as plain
  text, never as the control tokens: the reference turns them into control tokens, so a user can
  end the answer or move the mask from inside a message;
- `decode` returns the text as the model wrote it: the reference applies Hugging Face's
  `clean_up_tokenization_spaces`, which deletes the space before `,` `.` `!` `?` and before
  `n't`-style contractions (`"a , b"` -> `"a, b"`, `"x != y"` -> `"x!= y"`) and so mangles code.
"""

from __future__ import annotations

import re
from pathlib import Path

from glmgym._io import atomic_write_json
from glmgym.errors import GlmgymError, import_extra

__all__ = ["SPECIAL_TOKENS", "ChatGLMTokenizer", "train_sentencepiece"]

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
MAX_BLANK = 80
TEXT_PIECES = ("<n>", "<|tab|>", *(f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)))
_BLANKS = re.compile(f" {{2,{MAX_BLANK}}}")
_BLANK_PIECE = re.compile(r"<\|blank_(\d+)\|>")


class ChatGLMTokenizer:
    """Encode/decode text for ChatGLM-6B.

    Args:
        model_file: the SentencePiece model (`ice_text.model`).
        num_image_tokens: id offset of the text vocabulary (20000 for v1.0, 0 for v1.1).
    """

    def __init__(self, model_file: str | Path, num_image_tokens: int = 0) -> None:
        spm = import_extra("sentencepiece", "chat")

        path = Path(model_file)
        if not path.is_file():
            raise GlmgymError(f"tokenizer model {path} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise GlmgymError(f"{path} is not a SentencePiece model: {exc}") from None
        self.offset = num_image_tokens
        unk = self.sp.unk_id()
        ids = {}
        for piece in (*SPECIAL_TOKENS, *TEXT_PIECES[:2]):
            pid = self.sp.piece_to_id(piece)
            if pid == unk:
                raise GlmgymError(f"{path} lacks ChatGLM's piece {piece!r}: not a ChatGLM tokenizer")
            ids[piece] = pid + self.offset
        self.special_ids = {ids[p] for p in SPECIAL_TOKENS}
        # the plain-text encoding of each special token's string, one piece per character (bytes
        # when a character has no piece), for special-token strings found in user text
        self._as_text = {ids[p]: self._char_pieces(p) for p in SPECIAL_TOKENS}
        self.mask_id, self.gmask_id, self.bos_id, self.eos_id = (
            ids["[MASK]"], ids["[gMASK]"], ids["<sop>"], ids["<eop>"])
        self.pad_id = self.sp.pad_id() + self.offset if self.sp.pad_id() >= 0 else 3 + self.offset

    @property
    def vocab_size(self) -> int:
        """Ids below this are real pieces; larger model rows are never produced."""
        return self.sp.get_piece_size() + self.offset

    @staticmethod
    def preprocess(text: str) -> str:
        """ChatGLM's text rules: newlines, tabs and runs of spaces become pieces."""
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        # runs longer than 80 split into 80s and a remainder, as the reference's loop from 80 down
        return _BLANKS.sub(lambda m: f"<|blank_{len(m.group())}|>", text)

    def _char_pieces(self, text: str) -> list[int]:
        unk, out = self.sp.unk_id(), []
        for ch in text:
            pid = self.sp.piece_to_id(ch)
            if pid == unk:
                pid = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode()]
                if unk in pid:
                    raise GlmgymError(f"the tokenizer cannot write {ch!r} as plain text")
            out += pid if isinstance(pid, list) else [pid]
        return [i + self.offset for i in out]

    def tokenize(self, text: str) -> list[int]:
        """Ids of `text` alone (no [gMASK] <sop>); special-token strings in it stay plain text."""
        ids = [i + self.offset for i in self.sp.encode(self.preprocess(text))]
        if self.special_ids.isdisjoint(ids):
            return ids
        return [j for i in ids for j in self._as_text.get(i, (i,))]

    def encode(self, text: str) -> list[int]:
        """Ids of a prompt: the text, then [gMASK] and <sop>."""
        return [*self.tokenize(text), self.gmask_id, self.bos_id]

    def decode(self, ids) -> str:
        """Text of `ids`; special tokens, padding and image tokens are dropped."""
        keep = [int(i) - self.offset for i in ids
                if int(i) not in self.special_ids and int(i) != self.pad_id and int(i) >= self.offset]
        text = self.sp.decode(keep)
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return _BLANK_PIECE.sub(lambda m: " " * int(m.group(1)), text)

    def token_text(self, token_id: int) -> str:
        """The text of one token as a piece on its own (a leading space kept; special tokens by
        name), for logprobs."""
        i = int(token_id) - self.offset
        if not 0 <= i < self.sp.get_piece_size():
            return ""
        piece = self.sp.id_to_piece(i)
        if int(token_id) in self.special_ids:
            return piece
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # a byte piece
            return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
        text = piece.replace("\u2581", " ").replace("<n>", "\n").replace("<|tab|>", "\t")
        return _BLANK_PIECE.sub(lambda m: " " * int(m.group(1)), text)

    def save(self, directory: Path) -> None:
        """Write `ice_text.model` (and `tokenizer_config.json` for v1.0's id offset) into `directory`."""
        (Path(directory) / "ice_text.model").write_bytes(self.sp.serialized_model_proto())
        if self.offset:
            atomic_write_json(Path(directory) / "tokenizer_config.json", {"num_image_tokens": self.offset})

    def batch_encode(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Prompts padded on the left to one length; returns (ids, number of pad tokens)."""
        encoded = [self.encode(t) for t in texts]
        width = max(len(e) for e in encoded)
        pads = [width - len(e) for e in encoded]
        return [[self.pad_id] * p + e for p, e in zip(pads, encoded)], pads


def train_sentencepiece(lines: list[str], prefix: str | Path, vocab_size: int = 1000,
                        max_piece_length: int = 16) -> Path:
    """Train a small SentencePiece model with ChatGLM's special and text pieces (tests, demos).

    `max_piece_length` caps a piece's characters (SentencePiece's default 16 lets a small corpus
    make whole phrases single pieces; ChatGLM's own pieces hold one to a few Chinese characters).
    Returns the path of the `.model` file.
    """
    spm = import_extra("sentencepiece", "chat")

    text_lines = [ChatGLMTokenizer.preprocess(line) for line in lines]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text_lines), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        user_defined_symbols=[*SPECIAL_TOKENS, *TEXT_PIECES], pad_id=3, unk_id=0, bos_id=1, eos_id=2,
        hard_vocab_limit=False, max_sentencepiece_length=max_piece_length, minloglevel=2,
    )
    return Path(f"{prefix}.model")
