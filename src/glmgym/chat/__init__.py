"""ChatGLM-6B inference: the GLM architecture, checkpoint and tokenizer loading, chat.

Example:
    >>> from glmgym import chat  # doctest: +SKIP
    >>> bot = chat.load("THUDM/chatglm-6b")  # doctest: +SKIP
    >>> response, history = bot.chat("你好")  # doctest: +SKIP
    >>> bot4 = chat.load("THUDM/chatglm-6b", quantize=4)  # INT4, fastest kernel here  # doctest: +SKIP

The names below load on first use, so that importing a light module of this package (the
configs, for `glmgym --help`) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glmgym._lazy import lazy_exports

if TYPE_CHECKING:
    from glmgym.chat.config import PRESETS, GenerationConfig, GLMConfig
    from glmgym.chat.generate import generate
    from glmgym.chat.model import GLMModel, KVCache
    from glmgym.chat.quantize import QuantizedLinear, QuantSpec, quantize_model
    from glmgym.chat.serving.batch import RunningBatch, TokenOut
    from glmgym.chat.serving.engine import Engine
    from glmgym.chat.session import ChatGLM, load
    from glmgym.chat.template import HistoryTrimmedWarning, build_prompt, process_response
    from glmgym.chat.tokenizer import ChatGLMTokenizer

_HOMES = {
    "RunningBatch": "serving.batch", "TokenOut": "serving.batch",
    "PRESETS": "config", "GLMConfig": "config", "GenerationConfig": "config",
    "Engine": "serving.engine", "generate": "generate", "GLMModel": "model", "KVCache": "model",
    "QuantizedLinear": "quantize", "QuantSpec": "quantize", "quantize_model": "quantize",
    "ChatGLM": "session", "HistoryTrimmedWarning": "template", "build_prompt": "template",
    "load": "session", "process_response": "template", "ChatGLMTokenizer": "tokenizer",
}

__all__ = [
    "PRESETS",
    "ChatGLM",
    "ChatGLMTokenizer",
    "Engine",
    "GLMConfig",
    "GLMModel",
    "GenerationConfig",
    "HistoryTrimmedWarning",
    "KVCache",
    "QuantSpec",
    "QuantizedLinear",
    "RunningBatch",
    "TokenOut",
    "build_prompt",
    "generate",
    "load",
    "process_response",
    "quantize_model",
]

lazy_exports(__name__, _HOMES)
