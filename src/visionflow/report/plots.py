"""The pictures a run leaves behind: learning curves, confusion matrix, image grids (matplotlib figures, PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visionflow.errors import VisionflowError
from visionflow.runs import atomic_write, check_output_file


# Figures made directly, not through pyplot: files only, never a window, and the caller's matplotlib backend
# (a notebook's) is left as it was. matplotlib loads with the first figure, not with this module: the GAN's
# sample grids and every CLI verb import it, and only the figures need it (0.45 s of every command's start).
def _figure(**options):
    from matplotlib.figure import Figure

    return Figure(**options)


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_curves(rows: list[dict[str, float]], path: Path) -> None:
    epochs = [r["epoch"] for r in rows]
    fig = _figure(figsize=(9, 3.4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    style = {"marker": "o", "markersize": 3}  # one epoch is one point, which a bare line would not draw
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train", **style)
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="validation", **style)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in rows], label="train", **style)
    ax_acc.plot(epochs, [r["val_accuracy"] for r in rows], label="validation", **style)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        if len(epochs) <= 20:  # epochs are whole: a tick each
            ax.set_xticks(epochs)
        else:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    matrix = np.asarray(confusion)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig = _figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title="Confusion matrix")
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    if len(classes) <= 20:
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value > matrix.max() / 2 else "black")
    _save(fig, path)


def plot_image_grid(images: torch.Tensor, titles: list[str], path: Path, columns: int = 8) -> None:
    """uint8 images (N, C, H, W) with a caption each."""
    n = len(images)
    if n == 0:
        return
    rows = (n + columns - 1) // columns
    cols = min(columns, n)
    fig = _figure(figsize=(1.6 * cols, 1.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        array = image.permute(1, 2, 0).numpy()
        ax.imshow(array[:, :, 0] if array.shape[2] == 1 else array, cmap="gray" if array.shape[2] == 1 else None,
                  vmin=0, vmax=255)
        ax.set_title(title, fontsize=7)
    _save(fig, path)


# What a picture may be written as. Pillow registers more suffixes, some (.h5, .grib) for formats it cannot write.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF", ".gif": "GIF"}


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_FORMATS


def image_format(path: Path, option: str | None = None) -> str:
    """Pillow's format for the file name's suffix (.png, .jpg, .webp, ...): grids are written as named. `option`: the
    one that names the file, which the message names, as check_output_file's do."""
    if not is_image_name(path):
        named = f"{option} {path}" if option else path
        raise VisionflowError(f"{named}: not an image file name (end it in {', '.join(IMAGE_FORMATS)})")
    return IMAGE_FORMATS[path.suffix.lower()]


def check_picture_path(path: Path, option: str) -> None:
    """Refuse, before the work that draws it, a picture that could not be written at its end: a name that is not an
    image file's, a folder of that name, a file where one of its folders should be. Missing folders are made and an
    existing picture is replaced, as `predict --output` does with its file. `option`: the one that names it."""
    image_format(path, option)
    check_output_file(path, option)


# The longest side each format's encoder takes; beyond it Pillow fails deep inside the encoder.
MAX_SIDE = {"JPEG": 65_535, "WEBP": 16_383, "GIF": 65_535}


def check_grid_fits(path: Path, count: int, columns: int, height: int, width: int, pad: int = 2) -> None:
    """Refuse a grid of `count` tiles that the format `path` names cannot hold, before anything is drawn."""
    rows = (count + columns - 1) // columns
    side = max(rows * (height + pad) + pad, columns * (width + pad) + pad)
    limit = MAX_SIDE.get(image_format(path))
    if limit is not None and side > limit:
        raise VisionflowError(f"{path}: a grid of {count} images would be {side} pixels long, beyond the "
                              f"{limit} a {path.suffix} file can hold; write fewer images, a .png, or a folder")


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 8, pad: int = 2) -> None:
    """uint8 images (N, C, H, W) tiled into one picture with no captions (sample grids, previews), in the
    format its name asks for."""
    n, c, h, w = images.shape
    check_grid_fits(path, n, columns, h, w, pad)
    rows = (n + columns - 1) // columns
    canvas = torch.zeros(c, rows * (h + pad) + pad, columns * (w + pad) + pad, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, top:top + h, left:left + w] = image
    array = canvas.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if c == 1 else array)
    atomic_write(path, lambda tmp: picture.save(tmp, format=image_format(path)))
