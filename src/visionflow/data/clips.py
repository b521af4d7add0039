"""Clips: short videos as a `DataSource` of kind "clip", and the temporal sampling that feeds clip models.

A clip is a video file (.mp4, .mov, .m4v, .avi, .webm, .mkv, decoded with PyAV and turned upright by its display
rotation), a folder of frame images (frames in natural name order, decoded with `decode_image`) or a .npy array
T x H x W [x C]. Every frame becomes a uint8 (C, size, size) tensor the way images do, so mixed resolutions and
frame rates stack into one batch.

Temporal sampling happens in two steps, so the one training loop needs no clip-specific code:
1. `read` decodes `decoded_frames(frames)` = 2 x frames frames per clip, the start and the centre of each
   of `frames` equal segments, once, into the uint8 cache (a clip shorter than `frames` is padded by
   repeating its last frame); a video, a frame folder and an array of the same clip give the same frames;
2. `Preprocess` picks `frames` of them per batch with `sample_frames`: the centre of each segment for
   evaluation (uniform), the start or the centre of each, drawn per clip, in training (TSN-style segment
   sampling, Wang et al. 2016, with two places per segment: the cache holds no more), so each epoch sees a
   slightly different timing.
"""

from __future__ import annotations

import bisect
import os
import re
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import torch
from PIL import Image

from visionflow.data.decode import (VIDEO_EXTENSIONS, decode_image, is_image_file, pil_to_tensor, probe_image,
                                    require_nonempty_file)
from visionflow.data.sources import (ImageFiles, _class_folders, _files_below, gather_inputs, labelled_items,
                                    walk_folder)
from visionflow.errors import BrokenImage, VisionflowError

ARRAY_EXTENSION = ".npy"
CACHE_FACTOR = 2  # frames decoded into the cache per frame the model sees: room for training-time jitter


def decoded_frames(frames: int) -> int:
    return CACHE_FACTOR * frames


def sampling_policy(frames: int) -> dict:
    """How clips are sampled, as recorded in config.json."""
    return {"frames": frames, "decoded_frames": decoded_frames(frames),
            "train": "segments: the start or the centre of each of `frames` equal segments, drawn per clip "
                     "(TSN-style, from the cache of 2 x frames)",
            "evaluate": "uniform: the centre frame of each segment",
            "short_clips": "pad by repeating the last frame"}


def is_clip_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS | {ARRAY_EXTENSION}


def _natural_key(name: str) -> list:
    """frame_2.png before frame_10.png: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _frame_files(folder: str | os.PathLike) -> list[str]:
    names = sorted((n for n in os.listdir(folder) if is_image_file(n)), key=_natural_key)
    return [os.path.join(folder, n) for n in names]


def clip_indices(available: int, count: int, frames: int) -> np.ndarray:
    """The first frame of each of `count` equal parts of a clip of `available` frames (what the cache holds).

    With count = 2 x frames, the cache's frames 2i and 2i+1 are the start and the centre of the model's
    segment i: evaluation takes the centre, training either (sample_frames). A clip shorter than `frames` is
    treated as `frames` long, its missing tail being its last frame.
    """
    length = max(available, frames)
    return np.minimum((np.arange(count) * length / count).astype(np.int64), available - 1)


def sample_frames(clips: torch.Tensor, frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, K, C, H, W) -> (N, frames, C, H, W): one frame from each of `frames` equal segments of K.

    Without a generator the centre of each segment (evaluation); with one a random frame of each segment,
    drawn per clip (training).
    """
    n, k = clips.shape[:2]
    offsets = torch.full((n, frames), 0.5) if generator is None else torch.rand(n, frames, generator=generator)
    index = ((torch.arange(frames) + offsets) * (k / frames)).long().clamp(max=k - 1).to(clips.device)
    return clips[torch.arange(n, device=clips.device)[:, None], index]


# --- decoding one clip -----------------------------------------------------------------------------------

