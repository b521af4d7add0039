"""GAN training: its own step (two networks, two optimizers) in the epoch loop and run directory every
training shares (train/loop.py).

    RUN_DIR/
      config.json                "kind": "gan", GanConfig, classes, channels, image size
      generator.safetensors      the EMA generator with standing batch-norm statistics: what sampling uses
      checkpoint.pt              both networks, the EMA, both optimizers, epoch (loaded weights_only)
      metrics.csv                per epoch: losses, discriminator scores, sample diversity, speed
      samples/epoch_NNN.png      the same fixed noise through the EMA generator after every epoch

Each epoch's shuffle and noise draw from the loop's torch.Generator, seeded by (seed, epoch), so a resumed run
continues the random stream exactly where the uninterrupted one would have been. A step whose loss is NaN
or explodes stops training at once; the checkpoint on disk is then still the last finished (good) epoch.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from visionflow.data.loading import DecodedPart
from visionflow.config import RunConfig
from visionflow.devices import seed_global, select_device
from visionflow.errors import VisionflowError
from visionflow.gan.dcgan import Discriminator, Generator, upsampling_plan
from visionflow.gan.losses import GAN_LOSSES, discriminator_loss, generator_loss
from visionflow.report.plots import save_image_grid
from visionflow.runs import RunDir
from visionflow.train.loop import ShowProgress, resume_command, run_epochs

log = logging.getLogger("visionflow")

EXPLODING_LOSS = 1_000.0      # a per-step loss above this has left any regime a GAN recovers from
DIVERSITY_DROP = 0.5          # warn when sample diversity falls below this fraction of its best so far
MAX_IMAGE_SIZE = 512          # the networks double their widest layer with the side: 53 M + 30 M parameters at 512,
                              # 900 M at 2048, whose allocation failed in a traceback (or the machine ran out of memory)


@dataclass
class GanConfig(RunConfig):
    data: str
    out: str
    epochs: int = 20
    conditional: bool = False
    image_size: int | None = None     # None: measured from the data
    channels: int | None = None       # None: measured from the data
    loss: str = "ns"                  # "ns" (non-saturating) or "hinge"
    spectral_norm: bool = False       # on every discriminator layer
    minibatch_std: bool = True        # the discriminator sees each batch's spread
    mode_seeking: float = 1.0         # conditional only: weight of the mode-seeking term (MSGAN) against within-class collapse; 0 = off
    batch_size: int = 64
    lr: float = 2e-4                  # Adam, betas (0.5, 0.999), both networks (DCGAN's recipe)
    latent_dim: int = 64
    width: int = 32                   # channels of the widest-side layers; doubled at each halving
    ema_decay: float = 0.999
    seed: int = 0
    strict: bool = False
    device: str = "auto"

    def validate(self) -> "GanConfig":
        self.check_types()
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 (got {self.batch_size})"),
            (self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (self.loss in GAN_LOSSES, f"--loss must be one of {', '.join(GAN_LOSSES)} (got {self.loss})"),
            (self.channels in (None, 1, 3), f"--channels must be 1 or 3 (got {self.channels})"),
            (self.image_size is None or self.image_size <= MAX_IMAGE_SIZE,
             f"--image-size must be at most {MAX_IMAGE_SIZE} for the GAN (got {self.image_size})"),
            (self.latent_dim >= 1 and self.width >= 4, "latent_dim and width must be positive"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1) (got {self.ema_decay})"),
            (self.mode_seeking >= 0, f"--mode-seeking must be 0 (off) or a positive weight (got {self.mode_seeking})"),
        ]
        self.require(checks)
        if self.image_size is not None:
            upsampling_plan(self.image_size)
        return self



class GanDiverged(VisionflowError):
    """A NaN or exploding loss: training stops, the last good checkpoint stays on disk."""


@dataclass
class GanPair:
    generator: Generator
    discriminator: Discriminator
    ema: Generator


def build_pair(cfg: GanConfig, channels: int, image_size: int, num_classes: int) -> GanPair:
    """Both networks, seeded by cfg.seed: the untrained reference of `gan evaluate` is built the same way."""
    seed_global(cfg.seed, torch.device("cpu"))  # built on the CPU: its generator alone draws the initial weights
    classes = num_classes if cfg.conditional else 0
    generator = Generator(channels, image_size, classes, cfg.latent_dim, cfg.width)
    discriminator = Discriminator(channels, image_size, classes, cfg.width, cfg.spectral_norm, cfg.minibatch_std)
    return GanPair(generator, discriminator, copy.deepcopy(generator))


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], the generator's tanh range."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def noise_and_labels(count: int, latent_dim: int, label_weights: torch.Tensor | None,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Seeded noise and, for conditional models, labels drawn with the given class weights."""
    noise = torch.randn(count, latent_dim, generator=generator)
    if label_weights is None:
        return noise, None
    return noise, torch.multinomial(label_weights, count, replacement=True, generator=generator)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


