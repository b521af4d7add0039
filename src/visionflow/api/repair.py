"""The repair verbs' Python API: train / resume a repair run, repair image files, evaluate against biharmonic.

    from visionflow.api import repair
    repair.train(RepairConfig(data="digits", out="runs/repair"))
    repair.evaluate("runs/repair", "digits", mask="center")   # model vs biharmonic, PSNR and SSIM
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visionflow.api import (evaluation_part, recorded_split, require_enough_to_train, require_same_data, say_each,
                           split_record)
from visionflow.config import check_seed
from visionflow.data.decode import decode_image, probe_image
from visionflow.data.loading import decode_part, stratified_split
from visionflow.data.sources import DataSet, DataSource, expand_inputs, open_data
from visionflow.devices import callers_random_state_kept, seed_global, select_device
from visionflow.errors import BrokenImage, VisionflowError
from visionflow.gan.masks import center_masks, coverage, random_masks
from visionflow.gan.repair import (PatchDiscriminator, RepairConfig, RepairGenerator, biharmonic_repair, composite,
                                   damage, fit_repair, psnr_ssim, repair_images, to_uint8, to_unit_range)
from visionflow.report.plots import check_picture_path, save_image_grid
from visionflow.runs import RunDir, atomic_write, file_in_the_way

log = logging.getLogger("visionflow")

EVALUATION_MASKS = ("center", "random")
VALIDATION_LIMIT = 1000  # images scored after every epoch; more only slows training down
# skimage's PSNR of an exactly repaired image is +inf (a stroke over plain background can be refilled
# exactly); one such image would make the mean infinite, so it counts as this many dB and is counted apart.
PERFECT_REPAIR_PSNR = 100.0


# --- training ------------------------------------------------------------------------------------------

def _training_sources(cfg: RepairConfig, dataset: DataSet,
                      split: dict | None = None) -> tuple[DataSource, DataSource, dict]:
    """(train, validation, split.json): validation is always split off the training part, so the data's test part
    stays untouched for `repair evaluate`, and scores the first VALIDATION_LIMIT held-out images. `split`: a resumed
    run's split.json (require_same_data), whose held-out images stay held out and, with --max-images, whose images
    trained on ("trained_on") are the ones that train (recorded_split); one without "items" that lists VALIDATION_LIMIT
    images, from before split.json recorded every held-out image (it listed the first VALIDATION_LIMIT only), has the
    seeded split made again, as its resume did then, and is written in full from then on (one that lists fewer lists
    them all)."""
    source = dataset.train
    drawn = source
    if cfg.max_images is not None and cfg.max_images < len(source):
        drawn = source.subset(np.sort(np.random.default_rng(cfg.seed).choice(len(source), size=cfg.max_images,
                                                                             replace=False)))
    cut_short = split is not None and "items" not in split and len(split["held_out"]) >= VALIDATION_LIMIT
    if split is not None and not cut_short:
        train, held, changes = recorded_split(cfg.data, source, split)
        if drawn is not source and "trained_on" not in split:  # from before "trained_on": the seeded draw
            keep = {drawn.origin(i) for i in range(len(drawn))}
            train = train.subset([i for i in range(len(train)) if train.origin(i) in keep])
            split = {**split, "trained_on": [train.origin(i) for i in range(len(train))]}
            require_enough_to_train(cfg.data, train, held)  # the draw may leave fewer than recorded_split counted
        if changes is not None:
            log.warning(changes)
    else:
        train_idx, val_idx = stratified_split(drawn.labels, cfg.val_split, cfg.seed)
        train, held = drawn.subset(train_idx), drawn.subset(val_idx)
        require_enough_to_train(cfg.data, train, held, f"{len(drawn)} in all, {cfg.val_split:.0%} held out", "add images")
        # every held-out image, validated or not (none is trained on), and how many items the data held, as a
        # classifier's split.json records them
        split = split_record(source, held)
        if drawn is not source:  # the sample a resume trains on, whatever files are added or removed since
            split["trained_on"] = [train.origin(i) for i in range(len(train))]
            del split["training_items_per_class"]  # the whole data's, not the sample's: recorded_split counts that
    return train, held.subset(np.arange(min(len(held), VALIDATION_LIMIT))), split


def _networks(channels: int, width: int) -> tuple[RepairGenerator, PatchDiscriminator]:
    return RepairGenerator(channels, width), PatchDiscriminator(channels)


def train(cfg: RepairConfig, show_progress: bool = True) -> dict:
    """Train a new repair run in cfg.out; returns report.json's content."""
    cfg.validate()
    device = select_device(cfg.device)  # an unavailable device fails before any work
    run = RunDir.for_new_run(cfg.out, cfg.data)
    dataset = open_data(cfg.data)
    dataset.train.require_kind("image", "image repair")
    channels, size = dataset.train.decoding_shape(cfg.channels, cfg.image_size)
    if size < 16:
        raise VisionflowError(f"{cfg.data}: images of {size}px are too small to repair (use --image-size 16 or more)")
    train_source, val_source, split = _training_sources(cfg, dataset)
    train_part = decode_part(train_source, channels, size, strict=cfg.strict)
    val_part = decode_part(val_source, channels, size, strict=cfg.strict)
    with callers_random_state_kept(device):  # seeded from here on, as before; the caller's stream given back after
        seed_global(cfg.seed, device)  # the initial weights
        generator, discriminator = _networks(channels, cfg.width)
        run.create()
        run.write_json("config.json", {"version": 1, "task": "repair", "train": cfg.to_dict(), "channels": channels,
                                       "image_size": size, "data_spec": dataset.spec})
        run.write_json("split.json", split)
        summary = fit_repair(generator, discriminator, cfg, train_part.images, val_part.images, run,
                             show_progress=show_progress)
        return _write_report(run, summary, train_part.skipped + val_part.skipped, generator)