def _frame_times(path: str) -> list:
    """The presentation times of a video's frames in order, from its packets (without decoding; in the order read
    when some packet has none); of a damaged file, those before the damage. Packets marked to discard (the
    frames an mp4's edit list trims off) are no frames: the decoder does not give them."""
    times = []
    try:
        with av.open(path) as container:
            for packet in container.demux(container.streams.video[0]):
                if packet.size > 0 and not packet.is_discard:
                    times.append(packet.pts)
    except (av.FFmpegError, OSError, ValueError):
        pass  # the decoding pass says what is wrong with the file
    return sorted(times) if None not in times else times


_TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def _upright(frame: av.VideoFrame) -> Image.Image:
    """A decoded frame as players show it, turned by the rotation in its display matrix (a phone stores a portrait
    video as landscape frames and that rotation), as decode_image applies an image's EXIF orientation."""
    image = frame.to_image()
    turn = _TURNS.get(round(frame.rotation / 90) * 90 % 360)  # PyAV: degrees counterclockwise, in [-180, 180]
    return image.transpose(turn) if turn is not None else image


def _video_frames(path: str, channels: int, size: int | None, count: int, frames: int) -> list[torch.Tensor]:
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BrokenImage(path, "no video stream")
            stream = container.streams.video[0]
            # The frames an .npy array or a frame folder of the same clip would give, from its packets counted
            # (20 ms for a 30 s video): only those are converted, so memory stays flat on long videos, and
            # decoding stops after the last. Not the count the container states: an AVI's counts the frames it
            # dropped (null frames, which decode to nothing), and mkv and webm state none.
            # A probe (count 1) takes the first frame only: no need to read every packet of the file first.
            times = _frame_times(path) if count > 1 else [None]
            if not times:
                raise BrokenImage(path, "video has no frames")
            wanted = clip_indices(len(times), count, frames)
            wanted_set = set(wanted.tolist())
            # Frames the decoder cannot give (those before the first keyframe of a clip cut without re-encoding)
            # leave their places empty rather than shift every later frame forward and freeze the clip's end:
            # the first frame decoded takes its time's place among the packets', and the others follow it in
            # order. Only the first: an AVI's B-frames carry made-up times that are not in display order.
            place = {time: number for number, time in enumerate(times)} if None not in times else {}
            first_place = None
            kept: dict[int, torch.Tensor] = {}
            try:
                for decoded, frame in enumerate(container.decode(stream)):
                    if first_place is None:
                        first_place = place.get(frame.pts, 0)
                    number = first_place + decoded
                    if number in wanted_set or not kept:  # the first one stands in for any before it
                        kept[number] = pil_to_tensor(_upright(frame), channels, size)
                    if number >= wanted[-1]:
                        break
            except av.EOFError:
                pass  # the stream ends early (no frames at all, or a cut-off last packet): what was read counts
    except BrokenImage:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise BrokenImage(path, f"not a readable video ({exc})") from None
    if not kept:
        raise BrokenImage(path, "video has no frames")
    numbers = sorted(kept)
    # each wanted frame, or the last one kept before it (a file that holds fewer frames than it says), or before
    # the first frame decoded, that first one
    return [kept[numbers[max(0, bisect.bisect_right(numbers, n) - 1)]] for n in wanted]


def _folder_frames(path: str, channels: int, size: int | None, count: int, frames: int) -> list[torch.Tensor]:
    files = _frame_files(path)
    if not files:
        raise BrokenImage(path, "frame folder holds no images")
    indices = clip_indices(len(files), count, frames)
    decoded = {}
    for i in np.unique(indices):
        try:
            decoded[i] = decode_image(files[i], channels, size)
        except BrokenImage as exc:
            # The clip is what breaks, as a video does at a damaged frame: its error row, its warning and the path
            # --resume finds done are the folder the user gave; the reason says which frame.
            raise BrokenImage(path, f"{os.path.basename(files[i])}: {exc.reason}") from None
    return [decoded[i] for i in indices]


