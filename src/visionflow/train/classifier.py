"""Training a classifier: images and clips alike (a clip is just a 5-D batch).

`train_one_epoch` runs the steps of one epoch; `ClassifierTrainer` is what the shared epoch loop
(train/loop.py: seeding, checkpoints, resume, Ctrl-C) trains for a classifier: the optimizer and its
schedule, validation after each epoch, best.safetensors by validation accuracy, early stopping; `fit` runs it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from visionflow.config import TrainConfig
from visionflow.data.loading import DecodedPart
from visionflow.data.transforms import Augment, AugmentSpec, Preprocess
from visionflow.devices import (CompiledForward, autocast, compiled_or_eager, fused_optimizer_available, memory_format,
                                resolve_precision, select_device)
from visionflow.errors import VisionflowError
from visionflow.infer.predictor import Predictor
from visionflow.runs import RunDir
from visionflow.train.loop import ShowProgress, resume_command, run_epochs


def epoch_augment_eval(augment_eval: str) -> str:
    """The test-time views of each epoch's validation (metrics.csv, the choice of best.safetensors): at most the
    two flip views. The 6-view TTA triples its cost for a few tenths of a point, which report.json, `evaluate`
    and `predict` still get."""
    return "flip" if augment_eval == "flip-translate" else augment_eval


def build_optimizer(cfg: TrainConfig, model: nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """`fused`: Adam/AdamW update each parameter in one kernel where torch has it (same maths, fewer ops).
    On by default: on this 2-core CPU, idle, seed-cnn at batch 32 took 5.67-5.93 ms per training step
    against 5.97-6.21 ms with torch's multi-tensor kernel, in three alternating runs (benchmarks/README.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kernel = {"fused": True} if fused_optimizer_available(params, allowed=fused) else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,  # torch: none without momentum
                           weight_decay=cfg.weight_decay)


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR multiplier. Rebuilt from the config on resume, so `--epochs M` stretches it to the new end."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = max(1, int(0.3 * total))

    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    def one_cycle(step: int) -> float:
        # linear warm-up from 1/25 to the peak over 30% of training, then cosine down to ~0 (Smith 2018)
        if step < warmup:
            return 0.04 + 0.96 * step / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))

    multiplier = {"cosine": cosine, "onecycle": one_cycle, "constant": lambda step: 1.0}[cfg.schedule]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def restore_optimizer(optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR,
                      checkpoint: dict, run: RunDir) -> None:
    """The optimizer's and the schedule's saved state (the optimizer's checked against config.json's settings,
    RunDir.load_optimizer), and the rate for the step to come from the schedule as rebuilt (--resume --epochs M
    stretches it): the saved rate was the old schedule's."""
    run.load_optimizer(optimizer, checkpoint["optimizer"])
    schedule.load_state_dict(checkpoint["schedule"])
    for group, base, multiplier in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base * multiplier(schedule.last_epoch)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scikit-learn's "balanced": n_samples / (n_classes x count), so the weights
    average 1 over the samples (absent classes get 0)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights


def epoch_order(labels: torch.Tensor, balanced: bool, generator: torch.Generator) -> torch.Tensor:
    """The order of training items for one epoch: a permutation, or balanced sampling with replacement."""
    if not balanced:
        return torch.randperm(len(labels), generator=generator)
    counts = torch.bincount(labels).float()
    return torch.multinomial(1.0 / counts[labels], len(labels), replacement=True, generator=generator)


@dataclass
class FitState:
    """What survives an interruption, besides weights and optimizer: saved in checkpoint.pt."""

    epoch: int = 0                     # epochs finished
    best_accuracy: float = -1.0
    best_epoch: int = 0
    stale_epochs: int = 0              # epochs since the best, for early stopping


class Lookahead:
    """airbench's lookahead/EMA (`--lookahead N`): every N steps a running average of the weights (and
    BatchNorm statistics) moves towards the model, and the model is put back on it. The decay grows as
    0.95^N x progress^3, so early training moves freely and the last steps are averaged out."""

    def __init__(self, model: nn.Module, every: int, total_steps: int):
        self.every, self.total_steps = every, max(1, total_steps)
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for name, value in model.state_dict().items():
            if name in self.average:
                self.average[name].lerp_(value, 1.0 - decay)
                value.copy_(self.average[name])

    def after_step(self, model: nn.Module, step: int) -> None:
        if step % self.every == 0:
            self.update(model, 0.95 ** self.every * min(1.0, step / self.total_steps) ** 3)


