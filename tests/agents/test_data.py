import re

import numpy as np
import pytest

from glmgym.agents.data import (
    OfflineDataset,
    WindowSampler,
    episode_bounds,
    load_d4rl,
    load_dataset,
    returns_to_go,
)
from glmgym.errors import GlmgymError
from tests.conftest import write_d4rl


def test_episode_bounds_split_after_terminal_or_timeout_and_keep_trailing_steps():
    terminals = np.array([0, 0, 1, 0, 0, 0, 0, 0], bool)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], bool)
    starts, lengths = episode_bounds(terminals, timeouts)
    assert starts.tolist() == [0, 3, 5]
    assert lengths.tolist() == [3, 2, 3]


def test_episode_bounds_last_step_flagged():
    starts, lengths = episode_bounds(np.array([0, 1, 0, 1], bool), np.zeros(4, bool))
    assert starts.tolist() == [0, 2] and lengths.tolist() == [2, 2]


def test_returns_to_go_matches_a_per_episode_loop():
    rng = np.random.default_rng(1)
    lengths = np.array([5, 1, 7, 3])
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    rewards = rng.normal(size=lengths.sum()).astype(np.float32)
    expected = []
    for s, n in zip(starts, lengths):
        ep = rewards[s:s + n]
        expected += [ep[i:].sum() for i in range(n)]
    np.testing.assert_allclose(returns_to_go(rewards, starts, lengths), expected, rtol=1e-5, atol=1e-5)


def _reference_window(sampler, ds, ep, start, K, mean, std, scale):
    """The reference implementation's get_batch for one (episode, start), written as a loop."""
    s0, n = ds.starts[ep], ds.lengths[ep]
    obs = ds.observations[s0:s0 + n]
    stop = min(start + K, n)
    tlen = stop - start
    pad = K - tlen
    rtg_full = np.array([ds.rewards[s0 + i:s0 + n].sum() for i in range(n)])
    states = np.concatenate([np.zeros((pad, ds.state_dim)), (obs[start:stop] - mean) / std])
    actions = np.concatenate([np.full((pad, ds.act_dim), -10.0), ds.actions[s0 + start:s0 + stop]])
    rtg = np.concatenate([np.zeros(pad), rtg_full[start:stop] / scale])
    timesteps = np.concatenate([np.zeros(pad), np.arange(start, stop)])
    mask = np.concatenate([np.zeros(pad), np.ones(tlen)])
    return states, actions, rtg, timesteps, mask


