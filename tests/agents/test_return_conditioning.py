"""Return conditioning on data of two behaviours that differ from the first step: the trained
Decision Transformer must take each one when asked for its return.

`TwoPaths` starts every episode at the same place; a step moves by the action and pays 1 + action,
so going right (action +0.5) earns 37.5 in 25 steps and going left (-0.5) earns 12.5. At the
first step the state is the same for both: only the return-to-go tells them apart, which is the
case that sampling windows by their start trains least.
"""

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")

from glmgym.agents import Policy, TrainConfig, evaluate, train  # noqa: E402
from glmgym.agents.collect import write_d4rl_hdf5  # noqa: E402

STEPS, RIGHT, LEFT = 25, 37.5, 12.5
ENV_ID = "glmgym-test/TwoPaths-v0"


class TwoPaths(gym.Env):
    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = 0.0, 0
        return self._obs(), {}

    def _obs(self):
        return np.array([self.x, self.t / STEPS], np.float32)

    def step(self, action):
        a = float(np.clip(action[0], -1.0, 1.0))
        self.x += a
        self.t += 1
        return self._obs(), 1.0 + a, False, self.t >= STEPS, {}


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=TwoPaths)


def _two_mode_file(path, episodes_each=40, seed=0):
    """Half the episodes go right, half go left, with a little action noise."""
    rng = np.random.default_rng(seed)
    env = TwoPaths()
    obs, nxt, acts, rews = [], [], [], []
    for direction in [0.5] * episodes_each + [-0.5] * episodes_each:
        o, _ = env.reset()
        for _ in range(STEPS):
            a = np.array([direction + rng.normal(0, 0.05)], np.float32)
            o2, r, _, _, _ = env.step(a)
            obs.append(o), nxt.append(o2), acts.append(a), rews.append(r)
            o = o2
    n = len(obs)
    timeouts = np.zeros(n, bool)
    timeouts[STEPS - 1::STEPS] = True
    arrays = {"observations": np.array(obs), "next_observations": np.array(nxt), "actions": np.array(acts),
              "rewards": np.array(rews, np.float32), "terminals": np.zeros(n, bool), "timeouts": timeouts}
    return write_d4rl_hdf5(path, arrays, {"env_id": ENV_ID})


@pytest.mark.parametrize("windows", ["end", "start"])
def test_the_model_takes_each_behaviour_when_asked_for_its_return(tmp_path, windows):
    data = _two_mode_file(tmp_path / "two_paths.hdf5")
    run = train(TrainConfig(dataset=f"d4rl:{data}", env=ENV_ID, steps=400, warmup_steps=40, batch_size=32,
                            hidden_size=32, n_layer=1, context_len=5, learning_rate=1e-3, reward_scale=10.0,
                            max_ep_len=STEPS, windows=windows, eval_episodes=0, progress=False,
                            precision="fp32", out=str(tmp_path / "run")))
    report = evaluate(Policy.from_pretrained(run), ENV_ID, [LEFT, RIGHT], episodes=3)
    left, right = (r["return_mean"] for r in report["results"])
    # asked for the left path's return it goes left from the first step, asked for the right
    # path's it goes right (a target in between has no behaviour of its own in these data)
    assert left == pytest.approx(LEFT, abs=2.5)
    assert right == pytest.approx(RIGHT, abs=2.5)


def test_evaluate_sweep_reports_the_slope_and_spread_and_draws_the_curve(tmp_path, capsys):
    import json

    from glmgym.cli import main

    data = _two_mode_file(tmp_path / "two_paths.hdf5")
    run = train(TrainConfig(dataset=f"d4rl:{data}", env=ENV_ID, steps=400, warmup_steps=40, batch_size=32,
                            hidden_size=32, n_layer=1, context_len=5, learning_rate=1e-3, reward_scale=10.0,
                            max_ep_len=STEPS, windows="end", eval_episodes=0, progress=False,
                            precision="fp32", out=str(tmp_path / "run")))
    report_file, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert main(["agent", "evaluate", "--checkpoint", str(run), "--sweep", "5", "--episodes", "2",
                 "--json", str(report_file), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "return conditioning: slope" in out and png.stat().st_size > 1000
    c = json.loads(report_file.read_text())["conditioning"]
    # five targets from the data's worst return (12.5 less the noise) to 1.25x its best
    assert len(c["targets"]) == 5 and c["targets"][0] == pytest.approx(LEFT, abs=1.0)
    assert c["targets"][-1] == pytest.approx(1.25 * RIGHT, abs=1.5)
    assert c["spread"] > 20 and c["slope"] > 0.4  # from the left path's return up to the right's
    assert main(["agent", "evaluate", "--checkpoint", str(run), "--sweep", "1"]) == 2
    assert "--sweep N needs N >= 2" in capsys.readouterr().err
