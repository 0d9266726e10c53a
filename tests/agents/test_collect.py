import h5py
import numpy as np
import pytest

from glmgym.agents.collect import CollectConfig, collect, save_record, write_d4rl_hdf5
from glmgym.agents.data import load_dataset
from glmgym.agents.rollouts import run_episodes
from glmgym.errors import GlmgymError

TINY = dict(env="Hopper-v5", steps=300, learning_starts=100, snapshot_every=100, snapshot_episodes=2,
            dataset_steps=150, ref_episodes=3, num_envs=4, progress=False)


def test_collect_end_to_end_writes_d4rl_files_the_loader_reads(tmp_path):
    cfg = CollectConfig(levels="random,medium,medium-replay,expert,medium-expert", out=str(tmp_path / "c"),
                        **TINY)
    paths = collect(cfg)
    assert set(paths) == {"random", "medium", "medium-replay", "expert", "medium-expert"}
    sizes = {}
    for level, path in paths.items():
        ds = load_dataset(f"d4rl:{path}")
        assert ds.state_dim == 11 and ds.act_dim == 3
        sizes[level] = ds.num_transitions
        assert ds.metadata["env_id"] == "Hopper-v5"
        # reference returns (random and expert policies) travel with every file
        assert isinstance(ds.metadata["ref_min_score"], float)
        assert isinstance(ds.metadata["ref_max_score"], float)
        assert ds.metadata["level"] == level
        with h5py.File(path) as f:
            assert {"observations", "next_observations", "actions", "rewards", "terminals", "timeouts",
                    "infos", "metadata"} <= set(f)
            assert f["infos/qpos"].shape == (ds.num_transitions, 6)
            assert f["infos/qvel"].shape == (ds.num_transitions, 6)
            # within an episode, next_observations[i] == observations[i + 1]
            obs, nxt = f["observations"][()], f["next_observations"][()]
            inner = ~(f["terminals"][()] | f["timeouts"][()])[:-1]
            np.testing.assert_array_equal(nxt[:-1][inner], obs[1:][inner])
    assert sizes["random"] >= 150 and sizes["medium"] >= 150 and sizes["expert"] >= 150
    assert sizes["medium-expert"] == sizes["medium"] + sizes["expert"]
    # medium-replay is the training stream up to the medium snapshot
    import json

    state = json.loads((tmp_path / "c" / "collect_state.json").read_text())
    assert sizes["medium-replay"] == state["medium_snapshot"]["step"]
    assert [s["step"] for s in state["snapshots"]] == [100, 200, 300]


def test_rerun_resumes_and_keeps_finished_files(tmp_path):
    cfg = CollectConfig(levels="random,expert", out=str(tmp_path / "c"), **TINY)
    first = collect(cfg)
    mtime = first["expert"].stat().st_mtime_ns
    first["random"].unlink()  # as if the run had stopped before writing it
    again = collect(cfg)
    assert again["expert"].stat().st_mtime_ns == mtime
    assert load_dataset(f"d4rl:{again['random']}").num_transitions >= 150
    with pytest.raises(GlmgymError, match="other settings"):
        collect(CollectConfig(levels="random", out=str(tmp_path / "c"), **(TINY | {"seed": 1})))


def test_a_stopped_run_resumes_exactly_where_it_stopped(tmp_path, monkeypatch):
    """A run stopped after a snapshot and rerun ends with the same policy and the same recorded
    transitions as a run that never stopped (Hopper's episodes end mid-way, so the stop falls
    inside one and the simulator's state must come back too)."""
    import glmgym.agents.collect as collect_module

    cfg = dict(TINY, levels="expert")
    straight = collect(CollectConfig(out=str(tmp_path / "straight"), **cfg))

    real = collect_module.run_episodes

    def stop_at_the_last_snapshot(*args, **kwargs):
        if kwargs.get("seed") == 10_000 + 300:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_module, "run_episodes", stop_at_the_last_snapshot)
    with pytest.raises(KeyboardInterrupt):
        collect(CollectConfig(out=str(tmp_path / "stopped"), **cfg))
    monkeypatch.setattr(collect_module, "run_episodes", real)
    resumed = collect(CollectConfig(out=str(tmp_path / "stopped"), **cfg))

    sac = [tmp_path / run / "sac" for run in ("straight", "stopped")]
    with np.load(sac[0] / "stream.npz") as a, np.load(sac[1] / "stream.npz") as b:
        assert len(a["rewards"]) == 300
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (sac[0] / "policy_00000300.safetensors").read_bytes() == \
        (sac[1] / "policy_00000300.safetensors").read_bytes()
    with h5py.File(straight["expert"]) as a, h5py.File(resumed["expert"]) as b:
        np.testing.assert_array_equal(a["actions"][()], b["actions"][()])

    # a run directory without the generators' state (older glmgym) still resumes, as another run:
    # the episode in flight at the stop ends there
    monkeypatch.setattr(collect_module, "run_episodes", stop_at_the_last_snapshot)
    with pytest.raises(KeyboardInterrupt):
        collect(CollectConfig(out=str(tmp_path / "old"), **cfg))
    monkeypatch.setattr(collect_module, "run_episodes", real)
    (tmp_path / "old" / "sac" / "resume.npz").unlink()
    collect(CollectConfig(out=str(tmp_path / "old"), **cfg))
    with np.load(tmp_path / "old" / "sac" / "stream.npz") as c, np.load(sac[0] / "stream.npz") as a:
        assert len(c["rewards"]) == 300
        assert c["timeouts"][199] and not a["timeouts"][199] | a["terminals"][199]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"env": "Hoper-v5"}, "cannot create environment"),
        ({"env": "CartPole-v1"}, "Discrete action space"),
        ({"levels": "medium,hard"}, "unknown level(s) hard"),
    ],
)
def test_bad_collect_options(tmp_path, kwargs, message):
    with pytest.raises(GlmgymError, match=message.replace("(", r"\(").replace(")", r"\)")):
        collect(CollectConfig(out=str(tmp_path / "c"), **(TINY | kwargs)))
    assert not (tmp_path / "c").exists()


