"""The seed's CNN, exactly: Conv 32 3x3 ReLU, MaxPool 2, Conv 64 3x3 ReLU, MaxPool 2, Flatten,
Dense 64 ReLU, Dense classes. 'valid' convolutions and Glorot-uniform weights with zero biases, as Keras
builds it, so the two stacks start from the same kind of network. (Each max-pool runs before its ReLU:
the same values and gradients, computed on fewer elements.)"""

from __future__ import annotations

import torch
from torch import nn

from visionflow.models.conv_pool import conv_pool_relu
from visionflow.models.layers import Classifier, MaxPool2x2
from visionflow.models.registry import register_model
from visionflow.errors import VisionflowError


def glorot_init(module: nn.Module) -> None:
    """Keras's defaults: Glorot-uniform kernels, zero biases."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class SeedCNN(Classifier):
    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        side = ((image_size - 2) // 2 - 2) // 2
        if side < 1:
            raise VisionflowError(f"seed-cnn needs images of at least 10x10 pixels (got {image_size})")
        # The pixels that reach the output. Each 'valid' max-pool drops an odd last row and column, and with them
        # everything that fed only those: on 28x28 MNIST the second pool drops row 10 of conv2's 11, so conv2
        # needs 12 of the first pool's 13 rows, conv1 24 of its 26, and the image 26 of its 28 rows. Cropping to
        # that leaves every output and gradient as it was and skips 17% of conv2's work (15% of conv1's).
        self.image_size, self.used_size = image_size, 4 * side + 6
        self.features = nn.Sequential(
            # Pool before ReLU (they commute): ReLU on a quarter of the elements, a batch-32 step 8.6% faster.
            nn.Conv2d(in_channels, 32, 3), MaxPool2x2(), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3), MaxPool2x2(), nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(64 * side * side, 64), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(64, num_classes)
        self.num_features = 64
        self.fast_path = True  # False: PyTorch's layers over the whole image, exactly as Keras runs them
        glorot_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # The fast path: the image cropped to the pixels that reach the output (see __init__), then the first
        # convolution, its pool and ReLU as one pass where the C kernel applies, and the second block as Winograd
        # in bf16 training, else PyTorch's convolution and the C pool and ReLU (conv_pool.py). The layers stay in
        # `features` as they were, so weights and export are unchanged.
        if not self.fast_path:
            return self.features(x)
        if x.shape[-2:] == (self.image_size, self.image_size):  # another size fails in the dense layer, as before
            x = x[..., :self.used_size, :self.used_size]
        x = conv_pool_relu(x, self.features[0], self.features[1], self.features[2])
        x = conv_pool_relu(x, self.features[3], self.features[4], self.features[5])
        for layer in self.features[6:]:
            x = layer(x)
        return x



@register_model("seed-cnn")
def seed_cnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The seed's CNN: two 3x3 conv + max-pool blocks, a 64-unit dense layer (Keras-identical)."""
    return SeedCNN(num_classes, in_channels, image_size)