def _array_frames(path: str, channels: int, size: int | None, count: int, frames: int) -> list[torch.Tensor]:
    try:
        with open(path, "rb") as f:
            is_npy = f.read(6) == b"\x93NUMPY"  # numpy would take anything else for a pickle, and say so
        array = np.load(path, mmap_mode="r", allow_pickle=False) if is_npy else None
    except (OSError, ValueError) as exc:
        raise BrokenImage(path, f"not a readable .npy array ({exc})") from None
    if array is None:
        raise BrokenImage(path, "not a .npy array file (no NumPy header)")
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[3] not in (1, 3, 4)):
        raise BrokenImage(path, f"array shape {array.shape} is not T x H x W [x C] with C 1, 3 or 4")
    if len(array) == 0:
        raise BrokenImage(path, "array has no frames")
    if 0 in array.shape[1:3]:
        raise BrokenImage(path, f"array shape {array.shape} has frames with no pixels")
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise BrokenImage(path, f"array dtype {array.dtype} is neither uint8 nor float in [0, 1]")
    out = []
    for i in clip_indices(len(array), count, frames):
        frame = np.asarray(array[i])
        if frame.dtype != np.uint8:
            # a float array scaled 0..255, or holding NaN, would otherwise come out silently white or black
            if not np.isfinite(frame).all():
                raise BrokenImage(path, f"float frame {i} holds NaN or infinite values")
            if frame.min() < 0.0 or frame.max() > 1.0:
                raise BrokenImage(path, f"float frame {i} is not in [0, 1] (min {frame.min():g}, max {frame.max():g}); "
                                        "store uint8 0..255 or floats in [0, 1]")
            frame = (frame * 255.0).round().astype(np.uint8)
        out.append(pil_to_tensor(Image.fromarray(frame[..., 0] if frame.ndim == 3 and frame.shape[2] == 1 else frame),
                                 channels, size))
    return out


def _clip_frames(path: str, channels: int, size: int | None, count: int, frames: int) -> list[torch.Tensor]:
    """`count` frames of a clip of any format (see clip_indices); BrokenImage naming the file on failure."""
    if os.path.isdir(path):
        return _folder_frames(path, channels, size, count, frames)
    require_nonempty_file(path, path)
    reader = _array_frames if path.lower().endswith(ARRAY_EXTENSION) else _video_frames
    return reader(path, channels, size, count, frames)


def read_clip(path: str, channels: int, size: int | None, frames: int) -> torch.Tensor:
    """One clip -> uint8 (decoded_frames(frames), channels, size, size); BrokenImage naming the file on failure."""
    return torch.stack(_clip_frames(path, channels, size, decoded_frames(frames), frames))


def probe_clip(path: str) -> tuple[int, tuple[int, int]]:
    """(channels the clip naturally has, (width, height) of its frames), from one frame; BrokenImage on failure."""
    if os.path.isdir(path):
        files = _frame_files(path)
        if not files:
            raise BrokenImage(path, "frame folder holds no images")
        return probe_image(files[0])
    # The first frame alone, at its own size: a video may change resolution midway (a webm from a video call)
    first = _clip_frames(path, 3, None, 1, 1)[0].numpy().astype(np.int16)
    # Video codecs store grey frames as YUV with neutral chroma: grey if the colour channels agree closely.
    grey = int(np.abs(first[0] - first[1]).max()) <= 8 and int(np.abs(first[1] - first[2]).max()) <= 8
    return (1 if grey else 3), (first.shape[2], first.shape[1])


# --- collections of clips ------------------------------------------------------------------------------------