def test_interrupted_write_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    arrays = run_episodes("Hopper-v5", lambda obs: np.zeros((len(obs), 3)), episodes=2, num_envs=2)
    original = h5py.Group.create_dataset
    calls = {"n": 0}

    def failing(self, name, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError, match="No space left"):
        write_d4rl_hdf5(tmp_path / "x.hdf5", arrays, {"env_id": "Hopper-v5"})
    assert list(tmp_path.iterdir()) == []


def test_collect_also_writes_a_minari_dataset(tmp_path):
    paths = collect(CollectConfig(levels="random,expert", out=str(tmp_path / "c"), minari=True, **TINY))
    hdf5 = load_dataset(f"d4rl:{paths['random']}")
    ds = load_dataset("minari:glmgym/hopper/random-v0")
    assert ds.num_transitions == hdf5.num_transitions and ds.num_episodes == hdf5.num_episodes
    np.testing.assert_allclose(ds.rewards, hdf5.rewards)
    assert ds.env_id == "Hopper-v5"
    assert ds.metadata["ref_min_score"] == pytest.approx(hdf5.metadata["ref_min_score"])


def test_a_record_rewrites_every_level(tmp_path, capsys):
    """A record (state + two actors, no replay buffer or stream) is all a later machine needs to
    write the random, medium, expert and medium-expert files again, identical to the run's, and
    medium-replay by training SAC again up to the medium snapshot."""
    import shutil

    run = collect(CollectConfig(levels="random,medium,medium-replay,expert,medium-expert",
                                out=str(tmp_path / "run"), **TINY))
    record = save_record(tmp_path / "run", tmp_path / "record")
    import json

    medium = json.loads((record / "collect_state.json").read_text())["medium_snapshot"]["policy"]
    files = sorted(p.relative_to(record).as_posix() for p in record.rglob("*") if p.is_file())
    assert files == ["collect_state.json", f"sac/{medium}", "sac/policy_00000300.safetensors"]
    from safetensors import safe_open

    with safe_open(str(record / files[-1]), "pt") as f:
        names = list(f.keys())
    assert names and all(k.startswith("actor.") for k in names)  # the critics stay behind

    again = tmp_path / "again"
    shutil.copytree(record, again)
    # medium-expert alone brings the medium and expert files it is made of
    paths = collect(CollectConfig(levels="medium-expert,random", out=str(again), **TINY))
    assert set(paths) == {"random", "medium", "expert", "medium-expert"}
    for level, path in paths.items():
        assert path.read_bytes() == run[level].read_bytes(), level

    # medium-replay: SAC trained again up to the medium snapshot only, on the recorded path
    replayed = collect(CollectConfig(levels="medium-replay", out=str(again), **TINY))["medium-replay"]
    state = json.loads((again / "collect_state.json").read_text())
    stop = state["medium_snapshot"]["step"]
    assert state["replay"]["trained_steps"] <= stop < TINY["steps"]
    assert [s["step"] for s in state["replay"]["snapshots"]] == list(range(100, stop + 1, 100))
    assert state["replay"]["matches_record"] is True
    mine, theirs = load_dataset(f"d4rl:{replayed}"), load_dataset(f"d4rl:{run['medium-replay']}")
    assert mine.num_transitions == theirs.num_transitions == stop
    for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
        np.testing.assert_array_equal(getattr(mine, key), getattr(theirs, key), err_msg=key)
    assert bool(mine.metadata["replayed_from_record"]) is True
    assert "replayed_from_record" not in theirs.metadata
    # a replay that parts from the recorded path (another CPU or library) says so, in the file too
    state["snapshots"][0]["return_mean"] += 1.0
    state["done"].pop("medium-replay")
    (again / "collect_state.json").write_text(json.dumps(state))
    replayed = collect(CollectConfig(levels="medium-replay", out=str(again), **TINY))["medium-replay"]
    assert "another path" in capsys.readouterr().err
    assert bool(load_dataset(f"d4rl:{replayed}").metadata["replayed_from_record"]) is False
    (again / "sac" / files[1].removeprefix("sac/")).unlink()
    (again / "hopper-medium.hdf5").unlink()
    with pytest.raises(GlmgymError, match="is missing"):
        collect(CollectConfig(levels="medium", out=str(again), **TINY))
    with pytest.raises(GlmgymError, match="already exists"):
        save_record(tmp_path / "run", record)
    with pytest.raises(GlmgymError, match="not a glmgym collection"):
        save_record(tmp_path / "nothing", tmp_path / "r2")
