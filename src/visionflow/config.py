"""Training configuration: one dataclass the CLI maps onto one to one, saved as config.json in the run.

`predict` and `evaluate` rebuild everything (model, classes, preprocessing) from config.json alone.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields

from visionflow.errors import VisionflowError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")
EVAL_AUGMENTS = ("none", "flip", "flip-translate")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 where the hardware computes it (devices.uses_bf16)


# What a value of each option type may be, and how an error names the type (run configs and model options).
TYPE_CHECKS = {"int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),  # numpy's too
               "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
               "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool), "None": lambda v: v is None}
TYPE_NAMES = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false", "None": "None"}


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2 ** 32:  # numpy's generators take no other
        raise VisionflowError(f"--seed must be between 0 and 2**32 - 1 (got {seed})")


def shape_checks(channels: int | None, image_size: int | None) -> list[tuple[bool, str]]:
    """--channels and --image-size of a classifier's images (None: measured from the data), for TrainConfig and for
    `preview`, which decodes as training would."""
    return [(channels in (None, 1, 3), f"--channels must be 1 or 3 (got {channels})"),
            (image_size is None or 8 <= image_size <= 1024, f"--image-size must be between 8 and 1024 (got {image_size})")]


class RunConfig:
    """What every run configuration shares (training, GAN, repair): option checks that raise one clear
    error, and the JSON round trip through config.json."""

    @staticmethod
    def require(checks: list[tuple[bool, str]]) -> None:
        for ok, message in checks:
            if not ok:
                raise VisionflowError(message)

    def check_types(self) -> None:
        """Each value of the type its field declares, before any check compares it: from Python, epochs=1.5 or
        lr="1e-3" would fail later with a TypeError. Paths (pathlib) become the strings config.json holds."""
        for f in fields(self):
            value, allowed = getattr(self, f.name), {t.strip() for t in str(f.type).split("|")}
            if "str" in allowed and isinstance(value, os.PathLike):
                setattr(self, f.name, os.fspath(value))
                continue
            if isinstance(value, numbers.Number) and hasattr(value, "item"):  # numpy's: config.json takes Python's
                value = value.item()
                setattr(self, f.name, value)
            if isinstance(value, float) and not math.isfinite(value):  # no option here takes inf or NaN
                raise VisionflowError(f"--{f.name.replace('_', '-')} must be a finite number (got {value})")
            if not allowed <= set(TYPE_CHECKS) or any(TYPE_CHECKS[t](value) for t in allowed):
                continue  # a type not checked here (dict, ...), or a value of an allowed one
            raise VisionflowError(f"{f.name} must be {' or '.join(TYPE_NAMES[t] for t in sorted(allowed))} "
                                  f"(got {value!r})")
        check_seed(getattr(self, "seed", 0))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def for_resume(cls, recorded: dict, epochs: int | None, data: str | None, device: str | None = None):
        """A run's recorded settings to continue it with: `epochs`, `data` (where the data is now) and `device`
        (where it runs now: a run trained on a GPU continues on a CPU) as given, the rest as recorded. Every run
        configuration has these three fields."""
        cfg = cls.from_dict(recorded)
        if epochs is not None:
            cfg.epochs = epochs
        if data is not None:
            cfg.data = data
        if device is not None:
            cfg.device = device
        return cfg


@dataclass
class TrainConfig(RunConfig):
    data: str
    out: str
    model: str = "seed-cnn"
    model_options: dict = field(default_factory=dict)  # family options, e.g. {"hidden": 128}
    val: str | None = None            # a separate validation DATA; else the data's own test part or --val-split
    val_split: float = 0.1
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9             # SGD only
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    patience: int = 0                 # early stopping on validation accuracy; 0 = off
    class_weights: str = "none"       # "auto": inverse class frequency in the loss
    balanced_sampler: bool = False
    image_size: int | None = None     # None: measured from the data
    channels: int | None = None       # None: measured from the data
    augment: str = "none"
    gan_augment: str | None = None    # a conditional GAN run whose samples are added to the training images
    gan_ratio: float = 1.0            # generated images per real training image, class by class
    seed: int = 0
    strict: bool = False
    device: str = "auto"
    frames: int = 16                  # clips only: frames sampled per clip
    lookahead: int = 0                # every N steps pull the weights to their running average (airbench); 0 = off
    augment_eval: str = "none"        # test-time augmentation recorded in the run: none, flip, flip-translate (infer/predictor.py)
    precision: str = "auto"           # auto (bf16 where the hardware computes it), fp32 or bf16
    compile: bool = False             # torch.compile the model for training (falls back to eager when it cannot)
    preset: str | None = None         # the --preset the values came from (train/presets.py), for the record

    def validate(self) -> "TrainConfig":
        self.check_types()
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.lr > 0, f"--lr must be positive (got {self.lr})"),  # inf and NaN: check_types
            (self.weight_decay >= 0, f"--weight-decay must be 0 or more (got {self.weight_decay})"),
            (0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1) (got {self.momentum})"),
            (self.patience >= 0, f"--patience must be 0 (off) or a number of epochs (got {self.patience})"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer})"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule})"),
            (self.class_weights in ("none", "auto"), f"--class-weights must be none or auto (got {self.class_weights})"),
            *shape_checks(self.channels, self.image_size),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})"),
            (self.gan_ratio > 0, f"--gan-ratio must be positive (got {self.gan_ratio})"),
            (self.gan_augment is not None or self.gan_ratio == 1.0,
             f"--gan-ratio {self.gan_ratio:g} needs --gan-augment RUN: the GAN whose images it adds"),
            (self.frames >= 1, f"--frames must be at least 1 (got {self.frames})"),
            (self.lookahead >= 0, f"--lookahead must be 0 (off) or a number of steps (got {self.lookahead})"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision})"),
            (self.augment_eval in EVAL_AUGMENTS, f"--augment-eval must be one of {', '.join(EVAL_AUGMENTS)} (got {self.augment_eval})"),
        ]
        self.require(checks)
        return self
