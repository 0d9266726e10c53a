"""`benchmarks/dt_tokens.py`: what the embedding LayerNorm lets through of the return and timestep."""

import sys
from pathlib import Path

import pytest
import torch

from glmgym.agents.config import DTConfig
from glmgym.agents.model import DecisionTransformer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def dt_tokens(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import dt_tokens

    yield dt_tokens
    sys.modules.pop("dt_tokens", None)


def _model(seed=0):
    torch.manual_seed(seed)
    return DecisionTransformer(DTConfig(state_dim=5, act_dim=2, hidden_size=32, max_ep_len=100, n_layer=1,
                                        n_head=1, n_positions=60))


def test_the_layernorm_hides_the_return_embeddings_scale_but_not_its_offset(dt_tokens):
    model = _model()
    base = dt_tokens.shifts(model, 1000.0, (1000.0, 3000.0), (0, 50))
    assert base["return_shift"] > 0.01 and base["time_shift"] > 0.01
    with torch.no_grad():
        model.embed_timestep.weight.zero_()
        torch.nn.init.normal_(model.embed_return.weight)  # unit scale: LayerNorm's epsilon plays no part
        torch.nn.init.normal_(model.embed_return.bias)
        no_time = dt_tokens.shifts(model, 1000.0, (1000.0, 3000.0), (0, 50))
        assert no_time["time_shift"] == 0.0  # no timestep embedding: nothing to tell two steps apart
        # w R + b scaled as a whole: the normalized token, hence the shift, stays (scale-invariance)
        model.embed_return.weight.mul_(10.0)
        model.embed_return.bias.mul_(10.0)
        scaled = dt_tokens.shifts(model, 1000.0, (1000.0, 3000.0), (0, 50))
        assert scaled["return_shift"] == pytest.approx(no_time["return_shift"], rel=1e-4)
        # the weight alone grown: the turn from the bias' direction to the weight's is done early,
        # so two large returns look alike (the paper init's weak resolution at the data's top)
        model.embed_return.weight.mul_(10.0)
        saturated = dt_tokens.shifts(model, 1000.0, (1000.0, 3000.0), (0, 50))
        assert saturated["return_shift"] < 0.5 * scaled["return_shift"]


def test_a_fresh_model_follows_the_recipe_or_is_none_for_a_removed_arm(dt_tokens):
    class Policy:
        model = _model()

    cfg = {"dataset": "embedded:hopper-medium", "hidden_size": 32, "n_layer": 1, "n_head": 1,
           "max_ep_len": 100, "context_len": 20, "seed": 3}
    paper = dt_tokens.fresh_model({**cfg, "init": "paper"}, Policy)
    gpt2 = dt_tokens.fresh_model(cfg, Policy)  # runs from before --init: GPT-2's
    assert paper.embed_return.weight.std() > 10 * gpt2.embed_return.weight.std()
    assert dt_tokens.fresh_model({**cfg, "init": "ronly"}, Policy) is None
