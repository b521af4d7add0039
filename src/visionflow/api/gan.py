"""The GAN's Python API: train_gan, resume_gan, sample, evaluate_gan (what `visionflow gan ...` calls).

    from visionflow.api import gan
    gan.train_gan(GanConfig(data="digits", out="runs/gan", conditional=True))
    gan.sample("runs/gan", 64, "grid.png", label="3")
    gan.evaluate_gan("runs/gan", "digits")   # {"fid", "fid_real_floor", "fid_untrained", "label_accuracy", "n", ...}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from visionflow.api import (require_same_classes, require_same_data, resume as resume_classifier, say_each,
                           train as train_classifier)
from visionflow.config import TrainConfig, check_seed
from visionflow.data.loading import DecodedPart, decode_part, stratified_split
from visionflow.data.sources import DataSet, open_data
from visionflow.devices import callers_random_state_kept, select_device
from visionflow.errors import VisionflowError
from visionflow.gan.dcgan import upsampling_plan
from visionflow.gan.fid import classifier_features, feature_distance
from visionflow.gan.generate import GanRun, load_gan_run
from visionflow.gan.train import GanConfig, build_pair, fit_gan, standing_statistics
from visionflow.infer.predictor import Predictor
from visionflow.models import create_model
from visionflow.report.plots import check_grid_fits, check_picture_path, is_image_name, save_image_grid
from visionflow.runs import RunDir, atomic_write, file_in_the_way

log = logging.getLogger("visionflow")


# --- training --------------------------------------------------------------------------------------------

def _decode_training_images(cfg: GanConfig, dataset: DataSet, channels: int | None = None,
                            size: int | None = None, flag_warnings: Sequence[str] = ()) -> DecodedPart:
    """`flag_warnings`: the caller's (train_gan), said once the data is checked, before it decodes."""
    source = dataset.train
    source.require_kind("image", "the GAN")
    channels, size = source.decoding_shape(channels or cfg.channels, size or cfg.image_size)
    upsampling_plan(size)
    say_each(flag_warnings)
    part = decode_part(source, channels, size, strict=cfg.strict)
    if len(part) < 2:  # a step takes two images at least: one would train nothing and report it as done
        raise VisionflowError(f"{cfg.data}: the GAN needs at least 2 readable images (found {len(part)})")
    if cfg.conditional and bool((part.labels < 0).any()):
        raise VisionflowError(f"{cfg.data}: --conditional needs labelled images (class folders or MNIST files)")
    return part


def train_gan(cfg: GanConfig, show_progress: bool = True, flag_warnings: Sequence[str] = ()) -> dict:
    """Train a new GAN run in cfg.out; returns {"epochs", "rows", "skipped_files"}. `flag_warnings`: a command line's
    warnings about its flags, said once the data is checked, so that a user error found first stays one line."""
    cfg.validate()
    device = select_device(cfg.device)  # an unavailable device fails before any work
    run = RunDir.for_new_run(cfg.out, cfg.data)
    dataset = open_data(cfg.data)
    part = _decode_training_images(cfg, dataset, flag_warnings=flag_warnings)
    channels, size = part.images.shape[1], part.images.shape[-1]
    with callers_random_state_kept(device):  # seeded from here on; the caller's stream given back after
        pair = build_pair(cfg, channels, size, len(part.classes))
        run.create()
        run.write_json("config.json", {"version": 1, "kind": "gan", "gan": cfg.to_dict(), "classes": part.classes,
                                       "channels": channels, "image_size": size, "data_spec": dataset.spec})
        summary = fit_gan(pair, cfg, part, run, show_progress=show_progress)
    return {**summary, "skipped_files": len(part.skipped)}


