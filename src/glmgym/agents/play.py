"""`glmgym agent play`: render episodes of an agent to a video file (headless: MUJOCO_GL=egl)."""

from __future__ import annotations

import os
from pathlib import Path

from glmgym._io import atomic_path, read_json
from glmgym.agents.config import PlayConfig
from glmgym.agents.envs import env_family
from glmgym.agents.evaluate import rollout
from glmgym.agents.policy import Policy
from glmgym.errors import GlmgymError, import_extra

__all__ = ["PRETRAINED_ROOT", "PlayConfig", "camera_options", "play", "pretrained_agent", "pretrained_agents"]

PRETRAINED_ROOT = Path(__file__).parent / "embedded" / "pretrained"
DEFAULT_ENV = "Hopper-v5"


def camera_options(env_id: str) -> dict:
    """Env options for a camera that follows the agent.

    The v5 MuJoCo locomotion models each have a camera named "track" that moves with the torso's
    center of mass; Gymnasium renders from a free camera by default, which stays where the episode
    started, so a hopper that hops forward leaves the picture after a few seconds.
    """

    tracked = ("hopper", "halfcheetah", "walker2d", "ant")
    return {"camera_name": "track"} if env_family(env_id) in tracked else {}


def pretrained_agents() -> dict[str, Path]:
    """The agents shipped with glmgym: {env id: checkpoint directory}."""
    agents = {}
    for extras in sorted(PRETRAINED_ROOT.glob("*/glmgym.json")):
        env_id = read_json(extras).get("env_id")
        if env_id:
            agents[env_id] = extras.parent
    return agents


def pretrained_agent(env_id: str) -> Path:
    """The shipped agent's checkpoint directory for `env_id` (a clear error if there is none)."""
    agents = pretrained_agents()
    if env_id not in agents:
        have = ", ".join(agents) or "none"
        raise GlmgymError(f"no pretrained agent for {env_id} (shipped: {have}); pass --checkpoint DIR")
    return agents[env_id]


def play(cfg: PlayConfig) -> dict:
    """Render `cfg.episodes` episodes into `cfg.video` (written atomically); return the rollout."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    imageio = import_extra("imageio.v2", "agents")


    ckpt_dir = cfg.checkpoint or pretrained_agent(cfg.env or DEFAULT_ENV)
    policy = Policy.from_pretrained(ckpt_dir)
    env_id = cfg.env or policy.extras.get("env_id")
    if not env_id:
        raise GlmgymError(f"{ckpt_dir} does not record its environment; pass --env ENV_ID")
    target = cfg.target_return
    if target is None:
        target = (policy.extras.get("target_returns") or [None])[0]
    if target is None:
        raise GlmgymError(f"{ckpt_dir} records no target return; pass --target-return R")
    video = Path(cfg.video or f"play-{env_id}.mp4")
    video.parent.mkdir(parents=True, exist_ok=True)
    frames: list = []
    counter = {"t": 0, "every": 1}

    def grab(envs) -> None:
        if counter["t"] == 0:
            env_fps = envs.envs[0].metadata.get("render_fps", cfg.fps)
            counter["every"] = max(1, round(env_fps / cfg.fps))
        if counter["t"] % counter["every"] == 0:
            frames.append(envs.envs[0].render())
        counter["t"] += 1

    result = rollout(policy, env_id, float(target), cfg.episodes, seed=cfg.seed, num_envs=1,
                     on_step=grab, render_mode="rgb_array", width=cfg.size, height=cfg.size,
                     **camera_options(env_id))
    with atomic_path(video, suffix=video.suffix) as tmp:
        # Pillow's GIF writer takes a frame duration in ms; its `fps` is deprecated.
        timing = {"duration": 1000 / cfg.fps} if video.suffix.lower() == ".gif" else {"fps": cfg.fps}
        imageio.mimwrite(tmp, frames, **timing)
    result["frames"] = len(frames)
    result["target_return"] = float(target)
    result["checkpoint"] = str(ckpt_dir)
    result["video"] = str(video)
    return result
