"""Behavior policies -> offline datasets in D4RL layout (`glmgym agent collect`).

The D4RL recipe, on Gymnasium MuJoCo v5 with stable-baselines3's SAC:

- ``random``: a uniform random policy;
- ``expert``: the SAC policy after ``--steps`` environment steps of training;
- ``medium``: the training snapshot whose return is closest to one third of the expert's;
- ``medium-replay``: every transition SAC saw during training up to that snapshot;
- ``medium-expert``: medium followed by expert.

Each dataset is an HDF5 file (observations, next_observations, actions, rewards, terminals,
timeouts, infos/qpos, infos/qvel, metadata/*) written atomically. Reference scores (mean return
of a random and of the expert policy over ``--ref-episodes`` episodes) go into every file's
metadata. A run directory keeps its state: rerunning the same command resumes it (finished
datasets are kept, SAC training continues from its last snapshot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glmgym._io import atomic_write_json, fix_mode
from glmgym.agents.data import OfflineDataset, load_d4rl
from glmgym.agents.envs import env_family, make_vector_env
from glmgym.errors import GlmgymError

__all__ = ["LEVELS", "CollectConfig", "collect", "collect_random", "run_episodes", "write_d4rl_hdf5"]

LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
STATE_FILE = "collect_state.json"

ActFn = Callable[[np.ndarray], np.ndarray]


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


# ---------------------------------------------------------------------------------------------
# Rollouts


def _check_spaces(envs, env_id: str) -> None:
    import gymnasium as gym

    if not isinstance(envs.single_action_space, gym.spaces.Box):
        raise GlmgymError(f"{env_id} has a {type(envs.single_action_space).__name__} action space; "
                          "glmgym collects continuous (Box) actions only")
    if not isinstance(envs.single_observation_space, gym.spaces.Box) or \
            len(envs.single_observation_space.shape) != 1:
        raise GlmgymError(f"{env_id}: only flat Box observations are supported")


def run_episodes(
    env_id: str,
    act: ActFn,
    *,
    episodes: int | None = None,
    transitions: int | None = None,
    seed: int = 0,
    num_envs: int = 8,
    desc: str | None = None,
) -> dict[str, np.ndarray]:
    """Run whole episodes of `act` (batched over `num_envs` envs) and record every transition.

    Stops after exactly `episodes` episodes, or once at least `transitions` transitions of
    complete episodes are recorded. Episode k of the run is reset with seed `seed + k`.

    Returns:
        flat D4RL arrays (observations, next_observations, actions, rewards, terminals,
        timeouts, qpos, qvel) and `episode_returns`.
    """
    from tqdm.auto import tqdm

    if (episodes is None) == (transitions is None):
        raise ValueError("pass exactly one of episodes and transitions")
    n = min(num_envs, episodes) if episodes else num_envs
    envs = make_vector_env(env_id, n)
    keys = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts",
            "qpos", "qvel")
    out: dict[str, list] = {k: [] for k in keys}
    returns: list[float] = []
    try:
        _check_spaces(envs, env_id)
        mujoco = hasattr(envs.envs[0].unwrapped, "data")
        started = n
        obs, _ = envs.reset(seed=[seed + i for i in range(n)])
        live = np.ones(n, bool)  # False: this env's current episode is not recorded
        buffers: list[list[tuple]] = [[] for _ in range(n)]
        resetting = np.zeros(n, bool)
        total = 0
        bar = tqdm(total=episodes or transitions, desc=desc, disable=desc is None,
                   unit="ep" if episodes else "step", mininterval=2.0)
        while (episodes and len(returns) < episodes) or (transitions and total < transitions):
            if not live.any() and not resetting.any():
                break
            action = np.asarray(act(obs), dtype=np.float32)
            if mujoco:
                qpos = [e.unwrapped.data.qpos.copy() for e in envs.envs]
                qvel = [e.unwrapped.data.qvel.copy() for e in envs.envs]
            next_obs, reward, term, trunc, _ = envs.step(action)
            for i in range(n):
                if resetting[i]:  # NEXT_STEP autoreset: this step only reset env i
                    resetting[i] = False
                    if episodes and started >= episodes:
                        live[i] = False
                    else:
                        started += 1
                    continue
                if not live[i]:
                    continue
                buffers[i].append((obs[i], next_obs[i], action[i], reward[i], term[i], trunc[i],
                                   qpos[i] if mujoco else np.zeros(0), qvel[i] if mujoco else np.zeros(0)))
                if term[i] or trunc[i]:
                    resetting[i] = True
                    ep = buffers[i]
                    buffers[i] = []
                    for k, col in zip(keys, zip(*ep)):
                        out[k].append(np.asarray(col))
                    returns.append(float(np.sum([s[3] for s in ep])))
                    total += len(ep)
                    bar.update(1 if episodes else len(ep))
            obs = next_obs
        bar.close()
    finally:
        envs.close()
    arrays = {k: np.concatenate(v).astype(np.float32 if k not in ("terminals", "timeouts") else bool)
              for k, v in out.items()}
    arrays["episode_returns"] = np.asarray(returns)
    return arrays


def _uniform(env_id: str, seed: int) -> ActFn:
    import gymnasium as gym

    space = gym.make(env_id).action_space
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(space.low, space.high, size=(len(obs), *space.shape))


def collect_random(env_id: str, episodes: int = 100, seed: int = 0, num_envs: int = 8) -> OfflineDataset:
    """`episodes` episodes of a uniform random policy, as an in-memory dataset (`random:` specs)."""
    if episodes <= 0:
        raise GlmgymError(f"random:{env_id}: the number of episodes must be positive")
    a = run_episodes(env_id, _uniform(env_id, seed), episodes=episodes, seed=seed, num_envs=num_envs)
    return OfflineDataset(
        name=f"{env_id.lower()}-random", observations=a["observations"], actions=a["actions"],
        rewards=a["rewards"], terminals=a["terminals"], timeouts=a["timeouts"], env_id=env_id,
        source=f"random:{env_id}:{episodes}",
        metadata={"policy": "uniform random", "seed": seed, "episodes": episodes},
    )


# ---------------------------------------------------------------------------------------------
# Files


def write_d4rl_hdf5(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> Path:
    """Write a D4RL-layout HDF5 file atomically (gzip-compressed datasets)."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for key in ("observations", "next_observations", "actions", "rewards", "terminals",
                        "timeouts"):
                f.create_dataset(key, data=arrays[key], compression="gzip", compression_opts=4,
                                 shuffle=True)
            for key in ("qpos", "qvel"):
                if arrays.get(key) is not None and arrays[key].size:
                    f.create_dataset(f"infos/{key}", data=arrays[key], compression="gzip",
                                     compression_opts=4, shuffle=True)
            meta = f.create_group("metadata")
            for key, value in metadata.items():
                if value is None:  # HDF5 attributes have no null
                    continue
                meta.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        fix_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("glmgym", "gymnasium", "mujoco", "stable-baselines3", "torch", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


# ---------------------------------------------------------------------------------------------
# SAC training with snapshots


def _sac(env, cfg: CollectConfig):
    from stable_baselines3 import SAC

    # SB3's defaults otherwise (lr 3e-4, batch 256, [256, 256] nets, auto entropy); the buffer
    # holds the whole run, as in D4RL's medium-replay.
    return SAC("MlpPolicy", env, seed=cfg.seed, learning_starts=cfg.learning_starts,
               buffer_size=max(cfg.steps, 1), verbose=0, device="cpu")


def _policy_act(model, deterministic: bool = False) -> ActFn:
    return lambda obs: model.predict(obs, deterministic=deterministic)[0]


def _load_snapshot(cfg: CollectConfig, path: Path):
    import gymnasium as gym
    from safetensors.torch import load_file

    env = gym.make(cfg.env)
    model = _sac(env, cfg)
    model.policy.load_state_dict(load_file(str(path)))
    model.policy.set_training_mode(False)
    return model


def _train_sac(cfg: CollectConfig, out: Path, state: dict[str, Any], save_state) -> None:
    """Train SAC for cfg.steps steps, recording every transition and scoring snapshots."""
    import gymnasium as gym
    from safetensors.torch import save_file
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm.auto import tqdm

    work = out / "sac"
    work.mkdir(parents=True, exist_ok=True)
    stream_keys = ("observations", "next_observations", "actions", "rewards", "terminals",
                   "timeouts", "qpos", "qvel")
    stream: dict[str, list] = {k: [] for k in stream_keys}
    if (work / "stream.npz").is_file() and (work / "latest.zip").is_file():
        with np.load(work / "stream.npz") as saved:
            for k in stream_keys:
                stream[k] = list(saved[k])
        if stream["timeouts"]:
            stream["timeouts"][-1] = True  # the episode in flight at the stop ends there

    class Recorder(gym.Wrapper):
        def reset(self, **kw):
            self._obs, info = self.env.reset(**kw)
            return self._obs, info

        def step(self, action):
            data = self.env.unwrapped.data
            qpos, qvel = data.qpos.copy(), data.qvel.copy()
            nxt, r, term, trunc, info = self.env.step(action)
            for k, v in zip(stream_keys, (self._obs, nxt, action, r, term, trunc, qpos, qvel)):
                stream[k].append(np.asarray(v))
            self._obs = nxt
            return nxt, r, term, trunc, info

    env = Recorder(gym.make(cfg.env))
    if (work / "latest.zip").is_file():
        model = SAC.load(work / "latest.zip", env=env, device="cpu")  # our own run state
        model.load_replay_buffer(work / "replay.pkl")
    else:
        model = _sac(env, cfg)
    bar = tqdm(total=cfg.steps, initial=model.num_timesteps, desc="SAC", unit="step",
               disable=not cfg.progress, mininterval=2.0)

    class Snapshots(BaseCallback):
        def _on_step(self) -> bool:
            bar.update(1)
            t = self.num_timesteps
            if t % cfg.snapshot_every == 0 or t == cfg.steps:
                path = work / f"policy_{t:08d}.safetensors"
                save_file({k: v.contiguous() for k, v in model.policy.state_dict().items()}, str(path))
                r = run_episodes(cfg.env, _policy_act(model), episodes=cfg.snapshot_episodes,
                                 seed=cfg.seed + 10_000 + t, num_envs=cfg.snapshot_episodes)
                state["snapshots"].append({"step": t, "return_mean": float(r["episode_returns"].mean()),
                                           "policy": path.name})
                bar.set_postfix(ret=f"{r['episode_returns'].mean():.0f}")
                # resumable state: model, replay buffer and the recorded stream, then the JSON
                model.save(work / "latest.zip")
                model.save_replay_buffer(work / "replay.pkl")
                np.savez(work / "stream.npz", **{k: np.asarray(v) for k, v in stream.items()})
                state["trained_steps"] = t
                save_state()
            return True

    remaining = cfg.steps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=Snapshots(), reset_num_timesteps=False)
    bar.close()
    np.savez(work / "stream.npz", **{k: np.asarray(v) for k, v in stream.items()})
    state["train_done"] = True
    state["sac_steps"] = cfg.steps
    save_state()


