"""Shared test fixtures: small generated image collections (no downloads, no shared data sets)."""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.cli import warnings_to_stderr

# The real data sets beside the checkout (../shared/datasets); absent on users' machines, so tests that read
# them skip.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(autouse=True)
def cli_warnings_on_stderr():
    """The CLI's warnings on stderr, as a user sees them. main() installs its handler with logging.basicConfig, which
    does nothing once the root logger has handlers, and pytest's log capture has put its own there: without this, a
    test of main() that reads stderr would not see a warning said before a one-line error."""
    handler = warnings_to_stderr()
    logging.getLogger().addHandler(handler)
    yield
    logging.getLogger().removeHandler(handler)


def pattern_image(kind: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A noisy 8-bit grey image of one of three easily told apart patterns."""
    image = rng.integers(0, 40, size=(size, size)).astype(np.uint8)
    if kind == "stripes_h":
        image[::4] = 220
    elif kind == "stripes_v":
        image[:, ::4] = 220
    else:  # "square"
        image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 220
    return image


def write_class_folder(root: Path, per_class: int = 20, size: int = 16, seed: int = 0, mode: str = "L") -> Path:
    rng = np.random.default_rng(seed)
    for kind in ("square", "stripes_h", "stripes_v"):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern_image(kind, rng, size)).convert(mode).save(folder / f"{i:03d}.png")
    return root


def flat_images(root: Path, classes: tuple[str, ...], per_class: int = 5) -> Path:
    """A class folder of plain grey 16x16 images: the classes' names are what matters."""
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def add_images(folder: Path, count: int, seed: int) -> None:
    """`count` more 12x12 images in each class folder of write_class_folder, named to sort among the ones there."""
    rng = np.random.default_rng(seed)
    for kind in ("square", "stripes_h", "stripes_v"):
        for i in range(count):
            Image.fromarray(pattern_image(kind, rng, 12)).save(folder / kind / f"{i:03d}-new{seed}.png")


@pytest.fixture
def patterns(tmp_path: Path) -> Path:
    """Three classes x 20 grey 16x16 PNGs."""
    return write_class_folder(tmp_path / "patterns")


def run_with_stderr_on_a_terminal(command: list[str]) -> tuple[subprocess.CompletedProcess, bytes]:
    """Run `command` with stderr on a pseudo-terminal, as a user's is (progress bars show there), and stdout piped;
    returns the completed process and what the terminal showed."""
    terminal, child_side = pty.openpty()
    shown: list[bytes] = []
    reader = threading.Thread(target=lambda: shown.extend(iter(lambda: _read_pty(terminal), b"")))
    reader.start()
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=child_side, timeout=300,
                                env={**os.environ, "TERM": "xterm", "COLUMNS": "100"})
    finally:
        os.close(child_side)
        reader.join(timeout=30)
        os.close(terminal)
    return result, b"".join(shown)


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the child side closed
        return b""


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m visionflow ARGS` as a user would; returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "visionflow", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)
