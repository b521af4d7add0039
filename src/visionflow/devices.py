"""Where and how models run: device choice, autocast and memory format, each with a plain fallback."""

from __future__ import annotations

import contextlib

import torch

from visionflow.errors import VisionflowError


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VisionflowError(f"--device {name}: no CUDA GPU is available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise VisionflowError(f"--device: unknown device '{name}' (auto, cpu, cuda, cuda:N)") from None


def autocast(device: torch.device):
    """bf16 autocast on CUDA GPUs that support it; full fp32 elsewhere (CPU bf16 is slower without AMX)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels-last feeds cuDNN's tensor-core convolutions; the CPU keeps the default layout."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format