def resume_gan(run_dir: str, epochs: int | None = None, show_progress: bool = True, data: str | None = None,
               device: str | None = None, flag_warnings: Sequence[str] = ()) -> dict:
    """Continue an interrupted GAN run from checkpoint.pt, or extend a finished one to `epochs`. `data`: where the
    run's data is now (moved, or given from another folder than the run's relative path); its classes must be the
    run's. `flag_warnings`: as train_gan's."""
    run = RunDir(run_dir)
    config = run.config_to_resume("gan")
    cfg = GanConfig.for_resume(config["gan"], epochs, data, device)
    cfg.validate()
    device = select_device(cfg.device)  # an unavailable device fails before any work
    checkpoint = run.load_checkpoint("gan")  # before decoding: damaged, or another kind of run's: fails at once
    run.refuse_fewer_epochs(int(checkpoint["epoch"]), epochs)
    dataset = open_data(cfg.data)
    dataset.train.require_kind("image", "the GAN")  # as the classes, before require_same_data can warn
    require_same_classes(cfg.data, dataset, config["classes"])
    require_same_data(run, dataset)
    part = _decode_training_images(cfg, dataset, config["channels"], config["image_size"], flag_warnings)
    with callers_random_state_kept(device):  # seeded from here on; the caller's stream given back after
        pair = build_pair(cfg, config["channels"], config["image_size"], len(part.classes))
        config["gan"], config["data_spec"] = cfg.to_dict(), dataset.spec  # the data may have moved
        run.write_json("config.json", config)
        summary = fit_gan(pair, cfg, part, run, checkpoint=checkpoint, show_progress=show_progress)
    return {**summary, "skipped_files": len(part.skipped)}


# --- sampling --------------------------------------------------------------------------------------------

def sample(run_dir: str, count: int, out: str, label: str | None = None, seed: int = 0, device: str = "auto") -> list[Path]:
    """`count` images from the EMA generator: one grid when `out` is an image file name (.png, .jpg, ...),
    else one PNG each in the folder `out`. Conditional models make class `label`, or cycle through every class."""
    if count < 1:
        raise VisionflowError(f"--n must be at least 1 (got {count})")
    check_seed(seed)
    gan = load_gan_run(run_dir, device)
    labels = None
    if label is not None:
        labels = torch.full((count,), gan.label_index(label), dtype=torch.int64)
    elif gan.config.conditional:
        labels = torch.arange(count) % len(gan.classes)  # a grid column per class
    path = Path(out)
    if is_image_name(path):
        columns = min(len(gan.classes) if gan.config.conditional and label is None else 8, count)
        check_picture_path(path, "--out")
        check_grid_fits(path, count, columns, gan.image_size, gan.image_size)  # before generating them all
        images, _ = gan.images(count, labels, seed=seed)
        save_image_grid(images, path, columns=columns)
        return [path]
    in_the_way = file_in_the_way(path)
    if in_the_way is not None:
        raise VisionflowError(f"--out {out}: {in_the_way} is a file; give a folder, or an image file name for one grid")
    names = [f"{i:05d}_{gan.classes[int(labels[i])]}.png" if labels is not None else f"{i:05d}.png" for i in range(count)]
    taken = next((name for name in names if (path / name).exists()), None)
    if taken is not None:  # a folder of samples is written anew, never over files already there
        raise VisionflowError(f"--out {out}: already holds {taken}; choose a new folder")
    images, _ = gan.images(count, labels, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, images):
        array = image.permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[:, :, 0] if gan.channels == 1 else array)
        atomic_write(path / name, lambda tmp: picture.save(tmp, format="PNG"))
    return [path / name for name in names]


# --- domain FID ------------------------------------------------------------------------------------------

def _warn_if_singular(measured: str, count: int, dimensions: int, unreliable: str, remedy: str) -> None:
    """A warning when `count` feature vectors, `measured` in words, are too few for the domain FID: the unbiased
    covariance of N vectors (fid.gaussian_statistics) has rank N - 1 at most, so in D dimensions it is singular unless
    N > D, at N = D too."""
    if count <= dimensions:
        log.warning("%s, not above the %d feature dimensions of the domain FID: the covariance of no more vectors than "
                    "dimensions is singular, so %s unreliable (%s)", measured, dimensions, unreliable, remedy)


