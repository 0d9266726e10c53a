"""The chat pillar's configuration home: the architecture (`GLMConfig`, read from a checkpoint's
`config.json`), decoding (`GenerationConfig`) and every command's options, all torch-free so that
`glmgym --help` stays light. The model-loading options are declared once, in `ModelOptions`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmgym.errors import GlmgymError

__all__ = [
    "DTYPE_CHOICES",
    "FAMILIES",
    "PRESETS",
    "ChatCLIConfig",
    "ChatEvalConfig",
    "FinetuneConfig",
    "GLM2Config",
    "GLMConfig",
    "GenerationConfig",
    "MergeLoraConfig",
    "ModelOptions",
    "QuantizeConfig",
    "ServeConfig",
    "load_config",
]

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
FINETUNE_METHODS = ("ptuning", "lora", "full")


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
        if not self.position_encoding_2d:  # every published ChatGLM-6B uses the 2D rotary embedding
            raise GlmgymError("position_encoding_2d false is not a published configuration")
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise GlmgymError("2D rotary embedding needs a head size divisible by 4")

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_attention_heads

    version = 1
    """GLM generation: 1 (ChatGLM-6B's block) or 2 (ChatGLM2/3, GLM-4)."""
    family = "chatglm"
    """The chat family member (prompt format, tokenizer, tool calls)."""

    @property
    def kv_heads(self) -> int:
        """Key/value heads the KV cache stores (every head in v1)."""
        return self.num_attention_heads

    embeddings_name = "transformer.word_embeddings"
    """The word embedding module's name in the checkpoint."""
    head_name = "lm_head"
    """The output layer's module name (v1: tied to the embeddings, not stored apart)."""
    tied_head = True
    """The output layer shares the embedding matrix."""

    @property
    def quantized_linears(self) -> list[str]:
        """The block Linear layers that INT4/INT8 quantize (THUDM's choice too), by full name."""
        names = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
        return [f"transformer.layers.{i}.{n}" for i in range(self.num_layers) for n in names]

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer."""
        return [self.eos_token_id]

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
        return cls.from_dict(_read_config_json(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        """`config.json` content in THUDM's format."""
        return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", **dataclasses.asdict(self)}


def _read_config_json(path: Path) -> dict[str, Any]:
    """A `config.json` as a dict; missing, malformed or non-object files get one clear error."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GlmgymError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GlmgymError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GlmgymError(f"{path} is not a config (a JSON object)")
    return data


FAMILIES = ("chatglm", "chatglm2", "chatglm3", "glm4")
"""The ChatGLM family members glmgym runs: v1 ChatGLM-6B, then the v2 block's ChatGLM2-6B,
ChatGLM3-6B and GLM-4-9B-chat (each with its own prompt format and tokenizer)."""


@dataclass
class GLM2Config:
    """The second-generation GLM block (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat), with the field
    names of THUDM's `config.json`; the defaults are ChatGLM3-6B's."""

    num_layers: int = 28
    """Transformer blocks."""
    padded_vocab_size: int = 65024
    """Rows of the word embedding and of the (untied) output layer."""
    hidden_size: int = 4096
    """Model width."""
    ffn_hidden_size: int = 13696
    """SwiGLU width (dense_h_to_4h outputs twice this)."""
    kv_channels: int = 128
    """Size of one attention head."""
    num_attention_heads: int = 32
    """Query heads."""
    seq_length: int = 8192
    """Longest sequence (prompt + answer) the model supports."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every norm."""
    rmsnorm: bool = True
    """RMSNorm (every published model) or LayerNorm."""
    apply_residual_connection_post_layernorm: bool = False
    """Residuals from the normalized input instead of the input."""
    post_layer_norm: bool = True
    """A final norm after the last block."""
    add_bias_linear: bool = False
    """Biases on every linear layer."""
    add_qkv_bias: bool = True
    """A bias on the query/key/value projection."""
    multi_query_attention: bool = True
    """Grouped-query attention with `multi_query_group_num` key/value groups."""
    multi_query_group_num: int = 2
    """Key/value groups (when `multi_query_attention`)."""
    rope_ratio: float = 1.0
    """Long-context rotary scaling: ChatGLM3-32k/128k and GLM-4 multiply the base by it,
    ChatGLM2-6B-32k divides the positions by it."""
    original_rope: bool = True
    """The reference's rotary flag (every published model: True; no other is implemented)."""
    eos_token_id: int | list[int] = 2
    """Tokens that end an answer (GLM-4 lists three)."""
    pad_token_id: int = 0
    """Padding id (left padding)."""
    pre_seq_len: int | None = None
    """P-Tuning v2 prefix length (None: no prefix)."""
    prefix_projection: bool = False
    """P-Tuning v2: an MLP maps the prefix embedding to the key/values."""
    quantization_bit: int = 0
    """4 or 8 for quantized checkpoints (THUDM's or glmgym's), 0 for float weights."""
    quantization_group_size: int = 0
    """glmgym's field: INT4 group size (0: one scale per output row, THUDM's scheme)."""
    torch_dtype: str = "float16"
    """Dtype the checkpoint was saved in."""
    glmgym_family: str = ""
    """glmgym's field: `chatglm2`, `chatglm3` or `glm4` (prompt format, tokenizer, rotary scaling).
    Empty: inferred from the checkpoint's name and vocabulary (see `load_config`)."""

    version = 2
    """GLM generation: 1 (ChatGLM-6B's block) or 2 (ChatGLM2/3, GLM-4)."""

    def __post_init__(self) -> None:
        if self.glmgym_family and self.glmgym_family not in FAMILIES[1:]:
            raise GlmgymError(f"glmgym_family must be one of {', '.join(FAMILIES[1:])}, "
                              f"not {self.glmgym_family!r}")
        if self.num_attention_heads % self.kv_heads:
            raise GlmgymError("num_attention_heads must be a multiple of multi_query_group_num")
        if self.kv_channels % 4:
            raise GlmgymError("rotary embedding on half of each head needs kv_channels divisible by 4")
        if not self.original_rope:
            raise GlmgymError("original_rope false is not a published configuration")

    @property
    def family(self) -> str:
        """The chat family member; `chatglm3` unless the checkpoint says otherwise."""
        return self.glmgym_family or "chatglm3"

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.kv_channels

    @property
    def kv_heads(self) -> int:
        """Key/value heads the KV cache stores (the groups)."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    embeddings_name = "transformer.embedding.word_embeddings"
    """The word embedding module's name in the checkpoint."""
    head_name = "transformer.output_layer"
    """The output layer's module name (untied)."""
    tied_head = False
    """The output layer shares the embedding matrix."""
    quantization_embeddings = False
    """The v2 checkpoints never quantize their embeddings."""

    @property
    def quantized_linears(self) -> list[str]:
        """The block Linear layers that INT4/INT8 quantize (THUDM's choice too), by full name."""
        return [f"transformer.encoder.layers.{i}.{n}" for i in range(self.num_layers)
                for n in ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                          "mlp.dense_4h_to_h")]

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding and the output layer."""
        return self.padded_vocab_size

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence (prompt + answer)."""
        return self.seq_length

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer."""
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GLM2Config:
        """Build from a ChatGLM2/3 or GLM-4 `config.json` dict (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names and v is not None}
        try:
            return cls(**values)
        except TypeError as exc:
            raise GlmgymError(f"config.json is malformed: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """`config.json` content in THUDM's format (plus glmgym's fields)."""
        return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", **dataclasses.asdict(self)}


def load_config(path: str | Path) -> GLMConfig | GLM2Config:
    """Read a ChatGLM `config.json`: a v1 (`GLMConfig`) or v2 (`GLM2Config`) block.

    Every family member says `model_type: chatglm`; the v2 block is told by its own fields
    (`multi_query_group_num`, `padded_vocab_size`, `ffn_hidden_size`). The v2 family member is
    glmgym's `glmgym_family` when present, else read from the checkpoint's name (`_name_or_path`)
    and vocabulary: GLM-4's is 151552 rows.

    Raises:
        GlmgymError: missing, not JSON, or not a ChatGLM config.
    """
    path = Path(path)
    data = _read_config_json(path)
    if data.get("model_type", "chatglm") != "chatglm":
        raise GlmgymError(f"{path}: model_type {data['model_type']!r} is not a ChatGLM model")
    if not {"multi_query_group_num", "padded_vocab_size", "ffn_hidden_size"} & set(data):
        return GLMConfig.from_dict(data)
    if not data.get("glmgym_family"):
        name = str(data.get("_name_or_path", "")).lower().replace("-", "")
        if "glm4" in name or data.get("padded_vocab_size") == 151552:
            data = {**data, "glmgym_family": "glm4"}
        elif "chatglm2" in name or "codegeex2" in name:
            data = {**data, "glmgym_family": "chatglm2"}
    return GLM2Config.from_dict(data)


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
    # the v2 block (chatglm2-6b's hub config says 32768 positions; chatglm3-6b's 8192)
    "chatglm2-6b": GLM2Config(seq_length=32768, glmgym_family="chatglm2"),
    "chatglm3-6b": GLM2Config(glmgym_family="chatglm3"),
    "glm-4-9b-chat": GLM2Config(num_layers=40, padded_vocab_size=151552, seq_length=131072, rope_ratio=500.0,
                                eos_token_id=[151329, 151336, 151338], pad_token_id=151329,
                                torch_dtype="bfloat16", glmgym_family="glm4"),
}


MAX_DRAFT_TOKENS = 32
"""The most draft tokens a speculative step verifies."""


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
    prompt_lookup_num_tokens: int = 0
    """Speculative decoding by prompt lookup: draft up to this many tokens per step from earlier
    in the sequence and verify them in one forward (0: off). Exact: the same greedy output, the
    same sampling distribution; it pays when answers repeat their prompt."""

    @classmethod
    def of(cls, options: dict[str, Any]) -> GenerationConfig:
        """A config from keyword options.

        Raises:
            TypeError: an option that is not a field.
        """
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        return cls(**options)

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
        if not 0 <= self.prompt_lookup_num_tokens <= MAX_DRAFT_TOKENS:
            raise GlmgymError(f"prompt_lookup_num_tokens must be in 0..{MAX_DRAFT_TOKENS}, got "
                              f"{self.prompt_lookup_num_tokens}")


# ---------------------------------------------------------------------------------------------
# Command options


@dataclass
class ModelOptions:
    """How a command loads the model (shared by chat, serve and evaluate)."""

    model: str = "THUDM/chatglm-6b"
    """Checkpoint directory, hub id (from the local cache, or downloaded when online), or
    random:tiny (a tiny random model: its output is noise)."""
    dtype: str | None = field(default=None, metadata={"choices": DTYPE_CHOICES})
    """Weights and compute dtype; default: bfloat16 where the hardware has it, else float32 on CPU."""
    device: str = "auto"
    """Torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    quantize: int | None = field(default=None, metadata={"choices": (4, 8)})
    """Quantize the block weights to INT4 or INT8 while loading (quantized checkpoints load as
    they are)."""
    threads: int | None = None
    """CPU threads for PyTorch; default: all physical cores."""
    ptuning_checkpoint: str | None = field(default=None, metadata={"metavar": "DIR"})
    """A P-Tuning v2 checkpoint (checkpoint-N/ of `glmgym chat finetune` or THUDM's ptuning)
    whose prefix is added to the model."""
    lora: str | None = field(default=None, metadata={"metavar": "DIR"})
    """A PEFT LoRA adapter, merged into the float weights at load (before --quantize)."""


