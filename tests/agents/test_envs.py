import warnings

import numpy as np
import pytest

from glmgym.agents.envs import (
    D4RL_REF_SCORES,
    env_family,
    env_id_for_dataset,
    make_env,
    make_vector_env,
    normalized_score,
    reference_scores,
)
from glmgym.errors import GlmgymError


@pytest.mark.parametrize(
    ("name", "env_id"),
    [
        ("hopper-medium-v2", "Hopper-v5"),
        ("halfcheetah-medium-replay-v2", "HalfCheetah-v5"),
        ("walker2d_medium_expert-v2", "Walker2d-v5"),
        ("mujoco/ant/expert-v0", "Ant-v5"),
    ],
)
def test_dataset_names_map_to_v5_envs(name, env_id):
    assert env_id_for_dataset(name) == env_id


def test_unknown_dataset_needs_an_explicit_env():
    assert env_id_for_dataset("my-data", recorded_env_id="Pendulum-v1") == "Pendulum-v1"
    with pytest.raises(GlmgymError, match="--env"):
        env_id_for_dataset("my-data")


def test_normalized_score_uses_d4rl_references():
    ref = D4RL_REF_SCORES["hopper"]
    assert normalized_score(ref.min, ref) == pytest.approx(0.0)
    assert normalized_score(ref.max, ref) == pytest.approx(100.0)
    assert normalized_score(1607.0, ref) == pytest.approx(100 * (1607 + 20.272305) / (3234.3 + 20.272305))
    np.testing.assert_allclose(normalized_score(np.array([ref.min, ref.max]), ref), [0, 100])


def test_reference_scores_fall_back_to_the_dataset_own():
    assert reference_scores("Walker2d-v5").source == "D4RL"
    own = reference_scores("Pendulum-v1", {"ref_min_score": -1000.0, "ref_max_score": -100.0})
    assert (own.min, own.max, own.source) == (-1000.0, -100.0, "dataset")
    assert reference_scores("Pendulum-v1") is None
    # glmgym's own datasets carry references: they win over D4RL's for the same env
    assert reference_scores("Hopper-v5", {"ref_min_score": 10.0, "ref_max_score": 3000.0}).source == "dataset"
    assert env_family("HalfCheetah-v5") == "halfcheetah"


def test_unknown_env_id_is_a_user_error():
    with pytest.raises(GlmgymError, match="cannot create environment 'Hoper-v5'"):
        make_vector_env("Hoper-v5", 2)


def test_mujoco_warnings_become_python_warnings_and_the_old_handler_returns():
    mujoco = pytest.importorskip("mujoco")
    from glmgym.agents.envs import _mujoco_warnings_to_python

    before = mujoco.get_mju_user_warning()
    with _mujoco_warnings_to_python(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handler = mujoco.get_mju_user_warning()
        assert handler is not before
        handler("attribute 'x' is deprecated")
        handler("something odd")
    assert mujoco.get_mju_user_warning() is before
    assert [(w.category, str(w.message)) for w in caught] == [
        (DeprecationWarning, "MuJoCo: attribute 'x' is deprecated"),
        (RuntimeWarning, "MuJoCo: something odd"),
    ]


@pytest.mark.parametrize("env_id", ["HalfCheetah-v5", "Hopper-v5"])
def test_building_envs_leaves_no_mujoco_log_in_the_working_directory(env_id, tmp_path, monkeypatch, capfd):
    # HalfCheetah's asset has an attribute newer MuJoCo releases warn about, once per env built.
    pytest.importorskip("mujoco")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_vector_env(env_id, 3).close()
        make_env(env_id).close()
    assert list(tmp_path.iterdir()) == []
    assert "WARNING" not in capfd.readouterr().out