def test_window_sampler_matches_reference_padding_and_masks(tmp_path):
    ds = load_d4rl(write_d4rl(tmp_path / "x.hdf5", lengths=[3, 25, 8, 40]))
    mean, std = ds.state_stats()
    K, scale = 10, 100.0
    rng = np.random.default_rng(0)
    # kzl's cut (windows="start") against kzl's own code; the default "end" cut is tested below
    sampler = WindowSampler(ds, K, mean, std, scale, max_ep_len=1000, rng=rng, windows="start")
    # Replay the sampler's own draws to know which windows it took.
    replay = np.random.default_rng(0)
    batch = sampler.sample(64)
    eps = replay.choice(len(ds.lengths), size=64, p=ds.lengths / ds.lengths.sum())
    starts = (replay.random(64) * ds.lengths[eps]).astype(int)
    assert (batch.attention_mask.sum(1) >= 1).all()
    for i, (ep, start) in enumerate(zip(eps, starts)):
        s, a, r, t, m = _reference_window(sampler, ds, ep, start, K, mean, std, scale)
        np.testing.assert_allclose(batch.states[i], s, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batch.actions[i], a, rtol=1e-6)
        np.testing.assert_allclose(batch.returns_to_go[i, :, 0], r, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(batch.timesteps[i], t)
        np.testing.assert_array_equal(batch.attention_mask[i], m)
    assert batch.states.shape == (64, K, ds.state_dim)
    assert batch.returns_to_go.shape == (64, K, 1)


def test_window_sampler_draws_episodes_in_proportion_to_length(tmp_path):
    ds = load_d4rl(write_d4rl(tmp_path / "x.hdf5", lengths=[10, 30, 60]))
    sampler = WindowSampler(ds, 1, *ds.state_stats(), 1.0, 1000, np.random.default_rng(0))
    batch = sampler.sample(20000)
    # With K=1 a window is one (random, hence unique) normalized state: map it to its episode.
    episode_of = np.searchsorted(ds.starts, np.arange(ds.num_transitions), side="right") - 1
    lookup = {row.tobytes(): episode_of[i] for i, row in enumerate(sampler.states)}
    episodes = np.array([lookup[s.tobytes()] for s in batch.states[:, 0]])
    freq = np.bincount(episodes, minlength=3) / len(episodes)
    np.testing.assert_allclose(freq, [0.1, 0.3, 0.6], atol=0.02)


def test_timesteps_are_clipped_to_max_ep_len(tmp_path):
    ds = load_d4rl(write_d4rl(tmp_path / "x.hdf5", lengths=[50]))
    sampler = WindowSampler(ds, 20, *ds.state_stats(), 1.0, 10, np.random.default_rng(0))
    assert sampler.sample(32).timesteps.max() == 9


def test_load_d4rl_reads_required_and_optional_keys(hopper_file):
    ds = load_dataset("d4rl:hopper-medium-v2")
    assert ds.state_dim == 11 and ds.act_dim == 3
    assert ds.num_episodes == 6
    assert ds.metadata["algorithm"] == "test"
    assert ds.source == str(hopper_file)
    same = load_dataset(f"d4rl:{hopper_file}")
    np.testing.assert_array_equal(same.rewards, ds.rewards)
    bare = load_dataset(str(hopper_file))
    assert bare.num_transitions == ds.num_transitions


def test_summary_reports_return_statistics(tmp_path):
    ds = load_d4rl(write_d4rl(tmp_path / "x.hdf5", lengths=[2, 3], rewards=np.arange(5, dtype=np.float32)))
    summary = ds.summary()
    assert summary["episodes"] == 2 and summary["transitions"] == 5
    assert summary["return_min"] == 1.0 and summary["return_max"] == 9.0  # 0+1, 2+3+4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"timeouts": None}, "missing key(s) timeouts"),
        ({"rewards": np.full(10, np.nan, np.float32)}, "NaN"),
        ({"observations": np.zeros((0, 11), np.float32), "actions": np.zeros((0, 3), np.float32),
          "rewards": np.zeros(0, np.float32), "terminals": np.zeros(0, bool),
          "timeouts": np.zeros(0, bool)}, "empty"),
        ({"actions": np.zeros((3, 3), np.float32)}, "actions has 3 rows"),
    ],
)
def test_malformed_d4rl_files_are_refused_with_a_clear_message(tmp_path, overrides, message):
    path = write_d4rl(tmp_path / "bad.hdf5", lengths=[10], **overrides)
    with pytest.raises(GlmgymError, match=re.escape(message)):
        load_dataset(f"d4rl:{path}")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(GlmgymError, match="does not exist"):
        load_dataset(f"d4rl:{tmp_path / 'nope.hdf5'}")
    with pytest.raises(GlmgymError, match=r"not found: looked for .*hopper_medium_replay-v2\.hdf5"):
        load_dataset("d4rl:hopper-medium-replay-v2")
    junk = tmp_path / "junk.hdf5"
    junk.write_text("not hdf5")
    with pytest.raises(GlmgymError, match="not a readable HDF5"):
        load_dataset(str(junk))
    with pytest.raises(GlmgymError, match="unknown dataset scheme"):
        load_dataset("s3:bucket/x")
    with pytest.raises(GlmgymError, match="cannot read dataset spec"):
        load_dataset("hopper")


