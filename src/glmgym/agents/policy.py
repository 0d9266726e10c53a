"""An agent ready to act: the network plus what its checkpoint says about its inputs.

`Policy.from_pretrained` is the one way to load an agent from disk: it applies the state
normalization, reward scale and context length the model was trained with, which the bare
network (`DecisionTransformer.from_pretrained`) does not know about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmgym.agents.checkpoint import latest_checkpoint, read_checkpoint
from glmgym.agents.model import DecisionTransformer

__all__ = ["Policy"]


@dataclass
class Policy:
    """A model plus what it needs to act: normalization, reward scale and context length."""

    model: DecisionTransformer
    """The trained model (put in eval mode by the rollout)."""
    state_mean: np.ndarray
    """[state_dim] mean used to normalize observations."""
    state_std: np.ndarray
    """[state_dim] std used to normalize observations."""
    reward_scale: float = 1000.0
    """Returns-to-go are divided by this."""
    context_len: int = 20
    """K: the model sees the last K steps."""
    extras: dict[str, Any] = field(default_factory=dict)
    """The rest of the checkpoint's `glmgym.json`: env_id, target_returns, dataset,
    dataset_returns, ref_scores (empty for a bare transformers directory)."""

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Policy:
        """A checkpoint as a ready policy.

        A bare transformers directory (no `glmgym.json`) gets identity normalization, reward
        scale 1000 and context 20.

        Args:
            path: a checkpoint directory, or a run directory (its newest checkpoint).
            device: where the model runs.

        Raises:
            GlmgymError: no checkpoint there, or a malformed one.
        """
        files = read_checkpoint(latest_checkpoint(path))
        model = DecisionTransformer.from_checkpoint_files(files, device)
        extras, dim = files.extras, files.config.state_dim
        return cls(model,
                   np.asarray(extras.get("state_mean", np.zeros(dim)), dtype=np.float32),
                   np.asarray(extras.get("state_std", np.ones(dim)), dtype=np.float32),
                   float(extras.get("reward_scale", 1000.0)), int(extras.get("context_len", 20)),
                   extras)
