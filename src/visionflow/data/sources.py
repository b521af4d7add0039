"""Data sources: one interface for every kind of collection visionflow reads.

A `DataSource` is an indexable labelled collection. Whatever it holds (files in class folders, MNIST IDX
arrays, the built-in digits, video clips: data/clips.py), `read(i, channels, size)` returns the
decoded uint8 tensor of item i, `origin(i)` says where it came from and `labels[i]` is its class index.
Errors in one item raise `BrokenImage`; the loaders in `visionflow.data.loading` decide to skip or refuse.

`open_data(spec)` turns what the user typed (a path or a built-in name) into a `DataSet`: a train part and,
when the data has them, its own test part and validation part.
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visionflow.data.decode import decode_image, is_image_file, pil_to_tensor, probe_image
from visionflow.errors import NothingGiven, VisionflowError

BUILTIN_DATASETS = ("digits",)

log = logging.getLogger("visionflow")


class DataSource:
    """An indexable, labelled collection. Subclasses implement `read` and set the attributes."""

    classes: list[str]
    labels: np.ndarray  # int64, -1 for unlabelled items
    kind: str = "image"  # "image" or "clip": which models can use it
    native_channels: int | None = None  # set when the data has one fixed channel count (arrays)
    name: str = ""
    # Whether reading is slow enough, and mostly Python holding the GIL (opening and parsing small files),
    # that worker processes beat threads. Arrays in memory read in microseconds: they stay in threads.
    decode_in_processes: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def origin(self, index: int) -> str:
        raise NotImplementedError

    def read(self, index: int, channels: int, size: int | None) -> torch.Tensor:
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> "Subset":
        return Subset(self, np.asarray(indices, dtype=np.int64))

    def require_kind(self, kind: str, taker: str, hint: str = "") -> None:
        """A one-line error when `taker` (a model, the GAN, ...) takes `kind`s and this source holds others."""
        if self.kind != kind:
            raise VisionflowError(f"{taker} takes {kind}s but {self.name or 'the data'} holds {self.kind}s{hint}")

    def decoding_shape(self, channels: int | None, size: int | None) -> tuple[int, int]:
        """(channels, size) to decode this source at: the ones asked for, each guessed from the data when None."""
        return channels or self.guess_channels(), size or self.guess_size()

    def guess_channels(self) -> int:
        return self.native_channels or 3

    def guess_size(self) -> int:
        raise NotImplementedError


class Subset(DataSource):
    def __init__(self, parent: DataSource, indices: np.ndarray):
        self.parent, self.indices = parent, indices
        self.classes, self.kind, self.name = parent.classes, parent.kind, parent.name
        self.native_channels = parent.native_channels
        self.decode_in_processes = parent.decode_in_processes
        self.labels = parent.labels[indices]

    def origin(self, index: int) -> str:
        return self.parent.origin(int(self.indices[index]))

    def read(self, index: int, channels: int, size: int | None) -> torch.Tensor:
        return self.parent.read(int(self.indices[index]), channels, size)

    def guess_channels(self) -> int:
        return self.parent.guess_channels()

    def guess_size(self) -> int:
        return self.parent.guess_size()


class ImageFiles(DataSource):
    """Image files with labels (label -1 when unlabelled, as for `predict` inputs)."""

    probe = staticmethod(probe_image)  # path -> (channels, (width, height)); clips bring their own
    probe_count = 32                   # files sampled to guess channels and size, and the first of each class
    max_guessed_size = 224
    decode_in_processes = True

    def __init__(self, paths: list[str], labels: Sequence[int], classes: list[str], name: str = ""):
        self.paths, self.classes, self.name = paths, classes, name
        self.labels = np.asarray(labels, dtype=np.int64)
        self._probed: list[tuple[int, tuple[int, int]]] | None = None

    def origin(self, index: int) -> str:
        return self.paths[index]

    def read(self, index: int, channels: int, size: int | None) -> torch.Tensor:
        return decode_image(self.paths[index], channels, size)

    def _probe_some(self) -> list[tuple[int, tuple[int, int]]]:
        """probe_count files spread over the collection and, for images, the first readable one of every class: a
        small colour class among many grey ones would otherwise go unseen. Probed once per source."""
        if self._probed is None:
            step = max(1, len(self.paths) // self.probe_count)
            picked = set(range(0, len(self.paths), step)[:self.probe_count])
            if len(self.labels):
                picked |= {int(i) for i in np.unique(self.labels, return_index=True)[1]}
            self._probed, tried = [], set()
            for index in sorted(picked):
                for candidate in range(index, min(index + 8, len(self.paths))):  # past a broken file or two
                    if candidate in tried:
                        break
                    tried.add(candidate)
                    try:
                        self._probed.append(self.probe(self.paths[candidate]))
                        break
                    except VisionflowError:
                        continue
        return self._probed

    def guess_channels(self) -> int:
        """1 when every sampled image is grayscale, otherwise 3."""
        probed = self._probe_some()
        return 1 if probed and all(c == 1 for c, _ in probed) else 3

    def guess_size(self) -> int:
        """The most common longer side of the sampled images, capped at max_guessed_size."""
        sides = [max(wh) for _, wh in self._probe_some()]
        if not sides:
            return 32
        values, counts = np.unique(sides, return_counts=True)
        return int(min(self.max_guessed_size, values[np.argmax(counts)]))


class ImageArray(DataSource):
    """Images already in memory as a uint8 array (N, H, W) or (N, H, W, C): MNIST, digits."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], name: str):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes, self.name = classes, name
        self.native_channels = 1 if images.ndim == 3 or images.shape[3] <= 2 else 3  # alpha is dropped

    def origin(self, index: int) -> str:
        return f"{self.name}#{index}"

    def read(self, index: int, channels: int, size: int | None) -> torch.Tensor:
        array = self.images[index]
        if array.ndim == 3:  # (H, W, C): converted as an image file of that mode would be
            return pil_to_tensor(Image.fromarray(np.ascontiguousarray(array.squeeze(2) if array.shape[2] == 1 else array)),
                                 channels, size)
        img = torch.from_numpy(array)[None]
        if channels != 1:
            img = img.expand(channels, -1, -1)
        if size is not None and img.shape[-1] != size:
            img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", align_corners=False,
                                antialias=True)[0].round().clamp(0, 255).byte()
        return img.contiguous()

    def guess_size(self) -> int:
        return int(self.images.shape[1])


