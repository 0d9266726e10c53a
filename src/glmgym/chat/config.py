"""`GLMConfig`: the ChatGLM-6B (GLM v1) architecture, read from a checkpoint's `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmgym.errors import GlmgymError

__all__ = ["PRESETS", "GLMConfig", "GenerationConfig"]


@dataclass
class GLMConfig:
    """ChatGLM-6B hyperparameters, with the field names of THUDM's `config.json`."""

    vocab_size: int = 130528
    """Rows of the word embedding (and of the tied lm_head)."""
    hidden_size: int = 4096
    """Model width."""
    num_layers: int = 28
    """Transformer blocks."""
    num_attention_heads: int = 32
    """Attention heads per block (head size = hidden_size / heads)."""
    inner_hidden_size: int = 16384
    """MLP width."""
    max_sequence_length: int = 2048
    """Longest sequence (prompt + answer) the model supports."""
    position_encoding_2d: bool = True
    """2D rotary embedding: positions on the first half of each head, block positions on the second."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every layer norm."""
    bos_token_id: int = 130004
    """`<sop>`: starts the answer."""
    eos_token_id: int = 130005
    """`<eop>`: ends the answer."""
    mask_token_id: int = 130000
    """`[MASK]`."""
    gmask_token_id: int = 130001
    """`[gMASK]`: ends every prompt, before `<sop>`."""
    pad_token_id: int = 3
    """Padding id (left padding)."""
    pre_seq_len: int | None = None
    """P-Tuning v2 prefix length (None: no prefix)."""
    prefix_projection: bool = False
    """P-Tuning v2: an MLP maps the prefix embedding to the key/values."""
    quantization_bit: int = 0
    """4 or 8 for quantized checkpoints (THUDM's or glmgym's), 0 for float weights."""
    quantization_group_size: int = 0
    """glmgym's field: INT4 group size (0: one scale per output row, THUDM's scheme)."""
    quantization_embeddings: bool = False
    """Word embeddings and lm_head quantized too (THUDM's `-qe` checkpoints)."""
    num_residual_layers: int = 28
    """Layer count in the residual scale alpha = sqrt(2 * n). The reference never passes its
    num_layers to the blocks, so n is 28 for every model; kept as a field for that reason."""
    torch_dtype: str = "float16"
    """Dtype the checkpoint was saved in."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise GlmgymError("hidden_size must be divisible by num_attention_heads")
        if self.position_encoding_2d and (self.hidden_size // self.num_attention_heads) % 4:
            raise GlmgymError("2D rotary embedding needs a head size divisible by 4")

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GLMConfig:
        """Build from a ChatGLM `config.json` dict (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if values.get("quantization_bit") is None:
            values["quantization_bit"] = 0
        try:
            return cls(**values)
        except TypeError as exc:
            raise GlmgymError(f"config.json is malformed: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> GLMConfig:
        """Read `config.json`."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise GlmgymError(f"{path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise GlmgymError(f"{path} is not valid JSON: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """`config.json` content in THUDM's format."""
        return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", **dataclasses.asdict(self)}


PRESETS = {
    # THUDM/chatglm-6b v1.1 (the current hub revision)
    "chatglm-6b": GLMConfig(),
    # v1.0: 20000 image tokens in front of the text vocabulary shift every text id by 20000
    "chatglm-6b-v1.0": GLMConfig(vocab_size=150528, bos_token_id=150004, eos_token_id=150005,
                                 mask_token_id=150000, gmask_token_id=150001, pad_token_id=20003),
    # for tests and demos of the plumbing (width 128: INT4 groups of 128 fit every layer)
    "tiny": GLMConfig(vocab_size=1024, hidden_size=128, num_layers=2, num_attention_heads=4,
                      inner_hidden_size=512, max_sequence_length=256, bos_token_id=1004,
                      eos_token_id=1005, mask_token_id=1000, gmask_token_id=1001, pad_token_id=3,
                      torch_dtype="float32"),
}


@dataclass
class GenerationConfig:
    """Decoding options; the defaults are the reference's chat defaults."""

    max_length: int = 2048
    """Longest prompt + answer, in tokens."""
    max_new_tokens: int | None = None
    """Longest answer, in tokens (None: up to max_length)."""
    do_sample: bool = True
    """Sample; False: greedy."""
    top_p: float = 0.7
    """Nucleus sampling: keep the most likely tokens whose mass reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens (0: off)."""
    temperature: float = 0.95
    """Softmax temperature."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the sequence (HF semantics)."""
    seed: int | None = None
    """Seed of the sampler (None: nondeterministic)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise GlmgymError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise GlmgymError(f"temperature must be positive, got {self.temperature}")
        bad_new = self.max_new_tokens is not None and self.max_new_tokens <= 0
        if self.top_k < 0 or self.max_length <= 0 or bad_new:
            raise GlmgymError("top_k must be >= 0, max_length and max_new_tokens positive")
        if self.repetition_penalty <= 0:
            raise GlmgymError("repetition_penalty must be positive")