def train_one_epoch(model: nn.Module, part: DecodedPart, preprocess: Preprocess, augment: Augment,
                    loss_fn: nn.Module, optimizer: torch.optim.Optimizer, schedule, cfg: TrainConfig,
                    device: torch.device, generator: torch.Generator, on_step,
                    lookahead: Lookahead | None = None, forward=None, precision: str = "fp32") -> dict:
    """One pass over `part`. `forward` is what computes the logits: `model` itself or its compiled version."""
    forward = forward or model

    def forward_backward(call, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device, precision):
            logits = call(x)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return logits, loss

    model.train()
    order = epoch_order(part.labels, cfg.balanced_sampler, generator)
    total_loss = torch.zeros((), device=device)
    total_correct = torch.zeros((), device=device, dtype=torch.int64)
    start = time.perf_counter()
    trained = 0
    for first in range(0, len(order), cfg.batch_size):
        index = order[first:first + cfg.batch_size]
        if len(index) < 2 and len(order) > 1:
            continue  # a 1-item last batch would break batch norm and adds nothing
        trained += len(index)
        images = part.images[index].to(device, non_blocking=True)
        labels = part.labels[index].to(device, non_blocking=True)
        x = preprocess(images, augment, generator)
        if x.ndim == 4:
            x = x.contiguous(memory_format=memory_format(device))
        try:
            logits, loss = forward_backward(forward, x, labels)
        except RuntimeError as exc:  # torch.compile's own errors are RuntimeErrors; naming them here would import it
            if not (isinstance(forward, CompiledForward) and forward.compiled
                    and isinstance(exc, torch._dynamo.exc.TorchDynamoException)):
                raise
            # The backward pass is compiled at its graph's first backward(), beyond the forward's fallback. It failed
            # before optimizer.step(): the weights are untouched, so the same batch is redone uncompiled (BatchNorm's
            # running statistics, which the compiled forward pass updated, count it twice: one batch, once per run).
            forward.fall_back(exc)
            logits, loss = forward_backward(forward, x, labels)
        optimizer.step()
        schedule.step()
        if lookahead is not None:
            lookahead.after_step(model, schedule.last_epoch)  # last_epoch counts steps over the whole run
        # Accumulate on the device: no host sync per step.
        total_loss += loss.detach() * len(index)
        total_correct += (logits.argmax(1) == labels).sum()
        on_step(len(index), total_loss, total_correct)
    seconds = time.perf_counter() - start
    loss_value = float(total_loss) / trained
    if not math.isfinite(loss_value):
        raise VisionflowError(f"training diverged (loss {loss_value}); train again with a lower --lr (a new run: "
                              "--resume keeps the run's settings)")
    return {"train_loss": loss_value, "train_accuracy": int(total_correct) / trained,
            "images_per_second": trained / seconds, "seconds": seconds}


