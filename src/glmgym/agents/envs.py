"""Dataset names -> Gymnasium env ids, D4RL reference scores, vector environments."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from glmgym.errors import GlmgymError, import_extra

__all__ = [
    "D4RL_REF_SCORES",
    "ENV_IDS",
    "PAPER_TARGET_RETURNS",
    "RefScores",
    "env_family",
    "env_id_for_dataset",
    "make_env",
    "make_vector_env",
    "normalized_score",
    "reference_scores",
]

ENV_IDS = {
    "hopper": "Hopper-v5",
    "halfcheetah": "HalfCheetah-v5",
    "walker2d": "Walker2d-v5",
    "ant": "Ant-v5",
}


@dataclass(frozen=True)
class RefScores:
    """Returns that map to normalized scores 0 (random policy) and 100 (expert)."""

    min: float
    max: float
    source: str


D4RL_REF_SCORES = {
    "hopper": RefScores(-20.272305, 3234.3, "D4RL"),
    "halfcheetah": RefScores(-280.178953, 12135.0, "D4RL"),
    "walker2d": RefScores(1.629008, 4592.3, "D4RL"),
    "ant": RefScores(-325.6, 3879.7, "D4RL"),
}

# Target returns of the paper's gym experiments (kzl/decision-transformer).
PAPER_TARGET_RETURNS = {
    "hopper": (3600.0, 1800.0),
    "halfcheetah": (12000.0, 6000.0),
    "walker2d": (5000.0, 2500.0),
    "ant": (6000.0, 3000.0),  # not in the paper; chosen the same way (above the best D4RL return)
}


def env_family(name: str | None) -> str | None:
    """'hopper-medium-v2', 'mujoco/hopper/medium-v0' or 'Hopper-v5' -> 'hopper' (or None)."""
    if not name:
        return None
    lowered = name.lower().replace("/", "-").replace("_", "-")
    for family in sorted(ENV_IDS, key=len, reverse=True):
        if family in lowered.split("-") or lowered.startswith(family):
            return family
    return None


def env_id_for_dataset(dataset_name: str, recorded_env_id: str | None = None) -> str:
    """The Gymnasium env to evaluate a dataset in: hopper -> Hopper-v5 (v5 also for D4RL's v2)."""
    family = env_family(dataset_name)
    if family is not None:
        return ENV_IDS[family]
    if recorded_env_id:
        return recorded_env_id
    raise GlmgymError(
        f"cannot tell which environment dataset {dataset_name!r} comes from; pass --env ENV_ID"
    )


def reference_scores(env_id: str | None, metadata: dict | None = None) -> RefScores | None:
    """The dataset's own reference scores when its metadata has them (glmgym's collected data,
    Minari); else D4RL's for the four MuJoCo families; else None."""
    metadata = metadata or {}
    if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        return RefScores(float(metadata["ref_min_score"]), float(metadata["ref_max_score"]), "dataset")
    family = env_family(env_id)
    if family in D4RL_REF_SCORES:
        return D4RL_REF_SCORES[family]
    return None


def normalized_score(returns: np.ndarray | float, ref: RefScores) -> np.ndarray:
    """D4RL normalized score, x100: 100 * (R - min) / (max - min)."""
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref.min) / (ref.max - ref.min)


def _mujoco_warning(message: str) -> None:
    # DeprecationWarning for the assets' deprecated attributes: Python shows those only to the
    # code that can act on them, which here is Gymnasium's, not the user's.
    category = DeprecationWarning if "deprecated" in message else RuntimeWarning
    warnings.warn(f"MuJoCo: {message}", category, stacklevel=2)


@contextmanager
def _mujoco_warnings_to_python() -> Iterator[None]:
    """Route MuJoCo's C-level warnings to Python's `warnings` while environments are built.

    MuJoCo's default handler prints every warning and appends it to `MUJOCO_LOG.TXT` in the
    working directory. With mujoco >= 3.3, Gymnasium's HalfCheetah asset raises a deprecation
    warning for each env built (ten lines and a stray file per evaluation). The handler is global
    to the process, so the previous one comes back on exit.
    """
    try:
        import mujoco
    except ImportError:  # not a MuJoCo env, or the simulator is missing (reported by make)
        yield
        return
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(_mujoco_warning)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def make_env(env_id: str, **env_kwargs):
    """One Gymnasium env, with MuJoCo's warnings routed to Python's (see `make_vector_env`).

    Raises:
        GlmgymError: unknown env id or missing simulator.
    """
    return _make(env_id, None, env_kwargs)


def make_vector_env(env_id: str, num_envs: int, **env_kwargs):
    """A synchronous Gymnasium vector env (MuJoCo steps are too cheap to pay for processes).

    MuJoCo's warnings while the envs are built go to Python's `warnings` instead of the terminal
    and a `MUJOCO_LOG.TXT` in the working directory.

    Raises:
        GlmgymError: unknown env id or missing simulator.
    """
    return _make(env_id, num_envs, env_kwargs)


def _make(env_id: str, num_envs: int | None, env_kwargs: dict):
    gym = import_extra("gymnasium", "agents")

    try:
        with _mujoco_warnings_to_python():
            if num_envs is None:
                return gym.make(env_id, **env_kwargs)
            return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync", **env_kwargs)
    except gym.error.Error as exc:
        raise GlmgymError(f"cannot create environment {env_id!r}: {exc}") from None
    except (ImportError, ModuleNotFoundError) as exc:
        raise GlmgymError(f"cannot create environment {env_id!r}: missing dependency ({exc})") from None
