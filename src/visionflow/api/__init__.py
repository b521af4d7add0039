"""The Python API: what the CLI calls (and what a server or a batch engine would). Classification is here; the
GAN's verbs are in `visionflow.api.gan` and the repair verbs in `visionflow.api.repair`.

    from visionflow import api
    api.train(TrainConfig(data="digits", out="runs/digits"))
    api.evaluate("runs/digits", "digits")
    for row in api.predict("runs/digits", ["photos/"]): ...
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch

from visionflow.config import RunConfig, TrainConfig, check_seed, shape_checks
from visionflow.data.clips import (CACHE_FACTOR, expand_clip_inputs, is_clip_file, sample_frames, sampling_policy,
                                   unlabelled_clips)
from visionflow.data.loading import DecodedPart, decode_part, stratified_split, stream_batches
from visionflow.data.moving_digits import MovingDigitsSpec, make_moving_digits
from visionflow.data.sources import DataSet, DataSource, expand_inputs, open_data, unlabelled_files
from visionflow.data.transforms import Augment, AugmentSpec, Preprocess, channel_stats
from visionflow.devices import callers_random_state_kept, seed_global, select_device
from visionflow.errors import NothingGiven, VisionflowError
from visionflow.gan.generate import GanRun, augmenting_gan, synthetic_images
from visionflow.infer.predict import LabelledRows, predict_rows
from visionflow.infer.predictor import Predictor, warn_of_test_time_mirrors
from visionflow.models import count_parameters, create_model, list_models, model_entry
from visionflow.report.plots import check_picture_path, plot_confusion, plot_curves, plot_image_grid, save_image_grid
from visionflow.runs import RunDir
from visionflow.train.classifier import epoch_augment_eval, fit
from visionflow.train.metrics import classification_metrics, worst_mistakes

log = logging.getLogger("visionflow")


# --- training ------------------------------------------------------------------------------------------

@dataclass
class TrainingData:
    train: DecodedPart
    val: DecodedPart
    split: dict | None  # split.json's content when validation was split off the training data (split_record)
    val_from: str               # where validation (and so the choice of best.safetensors) comes from, for report.json


def _check_kind(model_name: str, source: DataSource) -> None:
    others = ", ".join(m for m in list_models() if model_entry(m).input_kind == source.kind)
    source.require_kind(model_entry(model_name).input_kind, f"model '{model_name}'", f" (models for {source.kind}s: {others})")


def _validation_source(cfg: TrainConfig, dataset: DataSet,
                       split: dict | None = None) -> tuple[DataSource, DataSource, dict | None, str]:
    """(train source, validation source, split.json's content or None when the validation data is separate, where the
    validation data comes from in words). `split`: a resumed run's split.json, its held-out items as the data names
    them now (require_same_data)."""
    if cfg.val is not None:
        val_set = open_data(cfg.val, frames=cfg.frames, kind=model_entry(cfg.model).input_kind)
        val = val_set.val or val_set.test or val_set.train  # its validation part when it has one
        return dataset.train, _aligned(val, dataset.train.classes), None, f"--val {cfg.val}"
    if dataset.val is not None:  # train/ + val/ (or validation/) + test/: test/ is kept for `evaluate`
        return dataset.train, dataset.val, None, f"the data's {Path(dataset.val.name).name}/ part"
    if dataset.test is not None:
        # As Keras's validation_data=(x_test, y_test): the best epoch is then chosen on the test part, which
        # report.json says; --val or a data set without a test part keep the two apart.
        folder = Path(dataset.test.name).name
        return dataset.train, dataset.test, None, (f"the data's {folder}/ part" if folder.lower() in ("val", "validation")
                                                   else "the data's test part")
    held_out_from = f"{cfg.val_split:.0%} of the training part, held out (split.json)"
    if split is not None:
        train, val, changes = recorded_split(cfg.data, dataset.train, split)
        require_every_class_to_train(cfg.data, train, split)
        if changes is not None:
            log.warning(changes)
        return train, val, split, held_out_from
    train_idx, val_idx = stratified_split(dataset.train.labels, cfg.val_split, cfg.seed)
    train, val = dataset.train.subset(train_idx), dataset.train.subset(val_idx)
    require_enough_to_train(cfg.data, train, val, f"{len(dataset.train)} in all, {cfg.val_split:.0%} held out",
                            "add images, raise --val-split or give --val DATA")
    return train, val, split_record(dataset.train, val), held_out_from


def require_enough_to_train(data: str, train: DataSource, val: DataSource, counted: str | None = None,
                            remedy: str = "") -> None:
    """A one-line error when a split leaves fewer than two images to train on (a training step takes two at least: a
    one-image batch breaks batch norm) or none to validate on: fresh data split in two, or a resumed run's data
    with nearly all its files gone since (recorded_split, before its callers log the warning that counts them, so the
    error stays one line). `counted` and `remedy`: how many images fresh data held and what to do, in words; None for
    a resumed run's data, whose images left are counted."""
    lacking = [need for need, short in (("train on", len(train) < 2), ("validate on", len(val) == 0)) if short]
    if not lacking:
        return
    noun = train.kind  # images, or clips
    if counted is None:
        counted = f"{len(train)} of the {noun}s the run trains on {'is' if len(train) == 1 else 'are'} left"
        remedy = "put the others back, or train a new run"
    raise VisionflowError(f"{data}: too few {noun}s to {' or '.join(lacking)} ({counted}); {remedy}")


