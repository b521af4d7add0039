"""The run directory: one format, one reader/writer.

    RUN_DIR/
      config.json        TrainConfig + classes, preprocessing and input kind (all predict needs)
      split.json         origins of the held-out validation items (when split from the training data), how many
                         items the training part held then and how many of each class were not held out: a resume
                         holds out the same ones and counts those added and removed
      best.safetensors   weights with the best validation accuracy   (safetensors: tensors only, no code)
      last.safetensors   weights after the last finished epoch
      checkpoint.pt      resumable state: weights, optimizer, schedule, epoch, early-stopping state (loaded
                         weights_only; the randomness needs none: every epoch is seeded from (seed, epoch))
      metrics.csv        one row per epoch
      report.json        final validation metrics, train_images_per_second, skipped_files
      curves.png, confusion.png, mistakes.png
      best.onnx          written by `export`, and cached there by `--engine auto|onnx`

A GAN run keeps the same config.json, checkpoint.pt and metrics.csv, with generator.safetensors (its EMA
generator) and samples/ (gan/train.py); an image-repair run the same files as a classifier's but for the pictures
(gan/repair.py).

Every write goes to a temporary file in the same folder and is renamed into place, so an interrupted
write never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from visionflow.devices import callers_random_state_kept
from visionflow.errors import VisionflowError


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then rename tmp_path to path (atomic on POSIX within one filesystem). A path the system
    refuses is an OSError naming `path`, not the temporary file the user never asked for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        # mkstemp makes 0600, and a writer may make the file anew (safetensors does): run outputs are ordinary
        # files others may read
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        temporary = str(path.parent / f".{path.name}.")  # mkstemp's names, the one made or one it tried
        if isinstance(exc, OSError) and exc.errno is not None and str(exc.filename).startswith(temporary):
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        raise


def file_in_the_way(path: Path) -> Path | None:
    """The first of `path` and its parents that is a file where a folder is wanted, or None. Asked before any work:
    atomic_write's mkdir would find it only when the work is done and its first file is written."""
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def saved_optimizer_kind(state: dict) -> str | None:
    """The class of the optimizer (of those config.json names: adam, adamw, sgd) whose state_dict `state` is, when
    its settings tell: SGD's hold a momentum, Adam's and AdamW's differ by decoupled_weight_decay (None for an older
    torch's, without it). Asked before loading: AdamW sets decoupled_weight_decay on whatever state it loads."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    settings = groups[0] if groups and isinstance(groups[0], dict) else {}
    if "momentum" in settings:
        return "SGD"
    if "decoupled_weight_decay" in settings:
        return "AdamW" if settings["decoupled_weight_decay"] else "Adam"
    return None


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before the work whose result it holds, an output file that could not be written at its end: a folder
    of that name, a file where one of its folders should be. Missing folders are made; an existing file is replaced.
    `option`: the one that names the file, which the message names."""
    if path.is_dir():
        raise VisionflowError(f"{option} {path}: is a folder; give the file's name")
    in_the_way = file_in_the_way(path.parent)
    if in_the_way is not None:
        raise VisionflowError(f"{option} {path}: {in_the_way} is a file, not a folder")


# The files a run writes at its top level (samples/ and classifier/ are folders of their own).
RUN_FILES = ("config.json", "split.json", "checkpoint.pt", "metrics.csv", "report.json", "curves.png",
             "confusion.png", "mistakes.png")
RUN_TASKS = {"classifier": "a classifier run", "gan": "a GAN run", "repair": "an image-repair run"}
TRAIN_COMMANDS = {"classifier": "visionflow train", "gan": "visionflow gan train", "repair": "visionflow repair train"}
# What a run of each task loads its model from: the best weights, else the last; the GAN's EMA generator.
MODEL_WEIGHTS = {"classifier": ("best.safetensors", "last.safetensors"), "gan": ("generator.safetensors",),
                 "repair": ("best.safetensors", "last.safetensors")}
