"""Decoding a source into batches: once into a uint8 cache for training, or streamed for labelling.

Decoding runs in a thread pool (Pillow releases the GIL while it decodes), and is the only place that
decides what happens to a broken item: skipped with a warning naming it, or refused under `strict`.
"""

from __future__ import annotations

import logging
import os
import sys
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


# Items per task handed to a decoding worker. One task per item costs more in futures and locks than a small
# JPEG costs to decode (CIFAR-10: 2,000 img/s through a pool of single items against 5,800 in a plain loop).
_ITEMS_PER_TASK = 64
# Below this many items, starting worker processes costs more than it saves.
_MIN_ITEMS_FOR_PROCESSES = 1000


def _read_task(source: DataSource, channels: int, size: int | None, task: list[int]) -> list:
    """Decoded tensors, or the BrokenImage of each item that could not be read, in `task` order."""
    results = []
    for index in task:
        try:
            results.append(source.read(index, channels, size))
        except BrokenImage as exc:
            results.append(exc)
    return results


class _ReadTasks(torch.utils.data.Dataset):
    """What a decoding process runs: a task (list of indices) -> numpy arrays (cheap to send back, where
    tensors would each cost a shared-memory file) or BrokenImage values."""

    def __init__(self, source: DataSource, channels: int, size: int | None):
        self.source, self.channels, self.size = source, channels, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, task: list[int]) -> list:
        return [r if isinstance(r, BrokenImage) else r.numpy()
                for r in _read_task(self.source, self.channels, self.size, task)]


def _as_is(task_results: list) -> list:
    return task_results


def _use_processes(source: DataSource, items: int, workers: int) -> bool:
    """Worker processes for file collections big enough to repay their start, where fork is safe and cheap
    (Linux); threads elsewhere. Pillow holds the GIL for most of a small file's decode, so threads only
    help for large images."""
    return (source.decode_in_processes and workers > 1 and items >= _MIN_ITEMS_FOR_PROCESSES
            and sys.platform == "linux")


def _task_results(source: DataSource, tasks: list[list[int]], channels: int, size: int | None,
                  workers: int) -> Iterator[list]:
    """Each task's results in task order, decoded by worker processes or threads."""
    if _use_processes(source, sum(len(t) for t in tasks), workers):
        loader = torch.utils.data.DataLoader(
            _ReadTasks(source, channels, size), batch_size=None, sampler=tasks, collate_fn=_as_is,
            num_workers=min(workers, os.cpu_count() or 1), multiprocessing_context="fork", prefetch_factor=4)
        for results in loader:
            yield [r if isinstance(r, BrokenImage) else torch.from_numpy(r) for r in results]
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda task: _read_task(source, channels, size, task), tasks)


def _decode_chunks(source: DataSource, indices: range | list[int], channels: int, size: int | None,
                   strict: bool, chunk: int, workers: int) -> Iterator[tuple[list[int], list[torch.Tensor], list[BrokenImage]]]:
    """Chunks of `chunk` items in order: (kept indices, their tensors, the broken items)."""
    indices = list(indices)
    chunks = [indices[start:start + chunk] for start in range(0, len(indices), chunk)]
    tasks, task_chunk = [], []
    for number, batch_indices in enumerate(chunks):
        per_task = max(1, min(_ITEMS_PER_TASK, -(-len(batch_indices) // workers)))
        for i in range(0, len(batch_indices), per_task):
            tasks.append(batch_indices[i:i + per_task])
            task_chunk.append(number)
    results_of = _task_results(source, tasks, channels, size, workers)
    task = 0
    for number, batch_indices in enumerate(chunks):
        results = []
        while task < len(tasks) and task_chunk[task] == number:
            results += next(results_of)
            task += 1
        kept, tensors, broken = [], [], []
        for index, result in zip(batch_indices, results):
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


def stream_batches(source: DataSource, channels: int, size: int | None, batch_size: int, strict: bool = False,
                   workers: int | None = None) -> Iterator[tuple[list[str], torch.Tensor | None, list[BrokenImage]]]:
    """Decode `source` batch by batch for labelling: (origins, uint8 batch or None, broken items).

    Memory holds one batch at a time, whatever the size of the collection. `strict`: a broken item raises.
    """
    for kept, tensors, broken in _decode_chunks(source, range(len(source)), channels, size, strict=strict,
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