def _warn_of_too_few_samples(count: int, dimensions: int) -> None:
    _warn_if_singular(f"--n {count}", count, dimensions, "the FID is", f"give --n {dimensions + 1} or more")


def _feature_classifier(run: RunDir, gan: GanRun, data: str, spec: str, classifier: str | None, count: int,
                        device: str, strict: bool, show_progress: bool) -> tuple[Predictor, set[str]]:
    """The classifier whose feature space measures the distances: the one given, or the run's own,
    trained once with `visionflow train`'s defaults (seed-cnn) on DATA and kept in RUN_DIR/classifier; and the
    broken files that training named (skipped with a warning already). Too few samples (`count`) for its features
    are said before it trains, not after the minutes that takes."""
    named: set[str] = set()
    given = classifier is not None
    if not given:
        own = RunDir(run / "classifier")
        cfg = TrainConfig(data=data, out=str(own.path), channels=gan.channels, image_size=gan.image_size,
                          seed=gan.config.seed, strict=strict, device=device)
        # Its width, from an untrained copy (the classes size the head, not the features); building one draws from
        # torch's global generator, the caller's.
        with callers_random_state_kept(torch.device("cpu")):
            probe = create_model(cfg.model, num_classes=2, in_channels=gan.channels, image_size=gan.image_size,
                                 **cfg.model_options)
        started = own.exists("config.json") and any(own.path.glob("*.safetensors"))  # it finished an epoch at least
        if started and own.read_json("config.json").get("data_spec") != spec:
            raise VisionflowError(f"{own.path} was trained on other data; give --classifier for {data}")
        _warn_of_too_few_samples(count, probe.num_features)
        if not started:  # a folder left before its first epoch gives way, as to any new run
            log.warning("training the domain-FID classifier (seed-cnn on %s) once into %s", data, own.path)
            report = train_classifier(cfg, show_progress=show_progress)
            named = {item["path"] for item in report["skipped"]}
        elif not own.exists("report.json"):  # interrupted: its features are not the finished classifier's
            log.warning("finishing the domain-FID classifier in %s, interrupted before", own.path)
            report = resume_classifier(str(own.path), show_progress=show_progress, data=data, device=device)
            named = {item["path"] for item in report["skipped"]}
        classifier = str(own.path)
    predictor = Predictor.from_run(classifier, device=device)
    if (predictor.preprocess.channels, predictor.preprocess.image_size) != (gan.channels, gan.image_size):
        raise VisionflowError(f"--classifier {classifier}: it takes {predictor.preprocess.channels}x"
                              f"{predictor.preprocess.image_size}px images but the GAN makes {gan.channels}x{gan.image_size}px")
    if gan.config.conditional and predictor.classes != gan.classes:
        raise VisionflowError(f"--classifier {classifier}: its classes {predictor.classes} differ from the GAN's {gan.classes}")
    if given:  # nothing trained: said now, before the images are decoded
        _warn_of_too_few_samples(count, predictor.model.num_features)
    return predictor, named


