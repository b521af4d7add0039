"""Decoding a source into batches: once into a uint8 cache for training, or streamed for labelling.

Decoding runs in a thread pool (Pillow releases the GIL while it decodes), and is the only place that
decides what happens to a broken item: skipped with a warning naming it, or refused under `strict`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from visionflow.data.sources import DataSource
from visionflow.errors import BrokenImage, VisionflowError

log = logging.getLogger("visionflow")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class DecodedPart:
    """A whole part decoded into memory: images (N, C, H, W) uint8 or (N, T, C, H, W) for clips."""

    images: torch.Tensor
    labels: torch.Tensor
    origins: list[str]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (origin, reason)

    def __len__(self) -> int:
        return len(self.labels)


def _read_or_error(source: DataSource, channels: int, size: int | None):
    def read(index: int):
        try:
            return source.read(index, channels, size)
        except BrokenImage as exc:
            return exc
    return read


def _decode_chunks(source: DataSource, indices: range | list[int], channels: int, size: int | None,
                   strict: bool, chunk: int, workers: int) -> Iterator[tuple[list[int], list[torch.Tensor], list[BrokenImage]]]:
    read = _read_or_error(source, channels, size)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        indices = list(indices)
        for start in range(0, len(indices), chunk):
            batch_indices = indices[start:start + chunk]
            kept, tensors, broken = [], [], []
            for index, result in zip(batch_indices, pool.map(read, batch_indices)):
                if isinstance(result, BrokenImage):
                    if strict:
                        raise VisionflowError(f"broken file (refused by --strict): {result}")
                    log.warning("skipped %s", result)
                    broken.append(result)
                else:
                    kept.append(index)
                    tensors.append(result)
            yield kept, tensors, broken


def decode_part(source: DataSource, channels: int, size: int | None, strict: bool = False,
                workers: int | None = None) -> DecodedPart:
    """Decode every item of `source` once into one uint8 tensor (the training cache)."""
    kept_all: list[int] = []
    tensors_all: list[torch.Tensor] = []
    skipped: list[tuple[str, str]] = []
    for kept, tensors, broken in _decode_chunks(source, range(len(source)), channels, size, strict,
                                                chunk=1024, workers=workers or default_workers()):
        kept_all += kept
        tensors_all += tensors
        skipped += [(b.origin, b.reason) for b in broken]
    if not tensors_all:
        raise VisionflowError(f"{source.name or 'data'}: none of its {len(source)} items could be read")
    labels = torch.as_tensor(source.labels[np.asarray(kept_all, dtype=np.int64)], dtype=torch.int64)
    return DecodedPart(torch.stack(tensors_all), labels, [source.origin(i) for i in kept_all],
                       source.classes, skipped)


def stream_batches(source: DataSource, channels: int, size: int | None, batch_size: int,
                   workers: int | None = None) -> Iterator[tuple[list[str], torch.Tensor | None, list[BrokenImage]]]:
    """Decode `source` batch by batch for labelling: (origins, uint8 batch or None, broken items).

    Memory holds one batch at a time, whatever the size of the collection.
    """
    for kept, tensors, broken in _decode_chunks(source, range(len(source)), channels, size, strict=False,
                                                chunk=batch_size, workers=workers or default_workers()):
        yield [source.origin(i) for i in kept], (torch.stack(tensors) if tensors else None), broken


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split holding out `fraction` of each class (at least one item of any class with two or more)."""
    if not 0.0 < fraction < 1.0:
        raise VisionflowError(f"--val-split must be between 0 and 1 (got {fraction})")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        n_val = int(round(len(members) * fraction))
        n_val = min(max(n_val, 1 if len(members) > 1 else 0), len(members) - 1)
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))