class ClipFiles(ImageFiles):
    """Clips with labels (-1 when unlabelled). `read` returns (decoded_frames(frames), C, size, size)."""

    kind = "clip"
    probe = staticmethod(probe_clip)
    probe_count = 8  # a probe decodes a video's first frame (and reads a frame folder's first image)
    max_guessed_size = 112  # the usual input side of video networks; larger clips are scaled down by default

    def __init__(self, paths: list[str], labels: Sequence[int], classes: list[str], frames: int, name: str = ""):
        super().__init__(paths, labels, classes, name)
        self.frames = frames

    def read(self, index: int, channels: int, size: int | None) -> torch.Tensor:
        return read_clip(self.paths[index], channels, size, self.frames)


def _frame_folders_below(folder: Path, empty_leaves: bool = False) -> list[str]:
    """Folders strictly below `folder` that directly hold images: one clip each. With `empty_leaves`, also
    the empty folders: clips with no frames, for the reader to report (a folder of notes is not a clip)."""
    found = []
    for dirpath, dirnames, filenames in walk_folder(folder):
        if dirpath == str(folder):
            continue
        if any(is_image_file(f) for f in filenames):
            if any(is_clip_file(f) for f in filenames):  # a cover image among videos is no clip of one frame
                raise images_next_to_clips_error(dirpath)
            found.append(dirpath)
        elif empty_leaves and not dirnames and not filenames:
            found.append(dirpath)
    return found


def _clips_below(folder: Path) -> list[str]:
    return sorted(_files_below(folder, is_clip_file) + _frame_folders_below(folder, empty_leaves=True), key=_natural_key)


def holds_clips(root: Path, frame_folders: bool = True) -> bool:
    """Class folders hold clips when they hold video or .npy files, or (with `frame_folders`) only
    sub-folders of frame images. That last layout is also an image collection nested by folder, so only a
    caller that wants clips asks for it."""
    folders = _class_folders(root)
    if not folders:
        return False
    if any(_files_below(folder, is_clip_file) for folder in folders):
        return True
    if not frame_folders:
        return False
    # No images directly in any class folder, and images in their sub-folders: folders of frames.
    return all(not any(is_image_file(f) for f in os.listdir(folder)) and _frame_folders_below(folder)
               for folder in folders)


def images_next_to_clips_error(folder: str | os.PathLike) -> VisionflowError:
    return VisionflowError(f"{folder}: holds image files next to clips; put each clip's frames in a sub-folder of its own")


def clip_folder(root: Path, classes: list[str] | None, frames: int) -> ClipFiles:
    """A folder with one sub-folder per class, each holding clips (videos, .npy arrays, frame folders)."""
    def clips_below(folder: Path) -> list[str]:
        if any(is_image_file(f) for f in os.listdir(folder)):
            raise images_next_to_clips_error(folder)
        return _clips_below(folder)

    paths, labels, classes = labelled_items(root, classes, clips_below, "clips (video files, .npy arrays or frame folders)")
    return ClipFiles(paths, labels, classes, frames, name=str(root))


def _clips_of(item: str, named: bool) -> list[str]:
    if os.path.isdir(item):
        below = _clips_below(Path(item))
        if below and any(is_image_file(f) for f in os.listdir(item)):
            raise images_next_to_clips_error(item)  # a cover image among videos is no clip of one frame
        return below or [item]  # a folder of frames is one clip; one with nothing in it, a clip with no frames
    if named and is_image_file(item):
        raise VisionflowError(f"{item}: an image file, but the run's model takes clips "
                              "(video files, .npy arrays or folders of frames)")
    return [item] if named or is_clip_file(item) else []


def expand_clip_inputs(inputs: Sequence[str], report: bool = True) -> list[str]:
    """Clip files, folders (searched recursively for clips; a folder of images is one clip) and globs, which give
    their clips and folders only. An input that gives no clip is a warning, or, when none of the inputs gives a
    clip, part of the error naming each (gather_inputs; neither without `report`)."""
    return gather_inputs(inputs, _clips_of, "clips", report=report)


def unlabelled_clips(inputs: Sequence[str], frames: int) -> ClipFiles:
    paths = expand_clip_inputs(inputs)
    return ClipFiles(paths, [-1] * len(paths), classes=[], frames=frames, name="inputs")