@dataclass
class ChatCLIConfig(ModelOptions):
    """Options of `glmgym chat`."""

    prompt: str | None = field(default=None, metadata={"metavar": "TEXT"})
    """Answer this one message on stdout and exit."""
    max_length: int = GenerationConfig.max_length
    """Longest prompt + answer in tokens; older turns are dropped to fit."""
    top_p: float = GenerationConfig.top_p
    """Nucleus sampling mass."""
    temperature: float = GenerationConfig.temperature
    """Sampling temperature."""
    seed: int | None = None
    """Sampling seed, for reproducible answers."""
    system: str | None = field(default=None, metadata={"metavar": "TEXT"})
    """A system prompt (ChatGLM3-6B, GLM-4)."""
    tools: str | None = field(default=None, metadata={"metavar": "JSON"})
    """A JSON file of tools in OpenAI's shape (`[{"type": "function", "function": {...}}]`) the
    model may call (ChatGLM3-6B, GLM-4); you type each call's result."""
    prompt_lookup: int = field(default=0, metadata={"metavar": "K"})
    """Speculative decoding: draft up to K tokens per step from the conversation and verify them
    in one forward (0: off). The same answers; faster when answers quote earlier text."""


@dataclass
class ServeConfig(ModelOptions):
    """Options of `glmgym chat serve`."""

    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 keeps the server local, 0.0.0.0 exposes it."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = field(default=None, metadata={"metavar": "KEY"})
    """Require `Authorization: Bearer KEY` on the API routes and /metrics, and the key as the web
    chat's password (default: $GLMGYM_API_KEY; none when unset)."""
    max_queue: int = 32
    """Requests waiting or running at once; more get 429 at once."""
    max_batch: int = 8
    """Rows decoded together; waiting requests join the running batch between any two steps."""
    prefill_chunk: int = 512
    """Prompt tokens' worth of prefill per decoding step: a long prompt holds up the running rows
    for at most about this much work at a time."""
    request_timeout: float | None = field(default=None, metadata={"metavar": "SECONDS"})
    """End a request that runs longer than this (from its arrival) with a 504 error."""
    drain_seconds: float = 30.0
    """On SIGTERM or Ctrl-C: seconds to let running requests finish (new ones get 503) before
    the rest are cancelled and the server exits."""
    ui: bool = True
    """Mount the Gradio web chat at /ui."""
    prompt_lookup: int = field(default=0, metadata={"metavar": "K"})
    """Speculative decoding by prompt lookup for requests that do not set
    `prompt_lookup_num_tokens` themselves: up to K draft tokens per step (0: off)."""