@torch.no_grad()
def standing_statistics(generator: Generator, seed: int, batches: int = 4, batch_size: int = 256) -> None:
    """Re-estimate batch-norm statistics for these weights (BigGAN's "standing stats").

    The running statistics that training leaves belong to the online generator, not to the EMA weights,
    and eval-mode samples drawn with mismatched statistics come out washed out.
    """
    device = next(generator.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    weights = torch.ones(generator.num_classes) if generator.num_classes else None
    for module in generator.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    generator.train()
    for _ in range(batches):
        noise, labels = noise_and_labels(batch_size, generator.latent_dim, weights, rng)
        generator(noise.to(device), None if labels is None else labels.to(device))
    for module in generator.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    generator.eval()


def sample_diversity(images: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """Mean pairwise pixel distance of a batch in [-1, 1]: it falls towards 0 as samples collapse to one mode.

    With labels, pairs are taken within each class only: a conditional generator that makes one prototype
    per class looks diverse across classes while it has collapsed inside every one.
    """
    groups = [images] if labels is None else [images[labels == k] for k in labels.unique()]
    distances = []
    for group in groups:
        flat = group.flatten(1).float()
        if len(flat) > 1:
            distances.append(torch.cdist(flat, flat).sum() / (len(flat) * (len(flat) - 1)))
    return float(torch.stack(distances).mean()) if distances else 0.0


def reference_diversity(images: torch.Tensor, labels: torch.Tensor | None, count: int, seed: int) -> float:
    """sample_diversity of `count` real uint8 images drawn at random (seeded): the yardstick of the samples'. Not the
    first ones: a folder lists its images class by class, and one or two classes do not spread as the data does."""
    picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return sample_diversity(to_unit_range(images[picked]), None if labels is None else labels[picked])


def fixed_noise(cfg: GanConfig, num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The noise behind every epoch's sample grid; conditional grids put one class per column."""
    rng = torch.Generator().manual_seed(cfg.seed + 7_919)
    if not cfg.conditional:
        return torch.randn(64, cfg.latent_dim, generator=rng), None
    columns = num_classes
    rows = max(1, 80 // columns)
    return torch.randn(rows * columns, cfg.latent_dim, generator=rng), torch.arange(rows * columns) % columns


def grid_columns(cfg: GanConfig, num_classes: int) -> int:
    return num_classes if cfg.conditional else 8


class GanTrainer:
    """What `run_epochs` trains for a GAN: the generator, the discriminator and the generator's EMA, which
    after each epoch draws the sample grid and is saved as generator.safetensors. A step whose loss is NaN or
    explodes stops training at once (`GanDiverged`): the checkpoint on disk is then the last good epoch's."""

    name = "epoch"

    def __init__(self, pair: GanPair, cfg: GanConfig, part: DecodedPart, run: RunDir, checkpoint: dict | None):
        self.cfg, self.part, self.run = cfg, part, run
        self.device = device = select_device(cfg.device)
        self.generator, self.discriminator, self.ema = (m.to(device) for m in (pair.generator, pair.discriminator, pair.ema))
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.num_classes = len(part.classes)
        self.epoch, self.step = 0, 0
        self.best_diversity = None  # the highest sample diversity so far, for the collapse warning
        if checkpoint is not None:
            run.load_into(self.generator, "checkpoint.pt", "generator", checkpoint["generator"])
            run.load_into(self.discriminator, "checkpoint.pt", "discriminator", checkpoint["discriminator"])
            run.load_into(self.ema, "checkpoint.pt", "generator", checkpoint["ema"])
            self.optimizer_g.load_state_dict(checkpoint["optimizer_g"])
            self.optimizer_d.load_state_dict(checkpoint["optimizer_d"])
            self.epoch, self.step = int(checkpoint["epoch"]), int(checkpoint["step"])
            self.best_diversity = max((r["diversity"] for r in run.read_metrics() if r["epoch"] <= self.epoch),
                                      default=None)
        self.grid_noise, self.grid_labels = fixed_noise(cfg, self.num_classes)
        self.real_diversity = reference_diversity(part.images, part.labels if cfg.conditional else None,
                                                  len(self.grid_noise) * 4, cfg.seed)
        self.items, self.start_epoch = len(part), self.epoch
        self.resume_command = resume_command("visionflow gan train", cfg.data, run)

    def stop_early(self) -> bool:
        return False

    def train_epoch(self, random: torch.Generator, show: ShowProgress) -> dict:
        cfg, part, device = self.cfg, self.part, self.device
        order = torch.randperm(len(part), generator=random)
        totals = {"d_loss": 0.0, "g_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
        batches, images, start = 0, 0, time.perf_counter()
        self.generator.train()
        self.discriminator.train()
        for first in range(0, len(order) - 1, cfg.batch_size):
            index = order[first:first + cfg.batch_size]
            if len(index) < 2:
                continue  # a 1-item batch breaks batch norm and adds nothing
            real = to_unit_range(part.images[index]).to(device)
            labels = part.labels[index].to(device) if cfg.conditional else None
            noise = torch.randn(len(index), cfg.latent_dim, generator=random).to(device)
            stats = gan_step(self.generator, self.discriminator, self.optimizer_g, self.optimizer_d, real, labels, noise,
                             cfg.loss, cfg.mode_seeking)
            bad = next((k for k in ("d_loss", "g_loss") if not abs(stats[k]) < EXPLODING_LOSS), None)
            if bad is not None:
                raise GanDiverged(
                    f"training diverged in epoch {self.epoch + 1} ({bad.replace('_', ' ')} {stats[bad]:.4g}); "
                    f"kept the last good checkpoint (epoch {self.epoch}) in {self.run.path} - "
                    "train again with a lower --lr, --loss hinge or --spectral-norm (a new run: --resume "
                    "keeps the run's settings; a folder with no finished epoch gives way to a new run)")
            self.step += 1
            # EMA warm-up: early weights move fast, so the average starts short and lengthens
            update_ema(self.ema, self.generator, min(cfg.ema_decay, (1 + self.step) / (10 + self.step)))
            for key in totals:
                totals[key] += stats[key]
            batches += 1
            images += len(index)
            show(first + len(index), lambda: f"D {stats['d_loss']:.3f}  G {stats['g_loss']:.3f}")
        seconds = time.perf_counter() - start
        return {**{k: v / max(1, batches) for k, v in totals.items()},
                "images_per_second": images / seconds, "seconds": seconds}

    def end_epoch(self, epoch: int, stats: dict) -> tuple[dict, str]:
        self.epoch = epoch
        standing_statistics(self.ema, self.cfg.seed)
        with torch.no_grad():
            grid = self.ema(self.grid_noise.to(self.device),
                            None if self.grid_labels is None else self.grid_labels.to(self.device)).cpu()
        diversity = sample_diversity(grid, self.grid_labels) / max(self.real_diversity, 1e-9)
        best = diversity if self.best_diversity is None else self.best_diversity
        if diversity < DIVERSITY_DROP * best:
            log.warning("sample diversity fell from %.3f to %.3f of the real data's in epoch %d: "
                        "the generator may be collapsing onto a few modes (look at %s)",
                        best, diversity, epoch, self.run / "samples" / f"epoch_{epoch:03d}.png")
        recorded = round(diversity, 4)  # as metrics.csv keeps it, where a resumed run reads the best back
        self.best_diversity = recorded if self.best_diversity is None else max(self.best_diversity, recorded)
        save_image_grid(to_uint8(grid), self.run / "samples" / f"epoch_{epoch:03d}.png",
                        columns=grid_columns(self.cfg, self.num_classes))
        self.run.save_weights("generator.safetensors", self.ema.state_dict())
        row = {**{k: round(stats[k], 6) for k in ("d_loss", "g_loss", "d_real", "d_fake")},
               "diversity": round(diversity, 4), "images_per_second": round(stats["images_per_second"], 1),
               "seconds": round(stats["seconds"], 3)}
        summary = (f"D {row['d_loss']:.4f}  G {row['g_loss']:.4f}  D(real) {row['d_real']:.3f}  "
                   f"D(fake) {row['d_fake']:.3f}  diversity {diversity:.3f}  {row['images_per_second']:,.0f} img/s")
        return row, summary

    def checkpoint(self) -> dict:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
                "ema": self.ema.state_dict(), "optimizer_g": self.optimizer_g.state_dict(),
                "optimizer_d": self.optimizer_d.state_dict(), "epoch": self.epoch, "step": self.step}


def fit_gan(pair: GanPair, cfg: GanConfig, part: DecodedPart, run: RunDir, checkpoint: dict | None = None,
            show_progress: bool = True) -> dict:
    """Train `pair` on the decoded `part`, writing the run directory as it goes; returns a summary."""
    trainer = GanTrainer(pair, cfg, part, run, checkpoint)
    rows = run_epochs(trainer, run, cfg.epochs, cfg.seed, show_progress)
    return {"epochs": trainer.epoch, "rows": rows}


def gan_step(generator: Generator, discriminator: Discriminator, optimizer_g: torch.optim.Optimizer,
             optimizer_d: torch.optim.Optimizer, real: torch.Tensor, labels: torch.Tensor | None,
             noise: torch.Tensor, loss: str, mode_seeking: float = 0.0) -> dict:
    """One discriminator update on (real, fake), then one generator update through the updated discriminator.

    With `mode_seeking` > 0 a conditional model's fakes come in two halves with the same labels and different
    noise, and the generator is also pushed to keep those pairs apart: the mode-seeking term of Mao et al.
    (MSGAN, 2019), 1 / (mean |G(z1, y) - G(z2, y)| / mean |z1 - z2|). A conditional generator that ignores its
    noise and makes one image per class (measured here on MNIST before this term) pays for it directly.
    Unconditional models skip it: there the noise is the only input, and on the MNIST split the term traded
    realism for spread (domain FID 174.8 with it against 107.6 without).
    """
    half = len(noise) // 2
    fake_labels = labels
    if mode_seeking and labels is not None:
        fake_labels = torch.cat([labels[:half], labels[:half], labels[2 * half:]])
    fake = generator(noise, fake_labels)
    real_logits = discriminator(real, labels)
    fake_logits = discriminator(fake.detach(), fake_labels)
    d_loss = discriminator_loss(real_logits, fake_logits, loss)
    optimizer_d.zero_grad(set_to_none=True)
    d_loss.backward()
    optimizer_d.step()

    discriminator.requires_grad_(False)  # the generator step needs gradients through D, not for D
    g_loss = generator_loss(discriminator(fake, fake_labels), loss)
    total_g_loss = g_loss
    if mode_seeking and labels is not None:
        spread = (fake[:half] - fake[half:2 * half]).abs().mean() / (noise[:half] - noise[half:2 * half]).abs().mean()
        total_g_loss = g_loss + mode_seeking / (spread + 1e-5)
    optimizer_g.zero_grad(set_to_none=True)
    total_g_loss.backward()
    optimizer_g.step()
    discriminator.requires_grad_(True)
    return {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach()),
            "d_real": float(torch.sigmoid(real_logits.detach()).mean()),
            "d_fake": float(torch.sigmoid(fake_logits.detach()).mean())}
