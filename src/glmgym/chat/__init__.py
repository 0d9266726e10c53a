"""ChatGLM-6B inference: the GLM architecture, checkpoint and tokenizer loading, chat.

Example:
    >>> from glmgym import chat  # doctest: +SKIP
    >>> bot = chat.load("THUDM/chatglm-6b")  # doctest: +SKIP
    >>> response, history = bot.chat("你好")  # doctest: +SKIP
    >>> bot4 = chat.load("THUDM/chatglm-6b", quantize=4)  # INT4, fastest kernel here  # doctest: +SKIP
"""

from glmgym.chat.batch import RunningBatch, TokenOut
from glmgym.chat.config import PRESETS, GLMConfig
from glmgym.chat.engine import Engine
from glmgym.chat.generate import GenerationConfig, generate
from glmgym.chat.model import GLMModel, KVCache
from glmgym.chat.quantize import QuantizedLinear, QuantSpec, quantize_model
from glmgym.chat.session import ChatGLM, HistoryTrimmedWarning, build_prompt, load, process_response
from glmgym.chat.tokenizer import ChatGLMTokenizer

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