def split_record(source: DataSource, held_out: DataSource) -> dict:
    """split.json of a run that holds out `held_out`, split off `source`: the origins held out, how many items the
    split was made from ("items") and how many of each class were not held out ("training_items_per_class"), for a
    resume to hold out the same ones and count the files added and removed since (recorded_split). Counts, not the
    training paths: those would make the file several times the size of the held-out list (for a million items, tens
    of megabytes)."""
    items, held = class_counts(source), class_counts(held_out)
    return {"held_out": [held_out.origin(i) for i in range(len(held_out))], "items": len(source),
            "training_items_per_class": {name: items[name] - held[name] for name in items}}


def class_counts(source: DataSource) -> dict[str, int]:
    return dict(zip(source.classes, np.bincount(source.labels, minlength=len(source.classes)).tolist()))


def how_many_of(count: int, total: int, noun: str) -> str:
    """'2 of the 5 images', and 'the one image' when there is one ('1 of the 1 images' reads as a slip)."""
    return f"the one {noun}" if total == 1 else f"{count} of the {total} {noun}s"


def mostly_gone(gone: int, held_out: int) -> bool:
    """Whether `gone` of the `held_out` images a run held out is too many to go on with: what is left would neither
    validate as the part that chose best.safetensors did (recorded_split) nor tell the run's data, moved, from other
    data under the same names (held_out_in). Up to half gone, the data is the run's with some images deleted."""
    return gone * 2 > held_out


def recorded_split(data: str, source: DataSource, split: dict) -> tuple[DataSource, DataSource, str | None]:
    """(train, validation, the warning saying what changed since the run started or None) of a resumed run, a
    classifier's or a repair run's: the items split.json held out stay held out and every other one of `source`
    trains. The split is not computed again: with files added since the run started, a seeded split of the new listing
    holds out other files, some of which the run has trained on. `split`: split.json as require_same_data gives it
    (split_record), whose "items" is how many items the split was made from (absent for a run from before it was
    recorded), and "trained_on", when present (a repair run's --max-images sample), the items that train: those still
    there, and no file added. The caller logs the warning once its own checks of what is left have passed: a user
    error is one line, and the warning before it would make two. A held-out part mostly gone is an error, as its
    scores, which chose best.safetensors, would not compare."""
    recorded, items = set(split["held_out"]), split.get("items")
    is_held_out = [source.origin(i) in recorded for i in range(len(source))]
    val_idx = [i for i, held in enumerate(is_held_out) if held]
    train_idx = [i for i, held in enumerate(is_held_out) if not held]
    gone = len(recorded) - len(val_idx)
    if mostly_gone(gone, len(recorded)):
        raise VisionflowError(f"{data}: {how_many_of(gone, len(recorded), source.kind)} the run held out for validation "
                              f"(split.json) {'is' if gone == 1 else 'are'} gone; put back what is missing, or train a "
                              "new run")
    added = None if items is None else len(train_idx) - (items - len(recorded))
    changes = []
    if "trained_on" in split:
        sample = set(split["trained_on"])
        drawn = [i for i in train_idx if source.origin(i) in sample]
        lost = len(sample) - len(drawn)
        if added + lost > 0:  # files outside the sample
            changes.append(f"{added + lost} more file{'' if added + lost == 1 else 's'} than when the run started, not "
                           f"trained on (the run trains on the {len(sample)} images --max-images drew)")
        if lost:
            changes.append(f"{how_many_of(lost, len(sample), 'image')} it trains on {'is' if lost == 1 else 'are'} "
                           f"gone (training on the other {len(drawn)})")
        train_idx = drawn
    else:
        more, fewer = files_added_and_removed(source.subset(train_idx), split.get("training_items_per_class"), added)
        counts = [f"{count} {word}" for count, word in ((more, "more"), (fewer, "fewer")) if count]
        if counts:  # "1 more file and 1 fewer", "9 more files", "2 fewer files"
            counts[0] += " file" if (more or fewer) == 1 else " files"
            changes.append(f"{' and '.join(counts)} to train on than when the run started")
    train, val = source.subset(train_idx), source.subset(val_idx)
    require_enough_to_train(data, train, val)
    if gone:
        changes.append(f"{how_many_of(gone, len(recorded), 'held-out ' + source.kind)} {'is' if gone == 1 else 'are'} "
                       f"gone (validating on the other {len(val_idx)})")
    if not changes:
        return train, val, None
    return train, val, f"{data}: {', and '.join(changes)}; the {source.kind}s held out in split.json stay held out"


