"""Load ChatGLM-6B checkpoints (Hugging Face directories or hub ids) without trust_remote_code.

Accepted layouts: `config.json` plus sharded `pytorch_model-0000N-of-0000M.bin` with
`pytorch_model.bin.index.json`, a single `pytorch_model.bin`, or `*.safetensors` (with or without
`model.safetensors.index.json`); the tokenizer is `ice_text.model` (+ `tokenizer_config.json`).

Memory: the model is built on the meta device and every shard is opened memory-mapped
(safetensors, or `torch.load(mmap=True, weights_only=True)`), converted to the target dtype tensor
by tensor and assigned in place, so loading never holds two copies of the weights. `.bin` files
are read with `weights_only=True` only: a file that needs pickled code is refused.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from glmgym._io import atomic_dir, atomic_write_json, read_json
from glmgym.chat.config import GLM2Config, GLMConfig, load_config
from glmgym.chat.model import GLMModel, RotaryEmbedding
from glmgym.chat.model_v2 import GLM2Model
from glmgym.chat.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantSpec,
    check_quantized,
    quantize_weight,
    use_decode_kernels,
)
from glmgym.devices import cpu_capability, native_bf16
from glmgym.errors import GlmgymError

__all__ = ["DTYPES", "build_model", "default_dtype", "load_model", "quantize_checkpoint", "resolve_model_dir",
           "save_model"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")
_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".index.json")
"""Weight files a merged checkpoint does not copy from its base (it writes its own)."""
_HUB_FILES = ["*.json", "*.model", "*.safetensors", "*.bin"]
_EMBEDDINGS = "transformer.word_embeddings.weight"


def default_dtype(device: torch.device, quantized: bool = False) -> torch.dtype:
    """bf16 where the device computes it natively, else fp16 on CUDA and fp32 on CPU; and bf16 for
    a quantized model on an AVX2 CPU, where glmgym's kernels take bf16 activations and the bf16
    lm_head runs at memory speed (the emulated bf16 elsewhere costs little at one token a step)."""
    if native_bf16(device):
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    if quantized and device.type == "cpu" and cpu_capability() == "AVX2":
        return torch.bfloat16
    return torch.float32


def resolve_model_dir(path_or_id: str) -> Path:
    """A local directory, or a hub id resolved through huggingface_hub (cache first).

    Raises:
        GlmgymError: neither a directory nor a hub id that can be fetched; says how to get it.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path_or_id.count("/") != 1 or path_or_id.startswith((".", "/", "~")):
        raise GlmgymError(f"model directory {path_or_id} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path_or_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(path_or_id, allow_patterns=_HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise GlmgymError(
            f"{path_or_id} is not in the Hugging Face cache and cannot be downloaded here "
            f"({type(exc).__name__}). On a machine with network access run\n"
            f"  huggingface-cli download {path_or_id} --local-dir chatglm-6b\n"
            f"then copy the folder here and pass --model chatglm-6b"
        ) from None


