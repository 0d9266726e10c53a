"""How much of the return-to-go and of the timestep gets through the DT's embedding LayerNorm.

    python benchmarks/dt_tokens.py benchmarks/runs/RUN ... [--returns R1 R2] [--times 0 500]

The Decision Transformer (the paper's code, transformers', glmgym's) embeds each token as
`embed_ln(embedding + timestep embedding)`. A LayerNorm is blind to its input's scale, so the
return token `embed_ln(w R + b + e_t)` carries the return-to-go R only through the direction of
`w R + b + e_t`, and a state token carries its timestep only as far as `e_t` turns `W s + b`.
How far each turns is set by the sizes of these vectors, that is by their initialization, as
long as training moves them little. For each run folder's newest checkpoint, and for a fresh
model of the same recipe (the same init code and seed: step 0), this measures:

- `return_shift`: the RMS difference of the normalized return token (at timestep 0) between two
  returns-to-go: the data's mean and best episode return (recorded with the checkpoint), or
  `--returns` (raw returns, divided by the run's reward scale as in training);
- `time_shift`: the RMS difference of the normalized state token between the two `--times`,
  averaged over 256 states drawn from N(0, I) (the scale of the normalized states);
- the norms of the return embedding's weight and bias and of the first timestep embedding.

A normalized token has RMS 1 per component before `embed_ln`'s gain, so a shift of 0.01 is a 1%
change of the token. Results go to `--out`, keyed like `dt_heldout.py`'s; `benchmarks/report.py`
tabulates them.
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import torch

from dt_sweep import run_key  # beside this script (sys.path[0])
from glmgym._io import atomic_write_json, read_json
from glmgym.agents import Policy
from glmgym.agents.checkpoint import latest_checkpoint
from glmgym.agents.config import TrainConfig
from glmgym.agents.train import _build_model

STATES = 256
"""Random normalized states the time shift is averaged over."""


def shifts(model, reward_scale: float, returns: tuple[float, float], times: tuple[int, int]) -> dict:
    """The return and time shifts of `model`'s normalized tokens (see the module docstring)."""
    m = model.eval()
    with torch.no_grad():
        t0, t1 = m.embed_timestep(torch.tensor(times))  # [2, h]
        r = torch.tensor(returns, dtype=torch.float32)[:, None] / reward_scale  # [2, 1]
        ret = m.embed_ln(m.embed_return(r) + t0)  # [2, h]: both returns at the first timestep
        g = torch.Generator().manual_seed(0)
        s = torch.randn(STATES, m.embed_state.in_features, generator=g)
        state = m.embed_state(s)  # [STATES, h]
        early, late = m.embed_ln(state + t0), m.embed_ln(state + t1)
        rms = lambda d: float(d.pow(2).mean(-1).sqrt().mean())  # noqa: E731 (per token, then averaged)
        return {
            "return_shift": rms(ret[0] - ret[1]),
            "time_shift": rms(early - late),
            "return_weight_norm": float(m.embed_return.weight.norm()),
            "return_bias_norm": float(m.embed_return.bias.norm()),
            "timestep_norm": float(m.embed_timestep.weight[times[0]].norm()),
        }


def fresh_model(cfg: dict, policy: Policy):
    """The run's model at step 0: its recipe's init, drawn with its seed (None: a recipe that the
    current code no longer builds, e.g. an ablation arm removed after its experiment)."""
    init = cfg.get("init", "gpt2")
    if init not in TrainConfig.__dataclass_fields__["init"].metadata["choices"]:
        return None
    fields = {k: v for k, v in cfg.items() if k in TrainConfig.__dataclass_fields__}
    train_cfg = TrainConfig(**{**fields, "resume": None, "init": init})
    dims = policy.model.config
    model, _ = _build_model(train_cfg, types.SimpleNamespace(state_dim=dims.state_dim, act_dim=dims.act_dim),
                            torch.device("cpu"))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (train_config.json and checkpoints)")
    p.add_argument("--returns", type=float, nargs=2, default=None,
                   help="two returns-to-go (raw); default: the data's mean and best episode return")
    p.add_argument("--times", type=int, nargs=2, default=[0, 500], help="two timesteps")
    p.add_argument("--out", default="benchmarks/results/dt_tokens.json")
    args = p.parse_args()
    result = read_json(args.out) if Path(args.out).is_file() else {}
    for run in map(Path, args.runs):
        cfg = json.loads((run / "train_config.json").read_text())
        key, windows, init = run_key(cfg)
        ckpt = latest_checkpoint(run)
        policy = Policy.from_pretrained(ckpt)
        fresh = fresh_model(cfg, policy)
        data = policy.extras.get("dataset_returns")
        if args.returns is None and not data:
            raise SystemExit(f"{run}: its checkpoint does not record the data's returns; pass --returns")
        returns = tuple(args.returns) if args.returns else (data["mean"], data["max"])
        times = tuple(args.times)
        result[key] = {
            "dataset": Path(cfg["dataset"]).stem, "windows": windows, "init": init, "seed": cfg["seed"],
            "steps": cfg["steps"], "checkpoint": ckpt.name, "returns": list(returns), "times": list(times),
            "trained": shifts(policy.model, policy.reward_scale, returns, times),
            "at_init": None if fresh is None else shifts(fresh, policy.reward_scale, returns, times),
        }
        atomic_write_json(Path(args.out), result)
        t, i = result[key]["trained"], result[key]["at_init"]
        print(f"{key}: return shift {t['return_shift']:.4f}, time shift {t['time_shift']:.4f}"
              + ("" if i is None else f" (at init {i['return_shift']:.4f}, {i['time_shift']:.4f})"))


if __name__ == "__main__":
    main()
