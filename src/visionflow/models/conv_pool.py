"""A 3x3 convolution, a 2x2 max-pool and a ReLU in C (conv_pool.c), with PyTorch's layers as fallback.

seed-cnn's first block is bound by memory, not arithmetic: its convolution writes 26x26x32 values per MNIST
image that the max-pool reads back, and training zero-fills as many again for the pool's gradient. The C kernel
keeps each pooled pixel's four convolution outputs in registers (benchmarks/README.md has the figures).
Its second block (32 to 64 channels, 87% of the model's arithmetic) trains as Winograd F(2x2, 3x3): the C
transforms and torch.bmm, 16 multiplications per output tile and channel pair instead of 36.

The kernel is compiled on first use with the system C compiler (`cc`, or $CC) into the user's cache folder,
written atomically, and loaded with ctypes: no build step at install time, about a second to compile. It is
linked with -fopenmp, and in a process with torch its libgomp is torch's own, so it runs on torch's threads. Where
there is no compiler, compilation fails, or VISIONFLOW_NATIVE_KERNELS=0, `conv_pool_relu` runs the same layers
through PyTorch; so does everything the kernel does not cover (GPUs, tracing for ONNX export, torch.compile,
inputs that need a gradient, other dtypes and shapes, more than 4 input channels).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("visionflow")

SOURCE = Path(__file__).with_name("conv_pool.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp")


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "visionflow" / "kernels"


def build_kernel(source: Path, cache_dir: Path, compiler: str) -> Path:
    """The shared library for `source`, compiled once per source, compiler, flags and CPU, then reused.
    Raises OSError or CalledProcessError when it cannot be built."""
    try:
        with open("/proc/cpuinfo") as f:  # -march=native: a library built on another CPU must not be reused
            cpu = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        cpu = ""
    key = hashlib.sha256("\0".join([source.read_text(), compiler, *FLAGS, cpu]).encode()).hexdigest()[:16]
    library = cache_dir / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=cache_dir, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", partial], check=True, capture_output=True, text=True)
        os.replace(partial, library)  # atomic: a concurrent process sees no library or a whole one
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


@functools.lru_cache(maxsize=1)
def load_kernel() -> ctypes.CDLL | None:
    """The compiled conv_pool.c, or None (with the reason logged once) where it cannot be had."""
    if os.environ.get("VISIONFLOW_NATIVE_KERNELS", "1") == "0":
        return None
    if not sys.platform.startswith("linux"):
        log.info("fused conv+pool kernel: only built on Linux; using PyTorch's layers")
        return None
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        log.info("fused conv+pool kernel: no C compiler (cc) on PATH; using PyTorch's layers")
        return None
    try:
        library = ctypes.CDLL(str(build_kernel(SOURCE, kernel_cache_dir(), compiler)))
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        log.warning("fused conv+pool kernel did not compile (%s); using PyTorch's layers", last[0][:200])
        return None
    except OSError as exc:
        log.warning("fused conv+pool kernel unavailable (%s); using PyTorch's layers", exc)
        return None
    c_long, c_int, ptr = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
    library.conv_pool_relu_forward.argtypes = [ptr] * 4 + [c_int, ptr, c_long] + [c_int] * 5
    library.conv_pool_relu_forward.restype = None
    library.conv_pool_relu_backward.argtypes = [ptr, ptr, c_int, ptr, ptr, ptr, c_long] + [c_int] * 5
    library.conv_pool_relu_backward.restype = c_int
    library.pool_relu_forward.argtypes = [ptr, ptr, c_int, ptr, c_long] + [c_int] * 4
    library.pool_relu_forward.restype = None
    library.pool_relu_backward.argtypes = [ptr, ptr, ptr, c_int, c_long] + [c_int] * 4
    library.pool_relu_backward.restype = None
    library.winograd_input.argtypes = [ptr, c_int, ptr, c_int, c_long] + [c_int] * 4
    library.winograd_input.restype = None
    library.winograd_output_pool_relu.argtypes = [ptr, c_int, ptr, ptr, c_int, ptr, c_long] + [c_int] * 4
    library.winograd_output_pool_relu.restype = None
    library.winograd_output_grad.argtypes = [ptr, c_int, ptr, ptr, c_int, ptr, c_long] + [c_int] * 4
    library.winograd_output_grad.restype = c_int
    library.winograd_input_grad.argtypes = [ptr, c_int, ptr, c_int, c_long] + [c_int] * 4
    library.winograd_input_grad.restype = c_int
    library.winograd_weights.argtypes = [ptr, ptr, c_int, c_int, c_int]
    library.winograd_weights.restype = None
    library.winograd_weight_grad.argtypes = [ptr, c_int, ptr, c_int, c_int]
    library.winograd_weight_grad.restype = None
    return library


def call_kernel(name: str, *args):
    """conv_pool.c's function `name` on `args`, each tensor passed as its address and None as NULL. The tensors
    are this call's own arguments, so they live until the C code returns; passing `t.contiguous().data_ptr()`
    instead let Python free a temporary copy (of a channels-last weight) before the C code read it, and one
    training run in six diverged."""
    return getattr(load_kernel(), name)(*(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args))


def bf16_autocast() -> bool:
    """Whether CPU autocast to bf16 is on: the kernels then compute in bf16, as PyTorch's layers would."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class _ConvPoolReLU(torch.autograd.Function):
    """Forward: relu(max_pool2d(conv2d(x, weight, bias), 2)), in bf16 under bf16 autocast (as PyTorch's layers
    would give it) and fp32 otherwise; the sums are fp32 either way. Backward: the weight and bias gradients; x
    needs none (`kernel_applies` sends inputs that need a gradient to PyTorch)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        o = weight.shape[0]
        bf16 = bf16_autocast()
        x_last = x.permute(0, 2, 3, 1).contiguous()  # no copy for a channels-last batch (or one channel)
        taps = weight.detach().permute(1, 2, 3, 0).contiguous()
        # N x O x PH x PW, channels-last in memory like PyTorch's own result (the kernel writes NHWC)
        out = torch.empty((n, o, (h - 2) // 2, (w - 2) // 2), dtype=torch.bfloat16 if bf16 else torch.float32,
                          memory_format=torch.channels_last)
        winners = torch.empty_like(out, dtype=torch.uint8) if ctx.needs_input_grad[1] else None
        call_kernel("conv_pool_relu_forward", x_last, taps, bias.detach().contiguous(), out, int(bf16), winners,
                    n, h, w, c, o, torch.get_num_threads())
        if winners is not None:
            ctx.save_for_backward(x_last, winners)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_last, winners = ctx.saved_tensors
        n, h, w, c = x_last.shape
        o = winners.shape[1]
        grad_last = grad.contiguous(memory_format=torch.channels_last)  # fp32 or bf16, as the output was
        grad_taps = torch.empty((c, 3, 3, o), dtype=torch.float32)
        grad_bias = torch.empty(o, dtype=torch.float32)
        status = call_kernel("conv_pool_relu_backward", x_last, grad_last, int(grad.dtype == torch.bfloat16), winners,
                             grad_taps, grad_bias, n, h, w, c, o, torch.get_num_threads())
        if status != 0:
            raise MemoryError("fused conv+pool backward: out of memory for its per-thread sums")
        return None, grad_taps.permute(3, 0, 1, 2).contiguous(), grad_bias


def kernel_runs_here(x: torch.Tensor) -> bool:
    """The conditions both kernels share: a CPU tensor, outside tracing (ONNX export) and torch.compile, and a
    compiled library. Checked last in each caller, as loading the library may compile it."""
    return (x.device.type == "cpu" and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and load_kernel() is not None)


def _kernel_convolution(conv: nn.Conv2d) -> bool:
    """The convolution both C paths compute: 3x3 'valid', stride 1, with bias, fp32 weights, outputs in blocks of
    16 (one vector register of lanes)."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None
            and conv.padding_mode == "zeros" and conv.weight.dtype == torch.float32 and conv.out_channels % 16 == 0)


