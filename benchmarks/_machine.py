"""What a benchmark result was measured on: the CPU kind (the key of `by_cpu`) and its flags."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# the flags that decide which kernels run (vector width, bf16/int8 dot products, AMX)
_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
          "amx_tile", "amx_bf16")


def cpu_kind() -> str:
    """'avx512' or 'avx2' (or 'default') as PyTorch dispatches here; ATEN_CPU_CAPABILITY=avx2
    makes an AVX-512 machine measure as 'avx2'."""
    from glmgym.devices import cpu_capability

    cap = cpu_capability()
    return "avx512" if cap.startswith("AVX512") else cap.lower()


def machine_facts() -> dict:
    """The CPU model, the relevant flags /proc/cpuinfo lists, the simulation variables in force."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    simulated = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                            "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    return {"cpu": model, "cpu_flags": [f for f in _FLAGS if f in flags], "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "simulated_by": simulated or None, "torch": torch.__version__,
            "python": platform.python_version()}


def _proc_gb(path: str, field: str) -> float:
    """A `Field:  N kB` line of a /proc file in GiB (nan when absent)."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def status_gb(field: str, pid: int | str = "self") -> float:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, ...) in GiB (Linux; default: this process)."""
    return _proc_gb(f"/proc/{pid}/status", field)


def smaps_gb(field: str) -> float:
    """A field of this process's /proc/self/smaps_rollup (Rss, AnonHugePages, ...) in GiB (Linux)."""
    return _proc_gb("/proc/self/smaps_rollup", field)


def gpu_name() -> str | None:
    """The CUDA device torch's `auto` device would be here, or None on a machine without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM) in GiB."""
    return status_gb("VmHWM")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS, so that the next `peak_rss_gb` covers one phase (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")
