"""Which device and precision a run uses: one place, so training, evaluation and the benchmark agree.

On CUDA: bf16 autocast only where the card has it natively (Ampere and newer); older cards (T4, V100) report bf16
"supported" through slow emulation, so they get fp16 with a GradScaler instead. On the CPU: fp32 (this project's
2-core machines have no fast bf16 units; fp32 is the fastest exact choice there).
"""
from __future__ import annotations

import os
import platform
from contextlib import nullcontext

import torch


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16() -> bool:
    """bf16 in hardware, not emulated (``including_emulation`` exists from torch 2.3)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation flag; fall back to the compute capability (Ampere = 8.0)
        return torch.cuda.get_device_capability()[0] >= 8


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``: bf16 (native), else fp16 on CUDA; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if native_bf16() else torch.float16


def precision_label(device: torch.device) -> str:
    dtype = amp_dtype(device)
    return "fp32" if dtype is None else ("bf16 autocast" if dtype == torch.bfloat16 else "fp16 autocast + GradScaler")


def autocast(device: torch.device):
    dtype = amp_dtype(device)
    return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device | str | None = None) -> str:
    """The one label of where a run or measurement ran: the GPU's name, or the CPU's model with its core count
    (CPU timings mean little without it)."""
    device = device if isinstance(device, torch.device) else pick_device(device)
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    return f"CPU {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores)"
