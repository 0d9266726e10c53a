"""ChatGLM-6B's chat template and answer post-processing, and the answer's text as tokens arrive.

Both the `ChatGLM` facade (`session.py`) and the serving engine stand on this module: the prompt
format of a conversation, how it is fitted into the context, and how generated tokens become the
answer a user sees.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from glmgym.chat.config import GenerationConfig
from glmgym.chat.tokenizer import ChatGLMTokenizer
from glmgym.errors import GlmgymError

__all__ = [
    "History",
    "HistoryTrimmedWarning",
    "IncrementalDecoder",
    "Reply",
    "build_prompt",
    "fit_prompt",
    "process_response",
]

History = list[tuple[str, str]]
"""Earlier turns of a conversation: (query, response) pairs, oldest first."""

_PUNCT = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")]


@dataclass
class Reply:
    """An answer as the user sees it so far, with its token counts."""

    response: str | dict
    """The post-processed answer so far (ChatGLM3/GLM-4: a dict for a tool call, see
    `formats.ChatFormat.answer`)."""
    history: list
    """The history kept for the prompt, plus this turn."""
    prompt_tokens: int
    """Tokens of the prompt."""
    completion_tokens: int
    """Tokens generated so far (<eop> included once reached)."""
    ended: bool
    """The model emitted a stop token (<eop>; the v2 models' end or next-role tokens)."""


class HistoryTrimmedWarning(UserWarning):
    """The oldest turns of a conversation were dropped to fit the context."""


def build_prompt(query: str, history: History | None = None) -> str:
    """The v1.1 chat prompt: the raw query without history, else numbered rounds."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def process_response(response: str) -> str:
    """The reference's clean-up: strip, date placeholder, full-width punctuation next to CJK."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_p, full in _PUNCT:
        response = re.sub(rf"([\u4e00-\u9fff]){ascii_p}", rf"\1{full}", response)
        response = re.sub(rf"{ascii_p}([\u4e00-\u9fff])", rf"{full}\1", response)
    return response


def fit_prompt(tokenizer: ChatGLMTokenizer, context: int, query: str, history: History,
               cfg: GenerationConfig, trim: bool = True) -> tuple[list[int], History]:
    """Prompt ids and the history they hold; the oldest turns are dropped (with a
    `HistoryTrimmedWarning`) until the prompt leaves room for the answer.

    Args:
        tokenizer: the model's tokenizer.
        context: the model's `max_sequence_length`.
        query, history: the conversation.
        cfg: its `max_length` and `max_new_tokens` bound the prompt.
        trim: drop the oldest turns when the prompt does not fit; False raises instead.

    Raises:
        GlmgymError: the prompt does not fit, and `trim` is off or dropping turns is not enough.
    """
    limit = min(cfg.max_length, context)
    # trimming keeps room for a useful answer; without it, any room is enough unless asked for more
    room = cfg.max_new_tokens or (min(256, limit // 4) if trim else 1)
    history = list(history)
    dropped = 0
    while True:
        ids = tokenizer.encode(build_prompt(query, history))
        if len(ids) + room <= limit:
            break
        if not trim:
            raise GlmgymError(f"the prompt has {len(ids)} tokens; with {room} new tokens it exceeds "
                              f"the context of {limit} tokens (shorten the history or ask for trimming)")
        if not history:
            break
        history.pop(0)
        dropped += 1
    if dropped:
        message = f"dropped the {dropped} oldest turn(s) of the history to fit max_length {limit}"
        warnings.warn(HistoryTrimmedWarning(message), stacklevel=4)
    if len(ids) >= limit:
        raise GlmgymError(f"the query alone has {len(ids)} tokens, more than max_length {limit} allows")
    return ids, history


class IncrementalDecoder:
    """The decoded text of a growing answer, one token at a time, equal to `decode(all tokens)`.

    Each token decodes a short window (the tokens since the last finished piece of text, plus a
    few before them for the spacing SentencePiece gives a piece at the start of a text) instead of
    the whole answer, so an answer of n tokens costs O(n) decoding, not O(n^2). Text that ends in
    an unfinished UTF-8 character (a byte-fallback piece) waits for the bytes that finish it, as
    vLLM's detokenizer does.
    """

    CONTEXT = 4
    """Tokens decoded before the new ones, for spacing."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tok = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        """The answer's text so far (what `decode(tokens)` gives, but held back at an unfinished
        character)."""
        self._prefix = 0  # the window starts here
        self._read = 0  # tokens before this are in `text`

    def push(self, token: int) -> str:
        """Add one token; return the text so far."""
        self.tokens.append(token)
        before = self.tok.decode(self.tokens[self._prefix : self._read])
        after = self.tok.decode(self.tokens[self._prefix :])
        if after.endswith("\ufffd"):  # an unfinished character: wait for its other bytes
            return self.text
        if after.startswith(before):
            self.text += after[len(before) :]
        else:  # the window's decoding was not local here: take the whole answer's
            self.text = self.tok.decode(self.tokens)
        self._read = len(self.tokens)
        self._prefix = max(0, self._read - self.CONTEXT)
        return self.text

    @property
    def held_back(self) -> bool:
        """Some tokens' text waits for the rest of a character."""
        return self._read < len(self.tokens)

    def finish(self) -> str:
        """The whole answer's text (whatever was held back included)."""
        if self.held_back:
            self.text = self.tok.decode(self.tokens)
            self._read = len(self.tokens)
        return self.text
