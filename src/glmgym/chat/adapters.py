"""Trained adapters on a loaded model: a P-Tuning v2 prefix (THUDM's checkpoint) and LoRA (a PEFT
adapter), merged into the weights.

Neither needs PEFT at inference: the prefix encoder is glmgym's own module, and a LoRA update
`W += (B @ A) * alpha / r` is folded into each target Linear once at load time, so generation runs
at the base model's speed. A quantized model cannot take a merge (its weights are codes): load the
float base with `quantize=` instead, which merges first and quantizes after.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from glmgym._io import read_json
from glmgym.chat.model import GLMModel
from glmgym.chat.model_v2 import GLM2Model
from glmgym.errors import GlmgymError

__all__ = ["LoraAdapter", "load_ptuning", "merge_lora", "read_lora_adapter", "save_lora_weights"]

_PREFIX = "transformer.prefix_encoder."


def load_ptuning(model: GLMModel | GLM2Model, checkpoint: str | Path) -> GLMModel:
    """Give `model` the prefix encoder of a P-Tuning v2 checkpoint (`pytorch_model.bin` holding
    `transformer.prefix_encoder.*`, and `config.json` with `pre_seq_len`).

    Raises:
        GlmgymError: not a P-Tuning checkpoint (e.g. a LoRA adapter), or a prefix that does not fit.
    """
    path = Path(checkpoint)
    weights_file = path / "pytorch_model.bin"
    if not weights_file.is_file():
        what = "a LoRA adapter (use --lora)" if (path / "adapter_config.json").is_file() else "missing"
        raise GlmgymError(f"{path} is not a P-Tuning v2 checkpoint: pytorch_model.bin is {what}")
    state = _read_tensors(weights_file)
    prefix = {k.removeprefix(_PREFIX): v for k, v in state.items() if k.startswith(_PREFIX)}
    if not prefix or "embedding.weight" not in prefix:
        raise GlmgymError(f"{weights_file} holds no transformer.prefix_encoder.embedding.weight")
    pre_seq_len = prefix["embedding.weight"].shape[0]
    config_file = path / "config.json"
    saved = read_json(config_file) if config_file.is_file() else {}
    if saved.get("pre_seq_len") not in (None, pre_seq_len):
        raise GlmgymError(f"{config_file} says pre_seq_len {saved['pre_seq_len']}, the weights {pre_seq_len}")
    cfg = model.config
    cfg.pre_seq_len, cfg.prefix_projection = pre_seq_len, "trans.0.weight" in prefix
    encoder = model.new_prefix_encoder()
    want = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in prefix.items()}
    if want != got:
        cfg.pre_seq_len = None
        diff = "; ".join(f"{k}: {got.get(k, 'missing')} where this model needs {want.get(k, 'nothing')}"
                         for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
        raise GlmgymError(f"the prefix of {weights_file} does not fit this model: {diff}")
    encoder.load_state_dict(prefix)
    model.transformer.prefix_encoder = encoder.eval()  # fp32, as the reference keeps it
    return model


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
"""PEFT's weight files: newer PEFT reads the first when present, PEFT 0.3-0.5 only the second."""


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter as read from disk, checked against its own config."""

    config: dict
    """adapter_config.json."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Target module name -> (lora_A [r, in], lora_B [out, r])."""
    scale: float
    """lora_alpha / r: the update is (B @ A) * scale."""
    weights_file: Path
    """The file the tensors came from."""


