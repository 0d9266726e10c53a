"""Device facts both pillars share: which device `auto` means, the CPU's vector capability, and
whether bf16 is native there (so that bf16 pays)."""

from __future__ import annotations

import os

import torch

from glmgym.errors import GlmgymError

__all__ = ["cpu_capability", "native_bf16", "resolve_device", "set_threads"]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The one device resolver: 'auto' (or None) -> cuda (this process's local rank under torchrun)
    when available, else cpu; anything else is checked (an unknown name, or CUDA where there is
    none, raises GlmgymError)."""
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GlmgymError(f"unknown --device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GlmgymError(f"--device {name}: CUDA is not available on this machine")
    return device


def set_threads(threads: int | None) -> None:
    """Use `threads` CPU threads (None keeps PyTorch's default, one per physical core)."""
    if threads is None:
        return
    if threads < 1:
        raise GlmgymError(f"--threads must be at least 1, not {threads}")
    torch.set_num_threads(threads)


def cpu_capability() -> str:
    """The CPU's vector capability as PyTorch dispatches on it: "AVX512", "AVX2", "DEFAULT", ...

    It honors `ATEN_CPU_CAPABILITY`, so `ATEN_CPU_CAPABILITY=avx2` makes an AVX-512 machine behave
    (and be measured) as an AVX2-only one.
    """
    return torch.backends.cpu.get_cpu_capability().upper()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively (so that bf16 autocast pays).

    On CPU: AVX512-BF16 or AMX, and a capability of AVX-512 (a machine told to act as AVX2 has none).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        if not cpu_capability().startswith("AVX512"):
            return False
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:  # older torch without the probes
            return False
    return False
