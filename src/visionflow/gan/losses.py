"""Adversarial losses shared by the image GAN and the repair model, on raw discriminator logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GAN_LOSSES = ("ns", "hinge")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    # non-saturating GAN (Goodfellow et al. 2014): log D(x) + log(1 - D(G(z)))
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    if kind == "hinge":
        return -fake_logits.mean()
    # non-saturating: maximise log D(G(z)) rather than minimise log(1 - D(G(z))), which vanishes early on
    return F.softplus(-fake_logits).mean()
