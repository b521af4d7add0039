"""The DCGAN pair (Radford et al. 2016), optionally class-conditional.

Generator: noise (plus a label embedding) -> a small base grid -> transposed 4x4 stride-2 convolutions
with batch norm and ReLU, each doubling the side -> a 3x3 convolution and tanh, so images live in [-1, 1].
Discriminator: strided 4x4 convolutions with leaky ReLU (no batch norm: it couples the real and fake
halves of a step), then one logit; conditional discriminators add a projection term
<embed(label), features> (Miyato & Koyama 2018), the label-aware part of the score. Before its last
layer it sees the minibatch standard deviation (Karras et al. 2018), so a batch of near-copies looks
unlike a batch of real images.

A network knows tensors, not files: loading, sampling and training live in the rest of `gan/`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from visionflow.errors import VisionflowError


def upsampling_plan(image_size: int) -> tuple[int, int]:
    """(base side, doublings): image_size = base * 2**doublings with base in 4..8 and at least one doubling."""
    base, doublings = image_size, 0
    while base > 8 and base % 2 == 0:
        base, doublings = base // 2, doublings + 1
    if doublings == 0 or not 4 <= base <= 8:
        raise VisionflowError(f"--image-size {image_size}: the GAN needs 4 to 8 times a power of two (e.g. 16, 28, 32, 64)")
    return base, doublings


class Generator(nn.Module):
    def __init__(self, channels: int, image_size: int, num_classes: int = 0, latent_dim: int = 64, width: int = 32):
        super().__init__()
        base, doublings = upsampling_plan(image_size)
        self.latent_dim, self.num_classes, self.channels, self.image_size = latent_dim, num_classes, channels, image_size
        # The label enters as a learned vector beside the noise: one extra input, no architecture fork.
        self.label_embedding = nn.Embedding(num_classes, latent_dim) if num_classes else None
        top = width * 2 ** doublings
        self.project = nn.Sequential(
            nn.Linear(latent_dim * (2 if num_classes else 1), top * base * base, bias=False),
            nn.Unflatten(1, (top, base, base)), nn.BatchNorm2d(top), nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        side_channels = top
        for _ in range(doublings):
            blocks += [nn.ConvTranspose2d(side_channels, side_channels // 2, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(side_channels // 2), nn.ReLU(inplace=True)]
            side_channels //= 2
        blocks += [nn.Conv2d(side_channels, channels, 3, padding=1), nn.Tanh()]
        self.upsample = nn.Sequential(*blocks)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """noise (N, latent_dim), labels (N,) int64 for conditional models -> images (N, C, S, S) in [-1, 1]."""
        if self.label_embedding is not None:
            noise = torch.cat([noise, self.label_embedding(labels)], dim=1)
        return self.upsample(self.project(noise))


class MinibatchStdDev(nn.Module):
    """Appends one channel: the standard deviation of the features across groups of `group` images,
    averaged over channels and positions (ProGAN's layer). Real and fake halves are scored in separate
    calls, so a group never mixes them."""

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        group = self.group if n % self.group == 0 else n  # an odd last batch: one group of all of it
        spread = x.view(group, -1, c, h, w).var(0, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
        return torch.cat([x, spread.view(1, -1, 1, 1).expand(group, -1, h, w).reshape(n, 1, h, w)], dim=1)


class Discriminator(nn.Module):
    def __init__(self, channels: int, image_size: int, num_classes: int = 0, width: int = 32,
                 use_spectral_norm: bool = False, minibatch_std: bool = True):
        super().__init__()
        base, doublings = upsampling_plan(image_size)
        norm = spectral_norm if use_spectral_norm else (lambda layer: layer)
        layers: list[nn.Module] = []
        in_channels, out_channels = channels, width
        for _ in range(doublings):
            layers += [norm(nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)), nn.LeakyReLU(0.2, inplace=True)]
            in_channels, out_channels = out_channels, out_channels * 2
        if minibatch_std:
            layers.append(MinibatchStdDev())
            in_channels += 1
        # one more 3x3 layer at the base side: the last strided layer alone sees too little context
        layers += [norm(nn.Conv2d(in_channels, out_channels, 3, padding=1)), nn.LeakyReLU(0.2, inplace=True),
                   nn.Flatten()]
        self.features = nn.Sequential(*layers)
        num_features = out_channels * base * base
        self.score = norm(nn.Linear(num_features, 1))
        self.label_projection = norm(nn.Embedding(num_classes, num_features)) if num_classes else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """images (N, C, S, S) in [-1, 1] -> logits (N,): high for real."""
        features = self.features(images)
        logits = self.score(features).squeeze(1)
        if self.label_projection is not None:
            logits = logits + (self.label_projection(labels) * features).sum(dim=1)
        return logits
