"""The airbench94 network (Keller Jordan, 2024): the small conv net behind the CIFAR-10 speed record.

A whitened 2x2 first layer, then three blocks of (conv, max-pool, BatchNorm, GELU, conv, BatchNorm,
GELU), a global max-pool and a linear head scaled down by 1/9. Each trick is a small named piece:
- patch whitening: the first layer's filters are the eigenvectors of the training patches' covariance,
  scaled to unit variance (and their negatives, so GELU passes both signs). `init_from_data` sets them
  from training images; they are frozen, so they are ordinary saved weights and `predict` rebuilds the
  network from config.json + weights like any other;
- identity (dirac) init of every 3x3 conv: each block starts close to passing its input through;
- BatchNorm with a frozen scale of 1 and a bias that learns 64x faster than the other parameters under SGD
  (the presets' optimizer; see BIAS_LR_SCALE).
"""

from __future__ import annotations

import torch
from torch import nn

from visionflow.errors import VisionflowError
from visionflow.models.layers import Classifier, MaxPool2x2
from visionflow.models.registry import register_model

# airbench's BatchNorm biases learn 64x faster than the weights. Storing the bias as b = 8 * theta gives
# exactly that under SGD (the gradient on theta is 8x larger and each step of theta moves b 8x further),
# while the optimizer keeps one learning rate for every parameter.
BIAS_LR_SCALE = 64.0


class ScaledBiasBatchNorm(nn.BatchNorm2d):
    """BatchNorm without a learned scale, whose bias is reparametrised to learn BIAS_LR_SCALE x faster."""

    def __init__(self, channels: int, momentum: float = 0.4):
        super().__init__(channels, eps=1e-12, momentum=momentum, affine=False)
        self.scaled_bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.scaled_bias * BIAS_LR_SCALE ** 0.5
        return super().forward(x) + bias.view(1, -1, 1, 1)


class DiracConv(nn.Conv2d):
    """3x3 'same' conv without bias, initialised as (partial) identity plus the default noise."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding="same", bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:min(in_channels, out_channels)])


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = DiracConv(in_channels, out_channels)
        self.pool = MaxPool2x2()
        self.norm1 = ScaledBiasBatchNorm(out_channels)
        self.conv2 = DiracConv(out_channels, out_channels)
        self.norm2 = ScaledBiasBatchNorm(out_channels)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        return self.activation(self.norm2(self.conv2(x)))


class AirbenchNet(Classifier):
    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, int, int], whiten_kernel: int = 2):
        super().__init__()
        whiten_width = 2 * in_channels * whiten_kernel ** 2
        self.whiten = nn.Conv2d(in_channels, whiten_width, whiten_kernel, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data by init_from_data, never trained
        self.activation = nn.GELU()
        self.groups = nn.Sequential(ConvGroup(whiten_width, widths[0]), ConvGroup(widths[0], widths[1]),
                                    ConvGroup(widths[1], widths[2]))
        # For 32x32 inputs this is airbench's MaxPool2d(3) over the last 3x3 map; adaptive for other sizes.
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.num_features = widths[2]
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.logit_scale = 1 / 9  # small initial logits, as in airbench

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.activation(self.whiten(x)))
        return torch.flatten(self.pool(x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features) * self.logit_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Whiten the first layer on preprocessed training images (N, C, H, W): airbench uses 5,000."""
        self.whiten.weight.copy_(whitening_filters(images, self.whiten.kernel_size[0], eps))


def whitening_filters(images: torch.Tensor, kernel: int, eps: float = 5e-4) -> torch.Tensor:
    """Filters (2*C*k*k, C, k, k) whose outputs on the images' k x k patches have unit, uncorrelated
    second moments: eigenvectors of the patch covariance divided by sqrt(eigenvalue + eps), then negated
    copies. (Uncentred, as in airbench: the images are already normalised to mean ~0.)"""
    c = images.shape[1]
    patches = images.float().unfold(2, kernel, 1).unfold(3, kernel, 1)          # N, C, H', W', k, k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kernel * kernel)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]).reshape(-1, c, kernel, kernel)
    return torch.cat([filters, -filters])


@register_model("airbench")
def airbench(num_classes: int, in_channels: int, image_size: int, block1: int = 64, block2: int = 256,
             block3: int = 256) -> nn.Module:
    """airbench94's CIFAR net: whitened 2x2 first layer, 3 conv groups, BatchNorm, GELU (~2M params)."""
    if image_size < 16:
        raise VisionflowError(f"airbench needs images of at least 16x16 pixels (its three 2x2 poolings; got {image_size})")
    return AirbenchNet(num_classes, in_channels, (block1, block2, block3))