def resume(run_dir: str, epochs: int | None = None, show_progress: bool = True, data: str | None = None,
           device: str | None = None, flag_warnings: Sequence[str] = ()) -> dict:
    """Continue an interrupted repair run from checkpoint.pt, or extend a finished one to `epochs`. `data`: where
    the run's data is now (moved, or given from another folder than the run's relative path). `flag_warnings`: a
    command line's warnings about the flags it ignores, said once the run and the data are checked, before decoding,
    so that a user error found first stays one line."""
    run = RunDir(run_dir)
    config = run.config_to_resume("repair")
    cfg = RepairConfig.for_resume(config["train"], epochs, data, device)
    cfg.validate()
    device = select_device(cfg.device)  # an unavailable device fails before any work
    checkpoint = run.load_checkpoint("repair")  # before decoding: damaged, or another kind of run's: fails at once
    run.refuse_fewer_epochs(int(checkpoint["state"]["epoch"]), epochs)
    dataset = open_data(cfg.data)
    train_source, val_source, split = _training_sources(cfg, dataset, require_same_data(run, dataset))
    say_each(flag_warnings)
    train_part = decode_part(train_source, config["channels"], config["image_size"], strict=cfg.strict)
    val_part = decode_part(val_source, config["channels"], config["image_size"], strict=cfg.strict)
    with callers_random_state_kept(device):  # the networks' init (then the checkpoint's weights) and the epochs draw
        generator, discriminator = _networks(config["channels"], cfg.width)
        config["train"], config["data_spec"] = cfg.to_dict(), dataset.spec  # the data may have moved
        run.write_json("config.json", config)
        run.write_json("split.json", split)  # the same held-out images, under the data's paths now
        summary = fit_repair(generator, discriminator, cfg, train_part.images, val_part.images, run,
                             checkpoint=checkpoint, show_progress=show_progress)
        return _write_report(run, summary, train_part.skipped + val_part.skipped, generator)


def _write_report(run: RunDir, summary: dict, skipped: list[tuple[str, str]], generator: RepairGenerator) -> dict:
    report = {"task": "repair", "parameters": sum(p.numel() for p in generator.parameters()),
              "epochs": summary["epochs"], "best_epoch": summary["best_epoch"],
              "best_val_psnr": summary["best_val_psnr"],
              "skipped_files": len(skipped), "skipped": [{"path": p, "reason": r} for p, r in skipped]}
    run.write_json("report.json", report)
    return report


def load_generator(run_dir: str | os.PathLike, device: str = "auto") -> tuple[RepairGenerator, dict]:
    """The run's best generator, ready to repair, and its config.json."""
    run = RunDir(run_dir)
    config = run.require("repair")
    generator = run.load_network(lambda: RepairGenerator(config["channels"], config["train"]["width"]),
                                 run.best_weights_name(), what="generator")
    return generator.to(select_device(device)).eval(), config


# --- repairing files --------------------------------------------------------------------------------------

