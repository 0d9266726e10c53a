"""d3rlpy's trained Decision Transformer as a glmgym run folder, so that glmgym's own tools
(`dt_heldout.py`, `dt_sweep.py`, `dt_tokens.py`, `glmgym agent evaluate`) run on it unchanged.

`_d3rlpy_runner.py --save-model` writes the weights as plain arrays under d3rlpy's names. d3rlpy
2.8.1's `ContinuousDecisionTransformer` is glmgym's network with three details that glmgym's
config and weights express exactly:

- LayerNorm epsilon 0.003 in the blocks and the final norm: `layer_norm_epsilon` (its `embed_ln`
  keeps PyTorch's 1e-5, as glmgym's);
- no position embedding: `wpe` is zero;
- 1-based timesteps (0 marks padding): row t + 1 of its timestep table is glmgym's row t.

Its query, key and value are three `nn.Linear`s where GPT-2 has one `c_attn`, and its observation
scaler divides by std + eps, which becomes glmgym's `state_std`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from glmgym._io import atomic_write_json
from glmgym.agents.config import DTConfig
from glmgym.agents.data import load_dataset
from glmgym.agents.envs import reference_scores
from glmgym.agents.model import DecisionTransformer
from glmgym.agents.train import _data_extras, default_target_returns

D3RLPY_LAYER_NORM_EPS = 0.003
"""d3rlpy 2.8.1's epsilon in `Block` and `GPT2`'s LayerNorms."""


def glmgym_model(arrays: dict[str, np.ndarray]) -> tuple[DecisionTransformer, dict]:
    """The glmgym model holding d3rlpy's weights, and the scaler facts (state mean and std,
    reward scale, context length)."""
    t = {k: torch.from_numpy(np.asarray(v)).float() for k, v in arrays.items() if not k.startswith("__")}
    hidden = t["_embed_ln.weight"].shape[0]
    n_layer = len({k.split(".")[2] for k in t if k.startswith("_gpt2._transformer.")})
    context = int(arrays["__context_size"])
    cfg = DTConfig(state_dim=t["_encoder._layers.0.weight"].shape[1], act_dim=t["_output.weight"].shape[0],
                   hidden_size=hidden, max_ep_len=t["_position_encoding._embed.weight"].shape[0] - 2,
                   n_positions=3 * context, n_layer=n_layer, n_head=int(arrays["__num_heads"]),
                   layer_norm_epsilon=D3RLPY_LAYER_NORM_EPS)
    model = DecisionTransformer(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["embed_timestep.weight"] = t["_position_encoding._embed.weight"][1:cfg.max_ep_len + 1]
    state["encoder.wpe.weight"] = torch.zeros_like(state["encoder.wpe.weight"])
    pairs = {"embed_ln": "_embed_ln", "encoder.ln_f": "_gpt2._layer_norm",
             "embed_state": "_encoder._layers.0", "embed_return": "_rtg_embed",
             "embed_action": "_action_embed", "predict_action.0": "_output"}
    for i in range(n_layer):
        g, d = f"encoder.h.{i}.", f"_gpt2._transformer.{i}."
        pairs.update({g + "attn.c_proj": d + "_attention._proj", g + "mlp.c_fc": d + "_mlp._l1",
                      g + "mlp.c_proj": d + "_mlp._l2", g + "ln_1": d + "_layer_norm1",
                      g + "ln_2": d + "_layer_norm2"})
        for part in ("weight", "bias"):  # GPT-2's c_attn: q, k, v stacked along the output
            state[g + f"attn.c_attn.{part}"] = torch.cat([t[d + f"_attention._{n}.{part}"] for n in "qkv"])
    for ours, theirs in pairs.items():
        for part in ("weight", "bias"):
            state[f"{ours}.{part}"] = t[f"{theirs}.{part}"]
    model.load_state_dict(state, strict=True)
    facts = {"state_mean": np.asarray(arrays["__observation_mean"], np.float32),
             "state_std": np.asarray(arrays["__observation_std"] + arrays["__observation_eps"], np.float32),
             "reward_scale": float(1.0 / arrays["__reward_scale"]), "context_len": context}
    return model, facts


def write_run(npz: Path, run_dir: Path, dataset_path: Path, env_id: str, seed: int, steps: int) -> Path:
    """A glmgym run folder (train_config.json, checkpoints/step_N) for d3rlpy's saved model,
    with the data facts glmgym's training records (data returns, reference scores, targets)."""
    with np.load(npz, allow_pickle=False) as z:
        model, facts = glmgym_model(dict(z))
    ds = load_dataset(f"d4rl:{dataset_path}")
    data = _data_extras(ds, env_id, reference_scores(env_id, ds.metadata), default_target_returns(env_id, ds))
    extras = {**data, **facts, "max_ep_len": model.config.max_ep_len, "trained_by": "d3rlpy"}
    model.save_pretrained(run_dir / "checkpoints" / f"step_{steps:07d}", extras=extras)
    atomic_write_json(run_dir / "train_config.json", {
        "dataset": f"d4rl:{dataset_path}", "env": env_id, "steps": steps, "seed": seed, "windows": "end",
        "init": "d3rlpy-weights", "context_len": facts["context_len"], "reward_scale": facts["reward_scale"],
        "max_ep_len": model.config.max_ep_len, "trained_by": "d3rlpy"})
    return run_dir


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("npz", type=Path)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--dataset", type=Path, required=True, help="the HDF5 file d3rlpy trained on")
    p.add_argument("--env", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--steps", type=int, default=10_000)
    a = p.parse_args()
    print(json.dumps(str(write_run(a.npz, a.run_dir, a.dataset, a.env, a.seed, a.steps))))
