"""Offline RL datasets: loaders (D4RL HDF5, Minari, embedded), episodes, returns-to-go, windows.

Everything here is NumPy on flat arrays: a dataset is one array per field over all transitions plus
the start and length of each episode, so that sampling a batch of windows is a handful of fancy
indexing operations, never a Python loop per sample.

Dataset spec grammar (``glmgym agent train --dataset SPEC``)::

    d4rl:NAME             NAME like hopper-medium-v2, looked up as <dir>/hopper_medium-v2.hdf5 or
                          <dir>/hopper-medium-v2.hdf5, <dir> = $D4RL_DATASET_DIR or ~/.d4rl/datasets
    d4rl:PATH             an explicit .hdf5 / .h5 file in D4RL layout
    minari:ID             a Minari dataset id such as mujoco/hopper/medium-v0, from the local store
                          ($MINARI_DATASETS_PATH or ~/.minari/datasets); download only if allowed
    embedded:NAME         a dataset shipped inside the package, e.g. embedded:hopper-medium
    random:ENV_ID[:N]     N episodes (default 100) of a uniform random policy, generated on the spot
                          by `rollouts.open_dataset` (this module never steps a simulator)
    PATH                  a path ending in .hdf5 / .h5 is read as d4rl:PATH
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glmgym.errors import GlmgymError, import_extra

__all__ = [
    "OfflineDataset",
    "WindowBatch",
    "WindowSampler",
    "d4rl_dataset_dir",
    "embedded_datasets",
    "episode_bounds",
    "load_d4rl",
    "load_dataset",
    "load_minari",
    "returns_to_go",
]

_REQUIRED_D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def episode_bounds(terminals: np.ndarray, timeouts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a flat stream of transitions into episodes.

    An episode ends after step i when `terminals[i] or timeouts[i]`. Trailing steps without either
    flag form a last (truncated) episode; D4RL's own sequence loader drops them, we keep the data.

    Returns:
        (starts, lengths): int64 arrays with one entry per episode.
    """
    n = len(terminals)
    ends = np.flatnonzero(np.logical_or(terminals, timeouts)) + 1  # exclusive end of each episode
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)
    starts = np.concatenate(([0], ends[:-1]))
    keep = ends > starts
    return starts[keep].astype(np.int64), (ends - starts)[keep].astype(np.int64)