def evaluate_gan(run_dir: str, data: str, classifier: str | None = None, count: int = 2000, seed: int = 0,
                 show_progress: bool = True, device: str = "auto", strict: bool = False) -> dict:
    """Domain FID of the EMA generator against DATA's training images, beside two references on the same
    features: held-out real images (the floor) and the untrained generator (the ceiling). A broken file in DATA
    is skipped with a warning (refused with `strict`) and counted in "skipped_files"."""
    if count < 2:
        raise VisionflowError(f"--n must be at least 2 (got {count})")
    check_seed(seed)
    gan = load_gan_run(run_dir, device)  # an unavailable device fails before any work
    dataset = open_data(data)
    if gan.config.conditional and dataset.train.classes != gan.classes:
        raise VisionflowError(f"{data}: its classes {dataset.train.classes} differ from the GAN's {gan.classes}")
    predictor, named = _feature_classifier(RunDir(run_dir), gan, data, dataset.spec, classifier, count, device,
                                           strict, show_progress)
    # The files a classifier trained just now warned about are not named a second time.
    train = decode_part(dataset.train, gan.channels, gan.image_size, strict=strict, named=named)
    if dataset.test is not None:
        reference, held_out = train, decode_part(dataset.test, gan.channels, gan.image_size, strict=strict, named=named)
    else:  # no test part: hold out a fifth of the training images for the floor
        keep, hold = stratified_split(train.labels.numpy(), 0.2, seed)
        reference = DecodedPart(train.images[keep], train.labels[keep], [], train.classes)
        held_out = DecodedPart(train.images[hold], train.labels[hold], [], train.classes)
    too_few = [f"{len(part)} {where}" for part, where in ((reference, "to measure against"), (held_out, "held out"))
               if len(part) < 2]
    if too_few:  # a covariance of one vector is NaN: the FIDs would print as nan
        raise VisionflowError(f"{data}: the domain FID needs 2 readable images or more to measure against and 2 held "
                              f"out (found {' and '.join(too_few)}); give more images")
    dimensions = predictor.model.num_features
    fewer_features = "or a --classifier with fewer feature dimensions: seed-rnn has 32"
    _warn_if_singular(f"every FID is measured against {len(reference)} training images of {data}"
                      + ("" if dataset.test is not None else " (four fifths of them)"), len(reference), dimensions,
                      "every FID here is", f"give more images, {dimensions + 1} or more in the reference, {fewer_features}")
    _warn_if_singular(f"the floor (fid_real_floor) is measured on {len(held_out)} held-out images "
                      f"({'the test part of' if dataset.test is not None else 'a fifth of'} {data})", len(held_out),
                      dimensions, "the floor is", f"give more images, {dimensions + 1} or more held out, {fewer_features}")
    reference_features, _ = classifier_features(predictor, reference.images)
    held_out_features, _ = classifier_features(predictor, held_out.images)

    # Conditional models draw classes as often as the training data holds them, as a real sample would.
    labels = None
    if gan.config.conditional:
        frequencies = torch.bincount(reference.labels, minlength=len(gan.classes)).float()
        labels = torch.multinomial(frequencies, count, replacement=True, generator=torch.Generator().manual_seed(seed))
    generated, _ = gan.images(count, labels, seed=seed)
    generated_features, predicted = classifier_features(predictor, generated)

    with callers_random_state_kept(torch.device("cpu")):  # build_pair seeds the CPU's generator, the caller's too
        untrained = build_pair(gan.config, gan.channels, gan.image_size, len(gan.classes)).generator.to(gan.device)
    standing_statistics(untrained, gan.config.seed)
    untrained_run = GanRun(untrained, gan.config, gan.classes, gan.channels, gan.image_size, gan.device)
    untrained_features, _ = classifier_features(predictor, untrained_run.images(count, labels, seed=seed)[0])

    result = {
        "fid": round(feature_distance(generated_features, reference_features), 4),
        "fid_real_floor": round(feature_distance(held_out_features, reference_features), 4),
        "fid_untrained": round(feature_distance(untrained_features, reference_features), 4),
    }
    if labels is not None:
        correct = predicted == labels.numpy()
        result["label_accuracy"] = round(float(correct.mean()), 4)
        result["label_accuracy_per_class"] = {
            name: round(float(correct[labels.numpy() == k].mean()), 4)
            for k, name in enumerate(gan.classes) if bool((labels == k).any())}
    result.update({"n": count, "n_real_reference": len(reference), "n_real_held_out": len(held_out),
                   "features": f"{dimensions}-d forward_features of {classifier or Path(run_dir) / 'classifier'}",
                   # a fifth held out of the training part carries no broken files of its own: they are train's
                   "skipped_files": len(train.skipped) + len(held_out.skipped)})
    return result