@dataclass
class DataSet:
    """What `open_data` returns: the data's train part and, when it has them, its own test part and a
    validation part apart from it (train/ + val/ + test/)."""

    spec: str  # what identifies it again: an absolute path or a built-in name
    train: DataSource
    test: DataSource | None
    val: DataSource | None = None


# --- folders of images -------------------------------------------------------------------------------

def _ignored_folder(name: str) -> bool:
    """Hidden folders (.git, .ipynb_checkpoints) and the __MACOSX folder that zips made on a Mac carry."""
    return name.startswith(".") or name == "__MACOSX"


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not _ignored_folder(p.name))


def walk_folder(folder: Path):
    """os.walk in name order, into symlinked sub-folders too (a class folder may link in images kept elsewhere),
    each real folder once and none that holds `folder` (a link back up would loop or read the other classes),
    the ignored ones (_ignored_folder) left out."""
    root = os.path.realpath(folder)
    seen = {root}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not _ignored_folder(d)):
            real = os.path.realpath(os.path.join(dirpath, name))
            if real not in seen and os.path.commonpath([root, real]) != real:  # not `folder` or above it
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept
        yield dirpath, dirnames, filenames


def _files_below(folder: Path, accept) -> list[str]:
    found = []
    for dirpath, _, filenames in walk_folder(folder):
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if accept(f))
    return found


