"""Layers shared by the model families."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """The registry's interface (models/registry.py), shared by every family: `forward_features` (theirs) gives
    (N, num_features), `forward_head` a linear head on it, and forward is the two."""

    head: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2), with a faster way to the same values where no gradient is needed.

    On the CPU, max_pool2d also computes the argmax indices its backward needs, even under inference mode:
    for a channels-last bf16 batch of 256 x 32 x 26 x 26 it took 1.45 ms, where two element-wise maxima
    over strided views (rows, then columns) took 0.68 ms and give exactly the same tensor. Training keeps
    the library kernel: the maxima's backward is ten times slower than max-pool's. Tracing (ONNX export)
    keeps it too, so the graph holds one MaxPool node that ONNX Runtime runs well, and so does a GPU, where this
    was not measured.
    """

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.jit.is_tracing() is also true inside torch.onnx.export, and unlike torch.onnx.is_in_onnx_export()
        # it does not import torch.onnx on a process's first prediction.
        if torch.is_grad_enabled() or torch.jit.is_tracing() or x.device.type != "cpu":
            return super().forward(x)
        height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor mode: an odd last row/column is dropped
        rows = torch.maximum(x[..., 0:height:2, :width], x[..., 1:height:2, :width])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])