def parse_box(text: str) -> tuple[int, int, int, int]:
    """'x,y,w,h' -> four integers (pixels, top-left corner first); one that fits no image is refused here."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise VisionflowError(f"--box: '{text}' is not x,y,w,h (four whole numbers of pixels)") from None
    if x < 0 or y < 0:  # the box lies inside the image, whose top-left pixel is 0,0
        raise VisionflowError(f"--box {text}: x and y count pixels from the image's top-left corner: they are 0 or more")
    if w < 1 or h < 1:
        raise VisionflowError(f"--box {text}: the width and height are 1 pixel or more")
    return x, y, w, h


def read_mask(mask_path: str) -> torch.Tensor:
    """--mask MASK.png as a hole (1, 1, H, W), white (>= 128) = missing; one that marks no pixel or every pixel is
    refused here, as it would be for every image."""
    masks = (decode_image(mask_path, 1, None)[None] >= 128).float()
    hole = float(coverage(masks)[0])
    if hole == 0.0:
        raise VisionflowError(f"--mask {mask_path}: the mask is empty (no white pixels): nothing to repair")
    if hole == 1.0:
        raise VisionflowError(f"--mask {mask_path}: the mask covers all of the image: nothing is left to repair from")
    return masks


def image_hole(mask: torch.Tensor | None, box: tuple[int, int, int, int] | None, height: int, width: int,
               origin: str) -> torch.Tensor:
    """The hole of one image (1, 1, H, W): the --mask read once, or the --box. A hole that does not fit this image
    (images differ in size) is BrokenImage: the image is skipped and named, as an unreadable one is."""
    if mask is not None:
        if tuple(mask.shape[-2:]) != (height, width):
            raise BrokenImage(origin, f"{width}x{height} pixels, where --mask is {mask.shape[3]}x{mask.shape[2]}")
        return mask
    x, y, w, h = box
    if x + w > width or y + h > height:
        raise BrokenImage(origin, f"{width}x{height} pixels: --box {x},{y},{w},{h} does not lie inside it")
    if (w, h) == (width, height):
        raise BrokenImage(origin, f"{width}x{height} pixels: --box {x},{y},{w},{h} covers all of it, leaving nothing "
                                  "to repair from")
    masks = torch.zeros(1, 1, height, width)
    masks[:, :, y:y + h, x:x + w] = 1.0
    return masks


def repair_file(generator: RepairGenerator, config: dict, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """One uint8 image (C, H, W) at its own size: the network runs at the run's size, its fill is scaled
    back to (H, W), and every known pixel is kept exactly."""
    size = config["image_size"]
    device = next(generator.parameters()).device
    small = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    # A low-resolution pixel is hole if the resampling filter that made it reached any hole pixel (the same
    # filter, so its weights say so): the network never sees damaged content. The area it covers alone was
    # not enough: the antialiased filter reaches further, and the repair moved with the hole's old pixels.
    small_masks = (F.interpolate(masks, size=(size, size), mode="bilinear", antialias=True, align_corners=False) > 0).float()
    with torch.no_grad():
        x = damage(to_unit_range(small.round()), small_masks).to(device)
        filled = generator(x, small_masks.to(device)).cpu()
    filled = F.interpolate(filled, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return composite(image[None], to_uint8(filled), masks)[0]


def _save_png(array: torch.Tensor, path: Path) -> None:
    """uint8 (C, H, W) -> PNG, atomically."""
    pixels = array.permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def show_hole(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The damaged image as a person should see it: hole pixels mid-grey."""
    return composite(images, torch.full_like(images, 128), masks)


def run(run_dir: str, images: Sequence[str], out: str, mask: str | None = None, box: str | None = None,
        device: str = "auto", strict: bool = False) -> list[dict]:
    """Repair image files (files, folders, globs); writes OUT/<name>_repaired.png and OUT/<name>_side_by_side.png
    (damaged | repaired). An unreadable image, or one the mask or box does not fit, is skipped with a warning and an
    {"image", "error"} row (refused with `strict`); the others are still repaired."""
    if (mask is None) == (box is None):
        raise VisionflowError("give exactly one of --mask MASK.png or --box x,y,w,h")
    parsed_box = parse_box(box) if box is not None else None
    mask_hole = read_mask(mask) if mask is not None else None
    generator, config = load_generator(run_dir, device)
    out_dir = Path(out)
    in_the_way = file_in_the_way(out_dir)
    if in_the_way is not None:
        raise VisionflowError(f"--out {out}: {in_the_way} is a file, not a folder for the repaired images")
    paths = expand_inputs(images, "repair")  # a path that does not exist is an error before any work
    written, greyed = [], []
    for number, path in enumerate(paths):
        try:
            image = decode_image(path, config["channels"], None)
            masks = image_hole(mask_hole, parsed_box, image.shape[1], image.shape[2], path)
        except BrokenImage as exc:
            if strict:
                raise
            log.warning("skipped %s", exc)
            written.append({"image": path, "error": exc.reason})
            continue
        if config["channels"] == 1 and probe_image(path)[0] == 3:
            greyed.append(path)
        repaired = repair_file(generator, config, image, masks)
        stem = Path(path).stem if len(paths) == 1 else f"{number:03d}_{Path(path).stem}"
        repaired_path, side_path = out_dir / f"{stem}_repaired.png", out_dir / f"{stem}_side_by_side.png"
        _save_png(repaired, repaired_path)
        _save_png(torch.cat([show_hole(image[None], masks)[0], repaired], dim=2), side_path)
        written.append({"image": path, "repaired": str(repaired_path), "side_by_side": str(side_path),
                        "hole_fraction": round(float(coverage(masks)[0]), 4)})
    if greyed:  # the colour is lost, not repaired: say so rather than hand back grey pictures unexplained
        several = len(greyed) > 1
        log.warning("%s %s in colour: converted to grey for the model, which was trained on grey images (the repaired "
                    "%s grey)", greyed[0] + (f" and {len(greyed) - 1} more" if several else ""), "are" if several else "is",
                    "pictures are" if several else "picture is")
    return written


