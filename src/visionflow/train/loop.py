"""The epoch loop every kind of training shares: classifiers, the GAN and the repair model.

What is trained differs (one network or two, the step, what "better" means), so each kind supplies an
`EpochTrainer`: four small methods. How it runs is the same for all and lives here, once:
- each epoch's random stream (shuffle, augmentation, noise, masks, dropout) is seeded by (seed, epoch), so a
  resumed run continues exactly where the uninterrupted one would have been; torch's global generators, which the
  epochs and the initial weights seed (devices.seed_global), are the caller's: the API puts them back afterwards
  (devices.callers_random_state_kept);
- a checkpoint is saved before the first epoch (an interruption there still leaves something to resume) and
  after every epoch, with the epoch's row appended to metrics.csv first;
- Ctrl-C (and in the CLI SIGTERM and SIGHUP, taken as Ctrl-C) ends with `TrainingInterrupted`, naming what was
  saved and the command that continues it; the interrupted epoch restarts on resume.
"""

from __future__ import annotations

import shlex
from typing import Callable, Protocol

import torch

from visionflow.devices import seed_global
from visionflow.errors import TrainingInterrupted
from visionflow.runs import RunDir
from visionflow.train.progress import make_console, make_progress

# (items done this epoch, the status text) -> the progress bar; the text is asked for only when the bar shows, so a
# status that costs a host sync (a running loss) costs nothing with --quiet
ShowProgress = Callable[[int, Callable[[], str]], None]


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def resume_command(verb: str, data: str, run: RunDir) -> str:
    """The command that continues `run`, ready to paste (paths with spaces quoted)."""
    return f"{verb} {shlex.quote(str(data))} --out {shlex.quote(str(run.path))} --resume"


class EpochTrainer(Protocol):
    name: str             # what the progress bar and the console call an epoch: "epoch", "repair epoch"
    items: int            # training items per epoch, for the progress bar
    start_epoch: int      # the epochs finished before this call: 0 for a new run, the checkpoint's for a resumed one
    resume_command: str   # what continues the run, for the Ctrl-C message
    device: torch.device  # where it trains: the global generator seeded per epoch is this one's (and the CPU's)

    def stop_early(self) -> bool:
        """Whether to stop before the next epoch (the classifier's --patience)."""

    def train_epoch(self, random: torch.Generator, show: ShowProgress) -> dict:
        """One pass over the training data, drawing from `random`; returns the epoch's statistics."""

    def end_epoch(self, epoch: int, stats: dict) -> tuple[dict, str]:
        """Score finished epoch `epoch` (1-based), save its weights and record it as finished for `checkpoint`;
        returns its metrics.csv row (without the epoch) and its summary for the console."""

    def checkpoint(self) -> dict:
        """Everything a resumed run needs: checkpoint.pt's content (tensors and plain values only)."""


def run_epochs(trainer: EpochTrainer, run: RunDir, epochs: int, seed: int, show_progress: bool = True) -> list[dict]:
    """Train up to `epochs` finished epochs in all; returns every metrics.csv row, earlier runs' included."""
    rows = [r for r in run.read_metrics() if r["epoch"] <= trainer.start_epoch] if trainer.start_epoch else []
    if trainer.start_epoch == 0:
        run.save_checkpoint(trainer.checkpoint())
    finished = trainer.start_epoch
    console = make_console()
    try:
        with make_progress(console, show_progress) as progress:
            for epoch in range(trainer.start_epoch, epochs):
                if trainer.stop_early():
                    break
                task = progress.add_task(f"{trainer.name} {epoch + 1}/{epochs}", total=trainer.items, status="")
                seed_global(epoch_seed(seed, epoch), trainer.device)  # dropout and any other draw from the global generator
                random = torch.Generator().manual_seed(epoch_seed(seed, epoch))

                def show(done: int, status: Callable[[], str]) -> None:
                    if show_progress:
                        progress.update(task, completed=done, status=status())

                stats = trainer.train_epoch(random, show)
                row, summary = trainer.end_epoch(epoch + 1, stats)
                progress.remove_task(task)
                rows.append({"epoch": epoch + 1, **row})
                console.print(f"{trainer.name} {epoch + 1}/{epochs}  {summary}", highlight=False, soft_wrap=True)
                run.write_metrics(rows)
                run.save_checkpoint(trainer.checkpoint())
                finished = epoch + 1
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted after {finished} finished epoch(s), saved in {run.path}; "
                                  f"continue with: {trainer.resume_command}") from None
    return rows
