"""The fused conv + max-pool + ReLU kernel (models/conv_pool.c) against PyTorch's own layers."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

from visionflow.models import conv_pool, create_model
from visionflow.models.conv_pool import (_WinogradConvPoolReLU, build_kernel, conv_pool_relu, kernel_applies, load_kernel,
                                         pool_kernel_applies, pool_relu, winograd_applies)

needs_kernel = pytest.mark.skipif(load_kernel() is None, reason="no C compiler to build the fused kernel here")


def block(in_channels: int, out_channels: int = 32, seed: int = 0) -> tuple[nn.Conv2d, nn.MaxPool2d, nn.ReLU]:
    """A conv/pool/ReLU block: block(1) is seed-cnn's first, block(32, 64) its second."""
    torch.manual_seed(seed)
    return nn.Conv2d(in_channels, out_channels, 3), nn.MaxPool2d(2), nn.ReLU()


def batch(in_channels: int, height: int, width: int, n: int = 9) -> torch.Tensor:
    return torch.randn(n, in_channels, height, width).contiguous(memory_format=torch.channels_last)


def grads(conv: nn.Conv2d, out: torch.Tensor, weight_of_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conv.zero_grad()
    (out.float() * weight_of_output).sum().backward()
    return conv.weight.grad.clone(), conv.bias.grad.clone()


def assert_same_gradients(x: torch.Tensor, conv: nn.Conv2d, pool: nn.Module, relu: nn.Module, tolerance: float):
    """The kernel's weight and bias gradients equal those through PyTorch's layers, for a random upstream."""
    upstream = torch.randn_like(relu(pool(conv(x))))
    expected = grads(conv, relu(pool(conv(x))), upstream)
    got = grads(conv, conv_pool_relu(x, conv, pool, relu), upstream)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=tolerance, atol=tolerance)


@needs_kernel
@pytest.mark.parametrize("in_channels,height,width", [(1, 28, 28), (3, 32, 32), (2, 11, 9)])
def test_values_and_gradients_match_pytorch(in_channels, height, width):
    conv, pool, relu = block(in_channels)
    x = batch(in_channels, height, width)
    assert kernel_applies(x, conv)
    expected = relu(pool(conv(x)))
    got = conv_pool_relu(x, conv, pool, relu)
    assert got.shape == expected.shape  # odd sizes: the pool drops the last row/column, as PyTorch's does
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected == 0).float().mean() > 0.02  # the ReLU cut some values, so its mask is tested too
    assert_same_gradients(x, conv, pool, relu, tolerance=1e-4)


@needs_kernel
def test_ties_send_the_gradient_to_the_first_maximum_like_pytorch():
    conv, pool, relu = block(1)
    with torch.no_grad():  # only the centre tap: two outputs tie where their centre pixels are equal
        centre = conv.weight[:, :, 1, 1].clone()
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = centre
        conv.bias.fill_(5.0)  # positive everywhere, so the ReLU keeps every value
    x = torch.randn(2, 1, 12, 12)
    x[..., 2::2] = x[..., 1:-1:2]  # each pool window's two columns tie; their other taps see different pixels
    assert_same_gradients(x, conv, pool, relu, tolerance=1e-5)