@dataclass
class ChatEvalConfig(ModelOptions):
    """Options of `glmgym chat evaluate`."""

    model: str = field(default="", metadata={"required": True, "metavar": "DIR|ID"})
    """Checkpoint directory, hub id (from the local cache) or random:tiny."""
    file: str = field(default="", metadata={"required": True, "metavar": "FILE"})
    """JSON lines with the prompt and response columns."""
    out: str = field(default="", metadata={"required": True, "metavar": "DIR"})
    """Output directory (written atomically)."""
    prompt_column: str = "content"
    """Column of the prompt."""
    response_column: str = "summary"
    """Column of the reference answer."""
    history_column: str | None = None
    """Optional column of earlier [question, answer] turns."""
    max_source_length: int = 64
    """Prompt tokens kept."""
    max_target_length: int = 64
    """Longest generated answer, in tokens."""
    batch_size: int = 8
    """Prompts generated together."""
    do_sample: bool = True
    """Sample with top_p 0.7 and temperature 0.95 as the reference; --no-do-sample: greedy."""
    seed: int = 42
    """Sampling seed."""
    limit: int | None = None
    """Evaluate only the first N examples."""

    def __post_init__(self) -> None:
        if self.max_source_length < 1 or self.max_target_length < 1 or self.batch_size < 1:
            raise GlmgymError("--max-source-length, --max-target-length and --batch-size must be positive")
        if self.limit is not None and self.limit < 1:
            raise GlmgymError("--limit must be positive")


