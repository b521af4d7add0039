"""Decoding a source into batches: once into a uint8 cache for training, or streamed for labelling.

Big file collections decode in forked worker processes (threads elsewhere): the training cache is written in
place, in memory the workers share, and labelling gets its batches back in order. This is the only place that
decides what happens to a broken item: skipped with a warning naming it, or refused under `strict`.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Collection, Iterator

import numpy as np
import torch

from visionflow.data.sources import DataSource
from visionflow.errors import BrokenImage, VisionflowError

log = logging.getLogger("visionflow")


def default_workers() -> int:
    """Decoding workers: one per core, at most 8, and no more than the threads torch may use, so that
    `--threads 1` (torch.set_num_threads) keeps decoding on one core as well."""
    return max(1, min(8, os.cpu_count() or 1, torch.get_num_threads()))


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
    """A task (list of indices) -> its items as numpy arrays (cheap to send back from a worker process, where
    tensors would each cost a shared-memory file) or BrokenImage values."""

    def __init__(self, source: DataSource, channels: int, size: int | None):
        self.source, self.channels, self.size = source, channels, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, task: list[int]) -> list:
        return [r if isinstance(r, BrokenImage) else r.numpy()
                for r in _read_task(self.source, self.channels, self.size, task)]


class _DecodeInto(_ReadTasks):
    """A task (list of indices) -> each item decoded straight into its row of `out`, which worker processes
    share with the main process; returns only the broken items, as (index, BrokenImage). Nothing decoded
    crosses a pipe, and there is no stacking at the end."""

    def __init__(self, source: DataSource, channels: int, size: int | None, out: torch.Tensor):
        super().__init__(source, channels, size)
        self.out = out

    def __getitem__(self, task: list[int]) -> list[tuple[int, BrokenImage]]:
        broken = []
        for index, result in zip(task, _read_task(self.source, self.channels, self.size, task)):
            if not isinstance(result, BrokenImage) and result.shape != self.out.shape[1:]:
                result = BrokenImage(self.source.origin(index), f"decoded to {tuple(result.shape)}, where the others are "
                                                                f"{tuple(self.out.shape[1:])}")
            if isinstance(result, BrokenImage):
                broken.append((index, result))
            else:
                self.out[index] = result
        return broken


def _as_is(task_results: list) -> list:
    return task_results


def _use_processes(source: DataSource, items: int, workers: int) -> bool:
    """Worker processes for file collections big enough to repay their start, where fork is safe and cheap
    (Linux); threads elsewhere. Pillow holds the GIL for most of a small file's decode, so threads only
    help for large images."""
    return (source.decode_in_processes and workers > 1 and items >= _MIN_ITEMS_FOR_PROCESSES
            and sys.platform == "linux")


def _run_tasks(runner: torch.utils.data.Dataset, tasks: list[list[int]], processes: bool,
               workers: int) -> Iterator[list]:
    """runner[task] for each task, in task order, in forked worker processes or in threads."""
    if processes:
        yield from torch.utils.data.DataLoader(
            runner, batch_size=None, sampler=tasks, collate_fn=_as_is, num_workers=min(workers, os.cpu_count() or 1),
            multiprocessing_context="fork", prefetch_factor=4)
        return
    # A bounded window of tasks in flight, as the DataLoader's prefetch_factor keeps: pool.map would queue them
    # all, and a slow consumer (labelling a big folder) would find the whole collection decoded in memory.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.submit(runner.__getitem__, task))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _split_tasks(indices: list[int], workers: int) -> list[list[int]]:
    """`indices` in tasks of at most _ITEMS_PER_TASK, and at least one task per worker where there are enough."""
    per_task = max(1, min(_ITEMS_PER_TASK, -(-len(indices) // workers)))
    return [indices[start:start + per_task] for start in range(0, len(indices), per_task)]


def _skip_or_refuse(broken: BrokenImage, strict: bool) -> None:
    if strict:
        raise VisionflowError(f"broken file (refused by --strict): {broken}")
    log.warning("skipped %s", broken)


def _decode_chunks(source: DataSource, indices: range | list[int], channels: int, size: int | None,
                   strict: bool, chunk: int, workers: int) -> Iterator[tuple[list[int], list[torch.Tensor],
                                                                              list[tuple[int, BrokenImage]]]]:
    """Chunks of `chunk` items in order: (kept indices, their tensors, the broken items with their places in
    the chunk)."""
    indices = list(indices)
    chunks = [indices[start:start + chunk] for start in range(0, len(indices), chunk)]
    tasks, task_chunk = [], []
    for number, batch_indices in enumerate(chunks):
        chunk_tasks = _split_tasks(batch_indices, workers)
        tasks += chunk_tasks
        task_chunk += [number] * len(chunk_tasks)
    processes = _use_processes(source, len(indices), workers)
    results_of = _run_tasks(_ReadTasks(source, channels, size), tasks, processes, workers)
    task = 0
    for number, batch_indices in enumerate(chunks):
        results = []
        while task < len(tasks) and task_chunk[task] == number:
            results += [r if isinstance(r, BrokenImage) else torch.from_numpy(r) for r in next(results_of)]
            task += 1
        kept, tensors, broken = [], [], []
        for place, (index, result) in enumerate(zip(batch_indices, results)):
            if isinstance(result, BrokenImage):
                _skip_or_refuse(result, strict)
                broken.append((place, result))
            else:
                kept.append(index)
                tensors.append(result)
        yield kept, tensors, broken


def decode_part(source: DataSource, channels: int, size: int | None, strict: bool = False,
                workers: int | None = None, named: Collection[str] = ()) -> DecodedPart:
    """Decode every item of `source` once into one uint8 tensor (the training cache).

    The first readable item, decoded here, gives the shape of all; the rest are decoded by worker processes (or
    threads) straight into a tensor they share with this process. An item of another shape is broken like an
    unreadable one: skipped with a warning naming it, or refused under `strict`. `named`: broken items' origins
    a warning has named already in this command (the same files decoded again): skipped without a second one.
    """
    workers = workers or default_workers()
    broken: list[tuple[int, BrokenImage]] = []
    for first in range(len(source)):
        try:
            first_item = source.read(first, channels, size)
            break
        except BrokenImage as exc:
            broken.append((first, exc))
    else:
        for _, exc in broken:
            _skip_or_refuse(exc, strict)
        raise VisionflowError(f"{source.name or 'data'}: none of its {len(source)} items could be read")
    need, free = len(source) * first_item.numel(), available_memory()
    if free is not None and need > 0.9 * free:
        raise VisionflowError(
            f"{source.name or 'data'}: its {len(source):,} items decode to {memory_size(need)} "
            f"({'x'.join(map(str, first_item.shape))} bytes each), more than the {memory_size(free)} of memory free; "
            f"they are held in memory at once: use a smaller --image-size or fewer items")
    rest = list(range(first + 1, len(source)))
    processes = _use_processes(source, len(rest), workers)
    out = _shared_uint8((len(source), *first_item.shape)) if processes else torch.empty(
        (len(source), *first_item.shape), dtype=torch.uint8)
    out[first] = first_item
    tasks = _split_tasks(rest, workers)
    for task_broken in _run_tasks(_DecodeInto(source, channels, size, out), tasks, processes, workers):
        broken += task_broken
    for _, exc in broken:  # in the collection's order: the first broken item is the one --strict names
        if strict or exc.origin not in named:
            _skip_or_refuse(exc, strict)
    gone = {index for index, _ in broken}
    kept = [i for i in range(len(source)) if i not in gone]
    images = out[kept] if gone else out
    labels = torch.as_tensor(source.labels[np.asarray(kept, dtype=np.int64)], dtype=torch.int64)
    return DecodedPart(images, labels, [source.origin(i) for i in kept], source.classes,
                       [(exc.origin, exc.reason) for _, exc in broken])


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor in anonymous shared memory (mmap MAP_SHARED): forked workers write into the very pages this
    process reads. Unlike /dev/shm files, it is not capped by the size of /dev/shm."""
    size = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(1, size))  # shared and anonymous; the tensor keeps the mapping alive
    return torch.frombuffer(buffer, dtype=torch.uint8, count=size).view(shape)