def returns_to_go(rewards: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Undiscounted return-to-go of every transition: the sum of its episode's rewards from it on.

    Vectorized with one cumulative sum over the whole stream (in float64 so that long datasets do
    not lose precision): rtg[i] = C[end - 1] - C[i] + r[i] for i in an episode ending at `end`.
    """
    r = np.asarray(rewards, dtype=np.float64)
    c = np.cumsum(r)
    episode_total_at = np.repeat(c[starts + lengths - 1], lengths)
    return (episode_total_at - c + r).astype(np.float32)


@dataclass
class OfflineDataset:
    """A dataset of transitions in flat arrays, split into episodes."""

    name: str
    """Short name, e.g. hopper-medium-v2."""
    observations: np.ndarray
    """[N, state_dim] float32."""
    actions: np.ndarray
    """[N, act_dim] float32."""
    rewards: np.ndarray
    """[N] float32."""
    terminals: np.ndarray
    """[N] bool: the episode ended in a terminal state after this step."""
    timeouts: np.ndarray
    """[N] bool: the episode was cut (time limit) after this step."""
    env_id: str | None = None
    """Gymnasium env id the data comes from, when known."""
    source: str = ""
    """Where it was loaded from (file path or dataset id)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (reference scores, collection details, ...)."""

    def __post_init__(self) -> None:
        self.validate()
        self.starts, self.lengths = episode_bounds(self.terminals, self.timeouts)

    def validate(self) -> None:
        """Check shapes, emptiness and finiteness; raise GlmgymError naming the problem."""
        n = len(self.rewards)
        if n == 0:
            raise GlmgymError(f"dataset {self.source or self.name} is empty (0 transitions)")
        if self.observations.ndim != 2 or self.actions.ndim != 2:
            raise GlmgymError(
                f"dataset {self.source}: observations and actions must be 2-D [N, dim], got "
                f"{self.observations.shape} and {self.actions.shape}"
            )
        for key in ("observations", "actions", "terminals", "timeouts"):
            if len(getattr(self, key)) != n:
                raise GlmgymError(
                    f"dataset {self.source}: {key} has {len(getattr(self, key))} rows, "
                    f"rewards has {n}"
                )
        for key in ("observations", "actions", "rewards"):
            bad = ~np.isfinite(getattr(self, key))
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                raise GlmgymError(f"dataset {self.source}: {key} contains NaN or Inf (row {row})")

    @property
    def state_dim(self) -> int:
        """Size of an observation."""
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        """Size of an action."""
        return int(self.actions.shape[1])

    @property
    def num_episodes(self) -> int:
        """Number of episodes."""
        return len(self.starts)

    @property
    def num_transitions(self) -> int:
        """Number of transitions."""
        return len(self.rewards)

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode, [num_episodes]."""
        return np.add.reduceat(self.rewards.astype(np.float64), self.starts)

    def state_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the observations (std + 1e-6, as in the reference implementation)."""
        obs = self.observations.astype(np.float64)
        return obs.mean(0).astype(np.float32), (obs.std(0) + 1e-6).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """Episodes, transitions and return statistics."""
        ret = self.episode_returns()
        return {
            "name": self.name,
            "env_id": self.env_id,
            "episodes": self.num_episodes,
            "transitions": self.num_transitions,
            "return_mean": float(ret.mean()),
            "return_std": float(ret.std()),
            "return_min": float(ret.min()),
            "return_max": float(ret.max()),
        }


# ---------------------------------------------------------------------------------------------
# Loaders


def d4rl_dataset_dir() -> Path:
    """D4RL's cache directory: $D4RL_DATASET_DIR or ~/.d4rl/datasets."""
    return Path(os.environ.get("D4RL_DATASET_DIR", Path.home() / ".d4rl" / "datasets")).expanduser()


EMBEDDED_DIR = Path(__file__).parent / "embedded"


def embedded_datasets() -> dict[str, Path]:
    """Datasets shipped inside the package: {name: hdf5 path}."""
    return {p.stem: p for p in sorted(EMBEDDED_DIR.glob("*.hdf5"))}


def _embedded(name: str) -> OfflineDataset:
    shipped = embedded_datasets()
    if name not in shipped:
        raise GlmgymError(f"no embedded dataset {name!r}; shipped: {', '.join(shipped) or 'none'}")
    ds = load_d4rl(shipped[name], name=name)
    ds.source = f"embedded:{name}"  # the spec, not this install's path: it ends up in checkpoints
    return ds


def _d4rl_file_for(name: str) -> Path:
    """hopper-medium-replay-v2 -> <dir>/hopper_medium_replay-v2.hdf5 (D4RL's download name)."""
    root = d4rl_dataset_dir()
    env, _, rest = name.partition("-")
    level, _, version = rest.rpartition("-")
    candidates = [root / f"{name}.hdf5"]
    if level:
        candidates.insert(0, root / f"{env}_{level.replace('-', '_')}-{version}.hdf5")
    for path in candidates:
        if path.is_file():
            return path
    raise GlmgymError(
        f"D4RL dataset {name!r} not found: looked for {', '.join(str(c) for c in candidates)}. "
        "Set $D4RL_DATASET_DIR or pass d4rl:/path/to/file.hdf5."
    )


def load_d4rl(path: str | Path, name: str | None = None) -> OfflineDataset:
    """Read a D4RL-layout HDF5 file.

    Required keys: observations, actions, rewards, terminals, timeouts. Optional
    next_observations, infos/* and metadata/* are accepted (metadata attributes/datasets are kept
    in `OfflineDataset.metadata`).
    """
    h5py = import_extra("h5py", "agents")

    path = Path(path)
    if not path.is_file():
        raise GlmgymError(f"dataset file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise GlmgymError(f"{path} is not a readable HDF5 file: {exc}") from None
    with f:
        missing = [k for k in _REQUIRED_D4RL_KEYS if k not in f]
        if missing:
            raise GlmgymError(
                f"{path} is not a D4RL dataset: missing key(s) {', '.join(missing)} "
                f"(found: {', '.join(sorted(f.keys())) or 'none'})"
            )
        try:
            arrays = {k: f[k][()] for k in _REQUIRED_D4RL_KEYS}
        except (TypeError, AttributeError) as exc:  # a group where a dataset was expected
            raise GlmgymError(f"{path}: malformed D4RL keys ({exc})") from None
        metadata: dict[str, Any] = {}
        if "metadata" in f:
            group = f["metadata"]
            metadata.update({k: _plain(v) for k, v in group.attrs.items()})
            for k, v in group.items():
                if hasattr(v, "shape") and v.size <= 64:
                    metadata[k] = _plain(v[()])
        metadata.update({k: _plain(v) for k, v in f.attrs.items()})
    name = name or path.stem.replace("_", "-")
    return _from_arrays(name, arrays, source=str(path), metadata=metadata)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_arrays(name: str, arrays: dict[str, np.ndarray], source: str,
                 metadata: dict[str, Any], env_id: str | None = None) -> OfflineDataset:
    obs = np.asarray(arrays["observations"], dtype=np.float32)
    act = np.asarray(arrays["actions"], dtype=np.float32)
    rew = np.asarray(arrays["rewards"], dtype=np.float32).reshape(-1)
    if obs.ndim == 1:
        obs = obs[:, None]
    if act.ndim == 1:
        act = act[:, None]
    env_id = env_id or metadata.get("env_id") or metadata.get("env")
    return OfflineDataset(
        name=name,
        observations=obs,
        actions=act,
        rewards=rew,
        terminals=np.asarray(arrays["terminals"]).astype(bool).reshape(-1),
        timeouts=np.asarray(arrays["timeouts"]).astype(bool).reshape(-1),
        env_id=env_id if isinstance(env_id, str) else None,
        source=source,
        metadata=metadata,
    )


def load_minari(dataset_id: str, download: bool = False) -> OfflineDataset:
    """Read a Minari dataset from the local store (downloading it only if `download`)."""
    try:
        import minari
    except ImportError:
        raise GlmgymError(
            "Minari datasets need the minari package: pip install 'glmgym[minari]'"
        ) from None
    try:
        ds = minari.load_dataset(dataset_id, download=download)
    except FileNotFoundError:
        raise GlmgymError(
            f"Minari dataset {dataset_id!r} is not in the local store "
            f"({os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')}); "
            "pass --download to fetch it"
        ) from None
    except Exception as exc:  # minari raises assorted types for bad ids / remote failures
        raise GlmgymError(f"could not load Minari dataset {dataset_id!r}: {exc}") from None
    obs, act, rew, term, trunc = [], [], [], [], []
    for ep in ds.iterate_episodes():
        if not isinstance(ep.observations, np.ndarray):
            raise GlmgymError(
                f"Minari dataset {dataset_id!r} has structured (dict/tuple) observations; "
                "glmgym's Decision Transformer needs flat Box observations"
            )
        n = len(ep.rewards)
        obs.append(ep.observations[:n])  # Minari stores T+1 observations (the final one too)
        act.append(np.asarray(ep.actions).reshape(n, -1))
        rew.append(ep.rewards)
        t = np.asarray(ep.terminations, dtype=bool).copy()
        c = np.asarray(ep.truncations, dtype=bool).copy()
        if not (t[-1] or c[-1]):  # an episode stored without end flag still ends here
            c[-1] = True
        term.append(t)
        trunc.append(c)
    if not obs:
        raise GlmgymError(f"Minari dataset {dataset_id!r} is empty (0 episodes)")
    metadata: dict[str, Any] = {}
    for key in ("ref_min_score", "ref_max_score", "algorithm_name", "dataset_id"):
        value = ds.storage.metadata.get(key)
        if value is not None:
            metadata[key] = _plain(value)
    env_id = ds.env_spec.id if ds.env_spec is not None else None
    arrays = {
        "observations": np.concatenate(obs),
        "actions": np.concatenate(act),
        "rewards": np.concatenate(rew),
        "terminals": np.concatenate(term),
        "timeouts": np.concatenate(trunc),
    }
    return _from_arrays(dataset_id, arrays, source=f"minari:{dataset_id}",
                        metadata=metadata, env_id=env_id)


def load_dataset(spec: str, download: bool = False) -> OfflineDataset:
    """Load a dataset from a spec string (grammar in this module's docstring).

    Raises:
        GlmgymError: unknown scheme, missing file or dataset, malformed content.
    """
    scheme, sep, rest = spec.partition(":")
    if not sep or (len(scheme) == 1 and os.name == "nt"):  # a bare path (or C:\ on Windows)
        if spec.endswith((".hdf5", ".h5")):
            return load_d4rl(spec)
        raise GlmgymError(
            f"cannot read dataset spec {spec!r}: use embedded:NAME, d4rl:NAME, d4rl:PATH, minari:ID, "
            "random:ENV_ID[:EPISODES] or a path ending in .hdf5"
        )
    if scheme == "d4rl":
        if rest.endswith((".hdf5", ".h5")) or os.sep in rest:
            return load_d4rl(rest)
        return load_d4rl(_d4rl_file_for(rest), name=rest)
    if scheme == "minari":
        return load_minari(rest, download=download)
    if scheme == "embedded":
        return _embedded(rest)
    if scheme == "random":  # generated, not loaded: loading never steps a simulator
        raise GlmgymError(f"{spec!r} is generated by stepping an env, not loaded: use "
                          "glmgym.agents.rollouts.open_dataset (as `glmgym agent train` does)")
    raise GlmgymError(
        f"unknown dataset scheme {scheme!r} in {spec!r} (use embedded, d4rl, minari or random)"
    )


# ---------------------------------------------------------------------------------------------
# Training windows


@dataclass
class WindowBatch:
    """A batch of K-step windows, left-padded, as the model consumes them (NumPy)."""

    states: np.ndarray
    """[B, K, state_dim] normalized states (0 at padding)."""
    actions: np.ndarray
    """[B, K, act_dim] actions (-10 at padding, as in the reference)."""
    returns_to_go: np.ndarray
    """[B, K, 1] returns-to-go / reward_scale (0 at padding)."""
    timesteps: np.ndarray
    """[B, K] int64 timesteps within the episode (0 at padding)."""
    attention_mask: np.ndarray
    """[B, K] 1 for real steps, 0 for padding."""


class WindowSampler:
    """Sample K-step windows, left-padded to K steps.

    `windows="start"` cuts them as the reference implementation (kzl/decision-transformer) does:
    an episode is drawn with probability proportional to its length, a start uniformly within it,
    and the window covers [start, min(start + K, end)). Step t of an episode then lies in
    min(t + 1, K) windows, so an episode's first steps are trained about 1/K as often as its
    middle. `windows="end"` cuts them as d3rlpy does: a transition drawn uniformly over the data
    (the same episode weights) ends the window, which covers [max(episode start, t - K + 1), t];
    step t lies in min(K, L - t) windows, and the first steps, where only the return-to-go tells
    the behaviours in the data apart, are trained as often as the middle.

    Deviation: the reference pads states with zeros *before* normalizing them; we normalize the
    dataset once and pad with zeros afterwards. Padded tokens are masked, so no real prediction
    changes.
    """

    def __init__(
        self,
        dataset: OfflineDataset,
        context_len: int,
        state_mean: np.ndarray,
        state_std: np.ndarray,
        reward_scale: float,
        max_ep_len: int,
        rng: np.random.Generator,
        windows: str = "end",
    ) -> None:
        if windows not in ("start", "end"):
            raise GlmgymError(f"windows must be 'start' or 'end', not {windows!r}")
        self.K = context_len
        self.rng = rng
        self.windows = windows
        self.starts, self.lengths = dataset.starts, dataset.lengths
        self.probs = self.lengths / self.lengths.sum()
        self.cum_lengths = np.cumsum(self.lengths)
        self.states = ((dataset.observations - state_mean) / state_std).astype(np.float32)
        self.actions = dataset.actions
        self.rtg = returns_to_go(dataset.rewards, self.starts, self.lengths) / np.float32(reward_scale)
        # timestep of every transition within its episode, clipped like the reference
        self.timesteps = np.minimum(
            np.arange(dataset.num_transitions) - np.repeat(self.starts, self.lengths), max_ep_len - 1
        )

    def sample(self, batch_size: int) -> WindowBatch:
        """Draw `batch_size` windows; vectorized over the batch."""
        K = self.K
        if self.windows == "end":
            # a transition drawn uniformly over the episodes' steps: episode ep, step t within it
            k = self.rng.integers(0, self.cum_lengths[-1], size=batch_size)
            ep = np.searchsorted(self.cum_lengths, k, side="right")
            return self.ending_at(ep, k - (self.cum_lengths[ep] - self.lengths[ep]))
        ep = self.rng.choice(len(self.lengths), size=batch_size, p=self.probs)
        length = self.lengths[ep]
        start = (self.rng.random(batch_size) * length).astype(np.int64)  # uniform in [0, length)
        return self._cut(ep, start, np.minimum(K, length - start))  # n_real: steps in the window

    def ending_at(self, ep: np.ndarray, t: np.ndarray) -> WindowBatch:
        """The end windows that end at step `t` (within the episode) of episodes `ep`, both [B]."""
        n_real = np.minimum(self.K, t + 1)
        return self._cut(ep, t - n_real + 1, n_real)

    def _cut(self, ep: np.ndarray, start: np.ndarray, n_real: np.ndarray) -> WindowBatch:
        """Windows of `n_real` steps from `start` (within the episode) of episodes `ep`, left-padded."""
        K = self.K
        pad = K - n_real
        j = np.arange(K)[None, :]  # [1, K]
        real = j >= pad[:, None]  # [B, K]
        # flat index of window slot j: episode start + window start + (j - pad), clipped at padding
        idx = self.starts[ep][:, None] + start[:, None] + np.maximum(j - pad[:, None], 0)
        states = np.where(real[..., None], self.states[idx], 0.0).astype(np.float32)
        actions = np.where(real[..., None], self.actions[idx], -10.0).astype(np.float32)
        rtg = np.where(real, self.rtg[idx], 0.0).astype(np.float32)[..., None]
        timesteps = np.where(real, self.timesteps[idx], 0).astype(np.int64)
        return WindowBatch(states, actions, rtg, timesteps, real.astype(np.int64))