@needs_kernel
def test_bf16_autocast_gives_bf16_like_pytorch():
    conv, pool, relu = block(1)
    x = batch(1, 28, 28)
    exact = relu(pool(conv(x)))  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv_pool_relu(x, conv, pool, relu)
        library = relu(pool(conv(x)))
    assert got.dtype == library.dtype == torch.bfloat16
    # The kernel sums in fp32 and rounds once, so it is within half a bf16 step of the exact value.
    assert ((got.float() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    assert torch.allclose(got.float(), library.float(), rtol=2 ** -6, atol=1e-2)
    # The backward pass takes the bf16 gradient as it comes: the same sums as fp32 with that gradient.
    upstream = torch.randn_like(exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_grads = grads(conv, conv_pool_relu(x, conv, pool, relu), upstream)
    expected_grads = grads(conv, relu(pool(conv(x))), upstream.bfloat16().float())
    for a, b in zip(got_grads, expected_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("height,width", [(11, 11), (10, 12), (7, 9)])
def test_pool_and_relu_give_pytorchs_values_and_input_gradient_exactly(dtype, height, width):
    pool, relu = nn.MaxPool2d(2), nn.ReLU()
    torch.manual_seed(0)
    x = torch.randn(5, 64, height, width).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, :, :4, :4] = 0.5  # whole windows of equal values: the first one must take the gradient
    assert pool_kernel_applies(x)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, expected = pool_relu(ours, pool, relu), relu(pool(theirs))
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)
    upstream = torch.randn_like(expected)
    got.backward(upstream)
    expected.backward(upstream)
    assert torch.equal(ours.grad, theirs.grad)  # zero on the losers, the ReLU's cuts and an odd last row/column


def winograd_results(x: torch.Tensor, conv: nn.Conv2d, pool: nn.Module, relu: nn.Module, upstream: torch.Tensor,
                     fast: bool, bf16: bool = False, winograd_fp32: bool = False) -> list[torch.Tensor]:
    """The block's output and its x, weight and bias gradients, through conv_pool_relu (fast), the Winograd function
    itself in fp32 (which conv_pool_relu does not choose: it is slower there), or PyTorch's layers."""
    x = x.detach().clone().requires_grad_()
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if winograd_fp32:
            out = _WinogradConvPoolReLU.apply(x, conv.weight, conv.bias)
        else:
            out = conv_pool_relu(x, conv, pool, relu) if fast else relu(pool(conv(x)))
    (out.to(upstream.dtype) * upstream).sum().backward()
    return [t.detach().double() for t in (out, x.grad, conv.weight.grad, conv.bias.grad)]


@needs_kernel
@pytest.mark.parametrize("n,height,width", [(9, 12, 12), (3, 14, 10), (2, 4, 4)])
def test_winograd_block_matches_pytorch_in_fp32(n, height, width):
    conv, pool, relu = block(32, 64)
    x = torch.randn(n, 32, height, width).relu().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert winograd_applies(x.requires_grad_(), conv, pool) and not kernel_applies(x, conv)
    upstream = torch.randn(n, 64, (height - 2) // 2, (width - 2) // 2)
    got = winograd_results(x, conv, pool, relu, upstream, fast=True, winograd_fp32=True)
    expected = winograd_results(x.double(), conv.double(), pool, relu, upstream.double(), fast=False)
    assert (expected[0] == 0).float().mean() > 0.02  # the ReLU cut some values, so its mask is tested too
    for a, b in zip(got, expected):  # output, input, weight and bias gradients
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


@needs_kernel
def test_winograd_block_in_bf16_is_about_as_close_as_pytorchs_bf16_convolution():
    conv, pool, relu = block(32, 64)
    x = torch.randn(16, 32, 12, 12).relu().contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(16, 64, 5, 5)
    exact = winograd_results(x.double(), conv.double(), pool, relu, upstream.double(), fast=False)
    conv.float()
    ours = winograd_results(x.bfloat16(), conv, pool, relu, upstream, fast=True, bf16=True)
    library = winograd_results(x.bfloat16(), conv, pool, relu, upstream, fast=False, bf16=True)

    def error(got: list[torch.Tensor]) -> list[float]:
        return [float((a - b).norm() / b.norm()) for a, b in zip(got, exact)]

    # Winograd rounds its transformed tiles and products to bf16, PyTorch only the inputs and the output: a
    # little more error on the output (measured 1.5-1.6x, seeds 0-4), never a different order of magnitude.
    assert error(ours)[0] < 0.01 and error(ours)[0] < 2.5 * error(library)[0]
    # The gradients, by the worst of x, weight and bias: bf16 flips a few pool winners and ReLU cuts either way,
    # and the bias gradient moves most with them (0.90-1.23x PyTorch's worst error, seeds 0-4).
    assert max(error(ours)[1:]) < 1.5 * max(error(library)[1:])


def test_winograd_applies_only_where_its_tiles_are_whole_pooling_windows():
    conv, pool, _ = block(32, 64)
    x = torch.randn(2, 32, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert winograd_applies(x, conv, pool) == (load_kernel() is not None)  # the weight needs a gradient: training
        with torch.no_grad():
            assert not winograd_applies(x, conv, pool)  # inference: PyTorch's convolution is as fast
        assert not winograd_applies(torch.randn(2, 32, 13, 12), conv, pool)  # an 11-wide output: the pool drops a column
        assert not winograd_applies(x, conv, nn.MaxPool2d(3))
        assert not winograd_applies(torch.randn(2, 24, 12, 12), nn.Conv2d(24, 64, 3), pool)  # channels in blocks of 16
        assert not winograd_applies(x, nn.Conv2d(32, 64, 3, padding=1), pool)
    assert not winograd_applies(x, conv, pool)  # fp32 training: PyTorch's convolution is faster
    conv, pool, relu = block(32, 64)  # and where it does not apply, the block is still computed, by PyTorch
    x = torch.randn(2, 32, 13, 11)
    assert torch.allclose(conv_pool_relu(x, conv, pool, relu), relu(pool(conv(x))), rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_seed_cnn_trains_on_the_same_gradients_with_and_without_the_kernels(channels, size):
    torch.manual_seed(0)
    model = create_model("seed-cnn", num_classes=10, in_channels=channels, image_size=size)
    x = batch(channels, size, size, n=64)
    upstream = torch.randn(64, 10)

    def gradients(fast: bool, bf16: bool, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        model.to(dtype).fast_path = fast
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x.to(dtype))
        (logits.to(dtype) * upstream.to(dtype)).sum().backward()
        return [p.grad.to(torch.float64, copy=True) for p in model.parameters()]

    exact = gradients(fast=False, bf16=False, dtype=torch.float64)
    for a, b in zip(gradients(fast=True, bf16=False), exact):  # fp32: the crop and the C kernels
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    # bf16 training, where the second block runs as Winograd: as close to the exact gradients as PyTorch's bf16.
    # Compared by the worst parameter: bf16 rounding flips a few ReLU masks and pool winners either way, and one
    # flip moves a small layer's gradient by a few percent (measured 0.08-0.12 for both, seeds 0-3, 64 images).
    def worst_error(got: list[torch.Tensor]) -> float:
        return max(float((a - e).norm() / e.norm()) for a, e in zip(got, exact))

    assert worst_error(gradients(fast=True, bf16=True)) < 1.5 * worst_error(gradients(fast=False, bf16=True))


@needs_kernel
def test_seed_cnn_gives_the_same_logits_with_and_without_the_kernel():
    model = create_model("seed-cnn", num_classes=10, in_channels=1, image_size=28).eval()
    x = batch(1, 28, 28, n=5)
    with torch.inference_mode():
        fused = model(x)
        model.fast_path = False
        plain = model(x)
    assert torch.allclose(fused, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 29)])
def test_seed_cnn_crops_only_pixels_that_never_reach_the_output(channels, size):
    # In float64 neither kernel applies: this is PyTorch's layers on the cropped image against the whole one.
    torch.manual_seed(0)
    model = create_model("seed-cnn", num_classes=10, in_channels=channels, image_size=size).double()
    x = torch.randn(6, channels, size, size, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 10, dtype=torch.float64)
    results = []
    for whole_image in (True, False):
        model.fast_path = not whole_image
        model.zero_grad()
        x.grad = None
        logits = model(x)
        (logits * upstream).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()], x.grad.clone()))
    (whole, whole_grads, whole_x_grad), (cropped, cropped_grads, cropped_x_grad) = results
    used = model.used_size
    assert used < size
    # the premise: on the whole image, no output depends on a pixel past `used` (its gradient is exactly zero)
    assert whole_x_grad[..., used:, :].abs().max() == 0 and whole_x_grad[..., :, used:].abs().max() == 0
    assert whole_x_grad[..., used - 1, :].abs().max() > 0  # and `used` is not smaller than it must be
    assert torch.allclose(cropped, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(cropped_grads, whole_grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert torch.allclose(cropped_x_grad, whole_x_grad, rtol=1e-12, atol=1e-12)


def test_inputs_that_need_a_gradient_go_through_pytorch():
    conv, pool, relu = block(1)
    x = batch(1, 12, 12).requires_grad_()
    assert not kernel_applies(x, conv)
    conv_pool_relu(x, conv, pool, relu).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not kernel_applies(batch(1, 12, 12).double(), conv.double())
    assert not kernel_applies(batch(1, 12, 12), nn.Conv2d(1, 32, 3, padding=1))
    assert not kernel_applies(batch(1, 12, 12), nn.Conv2d(1, 24, 3))  # outputs in blocks of 16 only
    assert not kernel_applies(batch(8, 12, 12), nn.Conv2d(8, 32, 3))  # a first layer: up to 4 channels


def test_the_kernel_is_built_once_and_reused(tmp_path):
    compiler = os.environ.get("CC") or "cc"
    if load_kernel() is None:
        pytest.skip("no C compiler here")
    first = build_kernel(conv_pool.SOURCE, tmp_path, compiler)
    stamp = first.stat().st_mtime_ns
    assert build_kernel(conv_pool.SOURCE, tmp_path, compiler) == first
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left behind


def test_without_a_working_compiler_the_model_falls_back(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: broken on purpose' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    load_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="visionflow"):
            assert load_kernel() is None
        assert "did not compile (cc: fatal error: broken on purpose)" in caplog.text
        conv, pool, relu = block(1)
        x = batch(1, 12, 12)
        assert not kernel_applies(x, conv)
        assert torch.equal(conv_pool_relu(x, conv, pool, relu), relu(pool(conv(x))))
        monkeypatch.setenv("CC", "cc")
        blocked = tmp_path / "not-a-folder"
        blocked.write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # the cache cannot be created: same fallback
        load_kernel.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="visionflow"):
            assert load_kernel() is None
        assert "fused conv+pool kernel unavailable" in caplog.text
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        monkeypatch.setenv("VISIONFLOW_NATIVE_KERNELS", "0")
        load_kernel.cache_clear()
        assert load_kernel() is None
    finally:
        load_kernel.cache_clear()
