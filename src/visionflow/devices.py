"""Where and how models run: device choice, autocast and memory format, each with a plain fallback; and the
global random generators of the devices a model runs on, which are a Python caller's too."""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
from typing import Callable, Literal

import torch
from torch import nn

from visionflow.config import PRECISIONS
from visionflow.errors import VisionflowError

log = logging.getLogger("visionflow")


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VisionflowError(f"--device {name}: no CUDA GPU is available here")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VisionflowError(f"--device: unknown device '{name}' (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise VisionflowError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _gpus(device: torch.device) -> list[int]:
    """The GPU that `device` is, as a list of indices ([] for the CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def callers_random_state_kept(device: torch.device):
    """Training seeds torch's global generators (the initial weights, and each epoch for dropout), loading a saved
    model draws from them (the network's random init, then replaced by the saved weights), and they are a Python
    caller's too: on leaving, the CPU's and, when `device` is a GPU, that GPU's are put back as they were, so
    that the caller's own stream goes on as if visionflow had not run. Inside, every draw is what it was. On a GPU
    it starts CUDA: enter it once the data is decoded, as the decoding forks worker processes."""
    with torch.random.fork_rng(devices=_gpus(device)):
        yield


def seed_global(seed: int, device: torch.device) -> None:
    """Seed the global generators that callers_random_state_kept puts back, and only those: torch.manual_seed also
    seeds every other GPU's, and, where CUDA has not started yet, leaves a seed for it to take when it starts."""
    torch.default_generator.manual_seed(seed)
    for index in _gpus(device):
        torch.cuda.init()  # the GPUs' generators exist once CUDA has started
        torch.cuda.default_generators[index].manual_seed(seed)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX), read from /proc/cpuinfo's flags.
    Elsewhere (no such flags, or not Linux) bf16 would be emulated and slower than fp32, so "auto" stays fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device, model: nn.Module | None = None) -> str:
    """"fp32" or "bf16" for `precision` ("auto", "fp32", "bf16") on `device`. "auto" takes bf16 for models
    without recurrent layers where the hardware computes it natively: CUDA GPUs with bf16 tensor cores (Ampere
    and later; older ones, T4 or V100, only emulate it, slower than fp32) and CPUs with AVX512-BF16 or AMX, where
    oneDNN's bf16 convolutions and matrix products are faster. Recurrent models stay fp32 everywhere: torch's CPU
    RNN kernels in bf16 measured 2x slower (seed-rnn, 8,700 against 17,600 training img/s on one thread), and
    one rule on every device is simpler than a second one untested on GPUs."""
    if precision not in PRECISIONS:
        raise VisionflowError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision})")
    if precision != "auto":
        return precision
    if is_recurrent(model):
        return "fp32"
    if device.type == "cuda":
        with torch.cuda.device(device):  # the GPU asked for, not the current one
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def is_recurrent(model: nn.Module | None) -> bool:
    return model is not None and any(isinstance(m, nn.RNNBase) for m in model.modules())


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast when `precision` resolves to bf16 (matrix products and convolutions in bf16, reductions
    and the loss in fp32); plain fp32 otherwise. Measured here (AVX512-BF16 CPU, seed-cnn, batch 32,
    channels-last): training steps 7.3 ms against 11.2 ms in fp32, labelling 37,100 img/s against 20,400;
    accuracy in benchmarks/README.md."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels-last (NHWC) on CUDA and the CPU: cuDNN's tensor-core convolutions want it, and so do oneDNN's on
    the CPU (seed-cnn, batch 256, fp32: 20,400 img/s against 5,200 in NCHW; training steps 1.16x faster). Other
    devices (mps, ...) keep the default layout."""
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.contiguous_format


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


class CompiledForward:
    """`model` compiled, going on with `model` itself once compiling fails. PyTorch compiles lazily: the forward
    pass at the first call, which falls back here, and the backward pass at the first `backward()`, which falls
    back in train_one_epoch (`fall_back`)."""

    def __init__(self, model: nn.Module, compiled: Callable[[torch.Tensor], torch.Tensor]):
        self.model, self.current = model, compiled

    @property
    def compiled(self) -> bool:
        return self.current is not self.model

    def fall_back(self, exc: Exception) -> None:
        log.warning("torch.compile failed (%s); training continues uncompiled", " ".join(str(exc).split())[:300])
        self.current = self.model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.current(x)
        except torch._dynamo.exc.TorchDynamoException as exc:
            if not self.compiled:
                raise
            self.fall_back(exc)
            return self.model(x)


def compiled_or_eager(model: nn.Module, device: torch.device, enabled: bool = True,
                      compiler: str | None | Literal["auto"] = "auto", backend="inductor") -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` compiled (by TorchInductor unless `backend` says otherwise) when it can be, else `model` itself;
    compiling happens lazily and falls back to `model` when it fails there (CompiledForward)."""
    if not enabled:
        return model
    reason = compile_unavailable_reason(device, cpp_compiler() if compiler == "auto" else compiler)
    if reason is not None:
        log.warning("training uncompiled: %s", reason)
        return model
    # dynamic=False: one graph for the full batch and one for the last, smaller batch, no shape guards.
    return CompiledForward(model, torch.compile(model, dynamic=False, backend=backend))
