"""Decision Transformer agents: offline training on D4RL / Minari data, evaluation in Gymnasium.

Example:
    >>> from glmgym.agents import DecisionTransformer, TrainConfig, train  # doctest: +SKIP
    >>> run_dir = train(TrainConfig(dataset="d4rl:hopper-medium-v2", steps=1000))  # doctest: +SKIP
    >>> model = DecisionTransformer.from_pretrained(run_dir / "checkpoints/step_0001000")  # doctest: +SKIP
"""

from glmgym.agents.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from glmgym.agents.config import DTConfig, EvalConfig, TrainConfig
from glmgym.agents.data import OfflineDataset, WindowSampler, load_dataset
from glmgym.agents.evaluate import Policy, evaluate, format_report
from glmgym.agents.model import DecisionTransformer
from glmgym.agents.train import train

__all__ = [
    "Checkpoint",
    "DTConfig",
    "DecisionTransformer",
    "EvalConfig",
    "OfflineDataset",
    "Policy",
    "TrainConfig",
    "WindowSampler",
    "evaluate",
    "format_report",
    "load_checkpoint",
    "load_dataset",
    "save_checkpoint",
    "train",
]