def test_minari_dataset_written_with_minari_and_loaded(tmp_path):
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    buffers = []
    lengths = [12, 30, 7]
    for i, n in enumerate(lengths):
        buffers.append(EpisodeBuffer(
            id=i, seed=i,
            observations=rng.normal(size=(n + 1, 11)).astype(np.float32),
            actions=rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
            rewards=rng.normal(size=n).tolist(),
            terminations=[False] * (n - 1) + [i % 2 == 0],
            truncations=[False] * (n - 1) + [i % 2 == 1],
            infos={},
        ))
    env = gym.make("Hopper-v5")
    minari.create_dataset_from_buffers("test/hopper/tiny-v0", buffers, env=env, algorithm_name="random")
    env.close()
    assert (tmp_path / "minari" / "test").is_dir()  # written to the isolated store
    ds = load_dataset("minari:test/hopper/tiny-v0")
    assert ds.num_episodes == 3
    assert ds.lengths.tolist() == lengths
    assert ds.env_id == "Hopper-v5"
    assert ds.terminals.sum() == 2 and ds.timeouts.sum() == 1
    np.testing.assert_allclose(ds.observations[:12], buffers[0].observations[:12])
    with pytest.raises(GlmgymError, match="not in the local store"):
        load_dataset("minari:test/hopper/absent-v0")


def test_offline_dataset_validates_shapes():
    with pytest.raises(GlmgymError, match="2-D"):
        OfflineDataset("x", np.zeros(3, np.float32), np.zeros((3, 1), np.float32), np.zeros(3, np.float32),
                       np.zeros(3, bool), np.zeros(3, bool))


def test_windows_ending_at_a_uniform_transition_cover_episode_starts_like_their_middle(tmp_path):
    ds = load_d4rl(write_d4rl(tmp_path / "x.hdf5", lengths=[3, 25, 8, 40]))
    K = 10
    mean, std = ds.state_stats()
    ends = WindowSampler(ds, K, mean, std, 100.0, 1000, np.random.default_rng(0), windows="end")
    starts = WindowSampler(ds, K, mean, std, 100.0, 1000, np.random.default_rng(0), windows="start")
    for sampler in (ends, starts):
        batch = sampler.sample(4000)
        real = batch.attention_mask == 1
        # left padding only, and one episode per window: timesteps rise by one over the real steps
        assert (np.diff(batch.attention_mask, axis=1) >= 0).all()
        gaps = np.diff(batch.timesteps, axis=1)[real[:, 1:] & real[:, :-1]]
        assert (gaps == 1).all()
        sampler.coverage = np.bincount(batch.timesteps[real], minlength=40) / real.sum()
    # each window ends at a transition drawn uniformly: the last slot's timestep is uniform over
    # the episodes' steps, so step 0 (in 4 episodes) ends about 4/76 of the windows
    last = ends.sample(20000).timesteps[:, -1]
    assert np.mean(last == 0) == pytest.approx(4 / 76, abs=0.01)
    # step t lies in min(K, L - t) "end" windows of an episode of length L, against min(t + 1, K)
    # "start" windows: an episode's first steps are trained as often as its middle only with "end"
    t = np.arange(40)
    inside = t[None, :] < ds.lengths[:, None]  # [episodes, 40]
    expected = {"end": (np.minimum(K, ds.lengths[:, None] - t[None, :]) * inside).sum(0),
                "start": (np.minimum(t[None, :] + 1, K) * inside).sum(0)}
    for name, sampler in (("end", ends), ("start", starts)):
        np.testing.assert_allclose(sampler.coverage, expected[name] / expected[name].sum(), atol=0.006)
    assert ends.coverage[0] > 2.5 * starts.coverage[0]
    with pytest.raises(GlmgymError, match="windows"):
        WindowSampler(ds, K, mean, std, 100.0, 1000, np.random.default_rng(0), windows="middle")