@dataclass
class FinetuneConfig:
    """Options of `glmgym chat finetune` (defaults: THUDM's `ptuning/train.sh`)."""

    model: str = field(default="", metadata={"required": True, "metavar": "DIR|ID"})
    """Base checkpoint directory, hub id (from the local cache) or random:tiny."""
    train_file: str = field(default="", metadata={"required": True, "metavar": "FILE"})
    """JSON lines with the prompt and response columns."""
    prompt_column: str = "content"
    """Column of the prompt (ADGEN: content; chat data: prompt)."""
    response_column: str = "summary"
    """Column of the answer (ADGEN: summary; chat data: response)."""
    history_column: str | None = None
    """Optional column of earlier [question, answer] turns (chat data: history)."""
    validation_file: str | None = field(default=None, metadata={"metavar": "FILE"})
    """JSON lines like --train-file; its mean loss is logged every --eval-every steps and at the end."""
    eval_every: int = 0
    """Log the validation loss every N steps (0: only at the end)."""
    method: str = field(default="ptuning", metadata={"choices": FINETUNE_METHODS})
    """ptuning (P-Tuning v2 prefix), lora (adapters on --lora-targets) or full (every weight)."""
    pre_seq_len: int = 128
    """P-Tuning v2: prefix length."""
    prefix_projection: bool = False
    """P-Tuning v2: an MLP between the prefix embedding and the keys/values."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 32.0
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA branch's input."""
    lora_targets: str = "query_key_value"
    """Comma-separated module names that get adapters."""
    quantize: int | None = field(default=None, metadata={"choices": (4, 8)})
    """Quantize the frozen base to INT4 or INT8 while loading (P-Tuning and LoRA)."""
    max_source_length: int = 64
    """Prompt tokens kept (the prompt is cut to max_source_length - 1)."""
    max_target_length: int = 64
    """Answer tokens kept (the answer is cut to max_target_length - 2)."""
    batch_size: int = 1
    """Examples per forward pass."""
    grad_accum: int = 16
    """Forward passes per optimizer step."""
    learning_rate: float = 2e-2
    """AdamW learning rate, decayed linearly to 0 (THUDM: 2e-2 for P-Tuning, 1e-4 full)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    steps: int = 3000
    """Optimizer steps."""
    save_every: int = 1000
    """Write a checkpoint every N steps and at the end."""
    log_every: int = 10
    """Write a log line every N steps."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% slower)."""
    precision: str = field(default="auto", metadata={"choices": ("auto", "fp32", "bf16")})
    """Compute dtype of the base: auto = bf16 where native, else fp32. Trained weights stay fp32."""
    device: str = "auto"
    """Torch device: auto, cpu, cuda, ..."""
    seed: int = 42
    """Seed of the data order, the new weights and dropout."""
    out: str | None = None
    """Run directory; default: runs/finetune-<method>-<time>."""
    resume: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Continue the run in DIR exactly where its newest checkpoint stopped."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.method not in FINETUNE_METHODS:
            raise GlmgymError(f"--method must be one of {', '.join(FINETUNE_METHODS)}, got {self.method!r}")
        for name in ("pre_seq_len", "lora_rank", "batch_size", "grad_accum", "steps", "save_every",
                     "log_every"):
            if getattr(self, name) <= 0:
                raise GlmgymError(f"--{name.replace('_', '-')} must be positive")
        if self.eval_every < 0:
            raise GlmgymError("--eval-every must be >= 0")
        if self.max_source_length < 2 or self.max_target_length < 3:
            raise GlmgymError("--max-source-length must be at least 2 and --max-target-length at least 3")
        if self.learning_rate <= 0 or not 0 <= self.lora_dropout < 1:
            raise GlmgymError("--learning-rate must be positive and --lora-dropout in [0, 1)")
        if self.quantize and self.method == "full":
            raise GlmgymError("--quantize works with --method ptuning or lora; "
                              "full fine-tuning needs a float base")


