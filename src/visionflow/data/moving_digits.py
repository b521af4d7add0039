"""moving-digits: real handwritten digits moving across a black canvas, bouncing off its edges.

Each clip shows one digit (from the built-in `digits` or an MNIST folder) scaled to half the canvas side,
starting at a random place and moving in one of 8 directions at a random speed. With `label="direction"`
the class is the direction the digit moves in at the middle of the clip: every single frame is a digit
somewhere on the canvas, so only a model that uses the order of the frames can tell the classes apart. With
`label="digit"` the class is the digit.

The output is itself valid DATA: OUT/<class>/clip_00000.mp4 (or .npy arrays, or folders of PNG frames).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from visionflow.config import check_seed
from visionflow.data.sources import DataSource, builtin_digits, open_data
from visionflow.errors import VisionflowError

# Angle k x 45 degrees, counter-clockwise from "right", as seen on screen (image rows grow downwards).
DIRECTIONS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")
LABELS = ("direction", "digit")
FORMATS = ("mp4", "frames", "npy")
FRAMES_PER_SECOND = 10


@dataclass
class MovingDigitsSpec:
    clips: int = 2000
    frames: int = 16
    size: int = 32
    label: str = "direction"
    format: str = "mp4"
    source: str | None = None  # an MNIST folder (or any image DATA) for the digits; None: the built-in digits
    seed: int = 0

    def validate(self) -> "MovingDigitsSpec":
        checks = [
            (self.clips >= 1, f"--clips must be at least 1 (got {self.clips})"),
            (self.frames >= 2, f"--frames must be at least 2: motion needs two frames (got {self.frames})"),
            (16 <= self.size <= 256, f"--size must be between 16 and 256 (got {self.size})"),
            (self.label in LABELS, f"--label must be one of {', '.join(LABELS)} (got {self.label})"),
            (self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)} (got {self.format})"),
            (self.format != "mp4" or self.size % 2 == 0, f"--size must be even for mp4 (H.264 stores 2x2 colour blocks; got {self.size})"),
        ]
        for ok, message in checks:
            if not ok:
                raise VisionflowError(message)
        check_seed(self.seed)
        return self


def digit_source(source: str | None) -> DataSource:
    if source is None:
        return builtin_digits()
    digits = open_data(source).train
    if digits.kind != "image":
        raise VisionflowError(f"--source {source}: holds {digits.kind}s; the digits must be images")
    return digits


def bouncing_path(middle: float, velocity: float, room: float, frames: int) -> np.ndarray:
    """Positions in [0, room] over `frames` frames of a point that is at `middle` at frame frames/2 - 1 and
    then moves by `velocity` per frame; at an edge it turns back before moving, so every step moves by
    exactly +-velocity. The frames before the middle are the same motion run backwards."""
    positions = np.empty(frames)
    m = frames // 2 - 1

    def run(position: float, step: float, times: range) -> None:
        for t in times:
            if not 0 <= position + step <= room:
                step = -step
            position += step
            positions[t] = position

    positions[m] = middle
    run(middle, velocity, range(m + 1, frames))
    run(middle, -velocity, range(m - 1, -1, -1))
    return positions


def render_clip(digit: np.ndarray, direction: int, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (frames, size, size) uint8 clip of `digit` (a square uint8 image of side size/2) on a black canvas,
    moving in `direction` between the two middle frames.

    Why the middle: the position at the middle frame is uniform over the canvas and the motion before it
    mirrors the motion after it, so a clip and its time reversal (the opposite direction) are equally
    likely and hold the same set of frames. Labelled at the first frame instead, a digit moving right
    would on average sit right of its start, and an order-blind model could read that off.
    Per axis the digit moves 1 to 2 sixteenths of the free room per frame, and at least a pixel (so no step
    is lost to rounding on small canvases), which makes it bounce about once in 8 to 16 frames.
    """
    side = digit.shape[0]
    room = size - side
    unit = math.cos(direction * math.pi / 4), -math.sin(direction * math.pi / 4)  # screen y grows downwards
    # at least a pixel per frame on each moving axis, so rounding never loses the step (canvases under 32 px)
    speed = max(rng.uniform(1.0, 2.0) * room / 16, 1.0) / max(abs(unit[0]), abs(unit[1]))
    velocity = [speed * u if abs(u) > 1e-9 else 0.0 for u in unit]
    # the middle step itself must not turn at an edge, or it would show the other direction
    middle = [rng.uniform(max(0.0, -v), room - max(0.0, v)) for v in velocity]
    xs, ys = (np.rint(bouncing_path(p, v, room, frames)).astype(int) for p, v in zip(middle, velocity))
    clip = np.zeros((frames, size, size), dtype=np.uint8)
    for t, (x, y) in enumerate(zip(xs, ys)):
        clip[t, y:y + side, x:x + side] = digit
    return clip


def write_clip(clip: np.ndarray, path_stem: Path, fmt: str) -> Path:
    """Write a (T, H, W) uint8 clip as an H.264 mp4, a .npy array or a folder of PNG frames."""
    if fmt == "npy":
        path = path_stem.with_suffix(".npy")
        np.save(path, clip)
    elif fmt == "frames":
        path = path_stem
        path.mkdir()
        for t, frame in enumerate(clip):
            Image.fromarray(frame).save(path / f"frame_{t:03d}.png")
    else:
        path = path_stem.with_suffix(".mp4")
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=FRAMES_PER_SECOND)
            stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
            stream.options = {"crf": "17"}  # near-lossless: small digits survive compression
            for frame in clip:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")):
                    container.mux(packet)
            for packet in stream.encode():  # flush the encoder's delayed frames
                container.mux(packet)
    return path


def make_moving_digits(out: str | os.PathLike, spec: MovingDigitsSpec) -> dict:
    """Write spec.clips clips into OUT/<class>/; returns {"out", "classes": {class: count}}."""
    spec.validate()
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise VisionflowError(f"{root}: already exists and is not empty; choose a new folder")
    digits = digit_source(spec.source)
    rng = np.random.default_rng(spec.seed)
    side = spec.size // 2
    counts: dict[str, int] = {}
    for i in range(spec.clips):
        index = int(rng.integers(len(digits)))
        digit = digits.read(index, 1, side)[0].numpy()
        direction = i % len(DIRECTIONS)  # balanced classes
        clip = render_clip(digit, direction, spec.frames, spec.size, rng)
        name = DIRECTIONS[direction] if spec.label == "direction" else digits.classes[digits.labels[index]]
        (root / name).mkdir(parents=True, exist_ok=True)
        write_clip(clip, root / name / f"clip_{i:05d}", spec.format)
        counts[name] = counts.get(name, 0) + 1
    return {"out": str(root), "classes": dict(sorted(counts.items()))}