def collect(cfg: CollectConfig) -> dict[str, Path]:
    """Collect the requested dataset levels; return {level: hdf5 path}.

    Raises:
        GlmgymError: unknown env or level, non-Box spaces, an output directory of another run.
    """
    levels = cfg.level_list()
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        raise GlmgymError("collect needs stable-baselines3: pip install 'glmgym[collect]'") from None
    family = env_family(cfg.env) or cfg.env.lower().split("-v")[0]
    probe = make_vector_env(cfg.env, 1)
    try:
        _check_spaces(probe, cfg.env)
    finally:
        probe.close()
    out = Path(cfg.out or Path("datasets") / cfg.env)
    state_path = out / STATE_FILE
    # --steps may change on resume while SAC is still training (to cut or extend the run).
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("levels", "out", "minari", "progress", "num_envs", "steps")}
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        state["settings"].pop("steps", None)
        if state.get("train_done") and state.get("sac_steps", cfg.steps) != cfg.steps:
            raise GlmgymError(f"{out}: SAC training finished at {state['sac_steps']} steps; "
                              f"pass --steps {state['sac_steps']} or use another --out")
        if state.get("trained_steps", 0) > cfg.steps:
            raise GlmgymError(f"{out}: SAC already trained {state['trained_steps']} steps, "
                              f"more than --steps {cfg.steps}")
        if state["settings"] != settings:
            changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            raise GlmgymError(f"{out} holds a collection with other settings ({', '.join(changed)}); "
                              "use another --out")
    elif out.exists() and any(out.iterdir()):
        raise GlmgymError(f"{out} already holds files that are not a glmgym collection; use another --out")
    else:
        state = {"settings": settings, "snapshots": [], "trained_steps": 0, "done": {}}
    out.mkdir(parents=True, exist_ok=True)

    def save_state() -> None:
        atomic_write_json(state_path, state)

    save_state()
    t_start = time.time()
    # Reference returns: random policy and (after training) the expert.
    if "ref_min_score" not in state:
        r = run_episodes(cfg.env, _uniform(cfg.env, cfg.seed), episodes=cfg.ref_episodes,
                         seed=cfg.seed + 20_000, num_envs=cfg.num_envs,
                         desc="reference: random" if cfg.progress else None)
        state["ref_min_score"] = float(r["episode_returns"].mean())
        save_state()
    needs_sac = any(level != "random" for level in levels)
    if needs_sac and not state.get("train_done"):
        _train_sac(cfg, out, state, save_state)
    expert = medium = None
    if needs_sac:
        expert = _load_snapshot(cfg, out / "sac" / state["snapshots"][-1]["policy"])
        if "ref_max_score" not in state:
            r = run_episodes(cfg.env, _policy_act(expert), episodes=cfg.ref_episodes,
                             seed=cfg.seed + 30_000, num_envs=cfg.num_envs,
                             desc="reference: expert" if cfg.progress else None)
            state["ref_max_score"] = float(r["episode_returns"].mean())
            target = state["ref_max_score"] / 3
            candidates = state["snapshots"][:-1] or state["snapshots"]
            state["medium_snapshot"] = min(candidates, key=lambda s: abs(s["return_mean"] - target))
            save_state()
        medium = _load_snapshot(cfg, out / "sac" / state["medium_snapshot"]["policy"])

    base_meta = {
        "env_id": cfg.env, "seed": cfg.seed, "sac_steps": cfg.steps,
        "ref_min_score": state["ref_min_score"], "ref_max_score": state.get("ref_max_score"),
        "ref_episodes": cfg.ref_episodes, "versions": _versions(),
    }
    paths: dict[str, Path] = {}
    order = sorted(levels, key=lambda x: x == "medium-expert")  # medium-expert reuses the others
    for i, level in enumerate(order):
        path = out / f"{family}-{level}.hdf5"
        paths[level] = path
        if state["done"].get(level) and path.is_file():
            continue
        meta = dict(base_meta, level=level)
        seed = cfg.seed + 40_000 + 1_000_000 * i
        desc = level if cfg.progress else None
        if level == "random":
            arrays = run_episodes(cfg.env, _uniform(cfg.env, seed), transitions=cfg.dataset_steps,
                                  seed=seed, num_envs=cfg.num_envs, desc=desc)
            meta["policy"] = "uniform random"
        elif level in ("medium", "expert"):
            snap = state["medium_snapshot"] if level == "medium" else state["snapshots"][-1]
            arrays = run_episodes(cfg.env, _policy_act(medium if level == "medium" else expert),
                                  transitions=cfg.dataset_steps, seed=seed, num_envs=cfg.num_envs,
                                  desc=desc)
            meta.update(policy=f"SAC (stable-baselines3), stochastic actions, step {snap['step']}",
                        policy_steps=snap["step"], policy_snapshot_return=snap["return_mean"])
        elif level == "medium-replay":
            with np.load(out / "sac" / "stream.npz") as s:
                stop = state["medium_snapshot"]["step"]
                arrays = {k: s[k][:stop] for k in s.files}
            arrays["timeouts"][-1] |= not arrays["terminals"][-1]  # cut at the snapshot
            arrays["terminals"] = arrays["terminals"].astype(bool)
            arrays["timeouts"] = arrays["timeouts"].astype(bool)
            meta.update(policy=f"SAC replay buffer, steps 0..{stop} (incl. {cfg.learning_starts} random)",
                        policy_steps=stop)
        else:  # medium-expert
            parts = [load_d4rl(out / f"{family}-{x}.hdf5") for x in ("medium", "expert")]
            arrays = _concat_files([out / f"{family}-{x}.hdf5" for x in ("medium", "expert")])
            meta.update(policy="medium followed by expert", policy_steps=[p.metadata.get("policy_steps")
                                                                       for p in parts])
        meta["transitions"] = len(arrays["rewards"])
        write_d4rl_hdf5(path, arrays, meta)
        ds = load_d4rl(path)  # read back: the file must load and be finite
        state["done"][level] = ds.summary()
        save_state()
        if cfg.minari:
            _write_minari(ds, arrays, f"glmgym/{family}/{level}-v0", meta)
    state["seconds"] = state.get("seconds", 0) + time.time() - t_start
    save_state()
    return paths


