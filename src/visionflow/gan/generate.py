"""Reading a GAN run back: its EMA generator, and seeded uint8 images from it.

Shared by `gan sample`, `gan evaluate` and classifier training with `--gan-augment`, which all need
exactly the same thing: N images (of requested classes) in the data's own uint8 format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from visionflow.devices import select_device
from visionflow.errors import VisionflowError
from visionflow.gan.dcgan import Generator
from visionflow.gan.train import GanConfig, noise_and_labels, to_uint8
from visionflow.runs import RunDir


@dataclass
class GanRun:
    generator: Generator
    config: GanConfig
    classes: list[str]
    channels: int
    image_size: int
    device: torch.device

    def label_index(self, label: str) -> int:
        """A class name -> its index, with an error naming the classes."""
        if not self.config.conditional:
            raise VisionflowError("--label: this GAN is unconditional (train it with --conditional to choose classes)")
        if label in self.classes:
            return self.classes.index(label)
        raise VisionflowError(f"--label: unknown class '{label}' (the GAN's classes: {', '.join(self.classes)})")

    @torch.no_grad()
    def images(self, count: int, labels: torch.Tensor | None = None, seed: int = 0,
               batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(uint8 images (count, C, S, S), the labels used). Conditional models without `labels` draw
        classes uniformly; the same seed gives the same images."""
        rng = torch.Generator().manual_seed(seed)
        uniform = torch.ones(len(self.classes)) if self.config.conditional and labels is None else None
        noise, drawn = noise_and_labels(count, self.config.latent_dim, uniform, rng)
        labels = labels if labels is not None else drawn
        chunks = []
        for start in range(0, count, batch_size):
            batch_labels = None if labels is None else labels[start:start + batch_size].to(self.device)
            chunks.append(to_uint8(self.generator(noise[start:start + batch_size].to(self.device), batch_labels).cpu()))
        empty = torch.empty(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        return (torch.cat(chunks) if chunks else empty), labels


def load_gan_run(run_dir: str, device: str = "auto") -> GanRun:
    run = RunDir(run_dir)
    config = run.require("gan")
    cfg = GanConfig.from_dict(config["gan"])
    classes = list(config["classes"])
    generator = run.load_network(lambda: Generator(config["channels"], config["image_size"],
                                                   len(classes) if cfg.conditional else 0, cfg.latent_dim, cfg.width),
                                 "generator.safetensors", what="generator")
    target = select_device(device)
    return GanRun(generator.to(target).eval(), cfg, classes, config["channels"], config["image_size"], target)


def augmenting_gan(run_dir: str, classes: list[str], channels: int, image_size: int, device: str = "auto") -> GanRun:
    """The GAN `--gan-augment` names, checked before the classifier's data is decoded: it must be conditional, on the
    same classes and image format as that data."""
    try:
        gan = load_gan_run(run_dir, device)
    except VisionflowError as error:  # named as the option that gave it: a resume uses the run's, not typed again
        raise VisionflowError(f"--gan-augment {error}") from None
    if not gan.config.conditional:
        raise VisionflowError(f"--gan-augment {run_dir}: the GAN is unconditional; mixing in samples needs "
                              "a GAN trained with --conditional")
    if gan.classes != classes:
        raise VisionflowError(f"--gan-augment {run_dir}: the GAN's classes {gan.classes} differ from the data's {classes}")
    if (gan.channels, gan.image_size) != (channels, image_size):
        raise VisionflowError(f"--gan-augment {run_dir}: the GAN makes {gan.channels}x{gan.image_size}x{gan.image_size} "
                              f"images but the classifier trains on {channels}x{image_size}x{image_size}")
    return gan


def synthetic_images(gan: GanRun, real_labels: torch.Tensor, ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ratio` generated images per real training image, class by class: (uint8 images, labels)."""
    classes = gan.classes
    counts = torch.bincount(real_labels, minlength=len(classes))
    labels = torch.cat([torch.full((int(round(ratio * int(c))),), k, dtype=torch.int64) for k, c in enumerate(counts)])
    if len(labels) == 0:
        largest = int(counts.max())
        raise VisionflowError(f"--gan-ratio {ratio:g} adds no generated image: the largest class has {largest} "
                              f"training images, so the ratio must be at least {math.ceil(1000 / largest) / 1000:g}")
    images, _ = gan.images(len(labels), labels, seed=seed)
    return images, labels
