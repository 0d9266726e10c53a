"""`benchmarks/dt_step_parity.py`: glmgym's training step against d3rlpy's own `update`s
(`tests/agents/fixtures/d3rlpy_dt_steps.npz`, made by d3rlpy 2.8.1; see the fixtures' README)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "agents" / "fixtures" / "d3rlpy_dt_steps.npz"


@pytest.fixture
def parity(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import dt_step_parity

    yield dt_step_parity
    for name in ("dt_step_parity", "_d3rlpy_convert", "_machine"):
        sys.modules.pop(name, None)


def _fixture(tmp_path):
    from glmgym.agents.collect import write_d4rl_hdf5
    from glmgym.agents.data import load_dataset

    with np.load(FIXTURE, allow_pickle=False) as z:
        g = dict(z)
    data = {k[5:]: g[k] for k in g if k.startswith("data.")}
    data["next_observations"] = data["observations"]  # not read by training
    data["terminals"], data["timeouts"] = data["terminals"] > 0, data["timeouts"] > 0
    path = write_d4rl_hdf5(tmp_path / "tiny.hdf5", data, {"env_id": "Hopper-v5"})
    part = {p: {k[len(p) + 1:]: v for k, v in g.items() if k.startswith(p + ".")}
            for p in ("init", "final", "steps")}
    return load_dataset(f"d4rl:{path}"), part


def test_glmgym_takes_d3rlpys_training_steps(parity, tmp_path):
    dataset, g = _fixture(tmp_path)
    assert dataset.lengths.tolist() == [9, 4, 12, 7, 3]  # the episodes d3rlpy's MDPDataset made
    model, _, params, optimizer, scheduler, sampler = parity.trainer(g["init"], dataset, False, 0, warmup=4)
    losses = [parity.step(model, params, optimizer, scheduler, sampler.ending_at(ep, t))
              for ep, t in zip(g["steps"]["episode"], g["steps"]["step"])]
    # the windows are left-padded ones too (steps near an episode's start), and the warmup ends
    # within the twelve steps
    assert (g["steps"]["step"] < 5).any()
    np.testing.assert_allclose(losses, g["steps"]["loss"], rtol=1e-5)
    theirs, _ = parity.glmgym_model(g["final"])
    final, start = theirs.state_dict(), parity.glmgym_model(g["init"])[0].state_dict()
    ours = model.state_dict()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], final[name], atol=1e-5, rtol=1e-4, msg=name)
    # and the steps moved the weights well beyond that tolerance
    moved = max(float((final[n] - start[n]).abs().max())
                for n, p in model.named_parameters() if p.requires_grad)
    assert moved > 1e-3


def test_the_comparison_sees_the_windows(parity, tmp_path):
    """It can fail: windows ending one step earlier give other losses from the first step on."""
    dataset, g = _fixture(tmp_path)
    model, _, params, optimizer, scheduler, sampler = parity.trainer(g["init"], dataset, False, 0, warmup=4)
    ep, t = g["steps"]["episode"][0], g["steps"]["step"][0]
    loss = parity.step(model, params, optimizer, scheduler, sampler.ending_at(ep, np.maximum(t - 1, 0)))
    assert abs(loss - g["steps"]["loss"][0]) > 1e-3 * g["steps"]["loss"][0]


def test_while_the_clip_binds_glmgyms_mean_loss_takes_the_same_steps(parity, tmp_path):
    """glmgym's loss (the mean over real steps and action dims) is d3rlpy's over a factor that
    varies by batch; while the 0.25 clip binds (every step here), the clipped gradients and so the
    steps are the same. On walker2d-medium-expert glmgym's gradient norm falls below the clip after
    warmup, where the two differ (docs/benchmarks.md)."""
    dataset, g = _fixture(tmp_path)
    model, _, params, optimizer, scheduler, sampler = parity.trainer(g["init"], dataset, False, 0, warmup=4)
    norms = []
    for ep, t in zip(g["steps"]["episode"], g["steps"]["step"]):
        batch = sampler.ending_at(ep, t)
        pred = model(*(torch.from_numpy(a) for a in (batch.states, batch.actions, batch.returns_to_go,
                                                     batch.timesteps, batch.attention_mask)))
        m = torch.from_numpy(batch.attention_mask).float()[..., None]
        loss = ((pred - torch.from_numpy(batch.actions)) ** 2 * m).sum() / (m.sum() * pred.shape[-1])
        optimizer.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, parity.GRAD_CLIP)))
        optimizer.step()
        scheduler.step()
    assert min(norms) > parity.GRAD_CLIP
    final = parity.glmgym_model(g["final"])[0].state_dict()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(model.state_dict()[name], final[name], atol=1e-5, rtol=1e-4, msg=name)