class ClassifierTrainer:
    """What `run_epochs` trains for a classifier: one model, cross-entropy, the best epoch by validation accuracy
    (best.safetensors), early stopping after `cfg.patience` epochs without a better one."""

    name = "epoch"

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_part: DecodedPart, val_part: DecodedPart,
                 preprocess: Preprocess, run: RunDir, checkpoint: dict | None):
        self.model, self.cfg, self.train_part, self.val_part, self.preprocess, self.run = (
            model, cfg, train_part, val_part, preprocess, run)
        self.device = device = select_device(cfg.device)
        model.to(device, memory_format=memory_format(device))
        self.precision = resolve_precision(cfg.precision, device, model)  # "auto" -> fp32 or bf16 for this model here
        weight = class_weights(train_part.labels, len(train_part.classes)).to(device) if cfg.class_weights == "auto" else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
        self.optimizer = build_optimizer(cfg, model)
        steps_per_epoch = sum(1 for first in range(0, len(train_part), cfg.batch_size)
                              if len(train_part) - first >= 2 or len(train_part) == 1)
        self.schedule = build_schedule(cfg, self.optimizer, steps_per_epoch)
        self.state = FitState()
        if checkpoint is not None:
            run.load_into(model, "checkpoint.pt", weights=checkpoint["model"])
            restore_optimizer(self.optimizer, self.schedule, checkpoint, run)
            self.state = FitState(**checkpoint["state"])
        self.lookahead = Lookahead(model, cfg.lookahead, cfg.epochs * steps_per_epoch) if cfg.lookahead else None
        if checkpoint is not None and self.lookahead is not None and "lookahead" in checkpoint:
            self.lookahead.average = {k: v.to(device) for k, v in checkpoint["lookahead"].items()}
        self.augment = Augment(AugmentSpec.parse(cfg.augment))
        # Compiled for training only: validation runs the eager model (same parameters) under inference_mode.
        self.forward = compiled_or_eager(model, device, enabled=cfg.compile)
        input_kind = getattr(model, "input_kind", "image")
        self.rate_unit = "clips/s" if input_kind == "clip" else "img/s"
        self.validator = Predictor(model, preprocess, train_part.classes, device, input_kind=input_kind,
                                   augment_eval=epoch_augment_eval(cfg.augment_eval), precision=self.precision)
        self.items, self.start_epoch = len(train_part), self.state.epoch
        self.resume_command = resume_command("visionflow train", cfg.data, run)

    def stop_early(self) -> bool:
        return bool(self.cfg.patience) and self.state.stale_epochs >= self.cfg.patience

    def train_epoch(self, random: torch.Generator, show: ShowProgress) -> dict:
        counter = {"seen": 0, "steps": 0, "start": time.perf_counter()}

        def on_step(count: int, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
            # The bar moves every 25 steps: one host sync for the running loss and accuracy and one locked
            # update, not one per step (they cost several percent of a small model's step).
            counter["seen"] += count
            counter["steps"] += 1
            if counter["steps"] % 25:
                return
            seen = counter["seen"]
            rate = seen / max(1e-9, time.perf_counter() - counter["start"])
            show(seen, lambda: f"loss {float(loss_sum) / seen:.4f}  acc {int(correct) / seen:.4f}  {rate:,.0f} {self.rate_unit}")

        return train_one_epoch(self.model, self.train_part, self.preprocess, self.augment, self.loss_fn, self.optimizer,
                               self.schedule, self.cfg, self.device, random, on_step, self.lookahead, self.forward,
                               self.precision)

    def end_epoch(self, epoch: int, stats: dict) -> tuple[dict, str]:
        self.model.eval()
        val_logits = self.validator.logits(self.val_part.images)
        val_loss = float(nn.functional.cross_entropy(val_logits, self.val_part.labels))
        val_accuracy = float((val_logits.argmax(1) == self.val_part.labels).float().mean())
        state = self.state
        state.epoch = epoch
        weights = self.model.state_dict()
        if val_accuracy > state.best_accuracy:
            state.best_accuracy, state.best_epoch, state.stale_epochs = val_accuracy, epoch, 0
            self.run.save_weights("best.safetensors", weights)
        else:
            state.stale_epochs += 1
        self.run.save_weights("last.safetensors", weights)
        row = {"train_loss": round(stats["train_loss"], 6), "train_accuracy": round(stats["train_accuracy"], 6),
               "val_loss": round(val_loss, 6), "val_accuracy": round(val_accuracy, 6),
               "lr": self.optimizer.param_groups[0]["lr"], "images_per_second": round(stats["images_per_second"], 1),
               "seconds": round(stats["seconds"], 3)}
        summary = (f"loss {stats['train_loss']:.4f}  acc {stats['train_accuracy']:.4f}  val_loss {val_loss:.4f}  "
                   f"val_acc {val_accuracy:.4f}  {stats['images_per_second']:,.0f} {self.rate_unit}")
        return row, summary

    def checkpoint(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "state": asdict(self.state),
                **({"lookahead": self.lookahead.average} if self.lookahead is not None else {})}


def fit(model: nn.Module, cfg: TrainConfig, train_part: DecodedPart, val_part: DecodedPart, preprocess: Preprocess,
        run: RunDir, checkpoint: dict | None = None, show_progress: bool = True) -> dict:
    """Train `model`, writing the run directory as it goes; returns a summary.
    `checkpoint`: the run's checkpoint.pt (RunDir.load_checkpoint) to continue from."""
    trainer = ClassifierTrainer(model, cfg, train_part, val_part, preprocess, run, checkpoint)
    rows = run_epochs(trainer, run, cfg.epochs, cfg.seed, show_progress)
    state = trainer.state
    rates = [r["images_per_second"] for r in rows]
    return {"epochs": state.epoch, "best_epoch": state.best_epoch, "best_val_accuracy": state.best_accuracy,
            # the first epoch carries warm-up (allocator, kernels); leave it out when there are others
            "train_images_per_second": round(statistics.median(rates[1:] or rates), 1) if rates else 0.0,
            "device": str(trainer.device), "precision": trainer.precision, "rows": rows}