# What the GAN and repair verbs say of a folder that holds no run of theirs: the command that trains one. A classifier
# verb names what the folder holds instead (RunDir.require).
NOT_A_RUN = {"gan": "not a visionflow GAN run directory (train one with `visionflow gan train`)",
             "repair": "not a repair run (train one with `visionflow repair train`)"}
# What an optimizer's param_groups hold besides its settings: its parameters, the rate of the step to come (the
# schedule's) and the kernel the machine runs it with, which may differ on another machine.
NOT_OPTIMIZER_SETTINGS = {"params", "lr", "initial_lr", "foreach", "fused", "capturable", "differentiable"}
# What each task's trainer writes in checkpoint.pt (its checkpoint(); a classifier's lookahead average is optional):
# what tells a checkpoint.pt copied from another run from the run's own.
CHECKPOINT_PARTS = {"classifier": ("model", "optimizer", "schedule", "state"),
                    "gan": ("generator", "discriminator", "ema", "optimizer_g", "optimizer_d", "epoch", "step"),
                    "repair": ("generator", "discriminator", "g_optimizer", "d_optimizer", "state")}


def run_task(config: dict) -> str | None:
    """What a run's config.json says it trained: "classifier", "gan" or "repair" (each says so its own way), or
    None for a config.json that is not a visionflow run's."""
    if "version" not in config:
        return None
    if config.get("kind") == "gan":
        return "gan"
    if config.get("task") == "repair":
        return "repair"
    return "classifier" if {"train", "preprocess"} <= set(config) else None