def labelled_items(root: Path, classes: list[str] | None, items_below, what: str) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, classes) of a folder with one sub-folder per class; items_below(class folder) lists its items."""
    folders = _class_folders(root)
    if not folders:
        raise VisionflowError(f"{root}: no class folders found (expected one sub-folder per class)")
    names = [f.name for f in folders]
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise VisionflowError(f"{root}: classes {unknown} are not among the {len(classes)} classes of the other part")
    else:
        classes = names
    paths, labels = [], []
    for folder in folders:
        files = items_below(folder)
        if not files:
            raise VisionflowError(f"{folder}: class folder '{folder.name}' holds no {what}")
        paths.extend(files)
        labels.extend([classes.index(folder.name)] * len(files))
    return paths, labels, classes


def image_folder(root: Path, classes: list[str] | None = None) -> ImageFiles:
    """A folder with one sub-folder per class, images at any depth below each."""
    paths, labels, classes = labelled_items(root, classes, lambda folder: _files_below(folder, is_image_file), "images")
    return ImageFiles(paths, labels, classes, name=str(root))


# --- MNIST IDX files ---------------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        if data[:3] != b"\x00\x00\x08":  # two zero bytes, then the element type: 0x08 for unsigned bytes
            raise VisionflowError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
        ndim = data[3]
        dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()  # writable, for torch
    except (OSError, ValueError, IndexError, struct.error, EOFError) as exc:
        raise VisionflowError(f"{path}: not a readable IDX file ({exc})") from None


def _idx_file(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def is_mnist_folder(root: Path) -> bool:
    return _idx_file(root, "train-images-idx3-ubyte") is not None or _idx_file(root, "t10k-images-idx3-ubyte") is not None


def mnist_part(root: Path, prefix: str, classes: list[str] | None = None) -> ImageArray | None:
    """The `prefix` (train or t10k) images and labels; the classes are the label values the training part holds
    (0-9 for MNIST, others for a subset or EMNIST), or `classes` for a test part."""
    images_path = _idx_file(root, f"{prefix}-images-idx3-ubyte")
    if images_path is None:
        return None
    labels_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
    if labels_path is None:
        raise VisionflowError(f"{root}: {images_path.name} has no matching {prefix}-labels-idx1-ubyte[.gz]")
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise VisionflowError(f"{root}: {images_path.name} and {labels_path.name} are not N images and N labels "
                              f"({images.shape} and {labels.shape})")
    values = np.unique(labels).tolist()
    classes = classes or [str(v) for v in values]
    unknown = [v for v in values if str(v) not in classes]
    if unknown:
        raise VisionflowError(f"{labels_path}: labels {unknown} are not among the training part's {classes}")
    index = np.full(256, -1, dtype=np.int64)
    index[[int(c) for c in classes]] = np.arange(len(classes))
    return ImageArray(images, index[labels], classes, name=f"{root}/{prefix}")


# --- built-in data -----------------------------------------------------------------------------------

def builtin_digits() -> ImageArray:
    """scikit-learn's bundled handwritten digits (1,797 images, 8x8, 17 grey levels) upscaled to 28x28."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    images = big[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return ImageArray(images, bunch.target, [str(d) for d in range(10)], name="digits")


# --- what the user typed -> a DataSet ------------------------------------------------------------------

def class_folder(root: Path, classes: list[str] | None = None, frames: int = 16, kind: str = "image") -> DataSource:
    """Class folders of images, or of clips (video files, .npy arrays, and folders of frames when kind is "clip")."""
    from visionflow.data import clips  # clips builds on this module, so it is imported only when needed

    holds_clips = clips.holds_clips(root, frame_folders=kind == "clip")
    return clips.clip_folder(root, classes, frames) if holds_clips else image_folder(root, classes)


def open_data(spec: str | os.PathLike, frames: int = 16, kind: str = "image") -> DataSet:
    """Auto-detect what DATA names: a built-in data set, an MNIST folder, a split folder or a class folder.

    `frames`: for clip data, the frames per clip the model sees (TrainConfig.frames).
    `kind`: what the caller's model takes. Video and .npy files are clips whatever it is; class folders
    whose images all sit in sub-folders are clips of frames for a clip model and nested images otherwise.
    """
    text = str(spec)
    if text in BUILTIN_DATASETS:
        return DataSet(text, builtin_digits(), None)
    root = Path(text).expanduser()
    if not root.exists():
        raise VisionflowError(f"{text}: no such file or folder (and not a built-in data set: {', '.join(BUILTIN_DATASETS)})")
    if not root.is_dir():
        raise VisionflowError(f"{text}: is a file; DATA is a folder (class folders, train/+val/, MNIST files) or a built-in name")
    root = root.resolve()
    if is_mnist_folder(root):
        train = mnist_part(root, "train")
        test = mnist_part(root, "t10k", train.classes if train is not None else None)
        return DataSet(str(root), train if train is not None else test, test if train is not None else None)
    # Train/, Val/ as well; a part folder with no class folders in it (an empty test/) is not a part
    parts = {p.name.lower(): p for p in _class_folders(root) if _class_folders(p)}
    val_dir = parts.get("val", parts.get("validation"))
    if "train" in parts and (val_dir or "test" in parts):
        train = class_folder(parts["train"], frames=frames, kind=kind)
        val = class_folder(val_dir, train.classes, frames, kind) if val_dir else None
        test = class_folder(parts["test"], train.classes, frames, kind) if "test" in parts else None
        # with a test part, val/ is for choosing the best epoch and test/ for scoring; alone, either is both
        return DataSet(str(root), train, test or val, val if test else None)
    return DataSet(str(root), class_folder(root, frames=frames, kind=kind), None)


