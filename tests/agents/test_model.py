import json
import os

import pytest
import torch

from glmgym.agents import DecisionTransformer, DTConfig, Policy
from glmgym.agents.checkpoint import EXTRAS_FILE, to_hf_state_dict
from glmgym.errors import GlmgymError

STATE, ACT = 11, 3


def _batch(B=4, K=20, seed=0, pad=(5, 0, 17, 19)):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, K, STATE, generator=g)
    actions = torch.randn(B, K, ACT, generator=g)
    rtg = torch.randn(B, K, 1, generator=g)
    timesteps = torch.randint(0, 1000, (B, K), generator=g)
    mask = torch.ones(B, K, dtype=torch.long)
    for i, p in enumerate(pad[:B]):
        mask[i, :p] = 0
    return states, actions, rtg, timesteps, mask


def _hf_model(**kw):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    cfg = DecisionTransformerConfig(state_dim=STATE, act_dim=ACT, hidden_size=64, n_layer=3,
                                    n_head=2, max_ep_len=1000, **kw)
    torch.manual_seed(0)
    return DecisionTransformerModel(cfg).eval()


@pytest.mark.parametrize("activation", ["relu", "gelu_new"])
def test_parity_with_transformers_on_a_padded_batch(tmp_path, activation):
    hf = _hf_model(activation_function=activation)
    hf.save_pretrained(tmp_path / "hf")  # a plain transformers directory, no glmgym extras
    ours = DecisionTransformer.from_pretrained(tmp_path / "hf")
    states, actions, rtg, timesteps, mask = _batch()
    with torch.no_grad():
        expected = hf(states=states, actions=actions, returns_to_go=rtg, timesteps=timesteps,
                      attention_mask=mask).action_preds
        got = ours(states, actions, rtg, timesteps, mask)
    assert got.shape == (4, 20, ACT)
    real = mask.bool()
    # Real steps must agree. Padded steps are never used (no loss, no action); there HF attends to
    # nothing while we let a padded token see itself to stay NaN-free on every SDPA backend.
    assert (got[real] - expected[real]).abs().max() <= 1e-5
    assert torch.isfinite(got).all()
    # unmasked batch: every position agrees
    with torch.no_grad():
        full = hf(states=states, actions=actions, returns_to_go=rtg, timesteps=timesteps).action_preds
        assert (ours(states, actions, rtg, timesteps) - full).abs().max() <= 1e-5


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    from transformers import DecisionTransformerModel

    torch.manual_seed(1)
    ours = DecisionTransformer(DTConfig(state_dim=STATE, act_dim=ACT, hidden_size=32, n_head=4,
                                        max_ep_len=1000)).eval()
    ours.save_pretrained(tmp_path / "ckpt", extras={"env_id": "Hopper-v5"})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", EXTRAS_FILE, "model.safetensors"]
    hf = DecisionTransformerModel.from_pretrained(tmp_path / "ckpt").eval()
    states, actions, rtg, timesteps, mask = _batch(seed=3)
    with torch.no_grad():
        expected = hf(states=states, actions=actions, returns_to_go=rtg, timesteps=timesteps,
                      attention_mask=mask).action_preds
        got = ours(states, actions, rtg, timesteps, mask)
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max() <= 1e-5
    # tensor names and Conv1D layout ([in, out]) are HF's
    hf_state = hf.state_dict()
    for name, tensor in to_hf_state_dict(ours.state_dict()).items():
        assert hf_state[name].shape == tensor.shape, name


def test_round_trip_preserves_weights_and_extras(tmp_path):
    model = DecisionTransformer(DTConfig(state_dim=STATE, act_dim=ACT, hidden_size=32, max_ep_len=50))
    extras = {"state_mean": [0.5] * STATE, "state_std": [2.0] * STATE, "env_id": "Hopper-v5"}
    model.save_pretrained(tmp_path / "c", extras=extras)
    ckpt = Policy.from_pretrained(tmp_path / "c")
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), ckpt.model.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    assert ckpt.extras["env_id"] == "Hopper-v5"
    assert ckpt.state_std.tolist() == [2.0] * STATE
    assert ckpt.model.config == model.config


def test_pytorch_model_bin_is_loaded_with_weights_only(tmp_path):
    model = DecisionTransformer(DTConfig(state_dim=STATE, act_dim=ACT, hidden_size=32))
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(to_hf_state_dict(model.state_dict()), d / "pytorch_model.bin")
    loaded = DecisionTransformer.from_pretrained(d)
    assert torch.equal(loaded.embed_state.weight, model.embed_state.weight)
    assert torch.equal(loaded.encoder.h[0].attn.c_attn.weight, model.encoder.h[0].attn.c_attn.weight)