def kernel_applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """True where conv_pool.c computes the block (see the module docstring for what it does not cover)."""
    return (x.dtype == torch.float32 and x.dim() == 4 and not x.requires_grad
            and x.shape[1] == conv.in_channels  # the kernel reads as many channels as the weights have
            and x.shape[-2] >= 4 and x.shape[-1] >= 4
            and conv.in_channels <= 4  # a first layer on images: its filter taps are held in registers
            and _kernel_convolution(conv) and kernel_runs_here(x))


class _WinogradConvPoolReLU(torch.autograd.Function):
    """relu(max_pool2d(conv2d(x, weight, bias), 2)) for a 3x3 'valid' convolution with channels in blocks of 16:
    the convolution as Winograd F(2x2, 3x3) (conv_pool.c has the method), its 16 matrix products and their
    gradients by torch.bmm. bf16 under bf16 autocast, as PyTorch's convolution would run, and fp32 otherwise
    (`winograd_applies` uses it in bf16 only; fp32 is where the tests check it against PyTorch to 1e-5).
    Gradients for x, weight and bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        o, th, tw = weight.shape[0], (h - 2) // 2, (w - 2) // 2
        dtype = torch.bfloat16 if bf16_autocast() else torch.float32
        threads, bf16 = torch.get_num_threads(), int(dtype == torch.bfloat16)
        x_last = x.permute(0, 2, 3, 1).contiguous()  # no copy for a channels-last batch
        u = torch.empty((16, o, c), dtype=dtype)  # the products take it transposed: C x O for each component
        call_kernel("winograd_weights", weight.detach().contiguous(), u, bf16, o, c)
        v = torch.empty((16, n * th * tw, c), dtype=dtype)
        call_kernel("winograd_input", x_last, int(x.dtype == torch.bfloat16), v, bf16, n, h, w, c, threads)
        products = torch.bmm(v, u.transpose(1, 2))
        out = torch.empty((n, o, th, tw), dtype=dtype, memory_format=torch.channels_last)
        winners = torch.empty_like(out, dtype=torch.uint8) if any(ctx.needs_input_grad) else None
        call_kernel("winograd_output_pool_relu", products, bf16, bias.detach().float().contiguous(), out, bf16,
                    winners, n, th, tw, o, threads)
        if winners is not None:
            ctx.save_for_backward(v, u, winners)
            ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, u, winners = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        o, th, tw = winners.shape[1], (h - 2) // 2, (w - 2) // 2
        threads, bf16 = torch.get_num_threads(), int(v.dtype == torch.bfloat16)
        grad_products = torch.empty((16, v.shape[1], o), dtype=v.dtype)
        grad_bias = torch.empty(o, dtype=torch.float32)
        status = call_kernel("winograd_output_grad", grad.contiguous(memory_format=torch.channels_last),
                             int(grad.dtype == torch.bfloat16), winners, grad_products, bf16, grad_bias,
                             n, th, tw, o, threads)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_v = torch.bmm(grad_products, u)
            grad_x = torch.empty(ctx.input_shape, dtype=ctx.input_dtype, memory_format=torch.channels_last)
            status |= call_kernel("winograd_input_grad", grad_v, bf16, grad_x, int(ctx.input_dtype == torch.bfloat16),
                                  n, h, w, c, threads)
        if status != 0:
            raise MemoryError("Winograd conv+pool backward: out of memory for its scratch sums")
        if ctx.needs_input_grad[1]:
            grad_u = torch.bmm(v.transpose(1, 2), grad_products)  # 16 x C x O: 0.40-0.46 ms, 0.47-0.79 as O x C
            grad_weight = torch.empty((o, c, 3, 3), dtype=torch.float32)
            call_kernel("winograd_weight_grad", grad_u, bf16, grad_weight, o, c)
        return grad_x, grad_weight, grad_bias


def winograd_applies(x: torch.Tensor, conv: nn.Conv2d, pool: nn.Module) -> bool:
    """True where _WinogradConvPoolReLU computes the block: training under bf16 autocast (a gradient wanted), a
    3x3 'valid' convolution with bias and channels in blocks of 16, an even output side (so each 2x2 output tile
    is one pooling window), a 2x2 max-pool, fp32 weights, where `kernel_runs_here`.

    Only training in bf16 gains. seed-cnn's second block at batch 64, forward and backward, interleaved: 1.89-2.68
    ms against 2.54-3.34 ms for PyTorch's convolution and the C pool in three runs on this CPU (3.47 against 2.89
    in a fourth); whole training epochs a median 4% faster at batch 64 and 10% at batch 32 (-4.5% to +19% by the
    machine's phase: the transforms are memory-bound). Its forward pass alone (inference) was no faster in bf16
    (4.17 against 4.05 ms at batch 256), and in fp32 both were slower (training 6.90 against 5.99 ms): with only
    32 input channels the products are thin and the transforms' memory traffic eats the saved multiplications
    (benchmarks/README.md)."""
    return (bf16_autocast() and torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
            and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16)
            and x.shape[1] == conv.in_channels and conv.in_channels % 16 == 0
            and x.shape[-2] >= 4 and x.shape[-1] >= 4 and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0
            and _kernel_convolution(conv)
            and isinstance(pool, nn.MaxPool2d) and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
            and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
            and kernel_runs_here(x))


def conv_pool_relu(x: torch.Tensor, conv: nn.Conv2d, pool: nn.Module, relu: nn.Module) -> torch.Tensor:
    """`relu(pool(conv(x)))` for a 3x3 'valid' convolution and a 2x2 max-pool: one C pass for a first layer on
    images, Winograd with C transforms for a layer with channels in blocks of 16, and otherwise PyTorch's
    convolution followed by the C pool and ReLU where those apply."""
    if kernel_applies(x, conv):
        return _ConvPoolReLU.apply(x, conv.weight, conv.bias)
    if winograd_applies(x, conv, pool):
        return _WinogradConvPoolReLU.apply(x, conv.weight, conv.bias)
    return pool_relu(conv(x), pool, relu)


class _PoolReLU(torch.autograd.Function):
    """relu(max_pool2d(x, 2)) for a channels-last fp32 or bf16 batch, and its input gradient, in one pass each:
    PyTorch's layers take four (pool, ReLU; and backward a zero fill, the scatter, the ReLU's mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x_last = x.permute(0, 2, 3, 1).contiguous()  # no copy for a channels-last batch
        out = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
        winners = torch.empty_like(out, dtype=torch.uint8) if ctx.needs_input_grad[0] else None
        call_kernel("pool_relu_forward", x_last, out, int(x.dtype == torch.bfloat16), winners, n, h, w, c,
                    torch.get_num_threads())
        if winners is not None:
            ctx.save_for_backward(winners)
        ctx.input_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (winners,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        grad_x = torch.empty(ctx.input_shape, dtype=grad.dtype, memory_format=torch.channels_last)
        # the gradient comes in the output's dtype (autograd's rule), channels-last as the kernel reads it
        call_kernel("pool_relu_backward", grad.contiguous(memory_format=torch.channels_last), winners, grad_x,
                    int(grad.dtype == torch.bfloat16), n, h, w, c, torch.get_num_threads())
        return grad_x


def pool_kernel_applies(x: torch.Tensor) -> bool:
    """True where conv_pool.c computes relu(max_pool2d(x, 2)): a batch of fp32 or bf16 with channels in blocks
    of 16, where `kernel_runs_here`."""
    return (x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 4
            and x.shape[1] % 16 == 0 and x.shape[-2] >= 2 and x.shape[-1] >= 2 and kernel_runs_here(x))


def pool_relu(x: torch.Tensor, pool: nn.Module, relu: nn.Module) -> torch.Tensor:
    """`relu(pool(x))` for a 2x2 max-pool: one C pass each way where it applies."""
    if pool_kernel_applies(x):
        return _PoolReLU.apply(x)
    return relu(pool(x))