def holds_parts(checkpoint: Any, task: str) -> bool:
    """Whether a loaded checkpoint.pt holds every part the trainer of `task` writes."""
    return isinstance(checkpoint, dict) and all(part in checkpoint for part in CHECKPOINT_PARTS[task])


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()  # '~/runs' from the Python API too, as DATA's '~' (open_data)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    @classmethod
    def for_new_run(cls, path: str | os.PathLike, data: str) -> "RunDir":
        """The folder a new run on `data` will be written to, checked before any work is done: it must not hold a
        run already, lie inside the data folder (its pictures would be read as a class the next time), and no
        file may stand where it or one of its parents should be a folder. A run that never finished an epoch (no
        weights: it failed to start, diverged or was interrupted early) holds nothing a new run would lose, so
        the new one replaces it."""
        run = cls(path)
        folder = Path(data).expanduser()  # as open_data reads it
        if folder.is_dir() and run.path.resolve().is_relative_to(folder.resolve()):
            raise VisionflowError(f"--out {path} is inside the data folder {data}; write the run elsewhere")
        in_the_way = file_in_the_way(run.path)
        if in_the_way is not None:
            raise VisionflowError(f"--out {run.path}: {in_the_way} is a file, not a folder")
        if not run.exists("config.json"):
            return run
        if any(run.path.glob("*.safetensors")):
            raise VisionflowError(f"{run.path} already holds a run: continue it with --resume or choose another --out")
        if run_task(run.read_json("config.json")) is None:  # someone else's config.json: not ours to replace
            raise VisionflowError(f"{run.path} holds a config.json that is not a visionflow run's; choose another --out")
        for name in RUN_FILES:  # what the attempt left, so nothing of it mixes with the new run
            (run.path / name).unlink(missing_ok=True)
        return run

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def refuse_fewer_epochs(self, finished: int, epochs: int | None) -> None:
        """`--resume --epochs N` extends a run: N below the epochs it has finished is a mistake, not a no-op."""
        if epochs is not None and epochs < finished:
            raise VisionflowError(f"{self.path} has already finished {finished} epochs; "
                                  f"--resume --epochs N extends it to N > {finished}")

    def require(self, task: str = "classifier") -> dict:
        """config.json of this run of `task`, once the folder is known to hold one with weights to load its model
        from: the one check every loader makes (resuming checks with config_to_resume)."""
        if not self.path.is_dir():
            raise VisionflowError(f"{self.path}: no such run directory")
        config = self.read_json("config.json") if self.exists("config.json") else None
        found = None if config is None else run_task(config)
        if task in NOT_A_RUN and found != task:
            raise VisionflowError(f"{self.path}: {NOT_A_RUN[task]}")
        if config is None:
            raise VisionflowError(f"{self.path}: not a visionflow run directory (no config.json)")
        if found not in (None, task):  # None: a config.json missing its parts; the classifier's loader names them
            raise VisionflowError(f"{self.path}: {RUN_TASKS[found]}, not {RUN_TASKS[task]}")
        if not any(self.exists(name) for name in MODEL_WEIGHTS[task]):
            raise VisionflowError(f"{self.path}: the run has no weights yet (training never finished an epoch)")
        return config

    def config_to_resume(self, task: str) -> dict:
        """config.json of the run of `task` to continue; a one-line error for anything else, naming the verb that
        resumes what the folder holds."""
        if not self.exists("config.json"):
            raise VisionflowError(f"{self.path}: nothing to resume (no config.json)")
        config = self.read_json("config.json")
        found = run_task(config)
        if found is None:
            raise VisionflowError(f"{self.path}: its config.json is not a visionflow run's; nothing to resume")
        if found != task:
            raise VisionflowError(f"{self.path}: {RUN_TASKS[found]}, not {RUN_TASKS[task]} "
                                  f"(resume it with `{TRAIN_COMMANDS[found]} --resume`)")
        return config

    # --- JSON ---
    def write_json(self, name: str, value: Any) -> None:
        text = json.dumps(value, indent=2, sort_keys=False) + "\n"
        atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(text))

    def read_json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            raise VisionflowError(f"{self.path}: missing {name}") from None
        except json.JSONDecodeError as exc:
            raise VisionflowError(f"{self.path / name}: not valid JSON ({exc})") from None

    # --- weights (safetensors) ---
    def save_weights(self, name: str, state_dict: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        try:
            atomic_write(self.path / name, lambda tmp: save_file(tensors, tmp))
        except SafetensorError as exc:  # its own error type, for a full disk too
            raise VisionflowError(f"{self.path / name}: cannot write the weights ({exc})") from None

    def load_weights(self, name: str) -> dict[str, torch.Tensor]:
        path = self.path / name
        if not path.exists():
            raise VisionflowError(f"{self.path}: missing {name}")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:  # truncated or not a safetensors file
            raise VisionflowError(f"{path}: unreadable weights ({exc})") from None

    def load_into(self, module: torch.nn.Module, name: str, what: str = "model",
                  weights: dict[str, torch.Tensor] | None = None) -> None:
        """The weights file `name` loaded into `module`, built from config.json, or `weights` already read from the
        run's file `name` (a network's part of checkpoint.pt): weights that do not fit it (another run's file, a
        config.json edited by hand) are one line naming the file and the mismatch, not load_state_dict's traceback."""
        try:
            module.load_state_dict(self.load_weights(name) if weights is None else weights)
        except RuntimeError as exc:
            # its first line names only the module's class; the mismatches follow, one a line
            lines = str(exc).splitlines()
            mismatch = " ".join((lines[1:2] or lines[:1] or ["mismatched weights"])[0].split())
            if len(mismatch) > 200:  # a list of every missing key of a large network
                mismatch = mismatch[:200] + " ..."
            raise VisionflowError(f"{self.path / name}: weights do not fit the {what} in config.json "
                                  f"({mismatch})") from None

    def load_network(self, build: Callable[[], torch.nn.Module], name: str, what: str = "model") -> torch.nn.Module:
        """The network `build()` makes from config.json, with the weights file `name` loaded into it (load_into). It is
        built on the CPU, and its random init, which the weights replace, draws from torch's global generator: a
        Python caller's, given back as it was."""
        with callers_random_state_kept(torch.device("cpu")):
            module = build()
        self.load_into(module, name, what)
        return module

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """The optimizer state `state`, checkpoint.pt's, loaded into `optimizer`, built from config.json: the state of
        another optimizer or of other settings (config.json edited by hand: adam -> sgd, another momentum) is one line
        naming the first difference, not a traceback from load_state_dict or the first step, nor a run that trains on
        with settings config.json does not describe (load_state_dict takes the checkpoint's). Not compared: the rate,
        which the schedule sets, and the kernel (foreach, fused), which the machine chooses."""
        kind = type(optimizer).__name__
        built = [{name: value for name, value in group.items() if name not in NOT_OPTIMIZER_SETTINGS}
                 for group in optimizer.param_groups]
        saved = saved_optimizer_kind(state)
        if saved not in (None, kind):  # said in words, not by a setting of torch's that tells them apart
            difference = f"the checkpoint holds {saved}'s state, config.json says {kind.lower()}"
        else:
            try:
                # loaded before comparing: torch fills in the settings a checkpoint of an older torch lacks
                optimizer.load_state_dict(state)
                difference = next((f"config.json's {kind}: {name} {value}, the checkpoint's: {loaded.get(name, 'none')}"
                                   for settings, loaded in zip(built, optimizer.param_groups)
                                   for name, value in settings.items() if loaded.get(name) != value), None)
            except KeyError as exc:  # the state another optimizer keeps (SGD's momentum buffers, loaded into Adam)
                difference = f"config.json's {kind} cannot load it: its state has no {exc}"
            except ValueError as exc:  # another number of parameters
                difference = f"config.json's {kind} cannot load it: {str(exc).splitlines()[0]}"
        if difference is not None:
            raise VisionflowError(f"{self.path / 'checkpoint.pt'}: its optimizer state does not fit the optimizer "
                                  f"config.json describes ({difference}); put back the settings the run trained "
                                  "with, or train a new run")

    def best_weights_name(self) -> str:
        return "best.safetensors" if self.exists("best.safetensors") else "last.safetensors"

    # --- resumable training state ---
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.path / "checkpoint.pt", lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, task: str | None = None) -> dict[str, Any]:
        """checkpoint.pt, checked to hold every part the trainer of `task` reads (None: any, for a test's own trainer),
        so that another kind of run's file is one line, not a KeyError from the first part it lacks."""
        path = self.path / "checkpoint.pt"
        if not path.exists():
            raise VisionflowError(f"{self.path}: nothing to resume (no checkpoint.pt: training never started); "
                                  "run the same command without --resume")
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive: this one is cut short, empty or another file
            raise VisionflowError(f"{path}: unreadable checkpoint (not a PyTorch checkpoint archive: damaged, empty or "
                                  "another kind of file)")
        try:
            # weights_only: tensors and plain containers only, never arbitrary pickled objects.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise VisionflowError(f"{path}: refused: it holds objects other than tensors and plain values, "
                                  f"which visionflow never writes and will not unpickle") from None
        except (RuntimeError, EOFError, OSError) as exc:  # truncated, or not a checkpoint at all
            raise VisionflowError(f"{path}: unreadable checkpoint ({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
        if task is None or holds_parts(checkpoint, task):
            return checkpoint
        found = next((kind for kind in CHECKPOINT_PARTS if holds_parts(checkpoint, kind)), None)
        if found is not None:
            what = f"the checkpoint of {RUN_TASKS[found]}, not of {RUN_TASKS[task]}"
        else:
            parts = checkpoint if isinstance(checkpoint, dict) else {}
            missing = ", ".join(part for part in CHECKPOINT_PARTS[task] if part not in parts)
            what = f"not the checkpoint of {RUN_TASKS[task]} (it has no {missing})"
        raise VisionflowError(f"{path}: {what}; put the run's own checkpoint.pt back, or train a new run")

    # --- metrics.csv ---
    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.path / "metrics.csv", write)

    def read_metrics(self) -> list[dict[str, float]]:
        if not self.exists("metrics.csv"):
            return []
        with open(self.path / "metrics.csv", newline="") as f:
            return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
