"""Where and how models run: device choice, autocast and memory format, each with a plain fallback."""

from __future__ import annotations

import contextlib
import logging
import shutil
from typing import Callable, Literal

import torch
from torch import nn

from visionflow.errors import VisionflowError

log = logging.getLogger("visionflow")


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


# --- fast paths, each with a plain fallback and a reason when it is not taken -----------------------------

def fused_optimizer_available(params: list[torch.Tensor], allowed: bool = True) -> bool:
    """Adam/AdamW's fused kernel: one pass per parameter tensor instead of about ten element-wise ops, which
    at small batches is a large share of a step. It exists for floating-point tensors on the CPU and CUDA."""
    return allowed and bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def cpp_compiler() -> str | None:
    """The C++ compiler TorchInductor builds CPU kernels with, or None when there is none on PATH."""
    import torch._inductor.config as inductor_config

    return shutil.which(inductor_config.cpp.cxx[-1] or "g++")


def compile_unavailable_reason(device: torch.device, compiler: str | None) -> str | None:
    """Why torch.compile cannot run here, or None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python"
    if device.type == "cpu" and compiler is None:
        return "no C++ compiler (g++) for TorchInductor's CPU kernels"
    return None


def compiled_or_eager(model: nn.Module, device: torch.device, enabled: bool = True,
                      compiler: str | None | Literal["auto"] = "auto", backend="inductor") -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` compiled (by TorchInductor unless `backend` says otherwise) when it can be, else `model` itself.
    Compilation happens lazily on the first call; when it fails there, the run logs why and goes on eager."""
    if not enabled:
        return model
    reason = compile_unavailable_reason(device, cpp_compiler() if compiler == "auto" else compiler)
    if reason is not None:
        log.warning("training uncompiled: %s", reason)
        return model
    # dynamic=False: one graph for the full batch and one for the last, smaller batch, no shape guards.
    compiled = torch.compile(model, dynamic=False, backend=backend)
    current: list[Callable] = [compiled]

    def forward(x: torch.Tensor) -> torch.Tensor:
        try:
            return current[0](x)
        except torch._dynamo.exc.TorchDynamoException as exc:
            if current[0] is model:
                raise
            log.warning("torch.compile failed (%s); training continues uncompiled", " ".join(str(exc).split())[:300])
            current[0] = model
            return model(x)

    return forward
