"""Image repair (inpainting): what is trained and how one epoch of it runs.

The generator is a small U-Net that sees the damaged image (hole pixels zeroed) plus the mask as an extra
channel and predicts the whole image; only its hole pixels are used (`composite`), so known pixels come
through exactly. It learns from an L1 reconstruction loss, weighted up on the hole, plus a small
adversarial loss from a PatchGAN discriminator that judges the composited image patch by patch.

Images travel as uint8 (N, C, S, S) and are scaled to [-1, 1] for the networks (the tanh output range).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionflow.config import RunConfig
from visionflow.devices import select_device
from visionflow.errors import VisionflowError
from visionflow.gan.losses import GAN_LOSSES, discriminator_loss, generator_loss
from visionflow.gan.masks import center_masks, random_masks
from visionflow.gan.train import to_uint8, to_unit_range
from visionflow.runs import RunDir
from visionflow.train.loop import ShowProgress, resume_command, run_epochs


@dataclass
class RepairConfig(RunConfig):
    data: str
    out: str
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-4
    image_size: int | None = None      # None: measured from the data
    channels: int | None = None        # None: measured from the data
    width: int = 16                    # generator channels at full resolution (doubles twice going down)
    hole_weight: float = 6.0           # L1 on hole pixels counts this much more than on known pixels
    adversarial_weight: float = 0.01   # small: the adversarial term sharpens, L1 keeps PSNR/SSIM
    gan_loss: str = "ns"
    val_split: float = 0.1             # validation held out of the training part (the test part stays untouched)
    max_images: int | None = None      # train on a seeded subset of this many images (CPU budgets)
    seed: int = 0
    strict: bool = False
    device: str = "auto"

    def validate(self) -> "RepairConfig":
        self.check_types()
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 (got {self.batch_size})"),
            (self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (self.image_size is None or 16 <= self.image_size <= 512, f"--image-size must be between 16 and 512 (got {self.image_size})"),
            (self.channels in (None, 1, 3), f"--channels must be 1 or 3 (got {self.channels})"),
            (self.width >= 4, f"--width must be at least 4 (got {self.width})"),
            (self.gan_loss in GAN_LOSSES, f"--gan-loss must be one of {', '.join(GAN_LOSSES)} (got {self.gan_loss})"),
            (self.hole_weight > 0 and self.adversarial_weight >= 0, "--hole-weight must be positive and --adversarial-weight non-negative"),
            (0.0 < self.val_split < 1.0, f"--val-split must be above 0 and below 1 (got {self.val_split})"),
            (self.max_images is None or self.max_images >= 20, f"--max-images must be at least 20 (got {self.max_images})"),
        ]
        self.require(checks)
        return self



# --- networks --------------------------------------------------------------------------------------------

def conv_block(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: batch statistics would mix holes of different sizes across the batch
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.GroupNorm(min(8, c_out // 4), c_out), nn.LeakyReLU(0.2))


class RepairGenerator(nn.Module):
    """U-Net: three stride-2 steps down, dilated convolutions at the bottom, upsample+conv back up.

    The bottom sees the whole image at 1/8 resolution, so even a hole of half the side gets context from
    all around it; the skips carry the known pixels' detail to the hole's edges.
    """

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        w = width
        self.enc0 = conv_block(channels + 1, w)
        self.enc1 = nn.Sequential(conv_block(w, 2 * w, stride=2), conv_block(2 * w, 2 * w))
        self.enc2 = nn.Sequential(conv_block(2 * w, 4 * w, stride=2), conv_block(4 * w, 4 * w))
        self.enc3 = conv_block(4 * w, 4 * w, stride=2)
        self.middle = nn.Sequential(conv_block(4 * w, 4 * w, dilation=2), conv_block(4 * w, 4 * w, dilation=2))
        self.dec2 = conv_block(8 * w, 4 * w)
        self.dec1 = conv_block(6 * w, 2 * w)
        self.dec0 = nn.Sequential(conv_block(3 * w, w), nn.Conv2d(w, channels, 3, padding=1))

    @staticmethod
    def _up(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # upsample to the skip's exact size (odd sides like 7 round differently going down and up)
        return torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1)

    def forward(self, damaged: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """damaged in [-1, 1] with hole pixels set to 0, masks (N, 1, S, S) -> the whole image in [-1, 1]."""
        e0 = self.enc0(torch.cat([damaged, masks], dim=1))
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        bottom = self.middle(self.enc3(e2))
        d2 = self.dec2(self._up(bottom, e2))
        d1 = self.dec1(self._up(d2, e1))
        return torch.tanh(self.dec0(self._up(d1, e0)))


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): one real/fake logit per overlapping patch, not one per image.

    It sees the mask too, so it can judge whether the hole's content fits its surroundings.
    Spectral norm keeps its gradients bounded, which keeps the small adversarial term well-behaved.
    """

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        sn = nn.utils.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(channels + 1, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * width, 4 * width, 3, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(4 * width, 1, 3, padding=1)),
        )

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([images, masks], dim=1))