class _Payload:  # anything that is not a plain tensor container
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_needing_pickled_code_is_refused(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(DTConfig(state_dim=STATE, act_dim=ACT).to_dict()))
    torch.save({"x": _Payload()}, d / "pytorch_model.bin")
    with pytest.raises(GlmgymError, match="refusing to load"):
        Policy.from_pretrained(d)


def test_bad_checkpoint_directories(tmp_path):
    with pytest.raises(GlmgymError, match="does not exist"):
        Policy.from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GlmgymError, match=r"no config\.json"):
        Policy.from_pretrained(tmp_path / "empty")
    model = DecisionTransformer(DTConfig(state_dim=STATE, act_dim=ACT, hidden_size=32))
    model.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GlmgymError, match=r"do not match config\.json"):
        Policy.from_pretrained(tmp_path / "c")
    cfg.update(hidden_size=32, scale_attn_by_inverse_layer_idx=True)
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GlmgymError, match="supports False only"):
        Policy.from_pretrained(tmp_path / "c")


def test_predictions_are_causal():
    cfg = DTConfig(state_dim=STATE, act_dim=ACT, hidden_size=32, max_ep_len=1000)
    model = DecisionTransformer(cfg).eval()
    states, actions, rtg, timesteps, _ = _batch(B=2)
    with torch.no_grad():
        before = model(states, actions, rtg, timesteps)
        states2, actions2 = states.clone(), actions.clone()
        states2[:, 10:] += 1.0
        actions2[:, 9:] += 1.0  # a_9 must not influence the prediction of a_9 either
        after = model(states2, actions2, rtg, timesteps)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_save_is_atomic_and_keeps_the_old_checkpoint_on_failure(tmp_path, monkeypatch):
    model = DecisionTransformer(DTConfig(state_dim=STATE, act_dim=ACT, hidden_size=32))
    model.save_pretrained(tmp_path / "c", extras={"v": 1})
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "c", extras={"v": 2})
    assert json.loads((tmp_path / "c" / EXTRAS_FILE).read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp dirs left behind


def test_predict_last_action_equals_the_last_full_prediction():
    model = DecisionTransformer(DTConfig(state_dim=STATE, act_dim=ACT, hidden_size=32, n_head=2,
                                         max_ep_len=1000)).eval()
    states, actions, rtg, timesteps, _ = _batch(B=3)
    with torch.no_grad():
        full = model(states, actions, rtg, timesteps)[:, -1]
        last = model.predict_last_action(states, actions, rtg, timesteps)
    assert last.shape == (3, ACT)
    assert torch.allclose(full, last, atol=1e-6)


def test_cpu_dropout_keeps_each_entry_with_probability_1_minus_p_and_rescales():
    from glmgym.agents.model import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.1).train()
    x = torch.ones(400, 1000)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    # draws are independent: the four neighbours that share one 64-bit word are not correlated
    lanes = kept.view(-1, 4).float().T  # [4, n/4]
    corr = torch.corrcoef(lanes) - torch.eye(4)
    assert corr.abs().max().item() < 0.01
    # torch's seed fixes the mask (resumed runs restore torch's RNG state), and calls differ
    torch.manual_seed(1)
    first, second = drop(x), drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), first)
    assert not torch.equal(first, second)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    # gradients flow through the kept entries only, scaled as in the forward pass
    x = torch.randn(30, 7, requires_grad=True)
    out = Dropout(0.5).train()(x)
    out.sum().backward()
    assert torch.equal(x.grad, (out.detach() != 0).float() * 2.0)


def test_training_attention_with_dropout_off_matches_sdpa():
    """The written-out CPU training attention computes what SDPA does (dropout aside)."""
    torch.manual_seed(0)
    cfg = DTConfig(state_dim=4, act_dim=2, hidden_size=32, n_layer=2, n_head=2, attn_pdrop=0.0,
                   resid_pdrop=0.0, embd_pdrop=0.0)
    model = DecisionTransformer(cfg)
    B, K = 3, 6
    args = (torch.randn(B, K, 4), torch.rand(B, K, 2) * 2 - 1, torch.rand(B, K, 1),
            torch.arange(K).repeat(B, 1), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 1, 1, 1, 1, 1]]))
    ref = model.eval()(*args)
    for block in model.encoder.h:
        block.attn.attn_pdrop = 1e-9  # takes the written-out path; keeps (almost) everything
    out = model.train()(*args)
    mask = args[-1].bool()
    assert torch.allclose(out[mask], ref[mask], atol=1e-5)