@dataclass
class QuantizeConfig:
    """Options of `glmgym chat quantize`."""

    model: str = field(default="", metadata={"required": True, "metavar": "SRC"})
    """Float checkpoint directory or hub id (from the local cache)."""
    bits: int = field(default=4, metadata={"required": True, "choices": (4, 8)})
    """4 or 8."""
    out: str = field(default="", metadata={"required": True, "metavar": "DIR"})
    """Output directory (written atomically)."""
    group_size: int | None = field(default=None, metadata={"metavar": "G"})
    """INT4 group size: 32, 64, 128 or 256 (default 128), or 0 for one scale per row (THUDM's
    scheme, loadable by THUDM's code)."""
    embeddings: bool = False
    """Also quantize the word embeddings (and so the tied lm_head), per row."""


@dataclass
class MergeLoraConfig:
    """Options of `glmgym chat merge-lora`."""

    model: str = field(default="", metadata={"required": True, "metavar": "SRC"})
    """Float base checkpoint directory or hub id (from the local cache)."""
    lora: str = field(default="", metadata={"required": True, "metavar": "DIR"})
    """PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors or .bin)."""
    out: str = field(default="", metadata={"required": True, "metavar": "DIR"})
    """Output directory (written atomically): a plain float checkpoint with the base's other files
    (config keys such as auto_map, tokenizer files, its *.py)."""
    dtype: str | None = field(default=None, metadata={"choices": ("float16", "bfloat16", "float32")})
    """The merged weights' dtype; default: the base's."""