def require_every_class_to_train(data: str, train: DataSource, split: dict) -> None:
    """A one-line error when a resumed classifier's data has no file left to train on in some class (a seeded split
    leaves every class some): a model would learn never to predict it, and decoding would find no image of it and
    blame its files as unreadable. `split`: the run's split.json, whose "training_items_per_class", when it has them,
    count the files gone."""
    emptied = [name for name, count in class_counts(train).items() if count == 0]
    if not emptied:
        return
    recorded, several = split.get("training_items_per_class", {}), len(emptied) > 1
    named = " and ".join(f"'{name}'" for name in emptied)
    gone = sum(recorded.get(name, 0) for name in emptied)
    counted = f" ({gone} gone since the run started)" if gone else ""
    raise VisionflowError(f"{data}: {'classes' if several else 'class'} {named} {'have' if several else 'has'} no images "
                          f"left to train on{counted}; put them back, or train a new run")


def files_added_and_removed(training: DataSource, recorded_per_class: dict | None,
                            added: int | None) -> tuple[int, int]:
    """(at least how many files were added since the run started, at least how many removed) of `training`, the items
    of a resumed run's data that are not held out: class by class from split.json's "training_items_per_class" when
    it has them, so that one file added to a class and one removed from another are two changes, not none; else from
    `added`, the change in their number (None for a run from before split.json recorded "items": nothing to count
    from). A file replaced by another of its class is not told apart from it."""
    if recorded_per_class is None:
        return max(added or 0, 0), max(-(added or 0), 0)
    now = class_counts(training)
    changes = [now.get(name, 0) - recorded_per_class.get(name, 0) for name in {*now, *recorded_per_class}]
    return sum(c for c in changes if c > 0), -sum(c for c in changes if c < 0)


def _aligned(source: DataSource, classes: list[str]) -> DataSource:
    """The same source with labels re-indexed to `classes` (by name); an error names unknown classes."""
    if source.classes == classes:
        return source
    unknown = sorted(set(source.classes) - set(classes))
    if unknown:
        raise VisionflowError(f"{source.name}: classes {unknown} are not among the run's classes {classes}")
    mapping = np.asarray([classes.index(c) for c in source.classes], dtype=np.int64)
    aligned = source.subset(np.arange(len(source)))  # a view with its own labels; the source stays as it was
    aligned.labels, aligned.classes = mapping[source.labels], list(classes)
    return aligned


def open_training_data(cfg: TrainConfig) -> DataSet:
    dataset = open_data(cfg.data, frames=cfg.frames, kind=model_entry(cfg.model).input_kind)
    classes = dataset.train.classes
    if len(classes) < 2:  # a GAN or a repair model trains on one class folder; a classifier cannot
        hint = "; a folder of train/ alone is one class: add val/ or test/ beside it" if classes == ["train"] else ""
        raise VisionflowError(f"{cfg.data}: only one class ('{classes[0]}'); a classifier needs at least two{hint}")
    return dataset


def load_training_data(cfg: TrainConfig, channels: int, size: int, dataset: DataSet | None = None,
                       split: dict | None = None, flag_warnings: Sequence[str] = ()) -> TrainingData:
    """`split`: a resumed run's split.json (_validation_source). `flag_warnings`: the caller's, said with the others
    once the data is checked (train)."""
    dataset = dataset or open_training_data(cfg)
    # before _validation_source, whose warning of what changed since a resumed run started would come first
    gan = None if cfg.gan_augment is None else augmenting_gan(cfg.gan_augment, dataset.train.classes, channels, size,
                                                              cfg.device)
    train_source, val_source, split, val_from = _validation_source(cfg, dataset, split)
    # before decoding, which takes a while, and after the checks above, whose errors stay one line
    say_each(flag_warnings)
    AugmentSpec.parse(cfg.augment).warn_of_mirrored_sides(train_source.classes)
    # recorded in the run: every epoch's validation uses it, and evaluate and predict after
    warn_of_test_time_mirrors(cfg.augment_eval, train_source.classes)
    train = decode_part(train_source, channels, size, strict=cfg.strict)
    unreadable = [name for name, count in zip(train.classes, torch.bincount(train.labels, minlength=len(train.classes)).tolist())
                  if count == 0]
    if unreadable:  # every file of these classes was skipped: a model would learn never to predict them
        raise VisionflowError(f"{cfg.data}: no readable training images in class(es) {', '.join(unreadable)}")
    if gan is not None:
        train = with_gan_samples(train, gan, cfg)
    val = decode_part(val_source, channels, size, strict=cfg.strict)
    return TrainingData(train, val, split, val_from)


def say_each(warnings: Sequence[str]) -> None:
    """Log warnings held back until the checks before have passed: a caller's (`flag_warnings`, about its command
    line), evaluation_part's."""
    for warning in warnings:
        log.warning("%s", warning)