def save_lora_weights(out_dir: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a LoRA adapter's tensors (keys `base_model.model.<module>.lora_A.weight`) as PEFT
    does, readable by old and new PEFT alike: the same tensors in `adapter_model.safetensors` and
    `adapter_model.bin` (its `adapter_config.json` is PEFT's `LoraConfig.save_pretrained`)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
    torch.save(tensors, out / ADAPTER_WEIGHTS[1])


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .bin file through `torch.load(weights_only=True)`."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a tensor file, or a pickle that needs code
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GlmgymError(f"cannot read {path}: {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GlmgymError(f"{path} does not hold a dict of tensors")
    return state


def read_lora_adapter(adapter: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (`adapter_config.json` and `adapter_model.safetensors` or
    `adapter_model.bin`), checking rank, alpha and target modules against the tensors.

    Raises:
        GlmgymError: not a LoRA adapter, an unreadable or malformed file, an option glmgym does not
            merge (DoRA, rsLoRA, biases), or tensors that disagree with the config.
    """
    path = Path(adapter)
    config_file = path / ADAPTER_CONFIG
    weights_file = next((path / n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
    if not config_file.is_file() or weights_file is None:
        ptuning = (path / "pytorch_model.bin").is_file() and not config_file.is_file()
        what = "a P-Tuning checkpoint (use --ptuning-checkpoint)" if ptuning else "not a LoRA adapter"
        raise GlmgymError(f"{path} is {what}: {ADAPTER_CONFIG} and {' or '.join(ADAPTER_WEIGHTS)} expected")
    config = read_json(config_file)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise GlmgymError(f"{config_file}: peft_type {config['peft_type']!r} is not LORA")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise GlmgymError(f"{config_file}: {key} must be a positive number, not {value!r}")
    plain_lora = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False}
    for key, plain in plain_lora.items():
        if config.get(key, plain) != plain:
            raise GlmgymError(f"{config_file}: {key}={config[key]!r} is not supported (plain LoRA only)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise GlmgymError(f"{config_file}: rank_pattern / alpha_pattern are not supported (one r, one alpha)")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _read_tensors(weights_file).items():
        name = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                parts.setdefault(name.removesuffix(f".{part}.weight"), {})[part] = value
    if not parts:
        raise GlmgymError(f"{weights_file} holds no lora_A / lora_B weights")
    r = int(config["r"])
    targets = config.get("target_modules")
    pairs = {}
    for name, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise GlmgymError(f"{weights_file}: {name} lacks lora_A or lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise GlmgymError(f"{weights_file}: {name} has lora_A {tuple(a.shape)} and lora_B "
                              f"{tuple(b.shape)}, not [r, in] and [out, r]")
        if a.shape[0] != r:
            raise GlmgymError(f"{config_file} says r={r}, but the tensors of {name} have rank {a.shape[0]}")
        if not _targeted(name, targets):
            raise GlmgymError(f"{weights_file} has weights for {name}, which target_modules {targets!r} "
                              f"of {config_file} does not name")
        pairs[name] = (a, b)
    return LoraAdapter(config, pairs, float(config["lora_alpha"]) / r, weights_file)


def _targeted(module: str, targets) -> bool:
    """Whether PEFT's `target_modules` (a list of name suffixes, or a regular expression that must
    match the whole name) selects `module`; no targets: anything."""
    if not targets:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def merge_lora(model: GLMModel, adapter: str | Path) -> GLMModel:
    """Fold a PEFT LoRA adapter (see `read_lora_adapter`) into the weights of `model` (float
    weights only).

    Raises:
        GlmgymError: as `read_lora_adapter`, targets or shapes that do not fit the model, or a
            quantized model.
    """
    lora = read_lora_adapter(adapter)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in lora.pairs.items():
            layer = modules.get(name)
            if not isinstance(layer, torch.nn.Linear):
                kind = "not found" if layer is None else f"a {type(layer).__name__}, not a float Linear"
                raise GlmgymError(f"LoRA target {name} is {kind} in this model")
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise GlmgymError(f"LoRA weights of {name} ({tuple(b.shape)} x {tuple(a.shape)}) do not fit "
                                  f"its [{layer.out_features}, {layer.in_features}] weight")
            delta = (b.float() @ a.float()) * lora.scale  # [out, r] @ [r, in]
            layer.weight += delta.to(layer.weight.device, layer.weight.dtype)
    return model
