"""The epoch loop every kind of training shares (train/loop.py): seeding, checkpoints, metrics.csv, Ctrl-C."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from visionflow.errors import TrainingInterrupted
from visionflow.runs import RunDir
from visionflow.train.loop import resume_command, run_epochs


class LineTrainer:
    """A one-weight model fitted to y = 3x by SGD on noisy points drawn from the loop's generator: small, but
    its weights depend on every epoch's random stream and on the restored optimizer state."""

    name = "epoch"
    device = torch.device("cpu")

    def __init__(self, run: RunDir, checkpoint: dict | None = None, interrupt_in: int | None = None,
                 patience: int | None = None):
        self.weight = torch.zeros(1, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.weight], lr=0.05, momentum=0.9)
        self.epochs_done, self.losses = 0, []
        if checkpoint is not None:
            self.weight.data.copy_(checkpoint["weight"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.epochs_done, self.losses = int(checkpoint["epochs_done"]), list(checkpoint["losses"])
        self.start_epoch = self.epochs_done
        self.items, self.resume_command = 8, resume_command("visionflow train", "my data", run)
        self.interrupt_in, self.patience = interrupt_in, patience

    def stop_early(self) -> bool:
        return self.patience is not None and len(self.losses) >= self.patience

    def train_epoch(self, random: torch.Generator, show) -> dict:
        if self.interrupt_in == self.epochs_done + 1:
            raise KeyboardInterrupt
        x = torch.randn(self.items, generator=random)
        y = 3 * x + 0.1 * torch.randn(self.items, generator=random) + 0.01 * torch.randn(self.items)  # global RNG too
        loss = ((self.weight * x - y) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        show(self.items, lambda: "")
        return {"loss": float(loss.detach())}

    def end_epoch(self, epoch: int, stats: dict) -> tuple[dict, str]:
        self.epochs_done = epoch
        self.losses.append(stats["loss"])
        return {"loss": round(stats["loss"], 6), "weight": float(self.weight.detach())}, f"loss {stats['loss']:.4f}"

    def checkpoint(self) -> dict:
        return {"weight": self.weight.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "epochs_done": self.epochs_done, "losses": self.losses}


def test_an_interrupted_run_resumes_to_the_uninterrupted_one(tmp_path: Path):
    whole = RunDir(tmp_path / "whole")
    whole.create()
    rows = run_epochs(LineTrainer(whole), whole, epochs=6, seed=3, show_progress=False)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6] and abs(rows[-1]["weight"] - 3) < 1.0

    cut = RunDir(tmp_path / "cut run")
    cut.create()
    saved = re.escape(f"after 3 finished epoch(s), saved in {cut.path}; continue with: visionflow train 'my data' "
                      f"--out '{cut.path}' --resume")  # quoted: a path with a space pastes as one argument
    with pytest.raises(TrainingInterrupted, match=saved):
        run_epochs(LineTrainer(cut, interrupt_in=4), cut, epochs=6, seed=3, show_progress=False)
    assert [r["epoch"] for r in cut.read_metrics()] == [1, 2, 3]
    checkpoint = cut.load_checkpoint()
    assert checkpoint["epochs_done"] == 3
    resumed = run_epochs(LineTrainer(cut, checkpoint), cut, epochs=6, seed=3, show_progress=False)
    assert resumed == rows  # the same random stream, epoch by epoch, and the rows of before kept
    assert cut.read_metrics() == whole.read_metrics()
    assert torch.equal(cut.load_checkpoint()["weight"], whole.load_checkpoint()["weight"])


def test_an_interruption_in_the_first_epoch_leaves_a_checkpoint_to_resume(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    run.create()
    with pytest.raises(TrainingInterrupted, match=r"after 0 finished epoch\(s\)"):
        run_epochs(LineTrainer(run, interrupt_in=1), run, epochs=2, seed=0, show_progress=False)
    assert run.load_checkpoint()["epochs_done"] == 0 and run.read_metrics() == []


def test_stopping_early_ends_before_the_next_epoch(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    run.create()
    rows = run_epochs(LineTrainer(run, patience=2), run, epochs=5, seed=0, show_progress=False)
    assert [r["epoch"] for r in rows] == [1, 2] and run.load_checkpoint()["epochs_done"] == 2


def test_training_and_loading_leave_the_callers_global_random_stream_as_it_was(tmp_path: Path):
    """Training seeds torch's global generator (initial weights, each epoch), and loading a saved model draws from it
    (the network's random init, which the saved weights replace); a Python caller's own stream goes on afterwards as if
    it had not called visionflow, for every trainer, new or resumed, and for every verb that loads a run."""
    from visionflow import api
    from visionflow.api import gan as gan_api, repair as repair_api
    from visionflow.config import TrainConfig
    from visionflow.gan.repair import RepairConfig
    from visionflow.gan.train import GanConfig

    from conftest import write_class_folder

    data = str(write_class_folder(tmp_path / "data", per_class=6))

    def callers_draws_after(call, seed: int = 1234) -> torch.Tensor:
        torch.manual_seed(seed)
        torch.rand(1)  # the caller's stream, part way through
        call()
        return torch.rand(4)

    untouched = callers_draws_after(lambda: None)
    out = {name: str(tmp_path / name) for name in ("classifier", "gan", "repair")}
    calls = {
        "train": lambda: api.train(TrainConfig(data=data, out=out["classifier"], epochs=1, batch_size=8, seed=3),
                                   show_progress=False),
        "resume": lambda: api.resume(out["classifier"], epochs=2, show_progress=False),
        "gan train": lambda: gan_api.train_gan(GanConfig(data=data, out=out["gan"], epochs=1, batch_size=8, seed=3,
                                                         conditional=True),
                                               show_progress=False),
        "gan resume": lambda: gan_api.resume_gan(out["gan"], epochs=2, show_progress=False),
        "train --gan-augment": lambda: api.train(TrainConfig(data=data, out=str(tmp_path / "augmented"), epochs=1,
                                                             batch_size=8, seed=3, gan_augment=out["gan"],
                                                             gan_ratio=0.5), show_progress=False),
        "repair train": lambda: repair_api.train(RepairConfig(data=data, out=out["repair"], epochs=1, batch_size=8,
                                                              seed=3), show_progress=False),
        "repair resume": lambda: repair_api.resume(out["repair"], epochs=2, show_progress=False),
        "predict": lambda: list(api.predict(out["classifier"], [data])),
        "evaluate": lambda: api.evaluate(out["classifier"], data),
        "gan sample": lambda: gan_api.sample(out["gan"], 4, str(tmp_path / "samples.png")),
        # the untrained reference built from the seed, the GAN and the classifier loaded
        "gan evaluate": lambda: gan_api.evaluate_gan(out["gan"], data, classifier=out["classifier"], count=4,
                                                     show_progress=False),
        "repair run": lambda: repair_api.run(out["repair"], [data], str(tmp_path / "repaired"), box="4,4,6,6"),
        "repair evaluate": lambda: repair_api.evaluate(out["repair"], data, limit=3),
    }
    changed = [name for name, call in calls.items() if not torch.equal(callers_draws_after(call), untouched)]
    assert changed == []
