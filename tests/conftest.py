"""Shared fixtures: isolated dataset stores and small D4RL-layout files written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

HOPPER_OBS, HOPPER_ACT = 11, 3


def write_d4rl(path: Path, n_episodes: int = 6, obs_dim: int = HOPPER_OBS, act_dim: int = HOPPER_ACT,
               seed: int = 0, lengths: list[int] | None = None, **overrides) -> Path:
    """Write a small D4RL-layout HDF5 file with random transitions; `overrides` replace arrays
    (a value of None removes the key)."""
    import h5py

    rng = np.random.default_rng(seed)
    lengths = lengths or list(rng.integers(15, 60, size=n_episodes))
    n = int(sum(lengths))
    terminals = np.zeros(n, bool)
    timeouts = np.zeros(n, bool)
    ends = np.cumsum(lengths) - 1
    terminals[ends[::2]] = True  # alternate terminal / timeout endings
    timeouts[ends[1::2]] = True
    arrays = {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.uniform(0, 3, size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    arrays.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f.create_dataset(key, data=value)
        f.create_dataset("infos/qpos", data=np.zeros((n, 6), np.float32))
        meta = f.create_group("metadata")
        meta.attrs["algorithm"] = "test"
    return path


@pytest.fixture(autouse=True)
def isolated_stores(tmp_path, monkeypatch):
    """Point D4RL and Minari at empty temp directories; run each test in its own cwd."""
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def hopper_file(tmp_path) -> Path:
    """A hopper-shaped D4RL file in the D4RL cache dir, named as D4RL names it."""
    return write_d4rl(tmp_path / "d4rl" / "hopper_medium-v2.hdf5")
