"""Each fast path gives the plain path's results, and each falls back cleanly when it cannot run."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd

from visionflow.config import TrainConfig
from visionflow.data.loading import DecodedPart
from visionflow.data.transforms import Augment, AugmentSpec, Preprocess
from visionflow.devices import compiled_or_eager, cpp_compiler, fused_optimizer_available
from visionflow.models import create_model
from visionflow.models.layers import MaxPool2x2
from visionflow.train.classifier import build_optimizer, build_schedule, train_one_epoch


def _seed_cnn(size: int = 12) -> nn.Module:
    torch.manual_seed(0)
    return create_model("seed-cnn", num_classes=10, in_channels=1, image_size=size)


def _batch(size: int = 12, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fused_optimizer_steps_like_the_plain_one(optimizer):
    x, y = _batch()
    results = []
    for fused in (True, False):
        model = _seed_cnn()
        opt = build_optimizer(TrainConfig(data="-", out="-", optimizer=optimizer, lr=3e-3, weight_decay=1e-4), model,
                              fused=fused)
        assert bool(opt.defaults.get("fused")) is fused  # the option picks the kernel
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    fused_params, plain_params = results
    assert not torch.equal(fused_params, torch.cat([p.detach().flatten() for p in _seed_cnn().parameters()]))
    assert torch.allclose(fused_params, plain_params, atol=1e-6, rtol=1e-5)


def test_fused_optimizer_is_not_offered_for_integer_tensors():
    assert fused_optimizer_available([torch.zeros(3)])
    assert not fused_optimizer_available([torch.zeros(3, dtype=torch.int64)])
    assert not fused_optimizer_available([torch.zeros(3)], allowed=False)


@pytest.mark.skipif(cpp_compiler() is None, reason="no C++ compiler for TorchInductor here")
def test_compiled_model_gives_the_eager_logits_and_gradients():
    x, y = _batch()
    eager_model, compiled_model = _seed_cnn(), _seed_cnn()
    forward = compiled_or_eager(compiled_model, torch.device("cpu"))
    assert forward is not compiled_model  # it really is compiled here
    results = []
    for model, call in ((eager_model, eager_model), (compiled_model, forward)):
        logits = call(x)
        nn.functional.cross_entropy(logits, y).backward()
        results.append((logits.detach(), model.features[0].weight.grad.clone()))
    (eager_logits, eager_grad), (compiled_logits, compiled_grad) = results
    assert torch.allclose(compiled_logits, eager_logits, atol=1e-5)
    assert torch.allclose(compiled_grad, eager_grad, atol=1e-5)


def test_without_a_cpp_compiler_training_runs_eager_and_says_so(caplog):
    model = _seed_cnn()
    with caplog.at_level(logging.WARNING, logger="visionflow"):
        forward = compiled_or_eager(model, torch.device("cpu"), compiler=None)
    assert forward is model
    assert "no C++ compiler" in caplog.text


def test_compile_switched_off_is_the_model_itself():
    model = _seed_cnn()
    assert compiled_or_eager(model, torch.device("cpu"), enabled=False) is model


def test_a_compilation_that_fails_falls_back_to_eager(caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("simulated compiler failure")

    x, _ = _batch()
    model = _seed_cnn()
    forward = compiled_or_eager(model, torch.device("cpu"), compiler="g++", backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="visionflow"):
        logits = forward(x)
    assert torch.equal(logits, model(x))
    assert "simulated compiler failure" in caplog.text
    assert torch.equal(forward(x), model(x))  # and stays eager afterwards


def test_a_backward_pass_that_fails_to_compile_is_redone_eager(caplog):
    # PyTorch compiles the backward pass at the first backward(), after the forward pass ran compiled; TorchInductor
    # then raises InductorError, a BackendCompilerFailed. This backend fails so there, and only there.
    def failing_backward(graph_module, example_inputs):
        raise torch._dynamo.exc.BackendCompilerFailed(failing_backward, RuntimeError("simulated backward failure"), None)

    backend = aot_autograd(fw_compiler=lambda graph_module, example_inputs: graph_module, bw_compiler=failing_backward)
    images = torch.randint(0, 256, (20, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    part = DecodedPart(images, torch.arange(20) % 10, [str(i) for i in range(20)], [str(c) for c in range(10)])
    cfg = TrainConfig(data="-", out="-", batch_size=8)  # batches of 8, 8 and 4
    preprocess = Preprocess(image_size=12, channels=1, mean=[127.5], std=[64.0])
    results = []
    for compiled in (False, True):
        model = _seed_cnn()
        optimizer = build_optimizer(cfg, model)
        forward = compiled_or_eager(model, torch.device("cpu"), compiler="g++", backend=backend) if compiled else model
        with caplog.at_level(logging.WARNING, logger="visionflow"):
            stats = train_one_epoch(model, part, preprocess, Augment(AugmentSpec.parse("none")), nn.CrossEntropyLoss(),
                                    optimizer, build_schedule(cfg, optimizer, 3), cfg, torch.device("cpu"),
                                    torch.Generator().manual_seed(3), lambda *_: None, forward=forward)
        results.append((stats["train_loss"], torch.cat([p.detach().flatten() for p in model.parameters()])))
    (eager_loss, eager_weights), (fallen_back_loss, fallen_back_weights) = results
    assert fallen_back_loss == pytest.approx(eager_loss, rel=1e-6)  # every batch trained, the first one once
    assert torch.allclose(fallen_back_weights, eager_weights, atol=1e-6)
    assert not forward.compiled  # and it stays eager
    assert len(caplog.messages) == 1 and "simulated backward failure" in caplog.messages[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", [26, 11])  # even, and odd (floor mode drops the last row and column)
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_inference_max_pool_gives_the_library_values(dtype, side, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, side, side, generator=g).to(dtype).contiguous(memory_format=layout)
    x[0, 0, 0, 0] = float("nan")  # max-pool propagates NaN; so must the fast path
    x[1, 1, :2, :2] = 0.5  # ties
    with torch.inference_mode():
        got = MaxPool2x2()(x)
        unbatched = MaxPool2x2()(x[2])  # (C, H, W), which nn.MaxPool2d takes too
    expected = nn.functional.max_pool2d(x, 2)
    assert torch.equal(unbatched, expected[2])
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.equal(got.nan_to_num(), expected.nan_to_num()) and bool(got[0, 0, 0, 0].isnan())


def test_max_pool_trains_and_exports_with_the_library_kernel(tmp_path):
    # With gradients on, the layer is nn.MaxPool2d: its gradient goes to one element of a tied window,
    # where the element-wise maxima of the inference path would split it.
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    MaxPool2x2()(x).sum().backward()
    assert x.grad.sum() == 4 and int((x.grad == 1).sum()) == 4
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "pool.onnx"
    with torch.no_grad():  # as an export from an inference context would run
        torch.onnx.export(nn.Sequential(MaxPool2x2()).eval(), (torch.randn(1, 1, 4, 4),), str(path), dynamo=False)
    assert [node.op_type for node in onnx.load(str(path)).graph.node] == ["MaxPool"]


def test_seed_cnn_pooling_before_relu_is_the_seed_network_bit_for_bit():
    model = _seed_cnn(28)
    model.fast_path = False  # PyTorch's layers in both orders (test_conv_pool.py checks the kernel against them)
    conv1, conv2, dense = model.features[0], model.features[3], model.features[7]
    seed_order = nn.Sequential(conv1, nn.ReLU(), nn.MaxPool2d(2), conv2, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                               dense, nn.ReLU(), model.head)  # the seed's Conv-ReLU-Pool, sharing the weights
    x, y = _batch(28, 32)
    x[:4] = 0.0  # all-zero images: every window ties
    logits, grads = [], []
    for network in (model, seed_order):
        network.zero_grad()
        logits.append(network(x))
        nn.functional.cross_entropy(logits[-1], y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(logits[0], logits[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