def matching_inputs(inputs: Sequence[str]) -> list[tuple[str, list[tuple[str, bool]]]]:
    """What files, folders and globs name: each input with its (path, named) pairs, `named` when the input is that
    path as typed rather than a glob's match (a glob that matches nothing has none). A path that does not exist, no
    glob, is a typo: an error before any work."""
    found: list[tuple[str, list[tuple[str, bool]]]] = []
    for item in map(os.path.expanduser, inputs):  # '~/photos' from Python too, as the shell expands it
        if os.path.lexists(item):  # a dangling link too: named, it gets its error row
            found.append((item, [(item, True)]))
        elif any(c in item for c in "*?["):
            found.append((item, [(match, False) for match in sorted(glob.glob(item, recursive=True))]))
        else:
            raise VisionflowError(f"{item}: no such file, folder or matching glob")
    return found


def _in_ignored_folder(pattern: str, match: str) -> bool:
    """Whether the wildcards of `pattern` reached `match` through a folder that a folder's listing leaves out
    (_ignored_folder: __MACOSX), so that 'photos/**' gives what 'photos/' gives. A folder the pattern names as typed
    is kept, as a folder named on its own is listed whatever its name."""
    typed = 0
    for part in Path(pattern).parts:
        if any(c in part for c in "*?["):
            break
        typed += 1
    reached = Path(match).parts[typed:]
    return any(map(_ignored_folder, reached if os.path.isdir(match) else reached[:-1]))


def gather_inputs(inputs: Sequence[str], items_of, what: str, verb: str = "label", report: bool = True) -> list[str]:
    """The paths `items_of(path, named)` gives for what each input names (matching_inputs), once each, in the order
    given; a glob's match in a folder that listings leave out gives none. An input that gives nothing (a glob that
    matches no file, or only other files; a folder that holds none) is a warning naming it, and the others go on;
    when no input gives anything, one error names each input with why ('nothing to `verb`: ...'). Without `report`,
    neither: a look at what the inputs hold, [] when nothing."""
    paths: list[str] = []
    passed_over: list[tuple[str, str]] = []  # (input, why it gave nothing), in the order given
    for item, matches in matching_inputs(inputs):
        given = [path for match, named in matches if named or not _in_ignored_folder(item, match)
                 for path in items_of(match, named)]
        paths.extend(given)
        if not matches:
            passed_over.append((item, "no such file, folder or matching glob"))
        elif not given:
            passed_over.append((item, f"{'holds' if matches[0][1] else 'matches'} no {what}"))
    if report and not paths:
        reasons = "; ".join(f"{item}: {why}" for item, why in passed_over) or "no inputs given"
        raise NothingGiven(f"nothing to {verb}: {reasons}")
    for item, why in passed_over if report else ():
        log.warning("%s: %s; going on with the other inputs", item, why)
    return list(dict.fromkeys(paths))  # once each: 'photos/**' matches a folder and the files in it


def _image_files_of(path: str, named: bool) -> list[str]:
    if os.path.isdir(path):
        return _files_below(Path(path), is_image_file)
    return [path] if named or is_image_file(path) else []


def expand_inputs(inputs: Sequence[str], verb: str = "label") -> list[str]:
    """Files, folders (recursive) and globs -> image file paths, in the order given. Folders and globs give their
    image files only, as DATA's folders do; a file named as typed is kept whatever it is (a non-image then gets an
    error row, as an unreadable image does). An input that gives no image file is a warning naming it, or, when
    none of the inputs gives a path, part of the error naming each (NothingGiven: 'nothing to `verb`: ...')."""
    return gather_inputs(inputs, _image_files_of, "image files", verb)


def unlabelled_files(paths: list[str]) -> ImageFiles:
    """The image files `paths` (expand_inputs, listed by the caller) to label, without labels."""
    return ImageFiles(paths, [-1] * len(paths), classes=[], name="inputs")
