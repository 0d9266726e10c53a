"""Decision Transformer agents: offline training on D4RL / Minari data, evaluation in Gymnasium.

Example:
    >>> from glmgym.agents import Policy, TrainConfig, train  # doctest: +SKIP
    >>> run_dir = train(TrainConfig(dataset="d4rl:hopper-medium-v2", steps=1000))  # doctest: +SKIP
    >>> policy = Policy.from_pretrained(run_dir)  # its newest checkpoint  # doctest: +SKIP

The names below load on first use, so that importing a light module of this package (the
configs, for `glmgym --help`) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glmgym._lazy import lazy_exports

if TYPE_CHECKING:
    from glmgym.agents.config import DTConfig, EvalConfig, TrainConfig
    from glmgym.agents.data import OfflineDataset, WindowSampler, load_dataset
    from glmgym.agents.evaluate import evaluate, format_report
    from glmgym.agents.model import DecisionTransformer
    from glmgym.agents.policy import Policy
    from glmgym.agents.train import train

_HOMES = {
    "DTConfig": "config", "EvalConfig": "config", "TrainConfig": "config",
    "OfflineDataset": "data", "WindowSampler": "data", "load_dataset": "data",
    "evaluate": "evaluate", "format_report": "evaluate",
    "DecisionTransformer": "model", "Policy": "policy", "train": "train",
}

__all__ = [
    "DTConfig",
    "DecisionTransformer",
    "EvalConfig",
    "OfflineDataset",
    "Policy",
    "TrainConfig",
    "WindowSampler",
    "evaluate",
    "format_report",
    "load_dataset",
    "train",
]

lazy_exports(__name__, _HOMES)
