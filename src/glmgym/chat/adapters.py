"""Trained adapters on a loaded model: a P-Tuning v2 prefix (THUDM's checkpoint) and LoRA (a PEFT
adapter), merged into the weights.

Neither needs PEFT at inference: the prefix encoder is glmgym's own module, and a LoRA update
`W += (B @ A) * alpha / r` is folded into each target Linear once at load time, so generation runs
at the base model's speed. A quantized model cannot take a merge (its weights are codes): load the
float base with `quantize=` instead, which merges first and quantizes after.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmgym.chat.model import GLMModel, PrefixEncoder
from glmgym.errors import GlmgymError

__all__ = ["load_ptuning", "merge_lora"]

_PREFIX = "transformer.prefix_encoder."


def load_ptuning(model: GLMModel, checkpoint: str | Path) -> GLMModel:
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
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs code, or a broken file
        raise GlmgymError(f"cannot read {weights_file}: {exc}") from None
    prefix = {k.removeprefix(_PREFIX): v for k, v in state.items() if k.startswith(_PREFIX)}
    if not prefix or "embedding.weight" not in prefix:
        raise GlmgymError(f"{weights_file} holds no transformer.prefix_encoder.embedding.weight")
    pre_seq_len = prefix["embedding.weight"].shape[0]
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if saved.get("pre_seq_len") not in (None, pre_seq_len):
        raise GlmgymError(f"{config_file} says pre_seq_len {saved['pre_seq_len']}, the weights {pre_seq_len}")
    cfg = model.config
    cfg.pre_seq_len, cfg.prefix_projection = pre_seq_len, "trans.0.weight" in prefix
    encoder = PrefixEncoder(cfg)
    try:
        encoder.load_state_dict(prefix)
    except RuntimeError as exc:
        cfg.pre_seq_len = None
        reason = str(exc).splitlines()[0]
        raise GlmgymError(f"the prefix of {path} does not fit this model: {reason}") from None
    device = model.transformer.final_layernorm.weight.device
    model.transformer.prefix_encoder = encoder.to(device).eval()  # fp32, as the reference keeps it
    return model


def merge_lora(model: GLMModel, adapter: str | Path) -> GLMModel:
    """Fold a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) into the
    weights of `model` (float weights only).

    Raises:
        GlmgymError: not a LoRA adapter, an option glmgym does not merge (DoRA, rsLoRA, biases),
            targets or shapes that do not fit the model, or a quantized model.
    """
    from safetensors.torch import load_file

    path = Path(adapter)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        what = "a P-Tuning checkpoint (use --ptuning-checkpoint)" if (path / "pytorch_model.bin").is_file() \
            else "not a LoRA adapter"
        raise GlmgymError(f"{path} is {what}: adapter_config.json and adapter_model.safetensors expected")
    config = json.loads(config_file.read_text())
    plain_lora = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False}
    for key, plain in plain_lora.items():
        if config.get(key, plain) != plain:
            raise GlmgymError(f"{config_file}: {key}={config[key]!r} is not supported (plain LoRA only)")
    scale = float(config["lora_alpha"]) / float(config["r"])
    weights = load_file(str(weights_file))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        name = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                pairs.setdefault(name.removesuffix(f".{part}.weight"), {})[part] = value
    if not pairs:
        raise GlmgymError(f"{weights_file} holds no lora_A / lora_B weights")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, ab in pairs.items():
            layer = modules.get(name)
            if not isinstance(layer, torch.nn.Linear):
                kind = "not found" if layer is None else f"a {type(layer).__name__}, not a float Linear"
                raise GlmgymError(f"LoRA target {name} is {kind} in this model")
            if set(ab) != {"lora_A", "lora_B"}:
                raise GlmgymError(f"{weights_file}: {name} lacks lora_A or lora_B")
            a, b = ab["lora_A"].float(), ab["lora_B"].float()
            fits = a.shape[1] == layer.in_features and b.shape[0] == layer.out_features
            if not fits or a.shape[0] != b.shape[1]:
                raise GlmgymError(f"LoRA weights of {name} ({tuple(b.shape)} x {tuple(a.shape)}) do not fit "
                                  f"its [{layer.out_features}, {layer.in_features}] weight")
            delta = (b @ a) * scale  # [out, r] @ [r, in]
            layer.weight += delta.to(layer.weight.device, layer.weight.dtype)
    return model