def with_gan_samples(part: DecodedPart, gan: GanRun, cfg: TrainConfig) -> DecodedPart:
    """The decoded training part plus cfg.gan_ratio images per real one from the conditional GAN (augmenting_gan),
    class by class.

    Generated once (seeded by cfg.seed) and appended to the uint8 cache, so the training loop never knows.
    """
    images, labels = synthetic_images(gan, part.labels, cfg.gan_ratio, cfg.seed)
    origins = [f"{cfg.gan_augment}#generated{i}" for i in range(len(labels))]
    return DecodedPart(torch.cat([part.images, images]), torch.cat([part.labels, labels]), part.origins + origins,
                       part.classes, part.skipped)


def _data_shape(cfg: TrainConfig) -> tuple[DataSet, int, int]:
    dataset = open_training_data(cfg)
    _check_kind(cfg.model, dataset.train)
    return dataset, *dataset.train.decoding_shape(cfg.channels, cfg.image_size)


def train(cfg: TrainConfig, show_progress: bool = True, flag_warnings: Sequence[str] = ()) -> dict:
    """Train a new run in cfg.out; returns report.json's content. `flag_warnings`: a command line's warnings about
    its flags (those it ignores), said once the data is checked and before it decodes, so that a user error found
    first stays one line."""
    cfg.validate()
    augment = AugmentSpec.parse(cfg.augment).refuse_unusual_strengths()
    device = select_device(cfg.device)  # an unavailable device fails before any work
    run = RunDir.for_new_run(cfg.out, cfg.data)
    dataset, channels, size = _data_shape(cfg)
    augment.refuse_translate_beyond(size)  # once the side is known
    # bad options fail before decoding; building the probe draws from torch's global generator, the caller's
    with callers_random_state_kept(torch.device("cpu")):
        probe = create_model(cfg.model, num_classes=2, in_channels=channels, image_size=size, **cfg.model_options)
    data = load_training_data(cfg, channels, size, dataset, flag_warnings=flag_warnings)
    mean, std = channel_stats(data.train.images)
    if not getattr(probe, "standardize_inputs", True):  # the model wants pixels in [0, 1] (x / 255), e.g. seed-rnn
        mean, std = [0.0] * channels, [1.0] * channels
    input_kind = model_entry(cfg.model).input_kind
    preprocess = Preprocess(image_size=size, channels=channels, mean=mean, std=std,
                            frames=cfg.frames if input_kind == "clip" else None)
    with callers_random_state_kept(device):  # seeded from here on, as before; the caller's stream given back after
        seed_global(cfg.seed, device)  # the initial weights
        model = create_model(cfg.model, num_classes=len(data.train.classes), in_channels=channels, image_size=size,
                             **cfg.model_options)
        if hasattr(model, "init_from_data"):
            # A data-dependent init (airbench's whitened first layer) from a seeded sample of the training
            # images; what it sets is ordinary weights, so predict rebuilds it from config.json + weights.
            sample = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed))[:5000]
            model.init_from_data(preprocess(data.train.images[sample]))
        run.create()
        run.write_json("config.json", {
            "version": 1, "train": cfg.to_dict(), "classes": data.train.classes, "preprocess": preprocess.to_dict(),
            "input_kind": input_kind, "augment_eval": cfg.augment_eval,
            "data_spec": dataset.spec,
            **({"clip_sampling": sampling_policy(cfg.frames)} if input_kind == "clip" else {}),
        })
        if data.split is not None:
            run.write_json("split.json", data.split)
        summary = fit(model, cfg, data.train, data.val, preprocess, run, show_progress=show_progress)
        return write_report(run, model, cfg, data, preprocess, summary)


def resume(run_dir: str, epochs: int | None = None, show_progress: bool = True, data: str | None = None,
           val: str | None = None, device: str | None = None, flag_warnings: Sequence[str] = ()) -> dict:
    """Continue an interrupted run from checkpoint.pt, or extend a finished one to `epochs`. `data` (and `val`,
    for a run validated on --val): where the run's data is now (moved, or given from another folder than the run's
    relative path); its classes must be the run's. `flag_warnings`: as train's."""
    run = RunDir(run_dir)
    config = run.config_to_resume("classifier")
    cfg = TrainConfig.for_resume(config["train"], epochs, data, device)
    if val is not None:
        if cfg.val is None:
            raise VisionflowError(f"{run.path} validated on a part of its own data, not on --val; resume without --val")
        cfg.val = val
    cfg.validate()
    device = select_device(cfg.device)  # an unavailable device fails before any work
    checkpoint = run.load_checkpoint("classifier")  # before decoding: damaged, or another kind of run's: fails at once
    finished = checkpoint["state"]["epoch"]
    run.refuse_fewer_epochs(finished, epochs)
    if epochs is not None and epochs > finished and cfg.patience and checkpoint["state"]["stale_epochs"] >= cfg.patience:
        checkpoint["state"]["stale_epochs"] = 0  # stopped early, and asked for more: early stopping starts over
        log.warning("%s had stopped early (--patience %d); training epochs %d-%d", run.path, cfg.patience,
                    finished + 1, epochs)
    preprocess = Preprocess(**config["preprocess"])
    dataset = open_training_data(cfg)
    require_same_classes(cfg.data, dataset, config["classes"])
    split = require_same_data(run, dataset)
    data = load_training_data(cfg, preprocess.channels, preprocess.image_size, dataset, split, flag_warnings)
    with callers_random_state_kept(device):  # the model's init (then the checkpoint's weights) and the epochs draw
        model = create_model(cfg.model, num_classes=len(config["classes"]), in_channels=preprocess.channels,
                             image_size=preprocess.image_size, **cfg.model_options)
        config["train"], config["data_spec"] = cfg.to_dict(), dataset.spec  # the data may have moved
        run.write_json("config.json", config)
        if split is not None:  # the same held-out items, under the data's paths now
            run.write_json("split.json", split)
        summary = fit(model, cfg, data.train, data.val, preprocess, run, checkpoint=checkpoint,
                      show_progress=show_progress)
        return write_report(run, model, cfg, data, preprocess, summary)