# --- evaluation -------------------------------------------------------------------------------------------

def evaluation_masks(kind: str, count: int, size: int, hole: int, seed: int) -> torch.Tensor:
    if kind == "center":
        return center_masks(count, size, hole)
    return random_masks(count, size, torch.Generator().manual_seed(seed), center_hole=hole)


def mean_scores(psnr: np.ndarray, ssim: np.ndarray) -> dict:
    """Per-image scores -> {"psnr", "ssim", "perfect"}, finite even when some repairs are exact."""
    return {"psnr": round(float(np.minimum(psnr, PERFECT_REPAIR_PSNR).mean()), 4),
            "ssim": round(float(ssim.mean()), 4), "perfect": int(np.isinf(psnr).sum())}


def evaluate(run_dir: str, data: str, mask: str = "center", hole: int | None = None, limit: int | None = None,
             seed: int = 0, examples: str | None = None, device: str = "auto", strict: bool = False) -> dict:
    """PSNR and SSIM on held-out images for the model and, on the same images and masks, for biharmonic."""
    if mask not in EVALUATION_MASKS:
        raise VisionflowError(f"--mask must be one of {', '.join(EVALUATION_MASKS)} (got {mask})")
    if hole is not None and mask != "center":
        raise VisionflowError(f"--hole sets the size of the center mask; --mask {mask} draws its own holes")
    check_seed(seed)
    if examples is not None:
        check_picture_path(Path(examples), "--examples")  # a wrong name or place found before the work, not after it
    generator, config = load_generator(run_dir, device)
    size, channels = config["image_size"], config["channels"]
    hole = size // 2 if hole is None else hole
    if not 1 <= hole < size:
        raise VisionflowError(f"--hole must be between 1 and {size - 1} for {size}px images (got {hole})")
    if limit is not None and limit < 1:
        raise VisionflowError(f"--limit must be at least 1 (got {limit})")
    run_directory, dataset = RunDir(run_dir), open_data(data)
    source, warnings = evaluation_part(run_directory, dataset)
    source.require_kind("image", "image repair")
    say_each(warnings)
    if limit is not None and limit < len(source):
        # a seeded spread over the whole part: folders list one class after another
        source = source.subset(np.sort(np.random.default_rng(seed).choice(len(source), size=limit, replace=False)))
    part = decode_part(source, channels, size, strict=strict)
    masks = evaluation_masks(mask, len(part), size, hole, seed)
    by_model = repair_images(generator, part.images, masks)
    by_biharmonic = biharmonic_repair(part.images, masks)
    scores = {}
    for name, repaired in (("model", by_model), ("biharmonic", by_biharmonic)):
        scores[name] = mean_scores(*psnr_ssim(part.images, repaired))
    if examples is not None:
        # spread over the part: folders list one class after another, so the first 8 would all be alike
        picked = torch.from_numpy(np.unique(np.linspace(0, len(part) - 1, min(8, len(part))).round().astype(np.int64)))
        rows = torch.stack([show_hole(part.images[picked], masks[picked]), by_biharmonic[picked], by_model[picked],
                            part.images[picked]], dim=1).flatten(0, 1)
        save_image_grid(rows, Path(examples), columns=4)
    return {**scores, "n": len(part), "mask": mask, "hole": hole if mask == "center" else None,
            "skipped_files": len(part.skipped)}
