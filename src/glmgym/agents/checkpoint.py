"""Hugging Face compatible checkpoint directories for Decision Transformers.

A directory holds:

- `config.json`: `DecisionTransformerConfig` fields (see `DTConfig.to_dict`);
- `model.safetensors`: tensors named and shaped as in HF's `DecisionTransformerModel`, that is
  GPT-2 `Conv1D` weights stored [in, out] (glmgym's `nn.Linear` keeps [out, in]; we transpose);
- `glmgym.json` (optional): what evaluation needs besides weights: state mean/std, reward scale,
  target returns, env id, context length, dataset.

Loading accepts `model.safetensors` or `pytorch_model.bin`; the latter only through
`torch.load(weights_only=True)`, so a checkpoint can never run code.

This module reads and writes the files only; it builds no model. `DecisionTransformer.
from_pretrained` builds the network from them and `Policy.from_pretrained` the agent (network plus
state normalization): the one way to load an agent.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmgym._io import atomic_dir, atomic_write_json, fix_mode, read_json
from glmgym.agents.config import DTConfig
from glmgym.errors import GlmgymError

__all__ = [
    "EXTRAS_FILE",
    "CheckpointFiles",
    "from_hf_state_dict",
    "latest_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "to_hf_state_dict",
    "write_checkpoint",
]

EXTRAS_FILE = "glmgym.json"
_CONV1D = re.compile(r"^encoder\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Buffers that older transformers versions saved with GPT-2 attention; they hold no weights.
_IGNORED = re.compile(r"^encoder\.h\.\d+\.attn\.(bias|masked_bias)$")


@dataclass
class CheckpointFiles:
    """What a checkpoint directory holds, read and checked, before any model is built."""

    path: Path
    """The checkpoint directory."""
    config: DTConfig
    """`config.json`."""
    state: dict[str, torch.Tensor]
    """Weights in glmgym's layout (`from_hf_state_dict` applied)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """`glmgym.json` (empty for a bare transformers directory)."""


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """glmgym parameters -> HF tensor names and layouts (Conv1D weights as [in, out])."""
    out = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        out[name] = (t.t() if _CONV1D.match(name) else t).contiguous()
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensor names and layouts -> glmgym parameters (drops GPT-2's stored mask buffers)."""
    return {
        name: (t.t() if _CONV1D.match(name) else t)
        for name, t in state.items()
        if not _IGNORED.match(name)
    }


def write_checkpoint(
    path: str | Path,
    config: DTConfig,
    state: dict[str, torch.Tensor],
    extras: dict[str, Any] | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (the old one, if any, is replaced whole).

    Args:
        path: the directory to write.
        config: the model's configuration (`config.json`).
        state: the model's state dict, glmgym layout, any device.
        extras: JSON-serializable glmgym data (numpy arrays become lists).
        extra_files: more files to put in the directory: name -> JSON data, or a callable that
            receives the destination path and writes it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_dir(path) as tmp:
        atomic_write_json(tmp / "config.json", config.to_dict())
        save_file(to_hf_state_dict(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        fix_mode(tmp / "model.safetensors")
        if extras is not None:
            atomic_write_json(tmp / EXTRAS_FILE, _jsonable(extras))
        for name, content in (extra_files or {}).items():
            if callable(content):
                content(tmp / name)
            else:
                atomic_write_json(tmp / name, _jsonable(content))
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint directory (safetensors preferred, then .bin)."""
    st, bin_ = path / "model.safetensors", path / "pytorch_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as exc:
            raise GlmgymError(f"{st} is not a readable safetensors file: {exc}") from None
    if bin_.is_file():
        try:
            state = torch.load(bin_, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise GlmgymError(
                f"refusing to load {bin_}: it needs pickled code to load "
                f"(only plain tensors are accepted; weights_only=True). Details: {exc}"
            ) from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise GlmgymError(f"{bin_} is not a readable PyTorch file: {exc}") from None
        if not isinstance(state, dict):
            raise GlmgymError(f"{bin_} does not hold a state dict")
        return state
    raise GlmgymError(f"{path} has no model.safetensors or pytorch_model.bin")


def read_checkpoint(path: str | Path) -> CheckpointFiles:
    """Read a checkpoint directory written by glmgym or by transformers' `save_pretrained`.

    Raises:
        GlmgymError: the directory, `config.json`, the weights or `glmgym.json` are missing or
            malformed.
    """
    path = Path(path)
    if not path.is_dir():
        raise GlmgymError(f"checkpoint directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise GlmgymError(f"{path} is not a checkpoint directory: it has no config.json")
    try:
        config = DTConfig.from_dict(read_json(cfg_file))
    except json.JSONDecodeError as exc:
        raise GlmgymError(f"{cfg_file} is not valid JSON: {exc}") from None
    state = from_hf_state_dict(read_state_dict(path))
    extras: dict[str, Any] = {}
    extras_file = path / EXTRAS_FILE
    if extras_file.is_file():
        try:
            extras = read_json(extras_file)
        except json.JSONDecodeError as exc:
            raise GlmgymError(f"{extras_file} is not valid JSON: {exc}") from None
        for key in ("state_mean", "state_std"):
            if key in extras and len(extras[key]) != config.state_dim:
                raise GlmgymError(f"{extras_file}: {key} has {len(extras[key])} entries, "
                                  f"state_dim is {config.state_dim}")
    return CheckpointFiles(path, config, state, extras)


def latest_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    ckpts = sorted((path / "checkpoints").glob("step_*")) if path.is_dir() else []
    ckpts = [c for c in ckpts if (c / "config.json").is_file()]
    if not ckpts:
        if not path.exists():
            raise GlmgymError(f"checkpoint directory {path} does not exist")
        raise GlmgymError(f"{path} is not a checkpoint directory: it has no config.json "
                          "(nor is it a run directory with checkpoints/)")
    return ckpts[-1]