def _concat_files(paths: list[Path]) -> dict[str, np.ndarray]:
    import h5py

    out: dict[str, list] = {}
    for p in paths:
        with h5py.File(p, "r") as f:
            for key in ("observations", "next_observations", "actions", "rewards", "terminals",
                        "timeouts", "infos/qpos", "infos/qvel"):
                if key in f:
                    out.setdefault(key.removeprefix("infos/"), []).append(f[key][()])
    return {k: np.concatenate(v) for k, v in out.items()}


def _write_minari(ds: OfflineDataset, arrays: dict[str, np.ndarray], dataset_id: str,
                  meta: dict[str, Any]) -> None:
    """The same data as a Minari dataset in the local store (replaces an older copy)."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = []
    for i, (s, n) in enumerate(zip(ds.starts, ds.lengths)):
        obs = np.concatenate([arrays["observations"][s:s + n], arrays["next_observations"][s + n - 1:s + n]])
        buffers.append(EpisodeBuffer(
            id=i, observations=obs, actions=arrays["actions"][s:s + n],
            rewards=arrays["rewards"][s:s + n].tolist(),
            terminations=arrays["terminals"][s:s + n].tolist(),
            truncations=arrays["timeouts"][s:s + n].tolist(), infos={}))
    with contextlib.suppress(Exception):  # absent: nothing to replace
        minari.delete_dataset(dataset_id)
    env = gym.make(meta["env_id"])
    refs = {}
    if meta.get("ref_max_score") is not None:  # Minari stores references as a pair only
        refs = {"ref_min_score": meta["ref_min_score"], "ref_max_score": meta["ref_max_score"]}
    minari.create_dataset_from_buffers(
        dataset_id, buffers, env=env, algorithm_name=str(meta.get("policy", "")), **refs,
        description=f"glmgym {meta['level']} dataset for {meta['env_id']}", author="glmgym",
        author_email="glmgym@users.noreply.github.com", code_permalink="https://pypi.org/project/glmgym/")
    env.close()