def _weight_files(model_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = read_json(index)["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise GlmgymError(f"{index} is malformed: {exc}") from None
            files = sorted({model_dir / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise GlmgymError(f"{model_dir} lacks shard(s) named in {index_name}: {', '.join(missing)}")
            return files
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise GlmgymError(f"{model_dir} holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def _read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one shard, memory-mapped."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        except SafetensorError as exc:
            raise GlmgymError(f"{path} is not a readable safetensors file: {exc}") from None
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise GlmgymError(f"refusing to load {path}: it needs pickled code to load "
                          f"(only plain tensors are accepted; weights_only=True). Details: {exc}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise GlmgymError(f"{path} is not a readable PyTorch file: {exc}") from None
    yield from state.items()


def _quantized_modules(config: GLMConfig | GLM2Config, spec) -> set[str]:

    if spec is None:
        return set()
    return set(config.quantized_linears) | ({config.embeddings_name} if spec.embeddings else set())


def build_model(config: GLMConfig | GLM2Config) -> GLMModel | GLM2Model:
    """The model class of `config`'s GLM generation (v1: ChatGLM-6B; v2: ChatGLM2/3, GLM-4)."""
    return GLM2Model(config) if config.version == 2 else GLMModel(config)


def _stored_names(config: GLMConfig | GLM2Config) -> set[str]:
    """The tensor names a float checkpoint of `config` holds (v1's lm_head is tied, not stored)."""
    with torch.device("meta"):
        return {k for k in build_model(config).state_dict() if not k.startswith("lm_head.")}


def load_model(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quantize: int | None = None, group_size: int | None = None,
               kernels: bool = True) -> GLMModel | GLM2Model:
    """Build a `GLMModel` (ChatGLM-6B) or `GLM2Model` (ChatGLM2/3, GLM-4) from a checkpoint
    directory; config.json says which.

    Args:
        model_dir: checkpoint directory (float weights, or quantized ones: THUDM's or glmgym's).
        dtype: compute dtype; default: bf16 where native, else fp16 on CUDA and fp32 on CPU.
        device: torch device.
        quantize: 4 or 8 to quantize float weights while loading, tensor by tensor.
        group_size: INT4 group size for `quantize` (default 128; 0 is THUDM's one scale per row).
        kernels: run quantized layers on the fastest kernel of the device; False dequantizes per
            call, which autograd differentiates (fine-tuning on a frozen quantized base).

    Raises:
        GlmgymError: missing or malformed config/weights, or weights that do not fit the config.
    """

    model_dir = Path(model_dir)
    config = load_config(model_dir / "config.json")
    stored = QuantSpec.from_config(config)  # checkpoints record their quantization in config.json
    if stored and quantize and quantize != stored.bits:
        raise GlmgymError(f"{model_dir} holds {stored.bits}-bit weights; "
                          f"it cannot be loaded as {quantize}-bit")
    spec = stored or (QuantSpec.default(quantize, group_size) if quantize else None)
    device = torch.device(device)
    dtype = dtype or default_dtype(device, quantized=spec is not None)
    with torch.device("meta"):
        model = build_model(config)
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    quantized = _quantized_modules(config, spec)
    pending: dict[str, dict[str, torch.Tensor]] = {}  # parts of a quantized module seen so far
    seen: set[str] = set()

    def finish(module: str) -> None:
        parts = pending[module]
        if module == config.embeddings_name:
            if {"weight", "weight_scale"} - set(parts):
                return
            V, H = expected[f"{module}.weight"].shape
            check_quantized(module, parts, V, H, spec.bits, 0)
            model.transformer.word_embeddings = QuantizedEmbedding(
                {k: v.to(device) for k, v in parts.items()}, spec.bits, dtype)
            model.lm_head = QuantizedLinear.from_tensors(parts, H, None, spec.bits, 0, dtype, device, kernels)
        else:
            has_bias = f"{module}.bias" in expected  # v2: on query_key_value only
            needed = {"weight"} | ({"bias"} if has_bias else set()) | ({"weight_scale"} if stored else set())
            if stored and stored.group_size:
                needed.add("weight_zero")
            if needed - set(parts):
                return
            N, K = expected[f"{module}.weight"].shape
            bias = parts.pop("bias", None)
            if bias is not None and tuple(bias.shape) != (N,):
                raise GlmgymError(f"{module}.bias has shape {tuple(bias.shape)}, config.json implies {(N,)}")
            if not stored:  # quantize on load: one float weight at a time
                if tuple(parts["weight"].shape) != (N, K):
                    raise GlmgymError(f"{module}.weight has shape {tuple(parts['weight'].shape)}, "
                                      f"config.json implies {(N, K)}")
                parts = quantize_weight(parts["weight"], spec.bits, spec.group_size)
            check_quantized(module, parts, N, K, spec.bits, spec.group_size)
            layer = QuantizedLinear.from_tensors(parts, K, bias, spec.bits, spec.group_size, dtype, device,
                                                 kernels)
            parent_name, _, attr = module.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, layer)
        seen.update(k for k in expected if k.rpartition(".")[0] == module)
        del pending[module]

    for shard in _weight_files(model_dir):
        batch = {}
        for name, tensor in _read_shard(shard):
            if name.endswith(_IGNORED_SUFFIXES) or name.startswith("lm_head."):
                continue  # rotary tables are rebuilt; lm_head is tied to the embeddings
            module, _, leaf = name.rpartition(".")
            if module in quantized:
                pending.setdefault(module, {})[leaf] = tensor
                finish(module)
                continue
            if name not in expected:
                raise GlmgymError(f"{shard.name} holds {name}, which config.json does not describe")
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise GlmgymError(f"{shard.name}: {name} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {tuple(expected[name].shape)}")
            # one tensor at a time: the mmap-backed source is dropped once converted
            batch[name] = tensor.to(device=device, dtype=dtype)
        model.load_state_dict(batch, strict=False, assign=True)
        seen.update(batch)
        if _EMBEDDINGS in batch and not (spec and spec.embeddings):
            model.lm_head.weight = model.transformer.word_embeddings.weight
            if kernels:  # now, while few layers are in memory: the INT8 head adds 0.6 GB for a moment
                use_decode_kernels(model, quantized=spec is not None)
        if f"{config.head_name}.weight" in batch and kernels and not config.tied_head:
            use_decode_kernels(model, quantized=spec is not None)
        del batch
    for module, parts in pending.items():  # incomplete quantized layers: say what they lack
        if stored and "weight" in parts:
            N, K = expected[f"{module}.weight"].shape
            parts.pop("bias", None)
            check_quantized(module, parts, N, K, spec.bits, spec.group_size_of(module))
    missing = sorted(set(expected) - seen)
    if missing:
        raise GlmgymError(f"{model_dir} lacks weights: {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if config.version == 2:
        model.set_rotary(device)
    else:
        rot_dim = config.head_dim // 2  # each half of a head rotates by its own position
        model.rotary = RotaryEmbedding(rot_dim, config.max_sequence_length + 1).to(device)
    if spec:
        config.quantization_bit, config.quantization_group_size = spec.bits, spec.group_size
        if config.version == 1:
            config.quantization_embeddings = spec.embeddings
    _release_freed_memory()
    return model.eval()


def _release_freed_memory() -> None:
    """Give the heap that loading freed back to the OS (glibc): the tensor-by-tensor conversions
    leave holes between long-lived small tensors that would otherwise stay resident."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to do
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def save_model(model: GLMModel | GLM2Model, out_dir: str | Path, safetensors: bool = True,
               max_shard_bytes: int = 2 * 2**30, tokenizer=None, base_dir: Path | None = None) -> Path:
    """Write `model` in THUDM's layout (config.json, shards and an index), atomically; with a
    tokenizer, also its files (`tokenizer.save`).
    With `base_dir`, the folder the model came from: its files other than weights are copied
    (never imported) and its config.json keys that glmgym's config lacks (`auto_map`, ...) kept."""

    if model.config.quantization_bit:
        raise GlmgymError("a quantized model in memory holds kernel-specific tensors; write quantized "
                          "checkpoints from float ones with `glmgym chat quantize` (quantize_checkpoint)")

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if "lm_head.weight" in state:  # v1: stored untied, like THUDM's files
        state["lm_head.weight"] = state["lm_head.weight"].clone()
    with atomic_dir(out_dir) as tmp:
        config = model.config.to_dict()
        if base_dir is not None:
            for f in sorted(base_dir.iterdir()):
                if f.is_file() and not f.name.startswith(".") and f.name != "config.json" \
                        and not f.name.endswith(_WEIGHT_SUFFIXES):
                    shutil.copy2(f, tmp / f.name)
            if (base_dir / "config.json").is_file():
                config = {**read_json(base_dir / "config.json"), **config}
        config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        atomic_write_json(tmp / "config.json", config)
        writer = _ShardWriter(tmp, max_shard_bytes, safetensors)
        for name, t in state.items():
            writer.add(name, t)
        writer.close()
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out_dir)


class _ShardWriter:
    """Writes tensors into shards of at most `max_bytes` (a larger tensor gets its own), then names
    them THUDM's way (`model-00001-of-00003.safetensors`, or one `model.safetensors`) and writes
    the index. Only the current shard is held in memory."""

    def __init__(self, directory: Path, max_bytes: int, safetensors: bool = True) -> None:
        self.dir, self.max_bytes, self.safetensors = directory, max_bytes, safetensors
        self.stem, self.ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
        self.parts: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.shard and self.size + nbytes > self.max_bytes:
            self._flush()
        self.shard[name] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        part = f"part-{len(self.parts):05d}.{self.ext}"
        if self.safetensors:
            from safetensors.torch import save_file

            save_file(self.shard, str(self.dir / part), metadata={"format": "pt"})
        else:
            torch.save(self.shard, self.dir / part)
        self.parts.append(part)
        self.weight_map.update(dict.fromkeys(self.shard, part))
        self.shard, self.size = {}, 0

    def close(self) -> None:

        if self.shard:
            self._flush()
        n = len(self.parts)
        names = {p: f"{self.stem}-{i:05d}-of-{n:05d}.{self.ext}" if n > 1 else f"{self.stem}.{self.ext}"
                 for i, p in enumerate(self.parts, 1)}
        for old, new in names.items():
            (self.dir / old).rename(self.dir / new)
        if n > 1:
            atomic_write_json(self.dir / f"{self.stem}.{self.ext}.index.json",
                              {"metadata": {"total_size": self.total},
                               "weight_map": {k: names[v] for k, v in self.weight_map.items()}})


_TOKENIZER_FILES = ("ice_text.model", "tokenizer.model", "tokenizer_config.json")


def quantize_checkpoint(src: str | Path, out_dir: str | Path, bits: int, group_size: int | None = None,
                        embeddings: bool = False, max_shard_bytes: int = 2**30) -> Path:
    """Write a quantized copy of a float checkpoint (safetensors, config.json, tokenizer).

    Streams tensor by tensor: peak memory is about one float weight plus one output shard
    (`max_shard_bytes`), not the model. The quantization is recorded in config.json.

    Raises:
        GlmgymError: an unreadable or already quantized source, or impossible options.
    """

    spec = QuantSpec.default(bits, group_size, embeddings)
    model_dir = resolve_model_dir(str(src))
    config = load_config(model_dir / "config.json")
    if config.quantization_bit:
        raise GlmgymError(f"{model_dir} is already {config.quantization_bit}-bit quantized; "
                          "quantize a float (fp16/bf16/fp32) checkpoint")
    targets = _quantized_modules(config, spec)
    files = _weight_files(model_dir)
    if spec.embeddings and config.version == 2:
        raise GlmgymError("--embeddings (quantized embeddings) is a ChatGLM-6B (v1) scheme")
    expected = _stored_names(config)  # the names a checkpoint of this config must hold
    with atomic_dir(out_dir) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        seen: set[str] = set()
        for path in files:
            for name, tensor in _read_shard(path):
                if name.endswith(_IGNORED_SUFFIXES) or name.startswith("lm_head."):
                    continue  # rebuilt on load / tied to the embeddings
                module, _, leaf = name.rpartition(".")
                if leaf == "weight" and module in targets:
                    for key, value in quantize_weight(tensor, spec.bits, spec.group_size_of(module)).items():
                        writer.add(f"{module}.{key}", value)
                else:
                    writer.add(name, tensor.clone())  # detach from the source mmap
                seen.add(name)
        missing, unexpected = sorted(expected - seen), sorted(seen - expected)
        if missing or unexpected:
            parts = [f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                     for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
            raise GlmgymError(f"the weights in {model_dir} do not match its config.json: {'; '.join(parts)}")
        writer.close()
        config.quantization_bit, config.quantization_group_size = spec.bits, spec.group_size
        if config.version == 1:
            config.quantization_embeddings = spec.embeddings
        atomic_write_json(tmp / "config.json", config.to_dict())
        for name in _TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
    return Path(out_dir)


_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".index.json")
