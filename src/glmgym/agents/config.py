"""Typed configs of the agents pillar.

`DTConfig` mirrors Hugging Face's `DecisionTransformerConfig` field for field (same names, same
meaning, same defaults), so a `config.json` written by either library loads in the other.
`TrainConfig`, `EvalConfig`, `CollectConfig` and `PlayConfig` are the options of `glmgym agent
train` / `evaluate` / `collect` / `play`; the CLI is generated from them, so their defaults are the
only defaults. This module is the pillar's one config home and imports no torch (`glmgym --help`
stays light).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from glmgym.errors import GlmgymError

__all__ = [
    "ACTIVATIONS", "LEVELS", "PRESETS", "CollectConfig", "DTConfig", "EvalConfig", "PlayConfig",
    "TrainConfig",
]

LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
"""Dataset levels `glmgym agent collect` makes (D4RL's names)."""

ACTIVATIONS = ("relu", "gelu", "gelu_new", "tanh", "silu")

# GPT-2 options of the HF config that change the math; glmgym supports their default value only
# and refuses a config that sets another one rather than silently computing something else.
_UNSUPPORTED_IF_SET = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "scale_attn_weights": True,
}


@dataclass
class DTConfig:
    """Architecture of a Decision Transformer (Hugging Face `DecisionTransformerConfig` fields)."""

    state_dim: int = 17
    """Size of the state (observation) vector."""
    act_dim: int = 4
    """Size of the action vector."""
    hidden_size: int = 128
    """Width of every token embedding and of the GPT encoder."""
    max_ep_len: int = 4096
    """Rows of the timestep embedding: the largest timestep the model can embed, plus one."""
    action_tanh: bool = True
    """Squash predicted actions with tanh (actions live in [-1, 1])."""
    vocab_size: int = 1
    """Rows of the (unused) GPT token embedding `encoder.wte`, kept for checkpoint compatibility."""
    n_positions: int = 1024
    """Rows of the GPT position embedding `encoder.wpe` (only row 0 is used, as in HF)."""
    n_layer: int = 3
    """Number of transformer blocks."""
    n_head: int = 1
    """Attention heads per block."""
    n_inner: int | None = None
    """Inner width of the MLP; None means 4 * hidden_size."""
    activation_function: str = "relu"
    """MLP activation: relu, gelu, gelu_new, tanh or silu."""
    resid_pdrop: float = 0.1
    """Dropout after the attention and MLP projections."""
    embd_pdrop: float = 0.1
    """Dropout on the token embeddings."""
    attn_pdrop: float = 0.1
    """Dropout on the attention probabilities."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of the encoder's layer norms."""
    initializer_range: float = 0.02
    """Standard deviation of the normal weight initialization."""

    def __post_init__(self) -> None:
        for name in ("state_dim", "act_dim", "hidden_size", "max_ep_len", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GlmgymError(f"DTConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_head:
            raise GlmgymError(
                f"hidden_size ({self.hidden_size}) must be divisible by n_head ({self.n_head})"
            )
        if self.activation_function not in ACTIVATIONS:
            raise GlmgymError(
                f"unsupported activation_function {self.activation_function!r}; "
                f"choose one of {', '.join(ACTIVATIONS)}"
            )

    @property
    def inner_size(self) -> int:
        """The MLP's inner width."""
        return self.n_inner if self.n_inner is not None else 4 * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` content, readable by `transformers.DecisionTransformerConfig`."""
        out = {"architectures": ["DecisionTransformerModel"], "model_type": "decision_transformer"}
        out.update(dataclasses.asdict(self))
        out.update(_UNSUPPORTED_IF_SET)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DTConfig:
        """Build from a `config.json` dict; unknown generic HF keys are ignored.

        Raises:
            GlmgymError: the config is not a Decision Transformer, or sets an option glmgym does
                not implement.
        """
        model_type = data.get("model_type", "decision_transformer")
        if model_type != "decision_transformer":
            raise GlmgymError(f"config.json has model_type {model_type!r}, not 'decision_transformer'")
        for key, supported in _UNSUPPORTED_IF_SET.items():
            if key in data and data[key] != supported:
                raise GlmgymError(f"config.json sets {key}={data[key]!r}; glmgym supports {supported!r} only")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise GlmgymError(f"config.json is malformed: {exc}") from None


# Schedules: "paper" is the paper's (100k steps, 10k warmup); "cpu" trains the same network for
# 1250 steps with 250 warmup and evaluates once, at the end, so that the default `glmgym agent
# train` finishes within 10 minutes, install included, on a slow 2-core AVX2 CPU (2.0 GHz EPYC).
# Over 3 seeds it scores about 6 normalized points below the 4k-step schedule it replaced, and
# varies more (`benchmarks/quickstart_schedule.py`, docs/agents/training.md).
PRESETS = {
    "paper": {"steps": 100_000, "warmup_steps": 10_000, "eval_every": 10_000, "save_every": 10_000},
    "cpu": {"steps": 1_250, "warmup_steps": 250, "eval_every": 1_250, "save_every": 625},
}


@dataclass
class TrainConfig:
    """Options of `glmgym agent train`. The architecture and optimizer are the paper's
    (Chen et al. 2021, gym); the schedule comes from `preset`."""

    dataset: str = "embedded:hopper-medium"
    """Dataset spec: embedded:NAME, d4rl:NAME, d4rl:PATH.hdf5, minari:ID, random:ENV_ID[:EPISODES],
    or a path."""
    preset: str = field(default="cpu", metadata={"choices": tuple(PRESETS)})
    """Schedule preset for --steps, --warmup-steps, --eval-every and --save-every: cpu (1250 steps,
    under 10 min on 2 cores) or paper (100k steps)."""
    env: str | None = None
    """Gymnasium env id for evaluation; default: derived from the dataset (hopper -> Hopper-v5)."""
    steps: int | None = None
    """Total gradient steps (default: from --preset)."""
    batch_size: int = 64
    """Windows per gradient step (global: split across processes under torchrun)."""
    context_len: int = 20
    """K, the number of timesteps in a window."""
    windows: str = field(default="end", metadata={"choices": ("end", "start")})
    """How training windows are cut: end (a uniformly drawn transition ends the window, as d3rlpy:
    every step as often) or start (a uniform start, as kzl/decision-transformer: an episode's
    first steps are trained about 1/K as often as its middle, and on mixed data the return-to-go
    barely steers the model; see docs/agents/datasets.md)."""
    init: str = field(default="paper", metadata={"choices": ("paper", "gpt2")})
    """How the return, state and action embeddings and the action head start: paper (PyTorch's
    nn.Linear default, uniform in +-1/sqrt(fan_in), as the paper's code and d3rlpy leave them) or
    gpt2 (N(0, 0.02) like the transformer, as transformers' DecisionTransformerModel; glmgym's
    default until 2026-12-06, and the better one on walker2d-medium-expert). The transformer and
    the timestep embedding start as GPT-2's either way (as d3rlpy's); see docs/agents/training.md."""
    hidden_size: int = 128
    """Transformer width."""
    n_layer: int = 3
    """Transformer blocks."""
    n_head: int = 1
    """Attention heads."""
    dropout: float = 0.1
    """Dropout for embeddings, residuals and attention."""
    learning_rate: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int | None = None
    """Linear learning-rate warmup steps, constant afterwards (default: from --preset)."""
    grad_clip: float = 0.25
    """Gradient norm clip."""
    reward_scale: float = 1000.0
    """Returns-to-go are divided by this before entering the model."""
    max_ep_len: int = 1000
    """Largest episode length (size of the timestep embedding)."""
    target_returns: tuple[float, ...] | None = field(
        default=None, metadata={"flag": "--target-return", "metavar": "R"}
    )
    """Returns to condition on at evaluation; default: the paper's for the env, else 1x and 0.5x
    the best return in the dataset."""
    eval_every: int | None = None
    """Evaluate every N steps, 0: only at the end (default: from --preset)."""
    eval_episodes: int = 10
    """Episodes per target return at each evaluation (0: no evaluation)."""
    save_every: int | None = None
    """Write a checkpoint every N steps and at the end (default: from --preset)."""
    log_every: int = 100
    """Write a log line every N steps."""
    seed: int = 0
    """Seed for weights, batches and evaluation episodes."""
    precision: str = field(default="auto", metadata={"choices": ("auto", "fp32", "bf16")})
    """fp32, or bf16 autocast for the forward pass; auto: bf16 where the hardware has native bf16
    matmuls (CUDA Ampere+, CPUs with AVX512-BF16/AMX), else fp32."""
    device: str = "auto"
    """Torch device: auto (cuda when present), cpu, cuda, cuda:1, ..."""
    out: str | None = None
    """Run directory; default: runs/dt-<dataset>-<time>. Must not hold an earlier run."""
    resume: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Continue the run in DIR (a run directory or one of its checkpoints) exactly where it stopped."""
    download: bool = False
    """Allow Minari to download a dataset that is not in the local store."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise GlmgymError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        positive = ("steps", "batch_size", "context_len", "hidden_size", "n_layer", "n_head",
                    "max_ep_len", "log_every", "save_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise GlmgymError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "eval_episodes", "warmup_steps"):
            if getattr(self, name) < 0:
                raise GlmgymError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise GlmgymError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0 or self.reward_scale <= 0 or self.grad_clip <= 0:
            raise GlmgymError("--learning-rate, --reward-scale and --grad-clip must be positive")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise GlmgymError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass
class EvalConfig:
    """Options of `glmgym agent evaluate`."""

    checkpoint: str = field(default="", metadata={"metavar": "DIR"})
    """Checkpoint directory (glmgym's, or one written by transformers' save_pretrained)."""
    env: str | None = None
    """Gymnasium env id; default: the one recorded in the checkpoint."""
    episodes: int = 10
    """Episodes per target return, run at once in a vector env."""
    target_returns: tuple[float, ...] | None = field(
        default=None, metadata={"flag": "--target-return", "metavar": "R"}
    )
    """Returns to condition on; default: those recorded in the checkpoint."""
    sweep: int | None = field(default=None, metadata={"metavar": "N"})
    """Instead of --target-return: N targets evenly spaced from the training data's worst episode
    return to 1.25x its best (as recorded in the checkpoint), with the slope and spread of the
    achieved return against the target."""
    plot: str | None = field(default=None, metadata={"metavar": "PNG"})
    """Also draw the achieved return against the target return to PNG."""
    seed: int = 0
    """Seed of the first episode; episode i uses seed + i."""
    json: str | None = field(default=None, metadata={"metavar": "FILE"})
    """Also write the report as JSON to FILE."""
    device: str = "auto"
    """Torch device: auto, cpu, cuda, ..."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise GlmgymError("--checkpoint DIR is required")
        if self.episodes <= 0:
            raise GlmgymError(f"--episodes must be positive, got {self.episodes}")
        if self.sweep is not None and (self.sweep < 2 or self.target_returns):
            raise GlmgymError("--sweep N needs N >= 2 and no --target-return")


@dataclass
class CollectConfig:
    """Options of `glmgym agent collect`."""

    env: str = "Hopper-v5"
    """Gymnasium env id (Box observations and actions)."""
    levels: str = "medium,medium-replay,expert"
    """Comma-separated dataset levels: random, medium, medium-replay, expert, medium-expert."""
    steps: int = 1_000_000
    """SAC training steps (environment steps) for the expert."""
    dataset_steps: int = 1_000_000
    """Transitions per collected dataset (whole episodes, at least this many)."""
    snapshot_every: int = 10_000
    """Save and score a policy snapshot every N training steps (medium candidates)."""
    snapshot_episodes: int = 5
    """Episodes that score each snapshot."""
    ref_episodes: int = 100
    """Episodes for the random and expert reference returns."""
    learning_starts: int = 10_000
    """Uniform-random steps before SAC starts learning."""
    seed: int = 0
    """Seed of SAC, the environments and the random policy."""
    out: str | None = None
    """Output directory; default: datasets/<env>. Rerun with the same options to resume."""
    minari: bool = False
    """Also write each dataset to the local Minari store as glmgym/<env>/<level>-v0."""
    num_envs: int = 8
    """Environments stepped together when collecting datasets."""
    progress: bool = True
    """Show progress bars."""

    def level_list(self) -> list[str]:
        """The requested levels, validated."""
        levels = [x.strip() for x in self.levels.split(",") if x.strip()]
        bad = [x for x in levels if x not in LEVELS]
        if bad or not levels:
            raise GlmgymError(
                f"unknown level(s) {', '.join(bad) or '(none)'}; choose from {', '.join(LEVELS)}"
            )
        return levels

    def __post_init__(self) -> None:
        for name in ("steps", "dataset_steps", "snapshot_every", "snapshot_episodes", "ref_episodes",
                     "num_envs"):
            if getattr(self, name) <= 0:
                raise GlmgymError(f"--{name.replace('_', '-')} must be positive")
        if self.learning_starts < 0:
            raise GlmgymError("--learning-starts must be >= 0")
        self.level_list()


@dataclass
class PlayConfig:
    """Options of `glmgym agent play`."""

    video: str = field(default="", metadata={"metavar": "FILE"})
    """Output video (.mp4, .gif, ...); default: play-<env id>.mp4 in the current directory."""
    checkpoint: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Checkpoint or run directory; default: the shipped pretrained agent of --env (Hopper-v5)."""
    episodes: int = 1
    """Episodes to play one after the other."""
    target_return: float | None = field(default=None, metadata={"metavar": "R"})
    """Return to condition on; default: the first target recorded in the checkpoint."""
    env: str | None = None
    """Gymnasium env id; default: the one recorded in the checkpoint. Without --checkpoint it
    picks the shipped agent of that env."""
    seed: int = 0
    """Seed of the first episode."""
    fps: int = 30
    """Frames per second of the video (frames are taken every env_fps / fps steps)."""
    size: int = 480
    """Width and height of the frames in pixels."""

    def __post_init__(self) -> None:
        if self.episodes <= 0 or self.fps <= 0 or self.size < 16:
            raise GlmgymError("--episodes and --fps must be positive and --size at least 16")