# --- images and masks --------------------------------------------------------------------------------------

def damage(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Zero the hole: the network must not see what was there."""
    return x * (1.0 - masks)


def composite(known: torch.Tensor, filled: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Known pixels from `known`, hole pixels from `filled` (any dtype: uint8 images stay bit-exact)."""
    return torch.where(masks.expand_as(known) > 0.5, filled, known)


@torch.no_grad()
def repair_images(generator: RepairGenerator, images: torch.Tensor, masks: torch.Tensor,
                  batch_size: int = 256) -> torch.Tensor:
    """uint8 images (N, C, S, S) and masks (N, 1, S, S) -> repaired uint8 images, known pixels untouched."""
    generator.eval()
    device = next(generator.parameters()).device
    out = []
    for first in range(0, len(images), batch_size):
        batch = images[first:first + batch_size].to(device)
        mask = masks[first:first + batch_size].to(device)
        filled = to_uint8(generator(damage(to_unit_range(batch), mask), mask))
        out.append(composite(batch, filled, mask).cpu())
    return torch.cat(out)


# --- image quality ------------------------------------------------------------------------------------------

def psnr_ssim(originals: torch.Tensor, repaired: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of uint8 batches, on the full images, with skimage.metrics."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr, ssim = [], []
    for true, test in zip(originals.permute(0, 2, 3, 1).numpy(), repaired.permute(0, 2, 3, 1).numpy()):
        if true.shape[2] == 1:
            true, test = true[:, :, 0], test[:, :, 0]
        with np.errstate(divide="ignore"):  # identical images: PSNR is +inf, as it should be
            psnr.append(peak_signal_noise_ratio(true, test, data_range=255))
        ssim.append(structural_similarity(true, test, data_range=255, channel_axis=2 if true.ndim == 3 else None))
    return np.asarray(psnr), np.asarray(ssim)


def biharmonic_repair(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The classical baseline: scikit-image's biharmonic inpainting, image by image, known pixels kept."""
    from skimage.restoration import inpaint_biharmonic

    out = []
    for image, mask in zip(images, masks):
        array = image.permute(1, 2, 0).numpy().astype(np.float64) / 255.0
        hole = mask[0].numpy() > 0.5
        filled = inpaint_biharmonic(array, hole, channel_axis=-1)
        out.append(torch.from_numpy(np.clip(np.round(filled * 255.0), 0, 255).astype(np.uint8)).permute(2, 0, 1))
    return composite(images, torch.stack(out), masks)


# --- training ----------------------------------------------------------------------------------------------

def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay to zero over the whole run; recomputed from the step, so resuming needs no scheduler state."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def train_repair_epoch(generator: RepairGenerator, discriminator: PatchDiscriminator, images: torch.Tensor,
                       g_optimizer: torch.optim.Optimizer, d_optimizer: torch.optim.Optimizer, cfg: RepairConfig,
                       first_step: int, total_steps: int, device: torch.device, random: torch.Generator,
                       show: ShowProgress) -> dict:
    """One pass over uint8 `images` with fresh random masks; returns mean losses and speed."""
    generator.train()
    discriminator.train()
    size = images.shape[-1]
    order = torch.randperm(len(images), generator=random)
    totals = {"d_loss": 0.0, "g_adversarial": 0.0, "l1_hole": 0.0, "l1_known": 0.0}
    steps, start = 0, time.perf_counter()
    for first in range(0, len(order), cfg.batch_size):
        index = order[first:first + cfg.batch_size]
        if len(index) < 2:
            continue
        lr = cosine_lr(cfg.lr, first_step + steps, total_steps)
        for optimizer in (g_optimizer, d_optimizer):
            for group in optimizer.param_groups:
                group["lr"] = lr
        real = to_unit_range(images[index]).to(device)
        masks = random_masks(len(index), size, random).to(device)
        predicted = generator(damage(real, masks), masks)
        fake = composite(real, predicted, masks)

        d_loss = discriminator_loss(discriminator(real, masks), discriminator(fake.detach(), masks), cfg.gan_loss)
        d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optimizer.step()

        error = (predicted - real).abs()
        l1_hole = (error * masks).sum() / (masks.sum() * real.shape[1]).clamp(min=1.0)
        l1_known = (error * (1 - masks)).sum() / ((1 - masks).sum() * real.shape[1]).clamp(min=1.0)
        g_adversarial = generator_loss(discriminator(fake, masks), cfg.gan_loss)
        g_loss = cfg.hole_weight * l1_hole + l1_known + cfg.adversarial_weight * g_adversarial
        g_optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        g_optimizer.step()

        for name, value in (("d_loss", d_loss), ("g_adversarial", g_adversarial), ("l1_hole", l1_hole), ("l1_known", l1_known)):
            totals[name] += float(value.detach())
        steps += 1
        show(first + len(index), lambda: f"l1_hole {totals['l1_hole'] / steps:.4f}")
    seconds = time.perf_counter() - start
    means = {name: total / max(1, steps) for name, total in totals.items()}
    if not all(math.isfinite(v) for v in means.values()):
        raise VisionflowError(f"repair training diverged (losses {means}); the last finished epoch, if any, is kept - "
                              "train again with a lower --lr (a new run: --resume keeps the run's settings)")
    return {**means, "steps": steps, "images_per_second": len(order) / seconds, "seconds": seconds}


def validation_masks(count: int, size: int, seed: int) -> torch.Tensor:
    """Fixed masks for the per-epoch score: half centre blocks (the benchmark hole), half the training mix."""
    half = count // 2
    mixed = random_masks(count - half, size, torch.Generator().manual_seed(seed))
    return torch.cat([center_masks(half, size, size // 2), mixed])


def mean_psnr(originals: torch.Tensor, repaired: torch.Tensor) -> float:
    """Mean PSNR of uint8 batches (full images), in torch: cheap enough to score every epoch."""
    mse = (originals.float() - repaired.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean())


@dataclass
class RepairState:
    """What survives an interruption besides weights and optimizers: saved in checkpoint.pt."""

    epoch: int = 0                     # epochs finished
    best_val_psnr: float = -1.0
    best_epoch: int = 0


def steps_per_epoch(count: int, batch_size: int) -> int:
    return count // batch_size + (1 if count % batch_size >= 2 else 0)  # a 1-image last batch is skipped


class RepairTrainer:
    """What `run_epochs` trains for image repair: the generator and its discriminator, each with Adam, the best
    epoch by mean PSNR on the validation images under fixed masks (best.safetensors)."""

    name = "repair epoch"

    def __init__(self, generator: RepairGenerator, discriminator: PatchDiscriminator, cfg: RepairConfig,
                 train_images: torch.Tensor, val_images: torch.Tensor, run: RunDir, checkpoint: dict | None):
        self.generator, self.discriminator, self.cfg, self.train_images, self.val_images, self.run = (
            generator, discriminator, cfg, train_images, val_images, run)
        self.device = select_device(cfg.device)
        generator.to(self.device)
        discriminator.to(self.device)
        # beta1 = 0.5: the usual GAN setting (Radford et al. 2016); the default 0.9 lets the two players oscillate
        self.g_optimizer = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.per_epoch = steps_per_epoch(len(train_images), cfg.batch_size)
        self.state = RepairState()
        if checkpoint is not None:
            run.load_into(generator, "checkpoint.pt", "generator", checkpoint["generator"])
            run.load_into(discriminator, "checkpoint.pt", "discriminator", checkpoint["discriminator"])
            self.g_optimizer.load_state_dict(checkpoint["g_optimizer"])
            self.d_optimizer.load_state_dict(checkpoint["d_optimizer"])
            self.state = RepairState(**checkpoint["state"])
        self.val_masks = validation_masks(len(val_images), val_images.shape[-1], cfg.seed)
        self.items, self.start_epoch = len(train_images), self.state.epoch
        self.resume_command = resume_command("visionflow repair train", cfg.data, run)

    def stop_early(self) -> bool:
        return False

    def train_epoch(self, random: torch.Generator, show: ShowProgress) -> dict:
        cfg, epoch = self.cfg, self.state.epoch
        return train_repair_epoch(self.generator, self.discriminator, self.train_images, self.g_optimizer,
                                  self.d_optimizer, cfg, epoch * self.per_epoch, cfg.epochs * self.per_epoch, self.device,
                                  random, show)

    def end_epoch(self, epoch: int, stats: dict) -> tuple[dict, str]:
        val_psnr = mean_psnr(self.val_images, repair_images(self.generator, self.val_images, self.val_masks))
        state, cfg = self.state, self.cfg
        state.epoch = epoch
        weights = self.generator.state_dict()
        if val_psnr > state.best_val_psnr:
            state.best_val_psnr, state.best_epoch = val_psnr, epoch
            self.run.save_weights("best.safetensors", weights)
        self.run.save_weights("last.safetensors", weights)
        row = {**{k: round(stats[k], 6) for k in ("d_loss", "g_adversarial", "l1_hole", "l1_known")},
               "val_psnr": round(val_psnr, 4), "lr": cosine_lr(cfg.lr, epoch * self.per_epoch, cfg.epochs * self.per_epoch),
               "images_per_second": round(stats["images_per_second"], 1), "seconds": round(stats["seconds"], 3)}
        summary = (f"l1_hole {stats['l1_hole']:.4f}  l1_known {stats['l1_known']:.4f}  d_loss {stats['d_loss']:.3f}  "
                   f"val_psnr {val_psnr:.2f} dB  {stats['images_per_second']:,.0f} img/s")
        return row, summary

    def checkpoint(self) -> dict:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
                "g_optimizer": self.g_optimizer.state_dict(), "d_optimizer": self.d_optimizer.state_dict(),
                "state": asdict(self.state)}


def fit_repair(generator: RepairGenerator, discriminator: PatchDiscriminator, cfg: RepairConfig,
               train_images: torch.Tensor, val_images: torch.Tensor, run: RunDir, checkpoint: dict | None = None,
               show_progress: bool = True) -> dict:
    """Train both networks, writing the run directory as it goes (the same files and resume rules as `fit`)."""
    trainer = RepairTrainer(generator, discriminator, cfg, train_images, val_images, run, checkpoint)
    rows = run_epochs(trainer, run, cfg.epochs, cfg.seed, show_progress)
    state = trainer.state
    return {"epochs": state.epoch, "best_epoch": state.best_epoch, "best_val_psnr": round(state.best_val_psnr, 4),
            "rows": rows}
