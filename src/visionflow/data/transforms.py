"""Preprocessing and augmentation as batched tensor ops, on the batch's device.

Two parts, kept apart on purpose:
- `Preprocess`: the deterministic part (uint8 -> float, optional centre crop, normalisation with the
  training data's mean/std). It is recorded in the run's config.json, and evaluation, prediction and
  export apply exactly it.
- `Augment`: the random part used only in training, parsed from a short SPEC such as
  `flip,rotate=15,crop=0.8,elastic=0.5`. Rotation, flips, shifts and random-resized crops are composed
  into one affine matrix per sample and the elastic field is added to the same sampling grid, so a batch
  is resampled once, whatever the SPEC.

Clips (N, T, C, H, W) are folded to (N, T*C, H, W): every frame of a clip gets the same transform.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from visionflow.data.clips import sample_frames
from visionflow.errors import VisionflowError

log = logging.getLogger("visionflow")

# What a bare operation name means: `rotate` is rotate=15.
DEFAULT_STRENGTHS = {"rotate": 15.0, "shift": 0.1, "crop": 0.8, "elastic": 0.5, "translate": 2.0}
# elastic=1 bends a digit hard, 2 makes it hard to read and 3 unreadable (preview them): past 5 it is noise, and
# a larger number is likely another library's unit (albumentations' alpha is in pixels, 34 in Simard et al.).
MAX_ELASTIC = 5.0
# The sides each flip swaps, and how it mirrors: a class named after one of them ("right", "up-left", "left_hand")
# gets images that show the other side under its label. Not "top": Fashion-MNIST's "T-shirt/top" is a garment.
MIRRORED_SIDES = {"flip": ("left to right", {"left", "right"}),
                  "vflip": ("top to bottom", {"up", "down"})}


@dataclass(frozen=True)
class AugmentSpec:
    flip: bool = False       # random horizontal flip
    vflip: bool = False      # random vertical flip
    rotate: float = 0.0      # max rotation, degrees
    shift: float = 0.0       # max translation, fraction of the side
    crop: float = 1.0        # random-resized crop: smallest area fraction kept (1 = off)
    elastic: float = 0.0     # elastic deformation strength: displacements up to about elastic x 5% of the side
    translate: float = 0.0   # max shift in whole pixels, edges reflect-padded (airbench's random translate: no blur)

    @classmethod
    def parse(cls, text: str | None) -> "AugmentSpec":
        """'flip,rotate=15,crop=0.8,elastic=0.5' -> AugmentSpec; 'none' or '' -> no augmentation."""
        if text is None or text.strip().lower() in ("", "none"):
            return cls()
        known = {f.name: f for f in fields(cls)}
        values: dict[str, object] = {}
        for item in filter(str.strip, text.split(",")):  # a stray comma ("flip,") is no operation
            key, _, value = item.strip().partition("=")
            key = key.strip().lower().replace("hflip", "flip")
            if key == "none":
                raise VisionflowError("--augment: 'none' stands alone (it means no augmentation); drop it or the others")
            if key not in known:
                raise VisionflowError(f"--augment: unknown operation '{key}' (known: {', '.join(known)}, none)")
            if key in values:
                raise VisionflowError(f"--augment: '{key}' is given twice")
            if known[key].type in (bool, "bool"):
                if value:  # flip=0 would otherwise read as flip
                    raise VisionflowError(f"--augment: '{key}' takes no value (got '{item.strip()}'); leave it out to turn it off")
                values[key] = True
                continue
            try:
                values[key] = float(value) if value else DEFAULT_STRENGTHS[key]
            except ValueError:
                raise VisionflowError(f"--augment: '{item.strip()}' needs a number, e.g. {key}=0.5") from None
            if not math.isfinite(values[key]):
                raise VisionflowError(f"--augment: '{item.strip()}' needs a finite number")
        spec = cls(**values)
        if not 0.05 <= spec.crop <= 1.0:
            raise VisionflowError(f"--augment: crop={spec.crop} must be between 0.05 and 1")
        if spec.rotate < 0 or spec.shift < 0 or spec.elastic < 0 or spec.translate < 0:
            raise VisionflowError("--augment: rotate, shift, elastic and translate take non-negative numbers")
        if spec.shift >= 1:
            raise VisionflowError(f"--augment: shift={spec.shift:g} is a fraction of the side: below 1 (0.1 = 10%)")
        if spec.translate != int(spec.translate):
            raise VisionflowError(f"--augment: translate={spec.translate:g} shifts by whole pixels; give a whole number")
        return spec

    def refuse_unusual_strengths(self) -> "AugmentSpec":
        """Refuse strengths that work but are most likely a slip, in a SPEC given now: rotate beyond 180 degrees
        (a full turn either way already), elastic beyond 5 (noise; 34 is albumentations' alpha, in pixels). A run
        recorded with them before these limits existed still resumes: parse alone accepts them."""
        if self.rotate > 180:
            raise VisionflowError(f"--augment: rotate={self.rotate:g} must be between 0 and 180 (degrees either way)")
        if self.elastic > MAX_ELASTIC:
            raise VisionflowError(f"--augment: elastic={self.elastic:g} must be between 0 and {MAX_ELASTIC:g} (each unit "
                                  "moves pixels by up to about 5% of the side)")
        return self

    def refuse_translate_beyond(self, size: int) -> "AugmentSpec":
        """Refuse, once the side is known, a translate that is not less than it: reflect padding takes at most the side
        less one, and a shift of the whole side leaves nothing of the image (a slip for shift=F, a fraction)."""
        if self.translate >= size:
            raise VisionflowError(f"--augment: translate={self.translate:g} must be less than the {size}-pixel side of "
                                  f"the images (at most {size - 1}; shift=F moves by a fraction of it)")
        return self

    def warn_of_mirrored_sides(self, classes: list[str]) -> None:
        """One warning per flip that swaps a side some class is named after: a clip moving right, flipped, moves
        left and is still labelled "right"."""
        for operation in MIRRORED_SIDES:
            if getattr(self, operation):
                warn_of_mirrored_side(f"--augment {operation}", operation, classes, "flipped images keep a label that "
                                      f"no longer fits (drop {operation}, or use translate/crop)")

    def __str__(self) -> str:
        parts = [f.name if isinstance(getattr(self, f.name), bool) else f"{f.name}={getattr(self, f.name):g}"
                 for f in fields(self) if getattr(self, f.name) != f.default]
        return ",".join(parts) or "none"

    @property
    def active(self) -> bool:
        return self != AugmentSpec()


def warn_of_mirrored_side(option: str, operation: str, classes: list[str], consequence: str) -> None:
    """A warning when `operation`, a flip of MIRRORED_SIDES that `option` asks for ("--augment flip"), swaps a side
    some class is named after, saying the `consequence` and its remedy. Sides are whole words of the name ("up-right",
    "LeftHand"), so "bright" and "upright" name none."""
    mirrors, sides = MIRRORED_SIDES[operation]
    named = next((name for name in classes if sides & set(words_of(name))), None)
    if named is not None:
        log.warning("%s mirrors images %s, but class '%s' names a side: %s", option, mirrors, named, consequence)


def words_of(name: str) -> list[str]:
    """The words of a class name, lowercased: split at anything but letters and where camel case starts one
    ('up-right' -> up, right; 'LeftHand' -> left, hand; 'RIGHT2' -> right)."""
    return [word.lower() for word in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", name)]


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """F.affine_grid(theta, (N, C, h, w), align_corners=False): for each output pixel centre (x, y) in [-1, 1],
    where to sample, theta @ (x, y, 1). Two broadcast sums here; the library's batched matrix product with an
    inner size of 3 took 140 us per batch of 32 CIFAR images, more than grid_sample itself."""
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    t = theta[:, :, :, None, None]  # N x 2 x 3 x 1 x 1
    grid = t[:, :, 0] * xs + t[:, :, 1] * ys[:, None] + t[:, :, 2]  # N x 2 x h x w
    return grid.permute(0, 2, 3, 1)


class Augment:
    """The random part of training-time preprocessing, applied to a float batch in [0, 1]."""

    def __init__(self, spec: AugmentSpec):
        self.spec = spec

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.spec.active:
            return x
        clip_shape = x.shape if x.ndim == 5 else None
        if clip_shape is not None:
            x = x.flatten(1, 2)
        n, _, h, w = x.shape
        theta = self._affine(n, generator, h / w)
        s = self.spec
        if s.rotate or s.shift or s.crop < 1.0 or s.elastic:
            grid = affine_grid(theta.to(x.device, x.dtype), h, w)
            if s.elastic > 0:
                grid = grid + self._elastic_field(n, h, w, generator).to(x.device, x.dtype)
            out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # borders black
        else:  # flips at most: theta is diag(+-1, +-1), applied exactly rather than resampled
            flip_x = (theta[:, 0, 0] < 0).to(x.device)[:, None, None, None]
            flip_y = (theta[:, 1, 1] < 0).to(x.device)[:, None, None, None]
            out = torch.where(flip_x, x.flip(-1), x)
            out = torch.where(flip_y, out.flip(-2), out)
        if s.translate > 0:
            out = self._translate(out, generator)
        return out.view(clip_shape) if clip_shape is not None else out

    def _translate(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """airbench's random translate: whole-pixel shifts of up to `translate` pixels, the uncovered edge filled by
        reflect padding (F.pad's, as test-time augmentation pads). A gather, not a resampling: pixels are copied
        unblurred, and the other operations' borders stay black."""
        n, _, h, w = x.shape
        pixels = min(int(self.spec.translate), h - 1, w - 1)  # reflect padding takes less than the side
        if pixels < 1:
            return x
        side = 2 * pixels + 1
        offset = torch.randint(0, side * side, (n,), generator=g)  # (dy, dx) in [-pixels, pixels], as one number
        padded = F.pad(x, (pixels,) * 4, mode="reflect")
        out = torch.empty_like(x)
        # One slice per offset, for the images that drew it: 3.7 ms for 1,024 CIFAR images, where a gather of
        # every pixel's source took 5-10.
        order, counts = torch.argsort(offset), torch.bincount(offset, minlength=side * side).tolist()
        start = 0
        for k, count in enumerate(counts):
            if count:
                dy, dx = k // side - pixels, k % side - pixels
                picked = order[start:start + count].to(x.device)
                out[picked] = padded[picked, :, pixels - dy:pixels - dy + h, pixels - dx:pixels - dx + w]
                start += count
        return out

    def _affine(self, n: int, g: torch.Generator, aspect: float = 1.0) -> torch.Tensor:
        """Per-sample 2x3 matrices mapping output coordinates to input coordinates (normalised [-1, 1]; `aspect` is
        height / width, so that a rotation turns pixels, not the normalised square, on a non-square image).
        One draw from the generator for all of it, and the arithmetic on 32 or so numbers in numpy: as some
        thirty torch ops it took 0.18 ms per batch, 43% of augmenting a batch of 32 CIFAR images."""
        s = self.spec
        # columns: angle, crop area, log aspect ratio, crop window x and y, shift x and y, flip x and y
        u = torch.rand(n, 9, generator=g, dtype=torch.float64).numpy()
        angle = np.radians((2 * u[:, 0] - 1) * s.rotate)
        # Random-resized crop: keep `area` of the image with aspect ratio in [3/4, 4/3] (torchvision's range).
        area = s.crop + (1 - s.crop) * u[:, 1]
        ratio = np.exp(math.log(3 / 4) + math.log(16 / 9) * u[:, 2]) if s.crop < 1.0 else np.ones(n)
        # Above 3/4 of the area, not every ratio fits inside the image: keep to the ones that do, so both
        # sides stay within it and the area kept is `area` (clamping one side instead had kept down to 0.82
        # of the image for crop=0.9).
        ratio = np.clip(ratio, area, 1 / area)
        scale_x = np.minimum(np.sqrt(area * ratio), 1.0)
        scale_y = np.minimum(np.sqrt(area / ratio), 1.0)
        # The crop window may sit anywhere inside the image; `shift` moves it further.
        tx = (2 * u[:, 3] - 1) * (1 - scale_x) + (2 * u[:, 5] - 1) * s.shift * 2
        ty = (2 * u[:, 4] - 1) * (1 - scale_y) + (2 * u[:, 6] - 1) * s.shift * 2
        flip_x = np.where(u[:, 7] < 0.5, -1.0, 1.0) if s.flip else 1.0
        flip_y = np.where(u[:, 8] < 0.5, -1.0, 1.0) if s.vflip else 1.0
        # theta = [R(angle) @ diag(scale_x * flip_x, scale_y * flip_y) | t]
        cos, sin = np.cos(angle), np.sin(angle)
        sx, sy = scale_x * flip_x, scale_y * flip_y
        theta = np.stack([cos * sx, -sin * sy * aspect, tx, sin * sx / aspect, cos * sy, ty], axis=1).reshape(n, 2, 3)
        return torch.from_numpy(theta.astype(np.float32))

    def _elastic_field(self, n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
        """A smooth random displacement field (Simard et al. 2003): coarse noise, upsampled bicubically."""
        coarse = torch.rand(n, 2, 4, 4, generator=g) * 2.0 - 1.0
        # clamped: bicubic upsampling overshoots the coarse noise by up to 40%, past the strength promised
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp_(-1.0, 1.0)
        return (field * (self.spec.elastic * 0.1)).permute(0, 2, 3, 1)


@dataclass
class Preprocess:
    """The deterministic preprocessing recorded in config.json; `__call__` maps uint8 -> normalised float."""

    image_size: int
    channels: int
    mean: list[float]
    std: list[float]
    center_crop: float = 1.0  # fraction of the side kept around the centre, then resized back
    frames: int | None = None  # clips: frames per clip the model sees, picked from the decoded ones

    def __call__(self, images: torch.Tensor, augment: "Augment | None" = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 -> float in [0, 1] -> (training only: augment) -> normalised.

        Augmenting before normalising means rotations and crops fill with black, as the preview shows.
        Clips first keep `frames` of their decoded frames: at random per segment when a generator is
        given (training), the segments' centres otherwise (see visionflow.data.clips).
        """
        if images.ndim == 5 and self.frames is not None:
            images = sample_frames(images, self.frames, generator)
        x = images.float() / 255.0
        if self.center_crop < 1.0:
            x = center_crop(x, self.center_crop)
        if augment is not None:
            x = augment(x, generator)
        mean = torch.tensor(self.mean, device=x.device)
        std = torch.tensor(self.std, device=x.device)
        shape = (-1, 1, 1) if x.ndim == 4 else (1, -1, 1, 1)  # (N,C,H,W) or (N,T,C,H,W)
        return (x - mean.view(shape)) / std.view(shape)

    def to_dict(self) -> dict:
        return asdict(self)


def center_crop(x: torch.Tensor, fraction: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    cropped = x[..., top:top + ch, left:left + cw]
    lead = cropped.shape[:-3]
    resized = F.interpolate(cropped.flatten(0, -4), size=(h, w), mode="bilinear", align_corners=False)
    return resized.view(*lead, *resized.shape[-3:])


def channel_stats(images: torch.Tensor, max_items: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of uint8 images (N, C, H, W) or clips (N, T, C, H, W)."""
    sample = images[:max_items].float() / 255.0
    dims = [d for d in range(sample.ndim) if d != sample.ndim - 3]
    mean = sample.mean(dim=dims)
    std = sample.std(dim=dims).clamp(min=1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]
