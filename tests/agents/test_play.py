import imageio.v2 as imageio
import numpy as np
import pytest

from glmgym.agents import DecisionTransformer, DTConfig
from glmgym.agents.play import PlayConfig, play
from glmgym.cli import main
from glmgym.errors import GlmgymError


def _checkpoint(path):
    model = DecisionTransformer(DTConfig(state_dim=11, act_dim=3, hidden_size=32, max_ep_len=1000))
    model.save_pretrained(path, extras={"env_id": "Hopper-v5", "target_returns": [1000.0],
                                        "state_mean": np.zeros(11), "state_std": np.ones(11),
                                        "context_len": 5, "reward_scale": 1000.0})
    return path


def test_play_writes_a_video_with_the_episode_frames(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    result = play(PlayConfig(video=str(tmp_path / "v" / "out.mp4"), checkpoint=str(ckpt), episodes=2,
                             fps=25, size=64))
    frames = imageio.mimread(tmp_path / "v" / "out.mp4")
    assert frames[0].shape == (64, 64, 3)
    # Hopper renders at 125 fps; one frame every 5 steps, plus the two reset frames
    steps = int(result["lengths"].sum())
    assert result["frames"] == len(frames)
    assert steps // 5 <= result["frames"] <= steps // 5 + 4


def test_play_through_the_cli(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt")
    rc = main(["agent", "play", "--checkpoint", str(ckpt), "--video", str(tmp_path / "a.gif"),
               "--size", "32", "--target-return", "500"])
    assert rc == 0
    assert "target 500" in capsys.readouterr().out
    assert (tmp_path / "a.gif").stat().st_size > 0


def test_play_needs_a_video_path():
    with pytest.raises(GlmgymError, match="--video"):
        PlayConfig()