def write_report(run: RunDir, model: torch.nn.Module, cfg: TrainConfig, data: TrainingData, preprocess: Preprocess,
                 summary: dict) -> dict:
    """Final validation metrics with the best weights, report.json and the run's pictures."""
    run.load_into(model, run.best_weights_name())
    predictor = Predictor(model, preprocess, data.train.classes, next(model.parameters()).device,
                          input_kind=model_entry(cfg.model).input_kind, augment_eval=cfg.augment_eval,
                          precision=summary["precision"])
    logits = predictor.logits(data.val.images)
    metrics = classification_metrics(logits, data.val.labels, data.val.classes)
    skipped = data.train.skipped + data.val.skipped
    report = {
        "model": cfg.model, "input_kind": model_entry(cfg.model).input_kind, "parameters": count_parameters(model),
        # what --image-size and --channels were, or what was guessed from the data when they were not given
        "image_size": preprocess.image_size, "channels": preprocess.channels,
        "epochs": summary["epochs"], "best_epoch": summary["best_epoch"], "validation": metrics,
        "validation_data": data.val_from,
        # the views "validation" above averaged, and the ones metrics.csv's per-epoch figures did
        "test_time_augmentation": {"validation": cfg.augment_eval, "per_epoch": epoch_augment_eval(cfg.augment_eval)},
        "train_images_per_second": summary["train_images_per_second"],
        # what config.json's "auto" resolved to on the machine that trained
        "device": summary["device"], "precision": summary["precision"], "threads": torch.get_num_threads(),
        "skipped_files": len(skipped), "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }
    run.write_json("report.json", report)
    plot_curves(summary["rows"], run / "curves.png")
    plot_confusion(metrics["confusion"], data.val.classes, run / "confusion.png")
    mistakes = worst_mistakes(logits, data.val.labels)
    if mistakes and data.val.images.ndim == 4:
        classes = data.val.classes
        plot_image_grid(data.val.images[[i for i, _, _ in mistakes]],
                        [f"{classes[p]} {c:.2f} (true {classes[int(data.val.labels[i])]})" for i, p, c in mistakes],
                        run / "mistakes.png")
    return report


# --- evaluation and labelling ----------------------------------------------------------------------------

def held_out_in(run: RunDir, dataset: DataSet, recorded: str | None) -> list[str] | None:
    """The run's held-out items as `dataset` names them: as split.json records them when it is the data the run
    trained on (`recorded`, config.json's data_spec), or at the same paths below its folder when it is that data
    moved or copied (most of them there, as for data not moved, and any whose original is still in place with the
    same bytes); None when the run held nothing out or `dataset` is other data."""
    if not run.exists("split.json"):
        return None
    held_out = run.read_json("split.json")["held_out"]
    if dataset.spec == recorded:
        return held_out
    return _moved_held_out(dataset, recorded, held_out, found_moved(dataset, recorded, held_out))


def _moved_held_out(dataset: DataSet, recorded: str | None, held_out: list[str],
                    found: list[tuple[str, str]]) -> list[str] | None:
    """held_out_in for data at another place than the run's, from what of it was `found` there (found_moved)."""
    if not found or mostly_gone(len(held_out) - len(found), len(held_out)):
        return None
    originals = [(origin, copy) for origin, copy in found[:100] if os.path.isfile(origin)]
    if not all(filecmp.cmp(origin, copy, shallow=False) for origin, copy in originals):
        return None  # other data under the same names: a data set generated again
    return named_in(dataset, recorded, held_out)


def found_moved(dataset: DataSet, recorded: str | None, held_out: list[str]) -> list[tuple[str, str]]:
    """(as split.json records it, as `dataset` names it) of each held-out item found at its place below `dataset`'s
    folder, as in the run's data (at `recorded`) moved or copied there."""
    if not (os.path.isabs(str(recorded)) and os.path.isabs(dataset.spec)):
        return []  # a built-in data set is never moved
    source = dataset.train
    listed = {source.origin(i) for i in range(len(source))}
    return [(origin, copy) for origin, copy in zip(held_out, named_in(dataset, recorded, held_out)) if copy in listed]


def named_in(dataset: DataSet, recorded: str, origins: list[str]) -> list[str]:
    """Items of the data at `recorded` as `dataset`, that data moved or not, names them."""
    if dataset.spec == recorded:
        return origins
    return [os.path.join(dataset.spec, os.path.relpath(origin, recorded)) for origin in origins]


def evaluation_part(run: RunDir, dataset: DataSet) -> tuple[DataSource, list[str]]:
    """The data's own test part; else the part the run held out, when the data is the run's own (moved or not), what
    is left of it as for --resume (recorded_split): some gone is a warning, most gone an error, as the rest trained the
    run; else all of it. And the warnings for the caller to say once its own checks of the part have passed (a user
    error is one line): what is gone, the data found moved, or why the part may hold the run's training images (all
    of its own data when it validated on other data (--val), or all of data that holds some of the images it held out
    at their places, too few to take it for the run's data moved with some gone)."""
    if dataset.test is not None:
        return dataset.test, []
    recorded = run.read_json("config.json").get("data_spec")
    if not run.exists("split.json"):
        trained = dataset.spec == recorded
        return dataset.train, [f"scoring all of {dataset.spec}: the run trained on these images (it validated on "
                               "other data)"] if trained else []
    held_out = run.read_json("split.json")["held_out"]
    source, noun = dataset.train, dataset.train.kind  # images, or clips
    if dataset.spec != recorded:
        found = found_moved(dataset, recorded, held_out)
        moved = _moved_held_out(dataset, recorded, held_out, found)
        if moved is None:
            if found and mostly_gone(len(held_out) - len(found), len(held_out)):
                return source, [f"scoring all of {dataset.spec} as other data: it holds "
                                f"{how_many_of(len(found), len(held_out), noun)} the run held out (split.json) at their "
                                f"places in {recorded}, the others gone (if it is that data, moved, the run trained on "
                                "the rest)"]
            return source, []
        held_out = moved
    keep = set(held_out)
    part = source.subset([i for i in range(len(source)) if source.origin(i) in keep])
    gone = len(held_out) - len(part)
    if mostly_gone(gone, len(held_out)):  # the data where the run trained on it (_moved_held_out refuses it moved)
        raise VisionflowError(f"{dataset.spec}: {how_many_of(gone, len(held_out), noun)} the run held out "
                              f"(split.json) {'is' if gone == 1 else 'are'} gone, and the others trained it; put back "
                              "what is missing, or evaluate on other data")
    where = dataset.spec
    if dataset.spec != recorded:
        where = f"{dataset.spec} holds the data the run trained on ({recorded}), moved or copied"
    if gone:
        return part, [f"{where}: {how_many_of(gone, len(held_out), 'held-out ' + noun)} {'is' if gone == 1 else 'are'} "
                      f"gone (scoring the other {len(part)})"]
    if dataset.spec != recorded:
        return part, [f"{where}: scoring the {len(part)} {noun}s it held out"]
    return part, []


def require_same_classes(data: str, dataset: DataSet, classes: list[str]) -> None:
    """A resumed run's data must have the run's classes: checked first, so that the error comes alone, before
    require_same_data and recorded_split warn of what changed."""
    if dataset.train.classes != classes:
        raise VisionflowError(f"{data}: its classes {dataset.train.classes} differ from the run's {classes}")


def require_same_data(run: RunDir, dataset: DataSet) -> dict | None:
    """--resume continues on the data the run trained on, wherever it is now: a one-line error for other data.
    Returns split.json with the items the run held out (and a repair run's --max-images sample) as `dataset` names them
    (recorded_split), or None when it held none out."""
    recorded = run.read_json("config.json").get("data_spec")
    held_out = held_out_in(run, dataset, recorded)
    if held_out is not None:
        split = run.read_json("split.json")
        if "trained_on" in split:  # a repair run's --max-images sample
            split["trained_on"] = named_in(dataset, recorded, split["trained_on"])
        return {**split, "held_out": held_out}
    if dataset.spec == recorded:
        return None
    if run.exists("split.json"):
        raise VisionflowError(f"{dataset.spec} is not the data the run trained on ({recorded}): most of the images it "
                              "held out (split.json) are not in it, or differ. Resume on that data, moved or not, or "
                              "train a new run")
    # nothing held out to recognise it by
    log.warning("resuming on %s; the run trained on %s (if that is other data, the epochs will not compare)",
                dataset.spec, recorded)
    return None


def evaluate(run_dir: str, data: str, device: str = "auto", weights: str = "best", batch_size: int = 256,
             strict: bool = False, engine: str = "auto", precision: str = "auto", augment_eval: str | None = None) -> dict:
    """Metrics of the run on DATA's evaluation part. `augment_eval`: test-time augmentation (None = the run's)."""
    if batch_size < 1:
        raise VisionflowError(f"--batch-size must be at least 1 (got {batch_size})")
    run = RunDir(run_dir)
    predictor = Predictor.from_run(run, device=device, weights=weights, engine=engine, precision=precision,
                                   augment_eval=augment_eval)
    dataset = open_data(data, frames=predictor.frames, kind=predictor.input_kind)
    source, warnings = evaluation_part(run, dataset)
    source.require_kind(predictor.input_kind, "the run's model")
    source = _aligned(source, predictor.classes)
    say_each(warnings)
    warn_of_test_time_mirrors(predictor.augment_eval, predictor.classes, recorded=augment_eval is None)
    # Streamed batch by batch as predict labels: memory holds one batch and the logits (N x classes floats), not
    # the decoded collection, so a million 224x224 colour images (150 GB decoded) score in the memory of one batch.
    # The logits go into one tensor made up front: a list of a small tensor per batch, kept while the batches come
    # and go, fragmented the heap (100,000 images: 86 MB more memory for 4 MB of logits).
    logits = torch.empty(len(source), len(predictor.classes))
    scored, skipped, seconds = [], 0, 0.0
    for indices, images, broken in stream_batches(source, predictor.preprocess.channels,
                                                  predictor.preprocess.image_size, batch_size, strict=strict):
        skipped += len(broken)
        if images is None:
            continue
        if not scored:
            predictor.logits(images, batch_size)  # warm-up, left out of the timing
        start = time.perf_counter()
        logits[len(scored):len(scored) + len(indices)] = predictor.logits(images, batch_size)
        seconds += time.perf_counter() - start
        scored += indices
    if not scored:
        raise VisionflowError(f"{source.name or 'data'}: none of its {len(source)} items could be read")
    labels = torch.as_tensor(source.labels[np.asarray(scored, dtype=np.int64)], dtype=torch.int64)
    metrics = classification_metrics(logits[:len(scored)], labels, predictor.classes)
    metrics["images_per_second"] = round(len(scored) / max(seconds, 1e-9), 1)  # clips per second for clip models
    metrics["input_kind"] = predictor.input_kind
    metrics["skipped_files"] = skipped
    # what "auto" became: the engine and precision that labelled, and where
    metrics.update(engine=predictor.engine, precision=predictor.precision, device=str(predictor.device))
    return metrics


def predict(run_dir: str, inputs: Sequence[str], top_k: int = 5, batch_size: int = 64, device: str = "auto",
            weights: str = "best", on_batch=None, engine: str = "auto", precision: str = "auto",
            augment_eval: str | None = None, strict: bool = False, skip: Collection[str] = ()) -> LabelledRows:
    """Label files, folders (recursive) or globs: an iterator of one row per image as batches finish, whose
    `engine`, `precision` and `device` say what labels them. An unreadable file is a row with its error, or with
    `strict` an error that stops the labelling. `skip`: paths to leave out (those an interrupted run already
    wrote rows for), compared as absolute paths: 'photos/a.png' and './photos/a.png' are one file."""
    if isinstance(inputs, (str, os.PathLike)):  # one path, not a sequence of its characters
        inputs = [inputs]
    inputs = [os.fspath(item) for item in inputs]
    if top_k < 1:
        raise VisionflowError(f"--top-k must be at least 1 (got {top_k})")
    if batch_size < 1:
        raise VisionflowError(f"--batch-size must be at least 1 (got {batch_size})")
    predictor = Predictor.from_run(run_dir, device=device, weights=weights, engine=engine, precision=precision,
                                   augment_eval=augment_eval)
    if predictor.input_kind == "clip":
        source = unlabelled_clips(inputs, predictor.frames)
    else:
        try:
            paths = expand_inputs(inputs)  # listed once, for the clip check and the labelling
        except NothingGiven:
            _refuse_clips(inputs, [])  # a folder of videos gives no image file: say that it holds clips
            raise
        _refuse_clips(inputs, paths)
        source = unlabelled_files(paths)
    if skip:
        skip = {os.path.abspath(path) for path in skip}
        source = source.subset([i for i in range(len(source)) if os.path.abspath(source.origin(i)) not in skip])
    warn_of_test_time_mirrors(predictor.augment_eval, predictor.classes, recorded=augment_eval is None)
    rows = predict_rows(predictor, source, top_k=top_k, batch_size=batch_size, on_batch=on_batch, strict=strict)
    return LabelledRows(rows, predictor.engine, predictor.precision, str(predictor.device), total=len(source))


def _refuse_clips(inputs: Sequence[str], paths: list[str]) -> None:
    """An image run given only clips (`paths`: the inputs' image files, or files named as typed): say so, naming the
    inputs that hold them, rather than 'no image files'."""
    if not all(is_clip_file(p) for p in paths):
        return
    holding = [item for item in inputs if any(is_clip_file(p) for p in expand_clip_inputs([item], report=False))]
    if holding:
        raise VisionflowError(f"the run's model takes images but {' '.join(holding)} "
                              f"{'holds' if len(holding) == 1 else 'hold'} clips (video files or .npy arrays)")


def make_dataset(out: str, spec: MovingDigitsSpec) -> dict:
    """Generate the moving-digits clips into OUT/<class>/ (see visionflow.data.moving_digits)."""
    return make_moving_digits(out, spec)


# --- looking at data -------------------------------------------------------------------------------------

def preview(data: str, augment: str, out: str, count: int = 32, seed: int = 0, image_size: int | None = None,
            channels: int | None = None, frames: int | None = None) -> Path:
    """A grid of training samples with the augmentation the training loop applies (before normalising).

    Clips take one row each, `frames` (default 16, as in training) frames wide, at the segment centres evaluation
    takes (training draws each segment's start or centre); giving `frames` also reads folders of frame folders as
    clips rather than as nested images."""
    if count < 1:
        raise VisionflowError(f"--count must be at least 1 (got {count})")
    if frames is not None and frames < 1:
        raise VisionflowError(f"--frames must be at least 1 (got {frames})")
    RunConfig.require(shape_checks(channels, image_size))
    check_seed(seed)
    check_picture_path(Path(out), "--out")  # a wrong name or place found before the work, not after it
    spec = AugmentSpec.parse(augment).refuse_unusual_strengths()
    dataset = open_data(data, frames=frames or 16, kind="image" if frames is None else "clip")
    source = dataset.train
    channels, size = source.decoding_shape(channels, image_size)
    spec.refuse_translate_beyond(size)
    if frames is not None and source.kind != "clip":  # after the refusals: an error stays one line
        log.warning("%s holds images, not clips; ignored: --frames", data)
    rng = np.random.default_rng(seed)
    picked = source.subset(np.sort(rng.choice(len(source), size=min(count, len(source)), replace=False)))
    part = decode_part(picked, channels, size)
    generator = torch.Generator().manual_seed(seed)
    images = part.images
    if images.ndim == 5:  # clips: the frames a model sees, one clip per row
        images = sample_frames(images, images.shape[1] // CACHE_FACTOR)
    x = Augment(spec)(images.float() / 255.0, generator)
    path = Path(out)
    columns = x.shape[1] if x.ndim == 5 else 8
    save_image_grid((x.flatten(0, x.ndim - 4) * 255).round().clamp(0, 255).to(torch.uint8), path, columns=columns)
    return path


# The input `models_table` counts each kind of model's parameters at: (channels, side of an image or a frame).
COUNTED_AT = {"image": (1, 28), "clip": (3, 32)}


def models_table() -> list[tuple[str, str, int, str]]:
    """(name, input kind, parameters for 10 classes at COUNTED_AT, summary) for every registered model."""
    rows = []
    for name in list_models():
        entry = model_entry(name)
        channels, side = COUNTED_AT[entry.input_kind]
        model = create_model(name, num_classes=10, in_channels=channels, image_size=side)
        rows.append((name, entry.input_kind, count_parameters(model), entry.summary))
    return rows


# --- the demo ---------------------------------------------------------------------------------------------

DEMO_MARKER = ".visionflow-demo"


def demo(out: str = "runs/demo", show_progress: bool = True) -> dict:
    """Train the seed CNN on the built-in digits, evaluate it and label a few held-out images written as PNGs."""
    run = RunDir(out)
    if run.exists(DEMO_MARKER):
        shutil.rmtree(run.path)  # the demo's own run from last time, and nothing else: it carries the marker
    elif run.path.exists() and any(run.path.iterdir()):
        raise VisionflowError(f"{run.path} exists and is not a demo run; the demo writes only to a new or demo folder")
    cfg = TrainConfig(data="digits", out=out, model="seed-cnn", epochs=12, batch_size=32, lr=2e-3,
                      augment="rotate=10,shift=0.08", seed=0)  # digits has only 1,617 training images: augment
    run.create()
    (run.path / DEMO_MARKER).write_text("written by `visionflow demo`; the next demo replaces this folder\n")
    report = train(cfg, show_progress=show_progress)
    metrics = evaluate(out, "digits")
    samples = run.path / "samples"
    samples.mkdir(exist_ok=True)
    dataset = open_data("digits")
    held_out, _ = evaluation_part(run, dataset)  # evaluate above has said its warnings
    from PIL import Image
    truth = {}
    for i in range(0, len(held_out), max(1, len(held_out) // 8))[:8]:
        image = held_out.read(i, 1, 28)[0].numpy()
        path = samples / f"held_out_{i:03d}_true_{held_out.classes[held_out.labels[i]]}.png"
        Image.fromarray(image).save(path)
        truth[str(path)] = held_out.classes[held_out.labels[i]]
    rows = list(predict(out, sorted(truth), top_k=3))
    return {"report": report, "evaluation": metrics, "predictions": rows, "truth": truth}
