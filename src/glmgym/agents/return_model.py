"""The best return reachable from a state: the `max-return` variant's target.

A Decision Transformer acts on the return-to-go it is given. Asking for a fixed return (the
paper's way) leaves the user to pick it, and once the episode drifts the decremented target no
longer matches what the data show is reachable from there. The return-aligned variants published
since (Elastic DT, Wu et al. 2023; Reinformer, Zhuang et al. 2024) instead estimate the *best*
return reachable from the current state with an expectile regression of the return-to-go (an
expectile near 1 approaches the maximum over the data's behaviours) and condition on that.

glmgym's form keeps the Decision Transformer untouched (Hugging Face layout, token order and
weights are those of a plain run): the estimate comes from a separate small network over the
normalized state and the timestep, fitted on the same data. Where we deviate from Reinformer:
it predicts the return from the transformer's own state token (which needs the token order
state, return, action) and conditions on the prediction alone; here the conditioning at step t is
max(target carried over from step t-1 less the reward, estimate at s_t), so a return the agent is
already on course for is not lowered (this scored higher than the estimate alone in our runs; see
docs/agents/evaluation.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from glmgym.errors import GlmgymError

if TYPE_CHECKING:
    from glmgym.agents.data import OfflineDataset

__all__ = ["RETURN_MODEL_FILE", "ReturnModel", "fit_return_model", "load_return_model",
           "save_return_model"]

RETURN_MODEL_FILE = "return_model.safetensors"
"""The return model's file inside a checkpoint directory."""


class ReturnModel(nn.Module):
    """An MLP from (normalized state, timestep) to an expectile of the return-to-go.

    Args:
        state_dim: size of a state.
        max_ep_len: timesteps are divided by this before entering the network.
        hidden_size: width of the two hidden layers.
        expectile: the expectile it was (or will be) fitted to; recorded in its file.
    """

    def __init__(self, state_dim: int, max_ep_len: int = 1000, hidden_size: int = 256,
                 expectile: float = 0.99) -> None:
        super().__init__()
        self.state_dim, self.max_ep_len = state_dim, max_ep_len
        self.hidden_size, self.expectile = hidden_size, expectile
        self.net = nn.Sequential(nn.Linear(state_dim + 1, hidden_size), nn.ReLU(),
                                 nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1))

    def forward(self, states: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """[n, state_dim] normalized states and [n] timesteps -> [n] return-to-go (scaled as the
        Decision Transformer's, i.e. divided by its reward scale)."""
        x = torch.cat([states, (timesteps.to(states.dtype) / self.max_ep_len)[:, None]], dim=-1)
        return self.net(x).squeeze(-1)

    @torch.inference_mode()
    def estimate(self, states: np.ndarray, timestep: int) -> np.ndarray:
        """The estimate for [n, state_dim] normalized states all at `timestep`, as a float32 array."""
        s = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))
        return self(s, torch.full((len(s),), float(timestep))).numpy()


def fit_return_model(
    dataset: OfflineDataset,
    state_mean: np.ndarray,
    state_std: np.ndarray,
    reward_scale: float,
    *,
    max_ep_len: int = 1000,
    expectile: float = 0.99,
    hidden_size: int = 256,
    steps: int = 5000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> ReturnModel:
    """Fit a `ReturnModel` to a dataset's returns-to-go by expectile regression: the loss is
    |expectile - 1(u < 0)| u^2 with u = return-to-go - prediction, over uniformly drawn transitions.

    It draws from its own generator and restores PyTorch's global random state, so fitting it
    beside a Decision Transformer leaves that run exactly as it would be without it.

    Args:
        dataset: the Decision Transformer's training data.
        state_mean: [state_dim] the Decision Transformer's state normalization.
        state_std: [state_dim] likewise.
        reward_scale: returns-to-go are divided by it, as the Decision Transformer's are.
        max_ep_len: the Decision Transformer's; later timesteps are clipped to it, as there.
        expectile: in (0, 1); near 1 approaches the best return the data reach from a state.
        hidden_size: width of the MLP.
        steps: Adam steps.
        batch_size: transitions per step.
        learning_rate: Adam's.
        seed: seeds the weights and the batches.

    Raises:
        GlmgymError: an expectile outside (0, 1).
    """
    from glmgym.agents.data import episode_bounds, returns_to_go

    if not 0.0 < expectile < 1.0:
        raise GlmgymError(f"the return model's expectile must be in (0, 1), got {expectile}")
    starts, lengths = episode_bounds(dataset.terminals, dataset.timeouts)
    # [n] step of each transition within its episode, clipped as the transformer's timesteps are
    steps_in = np.arange(dataset.num_transitions) - np.repeat(starts, lengths)
    t = torch.from_numpy(np.minimum(steps_in, max_ep_len - 1).astype(np.float32))
    y = torch.from_numpy(returns_to_go(dataset.rewards, starts, lengths) / np.float32(reward_scale))
    x = torch.from_numpy(((dataset.observations - state_mean) / state_std).astype(np.float32))
    n = len(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ReturnModel(x.shape[1], max_ep_len, hidden_size, expectile)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        u = y[idx] - model(x[idx], t[idx])
        loss = (torch.abs(expectile - (u < 0).float()) * u.square()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def save_return_model(model: ReturnModel, path: str | Path) -> None:
    """Write the weights and shape to a safetensors file (its sizes in the file's metadata)."""
    from safetensors.torch import save_file

    meta = {"state_dim": model.state_dim, "max_ep_len": model.max_ep_len,
            "hidden_size": model.hidden_size, "expectile": model.expectile}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "glmgym_return_model": json.dumps(meta)})


def load_return_model(path: str | Path) -> ReturnModel:
    """Read a file written by `save_return_model`.

    Raises:
        GlmgymError: the file is not one.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["glmgym_return_model"])
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        model = ReturnModel(int(meta["state_dim"]), int(meta["max_ep_len"]), int(meta["hidden_size"]),
                            float(meta["expectile"]))
        model.load_state_dict(state)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise GlmgymError(f"{path} is not a glmgym return model: {exc}") from None
    return model.eval()