def memory_size(count: int) -> str:
    """Bytes as a person reads them: GB with a decimal from 1 GB on, MB below (0.1 GB against 0.1 GB said nothing)."""
    return f"{count / 1e9:,.1f} GB" if count >= 1e9 else f"{count / 1e6:,.0f} MB" if count >= 1e6 else f"{count:,} bytes"


def stream_batches(source: DataSource, channels: int, size: int | None, batch_size: int, strict: bool = False,
                   workers: int | None = None) -> Iterator[tuple[list[int], torch.Tensor | None,
                                                                  list[tuple[int, BrokenImage]]]]:
    """Decode `source` batch by batch for labelling and scoring: (the indices of the items decoded, their uint8
    batch or None, broken items with their places among the batch's items, so rows can be given in the order of the
    source).

    Memory holds one batch at a time, whatever the size of the collection. `strict`: a broken item raises.
    """
    for kept, tensors, broken in _decode_chunks(source, range(len(source)), channels, size, strict=strict,
                                                chunk=batch_size, workers=workers or default_workers()):
        yield kept, (torch.stack(tensors) if tensors else None), broken


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split holding out `fraction` of each class (at least one item of any class with two or more)."""
    if not 0.0 < fraction < 1.0:
        raise VisionflowError(f"--val-split must be above 0 and below 1 (got {fraction})")
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
